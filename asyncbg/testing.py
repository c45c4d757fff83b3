"""Helpers and pytest fixtures for testing apps that use asyncbg.

Opt in from your ``conftest.py`` (it is not registered as an automatic pytest
plugin, so it never loads into test runs that did not ask for it)::

    pytest_plugins = ["asyncbg.testing"]

Fixtures:

- ``asyncbg_eager``: a function, ``with asyncbg_eager(bg): ...``, that turns
  eager mode on for ``bg`` inside the block (see :func:`eager`).
- ``asyncbg_idle``: a function, ``asyncbg_idle(bg, timeout=5.0)``, that waits
  until ``bg`` (or, with no argument, every running AsyncBG) has no job
  running and no item queued (see :func:`wait_idle`).
- ``asyncbg_stop_started`` (autouse): after each test, stops every AsyncBG
  whose loop the test started, so no loop thread outlives its test (see
  :func:`stop_started`).

The helpers work without pytest too.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import pytest

from .extension import AsyncBG
from .lifecycle import AppState, _states

__all__ = [
    "asyncbg_eager",
    "asyncbg_idle",
    "asyncbg_stop_started",
    "eager",
    "running_instances",
    "stop_started",
    "wait_idle",
]

#: Seconds :func:`stop_started` gives each started AsyncBG to drain.
STOP_TIMEOUT = 2.0


def running_instances() -> list[AppState]:
    """The state of every app (of every AsyncBG) in this process whose loop runs now."""
    return [st for st in list(_states) if st.loop_thread.running]


@contextlib.contextmanager
def eager(bg: AsyncBG) -> Iterator[AsyncBG]:
    """Turn eager mode on for ``bg`` inside the ``with`` block, then back to what it was.

    In eager mode ``submit`` and ``enqueue`` return only once the work is done
    (the config key ``ASYNCBG_EAGER``, switched for a part of a test); an
    exception from a consumer propagates out of ``enqueue``. With several apps
    bound, it is the app of the current app context. Yields ``bg``.

    :raises RuntimeError: if ``bg`` has no app.
    """
    config = bg._require_app().config
    before = config.get("ASYNCBG_EAGER", False)
    config["ASYNCBG_EAGER"] = True
    try:
        yield bg
    finally:
        config["ASYNCBG_EAGER"] = before


def wait_idle(*bgs: AsyncBG, timeout: float = 5.0) -> None:
    """Wait until each of ``bgs`` (none given: every running AsyncBG) is idle.

    Idle means no job running or accepted, and no queue item queued or in hand.

    :raises TimeoutError: if one is still busy after ``timeout`` seconds in all;
        the message says what it is busy with.
    :raises RuntimeError: if called from a loop thread.
    """
    targets: tuple[AsyncBG | AppState, ...] = bgs or tuple(running_instances())
    deadline = time.monotonic() + timeout
    for target in targets:
        target.wait_idle(max(0.0, deadline - time.monotonic()))


@contextlib.contextmanager
def stop_started(timeout: float = STOP_TIMEOUT) -> Iterator[None]:
    """Stop, on leaving the block, every AsyncBG whose loop was started inside it.

    Those already running when the block began are left alone, and so are those
    that never started. Each gets ``timeout`` seconds to drain.
    """
    before = {id(st) for st in running_instances()}
    try:
        yield
    finally:
        for st in running_instances():
            if id(st) not in before:
                st.stop(timeout=timeout)


@pytest.fixture
def asyncbg_eager() -> Callable[[AsyncBG], contextlib.AbstractContextManager[AsyncBG]]:
    """``with asyncbg_eager(bg): ...`` runs the block with ``bg`` in eager mode."""
    return eager


@pytest.fixture
def asyncbg_idle() -> Callable[..., None]:
    """``asyncbg_idle(bg, timeout=5.0)``: wait until ``bg`` (default: all running) is idle."""
    return wait_idle


@pytest.fixture(autouse=True)
def asyncbg_stop_started() -> Iterator[None]:
    """Stop every AsyncBG whose loop this test started, after the test."""
    with stop_started():
        yield

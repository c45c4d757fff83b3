"""Helpers shared by the tests: gates and bounded waits, not sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import pytest

#: Upper bound for every wait in these tests: long enough for a loaded 2-core
#: machine, short enough that a broken behaviour fails instead of hanging.
WAIT = 10.0


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Gate:
    """A one-shot flag that threads and coroutines on any event loop can wait for.

    ``set()`` is thread-safe and wakes waiters in threads (``wait``) and on event
    loops (``await wait_async()``) alike, so a test holds a job at a known point
    and releases it when it has checked what it wanted, with no sleeps.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def set(self) -> None:
        with self._lock:
            self._event.set()
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            with contextlib.suppress(RuntimeError):  # that loop has closed
                loop.call_soon_threadsafe(_resolve, fut)

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float = WAIT) -> bool:
        """Block this thread until set; return False after ``timeout``."""
        return self._event.wait(timeout)

    async def wait_async(self, timeout: float = WAIT) -> None:
        """Wait on the running event loop until set.

        :raises TimeoutError: after ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._event.is_set():
                return
            self._waiters.append((loop, fut))
        async with asyncio.timeout(timeout):
            await fut


def wait_for(
    condition: Callable[[], Any], timeout: float = WAIT, what: str = "condition", poll: float = 0.01
) -> Any:
    """Poll ``condition`` until it returns something truthy and return that; fail
    the test after ``timeout``. For state another thread or process changes
    without telling anyone; prefer a Gate where the test controls both sides."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


def in_child(body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Fork; run ``body()`` in the child, send back its dict (or its error) through a
    pipe and leave with ``os._exit``; return the dict in the parent."""
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        # 3.12+ warns that forking a multi-threaded process is risky: that is
        # exactly the situation under test.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            # A child that hangs is killed, which closes the pipe: the parent fails
            # instead of waiting forever.
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(int(WAIT * 3))
            os.close(read_fd)
            try:
                out: dict[str, Any] = body()
            except BaseException:
                out = {"error": traceback.format_exc()}
                code = 1
            with os.fdopen(write_fd, "w") as pipe:
                json.dump(out, pipe)
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        # The child's timeouts are bounded; a crashed child closes the pipe.
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert data, f"child sent nothing (wait status {status})"
    result: dict[str, Any] = json.loads(data)
    assert "error" not in result, result.get("error")
    assert os.waitstatus_to_exitcode(status) == 0
    return result


def run_python(
    script: str, cwd: Any, timeout: float = WAIT * 2
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter (``python -c``) in ``cwd``; return the
    finished process with its text output. Bounded by ``timeout``."""
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        check=False,
    )

"""Helpers shared by the tests: gates and bounded waits, not sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
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

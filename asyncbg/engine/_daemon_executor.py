"""Trick 3: a default executor whose threads never hold up interpreter exit.

The loop's default executor runs sync jobs and ``asyncio.to_thread``.
``ThreadPoolExecutor`` joins its threads at exit, so one hung sync job would
hang the process forever; :class:`DaemonExecutor` threads are daemons and are
abandoned. asyncio's ``set_default_executor`` insists on a
``ThreadPoolExecutor``, so it is a subclass that uses none of the parent's
machinery: what it relies on is that asyncio goes on accepting such a subclass
(and routing work through its ``submit``). :func:`install` checks that on each
new loop and falls back to a stock :class:`StockExecutor` otherwise.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from ._tricks import ENV_SWITCH, forced_off, warn_fallback

NAME = "executor"

T = TypeVar("T")


class DaemonExecutor(concurrent.futures.ThreadPoolExecutor):
    """A thread pool whose threads never hold up interpreter exit.

    (A subclass only because asyncio insists on one; none of its threads are used.)
    """

    def __init__(self, max_workers: int, name: str) -> None:
        super().__init__(max_workers, thread_name_prefix=name)
        self._max_workers = max_workers
        self._name = name
        self._work: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._workers: list[threading.Thread] = []
        self._shutdown = False
        self._lock = threading.Lock()

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        """Queue ``fn(*args, **kwargs)``, starting a daemon thread when none is idle."""
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new work after shutdown")
            fut: concurrent.futures.Future[T] = concurrent.futures.Future()
            self._work.put((fut, fn, args, kwargs))
            if not self._idle.acquire(blocking=False) and len(self._workers) < self._max_workers:
                t = threading.Thread(
                    target=self._worker, name=f"{self._name}-{len(self._workers)}", daemon=True
                )
                self._workers.append(t)
                t.start()
        return fut

    @property
    def threads(self) -> list[threading.Thread]:
        """The worker threads started so far."""
        return self._workers

    def _worker(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                self._work.put(None)
                return
            fut, fn, args, kwargs = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args, **kwargs))
                except BaseException as exc:
                    fut.set_exception(exc)
            del item, fut, fn, args, kwargs
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new work, cancel queued work if asked, and let the threads finish."""
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while True:
                    try:
                        item = self._work.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        item[0].cancel()
            self._work.put(None)
        if wait:
            for t in self._workers:
                t.join()


class StockExecutor(concurrent.futures.ThreadPoolExecutor):
    """The fallback: a plain ``ThreadPoolExecutor`` (threads joined at exit).

    It only notes its threads, through the public ``initializer`` hook, so that
    ``LoopThread.in_worker_thread`` keeps working.
    """

    def __init__(self, max_workers: int, name: str) -> None:
        self._workers: list[threading.Thread] = []
        super().__init__(max_workers, thread_name_prefix=name, initializer=self._note_thread)

    def _note_thread(self) -> None:
        self._workers.append(threading.current_thread())

    @property
    def threads(self) -> list[threading.Thread]:
        """The worker threads started so far."""
        return self._workers


Executor = DaemonExecutor | StockExecutor


def _set_default(loop: asyncio.AbstractEventLoop, executor: Executor) -> str | None:
    try:
        # A warning here (as 3.8-3.10 gave for a non-ThreadPoolExecutor) is the
        # first sign asyncio is about to stop accepting it.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loop.set_default_executor(executor)
    except Exception as exc:
        return f"the loop refused it as default executor: {exc!r}"
    return None


def install(loop: asyncio.AbstractEventLoop, max_workers: int, name: str) -> Executor:
    """Make a default executor for ``loop`` and install it; return it.

    A :class:`DaemonExecutor` when asyncio accepts one; otherwise (or when the
    test switch says so) a :class:`StockExecutor`, with one warning per process.
    """
    if forced_off(NAME):
        warn_fallback(NAME, f"turned off by the {ENV_SWITCH} test switch")
    else:
        daemon = DaemonExecutor(max_workers, name)
        reason = _set_default(loop, daemon)
        if reason is None:
            return daemon
        daemon.shutdown(wait=False)
        warn_fallback(NAME, reason)
    stock = StockExecutor(max_workers, name)
    if _set_default(loop, stock) is not None:
        # Even a stock ThreadPoolExecutor refused: asyncio makes its own on first
        # use; sync jobs still run, only in_worker_thread() cannot see them.
        stock.shutdown(wait=False)
    return stock

"""Named bounded queues and the pools of workers that consume them on the loop.

Producers in any thread append under one lock; workers are started on demand
(up to ``concurrency``) by a single posted "kick", so an item put on an idle
queue starts being handled in the same loop turn as the wake-up, and a queue
with nothing to do holds no task at all.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..errors import NotRunning, QueueFull
from .after_fork import ResetAfterFork
from .checks import at_least
from .jobs import set_if_pending
from .logthrottle import FlushTimer, LogThrottle, describe_exception, short_repr
from .runner import FAILURE_LOG_INTERVAL, CloseTolerant
from .tasks import is_async_callable

if TYPE_CHECKING:
    from .loop import LoopThread

__all__ = ["WorkQueue"]

log = logging.getLogger("asyncbg")

_after_fork: ResetAfterFork[WorkQueue] = ResetAfterFork(lambda q: q._reset_after_fork())

# A worker that never suspends would starve the loop; it yields every so often.
_YIELD_EVERY = 32


class WorkQueue:
    """A bounded thread-safe queue whose items are handled by ``handler`` on the loop.

    :param handler: ``async def handler(item)`` (a plain function runs in a worker thread).
    :param concurrency: at most this many items are handled at once.
    :param maxsize: capacity; ``put`` waits or raises :class:`QueueFull` beyond it.
    :param context: factory of the context manager each item is handled in.
    """

    def __init__(
        self,
        name: str,
        handler: Callable[[Any], Awaitable[Any]] | Callable[[Any], Any],
        loop_thread: LoopThread,
        *,
        concurrency: int = 1,
        maxsize: int = 1000,
        context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
        durable: bool | None = None,
    ) -> None:
        self.concurrency = at_least("concurrency", concurrency, 1)
        self.maxsize = at_least("maxsize", maxsize, 1)
        #: True: items are stored (JSON, checked at enqueue); None: as the backend.
        self.durable = durable
        self.name = name
        self.handler = handler
        self.loop_thread = loop_thread
        self.context = context
        self._is_async = is_async_callable(handler)
        self._lock = threading.Lock()
        self._not_full = threading.Condition(self._lock)
        self._items: collections.deque[Any] = collections.deque()
        self._active = 0
        self._kick_pending = False
        self._closed = False
        self._thread_putters = 0
        self._async_putters: collections.deque[
            tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]
        ] = collections.deque()
        self._idle_hooks: list[Callable[[], object]] = []
        self.processed = 0
        self.failed = 0
        self.last_error: str | None = None
        #: Which failures are logged in full (the first per minute); items as short reprs.
        self.log_throttle = LogThrottle(FAILURE_LOG_INTERVAL)
        self._flush_timer = FlushTimer(self.log_throttle)
        _after_fork.add(self)

    def _reset_after_fork(self) -> None:
        # In a forked child: another thread may have held the lock at fork time
        # (it does not exist here, so the lock would stay taken forever), and
        # the parent's items and workers are the parent's to handle.
        self._lock = threading.Lock()
        self._not_full = threading.Condition(self._lock)
        self._items = collections.deque()
        self._active = 0
        self._kick_pending = False
        self._thread_putters = 0
        self._async_putters = collections.deque()

    def __repr__(self) -> str:
        return f"<WorkQueue {self.name} {len(self._items)}/{self.maxsize} active={self._active}>"

    # -- state -------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Items waiting to be handled."""
        return len(self._items)

    @property
    def active(self) -> int:
        """Items being handled right now."""
        return self._active

    @property
    def idle(self) -> bool:
        """True when nothing is queued or being handled."""
        return not self._items and not self._active

    def begin_stored_item(self) -> None:
        """A durable item of this queue started (it came from the store, not the deque)."""
        with self._lock:
            self._active += 1

    def end_stored_item(self) -> None:
        """A durable item of this queue ended here; the queue may now be idle."""
        with self._lock:
            self._active -= 1
            became_idle = not self._items and not self._active
        if became_idle:
            self._notify_idle()

    def add_idle_hook(self, hook: Callable[[], object]) -> None:
        """Call ``hook()`` on the loop whenever the queue becomes idle."""
        self._idle_hooks.append(hook)

    def open(self) -> None:
        """Accept items again (after a stop and restart of the loop)."""
        with self._lock:
            self._closed = False
            self._kick_pending = False
            self._active = 0
            if self._items:
                self._kick_pending = True
                self.loop_thread.post(self._kick)

    # -- producers (any thread) -------------------------------------------------

    def _try_put(self, item: Any) -> bool:
        # self._lock held. Posting the kick before appending means a refused
        # post (loop stopping) leaves nothing behind.
        if self._closed or not self.loop_thread.running:
            raise NotRunning(f"queue {self.name!r} is shut down and refuses new items")
        if len(self._items) >= self.maxsize:
            return False
        if self._active < self.concurrency and not self._kick_pending:
            self.loop_thread.post(self._kick)
            self._kick_pending = True
        self._items.append(item)
        return True

    def put(self, item: Any, timeout: float | None = 0.0) -> None:
        """Queue ``item``; thread-safe.

        When the queue is full, wait up to ``timeout`` seconds for room (None:
        without limit). On the loop thread it never waits.

        :raises QueueFull: if there is still no room after ``timeout``.
        :raises NotRunning: if the queue or its loop is shut down.
        """
        with self._lock:
            if self._try_put(item):
                return
            if (timeout is not None and timeout <= 0) or self.loop_thread.in_loop_thread():
                raise self._full(timeout or 0.0)
            deadline = None if timeout is None else time.monotonic() + timeout
            self._thread_putters += 1
            try:
                while True:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise self._full(timeout)
                    self._not_full.wait(remaining)
                    if self._try_put(item):
                        return
            finally:
                self._thread_putters -= 1

    async def put_async(self, item: Any, timeout: float | None = None) -> None:
        """Queue ``item`` from any event loop, waiting up to ``timeout`` for room.

        :raises QueueFull: if there is still no room after ``timeout``.
        :raises NotRunning: if the queue or its loop is shut down.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            with self._lock:
                if self._try_put(item):
                    return
                waiter: asyncio.Future[None] = loop.create_future()
                entry = (loop, waiter)
                self._async_putters.append(entry)
            try:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    raise self._full(timeout or 0.0)
                try:
                    await asyncio.wait_for(waiter, remaining)
                except TimeoutError:
                    raise self._full(timeout or 0.0) from None
            finally:
                with self._lock, contextlib.suppress(ValueError):
                    self._async_putters.remove(entry)

    def _full(self, timeout: float | None) -> QueueFull:
        return QueueFull(
            f"queue {self.name!r} is full ({self.maxsize} items) and stayed full for {timeout}s"
        )

    def _wake_putters(self, all_of_them: bool = False) -> None:
        # self._lock held
        if self._thread_putters:
            if all_of_them:
                self._not_full.notify_all()
            else:
                self._not_full.notify()
        putters = self._async_putters
        while putters:
            loop, waiter = putters.popleft()
            if loop is self.loop_thread._loop and self.loop_thread.in_loop_thread():
                set_if_pending(waiter)
            else:
                with contextlib.suppress(RuntimeError):  # that loop is closed
                    loop.call_soon_threadsafe(set_if_pending, waiter)
            if not all_of_them:
                break

    # -- loop thread ---------------------------------------------------------------

    def _kick(self) -> None:
        with self._lock:
            self._kick_pending = False
            if self._closed:
                return
            n = min(self.concurrency - self._active, len(self._items))
            self._active += n
        for _ in range(n):
            self.loop_thread.spawn(self._worker(), name=f"asyncbg:consumer:{self.name}")

    def _take(self) -> tuple[bool, Any]:
        with self._lock:
            if self._closed or not self._items:
                self._active -= 1
                became_idle = not self._items and not self._active
                return False, became_idle
            item = self._items.popleft()
            if self._thread_putters or self._async_putters:
                self._wake_putters()
            return True, item

    async def _worker(self) -> None:
        handled = 0
        exited = False
        try:
            while True:
                got, item = self._take()
                if not got:
                    exited = True
                    if item:
                        self._notify_idle()
                    return
                await self.handle(item)
                handled += 1
                if handled % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)
        finally:
            if not exited:  # cancelled in the middle of an item
                with self._lock:
                    self._active -= 1

    def _notify_idle(self) -> None:
        for hook in self._idle_hooks:
            hook()

    async def handle(self, item: Any, *, propagate: bool = False) -> None:
        """Run the handler on one item in the queue's context; log what it raises.

        Loop thread only. With ``propagate`` the exception is re-raised too.
        """
        try:
            with CloseTolerant(self.context()):
                if self._is_async:
                    await self.handler(item)
                else:
                    # In a worker thread, with the item's context (the app context).
                    run = contextvars.copy_context().run
                    await asyncio.get_running_loop().run_in_executor(None, run, self.handler, item)
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            # SystemExit and KeyboardInterrupt too: out of a task they would end
            # the loop that every job and queue shares.
            self.failed += 1
            self.last_error = describe_exception(exc, 500)
            self._log_failure(exc, item)
            if propagate:
                if not isinstance(exc, Exception):
                    raise RuntimeError(
                        f"consumer {self.name!r} raised {type(exc).__name__}"
                    ) from exc
                raise
        else:
            self.processed += 1

    def _log_failure(self, exc: BaseException, item: Any) -> None:
        logged = self.log_throttle.failure(
            log,
            "consumer",
            self.name,
            exc,
            "consumer %r failed on item %s",
            self.name,
            short_repr(item),
        )
        self._flush_timer.after_failure(self.log_throttle, logged)

    def flush_logs(self) -> None:
        """Say every failure count not logged yet (at stop)."""
        self._flush_timer.close_and_flush(self.log_throttle)

    def close(self) -> int:
        """Stop handing out items; wake blocked producers; return how many are left.

        Workers busy with an item finish it (within the shutdown grace) and exit.
        """
        with self._lock:
            self._closed = True
            self._wake_putters(all_of_them=True)
            return len(self._items)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-safe summary of the queue's state."""
        return {
            "name": self.name,
            "depth": len(self._items),
            "capacity": self.maxsize,
            "active": self._active,
            "concurrency": self.concurrency,
            "processed": self.processed,
            "failed": self.failed,
            "last_error": self.last_error,
        }

"""An asyncio event loop in a dedicated daemon thread, and safe ways into it.

:class:`LoopThread` knows nothing of Flask. Other threads hand it work with
:meth:`~LoopThread.submit` (a :class:`concurrent.futures.Future` back),
:meth:`~LoopThread.call` (run a plain callable on the loop thread) and
:meth:`~LoopThread.post` (fire and forget); other event loops ``await``
:meth:`~LoopThread.run`. Every hand-off goes through one thread-safe inbox so
that a burst of submissions costs one wake-up of the loop, not one each.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import NotRunning
from . import _eager, _wakeup
from ._daemon_executor import Executor as _Executor
from ._daemon_executor import install as _install_executor
from ._eager import EagerStartLoop
from ._tricks import warn_fallback
from ._wakeup import FastWakeupLoop

__all__ = ["LoopFuture", "LoopThread", "ShutdownReport"]

log = logging.getLogger("asyncbg")

T = TypeVar("T")

_IDLE, _RUNNING, _STOPPING = "idle", "running", "stopping"

# Python 3.12+ can run a new task's first step at once, inside the callback
# that creates it, instead of one loop iteration later.
_eager_task_factory: Any = _eager.eager_task_factory
# The LoopThread whose protected_scope() the current context is in, if any.
_PROTECTED_SCOPE: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "asyncbg_protected_scope", default=None
)

_DRAIN_BATCH = 2048


@dataclass
class ShutdownReport:
    """What :meth:`LoopThread.stop` found and did.

    ``completed`` counts the tasks that were running at stop and finished within
    the timeout, ``cancelled`` those that had to be cancelled; ``still_queued``
    counts queued items that were never started (filled in by
    :class:`~asyncbg.AsyncBG`). Work accepted but never started (still in the
    loop's inbox at stop) is cancelled in bulk and counted in ``cancelled``.
    ``abandoned`` counts what could not be brought to an end: tasks that ignored
    cancellation, or, when the loop was blocked and never got to its shutdown,
    everything still in flight (``blocked_by`` then names what held the loop).
    ``released`` counts durable jobs handed back to their store at stop (runs
    still going after the grace period): another process runs them.
    ``finished`` is false on a report returned by a ``stop()`` that could not
    wait (called from the loop thread or one of its worker threads), or that
    gave up on a blocked loop.
    """

    completed: int = 0
    cancelled: int = 0
    still_queued: int = 0
    abandoned: int = 0
    released: int = 0
    queued_by_queue: dict[str, int] = field(default_factory=dict)
    duration: float = 0.0
    finished: bool = True
    blocked_by: str | None = None

    def __str__(self) -> str:
        return (
            f"asyncbg shutdown: {self.completed} completed, {self.cancelled} cancelled, "
            f"{self.still_queued} still queued, {self.abandoned} abandoned, "
            f"{self.released} released, in {self.duration:.3f}s"
        )


class LoopFuture(concurrent.futures.Future[T]):
    """A :class:`concurrent.futures.Future` that refuses to block the loop's own thread.

    Waiting on it from the thread that must resolve it would deadlock; there it
    raises :class:`RuntimeError` instead.
    """

    def __init__(self, loop_thread_ident: int | None, run: _Run | None = None) -> None:
        super().__init__()
        self._loop_ident = loop_thread_ident
        self._run = run

    def _guard(self) -> None:
        if self._loop_ident == threading.get_ident() and not self.done():
            raise RuntimeError(
                "blocking on a LoopFuture from the event loop thread would deadlock: "
                "the loop cannot finish the work while this thread waits for it; "
                "'await' it (asyncio.wrap_future) or add a done callback instead"
            )

    def result(self, timeout: float | None = None) -> T:
        """Return the result, waiting up to ``timeout`` seconds.

        :raises RuntimeError: if called from the loop thread before the future is done.
        :raises TimeoutError: if the result is not ready within ``timeout``.
        :raises concurrent.futures.CancelledError: if the work was cancelled.
        :raises NotRunning: if the loop ended (stopped or died) without finishing the
            work (a coroutine that ignored cancellation was abandoned, say).
        """
        self._guard()
        run = self._run
        if run is None or self.done():
            return super().result(timeout)
        with run.waiting_on(self):
            return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Return the exception raised by the work, or ``None``.

        :raises RuntimeError: if called from the loop thread before the future is done.
        :raises NotRunning: if the loop ended without finishing the work.
        """
        self._guard()
        run = self._run
        if run is None or self.done():
            return super().exception(timeout)
        with run.waiting_on(self):
            return super().exception(timeout)


class _Run:
    """One run of a loop (start to close): the futures somebody is blocked on.

    When the loop closes, whatever it never resolved (work abandoned at stop,
    or a loop that died) is failed with :class:`NotRunning`, so that no wait
    in another thread outlives the loop.
    """

    __slots__ = ("closed", "name", "waiting")

    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False
        self.waiting: set[concurrent.futures.Future[Any]] = set()

    @contextlib.contextmanager
    def waiting_on(self, fut: concurrent.futures.Future[Any]) -> Iterator[None]:
        waiting = self.waiting
        waiting.add(fut)
        try:
            # Added before looking: close() either sees this future or has
            # already set the flag (both under the GIL, in this order).
            if self.closed:
                _fail(fut, self.name)
            yield
        finally:
            waiting.discard(fut)

    def close(self) -> None:
        self.closed = True
        for fut in list(self.waiting):
            _fail(fut, self.name)


def _fail(fut: concurrent.futures.Future[Any], name: str) -> None:
    if not fut.done():
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            fut.set_exception(NotRunning(f"the loop of {name!r} ended before this work finished"))


class _SelectorLoop(FastWakeupLoop, EagerStartLoop):
    """The stock selector loop with trick 1 (wake-up socket calls that keep the GIL)
    and trick 2 (eager start on 3.11); each is checked, and turned on or not, at
    loop start (:meth:`LoopThread._on_loop_start`)."""


_instances: weakref.WeakSet[LoopThread] = weakref.WeakSet()


def _reset_all_after_fork() -> None:
    for lt in list(_instances):
        lt._reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_all_after_fork)

#: Work handed to the loop that never ran, by the function that would have run
#: it: ``abandon(*args) -> bool`` settles it (True: it was a unit of work, now
#: counted as cancelled).
Abandoner = Callable[..., bool]


class LoopThread:
    """An asyncio event loop running in its own daemon thread.

    :param name: the thread's name, also used in log messages.
    :param use_uvloop: run a uvloop loop instead of asyncio's (needs ``asyncbg[uvloop]``).
    :param shutdown_timeout: default grace period of :meth:`stop`, also used at exit.
    :param cancel_grace: how long cancelled tasks get to run their ``finally`` blocks.
    :param max_workers: threads for sync jobs and ``asyncio.to_thread``.
    """

    def __init__(
        self,
        name: str = "asyncbg",
        *,
        use_uvloop: bool = False,
        shutdown_timeout: float = 10.0,
        cancel_grace: float = 0.05,
        max_workers: int | None = None,
    ) -> None:
        self.name = name
        self.use_uvloop = use_uvloop
        self.shutdown_timeout = shutdown_timeout
        self.cancel_grace = cancel_grace
        # Not ThreadPoolExecutor's min(32, cpus + 4), sized for CPU work: these
        # threads mostly wait (async views' to_thread calls, sync jobs doing
        # I/O), and 6 on 2 cores made the 7th concurrent view queue behind the
        # others' sleeps. 64 covers the 32 ASGI threads each offloading a call,
        # with room for sync jobs; _DaemonExecutor starts threads only when no
        # idle one is free, so an idle app never pays for the cap.
        self.max_workers = max_workers or max(64, 8 * (os.cpu_count() or 1))
        self._stop_hooks: list[Callable[[], object]] = []
        self._after_stop_hooks: list[Callable[[ShutdownReport], object]] = []
        self._gave_up_hooks: list[Callable[[ShutdownReport], object]] = []
        self._async_shutdown_hooks: list[Callable[[], Coroutine[Any, Any, object]]] = []
        #: Bound on the async shutdown hooks, together (they close clients, not drain).
        self.shutdown_hooks_timeout = 5.0
        self._abandoners: dict[Callable[..., object], Abandoner] = {
            self._start_for_future: _abandon_future_start,
            _call_into: _abandon_call,
        }
        #: Called at interpreter exit, before the stop, while the loop is running.
        self.at_exit: Callable[[], object] = _nothing
        self._atexit_registered = False
        #: After a fork in a child: start a fresh loop on first use, as the parent had one.
        self._restart_on_use = False
        self._init_state()
        _instances.add(self)

    def _init_state(self) -> None:
        self._lock = threading.RLock()
        self._state = _IDLE
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ident: int | None = None
        self._executor: _Executor | None = None
        # The loop's create_eager_task once trick 2 is checked on it (3.11 only).
        self._eager_start: Callable[..., asyncio.Task[Any]] | None = None
        self._run = _Run(self.name)
        self._inbox: collections.deque[tuple[Callable[..., object], tuple[Any, ...]]] = (
            collections.deque()
        )
        self._wake_pending = False
        self._tasks: set[asyncio.Task[Any]] = set()
        # Store writes in flight: not cancelled at stop (an async shutdown hook awaits them).
        self._protected: set[asyncio.Task[Any]] = set()
        self._chained_factory: Any = None
        self._scoped_tasks = 0
        self._report: ShutdownReport | None = None
        self._stopped = threading.Event()
        self._counting = False  # from the shutdown's start: count what spawn() starts
        self._spawned_while_stopping = 0
        self._loop_done = False  # set by our own shutdown just before loop.stop()

    def _reset_after_fork(self) -> None:
        # The parent's loop thread does not exist here, yet its loop still
        # believes it is running and shares file descriptors with the parent:
        # drop it without closing it; the first use makes a fresh one.
        was_started = self._state != _IDLE
        self._init_state()
        self._restart_on_use = was_started

    # -- state ---------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the loop accepts work (started and not stopping)."""
        return self._state == _RUNNING

    @property
    def stopping(self) -> bool:
        """True while a stop is draining: from :meth:`stop` until the loop has closed."""
        return self._state == _STOPPING

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop.

        :raises NotRunning: if the loop thread has not been started.
        """
        loop = self._loop
        if loop is None:
            raise NotRunning(f"LoopThread {self.name!r} has not been started")
        return loop

    def in_loop_thread(self) -> bool:
        """Return True when called from the loop's own thread."""
        return self._ident == threading.get_ident()

    def in_worker_thread(self) -> bool:
        """Return True when called from one of the loop's worker threads (sync jobs,
        ``asyncio.to_thread``), which the loop waits on at stop."""
        executor = self._executor
        return executor is not None and threading.current_thread() in executor.threads

    def check_not_loop_thread(self, what: str) -> None:
        """Raise if the caller is the loop thread, where blocking would deadlock.

        :raises RuntimeError: when called from the loop thread.
        """
        if self._ident == threading.get_ident():
            raise RuntimeError(
                f"{what} blocks until the event loop does the work, but it was called "
                "from the event loop thread itself, which would deadlock; await the "
                "async variant instead"
            )

    @property
    def pending_posts(self) -> int:
        """Callbacks posted to the loop and not run yet."""
        return len(self._inbox)

    @property
    def task_count(self) -> int:
        """How many tracked tasks (jobs, consumer workers, periodic runs) are live."""
        return len(self._tasks)

    def add_stop_hook(self, hook: Callable[[], object]) -> None:
        """Register a callable run on the loop when :meth:`stop` begins, before draining.

        Hooks stop new work at its source (schedules, queue workers taking items).
        """
        self._stop_hooks.append(hook)

    def add_after_stop_hook(self, hook: Callable[[ShutdownReport], object]) -> None:
        """Register ``hook(report)``, run on the loop thread once the loop has closed.

        It completes the report (queued counts, logging) before :meth:`stop`
        returns it, whichever thread called ``stop``. It also runs when the loop
        ends without a stop (it died), with a report of what it left behind.
        """
        self._after_stop_hooks.append(hook)

    def add_async_shutdown_hook(self, hook: Callable[[], Coroutine[Any, Any, object]]) -> None:
        """Register ``await hook()``, run on the loop after the drain (every job
        and item has ended or was cancelled) and before the loop closes: where
        clients and connections the jobs shared are closed. Bounded by
        :attr:`shutdown_hooks_timeout` in all; errors are logged."""
        self._async_shutdown_hooks.append(hook)

    def add_gave_up_hook(self, hook: Callable[[ShutdownReport], object]) -> None:
        """Register ``hook(report)``, run in the caller's thread when :meth:`stop`
        gives up waiting for a loop that is blocked and never got to its shutdown.

        It counts what is abandoned with the loop (``report.abandoned``,
        ``still_queued``) and settles what it can, so that nothing accepted goes
        uncounted.
        """
        self._gave_up_hooks.append(hook)

    def on_abandon(self, fn: Callable[..., object], abandon: Abandoner) -> None:
        """Settle work posted as ``fn(*args)`` that never runs: at stop, the loop
        calls ``abandon(*args)`` instead (on the loop thread), which returns True
        when that was a unit of work (counted as cancelled in the report)."""
        self._abandoners[fn] = abandon

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Start the loop thread and return once its loop is running.

        Idempotent: a running loop is left alone. A stopped one starts afresh.

        :raises NotRunning: if called while a stop is in progress.
        :raises RuntimeError: if uvloop was asked for but is not installed.
        """
        with self._lock:
            if self._state == _RUNNING:
                return
            if self._state == _STOPPING:
                raise NotRunning(f"LoopThread {self.name!r} is stopping")
            self._restart_on_use = False
            loop = self._new_loop()
            started = threading.Event()
            self._stopped = threading.Event()
            self._report = None
            self._tasks = set()
            self._run = _Run(self.name)
            self._counting = False
            self._loop_done = False
            thread = threading.Thread(
                target=self._main, args=(loop, started), name=self.name, daemon=True
            )
            self._loop = loop
            self._thread = thread
            thread.start()
            started.wait()
            self._state = _RUNNING
            if not self._atexit_registered:
                self._atexit_registered = True
                _register_atexit()
        log.debug("loop thread %r started", self.name)

    def _new_loop(self) -> asyncio.AbstractEventLoop:
        if self.use_uvloop:
            try:
                import uvloop
            except ImportError:
                raise RuntimeError(
                    "uvloop was requested but is not installed: pip install 'asyncbg[uvloop]'"
                ) from None
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        else:
            loop = _SelectorLoop()
        self._executor = _install_executor(loop, self.max_workers, f"{self.name}-worker")
        return loop

    def _on_loop_start(self, loop: asyncio.AbstractEventLoop, started: threading.Event) -> None:
        # The loop's first callback, before start() returns: check the tricks
        # that need a running loop thread (once per loop start, so that no
        # per-call path pays for it), then let start() go on.
        try:
            self._eager_start = None
            if isinstance(loop, FastWakeupLoop):
                reason = _wakeup.enable(loop)
                if reason is not None:
                    warn_fallback(_wakeup.NAME, reason)
            if _eager_task_factory is None and isinstance(loop, EagerStartLoop):
                reason = _eager.check(loop)
                if reason is None:
                    self._eager_start = loop.create_eager_task
                else:
                    warn_fallback(_eager.NAME, reason)
        finally:
            started.set()

    def _main(self, loop: asyncio.AbstractEventLoop, started: threading.Event) -> None:
        self._ident = threading.get_ident()
        asyncio.set_event_loop(loop)
        loop.call_soon(self._on_loop_start, loop, started)
        try:
            self._run_until_shut_down(loop)
        except BaseException:
            log.critical(
                "the event loop of %r died; failing what it left behind",
                self.name,
                exc_info=True,
            )
        finally:
            try:
                if not self._loop_done:
                    # It died: it cannot run anything more, async generators included.
                    self._settle_after_death(loop)
                else:
                    loop.run_until_complete(
                        asyncio.wait_for(loop.shutdown_asyncgens(), self.cancel_grace + 1)
                    )
            except BaseException:  # pragma: no cover - best effort at close
                log.exception("error while closing the loop of %r", self.name)
            finally:
                self._close(loop)

    def _run_until_shut_down(self, loop: asyncio.AbstractEventLoop) -> None:
        # SystemExit and KeyboardInterrupt raised in a task or callback leave
        # run_forever() (asyncio re-raises them on purpose); a loop shared by
        # every job must not end because one of them did. Nor does a stray
        # loop.stop() from user code end it: only our own shutdown does.
        while not self._loop_done:
            try:
                loop.run_forever()
            except (SystemExit, KeyboardInterrupt) as exc:
                log.error(
                    "%s escaped a task or callback on the loop of %r, which "
                    "would have ended the loop; it goes on",
                    type(exc).__name__,
                    self.name,
                    exc_info=exc,
                )
                continue
            if not self._loop_done:
                log.warning(
                    "something called loop.stop() on the loop of %r; asyncbg's "
                    "loop stops only through stop(), so it goes on",
                    self.name,
                )

    def _settle_after_death(self, loop: asyncio.AbstractEventLoop) -> None:
        # The loop ended without our shutdown: nothing runs any more. Settle
        # what was handed to it and tell whoever waits.
        with self._lock:
            self._state = _STOPPING
            if self._report is None:
                self._report = ShutdownReport(finished=False)
        report = self._report
        report.cancelled += self._abandon_inbox()
        left = [t for t in self._tasks if not t.done()]
        report.abandoned += len(left)
        for t in left:
            _forget_task(t)
        self._tasks.clear()

    def _close(self, loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(None)
        loop.close()
        self._run.close()
        report = self._report
        if report is not None:
            for hook in self._after_stop_hooks:
                try:
                    hook(report)
                except Exception:
                    log.exception("after-stop hook %r failed", hook)
            report.finished = True
        self._ident = None
        # No lock here: a stop() from a signal handler may have interrupted
        # a post() that holds it in the main thread, waiting for this.
        if self._loop is loop:
            self._state = _IDLE
        self._stopped.set()

    def stop(self, timeout: float | None = None) -> ShutdownReport:
        """Stop gracefully and return a :class:`ShutdownReport`.

        New work is refused at once (:class:`NotRunning`); stop hooks run; tasks
        already running, and work accepted but not started yet, get ``timeout``
        seconds (default ``shutdown_timeout``) to finish; then work never started
        is cancelled in bulk, running tasks are cancelled and get ``cancel_grace``
        seconds for their ``finally`` blocks, and tasks that ignore cancellation
        are abandoned (counted, their waiters failed); then the loop stops, closes
        and the thread is joined.

        Idempotent and callable from any thread. From a signal handler it waits
        like any caller. From the loop thread itself, or from one of its worker
        threads (a job stopping its own loop), it cannot wait: it starts the
        shutdown and returns a report whose ``finished`` is false and which fills
        in once the loop has stopped. If the loop is blocked and does not get to
        its shutdown within ``timeout + cancel_grace + 2`` seconds, it gives up
        waiting: the report it returns counts everything still in flight as
        abandoned and names what blocks the loop.
        """
        if timeout is None:
            timeout = self.shutdown_timeout
        requested = self.request_stop(timeout)
        if requested is None:
            return self._report or ShutdownReport()
        if self.in_loop_thread() or self.in_worker_thread():
            return requested
        return self.wait_stopped(timeout)

    def request_stop(self, timeout: float | None = None) -> ShutdownReport | None:
        """Begin a graceful stop (see :meth:`stop`) and return at once.

        Returns the report that fills in as the loop shuts down, or None if the
        loop is not running or stopping.
        """
        if timeout is None:
            timeout = self.shutdown_timeout
        with self._lock:
            if self._state == _IDLE:
                return None
            if self._state == _RUNNING:
                self._state = _STOPPING
                self._report = ShutdownReport(finished=False)
                # First in line: a backlog of accepted work must not delay the
                # start of the shutdown (and its clock) by the time it takes
                # to start all of it.
                self._inbox.appendleft((self._begin_shutdown, (timeout, self._report)))
                self._wake_pending = True
                # Wake the loop even if a wake-up looks pending: this stop() may
                # come from a signal handler that interrupted the post() whose
                # wake-up it is.
                assert self._loop is not None
                if self._ident == threading.get_ident():
                    self._loop.call_soon(self._drain, context=contextvars.Context())
                elif not self._loop.is_closed():
                    # The loop may have closed already (it died meanwhile).
                    with contextlib.suppress(RuntimeError):
                        self._loop.call_soon_threadsafe(self._drain, context=contextvars.Context())
            return self._report

    def wait_stopped(self, timeout: float | None = None) -> ShutdownReport:
        """Wait for a stop begun by :meth:`request_stop` and return its report.

        Gives up on a blocked loop as :meth:`stop` does.

        :raises RuntimeError: if called from the loop thread.
        """
        if timeout is None:
            timeout = self.shutdown_timeout
        self.check_not_loop_thread("wait_stopped()")
        with self._lock:
            report, thread, stopped = self._report, self._thread, self._stopped
        if report is None or thread is None:
            return report or ShutdownReport()
        # Bounded: a job that blocks the loop without ever yielding cannot hang
        # the caller (the thread is a daemon and is left behind).
        bound = timeout + self.cancel_grace + 2.0
        if not _wait_in_slices(stopped, bound):
            return self._give_up(report, bound)
        thread.join()
        return report

    def _give_up(self, report: ShutdownReport, waited: float) -> ShutdownReport:
        # The loop never got to (or through) its shutdown: whatever is still in
        # flight is abandoned with it. Should the loop wake up after all, its
        # own shutdown writes the true counts over these.
        gave_up = report
        gave_up.duration = waited
        for hook in self._gave_up_hooks:
            try:
                hook(gave_up)
            except Exception:
                log.exception("gave-up hook %r failed", hook)
        gave_up.cancelled += self._abandon_inbox_from_outside()
        log.error(
            "the loop of %r did not stop within %.1fs: it is blocked%s. "
            "Leaving its daemon thread behind. %s",
            self.name,
            waited,
            f" by {gave_up.blocked_by}" if gave_up.blocked_by else "",
            gave_up,
        )
        self._run.close()
        return gave_up

    def _begin_shutdown(self, timeout: float, report: ShutdownReport) -> None:
        loop = self.loop
        t0 = loop.time()
        for hook in self._stop_hooks:
            try:
                hook()
            except Exception:
                log.exception("stop hook %r failed", hook)
        # From here on spawn() counts what it starts, so the report can say
        # what finished during the drain, eager starts included.
        self._counting = True
        self._spawned_while_stopping = 0
        initial = len(self._tasks)
        # No grace at all: what has not started does not start (the rest of
        # this drain's batch included).
        never_started = self._abandon_inbox() if timeout <= 0 else 0
        task = loop.create_task(
            self._shutdown(t0 + max(0.0, timeout), report, initial, t0, never_started),
            name="asyncbg:shutdown",
        )
        # keep a reference: the loop holds tasks weakly
        self._shutdown_task = task

    async def _shutdown(
        self,
        deadline: float,
        report: ShutdownReport,
        initial: int,
        t0: float,
        never_started: int,
    ) -> None:
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        # The grace period: running tasks finish, accepted work still in the
        # inbox starts (the drain goes on between our waits).
        while True:
            live = {t for t in self._tasks if t is not me}
            remaining = deadline - loop.time()
            if remaining <= 0 or (not live and not self._inbox):
                break
            if live:
                await asyncio.wait(live, timeout=remaining)
            else:
                await asyncio.sleep(0)
        # Work never started is settled in bulk: no task, no step each.
        never_started += self._abandon_inbox()
        live = {t for t in self._tasks if t is not me}
        # Anything else still alive (tasks users created themselves) goes too, as
        # asyncio.run() would do; it is not counted.
        others = (
            {t for t in asyncio.all_tasks() if t is not me and not t.done()}
            - live
            - self._protected
        )
        for t in live | others:
            t.cancel()
        await _settle_cancelled(live | others, self.cancel_grace)
        stubborn = [t for t in live if not t.done()]
        for t in stubborn:
            # It ignored cancellation: abandoned with the loop. A restart must
            # not find it; its owner (the job runner) settles its waiters.
            self._tasks.discard(t)
            _forget_task(t)
        if stubborn:
            log.warning(
                "%d task(s) ignored cancellation and were abandoned: %s",
                len(stubborn),
                ", ".join(sorted({t.get_name() for t in stubborn})[:10]),
            )
        self._counting = False
        await self._run_async_shutdown_hooks()
        report.completed = initial + self._spawned_while_stopping - len(live)
        report.cancelled = len(live) - len(stubborn) + never_started
        report.abandoned = len(stubborn)
        executor = self._executor
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        report.duration = loop.time() - t0
        self._loop_done = True
        loop.stop()

    async def _run_async_shutdown_hooks(self) -> None:
        hooks = self._async_shutdown_hooks
        if not hooks:
            return
        try:
            async with asyncio.timeout(self.shutdown_hooks_timeout):
                for hook in hooks:
                    try:
                        await hook()
                    except Exception:
                        log.exception("shutdown hook %r failed", hook)
        except TimeoutError:
            log.error(
                "shutdown hooks of %r took longer than %.1fs; closing the loop anyway",
                self.name,
                self.shutdown_hooks_timeout,
            )

    def _abandon_inbox(self) -> int:
        # Loop thread (or a dead loop's thread): settle every posted callback
        # that will never run; return how many were units of work.
        inbox = self._inbox
        settled = 0
        abandoners = self._abandoners
        while inbox:
            try:
                fn, args = inbox.popleft()
            except IndexError:  # pragma: no cover - emptied meanwhile
                break
            abandon = abandoners.get(fn)
            if abandon is None:
                continue
            try:
                if abandon(*args):
                    settled += 1
            except Exception:
                log.exception("settling never-run %r failed", fn)
        return settled

    def _abandon_inbox_from_outside(self) -> int:
        # The loop is blocked: only futures whose owners are blocked in other
        # threads are worth settling now; jobs are settled by gave-up hooks.
        with self._lock:
            entries = list(self._inbox)
        settled = 0
        for fn, args in entries:
            if fn == self._start_for_future or fn is _call_into:
                fut = args[1] if fn == self._start_for_future else args[0]
                _fail(fut, self.name)
                settled += 1
        return settled

    # -- hand-off --------------------------------------------------------------

    def _enqueue(self, fn: Callable[..., object], args: tuple[Any, ...]) -> None:
        # Called with self._lock held. One wake-up serves every item posted
        # until the loop drains the inbox.
        self._inbox.append((fn, args))
        if self._wake_pending:
            return
        self._wake_pending = True
        loop = self._loop
        assert loop is not None
        # A fresh context: call_soon* would otherwise copy the context of the
        # thread that happened to post first (say, a Flask request's) into
        # every task the drain starts.
        if self._ident == threading.get_ident():
            loop.call_soon(self._drain, context=contextvars.Context())
        else:
            loop.call_soon_threadsafe(self._drain, context=contextvars.Context())

    def post(self, fn: Callable[..., object], *args: Any) -> None:
        """Schedule ``fn(*args)`` to run on the loop thread soon; return at once.

        Thread-safe and cheap: a burst of posts costs the loop one wake-up.
        Exceptions raised by ``fn`` are logged. In a forked child whose parent
        had started this loop, the first post starts a fresh loop.

        :raises NotRunning: if the loop is not running or is stopping.
        """
        with self._lock:
            if self._state != _RUNNING:
                if not self._restart_on_use:
                    raise self._not_running()
                self.start()
            self._enqueue(fn, args)

    def _not_running(self) -> NotRunning:
        if self._state == _STOPPING:
            return NotRunning(f"LoopThread {self.name!r} is shutting down and refuses new work")
        return NotRunning(f"LoopThread {self.name!r} is not running; call start() first")

    def _drain(self) -> None:
        self._wake_pending = False
        inbox = self._inbox
        for _ in range(min(len(inbox), _DRAIN_BATCH)):
            try:
                fn, args = inbox.popleft()
            except IndexError:  # the shutdown settled the rest
                break
            try:
                fn(*args)
            except (Exception, SystemExit, KeyboardInterrupt):
                log.exception("callback %r failed on the loop", fn)
        if inbox and not self._wake_pending:
            # A huge burst: let timers and I/O run between batches.
            self._wake_pending = True
            self.loop.call_soon(self._drain, context=contextvars.Context())

    def spawn(
        self,
        coro: Coroutine[Any, Any, T],
        *,
        name: str | None = None,
        context: contextvars.Context | None = None,
    ) -> asyncio.Task[T]:
        """Start ``coro`` as a task tracked for shutdown. Loop thread only.

        The task's first step runs at once (eager start), saving a loop
        iteration before the coroutine's first line: with
        ``asyncio.eager_task_factory`` on Python 3.12+, with
        ``_SelectorLoop.create_eager_task`` on 3.11 (outside any running task;
        not on uvloop). Each loop iteration costs a ``select()`` call, which
        releases the GIL: with another thread busy, getting it back costs a
        whole switch interval (5 ms).
        Callers must expect ``coro`` to have run up to its first suspension, or
        to the end, when this returns.

        :raises SystemExit, KeyboardInterrupt: if the eager first step raised it
            (asyncio lets these two through); the task then holds it too.
        """
        loop = self.loop
        task: asyncio.Task[T]
        if _eager_task_factory is not None:
            task = _eager_task_factory(loop, coro, name=name, context=context)
        elif (eager := self._eager_start) is not None and asyncio.current_task(loop) is None:
            task = eager(coro, name=name, context=context)
        else:
            task = loop.create_task(coro, name=name, context=context)
        if not task.done():
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self._counting:
            self._spawned_while_stopping += 1
        return task

    @contextlib.contextmanager
    def protected_scope(self) -> Iterator[None]:
        """Keep every task created inside this block, and every task those create
        later, from being cancelled at stop (as :meth:`protect` does): the tasks
        a backend's driver starts at open (pool workers, a scheduler, a
        listener), which its ``close`` ends after the drain. Loop thread only.

        Tasks copy the context they are created in, so a task made later by
        one of them is in the scope too (a pool's scheduler making a task per
        wake-up). A task factory marks them; it stays on the loop only when
        the block made a task at all, and calls on to a factory set before.
        """
        loop = asyncio.get_running_loop()
        installed = loop.get_task_factory() is self._protecting_factory
        if not installed:
            self._chained_factory = loop.get_task_factory()
            loop.set_task_factory(self._protecting_factory)
        made = self._scoped_tasks
        token = _PROTECTED_SCOPE.set(self)
        try:
            yield
        finally:
            _PROTECTED_SCOPE.reset(token)
            if not installed and self._scoped_tasks == made:
                loop.set_task_factory(self._chained_factory)

    def _protecting_factory(
        self, loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any
    ) -> asyncio.Future[Any]:
        chained = self._chained_factory
        task = (
            chained(loop, coro, **kwargs)
            if chained is not None
            else asyncio.Task(coro, loop=loop, **kwargs)
        )
        if _PROTECTED_SCOPE.get() is self and isinstance(task, asyncio.Task):
            self._scoped_tasks += 1
            self.protect(task)
        return task

    def protect(self, task: asyncio.Task[Any]) -> None:
        """Keep ``task`` (an untracked task: a store write) from being cancelled at
        stop; whoever made it must await it in an async shutdown hook. Loop thread only."""
        if not task.done():
            self._protected.add(task)
            task.add_done_callback(self._protected.discard)

    def submit(
        self,
        coro: Coroutine[Any, Any, T],
        *,
        name: str | None = None,
        context: contextvars.Context | None = None,
    ) -> LoopFuture[T]:
        """Run ``coro`` on the loop; return a future for its result.

        Cancelling the returned future cancels the task on the loop. Waiting on
        it from the loop thread raises :class:`RuntimeError` instead of deadlocking.
        If the loop ends without finishing ``coro`` (it ignored cancellation at
        stop, or the loop died), waiters get :class:`NotRunning`.

        :raises NotRunning: if the loop is not running or is stopping (``coro``
            is closed, not left un-awaited).
        """
        fut: LoopFuture[T] = LoopFuture(self._ident, self._run)
        if name is None:
            name = getattr(coro, "__qualname__", None)
        try:
            self.post(self._start_for_future, coro, fut, name, context)
        except NotRunning:
            coro.close()
            raise
        if fut._run is not self._run:  # post() started a fresh loop (forked child)
            fut._loop_ident, fut._run = self._ident, self._run
        return fut

    def _start_for_future(
        self,
        coro: Coroutine[Any, Any, T],
        fut: LoopFuture[T],
        name: str | None,
        context: contextvars.Context | None,
    ) -> None:
        # The future stays PENDING while the task runs, so that fut.cancel()
        # works (a RUNNING concurrent future refuses to be cancelled).
        if fut.cancelled():
            coro.close()
            return
        task = self.spawn(_carrying_loop_enders(coro), name=name, context=context)
        loop = self.loop

        def to_future(t: asyncio.Task[T]) -> None:
            if t.cancelled():
                fut.cancel()
            if not fut.set_running_or_notify_cancel():
                return
            exc = t.exception()
            if isinstance(exc, _LoopEnder):
                fut.set_exception(exc.carried)  # what the code raised, for its caller
            elif exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(t.result())

        def to_task(f: concurrent.futures.Future[T]) -> None:
            if f.cancelled() and not task.done():
                loop.call_soon_threadsafe(task.cancel)

        if task.done():
            to_future(task)
        else:
            task.add_done_callback(to_future)
            fut.add_done_callback(to_task)

    def call(self, fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        """Run the plain callable ``fn(*args)`` on the loop thread; return its value.

        The way to read or change state the loop owns without a lock. ``fn`` must
        not block. Called from the loop thread, it simply calls ``fn``.

        :raises NotRunning: if the loop is not running or is stopping, or stops
            before it gets to ``fn``.
        :raises TimeoutError: if the loop does not get to it within ``timeout``.
        :raises BaseException: whatever ``fn`` raises.
        """
        if self._ident == threading.get_ident():
            return fn(*args)
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        run = self._run
        self.post(_call_into, fut, fn, args)
        with run.waiting_on(fut):
            try:
                return fut.result(timeout)
            except TimeoutError:
                if fut.cancel():  # not started: it never will
                    raise
                return fut.result()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` on this loop from any event loop; return its result.

        From a coroutine already on this loop it simply awaits ``coro``. Cancelling
        the awaiting task cancels the work on the loop.

        :raises NotRunning: if the loop is not running or is stopping.
        """
        if self._ident == threading.get_ident():
            return await coro
        return await asyncio.wrap_future(self.submit(coro))

    def run_sync(self, coro: Coroutine[Any, Any, T], *, context: contextvars.Context | None) -> T:
        """Run ``coro`` on the loop and block this (non-loop) thread for its result.

        :raises RuntimeError: if called from the loop thread.
        :raises NotRunning: if the loop is not running or is stopping, or ends
            before ``coro`` does.
        """
        if self._ident == threading.get_ident():
            coro.close()
            self.check_not_loop_thread("run_sync()")
        return self.submit(coro, context=context).result()


async def _settle_cancelled(tasks: set[asyncio.Task[Any]], grace: float) -> None:
    """Let cancelled ``tasks`` end: first every loop turn they need while they
    keep ending (a big backlog takes many steps, not a long grace), then
    ``grace`` seconds for the slow ones."""
    remaining = tasks
    for _ in range(_SETTLE_TURNS):
        if not remaining:
            return
        before = len(remaining)
        await asyncio.sleep(0)
        remaining = {t for t in remaining if not t.done()}
        if len(remaining) == before:
            break
    if remaining:
        await asyncio.wait(remaining, timeout=grace)


_SETTLE_TURNS = 100


class _LoopEnder(Exception):
    """Carries a SystemExit or KeyboardInterrupt out of a task (see below)."""

    def __init__(self, carried: BaseException) -> None:
        super().__init__(repr(carried))
        self.carried = carried


async def _carrying_loop_enders(coro: Coroutine[Any, Any, T]) -> T:
    # asyncio lets SystemExit and KeyboardInterrupt out of a task step and out
    # of run_forever(), which would end the loop every job shares; and a task
    # left holding one is logged "exception was never retrieved". Carried as an
    # ordinary exception, it reaches the caller of submit() as itself.
    try:
        return await coro
    except (SystemExit, KeyboardInterrupt) as exc:
        raise _LoopEnder(exc) from None


#: How long one wait for the stop lasts before looking at pending signals.
_SIGNAL_SLICE = 0.1


def _wait_in_slices(event: threading.Event, timeout: float) -> bool:
    """``event.wait(timeout)`` in short slices, so that a signal handler runs soon.

    A signal that arrives just before the waiting thread blocks in the lock
    does not interrupt it, and Python runs the handler only once the wait
    returns: a Ctrl-C during a long drain would wait for the whole drain.
    """
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return event.is_set()
        if event.wait(min(remaining, _SIGNAL_SLICE)):
            return True


def _nothing() -> None:
    return None


def _forget_task(task: asyncio.Task[Any]) -> None:
    # An abandoned task stays pending forever; asyncio would log "Task was
    # destroyed but it is pending" when it is collected. It was reported already.
    with contextlib.suppress(AttributeError):
        task._log_destroy_pending = False  # type: ignore[attr-defined]
    # Close its coroutine now, on the loop thread, so that its finally blocks
    # run here rather than whenever (and in whichever thread) the garbage
    # collector gets to it.
    coro = task.get_coro()
    close = getattr(coro, "close", None)
    if close is not None:
        try:
            close()
        except BaseException as exc:  # it ignored GeneratorExit too
            log.debug("closing abandoned task %s: %r", task.get_name(), exc)


def _abandon_future_start(
    coro: Coroutine[Any, Any, Any],
    fut: concurrent.futures.Future[Any],
    name: str | None,
    context: contextvars.Context | None,
) -> bool:
    coro.close()
    fut.cancel()
    return True


def _abandon_call(
    fut: concurrent.futures.Future[Any], fn: Callable[..., Any], args: tuple[Any, ...]
) -> bool:
    _fail(fut, getattr(fn, "__qualname__", "call"))
    return False


def _call_into(
    fut: concurrent.futures.Future[T], fn: Callable[..., T], args: tuple[Any, ...]
) -> None:
    if not fut.set_running_or_notify_cancel():
        return
    try:
        fut.set_result(fn(*args))
    except BaseException as exc:
        fut.set_exception(exc)


_atexit_lock = threading.Lock()
_atexit_done = False


def _stop_all_at_exit() -> None:
    """Stop every running loop when the interpreter exits, all at the same time.

    Each loop gets its own shutdown timeout, but they drain concurrently: three
    apps left running cost about one timeout at exit, not three.
    """
    running = [lt for lt in list(_instances) if lt.running]
    for lt in running:
        log.debug("interpreter exiting, stopping loop thread %r", lt.name)
        try:
            lt.at_exit()
        except Exception:
            log.exception("exit hook of %r failed", lt.name)
        lt.request_stop()
    for lt in running:
        if not lt.in_loop_thread():
            lt.wait_stopped()


def _register_atexit() -> None:
    """Stop the loops gracefully when the interpreter exits (registered once).

    ``threading._register_atexit`` callbacks run before non-daemon threads are
    joined and while ``asyncio.to_thread`` still works (what ``concurrent.futures``
    uses); plain ``atexit`` would run too late for that.
    """
    global _atexit_done
    with _atexit_lock:
        if _atexit_done:
            return
        _atexit_done = True
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        try:
            register(_stop_all_at_exit)
            return
        except RuntimeError:  # interpreter already shutting down
            pass
    import atexit

    atexit.register(_stop_all_at_exit)

"""What one :class:`~asyncbg.AsyncBG` keeps for each Flask app it serves.

One extension object serves any number of apps (the app-factory pattern, a
fresh app per test): the decorators register *definitions* once on the
extension, and each app bound with ``init_app`` gets an :class:`AppState` of
its own: its loop thread, job history and runner, its queue and periodic-job
instances, its monitor, metrics and signal handlers, and the settings read
from its config. The state holds its app strongly only while its loop runs
(``AsyncBG(Flask(__name__))`` keeps working), and weakly otherwise, so that
dropping a stopped app frees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import os
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .backends import Backend, open_backend
from .config import Settings
from .engine.consumers import WorkQueue
from .engine.durable import DurableRunner, item_record
from .engine.host_lock import HostLock, default_lock_dir
from .engine.jobs import Job, JobHistory, _new_job_id
from .engine.logthrottle import describe_exception
from .engine.loop import LoopThread, ShutdownReport
from .engine.monitor import LoopMonitor
from .engine.os_signals import ShutdownSignals
from .engine.periodic import PeriodicJob
from .engine.records import JobRecord, encode_json
from .engine.runner import JobRunner
from .engine.stats import JobStats
from .errors import NotRunning, UnknownQueue
from .web.metrics import MetricsExporter

if TYPE_CHECKING:
    from flask import Flask

__all__ = ["AppState", "in_job_context_transition"]

log = logging.getLogger("asyncbg")

T = TypeVar("T")

_states: weakref.WeakSet[AppState] = weakref.WeakSet()


def _reset_after_fork() -> None:
    # Another thread may have held the lock at fork time; it does not exist here.
    for st in list(_states):
        st._start_lock = threading.RLock()
        st._idle_waiters = []  # futures of the parent's loop
        st.signals.reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)

# True while a job's (or a consumer item's, a periodic run's) app context is
# pushed or popped on the loop thread: Flask then calls async
# ``appcontext_pushed`` receivers and async ``teardown_appcontext`` functions
# through ``app.async_to_sync``, which cannot run them on the loop it blocks.
_transition: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "asyncbg_app_context_transition", default=False
)


def in_job_context_transition() -> bool:
    """True while asyncbg pushes or pops a background job's app context."""
    return _transition.get()


class _JobAppContext:
    """The app context a background job, item or periodic run runs in.

    Pushing and popping mark the transition (see :func:`in_job_context_transition`)
    so that the extension's ``async_to_sync`` can run async signal receivers
    and teardown functions, as stock Flask runs them for sync code.
    """

    __slots__ = ("_ctx",)

    def __init__(self, app: Flask) -> None:
        self._ctx = app.app_context()

    def __enter__(self) -> None:
        token = _transition.set(True)
        try:
            self._ctx.push()
        finally:
            _transition.reset(token)

    def __exit__(self, et: Any, ev: BaseException | None, tb: Any) -> None:
        token = _transition.set(True)
        try:
            self._ctx.pop(ev)
        finally:
            _transition.reset(token)


class AppState:
    """The runtime of one app: a loop thread and everything that runs on it.

    Made by :meth:`AsyncBG.init_app <asyncbg.AsyncBG.init_app>` (the first
    app takes the state the extension made at construction, so that code
    written for one app sees the objects the decorators returned).
    """

    def __init__(
        self,
        name: str,
        startup_hooks: list[Callable[[], Awaitable[Any]]],
        shutdown_hooks: list[Callable[[], Awaitable[Any]]],
    ) -> None:
        self.name = name
        self._app_ref: weakref.ReferenceType[Flask] | None = None
        self._app_while_running: Flask | None = None
        self.loop_thread = LoopThread(name)
        self.loop_thread.at_exit = self._stop_at_exit
        self.history = JobHistory()
        self.runner = JobRunner(self.loop_thread, self.history, context=self.app_context)
        self.periodic_jobs: dict[str, PeriodicJob] = {}
        self.queues: dict[str, WorkQueue] = {}
        # The extension's lists: a hook added later serves every app.
        self.startup_hooks = startup_hooks
        self.shutdown_hooks = shutdown_hooks
        self.shutdown_timeout = 10.0
        self.queue_maxsize = 1000
        self.lock_dir = default_lock_dir()
        self.handle_signals = True
        self.last_report: ShutdownReport | None = None
        self.settings: Settings | None = None
        self.backend: Backend = open_backend(None, "")
        #: Runs durable jobs and items through the backend (None: memory only).
        self.durable: DurableRunner | None = None
        # What runs until stop (queues open, schedules started), closed first at
        # stop; and what lives until the loop closes (the backend, the hooks'
        # clients), closed in reverse after the drain.
        self._running = contextlib.ExitStack()
        self._components = contextlib.AsyncExitStack()
        self.monitor = LoopMonitor(self.loop_thread)
        self.monitor_enabled = True
        self.job_stats = JobStats()
        self.metrics: MetricsExporter | None = None
        self._start_lock = threading.RLock()
        self._stopped = False
        self.signals = ShutdownSignals(
            self.stop, self.loop_thread, lambda: sum(q.depth for q in self.queues.values())
        )
        self._idle_waiters: list[Any] = []
        self.loop_thread.add_stop_hook(self._on_stop)
        self.loop_thread.add_async_shutdown_hook(self._close_components)
        self.loop_thread.add_after_stop_hook(self._after_stop)
        self.loop_thread.add_gave_up_hook(self._gave_up)
        self.runner.add_idle_hook(self._wake_idle)
        _states.add(self)

    def __repr__(self) -> str:
        app = self.app
        where = app.name if app is not None else "no app"
        state = "running" if self.loop_thread.running else "stopped"
        return f"<AsyncBG state {self.name} for {where} {state}>"

    # -- the app -----------------------------------------------------------------

    @property
    def app(self) -> Flask | None:
        """The app this state serves (None before ``init_app`` or once it is gone)."""
        ref = self._app_ref
        return None if ref is None else ref()

    def bind(self, app: Flask) -> None:
        """Serve ``app`` (held weakly)."""
        self._app_ref = weakref.ref(app)

    def require_app(self) -> Flask:
        """The app, or an error that says how to bind one.

        :raises RuntimeError: if no app is bound or the app is gone.
        """
        app = self.app
        if app is None:
            if self._app_ref is None:
                raise RuntimeError("AsyncBG has no app yet: call AsyncBG(app) or bg.init_app(app)")
            raise RuntimeError("the Flask app this AsyncBG served has been garbage-collected")
        return app

    def app_context(self) -> contextlib.AbstractContextManager[Any]:
        """The app context every background callable runs in."""
        return _JobAppContext(self.require_app())

    @property
    def eager(self) -> bool:
        """``ASYNCBG_EAGER``, read from the app's config each time work is handed over."""
        app = self.app
        return bool(app is not None and app.config.get("ASYNCBG_EAGER"))

    # -- definitions ----------------------------------------------------------------

    def add_periodic(self, pj: PeriodicJob) -> None:
        """Own ``pj`` (and start it at once if the loop runs)."""
        self.periodic_jobs[pj.name] = pj
        if self.loop_thread.running:
            self.loop_thread.post(self.start_periodic, pj)

    def add_queue(self, q: WorkQueue) -> None:
        """Own ``q`` (its workers wake this state's idle waiters)."""
        q.add_idle_hook(self._wake_idle)
        self.queues[q.name] = q
        if self.loop_thread.running:
            self.loop_thread.post(self.open_queue, q)

    # -- handing work over ----------------------------------------------------------

    def ensure_started(self) -> None:
        """Start on first use, unless stopped on purpose.

        :raises NotRunning: if this app's asyncbg was stopped.
        """
        if not self.loop_thread.running:
            with self._start_lock:
                if self.loop_thread.running:
                    return
                if self._stopped:
                    raise NotRunning(f"{self.name} has been stopped; call start() to restart it")
                self.start()

    def dispatch(self, job: Job[T]) -> Job[T]:
        """Hand ``job`` to the loop; in eager mode wait for it.

        :raises NotRunning: if stopped or stopping.
        """
        try:
            self.ensure_started()
            self.runner.submit(job)
        except NotRunning:
            fn = job._fn
            if inspect.iscoroutine(fn):
                fn.close()
            raise
        if self.eager and not self.loop_thread.in_loop_thread():
            job.wait()
        return job

    def get_queue(self, name: str) -> WorkQueue:
        """The :class:`WorkQueue` consumed under ``name``.

        :raises UnknownQueue: if no consumer is registered for it.
        """
        try:
            return self.queues[name]
        except KeyError:
            known = ", ".join(sorted(self.queues)) or "none"
            raise UnknownQueue(f"no consumer for queue {name!r} (known queues: {known})") from None

    def stored_queue(self, q: WorkQueue) -> DurableRunner | None:
        """The durable runner that stores ``q``'s items, or None (kept in memory)."""
        return self.durable if q.durable is not False else None

    def _item(
        self, queue: str, item: Any, key: str | None, job_id: str | None
    ) -> tuple[WorkQueue, tuple[DurableRunner, JobRecord] | None]:
        # The queue, and (for a durable one) its runner and the item's record;
        # the item checked as JSON where it will be stored; the loop started.
        q = self.get_queue(queue)
        durable = self.stored_queue(q)
        stored = None
        if durable is not None:
            stored = (durable, item_record(q.name, item, job_id or _new_job_id(), key))
        elif q.durable:  # stored as JSON: say so now, not later
            encode_json(item, f"an item for the durable queue {q.name!r}")
        self.ensure_started()
        return q, stored

    def enqueue(
        self,
        queue: str,
        item: Any,
        timeout: float | None,
        key: str | None = None,
        job_id: str | None = None,
    ) -> None:
        """See :meth:`AsyncBG.enqueue <asyncbg.AsyncBG.enqueue>`."""
        q, stored = self._item(queue, item, key, job_id)
        if stored is not None:
            stored[0].put(stored[1], q.maxsize, timeout)
            return
        if self.eager and not self.loop_thread.in_loop_thread():
            self.loop_thread.run_sync(q.handle(item, propagate=True), context=None)
            return
        q.put(item, timeout)

    async def enqueue_async(
        self,
        queue: str,
        item: Any,
        timeout: float | None,
        key: str | None = None,
        job_id: str | None = None,
    ) -> None:
        """See :meth:`AsyncBG.enqueue_async <asyncbg.AsyncBG.enqueue_async>`."""
        q, stored = self._item(queue, item, key, job_id)
        if stored is not None:
            await stored[0].put_async(stored[1], q.maxsize, timeout)
            return
        if self.eager:
            await self.loop_thread.run(q.handle(item, propagate=True))
            return
        await q.put_async(item, timeout)

    # -- lifecycle ------------------------------------------------------------------------

    def serve_under_server(self) -> None:
        """From now on the server decides when we stop (see ``bg.asgi_app()``)."""
        # In the main thread (where the server runs its loop) this also puts
        # our handlers in front of the server's, installed after the app was imported.
        self.signals.server_managed = True
        if self.handle_signals:
            self.signals.install()

    def start(self, *, periodic: bool = True) -> None:
        """See :meth:`AsyncBG.start <asyncbg.AsyncBG.start>`."""
        with self._start_lock:
            self.require_app()
            if self.loop_thread.running:
                return
            self._stopped = False
            self._app_while_running = self.require_app()
            self.signals.reset()
            self.loop_thread.start()
            if self.monitor_enabled:
                # Before the schedules: a run_at_start job that blocks is caught too.
                self.monitor.start()
            try:
                self.loop_thread.submit(self._open_components()).result()
            except BaseException:
                self.stop(timeout=0)
                raise
            self.loop_thread.call(self._start_on_loop, periodic)
            if self.handle_signals:
                self.signals.install()
        log.debug(
            "started: %d periodic jobs, %d queues",
            len(self.periodic_jobs),
            len(self.queues),
        )

    async def _open_components(self) -> None:
        # On the loop, in start order; _close_components unwinds them in
        # reverse after the drain: the shutdown hooks, then the backend.
        stack = self._components = contextlib.AsyncExitStack()
        # Tasks the backend starts at open (a driver's pool workers and
        # scheduler, a listener), and those they start later, are its own:
        # its close() ends them after the drain, so the stop must not cancel
        # them before (the release of what is held still needs them).
        with self.loop_thread.protected_scope():
            await stack.enter_async_context(_opened(self.backend))
        if self.durable is not None:
            # After the close below: this node leaves the cluster's list.
            stack.push_async_callback(self._leave_cluster, self.durable)
            # Unwound after the drain: every write awaited, what is held released.
            stack.push_async_callback(self.durable.close)
            self.durable.loop_lag = self.monitor.current_lag  # None while unmonitored
            self.durable.start()
        stack.push_async_callback(self._run_shutdown_hooks)
        for hook in self.startup_hooks:
            await self._startup_hook(hook)

    async def _leave_cluster(self, durable: DurableRunner) -> None:
        # A graceful stop: the surfaces stop listing this node rather than show
        # it dead for an hour. Its heartbeats ended with durable.close().
        try:
            await durable.store.forget_node(durable.owner)
        except Exception as exc:
            log.warning(
                "could not remove this node (%s) from the store's list at stop (%s): "
                "it is shown dead until forgotten",
                durable.owner,
                describe_exception(exc),
            )

    async def _close_components(self) -> None:
        await self._components.aclose()

    def run_startup_hook_now(self, hook: Callable[[], Awaitable[Any]]) -> None:
        """Run a startup hook on the running loop, in the app context, and wait for it.

        :raises Exception: whatever the hook raised (logged too).
        """
        if not self.loop_thread.running or self.loop_thread.in_loop_thread():
            return
        self.loop_thread.submit(self._startup_hook(hook)).result()

    async def _startup_hook(self, hook: Callable[[], Awaitable[Any]]) -> None:
        try:
            await self._in_app_context(hook)
        except Exception:
            log.exception("on_startup hook %s failed", _hook_name(hook))
            raise

    async def _in_app_context(self, hook: Callable[[], Awaitable[Any]]) -> None:
        # Hooks run in the app context, as jobs do.
        with self.app_context():
            await hook()

    async def _run_shutdown_hooks(self) -> None:
        # After the drain, before the loop closes: clients the jobs shared go
        # now. The app is still held (the loop has not closed yet).
        for hook in reversed(self.shutdown_hooks):
            try:
                await self._in_app_context(hook)
            except Exception:
                log.exception("on_shutdown hook %s failed", _hook_name(hook))

    def _start_on_loop(self, periodic: bool = True) -> None:
        self._running = contextlib.ExitStack()
        for q in self.queues.values():
            self.open_queue(q)
        if periodic:
            for pj in self.periodic_jobs.values():
                self.start_periodic(pj)

    def open_queue(self, q: WorkQueue) -> None:
        """Open ``q`` on the loop; it closes first thing at stop."""
        q.open()
        self._running.callback(q.close)

    def start_periodic(self, pj: PeriodicJob) -> None:
        """Begin ``pj``'s schedule on the loop. Host and cluster scope: led
        through the backend's lease when it is durable (given up after the
        drain, before the backend closes), else host scope through its host lock.

        :raises ValueError: for ``scope="cluster"`` with the memory backend.
        """
        from .engine.leadership import StoreLeader
        from .engine.node import node_id

        lock = leader = None
        if pj.scope != "process":
            name = self.lease_name(pj)
            if self.backend.durable:
                # The node that heartbeats and claims leads too.
                owner = node_id() if self.durable is None else self.durable.owner
                leader = StoreLeader(self.backend, name, owner)
            elif pj.scope == "host":
                lock = HostLock(self.lock_dir, name)
        pj.start(self.loop_thread, context=self.app_context, lock=lock, leader=leader)
        self._running.callback(pj.stop)
        if leader is not None:
            self._components.push_async_callback(leader.release)

    def lease_name(self, pj: PeriodicJob) -> str:
        """The name of ``pj``'s lease (or host lock): its app's import name and
        its own, the same in every process of the app."""
        return f"asyncbg-{self.require_app().import_name}-{pj.name}"

    def _on_stop(self) -> None:
        # On the loop, first thing at stop: no new runs, no new items handed
        # out (what started last stops first).
        self._running.close()
        if self.durable is not None:
            self.durable.stop_claiming()

    def stop(self, timeout: float | None = None) -> ShutdownReport:
        """See :meth:`AsyncBG.stop <asyncbg.AsyncBG.stop>`."""
        with self._start_lock:
            self._stopped = True
        report = self.loop_thread.stop(self.shutdown_timeout if timeout is None else timeout)
        # Here, not in _after_stop: that runs on the loop thread, and only the
        # main thread may change signal handlers.
        self.signals.uninstall()
        return report

    def _after_stop(self, report: ShutdownReport) -> None:
        # On the loop thread, after the loop closed: no run can be in progress.
        self.last_report = report  # first: settling below wakes waiters who may read it
        self.monitor.stop()
        for pj in self.periodic_jobs.values():
            pj.release()
        # Jobs whose tasks ignored cancellation (counted as abandoned by the
        # loop), or left by a loop that died: their waiters must not wait forever.
        self.runner.settle_unfinished("it was still running when the loop closed")
        self.runner.flush_logs()
        for q in self.queues.values():
            q.flush_logs()
        self._count_queued(report)
        if self.durable is not None:
            # Runs cut off at the end of the grace went back to the store: not lost.
            report.released = self.durable.released
            self.durable.released = 0
            report.cancelled = max(0, report.cancelled - report.released)
        self.last_report = report
        self._log_report(report)
        self._app_while_running = None

    def _gave_up(self, report: ShutdownReport) -> None:
        # In the thread that called stop(); the loop is blocked and never got
        # to its shutdown: everything in flight is abandoned with it.
        report.blocked_by = self.monitor.describe_blocker()
        in_hand = sum(q.active for q in self.queues.values())
        report.abandoned += in_hand + self.runner.settle_unfinished(
            f"the loop was blocked at stop (by {report.blocked_by})", from_loop=False
        )
        self._count_queued(report)
        self.last_report = report

    def _count_queued(self, report: ShutdownReport) -> None:
        queued = {name: q.depth for name, q in self.queues.items() if q.depth}
        report.queued_by_queue = queued
        report.still_queued = sum(queued.values())

    def _log_report(self, report: ShutdownReport) -> None:
        lost = report.cancelled or report.still_queued or report.abandoned
        level = logging.WARNING if lost else logging.INFO
        details = "".join(f" {name}={n}" for name, n in report.queued_by_queue.items())
        log.log(level, "%s%s", report, f" (still queued:{details})" if details else "")

    def _stop_at_exit(self) -> None:
        # The interpreter is exiting and stops the loop (with the others at once).
        with self._start_lock:
            self._stopped = True

    def wait_idle(self, timeout: float | None = None) -> None:
        """See :meth:`AsyncBG.wait_idle <asyncbg.AsyncBG.wait_idle>`."""
        lt = self.loop_thread
        lt.check_not_loop_thread("wait_idle()")
        if not lt.running:
            return
        fut = lt.submit(self._until_idle())
        try:
            fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise TimeoutError(
                f"asyncbg still busy after {timeout}s: {self._busy_summary()}"
            ) from None

    def _busy_summary(self) -> str:
        parts = [f"{self.runner.active} job(s) running"]
        parts += [
            f"queue {q.name}: {q.depth} queued, {q.active} in hand"
            for q in self.queues.values()
            if not q.idle
        ]
        return "; ".join(parts)

    def _is_idle(self) -> bool:
        return (
            not self.runner.active
            and (self.durable is None or self.durable.idle)
            and not self.loop_thread.pending_posts
            and all(q.idle for q in self.queues.values())
        )

    async def _until_idle(self) -> None:
        loop = self.loop_thread.loop
        while not self._is_idle():
            if not self.runner.active and all(q.idle for q in self.queues.values()):
                # Only callbacks still in the inbox: no finishing job or queue
                # will call the idle hooks for those that start nothing, so let
                # the drain run them and look again.
                await asyncio.sleep(0)
                continue
            waiter = loop.create_future()
            self._idle_waiters.append(waiter)
            await waiter

    def _wake_idle(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)


@contextlib.asynccontextmanager
async def _opened(backend: Backend) -> AsyncIterator[Backend]:
    # Open, then bring the schema up to date, then check the engine's settings.
    await backend.open()
    try:
        await backend.migrate()
        for warning in await backend.preflight():
            log.warning("backend %s: %s", backend.scheme, warning)
        yield backend
    finally:
        await backend.close()


def _hook_name(hook: Callable[..., Any]) -> str:
    return getattr(hook, "__qualname__", None) or repr(hook)

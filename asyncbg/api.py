"""The Flask extension: config, decorators, app context, lifecycle wiring.

Everything that knows about Flask lives here; the loop, jobs, schedules and
queues it wires together do not.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import functools
import inspect
import logging
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from .asgi import DEFAULT_MAX_BODY_SIZE, AsyncBGASGI
from .errors import NotRunning, UnknownQueue
from .host_lock import HostLock, default_lock_dir
from .jobs import Job, JobHistory, JobRunner, Task, TaskOptions, is_async_callable
from .loop_thread import LoopThread, ShutdownReport
from .metrics import JobStats, MetricsExporter
from .monitor import LoopMonitor
from .queues import WorkQueue
from .scheduling import PeriodicJob, Scope
from .signals import ShutdownSignals

if TYPE_CHECKING:
    from flask import Flask

__all__ = ["DEFAULT_CONFIG", "AsyncBG"]

log = logging.getLogger("asyncbg")

P = ParamSpec("P")
T = TypeVar("T")

#: Every config key asyncbg reads, with its default (see the README's table).
DEFAULT_CONFIG: dict[str, Any] = {
    "ASYNCBG_AUTOSTART": True,
    "ASYNCBG_SHUTDOWN_TIMEOUT": 10.0,
    "ASYNCBG_QUEUE_MAXSIZE": 1000,
    "ASYNCBG_JOB_HISTORY_SIZE": 1000,
    "ASYNCBG_JOB_HISTORY_AGE": 3600.0,
    "ASYNCBG_HANDLE_SIGNALS": True,
    "ASYNCBG_UVLOOP": False,
    "ASYNCBG_ASYNC_VIEWS": True,
    "ASYNCBG_EAGER": False,
    "ASYNCBG_LOCK_DIR": None,
    "ASYNCBG_MAX_WORKERS": None,
    "ASYNCBG_ASGI_THREADS": None,
    # observability (docs/observability.md)
    "ASYNCBG_MOUNT": True,
    "ASYNCBG_DASHBOARD_PREFIX": "/_asyncbg",
    "ASYNCBG_DASHBOARD": False,
    "ASYNCBG_DASHBOARD_REFRESH": 1.0,
    "ASYNCBG_CONTROL": False,
    "ASYNCBG_AUTH": None,
    "ASYNCBG_SHOW_RESULTS": False,
    "ASYNCBG_HEALTH_PUBLIC": True,
    "ASYNCBG_HEALTH_MAX_LAG": 1.0,
    "ASYNCBG_MONITOR": True,
    "ASYNCBG_MONITOR_INTERVAL": 0.1,
    "ASYNCBG_BLOCKED_THRESHOLD": 0.25,
    "ASYNCBG_METRICS": True,
    "ASYNCBG_METRICS_REGISTRY": None,
}

_instances: weakref.WeakSet[AsyncBG] = weakref.WeakSet()


def _reset_locks_after_fork() -> None:
    # Another thread may have held the lock at fork time; it does not exist here.
    for bg in list(_instances):
        bg._start_lock = threading.RLock()
        bg._idle_waiters = []  # futures of the parent's loop
        bg.signals.reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_locks_after_fork)


def _autostart_allowed() -> bool:
    """False in the ``flask run`` reloader's parent and in other ``flask`` commands.

    The reloader parent only watches files and restarts its child
    (``WERKZEUG_RUN_MAIN=true`` is set in the child alone); ``flask shell`` or
    ``flask db upgrade`` should not start periodic jobs either (they start lazily
    there if work is submitted).
    """
    if os.environ.get("WERKZEUG_RUN_MAIN") == "true":
        return True
    try:
        import click
    except ImportError:  # pragma: no cover - Flask depends on click
        return True
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return True  # imported by a server (hypercorn, gunicorn), a script or tests
    if ctx.info_name != "run":
        return False
    reload = ctx.params.get("reload")
    if reload is None:
        from flask.helpers import get_debug_flag

        reload = get_debug_flag()
    return not reload


class AsyncBG:
    """A background asyncio loop for a Flask app: jobs, periodic jobs, queue consumers.

    ``bg = AsyncBG(app)`` or ``bg = AsyncBG()`` then ``bg.init_app(app)``. The
    decorators can be used before ``init_app``. See the README for config keys.
    """

    def __init__(self, app: Flask | None = None, *, name: str = "asyncbg") -> None:
        self.name = name
        self.app: Flask | None = None
        self.loop_thread = LoopThread(name)
        self.loop_thread.at_exit = self._stop_at_exit
        self.history = JobHistory()
        self.runner = JobRunner(self.loop_thread, self.history, context=self._app_context)
        self.tasks: dict[str, Task[Any, Any]] = {}
        self.periodic_jobs: dict[str, PeriodicJob] = {}
        self.queues: dict[str, WorkQueue] = {}
        self.eager = False
        self.shutdown_timeout = float(DEFAULT_CONFIG["ASYNCBG_SHUTDOWN_TIMEOUT"])
        self.queue_maxsize = int(DEFAULT_CONFIG["ASYNCBG_QUEUE_MAXSIZE"])
        self.lock_dir = default_lock_dir()
        self.handle_signals = True
        self.last_report: ShutdownReport | None = None
        self.monitor = LoopMonitor(self.loop_thread)
        self.monitor_enabled = True
        self.job_stats = JobStats()
        self.metrics = MetricsExporter(self)
        self._start_lock = threading.RLock()
        self._stopped = False
        self.signals = ShutdownSignals(
            self.stop, self.loop_thread, lambda: sum(q.depth for q in self.queues.values())
        )
        self._idle_waiters: list[Any] = []
        self.loop_thread.add_stop_hook(self._on_stop)
        self.loop_thread.add_after_stop_hook(self._after_stop)
        self.loop_thread.add_gave_up_hook(self._gave_up)
        self.runner.add_idle_hook(self._wake_idle)
        _instances.add(self)
        if app is not None:
            self.init_app(app)

    def __repr__(self) -> str:
        state = "running" if self.loop_thread.running else "stopped"
        return f"<AsyncBG {self.name} {state}>"

    # -- setup -----------------------------------------------------------------

    def init_app(self, app: Flask) -> None:
        """Bind to ``app``: read config, route async views to the loop, maybe start.

        Also mounts the HTTP surface at ``ASYNCBG_DASHBOARD_PREFIX`` and adds
        the ``flask asyncbg`` commands (see docs/observability.md).

        :raises RuntimeError: if this instance is already bound to another app.
        :raises TypeError: if ``ASYNCBG_AUTH`` is set to something not callable.
        """
        if self.app is not None and self.app is not app:
            raise RuntimeError(
                "this AsyncBG is already bound to another app; create one AsyncBG per app"
            )
        for key, value in DEFAULT_CONFIG.items():
            app.config.setdefault(key, value)
        cfg = app.config
        self.app = app
        app.extensions["asyncbg"] = self
        lt = self.loop_thread
        lt.use_uvloop = bool(cfg["ASYNCBG_UVLOOP"])
        self.shutdown_timeout = float(cfg["ASYNCBG_SHUTDOWN_TIMEOUT"])
        lt.shutdown_timeout = self.shutdown_timeout
        if cfg["ASYNCBG_MAX_WORKERS"]:
            lt.max_workers = int(cfg["ASYNCBG_MAX_WORKERS"])
        self.history.max_size = int(cfg["ASYNCBG_JOB_HISTORY_SIZE"])
        self.history.max_age = float(cfg["ASYNCBG_JOB_HISTORY_AGE"])
        self.queue_maxsize = int(cfg["ASYNCBG_QUEUE_MAXSIZE"])
        self.lock_dir = cfg["ASYNCBG_LOCK_DIR"] or default_lock_dir()
        self.handle_signals = bool(cfg["ASYNCBG_HANDLE_SIGNALS"])
        self.eager = bool(cfg["ASYNCBG_EAGER"])
        if cfg["ASYNCBG_ASYNC_VIEWS"]:
            # Flask documents async_to_sync as the hook to override.
            app.async_to_sync = self._async_to_sync  # type: ignore[method-assign]
        self._init_observability(app)
        if cfg["ASYNCBG_AUTOSTART"] and _autostart_allowed():
            self.start()

    def _init_observability(self, app: Flask) -> None:
        cfg = app.config
        if cfg["ASYNCBG_AUTH"] is not None and not callable(cfg["ASYNCBG_AUTH"]):
            raise TypeError("ASYNCBG_AUTH must be a callable taking the request, or None")
        self.monitor_enabled = bool(cfg["ASYNCBG_MONITOR"])
        self.monitor.configure(
            interval=float(cfg["ASYNCBG_MONITOR_INTERVAL"]),
            blocked_threshold=float(cfg["ASYNCBG_BLOCKED_THRESHOLD"]),
        )
        hooks = self.runner.finish_hooks
        if cfg["ASYNCBG_METRICS"] and self.job_stats.record not in hooks:
            hooks.append(self.job_stats.record)
        self.metrics = MetricsExporter(self, cfg["ASYNCBG_METRICS_REGISTRY"])
        if not cfg["ASYNCBG_MOUNT"]:
            return  # the app gets no route, template, static folder or command from asyncbg
        # Mounted by default: health must answer probes without any setup. The
        # blueprint brings routes and a static folder under the prefix only; the
        # page's template is rendered by asyncbg itself, never through the app's
        # Jinja loader, so the app's template list stays its own.
        prefix = cfg["ASYNCBG_DASHBOARD_PREFIX"]
        if prefix and "asyncbg" not in app.blueprints:
            from .dashboard import create_blueprint

            app.register_blueprint(create_blueprint(self), url_prefix=prefix)
        from .cli import asyncbg_cli

        if "asyncbg" not in app.cli.commands:
            app.cli.add_command(asyncbg_cli)

    def _require_app(self) -> Flask:
        if self.app is None:
            raise RuntimeError("AsyncBG has no app yet: call AsyncBG(app) or bg.init_app(app)")
        return self.app

    def _app_context(self) -> contextlib.AbstractContextManager[Any]:
        return self._require_app().app_context()

    # -- decorators ---------------------------------------------------------------

    @overload
    def task(self, fn: Callable[P, T], /) -> Task[P, T]: ...

    @overload
    def task(
        self,
        *,
        name: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
        retry_backoff: float = 1.0,
        retry_backoff_max: float = 60.0,
    ) -> Callable[[Callable[P, T]], Task[P, T]]: ...

    def task(  # type: ignore[misc]  # the decorator-factory overload is generic in its result
        self,
        fn: Callable[P, T] | None = None,
        /,
        *,
        name: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
        retry_backoff: float = 1.0,
        retry_backoff_max: float = 60.0,
    ) -> Task[P, T] | Callable[[Callable[P, T]], Task[P, T]]:
        """Declare a named task: ``@bg.task`` or ``@bg.task(timeout=30, retries=3)``.

        ``timeout`` applies to each attempt; ``retries`` more attempts follow a
        failure or timeout after ``retry_backoff * 2**n`` seconds (at most
        ``retry_backoff_max``). Plain functions run in a worker thread.

        :raises ValueError: on a bad option or a name already taken.
        """
        options = TaskOptions(timeout, retries, retry_backoff, retry_backoff_max)

        def decorate(func: Callable[P, T]) -> Task[P, T]:
            task_name = name or _qualified_name(func)
            if task_name in self.tasks:
                raise ValueError(f"a task named {task_name!r} is already registered")
            t: Task[P, T] = Task(func, task_name, options, self._submit_task)
            self.tasks[task_name] = t
            return t

        return decorate(fn) if fn is not None else decorate

    def periodic(
        self,
        *,
        every: float | dt.timedelta | None = None,
        delay: float | dt.timedelta | None = None,
        cron: str | None = None,
        jitter: float | dt.timedelta = 0.0,
        run_at_start: bool = False,
        timeout: float | dt.timedelta | None = None,
        scope: Scope = "process",
        name: str | None = None,
        tz: dt.tzinfo | None = None,
    ) -> Callable[[Callable[[], Coroutine[Any, Any, Any]]], PeriodicJob]:
        """Run an ``async def`` function on a schedule while the loop runs.

        ``every=`` fixed rate (run N at start + N * period), ``delay=`` fixed
        delay after each run ends, or ``cron=`` (5 fields, ``tz`` for its time
        zone). ``scope="host"`` runs it in one process per host at a time (a
        file lock in ``ASYNCBG_LOCK_DIR``). Returns the :class:`PeriodicJob`.

        :raises ValueError: on a bad schedule or a name already taken.
        :raises TypeError: if the function is not async.
        """

        def decorate(fn: Callable[[], Coroutine[Any, Any, Any]]) -> PeriodicJob:
            job_name = name or _qualified_name(fn)
            if job_name in self.periodic_jobs:
                raise ValueError(f"a periodic job named {job_name!r} is already registered")
            pj = PeriodicJob(
                fn,
                name=job_name,
                every=every,
                delay=delay,
                cron=cron,
                jitter=jitter,
                run_at_start=run_at_start,
                timeout=timeout,
                scope=scope,
                tz=tz,
            )
            self.periodic_jobs[job_name] = pj
            if self.loop_thread.running:
                self.loop_thread.post(self._start_periodic, pj)
            return pj

        return decorate

    def consumer(
        self, queue: str, *, concurrency: int = 1, maxsize: int | None = None
    ) -> Callable[[Callable[[Any], Awaitable[Any]]], WorkQueue]:
        """Consume the named queue with ``concurrency`` workers on the loop.

        ``maxsize`` defaults to ``ASYNCBG_QUEUE_MAXSIZE``. An item whose handler
        raises is logged and the workers go on. Returns the :class:`WorkQueue`.

        :raises ValueError: if the queue already has a consumer, or on bad sizes.
        """

        def decorate(fn: Callable[[Any], Awaitable[Any]]) -> WorkQueue:
            if queue in self.queues:
                raise ValueError(f"queue {queue!r} already has a consumer")
            q = WorkQueue(
                queue,
                fn,
                self.loop_thread,
                concurrency=concurrency,
                maxsize=maxsize or self.queue_maxsize,
                context=self._app_context,
            )
            q.add_idle_hook(self._wake_idle)
            self.queues[queue] = q
            return q

        return decorate

    # -- handing work over ----------------------------------------------------------

    def _ensure_started(self) -> None:
        if not self.loop_thread.running:
            with self._start_lock:
                if self.loop_thread.running:
                    return
                if self._stopped:
                    raise NotRunning(f"{self.name} has been stopped; call start() to restart it")
                self.start()

    def _dispatch(self, job: Job[T]) -> Job[T]:
        try:
            self._ensure_started()
            self.runner.submit(job)
        except NotRunning:
            fn = job._fn
            if inspect.iscoroutine(fn):
                fn.close()
            raise
        if self.eager and not self.loop_thread.in_loop_thread():
            job.wait()
        return job

    def _submit_task(
        self, task: Task[Any, T], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Job[T]:
        job = self.runner.create(
            task.fn, args, kwargs, name=task.name, options=task.options, is_async=task.is_async
        )
        return self._dispatch(job)

    def submit(
        self, fn: Callable[..., Any] | Coroutine[Any, Any, Any], /, *args: Any, **kwargs: Any
    ) -> Job[Any]:
        """Run ``fn(*args, **kwargs)`` in the background; return its :class:`Job` at once.

        ``fn`` may be an async function (runs on the loop), a plain function
        (runs in a worker thread), a :class:`Task`, or a coroutine object.
        Thread-safe; starts the loop if it has not started yet.

        :raises NotRunning: if asyncbg has been stopped or is stopping.
        :raises TypeError: if ``fn`` is not callable.
        """
        if isinstance(fn, Task):
            return self._submit_task(fn, args, kwargs)
        return self._dispatch(self.runner.create(fn, args, kwargs))

    async def run(
        self, fn: Callable[..., Any] | Coroutine[Any, Any, Any], /, *args: Any, **kwargs: Any
    ) -> Any:
        """Run ``fn`` as a job and await its result, from any event loop.

        Works in stock Flask async views (a new loop per request) and on the
        background loop itself.

        :raises NotRunning: if asyncbg has been stopped or is stopping.
        :raises Exception: whatever the job raised; :class:`~asyncbg.JobTimedOut`,
            :class:`~asyncbg.JobCancelled`.
        """
        job = self.submit(fn, *args, **kwargs)
        return await job

    def enqueue(self, queue: str, item: Any, timeout: float | None = 0.0) -> None:
        """Put ``item`` on the named queue; thread-safe.

        If the queue is full, wait up to ``timeout`` seconds for room (``None``:
        no limit; never on the loop thread, where it raises at once).

        :raises UnknownQueue: if no consumer is registered for ``queue``.
        :raises QueueFull: if the queue stayed full for ``timeout``.
        :raises NotRunning: if asyncbg has been stopped or is stopping.
        """
        q = self.get_queue(queue)
        self._ensure_started()
        if self.eager and not self.loop_thread.in_loop_thread():
            self.loop_thread.run_sync(q.handle(item, propagate=True), context=None)
            return
        q.put(item, timeout)

    async def enqueue_async(self, queue: str, item: Any, timeout: float | None = None) -> None:
        """Put ``item`` on the named queue from any event loop, waiting for room.

        :raises UnknownQueue: if no consumer is registered for ``queue``.
        :raises QueueFull: if the queue stayed full for ``timeout`` seconds.
        :raises NotRunning: if asyncbg has been stopped or is stopping.
        """
        q = self.get_queue(queue)
        self._ensure_started()
        if self.eager:
            await self.loop_thread.run(q.handle(item, propagate=True))
            return
        await q.put_async(item, timeout)

    def call(self, fn: Callable[..., T], /, *args: Any, timeout: float | None = None) -> T:
        """Run the plain callable ``fn(*args)`` on the loop thread and return its value.

        The lock-free way for views to read or change state owned by the loop.
        ``fn`` must be quick and must not block.

        :raises TypeError: if ``fn`` is an async function (use :meth:`run`).
        :raises NotRunning: if asyncbg has been stopped or is stopping.
        :raises TimeoutError: if the loop does not get to it within ``timeout``.
        """
        if is_async_callable(fn):
            raise TypeError(
                f"bg.call() runs plain callables; await bg.run({_qualified_name(fn)}) instead"
            )
        self._ensure_started()
        return self.loop_thread.call(fn, *args, timeout=timeout)

    def get_job(self, job_id: str) -> Job[Any] | None:
        """The job with this id if it is live or still in the history, else None."""
        if not isinstance(job_id, str):
            return None
        return self.history.get(job_id)

    def get_queue(self, name: str) -> WorkQueue:
        """The :class:`WorkQueue` consumed under ``name``.

        :raises UnknownQueue: if no consumer is registered for it.
        """
        try:
            return self.queues[name]
        except KeyError:
            known = ", ".join(sorted(self.queues)) or "none"
            raise UnknownQueue(f"no consumer for queue {name!r} (known queues: {known})") from None

    # -- async views on the shared loop -------------------------------------------------

    def _async_to_sync(self, func: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T]:
        lt = self.loop_thread

        @functools.wraps(func)
        def run_on_loop(*args: Any, **kwargs: Any) -> T:
            self._ensure_started()
            if lt.in_loop_thread():
                raise RuntimeError(
                    f"async view {func.__qualname__} was called from the asyncbg loop thread "
                    "(a request dispatched from inside a job?); it would deadlock"
                )
            # The copied context carries Flask's request and app contexts to the loop.
            return lt.run_sync(func(*args, **kwargs), context=contextvars.copy_context())

        return run_on_loop

    # -- serving -------------------------------------------------------------------------

    def asgi_app(
        self, *, max_body_size: int = DEFAULT_MAX_BODY_SIZE, threads: int | None = None
    ) -> AsyncBGASGI:
        """An ASGI app serving the bound Flask app, with asyncbg's life tied to the server's.

        Run it with ``hypercorn module:asgi_app``. Lifespan startup starts the
        loop (periodic jobs run before the first request); lifespan shutdown,
        which Hypercorn sends once in-flight requests are done, drains and stops
        it. HTTP goes to asyncbg's own WSGI bridge (:class:`~asyncbg.asgi.WSGIBridge`),
        which runs views on a pool of ``threads`` threads (default
        ``ASYNCBG_ASGI_THREADS``, 32) and answers the health probe on two of its
        own. ``max_body_size`` caps request bodies (larger ones get a 400 JSON
        answer), as Hypercorn's ``wsgi_max_body_size`` does.

        :raises RuntimeError: if no app is bound yet.
        :raises ValueError: if ``threads`` is below 1 or ``max_body_size`` below 0.
        """
        return AsyncBGASGI(self, self._require_app(), max_body_size=max_body_size, threads=threads)

    def _serve_under_server(self) -> None:
        # Called by AsyncBGASGI on the server's loop once start() has run: from
        # now on the server decides when we stop. In the main thread (where the
        # server runs its loop) this also puts our handlers in front of the
        # server's, which Hypercorn installed after the app was imported.
        self.signals.server_managed = True
        if self.handle_signals:
            self.signals.install()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, *, periodic: bool = True) -> None:
        """Start the loop, open the queues, begin the periodic schedules. Idempotent.

        With ``periodic=False`` the schedules are not started (``flask asyncbg
        run`` uses that to run one job alone); a later ``start()`` does not start
        them either while the loop runs.

        :raises RuntimeError: if no app is bound, or uvloop is asked for and missing.
        """
        with self._start_lock:
            self._require_app()
            if self.loop_thread.running:
                return
            self._stopped = False
            self.signals.reset()
            self.loop_thread.start()
            if self.monitor_enabled:
                # Before the schedules: a run_at_start job that blocks is caught too.
                self.monitor.start()
            self.loop_thread.call(self._start_on_loop, periodic)
            if self.handle_signals:
                self.signals.install()
        log.debug(
            "started: %d periodic jobs, %d queues",
            len(self.periodic_jobs),
            len(self.queues),
        )

    def _start_on_loop(self, periodic: bool = True) -> None:
        for q in self.queues.values():
            q.open()
        if periodic:
            for pj in self.periodic_jobs.values():
                self._start_periodic(pj)

    def _start_periodic(self, pj: PeriodicJob) -> None:
        lock = None
        if pj.scope == "host":
            app = self._require_app()
            lock = HostLock(self.lock_dir, f"asyncbg-{app.import_name}-{pj.name}")
        pj.start(self.loop_thread, context=self._app_context, lock=lock)

    def _on_stop(self) -> None:
        # On the loop, first thing at stop: no new runs, no new items handed out.
        for pj in self.periodic_jobs.values():
            pj.stop()
        for q in self.queues.values():
            q.close()

    def stop(self, timeout: float | None = None) -> ShutdownReport:
        """Stop gracefully and return what happened (see :class:`ShutdownReport`).

        New work is refused at once with :class:`NotRunning`; schedules stop;
        running jobs and consumer items in hand get ``timeout`` seconds
        (default ``ASYNCBG_SHUTDOWN_TIMEOUT``) to finish, then are cancelled;
        items still queued are counted in the report and logged. Idempotent,
        callable from any thread, a signal handler or a job (see
        :meth:`LoopThread.stop`).
        """
        with self._start_lock:
            self._stopped = True
        report = self.loop_thread.stop(self.shutdown_timeout if timeout is None else timeout)
        self.signals.uninstall()
        return report

    def _after_stop(self, report: ShutdownReport) -> None:
        # On the loop thread, after the loop closed: no run can be in progress.
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
        self.last_report = report
        self._log_report(report)

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
        """Block until every submitted job and queued item is done (for tests).

        :raises TimeoutError: if work is still going after ``timeout`` seconds.
        :raises RuntimeError: if called from the loop thread.
        """
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
            and not self.loop_thread.pending_posts
            and all(q.idle for q in self.queues.values())
        )

    async def _until_idle(self) -> None:
        loop = self.loop_thread.loop
        while not self._is_idle():
            waiter = loop.create_future()
            self._idle_waiters.append(waiter)
            await waiter

    def _wake_idle(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)


def _qualified_name(fn: object) -> str:
    # The bare function name: what people type in `flask asyncbg run NAME`.
    return getattr(fn, "__name__", None) or repr(fn)

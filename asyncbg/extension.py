"""The Flask extension: config, decorators, app context, lifecycle wiring.

Everything that knows about Flask lives here; the loop, jobs, schedules and
queues it wires together do not.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import os
import signal
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import (
    TYPE_CHECKING,
    Any,
    Generic,
    ParamSpec,
    TypeVar,
    TypeVarTuple,
    Unpack,
    cast,
    overload,
)

from flask import current_app, has_app_context
from flask.logging import has_level_handler

from .app_view import AppView
from .asgi import DEFAULT_MAX_BODY_SIZE, AsyncBGASGI
from .async_views import async_view_bridge
from .backends import Backend, BackendOptions, open_backend
from .config import DEFAULT_CONFIG, Settings, load_settings
from .engine.consumers import WorkQueue
from .engine.durable import DurableRunner, task_record
from .engine.host_lock import default_lock_dir
from .engine.jobs import Job, JobHistory
from .engine.loop import LoopThread, ShutdownReport
from .engine.monitor import LoopMonitor
from .engine.os_signals import ShutdownSignals
from .engine.periodic import PeriodicJob, Schedule
from .engine.records import JobRecord
from .engine.runner import JobRunner
from .engine.stats import JobStats
from .engine.tasks import (
    CoroutineFunction,
    SubmitSettings,
    Task,
    TaskDecorator,
    TaskOptions,
    TaskSettings,
    check_key,
    deprecated,
    is_async_callable,
    require_findable,
)
from .lifecycle import AppState, in_job_context_transition
from .web.metrics import MetricsExporter

if TYPE_CHECKING:
    from flask import Flask
    from werkzeug.local import LocalProxy

    from .engine.view import StateView

__all__ = ["DEFAULT_CONFIG", "AsyncBG"]

log = logging.getLogger("asyncbg")

P = ParamSpec("P")
T = TypeVar("T")
Ts = TypeVarTuple("Ts")

_PLAIN = SubmitSettings()


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


class _OfCurrentApp(Generic[T]):
    """A read-only attribute of :class:`AsyncBG`: the attribute of the same
    name of the current app's state (see ``AsyncBG._state``)."""

    def __init__(self, doc: str) -> None:
        self.__doc__ = doc
        self._name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, ext: None, owner: type) -> _OfCurrentApp[T]: ...

    @overload
    def __get__(self, ext: AsyncBG, owner: type) -> T: ...

    def __get__(self, ext: AsyncBG | None, owner: type) -> T | _OfCurrentApp[T]:
        if ext is None:
            return self
        return cast(T, getattr(ext._state(), self._name))


class AsyncBG:
    """A background asyncio loop for Flask apps: jobs, periodic jobs, queue consumers.

    ``bg = AsyncBG(app)``, or ``bg = AsyncBG()`` at module level and
    ``bg.init_app(app)`` in an app factory: one instance serves any number of
    apps, each with a loop of its own (its state lives in ``app.extensions``
    and in the instance, keyed weakly by app). The decorators register once
    and serve every app, before or after ``init_app``. Calls are routed to the
    app of the current app context, or to the only app bound when there is no
    context. See the README for config keys.

    ``backend`` (a URL such as ``"sqlite:///asyncbg.db"``, or a backend object)
    serves every app whose ``ASYNCBG_BACKEND`` names none; by default, memory.
    """

    def __init__(
        self, app: Flask | None = None, *, name: str = "asyncbg", backend: object = None
    ) -> None:
        self.name = name
        # Every app's backend unless its ASYNCBG_BACKEND says otherwise.
        self._backend = backend
        self.tasks: dict[str, Task[Any, Any]] = {}
        self._periodic_defs: dict[str, dict[str, Any]] = {}
        self._consumer_defs: dict[str, dict[str, Any]] = {}
        self._startup_hooks: list[Callable[[], Awaitable[Any]]] = []
        self._shutdown_hooks: list[Callable[[], Awaitable[Any]]] = []
        self._states: weakref.WeakKeyDictionary[Flask, AppState] = weakref.WeakKeyDictionary()
        # The state the next init_app takes: made now, so that the objects the
        # decorators return before init_app are the first app's own.
        self._spare: AppState | None = self._new_state()
        self._last_state: AppState | None = None
        if app is not None:
            self.init_app(app)

    def __repr__(self) -> str:
        apps = ", ".join(sorted(app.name for app in list(self._states.keys()))) or "no app"
        return f"<AsyncBG {self.name} serving {apps}>"

    # -- which app -----------------------------------------------------------------

    def _state(self) -> AppState:
        if has_app_context():
            st = self._states.get(cast("LocalProxy[Flask]", current_app)._get_current_object())
            if st is not None:
                return st
        states = list(self._states.values())
        if len(states) == 1:
            return states[0]
        if not states:
            # The app it served is gone: its state still says what happened
            # (work that needs the app raises, saying so).
            return self._last_state if self._last_state is not None else self._spare_state()
        names = ", ".join(sorted(repr(st.app.name) for st in states if st.app is not None))
        raise RuntimeError(
            f"this AsyncBG serves {len(states)} apps ({names}) and there is no app context "
            "to tell which one: call it inside 'with app.app_context():' (views, jobs and "
            "CLI commands have one already)"
        )

    def state_for(self, app: Flask) -> AppState:
        """The state this extension keeps for ``app``.

        :raises RuntimeError: if ``app`` is not bound to this extension.
        """
        st = self._states.get(app)
        if st is None:
            raise RuntimeError(f"app {app.name!r} is not bound to this AsyncBG: call init_app(app)")
        return st

    def _pinned(self, st: AppState) -> AsyncBG:
        # The same extension, seen from one app only: for the HTTP surface,
        # metrics and the ASGI entry of that app, which must not depend on
        # an app context to find their state.
        view = object.__new__(_PinnedAsyncBG)
        view.__dict__.update(self.__dict__)
        view._pinned_state = st
        return view

    # The state of the current app, for the surfaces and for tests: each is
    # the attribute of the same name of the current app's AppState.
    app: _OfCurrentApp[Flask | None] = _OfCurrentApp("The current app, or None before init_app.")
    loop_thread: _OfCurrentApp[LoopThread] = _OfCurrentApp("Its :class:`LoopThread`.")
    runner: _OfCurrentApp[JobRunner] = _OfCurrentApp("Its job runner.")
    history: _OfCurrentApp[JobHistory] = _OfCurrentApp("Its job history.")
    queues: _OfCurrentApp[dict[str, WorkQueue]] = _OfCurrentApp("Its queues, by name.")
    periodic_jobs: _OfCurrentApp[dict[str, PeriodicJob]] = _OfCurrentApp("Its periodic jobs.")
    monitor: _OfCurrentApp[LoopMonitor] = _OfCurrentApp("Its loop monitor.")
    job_stats: _OfCurrentApp[JobStats] = _OfCurrentApp("Its job statistics.")
    signals: _OfCurrentApp[ShutdownSignals] = _OfCurrentApp("Its signal handlers.")
    last_report: _OfCurrentApp[ShutdownReport | None] = _OfCurrentApp("Its last shutdown report.")
    eager: _OfCurrentApp[bool] = _OfCurrentApp("ASYNCBG_EAGER, read at each hand-over.")
    shutdown_timeout: _OfCurrentApp[float] = _OfCurrentApp("Its ASYNCBG_SHUTDOWN_TIMEOUT.")
    queue_maxsize: _OfCurrentApp[int] = _OfCurrentApp("Its ASYNCBG_QUEUE_MAXSIZE.")
    lock_dir: _OfCurrentApp[str] = _OfCurrentApp("Its ASYNCBG_LOCK_DIR.")
    monitor_enabled: _OfCurrentApp[bool] = _OfCurrentApp("Its ASYNCBG_MONITOR.")

    @property
    def metrics(self) -> MetricsExporter:
        """The current app's metrics exporter."""
        st = self._state()
        if st.metrics is None:
            st.metrics = MetricsExporter(AppView(st, self.tasks))
        return st.metrics

    # -- setup -----------------------------------------------------------------

    def init_app(self, app: Flask) -> None:
        """Bind to ``app``: read its config, route async views to its loop, maybe start.

        Any number of apps can be bound, each with its own loop; binding the
        same app again does nothing. Also mounts the HTTP surface at
        ``ASYNCBG_DASHBOARD_PREFIX`` and adds the ``flask asyncbg`` commands
        (see docs/observability.md).

        :raises RuntimeError: if another AsyncBG is already bound to ``app``.
        :raises ConfigError: for an ``ASYNCBG_*`` value of the wrong kind or out
            of range, naming the key (``ConfigTypeError``, also a ``TypeError``,
            for the wrong kind: ``ASYNCBG_AUTH`` set to something not callable).
        :raises BackendUnavailable: if ``ASYNCBG_BACKEND`` names an unknown
            scheme or a backend whose optional driver is missing.
        """
        other = app.extensions.get("asyncbg")
        if other is self and app in self._states:
            return
        if other is not None and other is not self:
            raise RuntimeError(
                f"app {app.name!r} already has an AsyncBG ({other!r}); one app takes one "
                "AsyncBG (one AsyncBG can serve many apps)"
            )
        for key, value in DEFAULT_CONFIG.items():
            app.config.setdefault(key, value)
        settings = load_settings(app.config)
        backend = open_backend(
            self._backend if settings.backend is None else settings.backend,
            app.instance_path,
            BackendOptions(
                pool_size=settings.pool_size,
                statement_timeout=settings.statement_timeout,
                connect_timeout=settings.connect_timeout,
                lease=settings.lease,
                history_age=settings.job_history_age,
            ),
        )
        st = self._spare if self._spare is not None else self._new_state()
        self._spare = None
        st.bind(app)
        self._states[app] = st
        self._last_state = st
        app.extensions["asyncbg"] = self
        self._configure(st, settings, backend)
        self._instantiate(st)
        # No reference back to the app (Flask frees an app on refcount alone).
        app.async_to_sync = functools.partial(  # type: ignore[method-assign]
            self._async_to_sync_for, weakref.ref(app)
        )
        self._init_observability(app, settings)
        _configure_logging(settings)
        if settings.autostart and _autostart_allowed():
            st.start()
        elif _is_reloader_parent() and st.handle_signals:
            _wait_for_the_reloaded_child_on_ctrl_c()

    def _configure(self, st: AppState, settings: Settings, backend: Backend) -> None:
        st.settings = settings
        st.backend = backend
        st.durable = (
            DurableRunner(
                st.loop_thread,
                st.runner,
                st.history,
                backend,
                self.tasks,
                st.queues,
                lease=settings.lease,
                concurrency=settings.worker_concurrency,
                poll_interval=settings.poll_interval,
                history_age=settings.job_history_age,
            )
            if backend.durable
            else None
        )
        lt = st.loop_thread
        lt.use_uvloop = settings.uvloop
        st.shutdown_timeout = settings.shutdown_timeout
        lt.shutdown_timeout = st.shutdown_timeout
        if settings.max_workers:
            lt.max_workers = settings.max_workers
        st.history.max_size = settings.job_history_size
        st.history.max_age = settings.job_history_age
        st.queue_maxsize = settings.queue_maxsize
        st.lock_dir = settings.lock_dir or default_lock_dir()
        st.handle_signals = settings.handle_signals

    def _instantiate(self, st: AppState) -> None:
        # Every definition made so far gets this app's own instance (the first
        # app keeps those the decorators returned); a consumer without its own
        # maxsize takes this app's ASYNCBG_QUEUE_MAXSIZE.
        for name, spec in self._periodic_defs.items():
            if name not in st.periodic_jobs:
                st.add_periodic(PeriodicJob(spec["fn"], name=name, **spec["options"]))
        for name, spec in self._consumer_defs.items():
            q = st.queues.get(name)
            if q is None:
                st.add_queue(self._new_queue(st, name, spec))
            elif spec["maxsize"] is None:
                q.maxsize = st.queue_maxsize

    def _new_queue(self, st: AppState, name: str, spec: dict[str, Any]) -> WorkQueue:
        return WorkQueue(
            name,
            spec["fn"],
            st.loop_thread,
            concurrency=spec["concurrency"],
            maxsize=spec["maxsize"] or st.queue_maxsize,
            context=st.app_context,
            durable=spec["durable"],
        )

    def _new_state(self) -> AppState:
        return AppState(self.name, self._startup_hooks, self._shutdown_hooks)

    def _spare_state(self) -> AppState:
        if self._spare is None:
            self._spare = self._new_state()
        return self._spare

    def _every_state(self) -> list[AppState]:
        states = list(self._states.values())
        return states if states else [self._spare_state()]

    def _init_observability(self, app: Flask, settings: Settings) -> None:
        st = self.state_for(app)
        st.monitor_enabled = settings.monitor
        st.monitor.configure(
            interval=settings.monitor_interval,
            blocked_threshold=settings.blocked_threshold,
        )
        hooks = st.runner.finish_hooks
        if settings.metrics and st.job_stats.record not in hooks:
            hooks.append(st.job_stats.record)
        # The one view of this app's state that the surfaces read (web/,
        # cli.py, health_report); they never see the extension itself.
        view = AppView(st, self.tasks)
        app.extensions["asyncbg.view"] = view
        st.metrics = MetricsExporter(view, cast(Any, settings.metrics_registry))
        if not settings.mount:
            return  # the app gets no route, template, static folder or command from asyncbg
        # Mounted by default: health must answer probes without any setup. The
        # blueprint brings routes and a static folder under the prefix only; the
        # page's template is rendered by asyncbg itself, never through the app's
        # Jinja loader, so the app's template list stays its own.
        prefix = settings.dashboard_prefix
        if prefix and "asyncbg" not in app.blueprints:
            from .web.blueprint import create_blueprint

            app.register_blueprint(create_blueprint(view, st.metrics), url_prefix=prefix)
        from .cli import asyncbg_cli

        if "asyncbg" not in app.cli.commands:
            app.cli.add_command(asyncbg_cli)

    def state_view(self) -> StateView:
        """The current app's view of its state: what :func:`asyncbg.health.health_report`,
        the HTTP surface and ``flask asyncbg`` read (see :mod:`asyncbg.engine.view`).

        :raises RuntimeError: if no app is bound yet, or the app is gone.
        """
        return cast("StateView", self._state().require_app().extensions["asyncbg.view"])

    def _require_app(self) -> Flask:
        return self._state().require_app()

    # -- decorators ---------------------------------------------------------------

    # The async overload comes first: Callable[P, T] alone would make T the
    # coroutine, and job.result() / await bg.run(...) a coroutine type.
    @overload
    def task(self, fn: Callable[P, Coroutine[Any, Any, T]], /) -> Task[P, T]: ...

    @overload
    def task(self, fn: Callable[P, T], /) -> Task[P, T]: ...

    @overload
    def task(
        self, *, name: str | None = None, **options: Unpack[TaskSettings]
    ) -> TaskDecorator: ...

    # fn is not positional-only here: mypy then wrongly finds that the
    # implementation does not accept the keyword-only overload's calls.
    def task(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        **options: Unpack[TaskSettings],
    ) -> Task[Any, Any] | TaskDecorator:
        """Declare a named task: ``@bg.task`` or ``@bg.task(timeout=30, retries=3)``.

        ``timeout`` applies to each attempt; ``retries`` more attempts follow a
        failure or timeout after ``retry_backoff * 2**n`` seconds (at most
        ``retry_backoff_max``). Plain functions run in a worker thread. For
        ``async def f(...) -> T`` and ``def f(...) -> T`` alike the result is a
        ``Task[P, T]``, whose jobs are ``Job[T]``.

        :raises ValueError: on a bad option or a name already taken.
        """
        task_options = TaskOptions(**options)
        durable = task_options.durable

        def decorate(func: Callable[..., Any], /) -> Task[Any, Any]:
            task_name = name or _qualified_name(func)
            if task_name in self.tasks:
                raise ValueError(f"a task named {task_name!r} is already registered")
            if durable:
                require_findable(func, f"task {task_name!r}")
            t: Task[Any, Any] = Task(func, task_name, task_options, self)
            self.tasks[task_name] = t
            return t

        return decorate(fn) if fn is not None else decorate

    def periodic(
        self, *, name: str | None = None, **schedule: Unpack[Schedule]
    ) -> Callable[[Callable[[], Coroutine[Any, Any, Any]]], PeriodicJob]:
        """Run an ``async def`` function on a schedule while the loop runs.

        ``every=`` fixed rate (run N at start + N * period), ``delay=`` fixed
        delay after each run ends, or ``cron=`` (5 fields, ``tz`` for its time
        zone). ``scope="host"`` runs it in one process per host at a time (a
        file lock in ``ASYNCBG_LOCK_DIR``; with a durable backend, the store's
        lease, and ``scope="cluster"`` too: one process among all that share it).
        ``jitter=`` adds up to that many seconds at random to each start,
        ``run_at_start=True`` runs once at once,
        ``timeout=`` cancels a run that takes longer (see :class:`Schedule`).
        Returns the :class:`PeriodicJob` of the first app (each app bound has its
        own, with its own statistics).

        :raises ValueError: on a bad schedule or a name already taken.
        :raises TypeError: if the function is not async, or on an unknown option.
        """
        options: Schedule = {**schedule}

        def decorate(fn: Callable[[], Coroutine[Any, Any, Any]]) -> PeriodicJob:
            job_name = name or _qualified_name(fn)
            if job_name in self._periodic_defs:
                raise ValueError(f"a periodic job named {job_name!r} is already registered")
            first = PeriodicJob(fn, name=job_name, **options)  # validates the options
            self._periodic_defs[job_name] = {"fn": fn, "options": options}
            for i, st in enumerate(self._every_state()):
                st.add_periodic(first if i == 0 else PeriodicJob(fn, name=job_name, **options))
            return first

        return decorate

    def consumer(
        self,
        queue: str,
        *,
        concurrency: int = 1,
        maxsize: int | None = None,
        durable: bool | None = None,
    ) -> Callable[[Callable[[Any], Awaitable[Any]]], WorkQueue]:
        """Consume the named queue with ``concurrency`` workers on the loop.

        ``maxsize`` defaults to ``ASYNCBG_QUEUE_MAXSIZE`` of each app (read at
        ``init_app``, whether the consumer is declared before or after it). An
        item whose handler raises is logged and the workers go on. Plain
        functions run in a worker thread, in the app context like async ones.
        Returns the :class:`WorkQueue` of the first app (each app has its own).

        :raises ValueError: if the queue already has a consumer, or on bad sizes.
        """
        spec: dict[str, Any] = {"concurrency": concurrency, "maxsize": maxsize, "durable": durable}

        def decorate(fn: Callable[[Any], Awaitable[Any]]) -> WorkQueue:
            if queue in self._consumer_defs:
                raise ValueError(f"queue {queue!r} already has a consumer")
            if durable:
                require_findable(fn, f"the consumer of {queue!r}")
            spec["fn"] = fn
            made = [self._new_queue(st, queue, spec) for st in self._every_state()]
            self._consumer_defs[queue] = spec
            for st, q in zip(self._every_state(), made, strict=True):
                st.add_queue(q)
            return made[0]

        return decorate

    def on_startup(self, fn: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
        """Run ``await fn()`` on the loop each time it starts, before any periodic
        job or consumer (open a client or pool the views and jobs share).

        Hooks run in the order declared, in the app context. If one raises,
        the error is logged and ``start()`` (or the server's lifespan startup)
        fails with it. Declared while a loop runs (after ``AsyncBG(app)`` has
        autostarted it), the hook runs on it at once. Returns ``fn``.

        :raises TypeError: if ``fn`` is not an async function.
        """
        if not is_async_callable(fn):
            raise TypeError(f"on_startup needs an async function, got {fn!r}")
        self._startup_hooks.append(fn)
        for st in list(self._states.values()):
            # Declared after the loop started (``AsyncBG(app)`` autostarts):
            # it runs now, before this returns.
            st.run_startup_hook_now(fn)
        return fn

    def on_shutdown(self, fn: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
        """Run ``await fn()`` on the loop at each stop, after the drain (every job
        and item has ended or was cancelled) and before the loop closes.

        Hooks run in reverse order of declaration; errors are logged, not
        raised; together they get ``LoopThread.shutdown_hooks_timeout`` (5 s).
        Returns ``fn``.

        :raises TypeError: if ``fn`` is not an async function.
        """
        if not is_async_callable(fn):
            raise TypeError(f"on_shutdown needs an async function, got {fn!r}")
        self._shutdown_hooks.append(fn)
        return fn

    # -- handing work over ----------------------------------------------------------

    def _route(self, task: Task[Any, Any]) -> tuple[AppState, DurableRunner | None]:
        # The app's state, and its durable runner if this task's jobs are stored.
        st = self._state()
        return st, (st.durable if task.options.durable is not False else None)

    def _submit_task(
        self,
        task: Task[Any, T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        how: SubmitSettings = _PLAIN,
    ) -> Job[T]:
        st, durable = self._route(task)
        if how.connection is not None:
            _job, record = self._stored_job(st, task, args, kwargs, how)
            return self._in_transaction(task, durable).submit_in(how.connection, record)
        if durable is None:
            return st.dispatch(st.runner.create_for(task, args, kwargs))
        return durable.submit(*self._stored_job(st, task, args, kwargs, how))

    @staticmethod
    def _in_transaction(task: Task[Any, Any], durable: DurableRunner | None) -> DurableRunner:
        if durable is None:
            raise ValueError(
                f"task {task.name!r}: using(connection=...) writes the job in your "
                f"transaction, which needs a durable task on a backend that can "
                f"(ASYNCBG_BACKEND = 'postgresql://...')"
            )
        return durable

    def _submit_many(self, task: Task[Any, T], calls: list[tuple[Any, ...]]) -> list[Job[T]]:
        st, durable = self._route(task)
        if durable is None:
            jobs = [st.runner.create_for(task, args, {}) for args in calls]  # all checked first
            return [st.dispatch(job) for job in jobs]
        return durable.submit_many([self._stored_job(st, task, args, {}, _PLAIN) for args in calls])

    async def _submit_task_async(
        self,
        task: Task[Any, T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        how: SubmitSettings = _PLAIN,
    ) -> Job[T]:
        st, durable = self._route(task)
        if how.connection is not None:
            _job, record = self._stored_job(st, task, args, kwargs, how)
            return await self._in_transaction(task, durable).submit_in_async(how.connection, record)
        if durable is None:
            return st.dispatch(st.runner.create_for(task, args, kwargs))
        return await durable.submit_async(*self._stored_job(st, task, args, kwargs, how))

    @staticmethod
    def _stored_job(
        st: AppState,
        task: Task[Any, T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        how: SubmitSettings,
    ) -> tuple[Job[T], JobRecord]:
        # The handle and the record that stores it (the arguments checked
        # against the signature, then as JSON by the record); the loop started.
        job = st.runner.create_for(task, args, kwargs, check_json=False)
        if how.job_id is not None:
            job.id = how.job_id
        record = task_record(task, job, args, kwargs, how.key)
        st.ensure_started()
        return job, record

    # Task first: it is callable too, but its __call__ does not say whether it
    # is async. Then async functions before plain ones, as for task().
    @overload
    def submit(self, fn: Task[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Job[T]: ...

    @overload
    def submit(
        self, fn: Callable[P, Coroutine[Any, Any, T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> Job[T]: ...

    @overload
    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Job[T]: ...

    @overload
    def submit(self, fn: Coroutine[Any, Any, T], /) -> Job[T]: ...

    def submit(
        self, fn: Callable[..., Any] | Coroutine[Any, Any, Any], /, *args: Any, **kwargs: Any
    ) -> Job[Any]:
        """Run ``fn(*args, **kwargs)`` in the background; return its :class:`Job` at once.

        ``fn`` may be an async function (runs on the loop), a plain function
        (runs in a worker thread), a :class:`Task`, or a coroutine object.
        Thread-safe; starts the loop if it has not started yet. The arguments
        are checked against ``fn``'s signature here, by type checkers too.

        :raises NotRunning: if asyncbg has been stopped or is stopping.
        :raises TypeError: if ``fn`` is not callable, or the arguments do not
            fit its signature (such a job is never created, run or retried).
        """
        if isinstance(fn, Task):
            return self._submit_task(fn, args, kwargs)
        st = self._state()
        return st.dispatch(st.runner.create(fn, args, kwargs))

    @overload
    async def run(self, fn: Task[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T: ...

    @overload
    async def run(
        self, fn: Callable[P, Coroutine[Any, Any, T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T: ...

    @overload
    async def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T: ...

    @overload
    async def run(self, fn: Coroutine[Any, Any, T], /) -> T: ...

    async def run(
        self, fn: Callable[..., Any] | Coroutine[Any, Any, Any], /, *args: Any, **kwargs: Any
    ) -> Any:
        """Run ``fn`` as a job and await its result, from any event loop.

        Works in stock Flask async views (a new loop per request) and on the
        background loop itself.

        :raises NotRunning: if asyncbg has been stopped or is stopping.
        :raises TypeError: as :meth:`submit` does.
        :raises Exception: whatever the job raised; :class:`~asyncbg.JobTimedOut`,
            :class:`~asyncbg.JobCancelled`.
        """
        if isinstance(fn, Task):
            return await fn.run(*args, **kwargs)
        job = self.submit(fn, *args, **kwargs)
        return await job

    def enqueue(
        self,
        queue: str,
        item: Any,
        timeout: float | None = 0.0,
        *,
        key: str | None = None,
        job_id: str | None = None,
    ) -> None:
        """Put ``item`` on the named queue; thread-safe.

        If the queue is full, wait up to ``timeout`` seconds for room (``None``:
        no limit; never on the loop thread, where it raises at once). With a
        durable backend the item is stored (JSON) before this returns, and
        ``maxsize`` counts the items stored and not started; ``key`` and
        ``job_id`` make a retried enqueue idempotent (see :meth:`Task.using`).

        :raises UnknownQueue: if no consumer is registered for ``queue``.
        :raises QueueFull: if the queue stayed full for ``timeout``.
        :raises NotRunning: if asyncbg has been stopped or is stopping.
        :raises TypeError: if the queue is durable and the item is not JSON.
        :raises RuntimeError: for a durable queue, on the loop thread (an
            ``async def`` view or job), which cannot wait for the store: await
            :meth:`enqueue_async` there.
        """
        self._state().enqueue(
            queue, item, timeout, check_key(key, "key"), check_key(job_id, "job_id")
        )

    async def enqueue_async(
        self,
        queue: str,
        item: Any,
        timeout: float | None = None,
        *,
        key: str | None = None,
        job_id: str | None = None,
    ) -> None:
        """Put ``item`` on the named queue from any event loop, waiting for room
        (and, for a durable queue, for the store's commit).

        :raises UnknownQueue: if no consumer is registered for ``queue``.
        :raises QueueFull: if the queue stayed full for ``timeout`` seconds.
        :raises NotRunning: if asyncbg has been stopped or is stopping.
        :raises TypeError: if the queue is durable and the item is not JSON.
        """
        await self._state().enqueue_async(
            queue, item, timeout, check_key(key, "key"), check_key(job_id, "job_id")
        )

    # Positional arguments only (timeout= is call's own), hence a TypeVarTuple
    # rather than a ParamSpec, as in anyio.from_thread.run_sync. Async
    # functions always raise: flagged as deprecated, the one per-overload mark
    # type checkers report (mypy with --enable-error-code deprecated). Typed
    # None, not Never: after a Never call mypy silently stops checking the
    # rest of the function, and a None result is an error wherever it is used.
    #
    # A Task is listed first: its __call__ is typed Any, which would match the
    # async overload for sync tasks too. Its arguments go unchecked here.
    @overload
    def call(self, fn: Task[..., T], /, *args: Any, timeout: float | None = None) -> T: ...

    @overload
    @deprecated("bg.call() raises TypeError for async functions: await bg.run(fn, ...) instead")
    def call(self, fn: CoroutineFunction, /, *args: Any, timeout: float | None = None) -> None: ...

    @overload
    def call(self, fn: Callable[[*Ts], T], /, *args: *Ts, timeout: float | None = None) -> T: ...

    def call(self, fn: Callable[[*Ts], Any], /, *args: *Ts, timeout: float | None = None) -> Any:
        """Run the plain callable ``fn(*args)`` on the loop thread and return its value.

        The lock-free way for views to read or change state owned by the loop.
        ``fn`` must be quick and must not block.

        :raises TypeError: if ``fn`` is an async function, a :class:`Task` of
            one, or a coroutine object (use :meth:`run`).
        :raises NotRunning: if asyncbg has been stopped or is stopping.
        :raises TimeoutError: if the loop does not get to it within ``timeout``.
        """
        if inspect.iscoroutine(fn):
            fn.close()  # it can never run now: no "never awaited" warning later
            raise TypeError("bg.call() runs plain callables, not coroutines; await bg.run(coro)")
        if is_async_callable(fn):
            raise TypeError(
                f"bg.call() runs plain callables; await bg.run({_qualified_name(fn)}) instead"
            )
        st = self._state()
        st.ensure_started()
        return st.loop_thread.call(fn, *args, timeout=timeout)

    def get_job(self, job_id: str) -> Job[Any] | None:
        """The job with this id if it is live or still in the history, else None.

        With a durable backend, a job this process does not know is looked up
        in the store (submitted or run by another process): its handle's
        ``result()``, ``wait()`` and ``cancel()`` work from here. On the loop
        thread only this process's jobs are found: await :meth:`get_job_async`.

        :raises BackendError: if the store failed.
        """
        if not isinstance(job_id, str):
            return None
        st = self._state()
        job = st.history.get(job_id)
        durable = st.durable
        if durable is None or st.loop_thread.in_loop_thread() or _settled_here(job, durable):
            return job
        st.ensure_started()
        return st.loop_thread.submit(durable.lookup(job_id)).result(durable.ack_timeout)

    async def get_job_async(self, job_id: str) -> Job[Any] | None:
        """As :meth:`get_job`, from any event loop (the store too, on the loop thread).

        :raises BackendError: if the store failed.
        """
        if not isinstance(job_id, str):
            return None
        st = self._state()
        job = st.history.get(job_id)
        durable = st.durable
        if durable is None or _settled_here(job, durable):
            return job
        st.ensure_started()
        if st.loop_thread.in_loop_thread():
            return await durable.lookup(job_id)
        return await asyncio.wrap_future(st.loop_thread.submit(durable.lookup(job_id)))

    def get_queue(self, name: str) -> WorkQueue:
        """The :class:`WorkQueue` consumed under ``name``.

        :raises UnknownQueue: if no consumer is registered for it.
        """
        return self._state().get_queue(name)

    # -- async views on the shared loop -------------------------------------------------

    def _async_to_sync_for(
        self,
        app_ref: weakref.ReferenceType[Flask],
        func: Callable[..., Coroutine[Any, Any, T]],
    ) -> Callable[..., T]:
        # Flask calls app.async_to_sync for async views, async hooks, signal
        # receivers and teardown functions.
        app = app_ref()
        if app is None:
            raise RuntimeError("the Flask app this AsyncBG served has been garbage-collected")
        original = functools.partial(type(app).async_to_sync, app)
        st = self._states.get(app)
        if st is None:
            return original(func)
        lt = st.loop_thread

        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> T:
            if lt.in_loop_thread() and in_job_context_transition():
                # A background job's app context is being pushed or popped on
                # the loop, which cannot wait for itself: the async receiver or
                # teardown runs as stock Flask runs it for sync code, on a
                # short-lived loop of its own (in the job's context).
                return _run_on_a_private_loop(func, args, kwargs)
            if st.app is not None and st.app.config["ASYNCBG_ASYNC_VIEWS"] and not st._stopped:
                return async_view_bridge(func, lt, st.ensure_started)(*args, **kwargs)
            # Views off, or asyncbg stopped (an app context popped after the
            # stop still runs its async teardown): Flask's own way.
            return cast(T, original(func)(*args, **kwargs))

        return run

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
        answer), as Hypercorn's ``wsgi_max_body_size`` does. With several apps
        bound, call it in the app context of the one to serve.

        :raises RuntimeError: if no app is bound yet.
        :raises ValueError: if ``threads`` is below 1 or ``max_body_size`` below 0.
        """
        st = self._state()
        return AsyncBGASGI(
            self._pinned(st), st.require_app(), max_body_size=max_body_size, threads=threads
        )

    def serve_under_server(self) -> None:
        """Hand start and stop over to a server: its lifespan calls ``start()`` and
        ``stop()``, and SIGTERM or the first SIGINT no longer stop asyncbg by
        themselves (``bg.asgi_app()`` calls this at lifespan startup; call it
        yourself only when you drive the lifespan another way).
        """
        self._state().serve_under_server()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, *, periodic: bool = True) -> None:
        """Start the loop, run the ``on_startup`` hooks, open the queues, begin the
        periodic schedules. Idempotent.

        With ``periodic=False`` the schedules are not started (``flask asyncbg
        run`` uses that to run one job alone); a later ``start()`` does not start
        them either while the loop runs.

        :raises RuntimeError: if no app is bound, or uvloop is asked for and missing.
        :raises Exception: whatever an ``on_startup`` hook raised (the loop is stopped).
        """
        self._state().start(periodic=periodic)

    def stop(self, timeout: float | None = None) -> ShutdownReport:
        """Stop gracefully and return what happened (see :class:`ShutdownReport`).

        New work is refused at once with :class:`NotRunning`; schedules stop;
        running jobs and consumer items in hand get ``timeout`` seconds
        (default ``ASYNCBG_SHUTDOWN_TIMEOUT``) to finish, then are cancelled;
        items still queued are counted in the report and logged; then the
        ``on_shutdown`` hooks run. Idempotent, callable from any thread, a
        signal handler or a job (see :meth:`LoopThread.stop`). Outside an app
        context with several apps bound, it stops all of them (concurrently)
        and returns the sum of their reports.
        """
        if not has_app_context() and len(self._states) > 1:
            return self._stop_every_app(timeout)
        return self._state().stop(timeout)

    def _stop_every_app(self, timeout: float | None) -> ShutdownReport:
        # Outside an app context with several apps: stop them all, at once.
        states = list(self._states.values())
        for st in states:
            with st._start_lock:
                st._stopped = True
            st.loop_thread.request_stop(st.shutdown_timeout if timeout is None else timeout)
        total = ShutdownReport()
        for st in states:
            report = st.stop(timeout)
            total.completed += report.completed
            total.cancelled += report.cancelled
            total.still_queued += report.still_queued
            total.abandoned += report.abandoned
            total.released += report.released
            for name, n in report.queued_by_queue.items():
                total.queued_by_queue[name] = total.queued_by_queue.get(name, 0) + n
            total.duration = max(total.duration, report.duration)
            total.finished = total.finished and report.finished
        return total

    def wait_idle(self, timeout: float | None = None) -> None:
        """Block until every submitted job and queued item is done (for tests).

        :raises TimeoutError: if work is still going after ``timeout`` seconds.
        :raises RuntimeError: if called from the loop thread.
        """
        self._state().wait_idle(timeout)


class _PinnedAsyncBG(AsyncBG):
    """An :class:`AsyncBG` that always means one app (see ``AsyncBG._pinned``)."""

    _pinned_state: AppState

    def _state(self) -> AppState:
        return self._pinned_state


def _settled_here(job: Job[Any] | None, durable: DurableRunner) -> bool:
    # A handle this process can answer for without the store: final, or a job
    # that lives in memory only.
    return job is not None and (job.done() or job._runner is not durable)


def _run_on_a_private_loop(
    func: Callable[..., Coroutine[Any, Any, T]], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> T:
    context = contextvars.copy_context()
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(context.run(asyncio.run, func(*args, **kwargs)))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name="asyncbg-app-context-hook")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def _configure_logging(settings: Settings) -> None:
    """Make asyncbg's own lines (the shutdown report, warnings) visible without setup.

    As Flask does for ``app.logger``: when nothing would handle asyncbg's INFO
    records, add a handler on stderr. ``ASYNCBG_LOG_HANDLER = False`` turns it off;
    logging configured by the app (``basicConfig``, ``dictConfig``) wins.
    """
    if not settings.log_handler:
        return
    logger = logging.getLogger("asyncbg")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if _default_handler in logger.handlers or has_level_handler(logger):
        return
    logger.addHandler(_default_handler)


_default_handler = logging.StreamHandler()
_default_handler.setFormatter(
    logging.Formatter("[%(asctime)s] [%(process)d] %(levelname)s in %(name)s: %(message)s")
)


def _is_reloader_parent() -> bool:
    # `flask run --debug`: the reloader's parent watches files and restarts
    # its child, which serves the app (WERKZEUG_RUN_MAIN=true there).
    if os.environ.get("WERKZEUG_RUN_MAIN") == "true":
        return False
    import click

    ctx = click.get_current_context(silent=True)
    if ctx is None or ctx.info_name != "run":
        return False
    return not _autostart_allowed()


_parent_handler_installed = False


def _wait_for_the_reloaded_child_on_ctrl_c() -> None:
    """In the reloader's parent: let the child drain on the first Ctrl-C.

    The terminal sends Ctrl-C to both processes. Python's default handler
    makes the parent kill the child within about a second, mid-drain. This
    one lets the parent wait for its child (which drains for up to
    ``ASYNCBG_SHUTDOWN_TIMEOUT`` and exits), and a second Ctrl-C stops both
    at once. SIGTERM to the parent cannot be helped: Werkzeug's own handler
    kills the child at once (see docs/deploy.md).
    """
    global _parent_handler_installed
    if _parent_handler_installed or threading.current_thread() is not threading.main_thread():
        return
    _parent_handler_installed = True
    seen = False

    def on_sigint(signum: int, frame: object) -> None:
        nonlocal seen
        if seen:
            raise KeyboardInterrupt
        seen = True
        log.info("Ctrl-C: waiting for the app process to drain its jobs (Ctrl-C again to stop now)")

    signal.signal(signal.SIGINT, on_sigint)
    log.info(
        "under Werkzeug's reloader: Ctrl-C lets the app process drain its jobs (for up to "
        "ASYNCBG_SHUTDOWN_TIMEOUT), and so does a code reload; SIGTERM to this reloader "
        "process ends the app process at once, without draining (Werkzeug's own handler)"
    )


def _qualified_name(fn: object) -> str:
    # The bare function name: what people type in `flask asyncbg run NAME`.
    return getattr(fn, "__name__", None) or repr(fn)

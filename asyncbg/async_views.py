"""Flask ``async def`` views (and async hooks) run on the background loop.

:func:`async_view_bridge` is what ``app.async_to_sync`` returns when
``ASYNCBG_ASYNC_VIEWS`` is on: a plain callable that the request's thread calls
and that blocks until the coroutine has run on the loop. Three things make that
behave as Flask's stock asgiref bridge does, at the cost of a few microseconds:

- Context-variable changes the coroutine made (structlog's bound values,
  OpenTelemetry's current span) are applied to the request thread's context
  afterwards, so ``after_request``, teardown and the sync code after the call
  see them.
- While the request thread waits, it serves as the executor of the
  thread-sensitive ``asgiref.sync.sync_to_async`` calls (its default) that the
  coroutine makes, through asgiref's public
  ``ThreadSensitiveContext(executor=...)``: they run on the request's own idle
  thread instead of queueing on asgiref's one process-wide thread.
- The task is named after the request (``asyncbg:view:<endpoint> (<METHOD>
  <rule>)``), so the watchdog names the view that blocks the loop.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import logging
import queue
import sys
import threading
import types
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from flask import current_app, has_request_context, request

if TYPE_CHECKING:
    from .engine.loop import LoopThread

__all__ = ["VIEW_TASK_PREFIX", "RequestThreadExecutor", "async_view_bridge", "view_task_name"]

log = logging.getLogger("asyncbg")

P = ParamSpec("P")
T = TypeVar("T")

#: Tasks running a coroutine for a request are named with this prefix.
VIEW_TASK_PREFIX = "asyncbg:view:"
#: Tasks running a coroutine outside any request (``app.ensure_sync`` in a script).
ASYNC_TASK_PREFIX = "asyncbg:async:"

_MISSING = object()

_Call = tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class RequestThreadExecutor(concurrent.futures.Executor):
    """An executor whose calls run in the thread that waits for a view's coroutine.

    The loop submits (``run_in_executor``); the waiting thread runs the calls
    one at a time in :meth:`serve_until_woken` until :meth:`wake` is called,
    then refuses new ones. One call at a time on one thread is what asgiref
    asks of a ``ThreadSensitiveContext`` executor.
    """

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        #: Calls run so far.
        self.served = 0

    def submit(
        self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> concurrent.futures.Future[T]:
        """Queue ``fn(*args, **kwargs)`` for the waiting thread; return its future.

        :raises RuntimeError: if the thread has stopped waiting (the view's
            coroutine is over).
        """
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(
                    "the request thread no longer waits for this async view: its "
                    "coroutine has returned (start work that outlives the request "
                    "with bg.submit)"
                )
            self._calls.put((fut, fn, args, kwargs))
        return fut

    def wake(self, _done: object = None) -> None:
        """Make :meth:`serve_until_woken` return once the calls queued so far ran.

        Thread-safe; a done-callback of the future the thread waits for.
        """
        self._calls.put(None)

    def serve_until_woken(self) -> None:
        """Run submitted calls in this thread until :meth:`wake`; then close.

        Calls accepted before the close still run. asgiref's per-thread state
        that its calls leave behind (the loop to send a nested ``async_to_sync``
        to) is put back afterwards: this thread outlives the request.
        """
        calls = self._calls
        saved: dict[str, Any] | None = None
        try:
            while (call := calls.get()) is not None:
                if saved is None:
                    saved = _save_asgiref_thread_state()
                self._run(call)
        finally:
            with self._lock:
                self._closed = True
            for _ in range(1_000_000):  # bounded; only calls accepted before the close
                try:
                    call = calls.get_nowait()
                except queue.Empty:
                    break
                if call is not None:
                    self._run(call)
            if saved is not None:
                _restore_asgiref_thread_state(saved)

    def _run(self, call: _Call) -> None:
        fut, fn, args, kwargs = call
        del call
        self.served += 1
        if not fut.set_running_or_notify_cancel():
            return
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # the awaiting coroutine gets it, as from any executor
            fut.set_exception(exc)
        else:
            fut.set_result(result)


class _AsgirefHooks:
    """What asgiref offers this bridge, found out once: see :func:`_asgiref_hooks`."""

    __slots__ = ("own_vars", "storage_type", "thread_sensitive_context")

    def __init__(
        self,
        thread_sensitive_context: Any = None,
        own_vars: frozenset[contextvars.ContextVar[Any]] = frozenset(),
        storage_type: Any = None,
    ) -> None:
        #: ``asgiref.sync.ThreadSensitiveContext`` if it takes ``executor=``, else None.
        self.thread_sensitive_context = thread_sensitive_context
        #: Context variables entering and leaving that context changes: not the
        #: view's changes, so they are not applied to the request thread.
        self.own_vars = own_vars
        #: The type of ``asgiref.local.Local``'s storage, tagged with its thread.
        self.storage_type = storage_type


_hooks: _AsgirefHooks | None = None
_hooks_lock = threading.Lock()


_NO_HOOKS = _AsgirefHooks()


def _asgiref_hooks() -> _AsgirefHooks:
    global _hooks
    hooks = _hooks
    if hooks is None:
        if "asgiref.local" not in sys.modules:
            # Nothing has imported asgiref (asgiref.sync imports asgiref.local):
            # no sync_to_async call and no Local value can come from this view,
            # and the thread-sensitive context (~6 us a request) is not needed.
            return _NO_HOOKS
        with _hooks_lock:
            hooks = _hooks
            if hooks is None:
                hooks = _hooks = _find_asgiref_hooks()
    return hooks


def _find_asgiref_hooks() -> _AsgirefHooks:
    try:
        import asgiref.local
        import asgiref.sync
    except ImportError:  # no asgiref: nobody can call its sync_to_async either
        return _AsgirefHooks()
    storage_type = _local_storage_type(asgiref.local)
    context_cls = getattr(asgiref.sync, "ThreadSensitiveContext", None)
    try:
        takes_executor = context_cls is not None and (
            "executor" in inspect.signature(context_cls).parameters
        )
        own_vars = _vars_changed_by(context_cls) if takes_executor else None
    except Exception:
        own_vars = None
    if own_vars is None:
        log.info(
            "this asgiref (%s) has no usable ThreadSensitiveContext(executor=): "
            "thread-sensitive sync_to_async calls from async views run one at a time "
            "on asgiref's shared thread, not on the request's thread",
            getattr(asgiref, "__version__", "unknown version"),
        )
        return _AsgirefHooks(storage_type=storage_type)
    return _AsgirefHooks(context_cls, own_vars, storage_type)


def _vars_changed_by(context_cls: Any) -> frozenset[contextvars.ContextVar[Any]] | None:
    """Enter and leave ``context_cls(executor=...)`` in a scratch context; return the
    variables that differ afterwards, or None if it does not work that way.

    Entering and leaving with an executor awaits nothing (asgiref 3.13), so the
    coroutines are driven by hand; one that suspends means asgiref changed, and
    the bridge falls back rather than guess.
    """

    def probe() -> frozenset[contextvars.ContextVar[Any]] | None:
        before = contextvars.copy_context()
        cm = context_cls(executor=RequestThreadExecutor())
        if not (_completes(cm.__aenter__()) and _completes(cm.__aexit__(None, None, None))):
            return None
        after = contextvars.copy_context()
        return frozenset(v for v, value in after.items() if before.get(v, _MISSING) is not value)

    return contextvars.Context().run(probe)


def _completes(coro: Coroutine[Any, Any, Any]) -> bool:
    try:
        coro.send(None)
    except StopIteration:
        return True
    coro.close()
    return False


def _local_storage_type(local_module: Any) -> Any:
    # asgiref >= 3.10 tags Local data with its owner thread and re-homes it when
    # it moves context across threads on purpose; the bridge does the same. An
    # asgiref without that tag needs nothing.
    storage = getattr(local_module, "_Storage", None)
    try:
        probe = storage(0, {}) if storage is not None else None
    except Exception:
        return None
    if probe is None or probe.thread_id != 0 or probe.data != {}:
        return None
    return storage


def _save_asgiref_thread_state() -> dict[str, Any] | None:
    threadlocal = _asgiref_threadlocal()
    return None if threadlocal is None else dict(vars(threadlocal))


def _restore_asgiref_thread_state(saved: dict[str, Any] | None) -> None:
    threadlocal = _asgiref_threadlocal()
    if threadlocal is None or saved is None:
        return
    state = vars(threadlocal)
    state.clear()
    state.update(saved)


def _asgiref_threadlocal() -> Any:
    # sync_to_async's calls record the calling loop in this thread's
    # SyncToAsync.threadlocal, so that a nested async_to_sync goes back to it.
    # Left behind, a later async_to_sync in this pool thread, in another
    # request, would be sent to the asyncbg loop too (stock Flask's per-request
    # loop is closed by then, and asgiref falls back to a new one).
    sync = sys.modules.get("asgiref.sync")
    tl = getattr(getattr(sync, "SyncToAsync", None), "threadlocal", None)
    return tl if isinstance(tl, threading.local) else None


def _apply_context_changes(
    ctx: contextvars.Context, skip: frozenset[contextvars.ContextVar[Any]], storage_type: Any
) -> None:
    """Set in the current context every variable whose value in ``ctx`` differs."""
    for var, value in ctx.items():
        if var.get(_MISSING) is value or var in skip:
            continue
        if storage_type is not None and type(value) is storage_type:
            value = storage_type(threading.get_ident(), value.data)
        var.set(value)


async def _thread_sensitive_calls_to(
    executor: RequestThreadExecutor, context_cls: Any, coro: Coroutine[Any, Any, T]
) -> T:
    async with context_cls(executor=executor):
        return await coro


def view_task_name(func: Callable[..., Any]) -> str:
    """The name of the task that runs ``func`` for the current request.

    ``asyncbg:view:<endpoint> (<METHOD> <rule>)`` for the view itself, with
    `` in <qualified name>`` appended for another coroutine function run
    during the request (an async hook, a class-based view's method); outside a
    request, or before routing matched a rule, ``asyncbg:async:<qualified
    name>``. Never raw paths: the name is a metrics label.
    """
    if not has_request_context():
        return f"{ASYNC_TASK_PREFIX}{_qualname(func)}"
    req = request._get_current_object()  # type: ignore[attr-defined]
    rule = req.url_rule
    if rule is None:
        return f"{ASYNC_TASK_PREFIX}{_qualname(func)}"
    # Rules are unhashable: keyed by identity, and the rule kept to check the hit.
    key = (id(rule), req.method, func)
    cached = _names.get(key)
    if cached is not None and cached[0] is rule:
        return cached[1]
    name = f"{VIEW_TASK_PREFIX}{rule.endpoint} ({req.method} {rule.rule})"
    if current_app.view_functions.get(rule.endpoint) is not func:
        name = f"{name} in {_qualname(func)}"
    # Plain functions only: a class-based view's bound method is new every request.
    if isinstance(func, types.FunctionType) and len(_names) < _NAMES_CACHED:
        _names[key] = (rule, name)
    return name


_NAMES_CACHED = 4096
_names: dict[tuple[int, str, Callable[..., Any]], tuple[Any, str]] = {}


def _qualname(func: Callable[..., Any]) -> str:
    return getattr(func, "__qualname__", None) or repr(func)


def async_view_bridge(
    func: Callable[..., Coroutine[Any, Any, T]],
    loop_thread: LoopThread,
    ensure_started: Callable[[], object],
) -> Callable[..., T]:
    """Wrap the coroutine function ``func`` into a plain callable that runs it on
    ``loop_thread``'s loop, in a copy of the caller's context, and returns its result.

    See the module docstring for what it does beyond that. The callable raises
    what the coroutine raised, and also :class:`RuntimeError` when called from
    the loop thread itself (it would deadlock) and
    :class:`~asyncbg.NotRunning` when the loop is stopped or stops before the
    coroutine ends.
    """

    @functools.wraps(func)
    def run_on_loop(*args: Any, **kwargs: Any) -> T:
        ensure_started()
        if loop_thread.in_loop_thread():
            raise RuntimeError(
                f"async view {func.__qualname__} was called from the asyncbg loop thread "
                "(a request dispatched from inside a job?); it would deadlock"
            )
        name = view_task_name(func)
        hooks = _asgiref_hooks()
        # The copied context carries Flask's request and app contexts to the loop.
        ctx = contextvars.copy_context()
        coro = func(*args, **kwargs)
        context_cls = hooks.thread_sensitive_context
        if context_cls is None:
            fut = loop_thread.submit(coro, name=name, context=ctx)
            try:
                return fut.result()
            finally:
                if fut.done():
                    _apply_context_changes(ctx, hooks.own_vars, hooks.storage_type)
        executor = RequestThreadExecutor()
        try:
            fut = loop_thread.submit(
                _thread_sensitive_calls_to(executor, context_cls, coro), name=name, context=ctx
            )
        except BaseException:
            coro.close()  # submit closed the wrapper, which never started it
            raise
        try:
            fut.add_done_callback(executor.wake)
            run = fut._run
            with run.waiting_on(fut) if run is not None else contextlib.nullcontext():
                executor.serve_until_woken()
            return fut.result()
        finally:
            if fut.done():
                _apply_context_changes(ctx, hooks.own_vars, hooks.storage_type)

    return run_on_loop

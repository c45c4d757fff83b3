"""Job records, their bounded history, and the runner that executes them on the loop.

A :class:`Job` is created in the submitting thread and changes state only on
the loop thread afterwards; callers wait on it with :meth:`Job.result` (any
thread but the loop's) or ``await job`` (any event loop). No
``concurrent.futures.Future`` is made unless somebody waits.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import enum
import functools
import inspect
import logging
import math
import numbers
import os
import sys
import threading
import time
import types
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeVar, cast, overload

from ..errors import JobCancelled, JobTimedOut, NotRunning
from .jsonsafe import json_safe
from .logthrottle import FlushTimer, LogThrottle, describe_exception

if TYPE_CHECKING:
    from .loop import LoopThread

__all__ = [
    "Job",
    "JobHistory",
    "JobRunner",
    "JobStatus",
    "Progress",
    "Task",
    "TaskDecorator",
    "TaskOptions",
    "current_job",
]

log = logging.getLogger("asyncbg")

T = TypeVar("T")
P = ParamSpec("P")


class JobStatus(enum.StrEnum):
    """Where a job is in its life. The last four are final."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"


_FINAL = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.TIMED_OUT}
)

_current_job: contextvars.ContextVar[Job[Any] | None] = contextvars.ContextVar(
    "asyncbg_current_job", default=None
)

# Job ids: random version-4 UUIDs as 32 hex digits, like uuid4().hex, but cut
# from a pool of os.urandom bytes. uuid4() makes a getrandom() system call per
# job, which releases the GIL: with a busy thread in the process the submitting
# view then waits a whole switch interval (5 ms) to get it back, and the call
# costs 1.8 us even when idle. list.pop() and extend() are atomic under the
# GIL, so concurrent submitters need no lock; a fork empties the pool so that
# parent and child never hand out the same ids.
_ID_BATCH = 256
_id_pool: list[str] = []


def _new_job_id() -> str:
    try:
        return _id_pool.pop()
    except IndexError:
        raw = bytearray(os.urandom(16 * _ID_BATCH))
        for i in range(0, len(raw), 16):
            raw[i + 6] = (raw[i + 6] & 0x0F) | 0x40  # version 4
            raw[i + 8] = (raw[i + 8] & 0x3F) | 0x80  # RFC 4122 variant
        hexed = raw.hex()
        _id_pool.extend(hexed[i : i + 32] for i in range(32, len(hexed), 32))
        return hexed[:32]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_id_pool.clear)

# Guards done-callbacks registration against the loop finishing the job; only
# taken when somebody waits, and once per finish.
_callbacks_lock = threading.Lock()

_runners: weakref.WeakSet[JobRunner] = weakref.WeakSet()


def _reset_after_fork() -> None:
    # Another thread may have held the lock at fork time; the parent's jobs
    # are the parent's: the child neither runs nor waits for them.
    global _callbacks_lock
    _callbacks_lock = threading.Lock()
    for runner in list(_runners):
        runner._reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def current_job() -> Job[Any]:
    """Return the job whose code is running (works in sync jobs' threads too).

    :raises RuntimeError: if called outside a job.
    """
    job = _current_job.get()
    if job is None:
        raise RuntimeError("asyncbg.current_job() called outside a running job")
    return job


@dataclass(frozen=True)
class TaskOptions:
    """How a job runs: per-attempt ``timeout`` (seconds), ``retries`` after the
    first attempt, and exponential backoff ``retry_backoff * 2**n`` capped at
    ``retry_backoff_max``."""

    timeout: float | None = None
    retries: int = 0
    retry_backoff: float = 1.0
    retry_backoff_max: float = 60.0

    def __post_init__(self) -> None:
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout!r}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries!r}")
        if self.retry_backoff < 0 or self.retry_backoff_max < 0:
            raise ValueError("retry_backoff and retry_backoff_max must be >= 0")

    def backoff(self, attempt: int) -> float:
        """Delay before retry number ``attempt`` (1-based)."""
        return float(min(self.retry_backoff_max, self.retry_backoff * 2.0 ** (attempt - 1)))


_DEFAULT_OPTIONS = TaskOptions()


@dataclass(frozen=True)
class Progress:
    """A job's last reported progress."""

    done: float
    total: float | None = None
    message: str | None = None

    @property
    def fraction(self) -> float | None:
        """``done / total`` clamped to [0, 1], or None without a total."""
        if not self.total:
            return None
        return max(0.0, min(1.0, self.done / self.total))


class Job(Generic[T]):
    """One unit of background work and its outcome.

    Created by :meth:`AsyncBG.submit <asyncbg.AsyncBG.submit>` or
    ``task.submit(...)``. Its state is changed only on the loop thread.
    """

    __slots__ = (
        "__weakref__",
        "_args",
        "_callbacks",
        "_cancel_requested",
        "_exception",
        "_fn",
        "_is_async",
        "_kwargs",
        "_result",
        "_runner",
        "_task",
        "attempts",
        "created_at",
        "finished_at",
        "id",
        "name",
        "options",
        "progress",
        "started_at",
        "status",
    )

    def __init__(
        self,
        runner: JobRunner,
        fn: Callable[..., Any] | Coroutine[Any, Any, T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        name: str,
        options: TaskOptions,
        is_async: bool,
    ) -> None:
        self.id: str = _new_job_id()
        self.name = name
        self.status = JobStatus.PENDING
        self.options = options
        self.created_at: float = time.time()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.attempts = 0
        self.progress: Progress | None = None
        self._runner = runner
        self._fn = fn
        self._args = args
        self._kwargs = kwargs
        self._is_async = is_async
        self._result: T | None = None
        self._exception: BaseException | None = None
        self._task: asyncio.Task[None] | None = None
        # () until somebody waits, None once done: no allocation on the hot path.
        self._callbacks: tuple[Callable[[Job[T]], object], ...] | None = ()
        self._cancel_requested = False

    def __repr__(self) -> str:
        return f"<Job {self.name} {self.id} {self.status.value}>"

    def done(self) -> bool:
        """True once the job has reached a final status."""
        return self.status in _FINAL

    def set_progress(
        self, done: float, total: float | None = None, message: str | None = None
    ) -> None:
        """Record progress (``done`` out of ``total``, with an optional message).

        Call it from the job's own code, usually as ``current_job().set_progress(...)``.
        Numbers are stored as plain floats (NumPy and Decimal numbers included);
        a message longer than 1,000 characters is cut.

        :raises TypeError: if ``done`` or ``total`` is not a real number, or
            ``message`` is not a string.
        :raises ValueError: if ``done`` or ``total`` is not finite (NaN, infinity).
        """
        self.progress = Progress(
            _finite("done", done),
            None if total is None else _finite("total", total),
            _bounded_message(message),
        )

    def add_done_callback(self, fn: Callable[[Job[T]], object]) -> None:
        """Call ``fn(job)`` once the job is done: at once if it already is (in this
        thread), otherwise on the loop thread when it finishes. ``fn`` must not block."""
        with _callbacks_lock:
            callbacks = self._callbacks
            if callbacks is not None:
                self._callbacks = (*callbacks, fn)
                return
        fn(self)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job is done or ``timeout`` passes; return :meth:`done`.

        :raises RuntimeError: if called from the loop thread before the job is done.
        """
        if self.done():
            return True
        self._runner.loop_thread.check_not_loop_thread("Job.wait()/Job.result()")
        event = threading.Event()
        self.add_done_callback(lambda _job: event.set())
        return event.wait(timeout)

    def result(self, timeout: float | None = None) -> T:
        """Wait up to ``timeout`` seconds and return the job's return value.

        :raises TimeoutError: if the job is not done within ``timeout`` (the job goes on).
        :raises JobTimedOut: if the job ran past its own timeout.
        :raises JobCancelled: if the job was cancelled.
        :raises RuntimeError: if called from the loop thread before the job is done.
        :raises Exception: whatever the job raised, re-raised.
        """
        if not self.wait(timeout):
            raise TimeoutError(f"job {self.name} {self.id} did not finish within {timeout}s")
        return self._outcome()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait like :meth:`result`; return the job's exception instead of raising it."""
        try:
            self.result(timeout)
        except (JobCancelled, JobTimedOut) as exc:
            return exc
        except TimeoutError:
            raise
        except Exception:
            return self._exception
        return None

    def _outcome(self) -> T:
        status = self.status
        if status is JobStatus.SUCCEEDED:
            return cast(T, self._result)
        if status is JobStatus.CANCELLED:
            if isinstance(self._exception, JobCancelled):  # abandoned: it says why
                raise self._exception
            raise JobCancelled(f"job {self.name} {self.id} was cancelled")
        if status is JobStatus.TIMED_OUT:
            raise JobTimedOut(
                f"job {self.name} {self.id} timed out after {self.options.timeout}s "
                f"({self.attempts} attempt(s))"
            )
        assert self._exception is not None
        raise self._exception

    async def wait_async(self) -> T:
        """Await the job's outcome from any event loop; same results as :meth:`result`."""
        if not self.done():
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[None] = loop.create_future()
            lt = self._runner.loop_thread
            if lt.in_loop_thread():
                self.add_done_callback(lambda _job: set_if_pending(waiter))
            else:

                def wake(_job: Job[T]) -> None:
                    with contextlib.suppress(RuntimeError):  # the caller's loop closed
                        loop.call_soon_threadsafe(set_if_pending, waiter)

                self.add_done_callback(wake)
            await waiter
        return self._outcome()

    def __await__(self) -> Generator[Any, None, T]:
        return self.wait_async().__await__()

    def cancel(self) -> bool:
        """Ask for the job to be cancelled; thread-safe, returns at once.

        A pending job never starts; a running one gets ``CancelledError`` at its
        next ``await`` (a sync job's thread cannot be interrupted: it is marked
        cancelled and its result discarded). Returns False if the job had
        already finished or the loop is gone.
        """
        if self.done():
            return False
        self._cancel_requested = True
        lt = self._runner.loop_thread
        if lt.in_loop_thread():
            self._runner._cancel(self)
            return True
        try:
            lt.post(self._runner._cancel, self)
        except NotRunning:
            return False
        return True

    def to_dict(
        self,
        *,
        include_result: bool = True,
        include_error: bool | None = None,
        include_args: bool = False,
    ) -> dict[str, Any]:
        """A JSON-safe dict of the job's state (results and errors as reprs when
        they are not plain JSON values; left out with ``include_result=False``).

        ``include_error`` (default: same as ``include_result``) adds the error
        (``"Type: message"``); ``include_args`` adds ``args`` and ``kwargs``,
        known only until the job finishes (None afterwards).
        """
        progress = self.progress
        data: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "status": self.status.value,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "duration": (
                None
                if self.started_at is None
                else (self.finished_at or time.time()) - self.started_at
            ),
            "attempts": self.attempts,
            "progress": None
            if progress is None
            else {
                "done": progress.done,
                "total": progress.total,
                "message": progress.message,
                "fraction": progress.fraction,
            },
        }
        if include_result:
            data["result"] = json_safe(self._result) if self.status is JobStatus.SUCCEEDED else None
        if include_result if include_error is None else include_error:
            exc = self._exception
            data["error"] = None if exc is None else f"{type(exc).__name__}: {exc}"
        if include_args:
            args, kwargs = self._args, self._kwargs
            data["args"] = None if args is None else json_safe(list(args))
            data["kwargs"] = None if kwargs is None else json_safe(dict(kwargs))
        return data

    # -- loop thread only --------------------------------------------------------

    def _finish(
        self,
        status: JobStatus,
        result: Any = None,
        exc: BaseException | None = None,
        *,
        count: bool = True,
    ) -> bool:
        # The one transition to a final status, taken once: a job abandoned at
        # stop may still end later, and that second end must change nothing.
        with _callbacks_lock:
            callbacks = self._callbacks
            if callbacks is None:
                return False
            self._callbacks = None
            progress = self.progress
            if status is JobStatus.SUCCEEDED and progress is not None and progress.total:
                # Success means all of it was done, whatever the last report said;
                # the message stays (it is the job's own last word).
                self.progress = Progress(progress.total, progress.total, progress.message)
            self.status = status
            self._result = result
            self._exception = exc
            self.finished_at = time.time()
        fn = self._fn
        if inspect.iscoroutine(fn) and self.started_at is None:
            fn.close()  # never awaited: close it rather than leave a warning
        self._fn = self._args = self._kwargs = None  # type: ignore[assignment]
        self._task = None
        for cb in callbacks:
            try:
                cb(self)
            except Exception:
                log.exception("done callback %r of %r failed", cb, self)
        if count:
            self._runner._finished(self)
        return True


_MAX_MESSAGE = 1000

#: Seconds during which further failures of one task are counted, not logged.
FAILURE_LOG_INTERVAL = 60.0


def _finite(what: str, value: object) -> float:
    # Progress is served as JSON: only finite plain floats survive that.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"progress {what} must be a real number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"progress {what} must be finite, got {number!r}")
    return number


def _bounded_message(message: object) -> str | None:
    if message is None:
        return None
    if not isinstance(message, str):
        raise TypeError(f"progress message must be a string, got {type(message).__name__}")
    if len(message) > _MAX_MESSAGE:
        return message[: _MAX_MESSAGE - 1] + "\u2026"
    return message


def _finish_if_never_ran(job: Job[Any], task: asyncio.Task[None]) -> None:
    # Without eager start (uvloop, or a job started from inside a task on 3.11)
    # a task cancelled before its first step never enters _execute, which
    # would otherwise record the outcome.
    if not job.done():
        job._finish(JobStatus.CANCELLED)


class CloseTolerant:
    """Wrap a context manager a coroutine holds across awaits, so that the
    coroutine can be closed from anywhere.

    A task abandoned at stop (it ignored cancellation) is closed later by the
    garbage collector, in another :mod:`contextvars` context than the one its
    context manager was entered in: Flask's app context then fails to pop
    (``LookupError``) and the interpreter prints a traceback at exit. On
    ``GeneratorExit`` that failure is dropped; everything else passes through.
    """

    __slots__ = ("_cm",)

    def __init__(self, cm: contextlib.AbstractContextManager[Any]) -> None:
        self._cm = cm

    def __enter__(self) -> Any:
        return self._cm.__enter__()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: Any) -> Any:
        if et is GeneratorExit:
            with contextlib.suppress(Exception):
                return self._cm.__exit__(et, ev, tb)
            return False
        return self._cm.__exit__(et, ev, tb)


def set_if_pending(fut: asyncio.Future[None]) -> None:
    """Resolve ``fut`` with None unless it is already done (a waiter's wake-up)."""
    if not fut.done():
        fut.set_result(None)


def is_async_callable(fn: object) -> bool:
    """True if calling ``fn`` returns an awaitable (sees through ``functools.partial``
    and :class:`Task`)."""
    while True:
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif isinstance(fn, Task):
            # Task.__call__ is a plain method that returns the coroutine.
            return fn.is_async
        else:
            break
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - async callable objects
    )


_EMPTY = inspect.Parameter.empty
_NO_LIMIT = sys.maxsize


class Arguments:
    """What a callable accepts, so that a call's arguments can be checked at submit.

    :meth:`check` first runs a handful of comparisons that are sure to accept
    only what ``inspect.Signature.bind`` accepts, and calls ``bind`` (several
    microseconds) only for what they cannot vouch for, to raise its error.
    """

    __slots__ = (
        "by_keyword",
        "max_positional",
        "min_positional",
        "positional_names",
        "positional_only",
        "required_keywords",
        "required_positional_only",
        "signature",
        "var_keyword",
    )

    def __init__(self, signature: inspect.Signature) -> None:
        self.signature = signature
        kinds = inspect.Parameter
        positional = [
            p
            for p in signature.parameters.values()
            if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)
        ]
        kinds_present = {p.kind for p in signature.parameters.values()}
        self.positional_names = tuple(p.name for p in positional)
        self.positional_only = sum(p.kind is kinds.POSITIONAL_ONLY for p in positional)
        self.required_positional_only = frozenset(
            p.name for p in positional if p.kind is kinds.POSITIONAL_ONLY and p.default is _EMPTY
        )
        self.min_positional = max(
            (i + 1 for i, p in enumerate(positional) if p.default is _EMPTY), default=0
        )
        self.max_positional = (
            _NO_LIMIT if kinds.VAR_POSITIONAL in kinds_present else len(positional)
        )
        # Keyword name -> position; keyword-only names sort after every position.
        self.by_keyword = {
            p.name: i for i, p in enumerate(positional) if p.kind is kinds.POSITIONAL_OR_KEYWORD
        }
        keyword_only = [p for p in signature.parameters.values() if p.kind is kinds.KEYWORD_ONLY]
        self.by_keyword.update((p.name, _NO_LIMIT) for p in keyword_only)
        self.required_keywords = frozenset(p.name for p in keyword_only if p.default is _EMPTY)
        self.var_keyword = kinds.VAR_KEYWORD in kinds_present

    @property
    def accepts_anything(self) -> bool:
        """True for ``(*args, **kwargs)``: no call can fail to bind."""
        return (
            not self.positional_names
            and self.max_positional == _NO_LIMIT
            and self.var_keyword
            and not self.required_keywords
        )

    def fits(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """True if ``fn(*args, **kwargs)`` certainly binds; False if it may not."""
        n = len(args)
        if n > self.max_positional:
            return False
        if not kwargs:
            return n >= self.min_positional and not self.required_keywords
        get = self.by_keyword.get
        for key in kwargs:
            position = get(key)
            if position is None:
                if not self.var_keyword:
                    return False
            elif position < n:  # given twice
                return False
        if n < self.min_positional:
            if n < self.positional_only:
                return False
            for name in self.positional_names[n : self.min_positional]:
                if name not in kwargs:
                    return False
        return kwargs.keys() >= self.required_keywords

    def check(self, args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> None:
        """Return if ``fn(*args, **kwargs)`` binds.

        :raises TypeError: naming ``name`` and the signature, if it does not.
        """
        if self.fits(args, kwargs):
            return
        # Positional-only parameters first, in our own words: Signature.bind
        # words them differently across Pythons, and 3.13's binds a
        # positional-only name given as a keyword into **kwargs, which the
        # call itself refuses.
        given_only = self.positional_names[: self.positional_only]
        if not self.var_keyword:
            for key in kwargs:
                if key in given_only:
                    raise self._error(name, f"{key!r} is positional-only, given as a keyword")
        for i, param in enumerate(given_only):
            if i >= len(args) and param in self.required_positional_only:
                raise self._error(name, f"missing a required positional argument: {param!r}")
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise self._error(name, str(exc)) from None

    def _error(self, name: str, why: str) -> TypeError:
        # Annotations left out: under `from __future__ import annotations`
        # they are quoted strings, noise in a one-line error.
        sig = self.signature
        bare = sig.replace(
            parameters=[p.replace(annotation=_EMPTY) for p in sig.parameters.values()],
            return_annotation=_EMPTY,
        )
        return TypeError(f"wrong arguments for {name}{bare}: {why}")


#: Arguments per code object: a closure or lambda made anew for every call
#: shares its code, so it is looked up, not inspected, each time. Bounded by
#: the program's code objects; cleared if code made at run time floods it.
_arguments_cache: dict[types.CodeType, tuple[int, Arguments | None]] = {}
_ARGUMENTS_CACHE_SIZE = 1024


def arguments_of(fn: Callable[..., Any]) -> Arguments | None:
    """What ``fn`` accepts, or None if any call binds or it cannot be told.

    Uses ``fn``'s own signature, not that of a function it wraps
    (``functools.wraps``): a wrapper may pass its callee more than it takes.
    Cached per code object for plain functions.
    """
    if type(fn) is not types.FunctionType:
        return _inspect_arguments(fn)
    code = fn.__code__
    defaults = fn.__defaults__
    n_defaults = len(defaults) if defaults else 0
    cached = _arguments_cache.get(code)
    if cached is not None and cached[0] == n_defaults:  # same code, same defaults
        return cached[1]
    arguments = _inspect_arguments(fn)
    if len(_arguments_cache) >= _ARGUMENTS_CACHE_SIZE:
        _arguments_cache.clear()
    _arguments_cache[code] = (n_defaults, arguments)
    return arguments


def _inspect_arguments(fn: Callable[..., Any]) -> Arguments | None:
    try:
        signature = inspect.signature(fn, follow_wrapped=False)
    except (TypeError, ValueError):  # builtins without a signature, odd callables
        return None
    arguments = Arguments(signature)
    return None if arguments.accepts_anything else arguments


def check_arguments(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], name: str
) -> None:
    """Raise if ``fn(*args, **kwargs)`` would fail to bind (for ad hoc jobs).

    Bound methods and ``functools.partial`` objects are checked through the
    function they call, so that a new one per call costs no inspection.

    :raises TypeError: naming ``name``, if the arguments do not fit.
    """
    if type(fn) is not types.FunctionType:
        while isinstance(fn, functools.partial):
            args = (*fn.args, *args)
            kwargs = {**fn.keywords, **kwargs}
            fn = fn.func
        if type(fn) is types.MethodType and type(fn.__func__) is types.FunctionType:
            args = (fn.__self__, *args)
            fn = fn.__func__
    arguments = arguments_of(fn)
    if arguments is not None:
        arguments.check(args, kwargs, name)


class JobHistory:
    """Every live job plus finished ones, bounded by count and by age.

    Adding happens in submitting threads, finishing on the loop; both are single
    dict/deque operations, atomic under the GIL.
    """

    def __init__(self, max_size: int = 1000, max_age: float = 3600.0) -> None:
        if max_size < 0 or max_age < 0:
            raise ValueError("job history size and age must be >= 0")
        self.max_size = max_size
        self.max_age = max_age
        self._jobs: dict[str, Job[Any]] = {}
        self._finished: collections.deque[Job[Any]] = collections.deque()

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, job: Job[Any]) -> None:
        """Record a new job."""
        self._jobs[job.id] = job

    def forget_unfinished(self) -> None:
        """Drop every job not yet final (in a forked child: they are the parent's)."""
        for job_id, job in list(self._jobs.items()):
            if not job.done():
                self._jobs.pop(job_id, None)

    def discard(self, job: Job[Any]) -> None:
        """Forget a job that never ran (its submission was refused)."""
        self._jobs.pop(job.id, None)

    def finished(self, job: Job[Any]) -> None:
        """Move ``job`` into the bounded part of the history."""
        self._finished.append(job)
        self.trim()

    def trim(self) -> None:
        """Forget finished jobs beyond the count or older than the age bound."""
        finished, jobs = self._finished, self._jobs
        while len(finished) > self.max_size:
            jobs.pop(finished.popleft().id, None)
        horizon = time.time() - self.max_age
        while finished and (finished[0].finished_at or 0.0) < horizon:
            jobs.pop(finished.popleft().id, None)

    def get(self, job_id: str) -> Job[Any] | None:
        """The job with that id, if it is live or still in the history."""
        job = self._jobs.get(job_id)
        finished_at = None if job is None else job.finished_at
        if finished_at is not None and finished_at < time.time() - self.max_age:
            return None  # expired, not trimmed yet
        return job

    def jobs(self) -> list[Job[Any]]:
        """A snapshot of all known jobs, oldest first; safe from any thread.

        Jobs past the age bound are left out (they are forgotten by the next
        :meth:`trim` on the loop; trimming here would race with it).
        """
        horizon = time.time() - self.max_age
        return [
            job
            for job in list(self._jobs.values())
            if job.finished_at is None or job.finished_at >= horizon
        ]


class JobRunner:
    """Runs jobs on a :class:`~asyncbg.LoopThread`: context, timeout, retries, outcome.

    :param context: a factory for the context manager every job runs in (the
        Flask glue passes ``app.app_context``).
    """

    def __init__(
        self,
        loop_thread: LoopThread,
        history: JobHistory,
        *,
        context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> None:
        self.loop_thread = loop_thread
        self.history = history
        self.context = context
        self.active = 0  # started and not finished; loop thread only
        self.finish_hooks: list[Callable[[Job[Any]], object]] = []
        self._idle_hooks: list[Callable[[], object]] = []
        #: Which failures of a task are logged in full (the first per minute).
        self.log_throttle = LogThrottle(FAILURE_LOG_INTERVAL)
        self._flush_timer = FlushTimer(self.log_throttle)
        loop_thread.on_abandon(self._start, self._abandon_start)
        _runners.add(self)

    def _reset_after_fork(self) -> None:
        self.active = 0
        self.history.forget_unfinished()

    def create(
        self,
        fn: Callable[..., Any] | Coroutine[Any, Any, Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        name: str | None = None,
        options: TaskOptions = _DEFAULT_OPTIONS,
        is_async: bool | None = None,
        check_args: bool = True,
    ) -> Job[Any]:
        """Make a job record for ``fn(*args, **kwargs)`` (or a coroutine object).

        The arguments are bound to ``fn``'s signature first, so that a call
        that cannot work fails here, once, instead of in every attempt
        (``check_args=False`` when the caller has checked them already).

        :raises TypeError: if ``fn`` is neither callable nor a coroutine, or the
            arguments do not fit its signature.
        :raises ValueError: if a coroutine object is given with retries (it can run once).
        """
        if inspect.iscoroutine(fn):
            if args or kwargs:
                raise TypeError("pass either a coroutine object or a function with its arguments")
            if options.retries:
                raise ValueError("a coroutine object runs once; submit its function to retry")
            is_async = True
            name = name or getattr(fn, "__qualname__", "coroutine")
        elif not callable(fn):
            raise TypeError(f"a job needs a callable or a coroutine, got {fn!r}")
        elif is_async is None:
            is_async = is_async_callable(fn)
        if name is None:
            name = getattr(fn, "__qualname__", None) or repr(fn)
        if check_args and callable(fn):
            check_arguments(fn, args, kwargs, name)
        return Job(self, fn, args, kwargs, name, options, is_async)

    def submit(self, job: Job[Any]) -> Job[Any]:
        """Hand ``job`` to the loop (thread-safe) and return it.

        :raises NotRunning: if the loop is not running or is stopping.
        """
        # Recorded first: the loop may finish (and trim) the job before post returns.
        self.history.add(job)
        try:
            self.loop_thread.post(self._start, job)
        except NotRunning:
            self.history.discard(job)
            raise
        return job

    # -- loop thread -------------------------------------------------------------

    def _start(self, job: Job[Any]) -> None:
        if job.done():  # cancelled while pending
            return
        if job._cancel_requested:  # cancel() came before the loop took the job
            self._cancel(job)
            return
        self.active += 1
        task = self.loop_thread.spawn(self._execute(job), name=f"asyncbg:job:{job.name}")
        # The first step may have run eagerly: a job that finished there keeps no task.
        if not task.done():
            job._task = task
            if job.status is JobStatus.PENDING:
                # Not started eagerly: nothing records the outcome if the task
                # is cancelled before its first step. (Once _execute runs, it does.)
                task.add_done_callback(functools.partial(_finish_if_never_ran, job))

    def _cancel(self, job: Job[Any]) -> None:
        if job.done():
            return
        if job._task is None and job.status is JobStatus.RUNNING:
            # The job cancels itself from its eager first step, before spawn()
            # returned its task: cancel once the step has ended.
            asyncio.get_running_loop().call_soon(self._cancel, job)
            return
        if job._task is not None:
            job._task.cancel()
        else:
            if inspect.iscoroutine(job._fn):
                job._fn.close()
            self.active += 1  # balanced by _finished
            job._finish(JobStatus.CANCELLED)

    def _abandon_start(self, job: Job[Any]) -> bool:
        # At stop, for a job still waiting in the loop's inbox: it never starts.
        if job.done():
            return False
        self.active += 1  # balanced by _finished
        job._finish(JobStatus.CANCELLED)
        return True

    def log_failure(
        self, kind: str, name: str, exc: BaseException, msg: str, *args: object, level: int = 40
    ) -> None:
        """Log a failure of ``name`` through the throttle: the first in full, then
        a count per interval. Loop thread only."""
        self._flush_timer.throttle = self.log_throttle  # it may have been replaced
        if not self.log_throttle.failure(log, kind, name, exc, msg, *args, level=level):
            with contextlib.suppress(RuntimeError):  # no loop: a coroutine closed late
                self._flush_timer.arm(asyncio.get_running_loop())

    def flush_logs(self) -> None:
        """Say every failure count not logged yet (at stop)."""
        self._flush_timer.close()
        self.log_throttle.flush(force=True)

    def settle_unfinished(self, why: str, *, from_loop: bool = True) -> int:
        """Mark every job not yet final as cancelled (``why`` says how it was
        abandoned) and wake its waiters; return how many there were.

        For the end of a loop that left jobs behind: a job that ignored
        cancellation, or whose loop died or is blocked for good. From another
        thread than the loop's (``from_loop=False``) the runner's counters and
        hooks are left alone.
        """
        settled = 0
        for job in self.history.jobs():
            if job.done():
                continue
            error = JobCancelled(f"job {job.name} {job.id} was abandoned: {why}")
            if job._finish(JobStatus.CANCELLED, exc=error, count=from_loop):
                settled += 1
        return settled

    def _finished(self, job: Job[Any]) -> None:
        self.active -= 1
        self.history.finished(job)
        for hook in self.finish_hooks:
            try:
                hook(job)
            except Exception:
                log.exception("job finish hook %r failed", hook)
        if not self.active:
            for idle in self._idle_hooks:
                idle()

    async def _execute(self, job: Job[Any]) -> None:
        _current_job.set(job)
        job.status = JobStatus.RUNNING
        job.started_at = time.time()
        options = job.options
        try:
            with CloseTolerant(self.context()):
                while True:
                    job.attempts += 1
                    expired = False
                    try:
                        if options.timeout is None:
                            result = await self._call(job)
                        else:
                            async with asyncio.timeout(options.timeout) as scope:
                                try:
                                    result = await self._call(job)
                                finally:
                                    expired = scope.expired()
                    except asyncio.CancelledError:
                        if not expired:
                            job._finish(JobStatus.CANCELLED)
                            raise
                        exc: BaseException = JobTimedOut(f"timed out after {options.timeout}s")
                    except Exception as error:
                        exc = error
                    except (SystemExit, KeyboardInterrupt) as error:
                        # Asyncio would let these end the loop every job shares.
                        # The code asked to stop, so no retry: a failure, recorded.
                        self.log_failure(
                            "job",
                            job.name,
                            error,
                            "job %s %s raised %s; recorded as failed, not retried",
                            job.name,
                            job.id,
                            type(error).__name__,
                        )
                        job._finish(JobStatus.FAILED, exc=error)
                        return
                    else:
                        job._finish(JobStatus.SUCCEEDED, result)
                        return
                    if isinstance(exc, TimeoutError) and expired:
                        status = JobStatus.TIMED_OUT
                    else:
                        status = JobStatus.FAILED
                    if job.attempts <= options.retries:
                        delay = options.backoff(job.attempts)
                        self.log_failure(
                            "job attempt",
                            job.name,
                            exc,
                            "job %s %s attempt %d/%d %s (%s); retrying in %.3gs",
                            job.name,
                            job.id,
                            job.attempts,
                            options.retries + 1,
                            status.value,
                            describe_exception(exc),
                            delay,
                            level=logging.WARNING,
                        )
                        try:
                            await asyncio.sleep(delay)
                        except asyncio.CancelledError:
                            job._finish(JobStatus.CANCELLED)
                            raise
                        continue
                    if status is JobStatus.TIMED_OUT:
                        timed_out = JobTimedOut(str(exc))
                        self.log_failure(
                            "job",
                            job.name,
                            timed_out,
                            "job %s %s timed out after %ss (%d attempt(s))",
                            job.name,
                            job.id,
                            options.timeout,
                            job.attempts,
                        )
                        job._finish(status, exc=timed_out)
                    else:
                        self.log_failure(
                            "job",
                            job.name,
                            exc,
                            "job %s %s failed (%d attempt(s))",
                            job.name,
                            job.id,
                            job.attempts,
                        )
                        job._finish(status, exc=exc)
                    return
        except BaseException as exc:
            # Outside the attempts: the app context could not be pushed, or its
            # teardown raised before the job was recorded. Never leave it running.
            if isinstance(exc, GeneratorExit):
                # Closed by the loop after it ignored cancellation at stop.
                job._finish(
                    JobStatus.CANCELLED,
                    exc=JobCancelled(
                        f"job {job.name} {job.id} was abandoned: it ignored cancellation at stop"
                    ),
                )
                raise
            if not job.done():
                cancelled = isinstance(exc, asyncio.CancelledError)
                if not cancelled:
                    self.log_failure(
                        "job",
                        job.name,
                        exc,
                        "job %s %s failed outside its code",
                        job.name,
                        job.id,
                    )
                job._finish(
                    JobStatus.CANCELLED if cancelled else JobStatus.FAILED,
                    exc=None if cancelled else exc,
                )
            if isinstance(exc, (SystemExit, KeyboardInterrupt)):
                return  # recorded; never out into the loop
            raise

    def _call(self, job: Job[Any]) -> Awaitable[Any]:
        fn = job._fn
        if inspect.iscoroutine(fn):
            return fn
        assert callable(fn)
        if job._is_async:
            return fn(*job._args, **job._kwargs)  # type: ignore[no-any-return]
        # A plain function never runs on the loop: a worker thread, carrying the
        # job's context (app context, current_job) along.
        loop = asyncio.get_running_loop()
        call = functools.partial(fn, *job._args, **job._kwargs)
        return loop.run_in_executor(None, contextvars.copy_context().run, call)

    def add_idle_hook(self, hook: Callable[[], object]) -> None:
        """Call ``hook()`` on the loop whenever the last active job finishes."""
        self._idle_hooks.append(hook)


class Task(Generic[P, T]):
    """A named async or sync function with job options, made by ``@bg.task``.

    ``task.submit(*args, **kwargs)`` runs it in the background and returns a
    :class:`Job`; ``await task.run(*args, **kwargs)`` runs it as a job and
    returns its result; calling ``task(*args)`` calls the function itself,
    unchanged. ``T`` is the function's result: for an ``async def`` function,
    what its coroutine returns.
    """

    def __init__(
        self,
        fn: Callable[P, Awaitable[T]] | Callable[P, T],
        name: str,
        options: TaskOptions,
        submit: Callable[[Task[P, T], tuple[Any, ...], dict[str, Any]], Job[T]],
    ) -> None:
        self.fn = fn
        self.name = name
        self.options = options
        self.is_async = is_async_callable(fn)
        self._submit = submit
        # Once per task: submit then checks its arguments in a few comparisons.
        self._arguments = arguments_of(fn)
        functools.update_wrapper(self, fn)

    def __repr__(self) -> str:
        return f"<asyncbg Task {self.name} {self.options}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Call the function itself: a coroutine for an async task, the value otherwise.

        Typed ``Any``: ``Task[P, T]`` does not record which of the two it wraps
        (``await task.run(...)`` and ``task.submit(...)`` are precisely typed).
        """
        return self.fn(*args, **kwargs)

    def check_arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Return if the function can be called with ``*args, **kwargs``.

        :raises TypeError: naming the task and its signature, if it cannot.
        """
        arguments = self._arguments
        if arguments is not None:
            arguments.check(args, kwargs, self.name)

    def submit(self, *args: P.args, **kwargs: P.kwargs) -> Job[T]:
        """Run the task in the background; return its :class:`Job` at once.

        :raises TypeError: if the arguments do not fit the function's signature
            (checked here, so such a job is never created, run or retried).
        :raises NotRunning: if asyncbg has been stopped.
        """
        return self._submit(self, args, kwargs)

    async def run(self, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run the task as a job and await its result, from any event loop.

        :raises TypeError: if the arguments do not fit the function's signature.
        :raises NotRunning: if asyncbg has been stopped.
        :raises Exception: whatever the job raised; :class:`~asyncbg.JobTimedOut`,
            :class:`~asyncbg.JobCancelled`.
        """
        return await self.submit(*args, **kwargs)


class TaskDecorator(Protocol):
    """What ``bg.task(name=..., ...)`` returns: a decorator making a :class:`Task`.

    Overloaded like ``bg.task`` itself, so that ``Task[P, T]`` gets the result
    an ``async def`` function's coroutine returns, not the coroutine.
    """

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, T]], /) -> Task[P, T]: ...

    @overload
    def __call__(self, fn: Callable[P, T], /) -> Task[P, T]: ...


class CoroutineFunction(Protocol):
    """Any callable returning a coroutine: the overload ``bg.call`` flags.

    A protocol, not ``Callable[..., Coroutine]``: mypy explains a failed call
    through the first overload whose parameters are shaped like the arguments,
    and a bare Callable is shaped like every function, sync ones too.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, Any]: ...


if TYPE_CHECKING:
    from typing_extensions import deprecated as deprecated
else:

    def deprecated(message: str, /, **_options: object) -> Callable[[T], T]:
        """Mark an overload for type checkers (PEP 702); a no-op at run time."""
        return lambda fn: fn

"""The live job handle: :class:`Job`, its :class:`JobStatus` and :class:`Progress`,
job ids, :func:`current_job`, and :class:`JobHistory`, the bounded store of this
process's live handles.

A :class:`Job` is created in the submitting thread (by
:meth:`JobRunner.create <asyncbg.engine.runner.JobRunner.create>`) and changes
state only on the loop thread afterwards; callers wait on it with
:meth:`Job.result` (any thread but the loop's) or ``await job`` (any event
loop). No ``concurrent.futures.Future`` is made unless somebody waits. How a job
runs is :mod:`asyncbg.engine.runner`'s business.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import enum
import inspect
import logging
import math
import numbers
import os
import threading
import time
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, Unpack, cast

from ..errors import JobCancelled, JobFailed, JobTimedOut, NotRunning
from .jsonsafe import json_safe
from .records import DictShape, JobRecord, decode_json, encode_json

if TYPE_CHECKING:
    from .loop import LoopThread

__all__ = [
    "Job",
    "JobHistory",
    "JobStatus",
    "Progress",
    "current_job",
    "set_if_pending",
    "wait_for_done",
    "wait_for_done_async",
]

log = logging.getLogger("asyncbg")

T = TypeVar("T")


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


def _reset_lock_after_fork() -> None:
    # Another thread may have held the lock at fork time; it does not exist in
    # the child, so the lock would stay taken for good.
    global _callbacks_lock
    _callbacks_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock_after_fork)


def current_job() -> Job[Any]:
    """Return the job whose code is running (works in sync jobs' threads too).

    :raises RuntimeError: if called outside a job.
    """
    job = _current_job.get()
    if job is None:
        raise RuntimeError("asyncbg.current_job() called outside a running job")
    return job


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


@dataclass(frozen=True)
class TaskOptions:
    """How a job runs: per-attempt ``timeout`` (seconds), ``retries`` after the
    first attempt, and exponential backoff ``retry_backoff * 2**n`` capped at
    ``retry_backoff_max``. ``durable``: None follows the backend (durable
    when it is); True asks for a stored job (arguments must be JSON, checked
    at submit); False keeps it in memory whatever the backend."""

    timeout: float | None = None
    retries: int = 0
    retry_backoff: float = 1.0
    retry_backoff_max: float = 60.0
    durable: bool | None = None

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


#: The options of a job submitted without any.
DEFAULT_OPTIONS = TaskOptions()


class _Owner(Protocol):
    """What a job asks of the runner that made it (see ``engine/runner.py``)."""

    @property
    def loop_thread(self) -> LoopThread: ...

    def _cancel(self, job: Job[Any]) -> None: ...

    def _finished(self, job: Job[Any]) -> None: ...

    def _wait(self, job: Job[Any], timeout: float | None) -> bool: ...

    async def _wait_async(self, job: Job[Any]) -> None: ...

    def _progressed(self, job: Job[Any]) -> None: ...


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
        "token",
    )

    def __init__(
        self,
        runner: _Owner,
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
        #: The fencing token of this run's claim (durable jobs; None in memory):
        #: it grows at every claim, so a write of your own that carries it
        #: (``WHERE token < :token``) can refuse a stale run's late write.
        self.token: int | None = None
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

    @classmethod
    def from_record(cls, owner: _Owner, record: JobRecord, options: TaskOptions) -> Job[Any]:
        """Return a handle for a job a backend stores (it may run in another
        process): its state as ``record`` says, no function to run."""
        job: Job[Any] = cls.__new__(cls)
        job.id = record.id
        job.name = record.task
        job.options = options
        job._runner = owner
        job._fn = job._args = job._kwargs = None  # type: ignore[assignment]
        job._is_async = False
        job._result = None
        job._exception = None
        job._task = None
        job._cancel_requested = record.cancel_requested
        job._callbacks = ()
        job.progress = None
        job.apply_record(record)
        return job

    def apply_record(self, record: JobRecord) -> bool:
        """Take the stored state of this job (status, attempts, times, progress;
        the outcome once final). Loop thread only, or before anyone else sees
        the handle. Return True if that made the job final."""
        self.attempts = record.attempts
        self.token = record.token or None
        self.created_at = record.created_at
        self.started_at = record.started_at
        if record.progress_done is not None:
            self.progress = Progress(
                record.progress_done, record.progress_total, record.progress_message
            )
        if not record.final:
            self.status = JobStatus(record.status)
            self.finished_at = None
            return False
        status = JobStatus(record.status)
        exc: BaseException | None = None
        if status is JobStatus.FAILED:
            exc = JobFailed(record.error)
        elif status is JobStatus.CANCELLED and record.error:
            exc = JobCancelled(record.error)
        done = self._finish(status, decode_json(record.result_json), exc, count=False)
        self.finished_at = record.finished_at
        return done

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
        self._runner._progressed(self)

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
        return self._runner._wait(self, timeout)

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
            await self._runner._wait_async(self)
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

    def to_dict(self, **shape: Unpack[DictShape]) -> dict[str, Any]:
        """A JSON-safe dict of the job's state (results and errors as reprs when
        they are not plain JSON values): ``job.record().to_dict(...)``, see
        :class:`~asyncbg.engine.records.DictShape` for what to include."""
        return self.record().to_dict(**shape)

    def record(self) -> JobRecord:
        """Return the job as a :class:`~asyncbg.engine.records.JobRecord`, as it is now.

        Results and arguments are made JSON-safe (reprs for what JSON cannot
        hold), so that the record serialises whatever the job returned.
        """
        # Read once: the loop may finish the job while this runs.
        status = self.status
        progress = self.progress
        exc = self._exception
        args, kwargs = self._args, self._kwargs
        return JobRecord(
            id=self.id,
            queue=self.name,
            task=self.name,
            args_json=(
                None
                if args is None or kwargs is None
                # json_safe's output is always JSON: encode_json never raises here.
                else encode_json(
                    {"args": json_safe(list(args)), "kwargs": json_safe(dict(kwargs))}, "arguments"
                )
            ),
            status=status.value,
            attempts=self.attempts,
            max_attempts=self.options.retries + 1,
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            progress_done=None if progress is None else progress.done,
            progress_total=None if progress is None else progress.total,
            progress_message=None if progress is None else progress.message,
            result_json=(
                encode_json(json_safe(self._result), "result")
                if status is JobStatus.SUCCEEDED
                else None
            ),
            error=None if exc is None else f"{type(exc).__name__}: {exc}",
            timeout=self.options.timeout,
        )

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


def wait_for_done(job: Job[Any], timeout: float | None) -> bool:
    """Block until ``job`` is done or ``timeout`` passes (its done callback wakes
    the caller); return :meth:`Job.done`."""
    event = threading.Event()
    job.add_done_callback(lambda _job: event.set())
    return event.wait(timeout)


async def wait_for_done_async(job: Job[Any]) -> None:
    """Await ``job``'s end from any event loop (its done callback wakes the caller)."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    if job._runner.loop_thread.in_loop_thread():
        job.add_done_callback(lambda _job: set_if_pending(waiter))
    else:

        def wake(_job: Job[Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the caller's loop closed
                loop.call_soon_threadsafe(set_if_pending, waiter)

        job.add_done_callback(wake)
    await waiter


def set_if_pending(fut: asyncio.Future[None]) -> None:
    """Resolve ``fut`` with None unless it is already done (a waiter's wake-up)."""
    if not fut.done():
        fut.set_result(None)


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

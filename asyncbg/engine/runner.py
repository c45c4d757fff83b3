"""Running jobs on the loop: :class:`JobRunner` creates a :class:`~asyncbg.engine.jobs.Job`,
hands it to the loop, claims it there, and runs its attempts (the context every
job runs in, such as Flask's app context; timeout; retries with backoff) up to
its outcome. Also the helpers other runners on the loop share
(:class:`CloseTolerant`, :data:`FAILURE_LOG_INTERVAL`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from ..errors import JobCancelled, JobTimedOut, NotRunning
from .after_fork import ResetAfterFork
from .arguments import check_arguments
from .jobs import (
    DEFAULT_OPTIONS,
    Job,
    JobHistory,
    JobStatus,
    TaskOptions,
    _current_job,
    wait_for_done,
    wait_for_done_async,
)
from .logthrottle import FlushTimer, LogThrottle, describe_exception
from .records import encode_arguments
from .tasks import Task, is_async_callable

if TYPE_CHECKING:
    from .loop import LoopThread

__all__ = ["FAILURE_LOG_INTERVAL", "CloseTolerant", "JobRunner"]

log = logging.getLogger("asyncbg")

#: A failing job, queue consumer or periodic job logs one failure in full with
#: its traceback, then at most one summary line, per this many seconds (every
#: failure is still counted).
FAILURE_LOG_INTERVAL = 60.0

# The parent's jobs are the parent's: a forked child neither runs nor waits for them.
_after_fork: ResetAfterFork[JobRunner] = ResetAfterFork(lambda runner: runner._reset_after_fork())


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
        _after_fork.add(self)

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
        options: TaskOptions = DEFAULT_OPTIONS,
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

    def create_for(
        self,
        task: Task[Any, Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        check_json: bool = True,
    ) -> Job[Any]:
        """Make a job of ``task`` with its options, after checking the arguments
        (against the signature, and as JSON when the task is durable, unless
        ``check_json`` is False: the caller encodes them itself).

        :raises TypeError: if the arguments do not fit, or a durable task's are not JSON.
        """
        task.check_arguments(args, kwargs)
        if check_json and task.options.durable:
            encode_arguments(args, kwargs, task.name)  # a clear TypeError now, not at the store
        return self.create(
            task.fn,
            args,
            kwargs,
            name=task.name,
            options=task.options,
            is_async=task.is_async,
            check_args=False,
        )

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
        logged = self.log_throttle.failure(log, kind, name, exc, msg, *args, level=level)
        self._flush_timer.after_failure(self.log_throttle, logged)

    def flush_logs(self) -> None:
        """Say every failure count not logged yet (at stop)."""
        self._flush_timer.close_and_flush(self.log_throttle)

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
            if job.done() or job._runner is not self:
                # A durable job belongs to its store: released or queued there,
                # it runs in another process; it is not abandoned.
                continue
            error = JobCancelled(f"job {job.name} {job.id} was abandoned: {why}")
            if job._finish(JobStatus.CANCELLED, exc=error, count=from_loop):
                settled += 1
        return settled

    def left_without_outcome(self) -> None:
        """An active job stopped running here (also without a final status: a
        durable job handed back to its store); loop thread only."""
        self.active -= 1
        if not self.active:
            for idle in self._idle_hooks:
                idle()

    def _finished(self, job: Job[Any]) -> None:
        self.history.finished(job)
        for hook in self.finish_hooks:
            try:
                hook(job)
            except Exception:
                log.exception("job finish hook %r failed", hook)
        self.left_without_outcome()  # the accounting every end of a run shares

    async def _execute(self, job: Job[Any]) -> None:
        # Once per job: the success path stays a straight line (no extra awaits
        # or objects); failures, retries and escapes are handled by the steps below.
        _current_job.set(job)
        job.status = JobStatus.RUNNING
        job.started_at = time.time()
        timeout = job.options.timeout
        try:
            with CloseTolerant(self.context()):
                while True:
                    job.attempts += 1
                    expired = False
                    try:
                        if timeout is None:
                            result = await self._call(job)
                        else:
                            async with asyncio.timeout(timeout) as scope:
                                try:
                                    result = await self._call(job)
                                finally:
                                    expired = scope.expired()
                    except asyncio.CancelledError as cancelled:
                        exc: BaseException = self._timed_out(job, cancelled, expired)
                    except Exception as error:
                        exc = error
                    except (SystemExit, KeyboardInterrupt) as error:
                        self._fail_on_exit_request(job, error)
                        return
                    else:
                        job._finish(JobStatus.SUCCEEDED, result)
                        return
                    delay = self._after_failed_attempt(job, exc, expired)
                    if delay is None:
                        return
                    await self._back_off(job, delay)
        except BaseException as exc:
            if self._settle_escape(job, exc):
                raise

    @staticmethod
    def _timed_out(job: Job[Any], cancelled: asyncio.CancelledError, expired: bool) -> JobTimedOut:
        """The error of an attempt its own timeout cancelled; any other
        cancellation (``job.cancel()``, the loop stopping) finishes the job and
        goes on out of the task."""
        if not expired:
            job._finish(JobStatus.CANCELLED)
            raise cancelled
        return JobTimedOut(f"timed out after {job.options.timeout}s")

    def _fail_on_exit_request(self, job: Job[Any], error: BaseException) -> None:
        # SystemExit or KeyboardInterrupt from the job's code: asyncio would let
        # these end the loop every job shares. The code asked to stop, so no
        # retry: a failure, recorded.
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

    def _after_failed_attempt(
        self, job: Job[Any], exc: BaseException, expired: bool
    ) -> float | None:
        """Log a failed attempt; return the delay before the retry, or None once
        the job is finished (failed or timed out, its retries spent)."""
        options = job.options
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
            return delay
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
        return None

    @staticmethod
    async def _back_off(job: Job[Any], delay: float) -> None:
        # Only on the retry path: the extra await costs nothing per job.
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            job._finish(JobStatus.CANCELLED)
            raise

    def _settle_escape(self, job: Job[Any], exc: BaseException) -> bool:
        """Record a job that something outside its attempts ended; True if
        ``exc`` must be re-raised.

        The app context could not be pushed, or its teardown raised before the
        job was recorded, or the loop closed the coroutine: never leave it running.
        """
        if isinstance(exc, GeneratorExit):
            # Closed by the loop after it ignored cancellation at stop.
            job._finish(
                JobStatus.CANCELLED,
                exc=JobCancelled(
                    f"job {job.name} {job.id} was abandoned: it ignored cancellation at stop"
                ),
            )
            return True
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
        # SystemExit and KeyboardInterrupt are recorded; never out into the loop.
        return not isinstance(exc, (SystemExit, KeyboardInterrupt))

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

    # -- what a job asks of its owner ------------------------------------------------

    def _wait(self, job: Job[Any], timeout: float | None) -> bool:
        return wait_for_done(job, timeout)

    async def _wait_async(self, job: Job[Any]) -> None:
        await wait_for_done_async(job)

    def _progressed(self, job: Job[Any]) -> None:
        pass  # progress of a job in memory lives on its handle only

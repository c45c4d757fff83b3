"""Jobs through AsyncBG: records, outcomes, options, app context, history, test support."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import flask
import pytest
from flask import Flask, current_app, g
from helpers_core import WAIT, Gate

import asyncbg.engine.jobs
from asyncbg import (
    AsyncBG,
    Job,
    JobCancelled,
    JobStatus,
    JobTimedOut,
    NotRunning,
    Progress,
    TaskOptions,
    current_job,
)

MakeBG = Callable[..., AsyncBG]


@pytest.fixture
def make_bg() -> Iterator[MakeBG]:
    """Factory: ``bg = make_bg(**config)``, bound to a fresh app; stopped at teardown.

    Signal handling is off (tests must not replace the runner's handlers);
    autostart stays at its default (on) unless a test says otherwise.
    """
    made: list[tuple[Flask, AsyncBG]] = []

    def make(**config: Any) -> AsyncBG:
        app = Flask(f"jobs_app_{len(made)}")
        app.config.update({"ASYNCBG_HANDLE_SIGNALS": False, **config})
        bg = AsyncBG(app)
        # The app is kept here, as a module-level app is: asyncbg holds an app
        # strongly only while its loop runs.
        made.append((app, bg))
        return bg

    yield make
    for _app, bg in made:
        bg.stop(timeout=1.0)


@pytest.fixture
def bg(make_bg: MakeBG) -> AsyncBG:
    return make_bg()


async def add(a: int, b: int = 0) -> int:
    return a + b


def _block_loop(bg: AsyncBG, gate: Gate) -> None:
    """Hold the loop thread (on purpose) until ``gate`` is set: submitted jobs stay pending."""
    entered = threading.Event()

    def hold() -> None:
        entered.set()
        gate.wait(WAIT)

    bg.loop_thread.post(hold)
    assert entered.wait(WAIT)


def _held_job(bg: AsyncBG) -> tuple[Job[str], Gate, Gate]:
    """Submit a job that signals ``started`` and then waits for ``release``."""
    started, release = Gate(), Gate()

    async def held() -> str:
        started.set()
        await release.wait_async()
        return "released"

    job = bg.submit(held)
    assert started.wait()
    return job, started, release


# -- the Job record --------------------------------------------------------------------


def test_submit_returns_a_job_with_a_uuid4_hex_id(bg: AsyncBG) -> None:
    job = bg.submit(add, 1, 2)
    assert isinstance(job, Job)
    parsed = uuid.UUID(hex=job.id)
    assert parsed.version == 4
    assert job.id == parsed.hex


def test_job_ids_differ(bg: AsyncBG) -> None:
    ids = {bg.submit(add, i).id for i in range(50)}
    assert len(ids) == 50


def test_job_name_is_the_function_qualname(bg: AsyncBG) -> None:
    assert bg.submit(add, 1).name == add.__qualname__


def test_task_job_name_is_the_task_name(bg: AsyncBG) -> None:
    @bg.task(name="adder")
    async def adder(a: int) -> int:
        return a

    assert adder.submit(1).name == "adder"


def test_submit_passes_args_and_kwargs(bg: AsyncBG) -> None:
    assert bg.submit(add, 1, b=2).result(WAIT) == 3


def test_job_is_pending_until_the_loop_takes_it(bg: AsyncBG) -> None:
    gate = Gate()
    _block_loop(bg, gate)
    try:
        job = bg.submit(add, 1)
        assert job.status is JobStatus.PENDING
        assert job.started_at is None
        assert not job.done()
    finally:
        gate.set()
    assert job.result(WAIT) == 1


def test_job_is_running_while_its_code_runs(bg: AsyncBG) -> None:
    job, _started, release = _held_job(bg)
    try:
        assert job.status is JobStatus.RUNNING
        assert job.started_at is not None
        assert not job.done()
    finally:
        release.set()


def test_job_succeeds_with_the_return_value(bg: AsyncBG) -> None:
    job = bg.submit(add, 2, 3)
    assert job.result(WAIT) == 5
    assert job.status is JobStatus.SUCCEEDED
    assert job.done()


def test_job_timestamps_are_ordered(bg: AsyncBG) -> None:
    job, _started, release = _held_job(bg)
    release.set()
    job.result(WAIT)
    assert job.started_at is not None
    assert job.finished_at is not None
    assert job.created_at <= job.started_at <= job.finished_at


def test_result_reraises_the_job_exception_with_its_type(bg: AsyncBG) -> None:
    class CustomError(Exception):
        pass

    async def fails() -> None:
        raise CustomError("boom")

    job = bg.submit(fails)
    with pytest.raises(CustomError, match="boom"):
        job.result(WAIT)
    assert job.status is JobStatus.FAILED
    assert isinstance(job.exception(0), CustomError)


def test_result_timeout_raises_timeout_error_while_the_job_runs(bg: AsyncBG) -> None:
    job, _started, release = _held_job(bg)
    try:
        with pytest.raises(TimeoutError):
            job.result(timeout=0.05)
        assert job.status is JobStatus.RUNNING  # waiting gave up; the job goes on
    finally:
        release.set()
    assert job.result(WAIT) == "released"


def test_done_is_false_while_running_and_true_after(bg: AsyncBG) -> None:
    job, _started, release = _held_job(bg)
    assert not job.done()
    release.set()
    job.result(WAIT)
    assert job.done()


# -- cancel ----------------------------------------------------------------------------


def test_cancel_running_job_marks_it_cancelled(bg: AsyncBG) -> None:
    saw_cancel = Gate()
    started = Gate()

    async def victim() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            saw_cancel.set()
            raise

    job = bg.submit(victim)
    assert started.wait()
    assert job.cancel() is True
    assert saw_cancel.wait()
    assert job.wait(WAIT)
    assert job.status is JobStatus.CANCELLED


def test_cancelled_job_result_raises_job_cancelled(bg: AsyncBG) -> None:
    job, _started, _release = _held_job(bg)
    job.cancel()
    with pytest.raises(JobCancelled):
        job.result(WAIT)


def test_cancel_pending_job_never_runs_it(bg: AsyncBG) -> None:
    ran = Gate()

    async def never() -> None:
        ran.set()

    gate = Gate()
    _block_loop(bg, gate)
    try:
        job = bg.submit(never)
        assert job.cancel() is True
    finally:
        gate.set()
    with pytest.raises(JobCancelled):
        job.result(WAIT)
    assert not ran.is_set()
    bg.wait_idle(WAIT)  # the cancelled job does not count as active forever


def test_cancel_finished_job_returns_false(bg: AsyncBG) -> None:
    job = bg.submit(add, 1)
    job.result(WAIT)
    assert job.cancel() is False
    assert job.status is JobStatus.SUCCEEDED


# -- to_dict and progress --------------------------------------------------------------


def test_to_dict_is_json_serialisable_with_progress_and_error(bg: AsyncBG) -> None:
    async def fails_halfway() -> None:
        current_job().set_progress(1, 2, "half")
        raise ValueError("broke")

    job = bg.submit(fails_halfway)
    with pytest.raises(ValueError, match="broke"):
        job.result(WAIT)
    data = json.loads(json.dumps(job.to_dict()))
    assert data["id"] == job.id
    assert data["status"] == "failed"
    assert data["progress"] == {"done": 1, "total": 2, "message": "half", "fraction": 0.5}
    assert "ValueError" in data["error"]
    assert "broke" in data["error"]


def test_to_dict_of_a_result_that_is_not_json_uses_its_repr(bg: AsyncBG) -> None:
    class Thing:
        def __repr__(self) -> str:
            return "<Thing>"

    async def returns_thing() -> dict[str, Any]:
        return {"thing": Thing(), "n": 1, "nan": float("nan")}

    job = bg.submit(returns_thing)
    job.result(WAIT)
    data = json.loads(json.dumps(job.to_dict(), allow_nan=False))
    assert data["result"]["thing"] == "<Thing>"
    assert data["result"]["n"] == 1


def test_progress_is_visible_while_the_job_runs(bg: AsyncBG) -> None:
    reported, release = Gate(), Gate()

    async def works() -> None:
        current_job().set_progress(3, 10, "three of ten")
        reported.set()
        await release.wait_async()

    job = bg.submit(works)
    try:
        assert reported.wait()
        assert job.progress == Progress(3, 10, "three of ten")
        data = job.to_dict()
        assert data["status"] == "running"
        assert data["progress"]["fraction"] == pytest.approx(0.3)
        assert data["progress"]["message"] == "three of ten"
    finally:
        release.set()


def test_current_job_is_the_job_running_the_code(bg: AsyncBG) -> None:
    async def me() -> Job[Any]:
        return current_job()

    job = bg.submit(me)
    assert job.result(WAIT) is job


def test_current_job_outside_a_job_raises_runtime_error() -> None:
    with pytest.raises(RuntimeError, match="outside"):
        current_job()


# -- sync functions --------------------------------------------------------------------


def test_sync_function_runs_in_a_worker_thread(bg: AsyncBG) -> None:
    def where() -> tuple[int, str]:
        return threading.get_ident(), threading.current_thread().name

    ident, name = bg.submit(where).result(WAIT)
    loop_thread = bg.call(threading.current_thread)
    assert ident != loop_thread.ident
    assert name != loop_thread.name
    assert ident != threading.get_ident()


def test_current_job_works_in_a_sync_job(bg: AsyncBG) -> None:
    def reports() -> Job[Any]:
        job = current_job()
        job.set_progress(1, 1, "sync")
        return job

    job = bg.submit(reports)
    assert job.result(WAIT) is job
    assert job.progress == Progress(1, 1, "sync")


def test_sync_job_does_not_block_the_loop(bg: AsyncBG) -> None:
    release = threading.Event()

    def blocks() -> str:
        release.wait(WAIT)
        return "unblocked"

    job = bg.submit(blocks)
    try:
        assert bg.submit(add, 4).result(WAIT) == 4
    finally:
        release.set()
    assert job.result(WAIT) == "unblocked"


def test_cancel_running_sync_job_marks_it_cancelled(bg: AsyncBG) -> None:
    started, release = threading.Event(), threading.Event()

    def blocks() -> str:
        started.set()
        release.wait(WAIT)
        return "too late"

    job = bg.submit(blocks)
    assert started.wait(WAIT)
    try:
        assert job.cancel() is True
        with pytest.raises(JobCancelled):
            job.result(WAIT)  # the thread cannot be interrupted; the job is cancelled anyway
    finally:
        release.set()


def test_current_job_in_a_job_submitted_by_a_job_is_the_inner_job(bg: AsyncBG) -> None:
    async def inner() -> Job[Any]:
        return current_job()

    async def outer() -> tuple[Job[Any], Job[Any], Job[Any]]:
        inner_job = bg.submit(inner)
        return current_job(), inner_job, await inner_job

    outer_job = bg.submit(outer)
    seen_outer, inner_job, seen_inner = outer_job.result(WAIT)
    assert seen_outer is outer_job
    assert seen_inner is inner_job


# -- timeout and retries ---------------------------------------------------------------


def test_task_timeout_marks_the_job_timed_out(bg: AsyncBG) -> None:
    @bg.task(timeout=0.1)
    async def too_slow() -> None:
        await asyncio.Event().wait()

    job = too_slow.submit()
    assert job.wait(WAIT)
    assert job.status is JobStatus.TIMED_OUT


def test_timed_out_job_result_raises_job_timed_out(bg: AsyncBG) -> None:
    finally_ran = Gate()

    @bg.task(timeout=0.1)
    async def too_slow() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            finally_ran.set()

    job = too_slow.submit()
    with pytest.raises(JobTimedOut):
        job.result(WAIT)
    assert finally_ran.is_set()


def test_sync_task_timeout_marks_the_job_timed_out(bg: AsyncBG) -> None:
    release = threading.Event()

    @bg.task(timeout=0.1)
    def too_slow_sync() -> None:
        release.wait(WAIT)

    job = too_slow_sync.submit()
    try:
        with pytest.raises(JobTimedOut):
            job.result(WAIT)
        assert job.status is JobStatus.TIMED_OUT
    finally:
        release.set()


def test_job_raising_timeout_error_itself_is_failed_not_timed_out(bg: AsyncBG) -> None:
    @bg.task(timeout=WAIT)
    async def raises_timeout() -> None:
        raise TimeoutError("my own")

    job = raises_timeout.submit()
    with pytest.raises(TimeoutError, match="my own"):
        job.result(WAIT)
    assert job.status is JobStatus.FAILED


def test_retries_back_off_exponentially(bg: AsyncBG) -> None:
    attempts: list[float] = []

    @bg.task(retries=3, retry_backoff=0.1)
    async def always_fails() -> None:
        attempts.append(time.monotonic())
        raise RuntimeError(f"attempt {len(attempts)}")

    job = always_fails.submit()
    with pytest.raises(RuntimeError, match="attempt 4"):
        job.result(WAIT)
    assert len(attempts) == 4
    assert job.attempts == 4
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    # The delay before retry n is 0.1 * 2**(n-1): each gap is at least that
    # (timers never fire early); noise can only lengthen a gap.
    for gap, backoff in zip(gaps, [0.1, 0.2, 0.4], strict=True):
        assert gap >= backoff * 0.95
    assert sum(gaps) < 0.7 + 3.0  # and no absurdly long waits either


def test_retry_succeeds_on_a_later_attempt(bg: AsyncBG) -> None:
    calls = []

    @bg.task(retries=5, retry_backoff=0.01)
    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("not yet")
        return "ok"

    job = flaky.submit()
    assert job.result(WAIT) == "ok"
    assert job.attempts == 3
    assert job.status is JobStatus.SUCCEEDED


def test_timed_out_attempt_is_retried(bg: AsyncBG) -> None:
    calls = []

    @bg.task(timeout=0.1, retries=1, retry_backoff=0.01)
    async def slow_then_fast() -> str:
        calls.append(1)
        if len(calls) == 1:
            await asyncio.Event().wait()
        return "fast"

    assert slow_then_fast.submit().result(WAIT) == "fast"
    assert len(calls) == 2


def test_retry_backoff_is_capped_by_retry_backoff_max() -> None:
    options = TaskOptions(retries=10, retry_backoff=1.0, retry_backoff_max=5.0)
    assert [options.backoff(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


# -- failures are logged, the loop goes on ---------------------------------------------


def test_failing_job_is_logged_with_its_traceback(
    bg: AsyncBG, caplog: pytest.LogCaptureFixture
) -> None:
    async def fails() -> None:
        raise ZeroDivisionError("logged")

    with caplog.at_level(logging.ERROR, logger="asyncbg"):
        job = bg.submit(fails)
        with pytest.raises(ZeroDivisionError):
            job.result(WAIT)
    records = [r for r in caplog.records if r.name == "asyncbg" and job.id in r.getMessage()]
    assert records
    assert records[0].levelno >= logging.ERROR
    assert records[0].exc_info is not None
    assert records[0].exc_info[0] is ZeroDivisionError
    assert "Traceback" in caplog.text


def test_loop_keeps_working_after_a_job_fails(bg: AsyncBG) -> None:
    async def fails() -> None:
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        bg.submit(fails).result(WAIT)
    assert bg.loop_thread.running
    assert bg.submit(add, 7).result(WAIT) == 7


# -- app context -----------------------------------------------------------------------


def test_job_runs_in_the_app_context(bg: AsyncBG) -> None:
    async def app_name() -> str:
        return current_app.name

    assert bg.app is not None
    assert bg.submit(app_name).result(WAIT) == bg.app.name


def test_sync_job_runs_in_the_app_context(bg: AsyncBG) -> None:
    def app_name() -> str:
        return current_app.name

    assert bg.app is not None
    assert bg.submit(app_name).result(WAIT) == bg.app.name


def test_g_is_fresh_for_each_job(bg: AsyncBG) -> None:
    first_set, release = Gate(), Gate()

    async def sets_g() -> str:
        g.owner = "first"
        first_set.set()
        await release.wait_async()
        return str(g.owner)

    async def reads_g() -> object:
        return g.get("owner")

    first = bg.submit(sets_g)
    try:
        assert first_set.wait()
        assert bg.submit(reads_g).result(WAIT) is None  # runs while the first holds g
    finally:
        release.set()
    assert first.result(WAIT) == "first"


def test_job_submitted_from_a_request_does_not_see_the_request(bg: AsyncBG) -> None:
    async def sees_request() -> bool:
        return flask.has_request_context()

    assert bg.app is not None
    with bg.app.test_request_context("/submitting"):
        job = bg.submit(sees_request)
    assert job.result(WAIT) is False


# -- history ---------------------------------------------------------------------------


def test_get_job_finds_a_running_job(bg: AsyncBG) -> None:
    job, _started, release = _held_job(bg)
    try:
        assert bg.get_job(job.id) is job
    finally:
        release.set()


def test_get_job_finds_a_finished_job(bg: AsyncBG) -> None:
    job = bg.submit(add, 1)
    job.result(WAIT)
    assert bg.get_job(job.id) is job


@pytest.mark.parametrize(
    "job_id",
    # A well-formed id no job has (a fixed one: the test ids stay the same per run).
    [
        "0b6a3bb2a3a94a4c9a7d2c1f5e8d4a10",
        "",
        "not-a-uuid",
        "../../etc/passwd",
        None,
        12345,
        b"bytes",
        ["list"],
    ],
)
def test_get_job_with_unknown_or_malformed_id_returns_none(bg: AsyncBG, job_id: Any) -> None:
    bg.submit(add, 1).result(WAIT)
    assert bg.get_job(job_id) is None


def test_history_keeps_at_most_the_configured_number_of_finished_jobs(make_bg: MakeBG) -> None:
    bg = make_bg(ASYNCBG_JOB_HISTORY_SIZE=10)
    jobs = [bg.submit(add, i) for i in range(100)]
    assert [job.result(WAIT) for job in jobs] == list(range(100))
    bg.wait_idle(WAIT)
    assert bg.get_job(jobs[0].id) is None
    assert bg.get_job(jobs[-1].id) is jobs[-1]
    assert len(bg.history) <= 10


def test_history_counts_live_jobs_beyond_the_bound(make_bg: MakeBG) -> None:
    bg = make_bg(ASYNCBG_JOB_HISTORY_SIZE=2)
    release = Gate()
    started = [Gate() for _ in range(5)]

    async def held(i: int) -> None:
        started[i].set()
        await release.wait_async()

    live = [bg.submit(held, i) for i in range(5)]
    try:
        assert all(s.wait() for s in started)
        for i in range(10):
            bg.submit(add, i).result(WAIT)
        assert all(bg.get_job(job.id) is job for job in live)  # live jobs are never dropped
        assert len(bg.history) <= 2 + len(live)
    finally:
        release.set()


def test_job_finishing_before_its_submission_returns_is_still_trimmed(
    make_bg: MakeBG, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulates the submitting thread being preempted right after handing the
    # job to the loop, until the loop has run, finished and trimmed it.
    bg = make_bg(ASYNCBG_JOB_HISTORY_SIZE=0)
    trimmed = threading.Event()
    bg.runner.finish_hooks.append(lambda _job: trimmed.set())
    lt = bg.loop_thread
    real_post = lt.post

    def post_then_stall(fn: Callable[..., object], *args: Any) -> None:
        real_post(fn, *args)
        if fn == bg.runner._start:
            assert trimmed.wait(WAIT)

    monkeypatch.setattr(lt, "post", post_then_stall)
    job = bg.submit(add, 1)
    assert job.result(WAIT) == 1
    bg.wait_idle(WAIT)
    assert len(bg.history) == 0


class _FakeClock:
    """Stands in for the ``time`` module inside asyncbg.jobs: wall time we move by hand."""

    def __init__(self) -> None:
        self.now = time.time()

    def time(self) -> float:
        return self.now


def test_history_forgets_jobs_older_than_the_age_bound(
    make_bg: MakeBG, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = _FakeClock()
    monkeypatch.setattr(asyncbg.engine.jobs, "time", clock)
    bg = make_bg(ASYNCBG_JOB_HISTORY_AGE=60.0)
    old = bg.submit(add, 1)
    old.result(WAIT)
    bg.wait_idle(WAIT)
    clock.now += 61.0
    young = bg.submit(add, 2)  # finishing it trims the history
    young.result(WAIT)
    bg.wait_idle(WAIT)
    assert bg.get_job(old.id) is None
    assert bg.get_job(young.id) is young


def test_get_job_does_not_return_a_job_older_than_the_age_bound(
    make_bg: MakeBG, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = _FakeClock()
    monkeypatch.setattr(asyncbg.engine.jobs, "time", clock)
    bg = make_bg(ASYNCBG_JOB_HISTORY_AGE=60.0)
    old = bg.submit(add, 1)
    old.result(WAIT)
    bg.wait_idle(WAIT)
    clock.now += 61.0
    # No other job finished since: the age bound must hold for lookups anyway.
    assert bg.get_job(old.id) is None


def test_history_keeps_jobs_younger_than_the_age_bound(
    make_bg: MakeBG, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = _FakeClock()
    monkeypatch.setattr(asyncbg.engine.jobs, "time", clock)
    bg = make_bg(ASYNCBG_JOB_HISTORY_AGE=60.0)
    old = bg.submit(add, 1)
    old.result(WAIT)
    clock.now += 59.0
    bg.submit(add, 2).result(WAIT)
    bg.wait_idle(WAIT)
    assert bg.get_job(old.id) is old


# -- lifecycle -------------------------------------------------------------------------


def test_submit_starts_a_loop_that_was_not_started(make_bg: MakeBG) -> None:
    bg = make_bg(ASYNCBG_AUTOSTART=False)
    assert not bg.loop_thread.running
    assert bg.submit(add, 5).result(WAIT) == 5
    assert bg.loop_thread.running


def test_submit_after_stop_raises_not_running(bg: AsyncBG) -> None:
    bg.stop(timeout=1.0)
    with pytest.raises(NotRunning):
        bg.submit(add, 1)


def test_submit_of_a_coroutine_object_after_stop_closes_it(bg: AsyncBG) -> None:
    bg.stop(timeout=1.0)
    coro = add(1)
    try:
        with pytest.raises(NotRunning):
            bg.submit(coro)
        assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
    finally:
        coro.close()  # no "never awaited" warning leaking into other tests


def test_refused_submit_leaves_nothing_in_the_history(bg: AsyncBG) -> None:
    bg.stop(timeout=1.0)
    before = len(bg.history)
    with pytest.raises(NotRunning):
        bg.submit(add, 1)
    assert len(bg.history) == before


def test_job_cancelled_by_shutdown_is_marked_cancelled(bg: AsyncBG) -> None:
    job, _started, _release = _held_job(bg)
    report = bg.stop(timeout=0.1)
    assert report.cancelled == 1
    assert job.status is JobStatus.CANCELLED
    with pytest.raises(JobCancelled):
        job.result(0)


def test_submit_accepts_a_task_and_uses_its_options(bg: AsyncBG) -> None:
    @bg.task(timeout=0.1, name="slow_task")
    async def slow_task() -> None:
        await asyncio.Event().wait()

    job = bg.submit(slow_task)
    assert job.name == "slow_task"
    with pytest.raises(JobTimedOut):
        job.result(WAIT)


def test_submit_after_restart_works(bg: AsyncBG) -> None:
    bg.stop(timeout=1.0)
    bg.start()
    assert bg.submit(add, 9).result(WAIT) == 9


# -- blocking from the loop thread -----------------------------------------------------


def _from_the_loop(bg: AsyncBG, blocking: Callable[[], object]) -> BaseException | None:
    """Call ``blocking()`` inside a job on the loop; return what it raised."""

    async def job() -> BaseException | None:
        try:
            blocking()
        except Exception as exc:
            return exc
        return None

    return bg.submit(job).result(WAIT)


def test_job_result_from_the_loop_thread_raises_runtime_error(bg: AsyncBG) -> None:
    job, _started, release = _held_job(bg)
    try:
        exc = _from_the_loop(bg, lambda: job.result(timeout=2.0))
    finally:
        release.set()
    assert isinstance(exc, RuntimeError)
    assert "deadlock" in str(exc)


def test_job_wait_from_the_loop_thread_raises_runtime_error(bg: AsyncBG) -> None:
    job, _started, release = _held_job(bg)
    try:
        exc = _from_the_loop(bg, lambda: job.wait(timeout=2.0))
    finally:
        release.set()
    assert isinstance(exc, RuntimeError)
    assert "deadlock" in str(exc)


def test_wait_idle_from_the_loop_thread_raises_runtime_error(bg: AsyncBG) -> None:
    exc = _from_the_loop(bg, lambda: bg.wait_idle(timeout=2.0))
    assert isinstance(exc, RuntimeError)
    assert "deadlock" in str(exc)


def test_awaiting_a_job_on_the_loop_itself_works(bg: AsyncBG) -> None:
    async def outer() -> int:
        return await bg.submit(add, 20, 22)

    assert bg.submit(outer).result(WAIT) == 42


def test_awaiting_a_job_from_another_event_loop(bg: AsyncBG) -> None:
    job, _started, release = _held_job(bg)

    async def waiter() -> str:
        release.set()
        return await job

    assert asyncio.run(waiter()) == "released"


def test_bg_run_from_another_event_loop(bg: AsyncBG) -> None:
    async def caller() -> int:
        return await bg.run(add, 1, b=1)

    assert asyncio.run(caller()) == 2


# -- eager mode and wait_idle ----------------------------------------------------------


def test_eager_submit_returns_a_finished_job(make_bg: MakeBG) -> None:
    bg = make_bg(ASYNCBG_EAGER=True)
    job = bg.submit(add, 2, 2)
    assert job.done()
    assert job.status is JobStatus.SUCCEEDED
    assert job.result(0) == 4


def test_eager_job_runs_in_the_app_context(make_bg: MakeBG) -> None:
    bg = make_bg(ASYNCBG_EAGER=True)

    async def app_name() -> str:
        return current_app.name

    job = bg.submit(app_name)
    assert job.done()
    assert bg.app is not None
    assert job.result(0) == bg.app.name


def test_eager_failing_job_is_finished_and_reraises(make_bg: MakeBG) -> None:
    bg = make_bg(ASYNCBG_EAGER=True)

    async def fails() -> None:
        raise KeyError("eager")

    job = bg.submit(fails)
    assert job.status is JobStatus.FAILED
    with pytest.raises(KeyError):
        job.result(0)


def test_wait_idle_returns_once_all_jobs_are_done(bg: AsyncBG) -> None:
    release = Gate()

    async def held(i: int) -> int:
        await release.wait_async()
        await asyncio.sleep(0.01 * i)
        return i

    jobs = [bg.submit(held, i) for i in range(5)]
    errors: list[BaseException] = []

    def wait_idle() -> None:
        try:
            bg.wait_idle(WAIT)
        except BaseException as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait_idle)
    waiter.start()
    try:
        waiter.join(0.2)
        assert waiter.is_alive()  # the jobs are held: wait_idle must not have returned
    finally:
        release.set()
    waiter.join(WAIT)
    assert not waiter.is_alive()
    assert not errors
    assert all(job.done() for job in jobs)


def test_wait_idle_raises_timeout_error_while_a_job_hangs(bg: AsyncBG) -> None:
    job, _started, release = _held_job(bg)
    try:
        with pytest.raises(TimeoutError):
            bg.wait_idle(timeout=0.1)
        assert not job.done()
    finally:
        release.set()
    bg.wait_idle(WAIT)  # and once released it returns


def test_job_whose_app_context_cannot_be_pushed_is_marked_failed(make_bg: MakeBG) -> None:
    bg = make_bg()
    assert bg.app is not None
    ran = threading.Event()

    def refuse(sender: Flask, **_extra: object) -> None:
        raise RuntimeError("no database today")

    async def job() -> None:
        ran.set()

    flask.appcontext_pushed.connect(refuse, bg.app)
    try:
        j = bg.submit(job)
        with pytest.raises(RuntimeError, match="no database today"):
            j.result(WAIT)
    finally:
        flask.appcontext_pushed.disconnect(refuse, bg.app)
    assert j.status is JobStatus.FAILED
    assert not ran.is_set()
    bg.wait_idle(WAIT)  # not left counted as running

"""Never lose, never hang: what stop() accounts for, exceptions that would end the
loop, stubborn jobs, forks under load, stop from a job, several apps at exit.

Each test here failed before the fix it names (issue 8's numbered items).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from flask import current_app
from helpers_core import WAIT, Gate, in_child, run_python, wait_for

from asyncbg import JobCancelled, JobStatus, LoopThread, NotRunning
from asyncbg.engine.jobs import Progress

pytestmark = pytest.mark.timeout(60)


def _hold_the_loop(lt: LoopThread) -> tuple[Gate, Gate]:
    """Block the loop thread in a callback until the returned ``release`` gate is set."""
    held, release = Gate(), Gate()

    def hold() -> None:
        held.set()
        release.wait()

    lt.post(hold)
    assert held.wait()
    return held, release


# -- 1. stop() accounts for every accepted job ---------------------------------------


@pytest.mark.parametrize("timeout", [0.0, 30.0])
def test_stop_accounts_for_a_backlog_of_100k_accepted_jobs(make_app: Any, timeout: float) -> None:
    # With a grace, every job runs: the grace is far above the time the drain
    # takes (about 6.6 s with the other core busy, when a 5 s grace once cut
    # it short), and stop returns as soon as the drain ends.
    _app, bg = make_app()
    ran = 0

    @bg.task
    async def trivial() -> None:
        nonlocal ran
        ran += 1

    bg.start()
    _, release = _hold_the_loop(bg.loop_thread)
    jobs: list[Any] = []

    def submit_many() -> None:
        jobs.extend(trivial.submit() for _ in range(10_000))

    threads = [threading.Thread(target=submit_many) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert len(jobs) == 100_000
    reports: list[Any] = []
    stopper = threading.Thread(target=lambda: reports.append(bg.stop(timeout=timeout)))
    stopper.start()
    wait_for(lambda: bg.loop_thread.stopping, what="the stop to begin")
    release.set()
    stopper.join(timeout + WAIT)
    (report,) = reports
    assert report.finished
    # Every accepted job is final, and the report counts every one of them.
    assert all(job.done() for job in jobs)
    cancelled = sum(job.status is JobStatus.CANCELLED for job in jobs)
    assert ran + cancelled == 100_000
    assert (report.completed, report.cancelled, report.abandoned) == (ran, cancelled, 0)
    if timeout == 0.0:
        # No grace: nothing that had not started runs, all of it cancelled in bulk.
        assert cancelled == 100_000
    else:
        assert ran == 100_000


def test_stop_on_a_blocked_loop_counts_what_it_abandons_and_names_the_blocker(
    make_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    _app, bg = make_app(ASYNCBG_MONITOR=False)
    blocking, release = Gate(), Gate()
    handled: list[int] = []

    @bg.task
    async def hogs_the_loop() -> None:
        blocking.set()
        release.wait(WAIT * 2)  # a blocking call on the loop, past the stop's bound

    @bg.consumer("items", maxsize=100)
    async def consume(item: int) -> None:
        handled.append(item)

    bg.start()
    try:
        hog = hogs_the_loop.submit()
        assert blocking.wait()
        pending = [bg.submit(asyncio.sleep, 0) for _ in range(100)]
        for i in range(50):
            bg.enqueue("items", i)
        with caplog.at_level(logging.ERROR, logger="asyncbg"):
            t0 = time.monotonic()
            report = bg.stop(timeout=0.2)
            elapsed = time.monotonic() - t0
        assert not report.finished
        assert elapsed < WAIT
        assert report.abandoned == 101  # the hog and the 100 that never started
        assert report.still_queued == 50
        assert report.blocked_by is not None
        assert "hogs_the_loop" in report.blocked_by
        assert "hogs_the_loop" in caplog.text
        # Nobody waits forever on what was abandoned.
        for job in [hog, *pending]:
            with pytest.raises(JobCancelled, match="abandoned"):
                job.result(0)
    finally:
        release.set()
    assert bg.loop_thread._stopped.wait(WAIT)


def test_stop_abandons_a_job_whose_cleanup_outlasts_the_cancel_grace(make_app: Any) -> None:
    _app, bg = make_app()
    started = Gate()

    @bg.task
    async def slow_cleanup() -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(WAIT)  # longer than any grace

    bg.start()
    job = slow_cleanup.submit()
    assert started.wait()
    report = bg.stop(timeout=0.1)
    assert report.finished
    assert (report.completed, report.cancelled, report.abandoned) == (0, 0, 1)
    with pytest.raises(JobCancelled):
        job.result(0)


def test_every_accepted_job_is_accounted_for_when_stop_races_submitters(
    make_app: Any,
) -> None:
    for _round in range(40):
        _app, bg = make_app()

        @bg.task(name=f"t{_round}")
        async def trivial() -> None:
            await asyncio.sleep(0)

        bg.start()
        accepted: list[Any] = []
        go = threading.Event()

        def submitter(go: threading.Event = go) -> None:
            go.wait(WAIT)
            for _ in range(2_000):
                try:
                    accepted.append(trivial.submit())  # noqa: B023 - this round's task
                except NotRunning:
                    return

        threads = [threading.Thread(target=submitter) for _ in range(8)]
        for t in threads:
            t.start()
        go.set()
        report = bg.stop(timeout=0.05)
        for t in threads:
            t.join(WAIT)
        assert report.finished
        assert all(job.done() for job in accepted)
        cancelled = sum(job.status is JobStatus.CANCELLED for job in accepted)
        assert cancelled == report.cancelled + report.abandoned
        succeeded = sum(job.status is JobStatus.SUCCEEDED for job in accepted)
        assert succeeded + cancelled == len(accepted)


# -- 3. SystemExit / KeyboardInterrupt never end the loop ------------------------------

LOOP_ENDERS = [SystemExit, KeyboardInterrupt]


@pytest.mark.parametrize("exc_type", LOOP_ENDERS)
@pytest.mark.parametrize("where", ["before_await", "after_await", "sync"])
def test_a_job_raising_a_loop_ender_fails_and_the_loop_lives_on(
    make_app: Any, exc_type: type[BaseException], where: str
) -> None:
    _app, bg = make_app()

    async def raises_async() -> None:
        if where == "after_await":
            await asyncio.sleep(0)
        raise exc_type("from the job")

    def raises_sync() -> None:
        raise exc_type("from the job")

    bg.start()
    job = bg.submit(raises_sync if where == "sync" else raises_async)
    assert job.wait(WAIT)
    assert job.status is JobStatus.FAILED
    assert isinstance(job._exception, exc_type)
    assert job.attempts == 1
    # The loop still runs work.
    assert bg.submit(asyncio.sleep, 0, "alive").result(WAIT) == "alive"
    assert bg.loop_thread.running


@pytest.mark.parametrize("exc_type", LOOP_ENDERS)
@pytest.mark.parametrize("is_async", [True, False])
def test_a_consumer_raising_a_loop_ender_fails_that_item_and_goes_on(
    make_app: Any, exc_type: type[BaseException], is_async: bool
) -> None:
    _app, bg = make_app()
    handled = Gate()

    def handle(item: str) -> None:
        if item == "bad":
            raise exc_type("from the consumer")
        handled.set()

    if is_async:

        async def handler(item: str) -> None:
            handle(item)

        bg.consumer("q")(handler)
    else:
        bg.consumer("q")(handle)
    bg.start()
    bg.enqueue("q", "bad")
    bg.enqueue("q", "good")
    assert handled.wait()
    q = bg.get_queue("q")
    wait_for(lambda: q.failed == 1 and q.processed == 1, what="both items handled")
    assert exc_type.__name__ in (q.last_error or "")
    assert bg.loop_thread.running


@pytest.mark.parametrize("exc_type", LOOP_ENDERS)
@pytest.mark.parametrize("before_first_await", [True, False])
def test_an_async_view_raising_a_loop_ender_reaches_the_request_as_in_stock_flask(
    make_app: Any, exc_type: type[BaseException], before_first_await: bool
) -> None:
    app, bg = make_app()

    @app.get("/boom")
    async def boom() -> str:
        if not before_first_await:
            await asyncio.sleep(0)
        raise exc_type("from the view")

    @app.get("/ok")
    async def ok() -> str:
        await asyncio.sleep(0)
        return "ok"

    bg.start()
    client = app.test_client()
    result: list[BaseException] = []

    def request() -> None:
        try:
            client.get("/boom")
        except BaseException as exc:
            result.append(exc)

    # In a thread with a bound: before the fix the request waited forever.
    t = threading.Thread(target=request, daemon=True)
    t.start()
    t.join(WAIT)
    assert not t.is_alive(), "the request never got an answer"
    assert [type(e) for e in result] == [exc_type]
    assert client.get("/ok").data == b"ok"


class _Fatal(BaseException):
    """What really ends a loop thread: the loop's own machinery failing."""


def test_waiters_get_an_error_when_the_loop_thread_dies(make_app: Any) -> None:
    _app, bg = make_app()
    started = Gate()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    bg.start()
    job = bg.submit(forever)
    fut = bg.loop_thread.submit(asyncio.Event().wait())
    assert started.wait()

    loop = bg.loop_thread.loop

    def broken_iteration() -> None:
        raise _Fatal  # as a failing selector would, out of run_forever()

    # The next loop iteration fails: the loop thread ends without a stop.
    bg.loop_thread.post(setattr, loop, "_run_once", broken_iteration)
    with pytest.raises(JobCancelled):
        job.result(WAIT)
    with pytest.raises(NotRunning):
        fut.result(WAIT)
    assert not bg.loop_thread.running
    assert bg.last_report is not None
    assert bg.last_report.abandoned >= 1


# -- 4. a job that ignores cancellation ----------------------------------------------


def test_a_stubborn_job_is_abandoned_and_the_instance_restarts_and_stops_again(
    make_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    _app, bg = make_app()
    started = Gate()

    @bg.task
    async def stubborn() -> None:
        started.set()
        while True:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(3600)

    bg.start()
    job = stubborn.submit()
    assert started.wait()
    with caplog.at_level(logging.WARNING, logger="asyncbg"):
        report = bg.stop(timeout=0.1)
    assert (report.cancelled, report.abandoned) == (0, 1)
    assert "1 abandoned" in str(report)
    with pytest.raises(JobCancelled, match="abandoned"):
        job.result(WAIT)
    assert "failed outside its code" not in caplog.text
    bg.start()
    assert bg.submit(asyncio.sleep, 0, 42).result(WAIT) == 42
    again = bg.stop(timeout=1.0)
    assert again.finished
    assert (again.abandoned, again.cancelled) == (0, 0)
    assert not bg.loop_thread.stopping


def test_a_stubborn_job_leaves_no_traceback_at_interpreter_exit(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import asyncio, contextlib, threading
        from flask import Flask
        from asyncbg import AsyncBG

        app = Flask("stubborn")
        app.config.update(ASYNCBG_HANDLE_SIGNALS=False)
        bg = AsyncBG(app)
        started = threading.Event()

        @bg.task
        async def stubborn():
            started.set()
            while True:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(3600)

        stubborn.submit()
        started.wait(10)
        print(bg.stop(timeout=0.1))
        """
    )
    proc = run_python(script, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "1 abandoned" in proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "failed outside its code" not in proc.stderr


# -- 6. fork under load -------------------------------------------------------------


def test_forks_while_another_thread_enqueues_start_clean(make_app: Any) -> None:
    _app, bg = make_app()
    parent_items = Gate()
    hold = threading.Event()
    handled: list[tuple[int, Any]] = []

    @bg.consumer("q", maxsize=100_000)
    async def consume(item: Any) -> None:
        handled.append((os.getpid(), item))
        if item == "hold":
            parent_items.set()
            await asyncio.to_thread(hold.wait, WAIT * 3)

    async def long_job() -> None:
        await asyncio.to_thread(hold.wait, WAIT * 3)

    async def child_job() -> int:
        return os.getpid()

    bg.start()
    bg.enqueue("q", "hold")
    assert parent_items.wait()
    bg.submit(long_job)  # running in the parent: the child must not wait for it
    for i in range(5):
        bg.enqueue("q", f"parent-{i}")  # queued in the parent, never the child's
    stop = threading.Event()

    def hammer() -> None:
        n = 0
        while not stop.is_set() and n < 200_000:
            with contextlib.suppress(Exception):
                bg.enqueue("q", n)
                bg.submit(asyncio.sleep, 0)
            n += 1

    hammering = threading.Thread(target=hammer)
    hammering.start()
    try:
        for _ in range(40):

            def child() -> dict[str, Any]:
                q = bg.get_queue("q")
                inherited = q.depth
                pid = bg.submit(child_job).result(WAIT)
                bg.enqueue("q", "child-item")
                bg.wait_idle(WAIT)
                mine = [item for p, item in handled if p == os.getpid()]
                return {"inherited": inherited, "pid_ok": pid == os.getpid(), "mine": mine}

            assert in_child(child) == {"inherited": 0, "pid_ok": True, "mine": ["child-item"]}
    finally:
        stop.set()
        hammering.join(WAIT)
        hold.set()


def test_a_fork_while_another_thread_holds_the_queue_lock_does_not_hang_the_child(
    make_app: Any,
) -> None:
    _app, bg = make_app()

    @bg.consumer("q")
    async def consume(item: Any) -> None:
        pass

    bg.start()
    q = bg.get_queue("q")
    holding, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        with q._lock:
            holding.set()
            release.wait(WAIT)

    t = threading.Thread(target=hold_lock)
    t.start()
    assert holding.wait(WAIT)
    try:

        def child() -> dict[str, Any]:
            bg.enqueue("q", "x")
            bg.wait_idle(WAIT)
            return {"processed": bg.get_queue("q").processed}

        assert in_child(child) == {"processed": 1}
    finally:
        release.set()
        t.join(WAIT)


# -- 11. progress values stay JSON-safe -------------------------------------------------


def test_set_progress_accepts_numpy_numbers_and_stores_plain_floats(make_app: Any) -> None:
    numpy = pytest.importorskip("numpy")
    _app, bg = make_app()

    seen: list[Progress | None] = []

    async def reports_progress() -> None:
        from asyncbg import current_job

        current_job().set_progress(numpy.int64(3), numpy.float32(10), "three of ten")
        seen.append(current_job().progress)

    bg.start()
    job = bg.submit(reports_progress)
    job.result(WAIT)
    assert seen == [Progress(3.0, 10.0, "three of ten")]
    assert seen[0] is not None
    assert type(seen[0].done) is float
    # Succeeded, so completed: done = total, still plain floats.
    assert job.progress == Progress(10.0, 10.0, "three of ten")
    assert type(job.progress.done) is float
    json.dumps(job.to_dict(), allow_nan=False)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((float("nan"),), ValueError),
        ((1.0, float("inf")), ValueError),
        (("3",), TypeError),
        ((True,), TypeError),
        ((1.0, None, 42), TypeError),
    ],
)
def test_set_progress_refuses_what_json_cannot_carry(
    make_app: Any, args: tuple[Any, ...], error: type[Exception]
) -> None:
    _app, bg = make_app()
    job = bg.runner.create(lambda: None, (), {})
    with pytest.raises(error):
        job.set_progress(*args)
    assert job.progress is None


def test_set_progress_bounds_the_message(make_app: Any) -> None:
    _app, bg = make_app()
    job = bg.runner.create(lambda: None, (), {})
    job.set_progress(1, 2, "x" * 5_000_000)
    assert job.progress is not None
    assert len(job.progress.message or "") == 1000


# -- 14. stop() from a sync job --------------------------------------------------------


def test_stop_from_a_sync_job_returns_promptly_and_keeps_its_result(make_app: Any) -> None:
    _app, bg = make_app(ASYNCBG_SHUTDOWN_TIMEOUT=30.0)
    returned = Gate()
    reports: list[Any] = []

    @bg.task
    def stops_its_own_loop() -> str:
        reports.append(bg.stop())
        returned.set()
        return "value"

    bg.start()
    job = stops_its_own_loop.submit()
    assert returned.wait()  # before the fix: only after the 30 s timeout
    assert job.result(WAIT) == "value"
    assert bg.loop_thread._stopped.wait(WAIT)
    assert reports[0].completed == 1
    assert reports[0].cancelled == 0


# -- 15. several unstopped apps at exit ------------------------------------------------


def test_unstopped_apps_drain_concurrently_at_exit(tmp_path: Path) -> None:
    timeout = 3.0
    script = textwrap.dedent(
        f"""
        import asyncio, sys, threading, time
        from flask import Flask
        from asyncbg import AsyncBG

        started = []
        for i in range(3):
            app = Flask(f"app{{i}}")
            app.config.update(ASYNCBG_HANDLE_SIGNALS=False, ASYNCBG_SHUTDOWN_TIMEOUT={timeout})
            bg = AsyncBG(app)
            gate = threading.Event()
            started.append(gate)

            async def forever(gate=gate):
                gate.set()
                await asyncio.Event().wait()

            bg.submit(forever)
        for gate in started:
            gate.wait(10)
        print("exiting", time.monotonic(), flush=True)
        """
    )
    proc = run_python(script, tmp_path)
    done = time.monotonic()
    assert proc.returncode == 0, proc.stderr
    exiting = float(proc.stdout.split()[1])
    # One after the other they took 3 x the timeout; together about one.
    assert done - exiting < 2 * timeout, proc.stderr


def test_current_app_is_kept_in_sync_jobs_across_a_restart(make_app: Any) -> None:
    # A guard for the restructured stop: a restarted loop still pushes the app context.
    app, bg = make_app()

    def name() -> str:
        return current_app.name

    bg.start()
    assert bg.submit(name).result(WAIT) == app.name
    bg.stop(timeout=1.0)
    bg.start()
    assert bg.submit(name).result(WAIT) == app.name


# -- 13. failures that repeat do not flood the log --------------------------------------


def _asyncbg_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "asyncbg"]


def test_a_consumer_failing_on_every_item_logs_short_lines_and_one_traceback(
    make_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    _app, bg = make_app()

    @bg.consumer("q", maxsize=200)
    async def always_fails(item: Any) -> None:
        raise ValueError("no")

    bg.start()
    q = bg.get_queue("q")
    big = "x" * 5_000_000
    with caplog.at_level(logging.ERROR, logger="asyncbg"):
        for _ in range(100):
            bg.enqueue("q", big)
        bg.wait_idle(WAIT)
        bg.stop(timeout=1.0)
    assert q.failed == 100  # every failure counted, whatever was logged
    records = [r for r in _asyncbg_records(caplog) if "consumer" in r.getMessage()]
    with_traceback = [r for r in records if r.exc_info]
    assert len(with_traceback) == 1
    # The first in full (a short repr of the item), the other 99 in one summary line.
    assert any("99 more failures of consumer q" in r.getMessage() for r in records)
    assert len(records) == 2
    assert all(len(r.getMessage()) < 1_000 for r in records)


def test_a_task_failing_again_and_again_logs_one_traceback_then_counts(
    make_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    _app, bg = make_app()

    @bg.task
    async def flaky() -> None:
        raise RuntimeError("again")

    bg.start()
    with caplog.at_level(logging.ERROR, logger="asyncbg"):
        jobs = [flaky.submit() for _ in range(50)]
        for job in jobs:
            job.wait(WAIT)
        bg.stop(timeout=1.0)
    assert all(job.status is JobStatus.FAILED for job in jobs)
    records = _asyncbg_records(caplog)
    assert sum(1 for r in records if r.exc_info) == 1
    assert any("49 more failures of job flaky" in r.getMessage() for r in records)


def test_the_failure_summary_is_logged_when_its_interval_ends(
    make_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from asyncbg.engine.logthrottle import LogThrottle

    _app, bg = make_app()

    @bg.consumer("q")
    async def always_fails(item: Any) -> None:
        raise ValueError(item)

    q = bg.get_queue("q")
    q.log_throttle = LogThrottle(interval=0.2)
    bg.start()
    with caplog.at_level(logging.ERROR, logger="asyncbg"):
        for i in range(3):
            bg.enqueue("q", i)
        wait_for(
            lambda: any("2 more failures" in r.getMessage() for r in caplog.records),
            what="the summary line, without a stop or another failure",
        )


def test_wait_idle_is_not_stranded_by_a_callback_that_starts_no_work(make_app: Any) -> None:
    # Found by the plugin's user suite under load: wait_idle() looked while a
    # plain callback was still in the inbox, then waited for an idle hook that
    # nothing was left to call.
    _app, bg = make_app()
    bg.start()
    _, release = _hold_the_loop(bg.loop_thread)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            bg.wait_idle(WAIT)
        except BaseException as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    wait_for(lambda: bg.loop_thread.pending_posts >= 1, what="wait_idle's post")
    bg.loop_thread.post(lambda: None)  # after it in the inbox, starts nothing
    release.set()
    waiter.join(WAIT * 2)
    assert not waiter.is_alive()
    assert errors == []

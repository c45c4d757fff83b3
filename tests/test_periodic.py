"""Periodic jobs: fixed rate, fixed delay, cron, jitter, stats, host scope."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
import threading
import time
from typing import Any

import pytest
from croniter import croniter
from flask import current_app, g

from asyncbg import AsyncBG, PeriodicJob

WAIT = 15.0  # upper bound on any wait for runs to happen (never reached when all is well)


def loop_time(bg: AsyncBG) -> float:
    return bg.loop_thread.loop.time()


def test_fixed_rate_start_error_does_not_grow_with_the_number_of_ticks(make_app):
    # Each run takes 60% of its period: a scheduler that re-arms after each run
    # would drift by 30 ms a tick, 1.2 s over 40 ticks.
    period, work, ticks = 0.05, 0.03, 40
    _app, bg = make_app()
    starts: list[tuple[int, float]] = []  # (tick index, loop time at start)
    done = threading.Event()

    @bg.periodic(every=period)
    async def busy() -> None:
        # a skipped tick (a loaded machine) moves the run to a later tick index
        starts.append((job.runs + job.skips, asyncio.get_running_loop().time()))
        if len(starts) == ticks:
            done.set()
        await asyncio.sleep(work)

    job = busy
    bg.start()
    assert done.wait(WAIT)
    bg.stop(1.0)
    idx0, t0 = starts[0]
    errors = [abs(t - (t0 + (idx - idx0) * period)) for idx, t in starts]
    first, last = sum(errors[:10]) / 10, sum(errors[-10:]) / 10
    assert last < period / 2, f"start error grew to {last:.4f}s (first ticks: {first:.4f}s)"
    assert last - first < period / 2


def test_run_that_finishes_without_awaiting_keeps_its_schedule(make_app):
    # On Python 3.12+ such a run completes inside the scheduler's own callback
    # (eager task start).
    _app, bg = make_app()
    done = threading.Event()
    count = 0

    @bg.periodic(every=0.02)
    async def quick() -> None:
        nonlocal count
        count += 1
        if count == 5:
            done.set()

    bg.start()
    assert done.wait(WAIT), f"{count} run(s), {quick.skips} skip(s)"


def test_run_longer_than_the_period_is_never_overlapped(make_app):
    _app, bg = make_app()
    running = 0
    max_running = 0
    finished = 0
    three_done = threading.Event()

    @bg.periodic(every=0.03)
    async def slow() -> None:
        nonlocal running, max_running, finished
        running += 1
        max_running = max(max_running, running)
        try:
            await asyncio.sleep(0.1)
        finally:
            running -= 1
            finished += 1
            if finished == 3:
                three_done.set()

    bg.start()
    assert three_done.wait(WAIT)
    bg.stop(1.0)
    assert max_running == 1


def test_tick_missed_by_a_long_run_is_counted_and_logged(make_app, caplog):
    caplog.set_level(logging.WARNING, logger="asyncbg")
    _app, bg = make_app()
    second_started = threading.Event()
    starts = 0

    @bg.periodic(every=0.03, name="slow")
    async def slow() -> None:
        nonlocal starts
        starts += 1
        if starts == 2:
            second_started.set()
        await asyncio.sleep(0.1)

    bg.start()
    assert second_started.wait(WAIT)
    bg.stop(1.0)
    assert slow.skips >= 1
    skipped = [r for r in caplog.records if "skipped a tick" in r.getMessage()]
    assert skipped, "no skip was logged"
    assert "slow" in skipped[0].getMessage()
    assert skipped[0].levelno == logging.WARNING


def test_exception_in_a_run_is_logged_counted_and_the_schedule_goes_on(make_app, caplog):
    caplog.set_level(logging.ERROR, logger="asyncbg")
    _app, bg = make_app()
    later_run = threading.Event()
    calls = 0

    @bg.periodic(every=0.02, name="flaky")
    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("boom")
        if calls == 3:
            later_run.set()

    bg.start()
    assert later_run.wait(WAIT)
    bg.stop(1.0)
    assert flaky.failures == 1
    failed = [r for r in caplog.records if "periodic job flaky failed" in r.getMessage()]
    assert len(failed) == 1
    assert failed[0].exc_info is not None
    assert isinstance(failed[0].exc_info[1], ValueError)


def test_snapshot_reports_last_start_duration_error_next_due_and_counts(make_app):
    period = 0.1
    _app, bg = make_app()
    seen: dict[str, Any] = {}
    taken = threading.Event()
    calls = 0

    @bg.periodic(every=period, name="stats")
    async def stats() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            # longer than the period: the next tick is skipped
            await asyncio.sleep(period * 1.5)
            raise ValueError("boom 1")
        if calls == 2:
            await asyncio.sleep(0)  # let the scheduler arm the next tick
            seen.update(stats.snapshot(), now=time.time())
            taken.set()

    bg.start()
    assert taken.wait(WAIT)
    bg.stop(1.0)
    now = seen.pop("now")
    assert seen["name"] == "stats"
    assert seen["schedule"] == "every 0.1s"
    assert seen["running"] is True
    assert seen["runs"] == 1
    assert seen["failures"] == 1
    assert seen["skips"] >= 1
    assert seen["last_error"] == "ValueError: boom 1"
    assert seen["last_duration"] >= period * 1.5
    assert now - 5.0 < seen["last_start"] <= now
    assert now < seen["next_due"] <= now + period + 0.05


def test_run_at_start_runs_at_once(make_app):
    _app, bg = make_app()
    ran = threading.Event()

    @bg.periodic(every=60.0, run_at_start=True)
    async def eager() -> None:
        ran.set()

    bg.start()
    assert ran.wait(WAIT)


def test_first_run_waits_one_period_by_default(make_app):
    period = 0.3
    _app, bg = make_app()
    first: list[float] = []
    ran = threading.Event()

    @bg.periodic(every=period)
    async def later() -> None:
        first.append(time.monotonic())
        ran.set()

    t0 = time.monotonic()
    bg.start()
    assert ran.wait(WAIT)
    # asyncio's loop.time() is time.monotonic(); allow its timer granularity
    assert first[0] - t0 >= period - 0.005


def test_fixed_delay_leaves_the_delay_between_the_end_of_a_run_and_the_next_start(make_app):
    delay, work = 0.1, 0.05
    _app, bg = make_app()
    spans: list[tuple[float, float]] = []
    done = threading.Event()

    @bg.periodic(delay=delay)
    async def worker() -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.sleep(work)
        spans.append((start, loop.time()))
        if len(spans) == 5:
            done.set()

    bg.start()
    assert done.wait(WAIT)
    bg.stop(1.0)
    gaps = [nxt[0] - prev[1] for prev, nxt in itertools.pairwise(spans)]
    assert min(gaps) >= delay - 0.005, gaps


def test_jitter_delays_each_start_by_between_zero_and_jitter(make_app):
    period, jitter, ticks = 0.2, 0.1, 8
    tolerance = 0.03  # loop latency on a loaded machine
    _app, bg = make_app()
    starts: list[float] = []
    done = threading.Event()

    @bg.periodic(every=period, jitter=jitter)
    async def jittery() -> None:
        starts.append(asyncio.get_running_loop().time())
        if len(starts) == ticks:
            done.set()

    before = time.monotonic()
    bg.start()
    after = time.monotonic()  # the schedule's anchor lies in [before, after]
    assert done.wait(WAIT)
    bg.stop(1.0)
    assert jittery.skips == 0
    low = [t - (after + (n + 1) * period) for n, t in enumerate(starts)]
    high = [t - (before + (n + 1) * period) for n, t in enumerate(starts)]
    assert all(x >= -0.005 for x in high), f"a start came before its due time: {high}"
    assert all(x <= jitter + tolerance for x in low), f"a start came later than jitter: {low}"
    assert max(low) > jitter / 4, f"jitter never applied: {low}"


@pytest.mark.parametrize("expr", ["not a cron", "61 * * * *", "* * *", "* * * * * * * *"])
def test_bad_cron_expression_raises_value_error(make_app, expr):
    _app, bg = make_app()

    async def job() -> None:
        pass

    with pytest.raises(ValueError, match="cron"):
        bg.periodic(cron=expr)(job)
    assert not bg.periodic_jobs


def test_cron_with_seconds_field_fires_on_whole_seconds(make_app):
    _app, bg = make_app()
    starts: list[float] = []
    done = threading.Event()

    @bg.periodic(cron="* * * * * *")
    async def every_second() -> None:
        starts.append(time.time())
        if len(starts) == 2:
            done.set()

    bg.start()
    assert done.wait(WAIT)
    bg.stop(1.0)
    assert starts[1] - starts[0] >= 0.5, starts  # one run per second, not a burst


def test_cron_next_due_matches_croniter(make_app):
    expr = "0 3 1 * *"  # 03:00 on the first of each month
    _app, bg = make_app()

    @bg.periodic(cron=expr)
    async def monthly() -> None:
        pass

    bg.start()
    expected = croniter(expr, dt.datetime.now().astimezone()).get_next(float)
    next_due = bg.call(lambda: monthly.next_due)
    assert next_due is not None
    assert abs(next_due - expected) < 1.0


@pytest.mark.parametrize(
    "schedule",
    [
        {},
        {"every": 1.0, "delay": 1.0},
        {"every": 1.0, "cron": "* * * * *"},
        {"delay": 1.0, "cron": "* * * * *"},
    ],
    ids=["none", "every+delay", "every+cron", "delay+cron"],
)
def test_periodic_needs_exactly_one_of_every_delay_cron(make_app, schedule):
    _app, bg = make_app()

    async def job() -> None:
        pass

    with pytest.raises(ValueError, match="exactly one"):
        bg.periodic(**schedule)(job)


def test_periodic_rejects_a_plain_function(make_app):
    _app, bg = make_app()

    def not_async() -> None:
        pass

    with pytest.raises(TypeError, match="async"):
        bg.periodic(every=1.0)(not_async)  # type: ignore[arg-type]


class _HostScoped:
    """Two AsyncBG instances (two apps with one import name) sharing a lock dir."""

    def __init__(self, make_app, tmp_path, enough_after: int) -> None:
        self.runs: list[str] = []
        self.enough = threading.Event()
        self.ran = {who: threading.Event() for who in ("a", "b")}
        self.bgs: dict[str, AsyncBG] = {}
        self.jobs: dict[str, PeriodicJob] = {}
        for who in ("a", "b"):
            _app, bg = make_app(import_name="shared_app", ASYNCBG_LOCK_DIR=str(tmp_path))
            self.bgs[who] = bg
            self.jobs[who] = bg.periodic(every=0.05, scope="host", name="tick")(
                self._tick(who, enough_after)
            )

    def _tick(self, who: str, enough_after: int) -> Any:
        async def tick() -> None:
            self.runs.append(who)
            self.ran[who].set()
            if len(self.runs) >= enough_after:
                self.enough.set()

        return tick

    def start(self) -> None:
        for bg in self.bgs.values():
            bg.start()


def test_host_scope_runs_in_one_instance_per_tick(make_app, tmp_path):
    pair = _HostScoped(make_app, tmp_path, enough_after=10)
    pair.start()
    assert pair.enough.wait(WAIT)
    runs = list(pair.runs)  # before any stop releases the lock to the other
    for bg in pair.bgs.values():
        bg.stop(1.0)
    assert len(set(runs)) == 1, "".join(runs)


def test_host_scope_other_instance_takes_over_when_the_holder_stops(make_app, tmp_path):
    pair = _HostScoped(make_app, tmp_path, enough_after=3)
    pair.start()
    assert pair.enough.wait(WAIT)
    holder = pair.runs[0]
    other = "b" if holder == "a" else "a"
    assert not pair.ran[other].is_set(), pair.runs
    pair.bgs[holder].stop(1.0)
    assert pair.ran[other].wait(WAIT), f"{other} never took over: {pair.runs}"
    assert pair.jobs[other].holds_lock is True


def test_periodic_runs_inside_the_app_context(make_app):
    app, bg = make_app()
    seen: dict[str, Any] = {}
    ran = threading.Event()

    @bg.periodic(every=0.02)
    async def in_context() -> None:
        g.marker = "set in run"
        seen["app"] = current_app._get_current_object()
        seen["g"] = g.marker
        ran.set()

    bg.start()
    assert ran.wait(WAIT)
    assert seen["app"] is app
    assert seen["g"] == "set in run"


def test_periodic_registered_after_start_still_starts(make_app):
    _app, bg = make_app()
    bg.start()
    ran = threading.Event()

    @bg.periodic(every=0.02)
    async def late() -> None:
        ran.set()

    assert isinstance(late, PeriodicJob)
    assert ran.wait(WAIT)

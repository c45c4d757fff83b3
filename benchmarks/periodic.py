"""3. Periodic accuracy: ticks at 20 ms with 5 ms of work per run, idle and
with a GIL-hungry thread; cumulative drift and p99 start error.

Every start is compared with the time it was due on the ideal schedule
(start + k * 20 ms, on the monotonic clock the loops use too).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable

from .harness import Deadline, Mode, Section, gil_hog, interleaved, median, percentile
from .subjects import RawLoop, make_bg

PERIOD = 0.020
WORK = 0.005


def _work() -> None:
    # 5 ms of work that holds the GIL, as real Python code would
    end = time.perf_counter() + WORK
    while time.perf_counter() < end:
        pass


def _drift(errors: list[float]) -> float:
    """How far the schedule moved over the run: the median start error of the
    last ticks minus that of the first ones (a single tick's lateness is
    jitter, not drift)."""
    k = max(1, min(10, len(errors) // 10))
    return median(errors[-k:]) - median(errors[:k])


# (start, due) of every run, on time.monotonic()
Runner = Callable[[int, Deadline], list[tuple[float, float]]]


def timer_chain(n: int, deadline: Deadline) -> list[tuple[float, float]]:
    """The seed pattern: a threading.Timer re-armed at the end of each run."""
    runs: list[tuple[float, float]] = []
    done = threading.Event()
    t0 = time.monotonic()

    def tick() -> None:
        runs.append((time.monotonic(), t0 + (len(runs) + 1) * PERIOD))
        _work()
        if len(runs) >= n or deadline.passed():
            done.set()
            return
        t = threading.Timer(PERIOD, tick)
        t.daemon = True
        t.start()

    t = threading.Timer(PERIOD, tick)
    t.daemon = True
    t.start()
    done.wait(n * (PERIOD + WORK) * 4 + 10)
    return runs


def raw_asyncio(n: int, deadline: Deadline) -> list[tuple[float, float]]:
    """A raw asyncio fixed-rate loop in a thread: sleep until anchor + k * period."""
    raw = RawLoop("asyncio")
    runs: list[tuple[float, float]] = []

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        for _ in range(n):
            due += PERIOD
            await asyncio.sleep(max(0.0, due - loop.time()))
            runs.append((loop.time(), due))
            _work()
            if deadline.passed():
                return

    try:
        asyncio.run_coroutine_threadsafe(ticker(), raw.loop).result(n * PERIOD * 4 + 10)
    finally:
        raw.close()
    return runs


def asyncbg_every(n: int, deadline: Deadline) -> list[tuple[float, float]]:
    """asyncbg: @bg.periodic(every=0.02)."""
    runs: list[tuple[float, float]] = []
    done = threading.Event()
    _app, bg = make_bg()

    @bg.periodic(every=PERIOD)
    async def tick() -> None:
        now = asyncio.get_running_loop().time()
        # the slot this run was due in: never early, and never a whole period
        # late (asyncbg skips those ticks instead)
        k = math.floor((now - tick._anchor) / PERIOD + 1e-9)
        runs.append((now, tick._anchor + k * PERIOD))
        _work()
        if len(runs) >= n or deadline.passed():
            done.set()

    try:
        done.wait(n * PERIOD * 4 + 10)
    finally:
        bg.stop(2)
    return runs[:n]


RUNNERS: dict[str, Runner] = {
    "raw asyncio fixed-rate loop": raw_asyncio,
    "seed: threading.Timer chain": timer_chain,
    "asyncbg @periodic(every=)": asyncbg_every,
}


def run(mode: Mode) -> Section:
    sec = Section("periodic")
    n = mode.periodic_ticks
    for cond, contended in (("idle", False), ("contended", True)):
        deadline = Deadline(mode.time_budget)

        def one(
            r: Runner, contended: bool = contended, deadline: Deadline = deadline
        ) -> Callable[[], list[tuple[float, float]]]:
            def go() -> list[tuple[float, float]]:
                with gil_hog(contended):
                    return r(n, deadline)

            return go

        res = interleaved({k: one(r) for k, r in RUNNERS.items()}, mode.periodic_trials)
        group = f"{n} ticks @20ms, {cond}"
        for name, trials in res.items():
            errs = [[s - d for s, d in runs] for runs in trials if len(runs) > 1]
            skipped = median(
                [
                    round((runs[-1][1] - runs[0][1]) / PERIOD) + 1 - len(runs)
                    for runs in trials
                    if runs
                ]
            )
            sec.add(group, name, "drift", median([_drift(e) for e in errs]) * 1e3, "ms")
            sec.add(group, name, "p50 error", median([percentile(e, 50) for e in errs]) * 1e3, "ms")
            sec.add(group, name, "p99 error", median([percentile(e, 99) for e in errs]) * 1e3, "ms")
            sec.add(group, name, "ticks skipped", skipped, "")
            sec.raw.setdefault(cond, {})[name] = errs[0] if errs else []
        sec.ratio(group, "p50 error", "raw asyncio fixed-rate loop")
        sec.ratio(group, "p99 error", "raw asyncio fixed-rate loop")
        ours = "asyncbg @periodic(every=)"
        if contended:
            sec.target(group, ours, "drift", "abs(drift) <= 5 ms", lambda r: abs(r.value) <= 5.0)
        else:
            sec.target(group, ours, "drift", "abs(drift) <= 1 ms", lambda r: abs(r.value) <= 1.0)
        base = sec.find(group, "raw asyncio fixed-rate loop", "p99 error")
        row = sec.find(group, ours, "p99 error")
        if base is not None and row is not None:
            row.target = f"<= 1.0x raw asyncio ({row.value / base.value:.2f}x)"
            # within 0.1 ms counts as equal: below that the ratio measures noise
            row.met = row.value <= base.value + 0.1
    return sec

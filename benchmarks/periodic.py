"""3. Periodic accuracy: ticks at 20 ms with 5 ms of work per run, idle and
with a GIL-hungry thread; cumulative drift and p99 start error."""

from __future__ import annotations

import asyncio
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


def _slots(starts: list[float]) -> list[int]:
    """The schedule slot of each start of a fixed-rate scheduler, which never
    drifts by half a period: a skipped tick leaves a gap instead of shifting the
    ticks after it by a period."""
    return [round((s - starts[0]) / PERIOD) for s in starts]


def _errors(starts: list[float], slots: list[int]) -> list[float]:
    # each start against the schedule anchored on the first one
    return [s - starts[0] - (k - slots[0]) * PERIOD for k, s in zip(slots, starts, strict=True)]


def _drift(errors: list[float]) -> float:
    """How far the schedule moved over the run: the median start error of the
    last ticks minus that of the first ones (a single tick's lateness is
    jitter, not drift)."""
    k = max(1, min(10, len(errors) // 10))
    return median(errors[-k:]) - median(errors[:k])


Runner = Callable[[int, Deadline], tuple[list[float], list[int]]]


def timer_chain(n: int, deadline: Deadline) -> tuple[list[float], list[int]]:
    """The seed pattern: a threading.Timer re-armed at the end of each run."""
    starts: list[float] = []
    done = threading.Event()

    def tick() -> None:
        starts.append(time.monotonic())
        _work()
        if len(starts) >= n or deadline.passed():
            done.set()
            return
        t = threading.Timer(PERIOD, tick)
        t.daemon = True
        t.start()

    t = threading.Timer(PERIOD, tick)
    t.daemon = True
    t.start()
    done.wait(n * (PERIOD + WORK) * 4 + 10)
    return starts, list(range(len(starts)))  # no schedule: the i-th run is tick i


def raw_asyncio(n: int, deadline: Deadline) -> tuple[list[float], list[int]]:
    """A raw asyncio fixed-rate loop in a thread: sleep until anchor + k * period."""
    raw = RawLoop("asyncio")
    starts: list[float] = []

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        for _ in range(n):
            due += PERIOD
            await asyncio.sleep(max(0.0, due - loop.time()))
            starts.append(time.monotonic())
            _work()
            if deadline.passed():
                return

    try:
        asyncio.run_coroutine_threadsafe(ticker(), raw.loop).result(n * PERIOD * 4 + 10)
    finally:
        raw.close()
    return starts, list(range(len(starts)))  # it never skips: the i-th run is tick i


def asyncbg_every(n: int, deadline: Deadline) -> tuple[list[float], list[int]]:
    """asyncbg: @bg.periodic(every=0.02)."""
    starts: list[float] = []
    done = threading.Event()
    _app, bg = make_bg()

    @bg.periodic(every=PERIOD)
    async def tick() -> None:
        starts.append(time.monotonic())
        _work()
        if len(starts) >= n or deadline.passed():
            done.set()

    try:
        done.wait(n * PERIOD * 4 + 10)
    finally:
        bg.stop(2)
    return starts[:n], _slots(starts[:n])


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

        def one(r: Runner, contended: bool = contended, deadline: Deadline = deadline):
            def go() -> list[float]:
                with gil_hog(contended):
                    return r(n, deadline)

            return go

        res = interleaved({k: one(r) for k, r in RUNNERS.items()}, mode.periodic_trials)
        group = f"{n} ticks @20ms, {cond}"
        for name, trials in res.items():
            errs = [_errors(s, k) for s, k in trials if len(s) > 1]
            skipped = median([float(k[-1] - k[0] + 1 - len(k)) for s, k in trials if k])
            drift = median([_drift(e) for e in errs])
            p99 = median([percentile([abs(x) for x in e], 99) for e in errs])
            sec.add(group, name, "drift", drift * 1e3, "ms")
            sec.add(group, name, "p99 error", p99 * 1e3, "ms")
            sec.add(group, name, "ticks skipped", skipped, "")
            sec.raw.setdefault(cond, {})[name] = errs[0] if errs else []
        sec.ratio(group, "p99 error", "raw asyncio fixed-rate loop")
        ours = "asyncbg @periodic(every=)"
        if contended:
            sec.target(group, ours, "drift", "|drift| <= 5 ms", lambda r: abs(r.value) <= 5.0)
        else:
            sec.target(group, ours, "drift", "|drift| <= 1 ms", lambda r: abs(r.value) <= 1.0)
        base = sec.find(group, "raw asyncio fixed-rate loop", "p99 error")
        row = sec.find(group, ours, "p99 error")
        if base is not None and row is not None:
            row.target = f"<= 1.0x raw asyncio ({row.value / base.value:.2f}x)"
            # within 0.1 ms counts as equal: below that the ratio measures noise
            row.met = row.value <= base.value + 0.1
    return sec

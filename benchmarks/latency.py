"""1. Submit-to-start latency, idle and with a GIL-hungry thread competing.

Latency runs from just before the submit call to the first line of the job;
the submit call's own duration (how long it holds the calling view) is
recorded beside it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .harness import Deadline, Mode, Section, gil_hog, interleaved, median, percentile
from .subjects import (
    AsyncBGSubject,
    Body,
    Pool,
    RawLoop,
    SeedPoller,
    _call,
    ablated_loop_thread,
    have_uvloop,
)

Fire = Callable[[Body], object]


def _samples(fire: Fire, n: int, deadline: Deadline) -> tuple[list[float], list[float]]:
    lat: list[float] = []
    call: list[float] = []
    box = [0.0]
    ev = threading.Event()
    perf = time.perf_counter

    def body() -> None:
        box[0] = perf()
        ev.set()

    for _ in range(n):
        ev.clear()
        t0 = perf()
        fire(body)
        t1 = perf()
        if not ev.wait(10):
            raise RuntimeError("a job did not start within 10 s")
        lat.append(box[0] - t0)
        call.append(t1 - t0)
        # pace the samples so that each submission finds the worker idle
        time.sleep(0.0003)
        if deadline.passed():
            break
    return lat, call


def run(mode: Mode) -> Section:
    sec = Section("latency")
    kinds = ["asyncio"] + (["uvloop"] if have_uvloop() else [])
    raws = {k: RawLoop(k) for k in kinds}
    bgs = {k: AsyncBGSubject(k) for k in kinds}
    pool = Pool()
    poller = SeedPoller()
    fires: dict[str, tuple[Fire, bool]] = {}  # name -> (fire, slow: seed poller)
    for k in kinds:
        fires[f"raw rcts ({k})"] = (raws[k].rcts, False)
        fires[f"raw call_soon_threadsafe ({k})"] = (raws[k].cst, False)
    fires["ThreadPoolExecutor.submit"] = (pool.submit, False)
    fires["seed: queue.Queue poller"] = (poller.submit, True)
    for k in kinds:
        s = bgs[k]
        fires[f"LoopThread.submit ({k})"] = (s.lt_submit, False)
        fires[f"AsyncBG.submit ({k})"] = (s.bg_submit, False)
        fires[f"Task.submit ({k})"] = (s.task_submit, False)
        fires[f"enqueue->consumer ({k})"] = (s.enqueue, False)
    # The same LoopThread.submit with one of asyncbg's loop changes undone.
    ablated = {w: ablated_loop_thread(w) for w in ("eager", "wakeup")}
    fires["LoopThread.submit (asyncio, without eager start)"] = (
        lambda body: ablated["eager"].submit(_call(body)),
        False,
    )
    fires["LoopThread.submit (asyncio, stock wake-up socket I/O)"] = (
        lambda body: ablated["wakeup"].submit(_call(body)),
        False,
    )
    try:
        for cond, contended in (("idle", False), ("contended", True)):
            n = mode.contended_samples if contended else mode.latency_samples
            deadline = Deadline(mode.time_budget)

            def subject(
                fire: Fire,
                slow: bool,
                n: int = n,
                contended: bool = contended,
                deadline: Deadline = deadline,
            ) -> Callable[[], tuple[list[float], list[float]]]:
                def one() -> tuple[list[float], list[float]]:
                    with gil_hog(contended):
                        return _samples(fire, mode.poll_samples if slow else n, deadline)

                return one

            res = interleaved(
                {name: subject(f, slow) for name, (f, slow) in fires.items()},
                mode.trials,
                deadline,
            )
            for name, trials in res.items():
                p50 = median([percentile(lat, 50) for lat, _ in trials])
                p90 = median([percentile(lat, 90) for lat, _ in trials])
                p99 = median([percentile(lat, 99) for lat, _ in trials])
                c50 = median([percentile(call, 50) for _, call in trials])
                sec.add(cond, name, "start p50", p50 * 1e6, "us")
                sec.add(cond, name, "start p90", p90 * 1e6, "us")
                sec.add(cond, name, "start p99", p99 * 1e6, "us")
                sec.add(cond, name, "submit call p50", c50 * 1e6, "us")
                sec.raw.setdefault(cond, {})[name] = [x for lat, _ in trials for x in lat]
            for r in sec.rows:
                if r.group != cond:
                    continue
                # against the raw loop of the same type (asyncio's for the others)
                base_name = "raw rcts (uvloop)" if "(uvloop)" in r.subject else "raw rcts (asyncio)"
                base = sec.find(cond, base_name, r.metric)
                if base is not None and base.value:
                    r.baseline, r.ratio = base_name, r.value / base.value
            _targets(sec, cond, kinds)
    finally:
        for a in ablated.values():
            a.stop(5)
        for s in bgs.values():
            s.close()
        for r in raws.values():
            r.close()
        pool.close()
        poller.close()
    return sec


_OURS = ("LoopThread.submit", "AsyncBG.submit", "Task.submit", "enqueue->consumer")


def _targets(sec: Section, cond: str, kinds: list[str]) -> None:
    tpe = sec.find(cond, "ThreadPoolExecutor.submit", "start p50")
    for k in kinds:
        for ours in _OURS:
            name = f"{ours} ({k})"
            if cond == "idle":
                sec.target(cond, name, "start p50", "<= 0.5x raw rcts", lambda r: r.ratio <= 0.5)
            else:
                if tpe is not None and tpe.value:
                    t = tpe.value
                    row = sec.find(cond, name, "start p50")
                    if row is not None:
                        row.target = f"<= 1.1x TPE ({row.value / t:.2f}x)"
                        row.met = row.value <= 1.1 * t
                sec.target(cond, name, "submit call p50", "<= 100 us", lambda r: r.value <= 100.0)

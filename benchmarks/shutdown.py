"""5. Shutdown: stop(timeout) with queued items and running jobs that never end."""

from __future__ import annotations

import asyncio
import threading
import time

from .harness import Mode, Section, interleaved, median
from .subjects import RawLoop, make_bg


def asyncbg_stop(mode: Mode) -> dict[str, float]:
    _app, bg = make_bg()
    running = mode.shutdown_running
    queued = mode.shutdown_queued
    started = threading.Semaphore(0)

    async def forever() -> None:
        started.release()
        await asyncio.sleep(3600)

    # a queue whose single worker is stuck on its first item
    @bg.consumer("stuck", concurrency=1, maxsize=queued + 10)
    async def stuck(item: int) -> None:
        started.release()
        await asyncio.sleep(3600)

    for _ in range(running):
        bg.submit(forever)
    for i in range(queued + 1):  # one goes into the worker's hands
        bg.enqueue("stuck", i, timeout=None)
    for _ in range(running + 1):
        if not started.acquire(timeout=30):
            raise RuntimeError("jobs did not start")
    t0 = time.perf_counter()
    report = bg.stop(mode.shutdown_timeout)
    took = time.perf_counter() - t0
    return {
        "seconds": took,
        "cancelled": report.cancelled,
        "still_queued": report.still_queued,
        "exact": float(report.cancelled == running + 1 and report.still_queued == queued),
    }


def raw_stop(mode: Mode) -> dict[str, float]:
    """A raw loop thread: wait for the tasks up to the timeout, cancel, stop, join."""
    raw = RawLoop("asyncio")
    running = mode.shutdown_running
    queued = mode.shutdown_queued

    async def setup() -> tuple[set[asyncio.Task[None]], asyncio.Queue[int]]:
        q: asyncio.Queue[int] = asyncio.Queue()
        for i in range(queued + 1):
            q.put_nowait(i)

        async def worker() -> None:
            await q.get()
            await asyncio.sleep(3600)

        tasks = {asyncio.create_task(asyncio.sleep(3600)) for _ in range(running)}
        tasks.add(asyncio.create_task(worker()))
        await asyncio.sleep(0)
        return tasks, q

    tasks, q = asyncio.run_coroutine_threadsafe(setup(), raw.loop).result(30)

    async def shutdown() -> int:
        _, pending = await asyncio.wait(tasks, timeout=mode.shutdown_timeout)
        for t in pending:
            t.cancel()
        await asyncio.wait(pending, timeout=0.05)
        return len(pending)

    t0 = time.perf_counter()
    cancelled = asyncio.run_coroutine_threadsafe(shutdown(), raw.loop).result(60)
    raw.close()
    took = time.perf_counter() - t0
    return {"seconds": took, "cancelled": cancelled, "still_queued": q.qsize(), "exact": 1.0}


def run(mode: Mode) -> Section:
    sec = Section("shutdown")
    group = (
        f"stop({mode.shutdown_timeout:g}s): {mode.shutdown_queued} queued, "
        f"{mode.shutdown_running} running"
    )
    res = interleaved(
        {
            "raw asyncio loop thread": lambda: raw_stop(mode),
            "AsyncBG.stop": lambda: asyncbg_stop(mode),
        },
        mode.trials,
    )
    for name, vals in res.items():
        sec.add(group, name, "time", median([v["seconds"] for v in vals]), "s")
        sec.add(
            group,
            name,
            "over timeout",
            median([v["seconds"] for v in vals]) - mode.shutdown_timeout,
            "s",
        )
        sec.add(group, name, "cancelled", median([v["cancelled"] for v in vals]), "")
        sec.add(group, name, "still queued", median([v["still_queued"] for v in vals]), "")
        sec.raw[name] = vals
    sec.ratio(group, "time", "raw asyncio loop thread")
    sec.target(group, "AsyncBG.stop", "over timeout", "<= 0.1 s", lambda r: r.value <= 0.1)
    exact = all(v["exact"] == 1.0 for v in res["AsyncBG.stop"])
    row = sec.find(group, "AsyncBG.stop", "cancelled")
    if row is not None:
        row.target = f"exact ({mode.shutdown_running + 1})"
        row.met = exact
    row = sec.find(group, "AsyncBG.stop", "still queued")
    if row is not None:
        row.target = f"exact ({mode.shutdown_queued})"
        row.met = exact
    return sec

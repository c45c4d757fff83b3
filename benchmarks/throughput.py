"""2. Throughput: trivial jobs submitted and finished, from 1 and 4 threads;
enqueue->consume of queued items from one producer thread."""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import Callable

from .harness import Deadline, Mode, Section, interleaved, median
from .subjects import AsyncBGSubject, Body, Pool, RawLoop, SeedPoller, have_uvloop

Fire = Callable[[Body], object]


def _jobs_per_second(fire: Fire, n: int, threads: int, deadline: Deadline) -> float:
    counter = itertools.count(1)
    done = threading.Event()
    target = n

    def body() -> None:
        if next(counter) == target:
            done.set()

    per = n // threads
    gate = threading.Barrier(threads + 1)

    def produce() -> None:
        gate.wait()
        for i in range(per):
            fire(body)
            if i & 1023 == 0 and deadline.passed():
                break

    ts = [threading.Thread(target=produce, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    gate.wait()
    t0 = time.perf_counter()
    finished = done.wait(max(1.0, deadline.end - time.monotonic()) + 30)
    t1 = time.perf_counter()
    for t in ts:
        t.join(30)
    if not finished:
        return float("nan")
    return n / (t1 - t0)


class _RawQueue:
    """Raw asyncio: an asyncio.Queue fed with call_soon_threadsafe, one consumer task."""

    def __init__(self) -> None:
        self.raw = RawLoop("asyncio")
        self.q: asyncio.Queue[Body] = asyncio.run_coroutine_threadsafe(
            _make_queue(), self.raw.loop
        ).result()
        self.task = asyncio.run_coroutine_threadsafe(_consume(self.q), self.raw.loop)

    def put(self, body: Body) -> None:
        self.raw.loop.call_soon_threadsafe(self.q.put_nowait, body)

    def close(self) -> None:
        self.task.cancel()  # cancels the consumer task on the loop, soon
        # let the cancellation run before the loop stops
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0.01), self.raw.loop).result(10)
        self.raw.close()


async def _make_queue() -> asyncio.Queue[Body]:
    return asyncio.Queue()


async def _consume(q: asyncio.Queue[Body]) -> None:
    while True:
        (await q.get())()


class _ThreadQueue:
    """queue.Queue consumed by one thread blocking in get(): the seed pattern, done right."""

    def __init__(self) -> None:
        self.q: queue.Queue[Body] = queue.Queue()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while True:
            body = self.q.get()
            if body is None:
                return
            body()

    def close(self) -> None:
        self.q.put(None)  # type: ignore[arg-type]
        self.t.join(5)


def run(mode: Mode) -> Section:
    sec = Section("throughput")
    kinds = ["asyncio"] + (["uvloop"] if have_uvloop() else [])
    raws = {k: RawLoop(k) for k in kinds}
    bgs = {k: AsyncBGSubject(k) for k in kinds}
    pool = Pool()
    fires: dict[str, Fire] = {}
    for k in kinds:
        fires[f"raw rcts ({k})"] = raws[k].rcts
        fires[f"raw call_soon_threadsafe ({k})"] = raws[k].cst
    fires["ThreadPoolExecutor.submit"] = pool.submit
    for k in kinds:
        fires[f"LoopThread.submit ({k})"] = bgs[k].lt_submit
        fires[f"AsyncBG.submit ({k})"] = bgs[k].bg_submit
        fires[f"Task.submit ({k})"] = bgs[k].task_submit
    n = mode.throughput_jobs
    try:
        for threads in (1, 4):
            group = f"jobs from {threads} thread{'s' if threads > 1 else ''}"
            deadline = Deadline(mode.time_budget)
            res = interleaved(
                {
                    name: (lambda f=f, t=threads, d=deadline: _jobs_per_second(f, n, t, d))
                    for name, f in fires.items()
                },
                mode.trials,
                deadline,
            )
            for name, vals in res.items():
                sec.add(group, name, "jobs/s", median(vals), "1/s")
            sec.ratio(group, "jobs/s", "raw rcts (asyncio)")
            tpe = sec.find(group, "ThreadPoolExecutor.submit", "jobs/s")
            need = 1.2 if threads == 1 else 1.75
            for k in kinds:
                for ours in ("LoopThread.submit", "AsyncBG.submit", "Task.submit"):
                    row = sec.find(group, f"{ours} ({k})", "jobs/s")
                    if row is not None and tpe is not None and tpe.value:
                        row.target = f">= {need}x TPE ({row.value / tpe.value:.2f}x)"
                        row.met = row.value >= need * tpe.value
        # enqueue -> consume, one producer thread
        group = "queue items, 1 producer"
        seedq = SeedPoller()
        tq = _ThreadQueue()
        rq = _RawQueue()
        qfires: dict[str, Fire] = {
            "raw asyncio.Queue + call_soon_threadsafe": rq.put,
            "seed: queue.Queue poller": seedq.submit,
            "queue.Queue + blocking consumer thread": tq.q.put,
        }
        for k in kinds:
            qfires[f"AsyncBG.enqueue ({k})"] = bgs[k].enqueue
        deadline = Deadline(mode.time_budget)
        try:
            res = interleaved(
                {
                    name: (lambda f=f: _jobs_per_second(f, mode.queue_items, 1, deadline))
                    for name, f in qfires.items()
                },
                mode.trials,
                deadline,
            )
        finally:
            seedq.close()
            tq.close()
            rq.close()
        for name, vals in res.items():
            sec.add(group, name, "items/s", median(vals), "1/s")
        sec.ratio(group, "items/s", "raw asyncio.Queue + call_soon_threadsafe")
    finally:
        for s in bgs.values():
            s.close()
        for r in raws.values():
            r.close()
        pool.close()
    return sec

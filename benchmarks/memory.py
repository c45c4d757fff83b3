"""6. Memory: RSS per queued item, per pending job, and job history at its bound.

Each figure comes from a fresh interpreter (``python -m benchmarks.memory
SUBJECT N``) so that nothing measured before skews the allocator's state.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import queue
import resource
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from .harness import Mode, Section, interleaved, median

ROOT = Path(__file__).resolve().parent.parent


def rss() -> int:
    """Resident set size in bytes (peak RSS where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _item(i: int) -> tuple[str, int]:
    return ("item", i)  # a distinct small object per item, as real payloads are


async def _noop() -> None:
    return None


def _measure(setup: Callable[[], object], fill: Callable[[int], object], n: int) -> float:
    state = setup()
    gc.collect()
    before = rss()
    fill(n)
    gc.collect()
    after = rss()
    del state
    return (after - before) / n


def queue_queue(n: int) -> float:
    q: queue.Queue[object] = queue.Queue()
    return _measure(lambda: q, lambda n: [q.put(_item(i)) for i in range(n)] and None, n)


def asyncbg_queue(n: int) -> float:
    from .subjects import make_bg

    gate = threading.Event()
    _app, bg = make_bg()

    @bg.consumer("mem", concurrency=1, maxsize=n + 10)
    async def consume(item: object) -> None:
        await asyncio.get_running_loop().run_in_executor(None, gate.wait)

    bg.enqueue("mem", _item(-1))  # the worker is now stuck on this one

    def fill(n: int) -> None:
        for i in range(n):
            bg.enqueue("mem", _item(i))

    try:
        return _measure(lambda: bg, fill, n)
    finally:
        gate.set()
        bg.stop(2)


def _blocked_loop_submit(
    submit: Callable[[], object], post: Callable[..., object], n: int
) -> float:
    # Jobs stay pending while the loop is blocked.
    gate = threading.Event()
    post(gate.wait, 30)
    kept: list[object] = []

    def fill(n: int) -> None:
        kept.extend(submit() for _ in range(n))

    try:
        return _measure(lambda: kept, fill, n)
    finally:
        gate.set()


def raw_rcts(n: int) -> float:
    from .subjects import RawLoop

    raw = RawLoop()
    try:
        return _blocked_loop_submit(
            lambda: asyncio.run_coroutine_threadsafe(_noop(), raw.loop),
            raw.loop.call_soon_threadsafe,
            n,
        )
    finally:
        # let the released jobs run before the loop closes
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0.01), raw.loop).result(60)
        raw.close()


def tpe(n: int) -> float:
    import concurrent.futures

    ex = concurrent.futures.ThreadPoolExecutor(1)
    gate = threading.Event()
    ex.submit(gate.wait, 30)
    kept: list[object] = []
    try:
        return _measure(lambda: kept, lambda n: kept.extend(ex.submit(int) for _ in range(n)), n)
    finally:
        gate.set()
        ex.shutdown()


def loopthread_submit(n: int) -> float:
    from asyncbg import LoopThread

    lt = LoopThread("mem")
    lt.start()
    try:
        return _blocked_loop_submit(lambda: lt.submit(_noop()), lt.post, n)
    finally:
        lt.stop(2)


def asyncbg_submit(n: int) -> float:
    from .subjects import make_bg

    _app, bg = make_bg(ASYNCBG_JOB_HISTORY_SIZE=1000)
    try:
        return _blocked_loop_submit(lambda: bg.submit(_noop), bg.loop_thread.post, n)
    finally:
        bg.stop(2)


def history(n: int) -> float:
    """RSS growth per job after the history reached its bound (should be ~0)."""
    from .subjects import make_bg

    bound = int(os.environ.get("BENCH_HISTORY_BOUND", "1000"))
    _app, bg = make_bg(ASYNCBG_JOB_HISTORY_SIZE=bound)

    def run_jobs(k: int) -> None:
        for start in range(0, k, 1000):
            for _ in range(min(1000, k - start)):
                bg.submit(_noop)
            bg.wait_idle(60)

    try:
        run_jobs(bound * 2)  # the history is full from here on
        per = _measure(lambda: bg, run_jobs, n)
        if len(bg.history) != bound:
            raise RuntimeError(f"history holds {len(bg.history)} jobs, bound {bound}")
        return per
    finally:
        bg.stop(2)


SUBJECTS: dict[str, tuple[str, Callable[[int], float]]] = {
    "queue.Queue": ("per queued item", queue_queue),
    "AsyncBG.enqueue": ("per queued item", asyncbg_queue),
    "raw rcts (asyncio)": ("per pending job", raw_rcts),
    "ThreadPoolExecutor.submit": ("per pending job", tpe),
    "LoopThread.submit (asyncio)": ("per pending job", loopthread_submit),
    "AsyncBG.submit (asyncio)": ("per pending job", asyncbg_submit),
    "AsyncBG history at its bound": ("per finished job past the bound", history),
}


def _in_subprocess(name: str, n: int, bound: int) -> float:
    env = dict(os.environ, BENCH_HISTORY_BOUND=str(bound))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", name, str(n)],
        capture_output=True, text=True, timeout=300, check=True, cwd=ROOT, env=env,
    ).stdout  # fmt: skip
    return float(json.loads(out.strip().splitlines()[-1])["bytes_per"])


def run(mode: Mode) -> Section:
    sec = Section("memory")
    n = mode.memory_items
    res = interleaved(
        {
            name: (lambda name=name: _in_subprocess(name, n, mode.history_bound))
            for name in SUBJECTS
        },
        1 if mode.name == "smoke" else 2,
    )
    for name, vals in res.items():
        group = SUBJECTS[name][0]
        sec.add(group, name, "RSS", median(vals), "B")
    sec.ratio("per queued item", "RSS", "queue.Queue")
    sec.ratio("per pending job", "RSS", "raw rcts (asyncio)")
    sec.target("per queued item", "AsyncBG.enqueue", "RSS", "<= 1 KiB", lambda r: r.value <= 1024)
    for name in ("AsyncBG.submit (asyncio)", "LoopThread.submit (asyncio)"):
        sec.target("per pending job", name, "RSS", "<= 1 KiB", lambda r: r.value <= 1024)
    sec.notes.append(
        "LoopThread.submit returns a concurrent.futures.Future by contract: its "
        "threading.Condition (an RLock and an empty deque) alone is about 1 KiB"
    )
    sec.target(
        "per finished job past the bound",
        "AsyncBG history at its bound",
        "RSS",
        "held at bound (~0 B)",
        lambda r: r.value <= 64,
    )
    return sec


if __name__ == "__main__":
    subject, count = sys.argv[1], int(sys.argv[2])
    print(json.dumps({"bytes_per": SUBJECTS[subject][1](count)}))

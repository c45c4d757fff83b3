"""python -m benchmarks.sqlite_group_commit [--rounds N] [--dir DIR]

The SQLite backend's group commit, measured: the p50 time per record of
single-record ``enqueue`` calls made 1, 8 or 64 at once in one loop turn
(``asyncio.gather``), with ``synchronous`` FULL and NORMAL, the group commit
off (``_coalesce=False``: one transaction per call, as before it) and on, in
the same run with the rounds interleaved, so the ratio is fair. Then the
wake-up between two backend objects on one file (as between two processes):
p50 from the start of an ``enqueue`` on one to its acknowledgement, and to the
other's ``on_new_work`` callback.

The database files live in a temporary folder under ``--dir`` (the system's
temporary folder by default): put it on the disk you mean to measure, not on a
tmpfs, where an fsync costs nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from asyncbg.backends.sqlite import SQLiteBackend
from asyncbg.engine.records import JobRecord

CONCURRENCY = (1, 8, 64)
SYNCHRONOUS = ("FULL", "NORMAL")


def _record() -> JobRecord:
    return JobRecord(id=uuid.uuid4().hex, queue="bench", task="bench.task")


@asynccontextmanager
async def _opened(path: str, **options: object) -> AsyncIterator[SQLiteBackend]:
    backend = SQLiteBackend(path, **options)  # type: ignore[arg-type]
    await backend.open()
    try:
        await backend.migrate()
        yield backend
    finally:
        await backend.close()


async def _round(backend: SQLiteBackend, concurrent: int) -> float:
    """Seconds per record of ``concurrent`` one-record enqueues made at once."""
    records = [_record() for _ in range(concurrent)]
    started = time.perf_counter()
    await asyncio.gather(*(backend.enqueue([r]) for r in records))
    return (time.perf_counter() - started) / concurrent


async def group_commit(folder: str, rounds: int) -> list[tuple[str, int, float, float]]:
    """(synchronous, concurrency, p50 off, p50 on) in seconds per record."""
    rows = []
    for synchronous in SYNCHRONOUS:
        off_path = os.path.join(folder, f"off-{synchronous}.db")
        on_path = os.path.join(folder, f"on-{synchronous}.db")
        async with (
            _opened(off_path, synchronous=synchronous, _coalesce=False) as off,
            _opened(on_path, synchronous=synchronous) as on,
        ):
            for concurrent in CONCURRENCY:
                times: dict[bool, list[float]] = {False: [], True: []}
                # Fewer rounds where one is long (64 commits each with coalescing off).
                for i in range(max(5, rounds * 8 // (8 + concurrent))):
                    # Interleaved, and alternately first: drift hits both alike.
                    for coalesce in (False, True) if i % 2 else (True, False):
                        times[coalesce].append(await _round(on if coalesce else off, concurrent))
                rows.append(
                    (
                        synchronous,
                        concurrent,
                        statistics.median(times[False]),
                        statistics.median(times[True]),
                    )
                )
    return rows


async def wake_latency(folder: str, rounds: int) -> list[tuple[str, float, float]]:
    """(synchronous, p50 to the acknowledgement, p50 to the other's callback) in seconds."""
    rows = []
    for synchronous in SYNCHRONOUS:
        path = os.path.join(folder, f"wake-{synchronous}.db")
        async with (
            _opened(path, synchronous=synchronous) as sender,
            _opened(path, synchronous=synchronous) as receiver,
        ):
            woken: list[float] = []
            event = asyncio.Event()

            def callback(woken: list[float] = woken, event: asyncio.Event = event) -> None:
                woken.append(time.perf_counter())
                event.set()

            receiver.on_new_work(callback)
            acks: list[float] = []
            wakes: list[float] = []
            for _ in range(rounds):
                event.clear()
                woken.clear()
                started = time.perf_counter()
                await sender.enqueue([_record()])
                acks.append(time.perf_counter() - started)
                async with asyncio.timeout(5):
                    await event.wait()
                wakes.append(woken[0] - started)
            rows.append((synchronous, statistics.median(acks), statistics.median(wakes)))
    return rows


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f} us"


async def main(folder: str, rounds: int) -> None:
    print("enqueue of one record, N calls at once in one loop turn: p50 per record")
    print()
    print("| synchronous | N at once | group commit off | on | off / on |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for synchronous, concurrent, off, on in await group_commit(folder, rounds):
        print(f"| {synchronous} | {concurrent} | {_us(off)} | {_us(on)} | {off / on:.2f}x |")
    print()
    print("wake-up of another backend object on the file: p50 from the enqueue call's start")
    print()
    print("| synchronous | to its acknowledgement | to the other's on_new_work callback |")
    print("| --- | ---: | ---: |")
    for synchronous, ack, wake in await wake_latency(folder, rounds):
        print(f"| {synchronous} | {_us(ack)} | {_us(wake)} |")


def cli(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sqlite_group_commit")
    p.add_argument("--rounds", type=int, default=200, help="rounds at N=1 (fewer for larger N)")
    p.add_argument("--dir", default=None, help="where the temporary database folder goes")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="asyncbg-bench-", dir=args.dir) as folder:
        asyncio.run(main(folder, args.rounds))


if __name__ == "__main__":
    cli()

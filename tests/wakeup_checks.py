"""Checks the networked backends share: a job submitted in one process starts
in another at once, woken by the backend's channel (NOTIFY, pub/sub) rather
than by a poll, and a cancel asked in one process reaches the run in another
long before a renewal would. ``worker(**config)`` makes an app on the store
under test (polling every 5 s unless told) and returns ``(app, bg)``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

from asyncbg import AsyncBG, JobStatus
from tests.helpers_core import WAIT, Gate, wait_for

__all__ = [
    "check_a_cancel_from_another_process_reaches_the_run_at_once",
    "check_woken_by_the_channel_not_by_polling",
]


def check_woken_by_the_channel_not_by_polling(
    worker: Callable[..., tuple[Any, AsyncBG]],
) -> list[float]:
    """B polls every 5 s; A submits (and claims nothing): B starts the job at
    once, woken by the backend's wake-up channel. Return the delays, sorted."""
    _app_a, bg_a = worker(ASYNCBG_WORKER_CONCURRENCY=0)
    _app_b, bg_b = worker()
    started: list[float] = []
    ran = threading.Event()

    @bg_a.task(name="ping")
    def ping_a() -> None:  # pragma: no cover - A claims nothing
        raise AssertionError("A claims nothing")

    @bg_b.task(name="ping")
    def ping_b() -> None:
        started.append(time.monotonic())
        ran.set()

    bg_a.start()
    bg_b.start()
    delays = []
    for _ in range(20):
        ran.clear()
        t0 = time.monotonic()
        ping_a.submit()
        assert ran.wait(WAIT)
        delays.append(started[-1] - t0)
    delays.sort()
    print(f"cross-process submit-to-start p50 {delays[10] * 1000:.2f} ms")
    assert delays[-1] < 2.5  # well under B's 5 s poll: only the wake-up explains it
    return delays


def check_a_cancel_from_another_process_reaches_the_run_at_once(
    worker: Callable[..., tuple[Any, AsyncBG]],
) -> float:
    """The lease is long (30 s, renewed every 10 s): only the backend's cancel
    message can explain a cancellation within a second. Return the delay."""
    app_a, bg_a = worker()
    _app_b, bg_b = worker(ASYNCBG_WORKER_CONCURRENCY=0)
    started = Gate()
    cancelled_at: list[float] = []

    @bg_a.task(name="long")
    async def long_a() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled_at.append(time.monotonic())
            raise

    @bg_b.task(name="long")
    async def long_b() -> None:  # pragma: no cover - B claims nothing
        raise AssertionError

    bg_a.start()
    bg_b.start()
    with app_a.app_context():
        job = long_a.submit()
    assert started.wait(WAIT)
    remote = bg_b.get_job(job.id)
    assert remote is not None
    t0 = time.monotonic()
    assert remote.cancel()
    wait_for(lambda: bool(cancelled_at), timeout=5.0, what="the run was cancelled")
    delay = cancelled_at[0] - t0
    print(f"cancel across processes reached the job in {delay * 1000:.1f} ms")
    assert delay < 3.0  # the renewal would take up to 10 s
    assert job.wait(WAIT)
    assert job.status is JobStatus.CANCELLED
    return delay

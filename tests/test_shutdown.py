"""Graceful shutdown with jobs running and items queued: the report, finally blocks, refusals."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest

from asyncbg import JobStatus, NotRunning

WAIT = 15.0


class Busy:
    """An AsyncBG with, at stop time:

    - job "finishes": running, finishes within the grace once the stop begins;
    - job "stuck": running, never finishes, so it is cancelled;
    - queue "q" (concurrency 1): one item in hand that finishes within the
      grace, two items still queued;
    - queue "slow" (concurrency 1): one item in hand that never finishes, one
      item still queued.
    """

    def __init__(self, make_app: Any) -> None:
        _app, bg = make_app()
        self.bg = bg
        self.finally_ran: list[str] = []
        self.handled: list[str] = []
        self.stopping = asyncio.Event()  # set on the loop when the stop begins
        self.never = asyncio.Event()
        started = {name: threading.Event() for name in ("finishes", "stuck", "q", "slow")}
        self.started = started

        @bg.consumer("q", concurrency=1)
        async def q(item: str) -> None:
            started["q"].set()
            try:
                await self.stopping.wait()
                self.handled.append(item)
            finally:
                self.finally_ran.append(f"q:{item}")

        @bg.consumer("slow", concurrency=1)
        async def slow(item: str) -> None:
            started["slow"].set()
            try:
                await self.never.wait()
                self.handled.append(item)
            finally:
                self.finally_ran.append(f"slow:{item}")

        bg.start()
        bg.loop_thread.add_stop_hook(self.stopping.set)

        async def finishes() -> str:
            started["finishes"].set()
            try:
                await self.stopping.wait()
                await asyncio.sleep(0)
                return "done"
            finally:
                self.finally_ran.append("finishes")

        async def stuck() -> None:
            started["stuck"].set()
            try:
                await self.never.wait()
            finally:
                self.finally_ran.append("stuck")

        self.job_finishes = bg.submit(finishes)
        self.job_stuck = bg.submit(stuck)
        for item in ("q1", "q2", "q3"):
            bg.enqueue("q", item)
        for item in ("s1", "s2"):
            bg.enqueue("slow", item)
        for name, event in started.items():
            assert event.wait(WAIT), f"{name} never started"


def test_stop_report_counts_completed_cancelled_and_still_queued(make_app):
    busy = Busy(make_app)
    report = busy.bg.stop(timeout=0.3)
    # completed: job "finishes" and the worker of "q"; cancelled: job "stuck"
    # and the worker of "slow"
    assert (report.completed, report.cancelled) == (2, 2)
    assert report.still_queued == 3
    assert report.queued_by_queue == {"q": 2, "slow": 1}
    assert report.finished


def test_stop_lets_running_work_finish_and_cancels_the_rest(make_app):
    busy = Busy(make_app)
    busy.bg.stop(timeout=0.3)
    assert busy.job_finishes.status is JobStatus.SUCCEEDED
    assert busy.job_finishes.result(0) == "done"
    assert busy.job_stuck.status is JobStatus.CANCELLED
    assert busy.handled == ["q1"]


def test_stop_runs_the_finally_blocks_of_cancelled_work(make_app):
    busy = Busy(make_app)
    busy.bg.stop(timeout=0.3)
    assert sorted(busy.finally_ran) == ["finishes", "q:q1", "slow:s1", "stuck"]


def test_stop_logs_the_report_with_the_queued_items(make_app, caplog):
    caplog.set_level(logging.INFO, logger="asyncbg")
    busy = Busy(make_app)
    busy.bg.stop(timeout=0.3)
    lines = [r for r in caplog.records if "asyncbg shutdown:" in r.getMessage()]
    assert len(lines) == 1
    message = lines[0].getMessage()
    assert "2 completed, 2 cancelled, 3 still queued" in message
    assert "q=2" in message
    assert "slow=1" in message
    assert lines[0].levelno == logging.WARNING


def test_stop_without_leftovers_logs_the_report_at_info(make_app, caplog):
    caplog.set_level(logging.INFO, logger="asyncbg")
    _app, bg = make_app()
    bg.start()
    bg.stop(timeout=1.0)
    lines = [r for r in caplog.records if "asyncbg shutdown:" in r.getMessage()]
    assert [r.levelno for r in lines] == [logging.INFO]


def test_submit_and_enqueue_raise_not_running_after_stop(make_app):
    busy = Busy(make_app)
    bg = busy.bg
    bg.stop(timeout=0.3)

    async def job() -> None:
        pass

    t0 = time.monotonic()
    with pytest.raises(NotRunning):
        bg.submit(job)
    with pytest.raises(NotRunning):
        bg.enqueue("q", "late")
    with pytest.raises(NotRunning):
        bg.enqueue("q", "late", timeout=5.0)
    assert time.monotonic() - t0 < 1.0
    assert bg.get_queue("q").depth == 2


def test_submit_and_enqueue_raise_not_running_while_the_stop_drains(make_app):
    busy = Busy(make_app)
    bg = busy.bg
    draining = threading.Event()
    bg.loop_thread.add_stop_hook(draining.set)
    stopper = threading.Thread(target=bg.stop, kwargs={"timeout": 10.0})
    stopper.start()
    try:
        assert draining.wait(WAIT)

        async def job() -> None:
            pass

        t0 = time.monotonic()
        with pytest.raises(NotRunning):
            bg.submit(job)
        with pytest.raises(NotRunning):
            bg.enqueue("q", "late", timeout=5.0)
        assert time.monotonic() - t0 < 1.0
    finally:
        # let the stuck work go so the stop ends well before its 10 s grace
        bg.loop_thread.loop.call_soon_threadsafe(busy.never.set)
        stopper.join(WAIT)
    assert not stopper.is_alive()

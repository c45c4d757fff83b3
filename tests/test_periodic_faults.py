"""Periodic jobs under faults: exits raised in a run, host-lock errors, noisy failures."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers_core import wait_for

from asyncbg.engine import host_lock
from asyncbg.engine.logthrottle import LogThrottle

WAIT = 10.0


class Watch(logging.Handler):
    """Collects the asyncbg records whose message contains ``text``; ``seen`` is set
    on the first one."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.records: list[logging.LogRecord] = []
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.records.append(record)
            self.seen.set()


@pytest.fixture
def watch() -> Iterator[Any]:
    logger = logging.getLogger("asyncbg")
    added: list[Watch] = []
    level = logger.level
    logger.setLevel(logging.DEBUG)

    def make(text: str) -> Watch:
        w = Watch(text)
        logger.addHandler(w)
        added.append(w)
        return w

    yield make
    for w in added:
        logger.removeHandler(w)
    logger.setLevel(level)


# -- 3: SystemExit / KeyboardInterrupt in a run --------------------------------------------


@pytest.mark.parametrize("exc_type", [SystemExit, KeyboardInterrupt])
@pytest.mark.parametrize("after_await", [False, True], ids=["at-once", "after-await"])
def test_exit_raised_in_a_run_fails_that_run_and_the_loop_and_schedule_go_on(
    make_app, watch, exc_type: type[BaseException], after_await: bool
) -> None:
    failed = watch("periodic job exits failed")
    _app, bg = make_app()
    later_run = threading.Event()
    calls = 0

    @bg.periodic(every=0.02, name="exits")
    async def exits() -> None:
        nonlocal calls
        calls += 1
        if after_await:
            await asyncio.sleep(0)
        if calls == 1:
            raise exc_type(3)
        if calls == 3:
            later_run.set()

    bg.start()
    assert later_run.wait(WAIT), f"the schedule ended after {exc_type.__name__}: {calls} call(s)"
    assert bg.loop_thread.running
    assert bg.call(lambda: "alive", timeout=WAIT) == "alive"
    snap = bg.call(exits.snapshot)
    assert snap["failures"] == 1
    assert snap["runs"] >= 3
    assert failed.records, "the failed run was not logged"
    exc_info = failed.records[0].exc_info
    assert exc_info is not None
    assert isinstance(exc_info[1], exc_type)
    bg.stop(1.0)
    assert exits.last_error is None  # later runs succeeded


def test_exit_in_the_last_run_is_recorded_as_its_error(make_app) -> None:
    _app, bg = make_app()
    done = threading.Event()

    @bg.periodic(every=60.0, run_at_start=True, name="once")
    async def once() -> None:
        try:
            raise SystemExit("leaving")
        finally:
            asyncio.get_running_loop().call_soon(done.set)

    bg.start()
    assert done.wait(WAIT)
    snap = bg.call(once.snapshot)
    assert snap["failures"] == 1
    assert snap["last_error"] == "SystemExit: leaving"
    assert snap["next_due"] > time.time()


def test_a_run_cancelled_at_stop_is_cancelled_not_counted_as_a_failure(make_app) -> None:
    _app, bg = make_app()
    started = threading.Event()
    cancelled = threading.Event()

    @bg.periodic(every=60.0, run_at_start=True, name="hangs")
    async def hangs() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    bg.start()
    assert started.wait(WAIT)
    report = bg.stop(0.05)
    assert cancelled.is_set()
    assert report.cancelled >= 1
    assert hangs.failures == 0


# -- 13: a run failing every 10 ms ---------------------------------------------------------


def test_a_job_failing_every_10ms_logs_one_traceback_then_one_summary(make_app, watch) -> None:
    failed = watch("periodic job noisy failed")
    summary = watch("more failures of periodic job noisy")
    _app, bg = make_app()
    enough = threading.Event()

    @bg.periodic(every=0.01, name="noisy")
    async def noisy() -> None:
        if noisy.failures >= 30:
            enough.set()
        raise ValueError("boom " + "x" * 10_000)

    bg.start()
    assert enough.wait(WAIT)
    bg.stop(1.0)
    failures = noisy.failures
    print(f"{failures} failures -> {len(failed.records) + len(summary.records)} log records")
    assert len(failed.records) == 1, f"{len(failed.records)} tracebacks for {failures} failures"
    assert failed.records[0].exc_info is not None
    # What was suppressed is summarized at stop, with nothing lost from the count.
    assert len(summary.records) == 1
    line = summary.records[0].getMessage()
    assert line.startswith(f"{failures - 1} more failures of periodic job noisy in the")
    assert "(last: ValueError: boom xxx" in line
    assert len(line) < 400
    assert noisy.last_error is not None
    assert len(noisy.last_error) <= 500


def test_the_summary_is_logged_when_the_interval_ends_even_if_failures_stop(
    make_app, watch
) -> None:
    summary = watch("more failures of periodic job bursty")
    _app, bg = make_app()
    calls = 0

    @bg.periodic(every=0.01, name="bursty")
    async def bursty() -> None:
        nonlocal calls
        calls += 1
        if calls <= 5:
            raise ValueError(f"burst {calls}")

    bursty.log_throttle = LogThrottle(interval=0.2)
    bg.start()
    assert summary.seen.wait(WAIT), "no summary at the end of the interval"
    assert bg.loop_thread.running  # logged by the running schedule, not at stop
    line = summary.records[0].getMessage()
    assert line.startswith("4 more failures of periodic job bursty in the last")
    assert "(last: ValueError: burst 5)" in line


# -- 7: errors taking the host lock -------------------------------------------------------


def host_job(bg: Any, name: str = "chore") -> tuple[Any, threading.Event]:
    ran = threading.Event()

    async def chore() -> None:
        ran.set()

    return bg.periodic(every=0.02, scope="host", name=name)(chore), ran


def assert_degraded_health(app: Any, name: str, error: str) -> None:
    r = app.test_client().get("/_asyncbg/health")
    assert r.status_code == 200  # the process still serves: do not take it out
    assert r.json["status"] == "degraded"
    [warning] = r.json["warnings"]
    assert f"periodic job {name} cannot take its host lock" in warning
    assert error in warning
    [snap] = [p for p in r.json["periodic"] if p["name"] == name]
    assert error in snap["lock_error"]


def test_a_lock_dir_that_cannot_be_created_fails_each_tick_until_it_can(
    make_app, watch, tmp_path: Path
) -> None:
    logged = watch("could not take its host lock")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    app, bg = make_app(ASYNCBG_LOCK_DIR=str(blocker / "locks"))
    chore, ran = host_job(bg)
    bg.start()
    wait_for(lambda: chore.failures >= 5, what="lock failures to be counted, tick after tick")
    snap = bg.call(chore.snapshot)
    assert snap["runs"] == 0
    assert snap["lock_error"].startswith("NotADirectoryError")
    assert snap["last_error"].startswith("host lock: NotADirectoryError")
    assert snap["next_due"] > time.time() - 1.0  # still armed
    assert_degraded_health(app, "chore", "NotADirectoryError")
    assert len(logged.records) == 1, "lock failures are logged once, then summarized"
    assert logged.records[0].exc_info is not None

    blocker.unlink()  # the cause goes away: the next tick takes the lock and runs
    assert ran.wait(WAIT)
    wait_for(lambda: chore.lock_error is None, what="the lock error to clear")
    assert chore.holds_lock is True
    r = app.test_client().get("/_asyncbg/health")
    assert r.json["status"] == "ok"
    assert r.json["warnings"] == []


class _NoMoreFiles:
    """The ``os`` module as host_lock sees it, with every open failing with EMFILE."""

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    @staticmethod
    def open(*args: Any, **kwargs: Any) -> int:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))


def test_too_many_open_files_is_a_failure_and_the_job_runs_once_fds_are_back(
    make_app, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    app, bg = make_app(ASYNCBG_LOCK_DIR=str(tmp_path))
    chore, ran = host_job(bg)
    monkeypatch.setattr(host_lock, "os", _NoMoreFiles())
    bg.start()
    wait_for(lambda: chore.failures >= 3, what="EMFILE to be counted as failures")
    assert chore.runs == 0
    assert_degraded_health(app, "chore", "Too many open files")
    monkeypatch.undo()
    assert ran.wait(WAIT)


def test_a_planted_symlink_is_a_failure_and_the_target_is_untouched(
    make_app, tmp_path: Path
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    locks = tmp_path / "locks"
    locks.mkdir()
    app, bg = make_app(import_name="planted", ASYNCBG_LOCK_DIR=str(locks))
    chore, ran = host_job(bg)
    (locks / "asyncbg-planted-chore.lock").symlink_to(victim)
    bg.start()
    wait_for(lambda: chore.failures >= 2, what="the symlink to be refused, tick after tick")
    assert not ran.is_set()
    assert victim.read_text() == "precious\n"
    assert_degraded_health(app, "chore", os.strerror(errno.ELOOP))

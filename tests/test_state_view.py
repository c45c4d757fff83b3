"""The StateView the surfaces read: its job records say what Job.to_dict says."""

from __future__ import annotations

import ast
import asyncio
import functools
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from helpers_core import wait_for

import asyncbg
import asyncbg.health
from asyncbg import AsyncBG, Job, JobStatus, NotRunning, current_job
from asyncbg.app_view import AppView
from asyncbg.engine.records import CancelResult, JobQuery
from asyncbg.web.health import health_report

WAIT = 10.0

MakeApp = Callable[..., tuple[Flask, AsyncBG]]

_SHAPES = [
    {},
    {"include_result": False},
    {"include_result": True, "include_error": True, "include_args": True},
    {"include_result": False, "include_error": True, "include_args": True},
]


@pytest.fixture
def make_app(make_app: MakeApp) -> MakeApp:
    """conftest's factory, under this file's app name."""
    return functools.partial(make_app, import_name="asyncbg_state_view_test")


class Odd:
    """A value JSON cannot hold: it is shown as its repr."""

    def __repr__(self) -> str:
        return "<Odd thing>"


_KEYS = {"id", "name", "status", "created_at", "started_at", "finished_at", "duration"}


def assert_same(job: Job[Any]) -> None:
    """Every shape of the record's dict is plain JSON with the keys ``/jobs``
    has always answered with, and says the job's own status and attempts."""
    for shape in _SHAPES:
        got = job.record().to_dict(**shape)
        json.dumps(got, allow_nan=False)  # plain JSON, whatever the job holds
        assert _KEYS | {"attempts", "progress"} <= set(got), shape
        assert got["status"] == job.status.value
        assert got["attempts"] == job.attempts
        assert ("result" in got) == shape.get("include_result", True), shape
        assert ("args" in got) == shape.get("include_args", False), shape


def test_a_pending_job_with_arguments_json_cannot_hold(make_app: MakeApp) -> None:
    _app, bg = make_app()

    async def work(*args: Any, **kwargs: Any) -> None:
        pass

    job = bg.runner.create(work, (1, Odd(), float("nan")), {"when": Odd(), "n": (1, 2)})
    assert job.status is JobStatus.PENDING
    assert_same(job)
    assert job.record().to_dict(include_args=True)["args"] == [1, "<Odd thing>", None]


def test_a_running_job_with_progress(make_app: MakeApp) -> None:
    _app, bg = make_app()
    release = threading.Event()

    async def slow() -> None:
        current_job().set_progress(3, 10, "three of ten")
        await asyncio.to_thread(release.wait, WAIT)

    bg.start()
    job = bg.submit(slow)
    wait_for(lambda: job.progress is not None, what="progress")
    assert_same(job)
    job.set_progress(1, -5)  # a negative total: clamped, as Progress.fraction does
    assert_same(job)
    release.set()
    job.result(WAIT)
    assert_same(job)  # succeeded: its progress is set to the total


def test_a_succeeded_job_with_a_result_json_cannot_hold(make_app: MakeApp) -> None:
    _app, bg = make_app()

    async def odd() -> dict[Any, Any]:
        return {"thing": Odd(), 1: float("inf"), "items": {3}, "pair": (1, 2)}

    bg.start()
    job = bg.submit(odd)
    job.result(WAIT)
    assert_same(job)
    assert job.record().to_dict()["result"]["thing"] == "<Odd thing>"
    assert job.record().to_dict(include_args=True)["args"] is None  # dropped when it ended


def test_a_failed_job(make_app: MakeApp) -> None:
    _app, bg = make_app()

    def broken(path: str) -> None:
        raise OSError(f"cannot open {path}")

    bg.start()
    job = bg.submit(broken, "/nope")
    wait_for(job.done, what="the failure")
    assert job.status is JobStatus.FAILED
    assert_same(job)
    assert job.record().error == "OSError: cannot open /nope"


def test_a_cancelled_job_through_the_view(make_app: MakeApp) -> None:
    app, bg = make_app()

    async def forever() -> None:
        await asyncio.sleep(WAIT * 10)

    bg.start()
    job = bg.submit(forever)
    wait_for(lambda: job.status is JobStatus.RUNNING, what="the start")
    view = bg.state_view()
    outcome, record = view.cancel_job(job.id, wait=WAIT)
    assert outcome == CancelResult.REQUESTED
    assert record is not None
    assert record.status == "cancelled"
    assert_same(job)
    assert view.cancel_job(job.id) == (CancelResult.FINAL, record)
    assert view.cancel_job("f" * 32) == (CancelResult.UNKNOWN, None)
    assert app.extensions["asyncbg.view"] is view


def test_cancel_without_a_loop_raises_not_running(make_app: MakeApp) -> None:
    _app, bg = make_app()

    async def work() -> None:
        pass

    job = bg.runner.create(work, (), {})
    bg.history.add(job)  # known, pending, and no loop to cancel it on
    with pytest.raises(NotRunning):
        bg.state_view().cancel_job(job.id)


def test_query_jobs_filters_and_pages_newest_first(make_app: MakeApp) -> None:
    _app, bg = make_app()

    async def one(i: int) -> int:
        return i

    bg.start()
    jobs = [bg.submit(one, i) for i in range(5)]
    for job in jobs:
        job.result(WAIT)
    view = bg.state_view()
    page = view.query_jobs(JobQuery(statuses=frozenset({"succeeded"}), offset=1, limit=2))
    assert page.total == 5
    assert [r.id for r in page.records] == [jobs[3].id, jobs[2].id]
    assert view.query_jobs(JobQuery(task="nope")).total == 0
    assert view.job_counts() == {"running": 0, "pending": 0, "known": 5, "active": 0}


def test_health_report_takes_an_asyncbg_or_a_view(make_app: MakeApp) -> None:
    _app, bg = make_app()
    bg.start()
    healthy, report = asyncbg.health.health_report(bg, max_lag=None)
    assert healthy
    assert report["status"] == "ok"
    healthy, report = asyncbg.health.health_report(bg.state_view(), max_lag=None, detailed=False)
    assert healthy
    assert "jobs" not in report
    assert health_report(bg.state_view(), max_lag=None)[1]["jobs"]["known"] == 0


def test_the_view_is_one_per_app(make_app: MakeApp) -> None:
    app, bg = make_app()
    other = Flask("asyncbg_state_view_other")
    other.config.update(ASYNCBG_HANDLE_SIGNALS=False, ASYNCBG_AUTOSTART=False)
    bg.init_app(other)
    try:
        views = [a.extensions["asyncbg.view"] for a in (app, other)]
        assert all(isinstance(v, AppView) for v in views)
        assert views[0] is not views[1]
        with other.app_context():
            assert bg.state_view() is views[1]
    finally:
        with other.app_context():
            bg.stop(timeout=1.0)


def test_the_surfaces_never_import_the_extension() -> None:
    # The surfaces read only through a StateView: no import of the Flask glue,
    # not even for annotations.
    root = Path(asyncbg.__file__).parent
    for path in [*sorted((root / "web").glob("*.py")), root / "cli.py"]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or "", *(a.name for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                assert not any(
                    part in ("extension", "lifecycle", "AsyncBG") for part in name.split(".")
                ), f"{path.name} imports {name}"

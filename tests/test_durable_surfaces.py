"""The HTTP surface, health and metrics with a durable backend: every worker
answers from the store, the same for every job, with the worker that holds it.

Two apps on one database file stand for two workers (see tests/test_durable.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from asyncbg import AsyncBG, BackendError
from tests.conftest import MakeApp
from tests.helpers_core import WAIT, Gate, wait_for

pytestmark = pytest.mark.timeout(60)

CONTROL = {"Authorization": "Bearer s3cret", "X-Requested-With": "asyncbg"}


def _trusted(request: Any) -> bool:
    return bool(request.headers.get("Authorization") == "Bearer s3cret")


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'jobs.db'}"


def _pair(make_app: MakeApp, db: str) -> tuple[tuple[Flask, AsyncBG], tuple[Flask, AsyncBG]]:
    # A runs the jobs; B only submits and serves the surface.
    common: dict[str, Any] = {
        "ASYNCBG_BACKEND": db,
        "ASYNCBG_POLL_INTERVAL": 0.05,
        "ASYNCBG_LEASE": 1.5,  # a running job's cancel is seen within 0.5 s
        "ASYNCBG_CONTROL": True,
        "ASYNCBG_AUTH": _trusted,
        "ASYNCBG_SHOW_RESULTS": True,
    }
    return make_app(**common), make_app(ASYNCBG_WORKER_CONCURRENCY=0, **common)


def test_every_worker_answers_for_every_job_with_its_owner(make_app: MakeApp, db: str) -> None:
    (app_a, bg_a), (app_b, bg_b) = _pair(make_app, db)
    gate, started = Gate(), Gate()
    for bg in (bg_a, bg_b):

        @bg.task(name="held")
        async def held(n: int) -> int:
            started.set()
            await gate.wait_async()
            return n

    bg_a.start()
    bg_b.start()
    with app_b.app_context():
        job = bg_b.tasks["held"].submit(5)  # submitted in B, runs in A
    assert started.wait()
    for app in (app_a, app_b):
        body = app.test_client().get(f"/_asyncbg/jobs/{job.id}", headers=CONTROL).json
        assert body["status"] == "running"
        assert body["owner"].split(":")[1].isdigit()  # host:pid:incarnation of A
        listed = app.test_client().get("/_asyncbg/jobs?status=running", headers=CONTROL).json
        assert [j["id"] for j in listed["jobs"]] == [job.id]
        assert listed["total"] == 1
        health = app.test_client().get("/_asyncbg/health", headers=CONTROL).json
        assert health["jobs"]["running"] == 1
    gate.set()
    with app_b.app_context():
        assert job.result(WAIT) == 5
    body = app_b.test_client().get(f"/_asyncbg/jobs/{job.id}", headers=CONTROL).json
    assert (body["status"], body["result"]) == ("succeeded", 5)
    assert app_b.test_client().get("/_asyncbg/jobs/" + "0" * 32, headers=CONTROL).status_code == 404


def test_cancel_over_http_from_a_worker_that_does_not_run_it(make_app: MakeApp, db: str) -> None:
    (app_a, bg_a), (app_b, bg_b) = _pair(make_app, db)
    started = Gate()
    for bg in (bg_a, bg_b):

        @bg.task(name="forever")
        async def forever() -> None:
            started.set()
            await asyncio.sleep(3600)

    bg_a.start()
    bg_b.start()
    with app_a.app_context():
        job = bg_a.tasks["forever"].submit()
    assert started.wait()
    answer = app_b.test_client().post(f"/_asyncbg/jobs/{job.id}/cancel", headers=CONTROL)
    assert answer.status_code in (200, 202), answer.json
    assert answer.json["cancel_requested"] is True
    with app_a.app_context():
        assert job.wait(WAIT)

    def cancelled() -> bool:
        body = app_b.test_client().get(f"/_asyncbg/jobs/{job.id}", headers=CONTROL).json
        return bool(body["status"] == "cancelled")

    wait_for(cancelled, what="the job cancelled, seen from B")


def test_a_durable_queue_depth_is_the_store_count(make_app: MakeApp, db: str) -> None:
    (_app_a, bg_a), (app_b, bg_b) = _pair(make_app, db)
    # Only B has a consumer for "mail", and it is held: the items stay stored.
    hold = Gate()

    @bg_b.consumer("mail", concurrency=1)
    async def mail(item: Any) -> None:
        await hold.wait_async()

    bg_a.start()
    bg_b.start()
    with app_b.app_context():
        for i in range(4):
            bg_b.enqueue("mail", {"n": i})

    def depth() -> Any:
        body = app_b.test_client().get("/_asyncbg/health", headers=CONTROL).json
        queues = {q["name"]: q for q in body["queues"]}
        return queues["mail"]["depth"] == 3 and queues["mail"]

    snap = wait_for(depth, what="3 items stored, one in hand")
    assert snap["durable"] is True
    hold.set()


def test_a_store_that_fails_answers_503_not_500(make_app: MakeApp, db: str) -> None:
    (app_a, bg_a), _ = _pair(make_app, db)
    bg_a.start()
    # The store's query fails as an engine that went away would.
    backend = bg_a.state_for(app_a).backend
    original = backend.query

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise BackendError("SQLite: disk I/O error (simulated)")

    backend.query = broken  # type: ignore[method-assign]
    try:
        answer = app_a.test_client().get("/_asyncbg/jobs", headers=CONTROL)
    finally:
        backend.query = original  # type: ignore[method-assign]
    assert answer.status_code == 503
    assert "job store is unavailable" in answer.json["error"]

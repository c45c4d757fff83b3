"""The demo app, served by a real Hypercorn with the repo's hypercorn.toml, over HTTP.

One server serves most tests of this module (``asyncbg.demo:asgi_app``, the
README's command); the full-queue test gets its own, with a one-item queue.
The last test runs ``flask --app asyncbg.demo run --debug`` (reloader on).
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypercorn_harness import WAIT, Output, Server, running, wait_for_runs

pytestmark = pytest.mark.timeout(90)

TICK = 0.2


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp_path = tmp_path_factory.mktemp("demo")
    run_file = tmp_path / "runs.log"
    srv = Server(
        tmp_path,
        config={
            "DEMO_TICK_SECONDS": TICK,
            "DEMO_RUN_LOG": str(run_file),
            "ASYNCBG_SHUTDOWN_TIMEOUT": 1.0,
        },
    )
    with running(srv):
        yield srv


def poll(fetch, done, what: str, timeout: float = WAIT):  # type: ignore[no-untyped-def]
    """Call ``fetch()`` until ``done(value)``; return the value (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value):
            return value
        assert time.monotonic() < deadline, f"{what}: last value {value!r}"
        time.sleep(0.02)  # polling the server over HTTP, under a deadline


def assert_json_error(reply, status: int) -> None:  # type: ignore[no-untyped-def]
    assert reply.status == status, reply
    assert reply.headers["content-type"] == "application/json", reply
    assert isinstance(reply.body["error"], str), reply
    assert reply.body["error"], reply


# -- the loop starts with the server ---------------------------------------------------


def test_periodic_jobs_run_before_any_request(tmp_path):
    run_file = tmp_path / "runs.log"
    srv = Server(tmp_path, config={"DEMO_TICK_SECONDS": TICK, "DEMO_RUN_LOG": str(run_file)})
    try:
        srv.output.wait_for(r"Running on http://")
        runs = wait_for_runs(run_file, "world", 2)
        assert {pid for pid, _t in runs} == srv.worker_pids()
        assert not re.search(r"\"(GET|POST) /", srv.output.text()), "a request was made"
    finally:
        srv.kill()


# -- POST /task: the notification queue ------------------------------------------------


def test_post_task_queues_a_notification_the_consumer_delivers(server):
    reply = server.post("/task", {"to": "ann", "delay": 0})
    assert reply.status == 202, reply
    assert reply.body["queued"] is True
    delivered = poll(
        lambda: server.get("/notifications").body,
        lambda body: any(n["to"] == "ann" for n in body["last"]),
        "the notification to ann was never delivered",
    )
    assert delivered["delivered"] >= 1


def test_post_task_with_malformed_json_is_a_400_json_error(server):
    reply = server.post("/task", data=b'{"to": ', headers={"Content-Type": "application/json"})
    assert_json_error(reply, 400)
    assert "malformed" in reply.body["error"]


def test_post_task_with_a_non_json_content_type_is_a_400_json_error(server):
    reply = server.post("/task", data=b"to=ann", headers={"Content-Type": "text/plain"})
    assert_json_error(reply, 400)
    assert "application/json" in reply.body["error"]


def test_post_task_without_a_body_is_a_400_json_error(server):
    assert_json_error(server.post("/task"), 400)


@pytest.mark.parametrize("body", [["ann"], "ann", 3, None])
def test_post_task_with_json_that_is_not_an_object_is_a_400_json_error(server, body):
    data = b"null" if body is None else None
    reply = server.request(
        "POST",
        "/task",
        json_body=body,
        data=data,
        headers={"Content-Type": "application/json"},
    )
    assert_json_error(reply, 400)


@pytest.mark.parametrize("delay", ["soon", -1, 1e9, True])
def test_post_task_with_a_bad_delay_is_a_400_json_error(server, delay):
    assert_json_error(server.post("/task", {"to": "ann", "delay": delay}), 400)


def test_post_task_on_a_full_queue_is_a_503_with_retry_after(tmp_path):
    srv = Server(
        tmp_path,
        config={
            "DEMO_QUEUE_MAXSIZE": 1,
            "DEMO_NOTIFY_CONCURRENCY": 1,
            "DEMO_ENQUEUE_TIMEOUT": 0.2,
            "ASYNCBG_SHUTDOWN_TIMEOUT": 0.5,
        },
    )
    with running(srv):
        # One item in hand and one queued fill it; each delivery takes a minute.
        statuses = []
        while 503 not in statuses:
            assert len(statuses) < 5, statuses
            reply = srv.post("/task", {"to": "ann", "delay": 60})
            statuses.append(reply.status)
        assert set(statuses[:-1]) == {202}, statuses
        assert len(statuses) >= 2, statuses
        assert_json_error(reply, 503)
        assert reply.headers["retry-after"] == "1"
        # No answer was a 500 (an access-log status, not a port that ends in 500).
        assert not re.search(r'" 500 ', srv.output.text()), srv.output.text()


# -- GET /world: the periodic tick, read through bg.call -------------------------------


def test_get_world_shows_the_tick_advancing(server):
    first = server.get("/world")
    assert first.status == 200
    later = poll(
        lambda: server.get("/world").body,
        lambda body: body["tick"] >= first.body["tick"] + 2,
        "the world tick did not advance",
    )
    assert later["last_tick"] > first.body["last_tick"]


# -- POST /jobs and GET /jobs/<id> -----------------------------------------------------


def test_a_job_reports_progress_then_its_result(server):
    reply = server.post("/jobs", {"steps": 4, "step_seconds": 0.3})
    assert reply.status == 202, reply
    job_id = reply.body["id"]
    assert reply.body["url"] == f"/jobs/{job_id}"
    seen: list[dict] = []

    def fetch() -> dict:
        body = server.get(f"/jobs/{job_id}").body
        seen.append(body)
        return body

    final = poll(fetch, lambda body: body["status"] == "succeeded", "the job never finished")
    assert final["progress"] == {
        "done": 4,
        "total": 4,
        "message": "step 4 of 4",
        "fraction": 1.0,
    }
    assert final["result"] == {"steps": 4, "pid": reply.body["pid"]}
    midway = [b["progress"]["done"] for b in seen if b["status"] == "running" and b["progress"]]
    assert any(0 < done < 4 for done in midway), seen


def test_post_jobs_without_a_body_uses_the_defaults(server):
    reply = server.request("POST", "/jobs")
    assert reply.status == 202, reply
    job = server.get(f"/jobs/{reply.body['id']}").body
    assert job["name"] == "slow_job"


@pytest.mark.parametrize(
    "body", [{"steps": "many"}, {"steps": 0}, {"steps": 2.5}, {"step_seconds": -1}]
)
def test_post_jobs_with_bad_parameters_is_a_400_json_error(server, body):
    assert_json_error(server.post("/jobs", body), 400)


def test_get_an_unknown_job_is_a_404_json_error(server):
    assert_json_error(server.get("/jobs/" + "0" * 32), 404)


@pytest.mark.parametrize("job_id", ["nope", "A" * 32, "0" * 33, "..%2F..%2Fetc", "%00"])
def test_get_a_malformed_job_id_is_a_404_json_error(server, job_id):
    assert_json_error(server.get(f"/jobs/{job_id}"), 404)


# -- the async view --------------------------------------------------------------------


def test_an_async_view_awaits_bg_run(server):
    reply = server.get("/compute?n=10")
    assert reply.status == 200, reply
    assert reply.body["result"] == sum(i * i for i in range(10))


@pytest.mark.parametrize("query", ["n=ten", "n=-1", "n=nan", "delay=1e9"])
def test_an_async_view_with_a_bad_argument_is_a_400_json_error(server, query):
    assert_json_error(server.get(f"/compute?{query}"), 400)


def test_an_unknown_route_is_a_404_json_error(server):
    assert_json_error(server.get("/nowhere"), 404)


# -- flask run --debug -----------------------------------------------------------------


def test_flask_run_debug_ticks_the_world_once_per_period(tmp_path):
    run_file = tmp_path / "runs.log"
    env = {
        **os.environ,
        "FLASK_DEMO_TICK_SECONDS": str(TICK),
        "FLASK_DEMO_RUN_LOG": str(run_file),
        "FLASK_ASYNCBG_LOCK_DIR": str(tmp_path / "locks"),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("WERKZEUG_RUN_MAIN", None)
    flask = Path(sys.executable).with_name("flask")
    proc = subprocess.Popen(
        [str(flask), "--app", "asyncbg.demo", "run", "--debug", "--port", "0"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    output = Output(proc.stdout)
    try:
        output.wait_for(r"Debugger is active")  # printed by the reloader's child
        runs = wait_for_runs(run_file, "world", 8)
        pids = {pid for pid, _t in runs}
        # The reloader's parent imports the app too but must not tick.
        assert len(pids) == 1, runs
        assert proc.pid not in pids
        times = [t for _pid, t in runs]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert min(gaps) > TICK / 2, f"two ticks in one period: {runs}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(WAIT)
        output.join()

"""The HTTP surface: jobs, job detail, cancel, run-now, the page, and every refusal."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask, abort
from flask.testing import FlaskClient
from helpers_core import wait_for

from asyncbg import AsyncBG, current_job

WAIT = 10.0
REMOTE = {"REMOTE_ADDR": "203.0.113.9"}
CONTROL = {"X-Requested-With": "asyncbg"}
TOKEN = {"Authorization": "Bearer s3cret", **CONTROL}


def token_hook(request: Any) -> bool:
    return bool(request.headers.get("Authorization") == "Bearer s3cret")


MakeApp = Callable[..., tuple[Flask, AsyncBG]]


@pytest.fixture
def make_app(make_app: MakeApp) -> MakeApp:
    """conftest's factory, under this file's app name."""
    return functools.partial(
        make_app,
        import_name="asyncbg_dashboard_test",
    )


def controlled(make_app: MakeApp, **config: Any) -> tuple[Flask, AsyncBG]:
    """An app with the control endpoints on behind a token-checking auth hook."""
    return make_app(ASYNCBG_CONTROL=True, ASYNCBG_AUTH=token_hook, **config)


def json_of(response: Any) -> Any:
    assert response.mimetype == "application/json", response.data[:200]
    return response.json


def run_jobs(bg: AsyncBG) -> dict[str, str]:
    """Finish one job of each outcome; return their ids by outcome."""

    @bg.task(name="ok_job")
    async def ok_job(x: int) -> dict[str, int]:
        return {"double": 2 * x}

    @bg.task(name="bad_job")
    async def bad_job(card: str) -> None:
        raise ValueError(f"card {card} declined")

    ok = ok_job.submit(21)
    bad = bad_job.submit("4111")
    ok.result(WAIT)
    bad.wait(WAIT)
    return {"succeeded": ok.id, "failed": bad.id}


# -- GET jobs ------------------------------------------------------------------------------


def test_jobs_lists_newest_first_with_total(make_app: MakeApp) -> None:
    app, bg = make_app()
    bg.start()
    ids = run_jobs(bg)
    body = json_of(app.test_client().get("/_asyncbg/jobs"))
    assert [j["id"] for j in body["jobs"]] == [ids["failed"], ids["succeeded"]]
    assert body["total"] == 2
    assert body["next_offset"] is None


def test_jobs_filter_by_status_one_or_several(make_app: MakeApp) -> None:
    app, bg = make_app()
    bg.start()
    ids = run_jobs(bg)
    client = app.test_client()
    failed = json_of(client.get("/_asyncbg/jobs?status=failed"))
    assert [j["id"] for j in failed["jobs"]] == [ids["failed"]]
    both = json_of(client.get("/_asyncbg/jobs?status=failed&status=succeeded"))
    assert both["total"] == 2
    comma = json_of(client.get("/_asyncbg/jobs?status=failed,succeeded"))
    assert comma["total"] == 2
    running = json_of(client.get("/_asyncbg/jobs?status=running"))
    assert running["jobs"] == []


def test_jobs_filter_by_task_name(make_app: MakeApp) -> None:
    app, bg = make_app()
    bg.start()
    ids = run_jobs(bg)
    body = json_of(app.test_client().get("/_asyncbg/jobs?task=ok_job"))
    assert [j["id"] for j in body["jobs"]] == [ids["succeeded"]]


def test_jobs_are_paginated_with_limit_and_offset(make_app: MakeApp) -> None:
    app, bg = make_app()

    @bg.task
    async def n(i: int) -> int:
        return i

    bg.start()
    jobs = [n.submit(i) for i in range(7)]
    for job in jobs:
        job.result(WAIT)
    client = app.test_client()
    newest_first = [j.id for j in reversed(jobs)]
    seen: list[str] = []
    offset: int | None = 0
    while offset is not None:
        page = json_of(client.get(f"/_asyncbg/jobs?limit=3&offset={offset}"))
        assert page["total"] == 7
        assert page["limit"] == 3
        seen += [j["id"] for j in page["jobs"]]
        offset = page["next_offset"]
    assert seen == newest_first


@pytest.mark.parametrize(
    "query",
    [
        "status=bogus",
        "status=failed,nope",
        "limit=abc",
        "limit=0",
        "limit=501",
        "offset=-1",
        "offset=1.5",
    ],
)
def test_jobs_bad_query_is_400_json(make_app: MakeApp, query: str) -> None:
    app, bg = make_app()
    bg.start()
    r = app.test_client().get(f"/_asyncbg/jobs?{query}")
    assert r.status_code == 400
    assert json_of(r)["error"]


def test_jobs_hide_results_and_arguments_but_show_errors_by_default(make_app: MakeApp) -> None:
    app, bg = make_app()
    bg.start()
    ids = run_jobs(bg)
    client = app.test_client()
    ok = json_of(client.get(f"/_asyncbg/jobs/{ids['succeeded']}"))
    bad = json_of(client.get(f"/_asyncbg/jobs/{ids['failed']}"))
    assert "result" not in ok
    assert "args" not in ok
    assert bad["error"] == "ValueError: card 4111 declined"


def test_jobs_show_results_and_live_arguments_when_allowed(make_app: MakeApp) -> None:
    app, bg = make_app(ASYNCBG_SHOW_RESULTS=True)
    gate = asyncio.Event()

    @bg.task
    async def wait_then(x: int, *, label: str) -> int:
        await gate.wait()
        return x + 1

    bg.start()
    job = wait_then.submit(41, label="answer")
    client = app.test_client()
    live = json_of(client.get(f"/_asyncbg/jobs/{job.id}"))
    assert live["args"] == [41]
    assert live["kwargs"] == {"label": "answer"}
    bg.call(gate.set)
    job.result(WAIT)
    done = json_of(client.get(f"/_asyncbg/jobs/{job.id}"))
    assert done["result"] == 42
    assert done["args"] is None  # forgotten once the job is done


# -- GET jobs/<id> --------------------------------------------------------------------------


def test_job_detail_has_status_and_progress(make_app: MakeApp) -> None:
    app, bg = make_app()
    reported, gate = threading.Event(), asyncio.Event()

    @bg.task
    async def import_rows() -> None:
        current_job().set_progress(3, 10, "rows")
        reported.set()
        await gate.wait()

    bg.start()
    job = import_rows.submit()
    assert reported.wait(WAIT)
    body = json_of(app.test_client().get(f"/_asyncbg/jobs/{job.id}"))
    bg.call(gate.set)
    assert body["id"] == job.id
    assert body["name"] == "import_rows"
    assert body["status"] == "running"
    assert body["progress"] == {"done": 3, "total": 10, "message": "rows", "fraction": 0.3}


@pytest.mark.parametrize(
    "job_id", ["0" * 32, "not-a-job", "A" * 32, "x" * 300, "%00", "..%2f..%2fetc"]
)
def test_job_detail_unknown_or_malformed_id_is_404_json(make_app: MakeApp, job_id: str) -> None:
    app, bg = make_app()
    bg.start()
    r = app.test_client().get(f"/_asyncbg/jobs/{job_id}")
    assert r.status_code == 404
    assert "error" in json_of(r)


# -- POST jobs/<id>/cancel ------------------------------------------------------------------


def start_waiting_job(bg: AsyncBG) -> Any:
    started = threading.Event()

    @bg.task
    async def waiting() -> None:
        started.set()
        await asyncio.sleep(3600)

    bg.start()
    job = waiting.submit()
    assert started.wait(WAIT)
    return job


def test_cancel_is_off_by_default(make_app: MakeApp) -> None:
    app, bg = make_app(ASYNCBG_AUTH=token_hook)
    job = start_waiting_job(bg)
    r = app.test_client().post(f"/_asyncbg/jobs/{job.id}/cancel", headers=TOKEN)
    assert r.status_code == 404
    assert "ASYNCBG_CONTROL" in json_of(r)["error"]
    assert job.status.value == "running"


def test_cancel_without_an_auth_hook_is_refused_even_from_loopback(make_app: MakeApp) -> None:
    app, bg = make_app(ASYNCBG_CONTROL=True)
    job = start_waiting_job(bg)
    r = app.test_client().post(f"/_asyncbg/jobs/{job.id}/cancel", headers=CONTROL)
    assert r.status_code == 403
    assert "auth hook" in json_of(r)["error"]
    assert job.status.value == "running"


def test_cancel_refused_by_the_auth_hook(make_app: MakeApp) -> None:
    app, bg = controlled(make_app)
    job = start_waiting_job(bg)
    r = app.test_client().post(
        f"/_asyncbg/jobs/{job.id}/cancel", headers={"Authorization": "Bearer nope", **CONTROL}
    )
    assert r.status_code == 403
    assert json_of(r)["error"] == "refused by the auth hook"
    assert job.status.value == "running"


def test_cancel_without_the_control_header_is_refused(make_app: MakeApp) -> None:
    app, bg = controlled(make_app)
    job = start_waiting_job(bg)
    r = app.test_client().post(
        f"/_asyncbg/jobs/{job.id}/cancel", headers={"Authorization": "Bearer s3cret"}
    )
    assert r.status_code == 403
    assert "X-Requested-With" in json_of(r)["error"]


def test_cancel_a_running_job(make_app: MakeApp) -> None:
    app, bg = controlled(make_app)
    job = start_waiting_job(bg)
    r = app.test_client().post(f"/_asyncbg/jobs/{job.id}/cancel", headers=TOKEN)
    assert r.status_code == 200
    body = json_of(r)
    assert body["cancel_requested"] is True
    assert body["job"]["status"] == "cancelled"
    assert job.status.value == "cancelled"


def test_cancel_allowed_for_a_remote_client_the_hook_accepts(make_app: MakeApp) -> None:
    app, bg = controlled(make_app)
    job = start_waiting_job(bg)
    r = app.test_client().post(
        f"/_asyncbg/jobs/{job.id}/cancel", headers=TOKEN, environ_base=REMOTE
    )
    assert r.status_code == 200
    assert job.status.value == "cancelled"


def test_cancel_a_finished_job_is_409(make_app: MakeApp) -> None:
    app, bg = controlled(make_app)
    bg.start()
    ids = run_jobs(bg)
    r = app.test_client().post(f"/_asyncbg/jobs/{ids['succeeded']}/cancel", headers=TOKEN)
    assert r.status_code == 409
    assert json_of(r)["job"]["status"] == "succeeded"


def test_cancel_unknown_job_is_404(make_app: MakeApp) -> None:
    app, bg = controlled(make_app)
    bg.start()
    r = app.test_client().post(f"/_asyncbg/jobs/{'f' * 32}/cancel", headers=TOKEN)
    assert r.status_code == 404
    assert "no job" in json_of(r)["error"]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b"[1, 2]", 400),
        (b'"text"', 400),
        (b'{"force": true}', 400),
        (b"\xff\xfe", 400),
        (b"x" * (64 * 1024 + 1), 413),
    ],
)
def test_cancel_with_a_malformed_body_is_4xx_json(
    make_app: MakeApp, body: bytes, status: int
) -> None:
    app, bg = controlled(make_app)
    job = start_waiting_job(bg)
    r = app.test_client().post(
        f"/_asyncbg/jobs/{job.id}/cancel",
        data=body,
        headers={**TOKEN, "Content-Type": "application/json"},
    )
    assert r.status_code == status
    assert "error" in json_of(r)
    assert job.status.value == "running"


def test_cancel_accepts_an_empty_json_object(make_app: MakeApp) -> None:
    app, bg = controlled(make_app)
    job = start_waiting_job(bg)
    r = app.test_client().post(f"/_asyncbg/jobs/{job.id}/cancel", json={}, headers=TOKEN)
    assert r.status_code == 200
    assert job.status.value == "cancelled"


# -- POST periodic/<name>/run ---------------------------------------------------------------


def test_run_now_starts_one_run_of_the_periodic_job(make_app: MakeApp) -> None:
    app, bg = controlled(make_app)
    runs = threading.Semaphore(0)

    @bg.periodic(every=3600)
    async def nightly_report() -> None:
        runs.release()

    bg.start()
    r = app.test_client().post("/_asyncbg/periodic/nightly_report/run", headers=TOKEN)
    assert r.status_code == 202
    assert json_of(r)["started"] is True
    assert runs.acquire(timeout=WAIT)
    wait_for(lambda: bg.periodic_jobs["nightly_report"].runs == 1, what="the run to finish")


def test_run_now_while_a_run_is_in_progress_is_409(make_app: MakeApp) -> None:
    app, bg = controlled(make_app)
    started = threading.Event()
    gate = asyncio.Event()

    @bg.periodic(every=3600, run_at_start=True)
    async def sync_crm() -> None:
        started.set()
        await gate.wait()

    bg.start()
    assert started.wait(WAIT)
    try:
        r = app.test_client().post("/_asyncbg/periodic/sync_crm/run", headers=TOKEN)
        assert r.status_code == 409
        assert "already in progress" in json_of(r)["error"]
    finally:
        bg.call(gate.set)


def test_run_now_unknown_name_is_404_listing_known_names(make_app: MakeApp) -> None:
    app, bg = controlled(make_app)

    @bg.periodic(every=3600)
    async def tick() -> None:
        pass

    bg.start()
    r = app.test_client().post("/_asyncbg/periodic/tock/run", headers=TOKEN)
    assert r.status_code == 404
    assert "tick" in json_of(r)["error"]


def test_run_now_is_off_by_default(make_app: MakeApp) -> None:
    app, bg = make_app(ASYNCBG_AUTH=token_hook)

    @bg.periodic(every=3600)
    async def tick() -> None:
        pass

    bg.start()
    r = app.test_client().post("/_asyncbg/periodic/tick/run", headers=TOKEN)
    assert r.status_code == 404
    assert bg.periodic_jobs["tick"].runs == 0


def test_run_now_when_the_loop_is_stopped_is_503(make_app: MakeApp) -> None:
    app, bg = controlled(make_app)

    @bg.periodic(every=3600)
    async def tick() -> None:
        pass

    r = app.test_client().post("/_asyncbg/periodic/tick/run", headers=TOKEN)
    assert r.status_code == 503
    assert "not running" in json_of(r)["error"]


# -- nodes (the cluster with a durable backend: tests/test_cluster_view.py) ---------------


def test_nodes_with_the_memory_backend_says_nothing_is_shared(make_app: MakeApp) -> None:
    app, bg = make_app()

    @bg.periodic(every=3600, scope="host")
    async def nightly() -> None:
        pass

    bg.start()
    body = json_of(app.test_client().get("/_asyncbg/nodes"))
    assert body == {"shared": False, "node": None, "nodes": [], "leaders": {}}
    health = json_of(app.test_client().get("/_asyncbg/health"))
    assert health["cluster"] == {"shared": False, "node": None, "nodes": []}
    assert [pj["leader"] for pj in health["periodic"]] == [None]  # a host lock, no lease


# -- who may read --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/_asyncbg/jobs", f"/_asyncbg/jobs/{'a' * 32}", "/_asyncbg/nodes"]
)
def test_reads_without_a_hook_are_refused_to_remote_clients(make_app: MakeApp, path: str) -> None:
    app, bg = make_app()
    bg.start()
    r = app.test_client().get(path, environ_base=REMOTE)
    assert r.status_code == 403
    assert "loopback" in json_of(r)["error"]


@pytest.mark.parametrize("header", ["X-Forwarded-For", "Forwarded", "X-Real-Ip"])
def test_reads_through_a_local_proxy_count_as_remote(make_app: MakeApp, header: str) -> None:
    app, bg = make_app()
    bg.start()
    r = app.test_client().get("/_asyncbg/jobs", headers={header: "198.51.100.7"})
    assert r.status_code == 403


def test_reads_from_ipv6_loopback_are_allowed(make_app: MakeApp) -> None:
    app, bg = make_app()
    bg.start()
    r = app.test_client().get("/_asyncbg/jobs", environ_base={"REMOTE_ADDR": "::1"})
    assert r.status_code == 200


def test_with_a_hook_every_read_passes_it_even_from_loopback(make_app: MakeApp) -> None:
    app, bg = make_app(ASYNCBG_AUTH=token_hook)
    bg.start()
    client = app.test_client()
    assert client.get("/_asyncbg/jobs").status_code == 403
    assert client.get("/_asyncbg/jobs", headers=TOKEN, environ_base=REMOTE).status_code == 200


def test_an_auth_hook_may_answer_itself_with_401(make_app: MakeApp) -> None:
    def hook(request: Any) -> bool:
        abort(401, description="log in first")

    app, bg = make_app(ASYNCBG_AUTH=hook)
    bg.start()
    r = app.test_client().get("/_asyncbg/jobs")
    assert r.status_code == 401
    assert json_of(r)["error"] == "log in first"


def test_an_auth_hook_that_crashes_refuses_and_logs(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    def hook(request: Any) -> bool:
        raise KeyError("session")

    app, bg = make_app(ASYNCBG_AUTH=hook)
    bg.start()
    r = app.test_client().get("/_asyncbg/jobs")
    assert r.status_code == 403
    assert any("ASYNCBG_AUTH hook failed" in rec.getMessage() for rec in caplog.records)


def test_the_hook_receives_the_request(make_app: MakeApp) -> None:
    seen: list[str] = []

    def hook(request: Any) -> bool:
        seen.append(f"{request.method} {request.path}")
        return True

    app, bg = make_app(ASYNCBG_AUTH=hook)
    bg.start()
    app.test_client().get("/_asyncbg/jobs?status=failed")
    assert seen == ["GET /_asyncbg/jobs"]


# -- wrong methods, unknown paths -------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/_asyncbg/jobs", "GET, HEAD, OPTIONS"),
        ("DELETE", "/_asyncbg/health", "GET, HEAD, OPTIONS"),
        ("POST", "/_asyncbg/metrics", "GET, HEAD, OPTIONS"),
        ("DELETE", f"/_asyncbg/jobs/{'a' * 32}", "GET, HEAD, OPTIONS"),
        ("GET", f"/_asyncbg/jobs/{'a' * 32}/cancel", "POST"),
        ("PATCH", "/_asyncbg/periodic/tick/run", "POST"),
        ("POST", "/_asyncbg/", "GET, HEAD, OPTIONS"),
    ],
)
def test_wrong_method_is_405_json_with_allow(
    make_app: MakeApp, method: str, path: str, allow: str
) -> None:
    app, bg = controlled(make_app, ASYNCBG_DASHBOARD=True)
    bg.start()
    r = app.test_client().open(path, method=method, headers=TOKEN)
    assert r.status_code == 405
    assert r.headers["Allow"] == allow
    assert method in json_of(r)["error"]


@pytest.mark.parametrize(
    "path", ["/_asyncbg/nope", "/_asyncbg/jobs/a/b/c", "/_asyncbg/periodic/x", "/_asyncbg/static"]
)
def test_unknown_path_under_the_prefix_is_404_json(make_app: MakeApp, path: str) -> None:
    app, bg = make_app()
    bg.start()
    r = app.test_client().get(path)
    assert r.status_code == 404
    assert "error" in json_of(r)


def test_no_bad_request_is_answered_with_a_500(make_app: MakeApp) -> None:
    app, bg = controlled(make_app, ASYNCBG_DASHBOARD=True)

    @bg.periodic(every=3600)
    async def tick() -> None:
        pass

    bg.start()
    client: FlaskClient = app.test_client()
    weird = ["", "%", "%ff", "a" * 2000, "../..", "jobs", "\u2603", "0x1"]
    for method in ("GET", "POST", "PUT", "DELETE", "PATCH"):
        for w in weird:
            for path in (
                f"/_asyncbg/jobs/{w}",
                f"/_asyncbg/jobs/{w}/cancel",
                f"/_asyncbg/periodic/{w}/run",
                f"/_asyncbg/jobs?status={w}&limit={w}&offset={w}",
                f"/_asyncbg/{w}",
            ):
                r = client.open(path, method=method, headers=TOKEN, data=w.encode())
                assert r.status_code < 500, (method, path, r.status_code)


# -- mounting -------------------------------------------------------------------------------


def test_the_prefix_is_configurable(make_app: MakeApp) -> None:
    app, bg = make_app(ASYNCBG_DASHBOARD_PREFIX="/ops/background")
    bg.start()
    client = app.test_client()
    assert client.get("/ops/background/health").status_code == 200
    assert client.get("/_asyncbg/health").status_code == 404


def test_no_prefix_mounts_nothing(make_app: MakeApp) -> None:
    app, bg = make_app(ASYNCBG_DASHBOARD_PREFIX=None)
    bg.start()
    assert "asyncbg" not in app.blueprints
    assert app.test_client().get("/_asyncbg/health").status_code == 404


def test_init_app_twice_mounts_the_blueprint_once(make_app: MakeApp) -> None:
    app, bg = make_app()
    bg.init_app(app)
    assert list(app.blueprints) == ["asyncbg"]


def test_an_auth_hook_that_is_not_callable_is_refused_at_init() -> None:
    app = Flask("asyncbg_bad_hook")
    app.config.update(ASYNCBG_AUTOSTART=False, ASYNCBG_AUTH="admin:secret")
    with pytest.raises(TypeError, match="ASYNCBG_AUTH"):
        AsyncBG(app)


def test_the_app_keeps_its_own_404_pages(make_app: MakeApp) -> None:
    app, bg = make_app()

    @app.errorhandler(404)
    def mine(exc: Exception) -> tuple[str, int]:
        return "my own 404", 404

    bg.start()
    r = app.test_client().get("/elsewhere")
    assert r.data == b"my own 404"


# -- the dashboard page ----------------------------------------------------------------------


def test_the_dashboard_is_off_by_default(make_app: MakeApp) -> None:
    app, bg = make_app()
    bg.start()
    client = app.test_client()
    for path in ("/_asyncbg/", "/_asyncbg/static/dashboard.js"):
        r = client.get(path)
        assert r.status_code == 404
        assert "ASYNCBG_DASHBOARD" in json_of(r)["error"]


def test_the_dashboard_page_is_served_from_the_package_with_a_strict_csp(
    make_app: MakeApp,
) -> None:
    app, bg = make_app(ASYNCBG_DASHBOARD=True)
    bg.start()
    client = app.test_client()
    r = client.get("/_asyncbg/")
    assert r.status_code == 200
    assert r.mimetype == "text/html"
    html = r.get_data(as_text=True)
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]
    assert "http://" not in html
    assert "https://" not in html
    for asset, mimetype in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        assert f"/_asyncbg/static/{asset}" in html
        a = client.get(f"/_asyncbg/static/{asset}")
        assert a.status_code == 200
        assert a.mimetype == mimetype
        assert b"https://" not in a.data
        a.close()


def test_the_dashboard_without_a_hook_is_read_only(make_app: MakeApp) -> None:
    app, bg = make_app(ASYNCBG_DASHBOARD=True, ASYNCBG_CONTROL=True)
    bg.start()
    html = app.test_client().get("/_asyncbg/").get_data(as_text=True)
    assert 'data-can-control="false"' in html
    assert 'id="read-only"' in html


def test_the_dashboard_with_control_and_a_hook_has_buttons(make_app: MakeApp) -> None:
    app, bg = controlled(make_app, ASYNCBG_DASHBOARD=True)
    bg.start()
    html = app.test_client().get("/_asyncbg/", headers=TOKEN).get_data(as_text=True)
    assert 'data-can-control="true"' in html
    assert 'id="read-only"' not in html


def test_the_dashboard_is_refused_to_remote_clients_without_a_hook(make_app: MakeApp) -> None:
    app, bg = make_app(ASYNCBG_DASHBOARD=True)
    bg.start()
    client = app.test_client()
    for path in ("/_asyncbg/", "/_asyncbg/static/dashboard.js"):
        r = client.get(path, environ_base=REMOTE)
        assert r.status_code == 403
        json_of(r)


def test_the_dashboard_page_passes_the_hook(make_app: MakeApp) -> None:
    app, bg = make_app(ASYNCBG_DASHBOARD=True, ASYNCBG_AUTH=token_hook)
    bg.start()
    client = app.test_client()
    assert client.get("/_asyncbg/").status_code == 403
    assert client.get("/_asyncbg/", headers=TOKEN, environ_base=REMOTE).status_code == 200

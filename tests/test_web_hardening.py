"""The HTTP surface under hostile or odd input (issue 8).

- loopback trust needs a loopback Host and no forwarding header (DNS rebinding);
- only ``True`` from the auth hook grants; a response it returns is the answer;
- every JSON answer parses, whatever a job put in its progress;
- deeply nested JSON bodies are a 400, not a RecursionError 500;
- slow requests do not starve the health probe of the demo under Hypercorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import decimal
import functools
import json
import logging
import threading
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import numpy
import pytest
from flask import Flask, redirect
from hypercorn_harness import WAIT, Server, running
from werkzeug.test import EnvironBuilder, run_wsgi_app

from asyncbg import AsyncBG
from asyncbg.engine.jobs import Progress

MakeApp = Callable[..., tuple[Flask, AsyncBG]]
CONTROL = {"X-Requested-With": "asyncbg"}
NESTED = "[" * 1000 + "]" * 1000  # 2 KB: deeper than the default recursion limit allows


@pytest.fixture
def make_app(make_app: MakeApp) -> MakeApp:
    return functools.partial(make_app, import_name="asyncbg_hardening_test")


def strict_json(data: bytes | str) -> Any:
    """``json.loads`` that refuses NaN and the infinities, as browsers and jq do."""

    def refuse(token: str) -> Any:
        raise ValueError(f"not JSON: {token}")

    return json.loads(data, parse_constant=refuse)


def get(app: Flask, path: str, **environ: Any) -> tuple[int, bytes]:
    """GET ``path`` with exactly the environ given (no HTTP_HOST unless given)."""
    builder = EnvironBuilder(path=path, method="GET")
    env = builder.get_environ()
    builder.close()
    env.pop("HTTP_HOST", None)
    env.update({"REMOTE_ADDR": "127.0.0.1", **environ})
    app_iter, status, _headers = run_wsgi_app(app.wsgi_app, env, buffered=True)
    try:
        return int(status.split()[0]), b"".join(app_iter)
    finally:
        getattr(app_iter, "close", lambda: None)()


# -- 8. loopback trust: the Host header and forwarding headers ----------------------------

READ_PATHS = ["/_asyncbg/", "/_asyncbg/jobs", "/_asyncbg/metrics"]


@pytest.mark.parametrize("path", READ_PATHS)
@pytest.mark.parametrize(
    "host",
    [
        "attacker.example",
        "attacker.example:8000",
        "localhost.attacker.example",
        "127.0.0.1.nip.io",
        "localhost@attacker.example",
        "",
        None,
    ],
)
def test_loopback_with_a_foreign_or_missing_host_is_refused(make_app, path, host):
    app, _ = make_app(ASYNCBG_DASHBOARD=True)
    environ = {} if host is None else {"HTTP_HOST": host}
    status, body = get(app, path, **environ)
    assert status == 403, body
    assert "loopback" in strict_json(body)["error"]


@pytest.mark.parametrize("host", ["attacker.example", None])
def test_health_details_need_a_loopback_host(make_app, host):
    app, bg = make_app()
    bg.start()
    environ = {} if host is None else {"HTTP_HOST": host}
    status, body = get(app, "/_asyncbg/health", **environ)
    assert status == 200
    assert "jobs" not in strict_json(body)  # the short, public report


@pytest.mark.parametrize(
    "host", ["localhost", "LocalHost:8000", "127.0.0.1", "127.0.0.1:5000", "[::1]", "[::1]:8000"]
)
@pytest.mark.parametrize("path", READ_PATHS)
def test_loopback_with_a_loopback_host_is_trusted(make_app, path, host):
    app, _ = make_app(ASYNCBG_DASHBOARD=True)
    status, body = get(app, path, HTTP_HOST=host)
    assert status == 200, body


@pytest.mark.parametrize("remote", ["::1", "::ffff:127.0.0.1", "127.8.9.10"])
def test_every_loopback_peer_address_counts(make_app, remote):
    app, _ = make_app()
    assert get(app, "/_asyncbg/jobs", HTTP_HOST="localhost", REMOTE_ADDR=remote)[0] == 200


@pytest.mark.parametrize(
    "header",
    [
        "Forwarded",
        "X-Forwarded-For",
        "X-Real-Ip",
        "X-Forwarded-Host",
        "X-Client-IP",
        "True-Client-IP",
        "CF-Connecting-IP",
        "X-Cluster-Client-IP",
        "Client-IP",
        "Fastly-Client-IP",
        "X-Original-Forwarded-For",
    ],
)
@pytest.mark.parametrize("path", READ_PATHS)
def test_a_forwarding_header_makes_a_loopback_client_untrusted(make_app, path, header):
    app, _ = make_app(ASYNCBG_DASHBOARD=True)
    wsgi_name = "HTTP_" + header.upper().replace("-", "_")
    status, body = get(app, path, HTTP_HOST="localhost", **{wsgi_name: "198.51.100.7"})
    assert status == 403, body
    strict_json(body)


# -- 9. the auth hook: only True grants --------------------------------------------------


def login_redirect_hook(request: Any) -> Any:
    return redirect("/login")  # what flask_login's unauthorized() returns


@pytest.mark.parametrize("path", READ_PATHS)
def test_a_hook_returning_a_redirect_sends_it_and_grants_nothing(make_app, path):
    app, _ = make_app(ASYNCBG_DASHBOARD=True, ASYNCBG_AUTH=login_redirect_hook)
    response = app.test_client().get(path)
    assert response.status_code == 302
    assert response.headers["Location"] == "/login"
    assert b"jobs" not in response.data


def test_a_hook_returning_a_redirect_cannot_cancel(make_app):
    app, bg = make_app(ASYNCBG_CONTROL=True, ASYNCBG_AUTH=login_redirect_hook)
    bg.start()
    release = threading.Event()

    @bg.task(name="held")
    async def held() -> None:
        await asyncio.to_thread(release.wait, WAIT)

    job = held.submit()
    try:
        response = app.test_client().post(f"/_asyncbg/jobs/{job.id}/cancel", headers=CONTROL)
        assert response.status_code == 302
        assert not job.done()
    finally:
        release.set()
    job.wait(WAIT)
    assert job.status.value == "succeeded"


def test_a_hook_returning_a_redirect_still_gives_probes_the_status(make_app):
    app, bg = make_app(ASYNCBG_AUTH=login_redirect_hook)
    bg.start()
    response = app.test_client().get("/_asyncbg/health")
    assert response.status_code == 200
    body = strict_json(response.data)
    assert body["status"] == "ok"
    assert "jobs" not in body


@pytest.mark.parametrize(
    "answer",
    [False, None, 1, "yes", {"allow": True}, [True], ("ok", 200), numpy.bool_(True), 1.0],
    ids=repr,
)
@pytest.mark.parametrize("path", READ_PATHS)
def test_a_hook_answer_other_than_true_is_a_403(make_app, path, answer):
    app, _ = make_app(ASYNCBG_DASHBOARD=True, ASYNCBG_AUTH=lambda request: answer)
    response = app.test_client().get(path)
    assert response.status_code == 403
    assert strict_json(response.data)["error"] == "refused by the auth hook"


def test_an_odd_hook_answer_is_logged_as_a_warning(make_app, caplog):
    app, _ = make_app(ASYNCBG_AUTH=lambda request: "certainly")
    with caplog.at_level(logging.WARNING, logger="asyncbg"):
        assert app.test_client().get("/_asyncbg/jobs").status_code == 403
    assert any("only True allows" in rec.getMessage() for rec in caplog.records)


def test_a_hook_returning_true_grants(make_app):
    app, _ = make_app(ASYNCBG_DASHBOARD=True, ASYNCBG_AUTH=lambda request: True)
    client = app.test_client()
    for path in READ_PATHS:
        assert client.get(path, environ_base={"REMOTE_ADDR": "203.0.113.9"}).status_code == 200


def test_a_hook_that_raises_refuses_with_a_403_json(make_app):
    def broken(request: Any) -> bool:
        raise IndexError("malformed Authorization header")

    app, _ = make_app(ASYNCBG_AUTH=broken)
    response = app.test_client().get("/_asyncbg/jobs")
    assert response.status_code == 403
    strict_json(response.data)


# -- 11. every JSON answer parses ------------------------------------------------------


class Opaque:
    def __repr__(self) -> str:
        return "Opaque(" + "x" * 10_000 + ")"


@pytest.fixture
def odd_job(make_app: MakeApp) -> Iterator[tuple[Flask, Any]]:
    """A running job whose progress holds what JSON cannot: numpy, NaN, an object."""
    app, bg = make_app(ASYNCBG_SHOW_RESULTS=True)
    bg.start()
    started = threading.Event()
    release = threading.Event()

    @bg.task(name="odd")
    async def odd(x: float) -> None:
        started.set()
        await asyncio.to_thread(release.wait, WAIT)

    job = odd.submit(float("inf"))
    assert started.wait(WAIT)
    job.progress = Progress(numpy.int64(3), float("nan"), Opaque())  # type: ignore[arg-type]
    try:
        yield app, job
    finally:
        release.set()
        job.wait(WAIT)


@pytest.mark.parametrize("path", ["/_asyncbg/jobs", "/_asyncbg/jobs/{id}", "/_asyncbg/health"])
def test_numpy_and_nan_in_progress_still_give_parseable_json(odd_job, path):
    app, job = odd_job
    response = app.test_client().get(path.format(id=job.id))
    assert response.status_code == 200, response.data[:500]
    body = strict_json(response.data)
    if path.endswith("health"):
        [listed] = body["jobs"]["running_jobs"]
    elif path.endswith("jobs"):
        [listed] = body["jobs"]
    else:
        listed = body
    progress = listed["progress"]
    assert progress["done"] == 3
    assert progress["total"] is None
    assert progress["message"].startswith("Opaque(xxx")
    assert len(progress["message"]) <= 200


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (float("nan"), None),
        (float("-inf"), None),
        (numpy.float32(1.5), 1.5),
        (numpy.int64(7), 7),
        (numpy.bool_(True), True),
        (decimal.Decimal("2.5"), 2.5),
        (decimal.Decimal("NaN"), None),
        ({1: "a", None: "b"}, {"1": "a", "null": "b"}),
        ((1, 2), [1, 2]),
    ],
    ids=repr,
)
def test_json_safe_converts_what_json_cannot_hold(value, expected):
    from asyncbg.engine.jsonsafe import json_safe

    assert json_safe(value) == expected


def test_json_safe_cuts_cycles_and_deep_nesting():
    from asyncbg.engine.jsonsafe import json_safe

    cyclic: list[Any] = []
    cyclic.append(cyclic)
    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep]
    for value in (cyclic, deep):
        strict_json(json.dumps(json_safe(value), allow_nan=False))


# -- 12. deeply nested JSON bodies --------------------------------------------------------


@pytest.mark.parametrize("body", [NESTED, '{"a": ' + NESTED + "}"])
def test_a_deeply_nested_body_on_a_control_endpoint_is_a_400_json(make_app, body):
    app, bg = make_app(ASYNCBG_CONTROL=True, ASYNCBG_AUTH=lambda request: True)
    bg.start()

    @bg.periodic(every=3600, name="chore")
    async def chore() -> None:
        pass

    client = app.test_client()
    for path in ["/_asyncbg/jobs/" + "0" * 32 + "/cancel", "/_asyncbg/periodic/chore/run"]:
        response = client.post(
            path, data=body, headers={**CONTROL, "Content-Type": "application/json"}
        )
        # the unknown job is looked up first: a 404 is a fine answer there
        assert response.status_code in (400, 404), response.data[:300]
        strict_json(response.data)
    response = client.post(
        "/_asyncbg/periodic/chore/run",
        data=body,
        headers={**CONTROL, "Content-Type": "application/json"},
    )
    assert response.status_code == 400


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running(Server(tmp_path_factory.mktemp("demo"), workers=0)) as server:
        yield server


def raw_post(server: Server, path: str, body: bytes) -> tuple[int, Any]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{server.port}{path}",
        data=body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=WAIT) as resp:
            return resp.status, strict_json(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, strict_json(err.read())


@pytest.mark.parametrize("path", ["/task", "/jobs"])
@pytest.mark.parametrize(
    "body", [NESTED, '{"to": ' + NESTED + "}", '{"to": ' + "[" * 40 + "]" * 40 + "}"]
)
def test_a_deeply_nested_body_on_the_demo_is_a_400_json(demo, path, body):
    status, answer = raw_post(demo, path, body.encode())
    assert status == 400, answer
    assert "JSON" in answer["error"] or "nested" in answer["error"]
    assert "Traceback" not in demo.output.text()


def test_a_moderately_nested_body_on_the_demo_is_accepted(demo):
    status, answer = raw_post(demo, "/task", b'{"to": {"name": ["ann", ["b"]]}, "delay": 0}')
    assert status == 202, answer


def test_a_body_over_16_mib_on_the_demo_is_a_400_json(demo):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", demo.port, timeout=WAIT)
    try:
        conn.putrequest("POST", "/task")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(16 * 1024 * 1024 + 1))
        conn.endheaders()
        response = conn.getresponse()
        status, raw = response.status, response.read()
    finally:
        conn.close()
    assert status == 400
    assert "at most" in strict_json(raw)["error"]


# -- 16. slow requests do not starve the health probe ------------------------------------


def slow_requests(server: Server, count: int, delay: float) -> list[threading.Thread]:
    def one() -> None:
        # The server is killed at teardown with these still in flight.
        with contextlib.suppress(OSError):
            urllib.request.urlopen(
                f"http://127.0.0.1:{server.port}/compute?delay={delay}", timeout=delay + WAIT
            ).read()

    threads = [threading.Thread(target=one, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


@pytest.mark.timeout(120)
def test_health_answers_while_slow_requests_hold_every_view_thread(tmp_path):
    server = Server(tmp_path, workers=0, config={"ASYNCBG_ASGI_THREADS": 4})
    with running(server):
        clients = slow_requests(server, 8, 20)
        server.output.wait_for(r"demo compute started", count=4)  # the pool is full
        reply = server.get("/_asyncbg/health", timeout=5)
        assert reply.status == 200
        assert reply.body["status"] == "ok"
    for client in clients:
        client.join(WAIT)


@pytest.mark.timeout(120)
def test_eight_slow_requests_run_at_once_and_leave_room_for_others(tmp_path):
    server = Server(tmp_path, workers=0)
    with running(server):
        clients = slow_requests(server, 8, 20)
        server.output.wait_for(r"demo compute started", count=8, timeout=15)
        assert server.get("/world", timeout=5).status == 200
        assert server.get("/_asyncbg/health", timeout=5).status == 200
    for client in clients:
        client.join(WAIT)

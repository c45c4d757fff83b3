"""Async views on the background loop behave as Flask's stock asgiref bridge does
(issue 9): context-variable changes come back to the request thread, asgiref's
thread-sensitive calls run on the request's own thread, a view blocking the loop
is named, and concurrent to_thread calls are not throttled."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from asgiref.local import Local
from asgiref.sync import SyncToAsync, async_to_sync, sync_to_async
from flask import Flask, g
from helpers_core import WAIT, wait_for
from prometheus_client.parser import text_string_to_metric_families

from asyncbg import AsyncBG
from asyncbg.engine.monitor import describe_task_name

MakeApp = Callable[..., tuple[Flask, AsyncBG]]

trace_id: contextvars.ContextVar[str] = contextvars.ContextVar("trace_id", default="unset")
span: contextvars.ContextVar[str] = contextvars.ContextVar("span", default="unset")


@pytest.fixture
def make_app(make_app: MakeApp) -> MakeApp:
    """conftest's factory, with a monitor fast enough for the blocking tests."""
    return functools.partial(
        make_app,
        import_name="asyncbg_views_test",
        ASYNCBG_MONITOR_INTERVAL=0.02,
        ASYNCBG_BLOCKED_THRESHOLD=0.15,
    )


def concurrently(app: Flask, path: str, n: int) -> tuple[float, list[Any]]:
    """GET ``path`` from ``n`` threads at once (each with its own test client);
    return the seconds from the common start to the last answer, and the answers
    as (status, JSON body, the requesting thread's ident)."""
    start = threading.Barrier(n + 1, timeout=WAIT)
    results: list[Any] = [None] * n

    def one(i: int) -> None:
        client = app.test_client()
        start.wait()
        r = client.get(path)
        results[i] = (r.status_code, r.get_json(silent=True), threading.get_ident())

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.monotonic()
    for t in threads:
        t.join(WAIT)
    elapsed = time.monotonic() - t0
    assert not any(t.is_alive() for t in threads), "a request never finished"
    return elapsed, results


# -- item 5: context-variable changes reach the rest of the request ------------------


def test_a_contextvar_set_in_an_async_before_request_is_seen_by_after_request_and_teardown(
    make_app: MakeApp,
) -> None:
    app, bg = make_app()
    seen: dict[str, str] = {}

    @app.before_request
    async def bind_trace() -> None:
        trace_id.set("req-42")

    @app.get("/")
    def index() -> str:
        seen["view"] = trace_id.get()
        return "ok"

    @app.after_request
    def after(response: Any) -> Any:
        seen["after_request"] = trace_id.get()
        return response

    @app.teardown_request
    def teardown(_exc: BaseException | None) -> None:
        seen["teardown"] = trace_id.get()

    bg.start()
    assert app.test_client().get("/").status_code == 200
    assert seen == {"view": "req-42", "after_request": "req-42", "teardown": "req-42"}


def test_a_contextvar_set_in_an_async_view_is_seen_by_after_request(make_app: MakeApp) -> None:
    app, bg = make_app()
    seen: dict[str, str] = {}

    @app.get("/")
    async def index() -> str:
        await asyncio.sleep(0)
        span.set("view-span")
        return "ok"

    @app.after_request
    def after(response: Any) -> Any:
        seen["after_request"] = span.get()
        return response

    bg.start()
    assert app.test_client().get("/").status_code == 200
    assert seen == {"after_request": "view-span"}


def test_contextvar_changes_come_back_when_the_async_view_raises(make_app: MakeApp) -> None:
    app, bg = make_app()
    seen: dict[str, str] = {}

    @app.get("/")
    async def index() -> str:
        span.set("failing-span")
        raise LookupError("no such thing")

    @app.errorhandler(LookupError)
    def not_found(_exc: LookupError) -> tuple[str, int]:
        seen["errorhandler"] = span.get()
        return "gone", 404

    bg.start()
    assert app.test_client().get("/").status_code == 404
    assert seen == {"errorhandler": "failing-span"}


def test_an_asgiref_local_set_in_an_async_view_is_seen_by_after_request(
    make_app: MakeApp,
) -> None:
    app, bg = make_app()
    local = Local()
    seen: dict[str, Any] = {}

    @app.get("/")
    async def index() -> str:
        local.user = "ann"
        return "ok"

    @app.after_request
    def after(response: Any) -> Any:
        seen["user"] = getattr(local, "user", None)
        return response

    bg.start()
    assert app.test_client().get("/").status_code == 200
    assert seen == {"user": "ann"}


# -- item 6: thread-sensitive sync_to_async runs on the request's thread ------------------


def test_thread_sensitive_sync_to_async_in_concurrent_views_runs_on_each_request_thread(
    make_app: MakeApp,
) -> None:
    app, bg = make_app()
    n, nap = 8, 0.25

    @app.before_request
    def remember_thread() -> None:
        g.request_thread = threading.get_ident()

    def nap_here() -> int:
        time.sleep(nap)
        return threading.get_ident()

    @app.get("/nap")
    async def view() -> dict[str, Any]:
        ran_on = await sync_to_async(nap_here)()
        return {"request_thread": g.request_thread, "ran_on": ran_on}

    bg.start()
    elapsed, results = concurrently(app, "/nap", n)
    assert [status for status, _, _ in results] == [200] * n
    # Parallel, not one after the other on one shared thread (n * nap = 2 s).
    assert elapsed < 1.2, f"{n} views took {elapsed:.2f}s"
    for _, body, client_thread in results:
        assert body == {"request_thread": client_thread, "ran_on": client_thread}


def test_async_to_sync_nested_in_sync_to_async_comes_back_to_the_request_thread(
    make_app: MakeApp,
) -> None:
    app, bg = make_app()

    async def inner() -> int:
        return await sync_to_async(threading.get_ident)()

    def middle() -> tuple[int, int]:
        return threading.get_ident(), async_to_sync(inner)()

    @app.get("/nested")
    async def view() -> dict[str, Any]:
        outer, innermost = await sync_to_async(middle)()
        return {"middle": outer, "inner": innermost}

    bg.start()
    (status, body, client_thread), *_ = concurrently(app, "/nested", 1)[1]
    assert status == 200
    assert body == {"middle": client_thread, "inner": client_thread}


def test_the_request_thread_is_not_left_sending_async_to_sync_to_the_loop(
    make_app: MakeApp,
) -> None:
    app, bg = make_app()

    @app.get("/")
    async def view() -> str:
        await sync_to_async(threading.get_ident)()
        return "ok"

    bg.start()
    assert app.test_client().get("/").status_code == 200
    # asgiref's per-thread record of "the loop that called me" stays with the
    # request: a later async_to_sync in this thread must not go to the asyncbg loop.
    assert getattr(SyncToAsync.threadlocal, "main_event_loop", None) is not bg.loop_thread.loop


def test_thread_sensitive_sync_to_async_from_a_job_still_runs(make_app: MakeApp) -> None:
    _app, bg = make_app()
    loop_ident: list[int] = []

    @bg.task
    async def job() -> int:
        loop_ident.append(threading.get_ident())
        return await sync_to_async(threading.get_ident)()

    bg.start()
    ran_on = job.submit().result(WAIT)
    assert ran_on not in (loop_ident[0], threading.get_ident())


def test_without_asgiref_executor_support_views_fall_back_with_one_log_line(
    make_app: MakeApp, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import asgiref.sync

    from asyncbg import async_views as views

    class OldThreadSensitiveContext:  # asgiref before executor= was added
        def __init__(self) -> None: ...

    monkeypatch.setattr(asgiref.sync, "ThreadSensitiveContext", OldThreadSensitiveContext)
    monkeypatch.setattr(views, "_hooks", None)
    caplog.set_level(logging.INFO, logger="asyncbg")
    app, bg = make_app()

    @app.get("/")
    async def view() -> dict[str, Any]:
        span.set("fallback")
        return {"ran_on": await sync_to_async(threading.get_ident)()}

    @app.after_request
    def after(response: Any) -> Any:
        response.headers["X-Span"] = span.get()
        return response

    bg.start()
    client = app.test_client()
    for _ in range(2):
        r = client.get("/")
        assert r.status_code == 200
        assert r.headers["X-Span"] == "fallback"
        assert r.get_json()["ran_on"] != threading.get_ident()  # asgiref's shared thread
    lines = [rec for rec in caplog.records if "ThreadSensitiveContext" in rec.getMessage()]
    assert len(lines) == 1


# -- item 7a: a blocking view is named ------------------------------------------------


def blocked_warnings(caplog: pytest.LogCaptureFixture, naming: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
        and "event loop has been blocked" in r.getMessage()
        and naming in r.getMessage()
    ]


def metric_samples(app: Flask) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = app.test_client().get("/_asyncbg/metrics")
    assert r.status_code == 200, r.data
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.get_data(as_text=True))
        for s in family.samples
    }


def test_an_async_view_blocking_the_loop_is_named_in_the_log_health_and_metrics(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncbg")
    app, bg = make_app()

    @app.get("/report/<int:year>")
    async def yearly_report(year: int) -> str:
        time.sleep(0.4)  # noqa: ASYNC251 - a blocking DB call, on purpose
        return str(year)

    bg.start()
    assert app.test_client().get("/report/2026").status_code == 200
    offender = "asyncbg:view:yearly_report (GET /report/<int:year>)"
    words = "async view 'yearly_report' (GET /report/<int:year>)"
    wait_for(lambda: bg.monitor.blocked_by_offender[offender], what="the stall counted")
    (message,) = wait_for(lambda: blocked_warnings(caplog, "yearly_report"), what="warning")
    assert words in message
    assert "test_async_views.py" in message  # where it blocks
    health = app.test_client().get("/_asyncbg/health").get_json()
    blocked = health["loop"]["blocked"]
    assert blocked["by_offender"][offender] == 1
    assert blocked["last"]["offender"] == offender
    assert blocked["last"]["description"] == words
    samples = metric_samples(app)
    assert samples[("asyncbg_loop_blocked_by_offender_total", (("offender", offender),))] == 1.0


def test_an_async_hook_blocking_the_loop_is_named_with_its_view(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncbg")
    app, bg = make_app()

    @app.before_request
    async def load_user() -> None:
        time.sleep(0.4)  # noqa: ASYNC251 - blocking the loop on purpose

    @app.post("/orders")
    def create_order() -> str:
        return "created"

    bg.start()
    assert app.test_client().post("/orders").status_code == 200
    hook = f"{load_user.__qualname__}"
    offender = f"asyncbg:view:create_order (POST /orders) in {hook}"
    wait_for(lambda: bg.monitor.blocked_by_offender[offender], what="the stall counted")
    (message,) = wait_for(lambda: blocked_warnings(caplog, "load_user"), what="warning")
    assert f"async view 'create_order' (POST /orders) in {hook!r}" in message


@pytest.mark.parametrize(
    ("name", "words"),
    [
        (
            "asyncbg:view:users.show (GET /users/<int:id>)",
            "async view 'users.show' (GET /users/<int:id>)",
        ),
        (
            "asyncbg:view:api.item (PUT /items/<regex('(a|b)'):x>) in ItemAPI.put",
            "async view 'api.item' (PUT /items/<regex('(a|b)'):x>) in 'ItemAPI.put'",
        ),
        ("asyncbg:view:odd", "async view 'odd'"),
        ("asyncbg:async:fetch_all", "async function 'fetch_all'"),
    ],
)
def test_view_task_names_are_described_in_words(name: str, words: str) -> None:
    assert describe_task_name(name) == words


# -- item 7b: the default executor does not throttle concurrent views ---------------------

# More concurrent to_thread calls than the old default, min(32, cpus + 4), allowed.
OLD_DEFAULT_WORKERS = min(32, (os.cpu_count() or 1) + 4)


def test_to_thread_calls_of_concurrent_views_all_run_at_once(make_app: MakeApp) -> None:
    app, bg = make_app()
    n = OLD_DEFAULT_WORKERS + 2
    # Every call waits for all n to be in flight: with fewer threads than n it
    # breaks after the timeout instead.
    everyone = threading.Barrier(n, timeout=3.0)

    @app.get("/meet")
    async def view() -> dict[str, Any]:
        return {"arrived": await asyncio.to_thread(everyone.wait)}

    bg.start()
    _elapsed, results = concurrently(app, "/meet", n)
    assert [status for status, _, _ in results] == [200] * n
    assert sorted(body["arrived"] for _, body, _ in results) == list(range(n))


def test_concurrent_views_sleeping_in_to_thread_take_about_one_sleep(make_app: MakeApp) -> None:
    app, bg = make_app()
    n, nap = max(8, OLD_DEFAULT_WORKERS + 2), 0.25

    @app.get("/nap")
    async def view() -> str:
        await asyncio.to_thread(time.sleep, nap)
        return "ok"

    bg.start()
    elapsed, results = concurrently(app, "/nap", n)
    assert [status for status, _, _ in results] == [200] * n
    # Under two naps: with fewer than n threads some naps wait for others (>= 2 naps).
    assert elapsed < 2 * nap, f"{n} views took {elapsed:.2f}s"

"""The Flask extension: binding, config, async views on the loop, bg.run and bg.call."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from flask import current_app, g, request

from asyncbg import DEFAULT_CONFIG, AsyncBG


def test_asyncbg_app_binds_and_starts(make_app):
    app, bg = make_app(ASYNCBG_AUTOSTART=True)
    assert bg.app is app
    assert bg.loop_thread.running

    async def answer() -> int:
        return 42

    assert bg.submit(answer).result(5) == 42


def test_init_app_binds_and_starts(make_app):
    app, bg = make_app(bind=False, ASYNCBG_AUTOSTART=True)
    assert bg.app is None
    assert not bg.loop_thread.running
    bg.init_app(app)
    assert bg.app is app
    assert bg.loop_thread.running

    async def answer() -> int:
        return 42

    assert bg.submit(answer).result(5) == 42


def test_state_is_kept_in_app_extensions(make_app):
    app, bg = make_app()
    assert app.extensions["asyncbg"] is bg


def test_init_app_sets_every_default_config_key(make_app):
    app, bg = make_app(bind=False)
    kept = {"ASYNCBG_HANDLE_SIGNALS", "ASYNCBG_AUTOSTART"}  # set by the fixture
    for key in DEFAULT_CONFIG.keys() - kept:
        app.config.pop(key, None)
    bg.init_app(app)
    for key, value in DEFAULT_CONFIG.items():
        if key not in kept:
            assert app.config[key] == value, key


def test_init_app_keeps_values_the_user_set(make_app):
    app, bg = make_app(bind=False, ASYNCBG_QUEUE_MAXSIZE=7, ASYNCBG_SHUTDOWN_TIMEOUT=2.5)
    bg.init_app(app)
    assert app.config["ASYNCBG_QUEUE_MAXSIZE"] == 7
    assert app.config["ASYNCBG_SHUTDOWN_TIMEOUT"] == 2.5
    assert bg.queue_maxsize == 7
    assert bg.shutdown_timeout == 2.5


def test_a_second_asyncbg_on_the_same_app_raises(make_app):
    # Issue 9: one AsyncBG serves many apps; two AsyncBGs on one app is the error.
    app, _bg = make_app()
    with pytest.raises(RuntimeError, match="already has an AsyncBG"):
        AsyncBG(app)


def test_async_view_runs_on_the_loop_thread_with_request_g_and_current_app(make_app):
    app, bg = make_app()

    @app.before_request
    def set_g() -> None:
        g.user = "alice"

    @app.get("/where")
    async def where() -> dict[str, Any]:
        await asyncio.sleep(0)
        return {
            "thread": threading.get_ident(),
            "arg": request.args["x"],
            "user": g.user,
            "app": current_app.name,
        }

    bg.start()
    loop_ident = bg.call(threading.get_ident)
    data = app.test_client().get("/where?x=1").get_json()
    assert data == {"thread": loop_ident, "arg": "1", "user": "alice", "app": app.name}


def test_async_views_off_runs_views_outside_the_loop(make_app):
    app, bg = make_app(ASYNCBG_ASYNC_VIEWS=False)

    @app.get("/where")
    async def where() -> dict[str, Any]:
        return {"thread": threading.get_ident()}

    bg.start()
    loop_ident = bg.call(threading.get_ident)
    data = app.test_client().get("/where").get_json()
    assert data["thread"] != loop_ident


@pytest.mark.parametrize("async_views", [True, False], ids=["on-loop", "cross-loop"])
def test_await_bg_run_from_an_async_view(make_app, async_views):
    app, bg = make_app(ASYNCBG_ASYNC_VIEWS=async_views)

    @bg.task
    async def double(x: int) -> dict[str, Any]:
        await asyncio.sleep(0.01)
        return {"value": 2 * x, "thread": threading.get_ident(), "app": current_app.name}

    @app.get("/double/<int:x>")
    async def view(x: int) -> dict[str, Any]:
        result: dict[str, Any] = await bg.run(double, x)
        result["view_thread"] = threading.get_ident()
        return result

    bg.start()
    loop_ident = bg.call(threading.get_ident)
    data = app.test_client().get("/double/21").get_json()
    assert data["value"] == 42
    assert data["thread"] == loop_ident
    assert data["app"] == app.name
    assert (data["view_thread"] == loop_ident) is async_views


def test_await_bg_run_propagates_the_job_exception_to_the_view(make_app):
    app, bg = make_app(ASYNCBG_ASYNC_VIEWS=False)

    async def fail() -> None:
        raise KeyError("missing")

    @app.get("/fail")
    async def view() -> str:
        try:
            await bg.run(fail)
        except KeyError as exc:
            return f"caught {exc}"
        return "not raised"

    bg.start()
    assert app.test_client().get("/fail").get_data(as_text=True) == "caught 'missing'"


def test_call_runs_a_plain_callable_on_the_loop_thread_and_returns_its_value(make_app):
    _app, bg = make_app()
    bg.start()
    loop_thread = bg.loop_thread

    def read_state(a: int, b: int) -> tuple[bool, int]:
        return loop_thread.in_loop_thread(), a + b

    assert bg.call(read_state, 2, 3) == (True, 5)


def test_call_with_an_async_function_raises_type_error(make_app):
    _app, bg = make_app()
    bg.start()

    async def read_state() -> int:
        return 1

    with pytest.raises(TypeError, match=r"bg\.run"):
        bg.call(read_state)  # type: ignore[arg-type]


def test_async_view_starts_the_loop_lazily(make_app):
    app, bg = make_app()

    @app.get("/")
    async def index() -> str:
        return "ok"

    assert not bg.loop_thread.running
    assert app.test_client().get("/").get_data(as_text=True) == "ok"
    assert bg.loop_thread.running


def test_unbound_asyncbg_refuses_to_start() -> None:
    bg = AsyncBG()
    with pytest.raises(RuntimeError, match="init_app"):
        bg.start()

"""``durable=``: what can be stored is checked when it is asked for, on every
backend, so that code tested on memory does not fail later on a durable one."""

from __future__ import annotations

import pytest
from conftest import MakeApp
from helpers_core import WAIT

from asyncbg import ConfigError
from asyncbg.engine.jobs import TaskOptions


async def module_level_task(n: int) -> int:
    return n + 1


def test_a_task_follows_the_backend_unless_it_says_otherwise() -> None:
    assert TaskOptions().durable is None


def test_a_durable_task_runs_on_the_memory_backend_with_json_arguments(make_app: MakeApp) -> None:
    app, bg = make_app()
    task = bg.task(durable=True)(module_level_task)
    bg.start()
    with app.app_context():
        assert task.submit(41).result(WAIT) == 42


def test_arguments_json_cannot_hold_fail_at_submit_naming_the_task(make_app: MakeApp) -> None:
    app, bg = make_app()
    task = bg.task(durable=True, name="store_me")(module_level_task)
    bg.start()
    with app.app_context(), pytest.raises(TypeError, match=r"arguments of 'store_me' must be JSON"):
        task.submit({1, 2})  # type: ignore[arg-type]
    assert bg.history.jobs() == []  # no job was made


def test_nan_is_not_json_either(make_app: MakeApp) -> None:
    app, bg = make_app()
    task = bg.task(durable=True)(module_level_task)
    with app.app_context(), pytest.raises(TypeError, match="JSON"):
        task.submit(float("nan"))  # type: ignore[arg-type]


def test_a_memory_task_takes_any_argument(make_app: MakeApp) -> None:
    app, bg = make_app()

    @bg.task
    async def echo(value: object) -> object:
        return value

    bg.start()
    with app.app_context():
        assert echo.submit({1, 2}).result(WAIT) == {1, 2}


def test_a_durable_task_must_be_findable_by_name(make_app: MakeApp) -> None:
    _, bg = make_app()

    with pytest.raises(ConfigError, match=r"define it at module level"):

        @bg.task(durable=True)
        async def nested() -> None: ...

    with pytest.raises(ConfigError, match="durable"):
        bg.task(durable=True, name="anonymous")(lambda: None)
    assert "anonymous" not in bg.tasks


def test_a_closure_may_stay_in_memory(make_app: MakeApp) -> None:
    app, bg = make_app()

    @bg.task(durable=False)
    async def nested() -> str:
        return "here"

    bg.start()
    with app.app_context():
        assert nested.submit().result(WAIT) == "here"


async def module_level_consumer(item: object) -> None:
    return None


def test_a_durable_queue_refuses_an_item_json_cannot_hold(make_app: MakeApp) -> None:
    app, bg = make_app()
    q = bg.consumer("emails", durable=True)(module_level_consumer)
    bg.start()
    with app.app_context():
        with pytest.raises(TypeError, match="durable queue 'emails'"):
            bg.enqueue("emails", object())
        assert q.depth == 0  # nothing was queued
        bg.enqueue("emails", {"to": "a@b.c"})
        bg.wait_idle(WAIT)


async def test_a_durable_queue_refuses_it_from_async_code_too(make_app: MakeApp) -> None:
    app, bg = make_app()
    bg.consumer("emails", durable=True)(module_level_consumer)
    bg.start()
    with app.app_context(), pytest.raises(TypeError, match="JSON"):
        await bg.enqueue_async("emails", b"bytes")


def test_a_durable_consumer_must_be_findable_by_name(make_app: MakeApp) -> None:
    _, bg = make_app()
    with pytest.raises(ConfigError, match="the consumer of 'inline'"):
        bg.consumer("inline", durable=True)(lambda item: None)

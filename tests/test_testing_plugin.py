"""``asyncbg.testing``, the opt-in pytest plugin, run on a small user test suite (pytester)."""

from __future__ import annotations

import textwrap

import pytest
from conftest import MakeApp

from asyncbg.testing import running_instances, stop_started

pytest_plugins = ["pytester"]

USER_CONFTEST = """
import pytest
from flask import Flask

from asyncbg import AsyncBG

pytest_plugins = ["asyncbg.testing"]


@pytest.fixture
def shop():
    app = Flask("user_shop")
    app.config.update(ASYNCBG_HANDLE_SIGNALS=False)
    bg = AsyncBG(app)
    delivered = []

    @bg.consumer("mail")
    async def mail(item):
        if item == "bounce":
            raise ValueError("mailbox full")
        delivered.append(item)

    @bg.task
    async def double(x):
        return 2 * x

    return bg, delivered, double
"""

USER_TESTS = """
import asyncio

import pytest

STARTED = []


def test_eager_runs_work_before_submit_returns(shop, asyncbg_eager):
    bg, delivered, double = shop
    with asyncbg_eager(bg) as same:
        assert same is bg
        job = double.submit(21)
        assert job.done() and job.result(0) == 42
        bg.enqueue("mail", "hello")
        assert delivered == ["hello"]
        with pytest.raises(ValueError, match="mailbox full"):
            bg.enqueue("mail", "bounce")
    assert bg.eager is False


def test_idle_waits_for_jobs_and_queues(shop, asyncbg_idle):
    bg, delivered, double = shop
    for n in range(3):
        bg.enqueue("mail", n)
    job = double.submit(1)
    asyncbg_idle(bg)
    assert delivered == [0, 1, 2] and job.result(0) == 2
    bg.enqueue("mail", 3)
    asyncbg_idle()  # every running AsyncBG
    assert delivered == [0, 1, 2, 3]


def test_idle_says_what_is_still_busy(shop, asyncbg_idle):
    bg, _, _ = shop
    gate = asyncio.Event()

    async def stuck():
        await gate.wait()

    job = bg.submit(stuck)
    with pytest.raises(TimeoutError, match="1 job"):
        asyncbg_idle(bg, timeout=0.2)
    job.cancel()


def test_a_started_loop_is_left_running(shop):
    bg, _, _ = shop
    assert bg.loop_thread.running  # autostart
    STARTED.append(bg)


def test_and_is_stopped_after_its_test():
    assert STARTED and not STARTED[0].loop_thread.running


async def test_await_bg_run_under_pytest_asyncio(shop):
    bg, _, double = shop
    assert await bg.run(double, 4) == 8
"""


def test_the_plugin_serves_a_user_test_suite(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        textwrap.dedent(
            """
            [pytest]
            asyncio_mode = auto
            asyncio_default_fixture_loop_scope = function
            """
        )
    )
    pytester.makeconftest(USER_CONFTEST)
    pytester.makepyfile(test_user=USER_TESTS)
    # In its own process: asyncbg_idle() with no argument waits for every
    # running AsyncBG, and this session has its own.
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=6)
    leftover = [bg for bg in running_instances() if bg.app and bg.app.name == "user_shop"]
    assert leftover == []


def test_the_plugin_is_opt_in(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_plain="""
        def test_no_asyncbg_fixtures(request):
            assert "asyncbg_stop_started" not in request.fixturenames
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=1)


def test_stop_started_leaves_what_ran_before_alone(make_app: MakeApp) -> None:
    _, before = make_app()
    before.start()
    with stop_started(timeout=1.0):
        _, during = make_app()
        during.start()
        _, never = make_app()
    assert before.loop_thread.running
    assert not during.loop_thread.running
    assert not never.loop_thread.running

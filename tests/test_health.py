"""GET <prefix>/health, loop lag measurement and blocked-loop detection."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable

import pytest
from flask import Flask
from helpers_core import wait_for

from asyncbg import AsyncBG
from asyncbg.engine.monitor import LoopMonitor, describe_task_name

WAIT = 10.0
REMOTE = {"REMOTE_ADDR": "203.0.113.9"}

MakeApp = Callable[..., tuple[Flask, AsyncBG]]


@pytest.fixture
def make_app(make_app: MakeApp) -> MakeApp:
    """conftest's factory, with a monitor fast enough for tests."""
    return functools.partial(
        make_app,
        import_name="asyncbg_health_test",
        ASYNCBG_MONITOR_INTERVAL=0.02,
        ASYNCBG_BLOCKED_THRESHOLD=0.15,
    )


def blocked_warnings(caplog: pytest.LogCaptureFixture, naming: str) -> list[str]:
    """The blocked-loop warnings that name ``naming`` (a loaded machine can add
    others, about the loop being starved of CPU)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
        and "event loop has been blocked" in r.getMessage()
        and naming in r.getMessage()
    ]


# -- status ----------------------------------------------------------------------------


def test_health_is_200_and_ok_while_the_loop_runs(make_app: MakeApp) -> None:
    app, bg = make_app()
    bg.start()
    r = app.test_client().get("/_asyncbg/health")
    assert r.status_code == 200
    assert r.json is not None
    assert r.json["status"] == "ok"
    assert r.json["problems"] == []
    assert r.json["loop"]["alive"] is True


def test_health_is_503_before_the_loop_starts(make_app: MakeApp) -> None:
    app, _bg = make_app()
    r = app.test_client().get("/_asyncbg/health")
    assert r.status_code == 503
    assert r.json is not None
    assert r.json["status"] == "unhealthy"
    assert r.json["problems"] == ["the event loop is not running"]


def test_health_is_503_after_the_loop_stopped(make_app: MakeApp) -> None:
    app, bg = make_app()
    bg.start()
    bg.stop(timeout=1.0)
    r = app.test_client().get("/_asyncbg/health")
    assert r.status_code == 503
    assert r.json is not None
    assert r.json["loop"]["alive"] is False


def test_health_is_503_while_lag_is_over_the_threshold_and_200_after(make_app: MakeApp) -> None:
    app, bg = make_app(ASYNCBG_HEALTH_MAX_LAG=0.1, ASYNCBG_BLOCKED_THRESHOLD=5.0)
    holding, release = threading.Event(), threading.Event()

    @bg.task
    async def hog() -> None:
        holding.set()
        release.wait(WAIT)  # blocks the loop until the test has looked

    bg.start()
    client = app.test_client()
    wait_for(lambda: client.get("/_asyncbg/health").status_code == 200, what="first heartbeat")
    job = hog.submit()
    assert holding.wait(WAIT)
    r = wait_for(
        lambda: (resp := client.get("/_asyncbg/health")).status_code == 503 and resp,
        what="health to turn 503",
    )
    assert r.json["loop"]["alive"] is True
    assert "event loop lag" in r.json["problems"][0]
    assert r.json["loop"]["lag"] > 0.1
    release.set()
    job.result(WAIT)
    wait_for(lambda: client.get("/_asyncbg/health").status_code == 200, what="health to recover")


def test_health_lag_threshold_none_never_fails_on_lag(make_app: MakeApp) -> None:
    app, bg = make_app(ASYNCBG_HEALTH_MAX_LAG=None, ASYNCBG_BLOCKED_THRESHOLD=5.0)
    holding, release = threading.Event(), threading.Event()

    @bg.task
    async def hog() -> None:
        holding.set()
        release.wait(WAIT)

    bg.start()
    job = hog.submit()
    assert holding.wait(WAIT)
    client = app.test_client()
    try:
        wait_for(
            lambda: (client.get("/_asyncbg/health").json or {})["loop"]["lag"] > 0.2,
            what="lag to build up",
        )
        assert client.get("/_asyncbg/health").status_code == 200
    finally:
        release.set()
    job.result(WAIT)


# -- what the report holds ---------------------------------------------------------------


def test_health_details_list_queues_periodic_jobs_and_running_jobs(make_app: MakeApp) -> None:
    app, bg = make_app()
    gate = threading.Event()
    ran = threading.Event()

    @bg.consumer("mail", concurrency=2, maxsize=7)
    async def mail(item: object) -> None:
        gate.wait(WAIT)

    @bg.periodic(every=60, run_at_start=True)
    async def refresh() -> None:
        ran.set()
        raise ValueError("upstream down")

    @bg.task
    async def long_job() -> None:
        await asyncio.sleep(WAIT)

    bg.start()
    assert ran.wait(WAIT)
    job = long_job.submit()
    wait_for(lambda: job.status.value == "running", what="job to run")
    wait_for(lambda: bg.periodic_jobs["refresh"].failures == 1, what="periodic failure")
    r = app.test_client().get("/_asyncbg/health")
    body = r.json
    assert body is not None
    (queue,) = body["queues"]
    assert queue["name"] == "mail"
    assert queue["capacity"] == 7
    assert queue["concurrency"] == 2
    assert queue["depth"] == 0
    (periodic,) = body["periodic"]
    assert periodic["name"] == "refresh"
    assert periodic["runs"] == 1
    assert periodic["failures"] == 1
    assert periodic["skips"] == 0
    assert periodic["last_error"] == "ValueError: upstream down"
    assert periodic["last_start"] is not None
    assert periodic["last_duration"] is not None
    assert periodic["next_due"] > time.time()
    assert body["jobs"]["running"] == 1
    assert [j["id"] for j in body["jobs"]["running_jobs"]] == [job.id]
    assert "result" not in body["jobs"]["running_jobs"][0]
    job.cancel()
    gate.set()


def test_health_shows_queue_depth(make_app: MakeApp) -> None:
    app, bg = make_app()
    gate = threading.Event()
    started = threading.Event()

    @bg.consumer("slow", maxsize=10)
    async def slow(item: object) -> None:
        started.set()
        gate.wait(WAIT)

    bg.start()
    for i in range(4):
        bg.enqueue("slow", i)
    assert started.wait(WAIT)
    try:
        body = app.test_client().get("/_asyncbg/health").json
        assert body is not None
        (queue,) = body["queues"]
        assert queue["depth"] == 3
        assert queue["active"] == 1
    finally:
        gate.set()


def test_health_gives_remote_clients_only_the_status(make_app: MakeApp) -> None:
    app, bg = make_app()
    bg.start()
    r = app.test_client().get("/_asyncbg/health", environ_base=REMOTE)
    assert r.status_code == 200
    assert r.json is not None
    assert set(r.json) == {"status", "problems", "loop", "time"}
    assert set(r.json["loop"]) == {"alive", "lag"}


def test_health_behind_a_proxy_on_loopback_counts_as_remote(make_app: MakeApp) -> None:
    app, bg = make_app()
    bg.start()
    r = app.test_client().get("/_asyncbg/health", headers={"X-Forwarded-For": "198.51.100.1"})
    assert r.status_code == 200
    assert r.json is not None
    assert "queues" not in r.json


def test_health_refuses_remote_clients_when_not_public(make_app: MakeApp) -> None:
    app, bg = make_app(ASYNCBG_HEALTH_PUBLIC=False)
    bg.start()
    r = app.test_client().get("/_asyncbg/health", environ_base=REMOTE)
    assert r.status_code == 403
    assert r.json is not None
    assert "trusted" in r.json["error"]


def test_health_details_follow_the_auth_hook(make_app: MakeApp) -> None:
    app, bg = make_app(ASYNCBG_AUTH=lambda request: request.headers.get("X-Token") == "s3cret")
    bg.start()
    client = app.test_client()
    allowed = client.get("/_asyncbg/health", environ_base=REMOTE, headers={"X-Token": "s3cret"})
    refused = client.get("/_asyncbg/health", headers={"X-Token": "wrong"})
    assert allowed.status_code == refused.status_code == 200
    assert allowed.json is not None
    assert refused.json is not None
    assert "queues" in allowed.json
    assert "queues" not in refused.json


def test_health_when_the_auth_hook_aborts_still_gives_the_status(make_app: MakeApp) -> None:
    from flask import abort

    def hook(request: object) -> bool:
        abort(401)

    app, bg = make_app(ASYNCBG_AUTH=hook)
    bg.start()
    r = app.test_client().get("/_asyncbg/health")
    assert r.status_code == 200
    assert r.json is not None
    assert r.json["status"] == "ok"
    assert "queues" not in r.json


def test_health_without_monitor_reports_no_lag_and_stays_healthy(make_app: MakeApp) -> None:
    app, bg = make_app(ASYNCBG_MONITOR=False)
    bg.start()
    r = app.test_client().get("/_asyncbg/health")
    assert r.status_code == 200
    assert r.json is not None
    assert r.json["loop"]["lag"] is None
    assert r.json["loop"]["monitored"] is False


# -- lag -----------------------------------------------------------------------------


def test_idle_loop_lag_is_small_and_sampled_continuously(make_app: MakeApp) -> None:
    app, bg = make_app()
    bg.start()
    client = app.test_client()
    body = wait_for(
        lambda: (b := client.get("/_asyncbg/health").json) and b["loop"]["lag_samples"] >= 5 and b,
        what="five heartbeats",
    )
    loop = body["loop"]
    # Structural, not a speed target: far below the blocking job of the next test.
    assert 0 <= loop["lag_p50"] <= loop["lag_p99"] <= loop["lag_max"] < 0.25
    assert loop["lag_window"] == 60.0


def test_a_job_blocking_the_loop_shows_in_lag_and_in_a_warning_naming_it(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncbg")
    app, bg = make_app(ASYNCBG_MONITOR_INTERVAL=0.02, ASYNCBG_BLOCKED_THRESHOLD=0.15)
    block_for = 0.6

    @bg.task
    async def crunch_numbers() -> None:
        time.sleep(block_for)  # noqa: ASYNC251 - blocking the loop on purpose

    bg.start()
    client = app.test_client()
    wait_for(lambda: bg.monitor.lag_stats()["samples"] >= 5, what="heartbeats before")
    crunch_numbers.submit().result(WAIT)
    after = bg.monitor.lag_stats()["samples"]
    wait_for(lambda: bg.monitor.lag_stats()["samples"] >= after + 5, what="heartbeats after")
    body = client.get("/_asyncbg/health").json
    assert body is not None
    loop = body["loop"]
    # The heartbeat that was due during the block ran late by at least the
    # block minus one heartbeat interval.
    assert loop["lag_max"] >= block_for - 0.02 - 0.05
    assert loop["lag_p50"] < loop["lag_max"] / 2  # one outlier among many small samples
    blocked = loop["blocked"]
    assert blocked["by_offender"]["asyncbg:job:crunch_numbers"] == 1
    last = bg.monitor.last_blocked
    assert last is not None
    assert last.offender == "asyncbg:job:crunch_numbers"
    assert last.duration >= 0.15
    assert last.where is not None
    assert "test_health.py" in last.where
    (message,) = wait_for(lambda: blocked_warnings(caplog, "crunch_numbers"), what="warning")
    assert "job 'crunch_numbers'" in message
    assert "crunch_numbers" in message.split(" at ", 1)[1]  # the frame it was stuck in


def test_a_periodic_job_blocking_the_loop_is_named_as_periodic(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncbg")
    _app, bg = make_app()
    done = threading.Event()

    @bg.periodic(every=3600, run_at_start=True)
    async def rebuild_index() -> None:
        time.sleep(0.4)  # noqa: ASYNC251 - blocking the loop on purpose
        done.set()

    bg.start()
    assert done.wait(WAIT)
    (message,) = wait_for(lambda: blocked_warnings(caplog, "rebuild_index"), what="warning")
    assert "periodic job 'rebuild_index'" in message
    assert bg.monitor.blocked_by_offender["asyncbg:periodic:rebuild_index"] == 1


def test_a_consumer_blocking_the_loop_is_named_by_its_queue(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncbg")
    _app, bg = make_app()

    @bg.consumer("thumbnails")
    async def thumbnails(item: object) -> None:
        time.sleep(0.4)  # noqa: ASYNC251 - blocking the loop on purpose

    bg.start()
    bg.enqueue("thumbnails", "cat.png")
    bg.wait_idle(WAIT)
    (message,) = wait_for(lambda: blocked_warnings(caplog, "thumbnails"), what="warning")
    assert "consumer of queue 'thumbnails'" in message


def test_a_plain_callback_blocking_the_loop_is_named_by_its_function(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncbg")
    _app, bg = make_app()

    def read_everything() -> int:
        time.sleep(0.4)
        return 1

    bg.start()
    assert bg.call(read_everything) == 1
    (message,) = wait_for(lambda: blocked_warnings(caplog, "read_everything"), what="warning")
    assert "callback 'test_health." in message
    offenders = [o for o in bg.monitor.blocked_by_offender if o.endswith("read_everything")]
    assert offenders == [
        "test_health.test_a_plain_callback_blocking_the_loop_is_named_by_its_function"
        ".<locals>.read_everything"
    ]


def test_the_warning_is_logged_once_per_offender_per_minute_but_every_block_counts(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncbg")
    app, bg = make_app()

    @bg.task
    async def offender_a() -> None:
        time.sleep(0.4)  # noqa: ASYNC251 - blocking the loop on purpose

    @bg.task
    async def offender_b() -> None:
        time.sleep(0.4)  # noqa: ASYNC251 - blocking the loop on purpose

    bg.start()
    counts = bg.monitor.blocked_by_offender
    for n in (1, 2):
        offender_a.submit().result(WAIT)
        wait_for(lambda n=n: counts["asyncbg:job:offender_a"] == n, what=f"stall {n} counted")
    offender_b.submit().result(WAIT)
    wait_for(lambda: counts["asyncbg:job:offender_b"] == 1, what="offender_b counted")
    assert len(blocked_warnings(caplog, "offender_a")) == 1
    assert len(blocked_warnings(caplog, "offender_b")) == 1
    body = app.test_client().get("/_asyncbg/health").json
    assert body is not None
    assert body["loop"]["blocked"]["count"] >= 3
    assert body["loop"]["blocked"]["by_offender"]["asyncbg:job:offender_a"] == 2


def test_two_jobs_blocking_back_to_back_are_two_stalls(make_app: MakeApp) -> None:
    _app, bg = make_app()

    @bg.task
    async def twin() -> None:
        time.sleep(0.4)  # noqa: ASYNC251 - blocking the loop on purpose

    bg.start()
    # One burst: both may start in the same loop iteration, before the
    # heartbeat gets a turn between them.
    first, second = twin.submit(), twin.submit()
    first.result(WAIT)
    second.result(WAIT)
    counts = bg.monitor.blocked_by_offender
    wait_for(lambda: counts["asyncbg:job:twin"] == 2, what="two stalls counted")


def test_short_blocks_under_the_threshold_are_not_reported(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncbg")
    _app, bg = make_app(ASYNCBG_BLOCKED_THRESHOLD=2.0)

    @bg.task
    async def brief() -> None:
        time.sleep(0.2)  # noqa: ASYNC251 - blocking the loop on purpose

    bg.start()
    brief.submit().result(WAIT)
    # the heartbeat measured it as lag, so the watchdog had its chance to look
    wait_for(lambda: (bg.monitor.lag_stats()["max"] or 0) >= 0.1, what="lag sample")
    assert "asyncbg:job:brief" not in bg.monitor.blocked_by_offender
    assert blocked_warnings(caplog, "brief") == []


def test_monitor_restarts_with_the_loop(make_app: MakeApp) -> None:
    _app, bg = make_app()
    bg.start()
    bg.stop(timeout=1.0)
    assert not bg.monitor.active
    bg.start()
    wait_for(lambda: bg.monitor.active, what="heartbeat after restart")
    first = bg.monitor.lag_stats()["samples"]
    wait_for(lambda: bg.monitor.lag_stats()["samples"] > first, what="new samples")


def test_monitor_rejects_bad_settings() -> None:
    from asyncbg import LoopThread

    with pytest.raises(ValueError, match="interval"):
        LoopMonitor(LoopThread("x"), interval=0)
    with pytest.raises(ValueError, match="blocked_threshold"):
        LoopMonitor(LoopThread("x"), blocked_threshold=-1)


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("asyncbg:job:send", "job 'send'"),
        ("asyncbg:periodic:tick", "periodic job 'tick'"),
        ("asyncbg:consumer:mail", "consumer of queue 'mail'"),
        ("worker-3", "task 'worker-3'"),
    ],
)
def test_task_names_are_described_in_words(name: str, words: str) -> None:
    assert describe_task_name(name) == words

"""GET <prefix>/metrics, parsed with prometheus_client's own text parser."""

from __future__ import annotations

import asyncio
import functools
import sys
import threading
import time
from collections.abc import Callable

import pytest
from flask import Flask
from helpers_core import wait_for
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from asyncbg import AsyncBG

WAIT = 10.0

MakeApp = Callable[..., tuple[Flask, AsyncBG]]


@pytest.fixture
def make_app(make_app: MakeApp) -> MakeApp:
    """conftest's factory, with a monitor fast enough for tests."""
    return functools.partial(
        make_app,
        import_name="asyncbg_metrics_test",
        ASYNCBG_MONITOR_INTERVAL=0.02,
        ASYNCBG_BLOCKED_THRESHOLD=0.15,
    )


def scrape(app: Flask) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` from one scrape."""
    r = app.test_client().get("/_asyncbg/metrics")
    assert r.status_code == 200, r.data
    assert r.mimetype == "text/plain"
    samples = {}
    for family in text_string_to_metric_families(r.get_data(as_text=True)):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def families(app: Flask) -> dict[str, str]:
    """``{family name: type}`` from one scrape."""
    text = app.test_client().get("/_asyncbg/metrics").get_data(as_text=True)
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def test_metrics_have_the_documented_families_and_types(make_app: MakeApp) -> None:
    app, bg = make_app()
    bg.start()
    assert families(app) == {
        "asyncbg_jobs": "counter",
        "asyncbg_job_duration_seconds": "histogram",
        "asyncbg_jobs_running": "gauge",
        "asyncbg_queue_depth": "gauge",
        "asyncbg_queue_capacity": "gauge",
        "asyncbg_queue_active": "gauge",
        "asyncbg_queue_items": "counter",
        "asyncbg_loop_up": "gauge",
        "asyncbg_loop_lag_seconds": "gauge",
        "asyncbg_loop_lag_p50_seconds": "gauge",
        "asyncbg_loop_lag_p99_seconds": "gauge",
        "asyncbg_loop_blocked": "counter",
        "asyncbg_loop_blocked_by_offender": "counter",
        "asyncbg_periodic_runs": "counter",
        "asyncbg_periodic_failures": "counter",
        "asyncbg_periodic_skips": "counter",
        "asyncbg_periodic_last_duration_seconds": "gauge",
        "asyncbg_periodic_next_due_timestamp_seconds": "gauge",
        # The cluster's families: described always, with samples only with a
        # durable backend (tests/test_cluster_view.py).
        "asyncbg_cluster_nodes": "gauge",
        "asyncbg_node_up": "gauge",
        "asyncbg_node_last_seen_timestamp_seconds": "gauge",
        "asyncbg_node_running": "gauge",
        "asyncbg_node_lag_seconds": "gauge",
        "asyncbg_periodic_leader": "gauge",
        "asyncbg_periodic_lease_epoch": "gauge",
        "asyncbg_periodic_lease_expires_timestamp_seconds": "gauge",
    }


def test_job_counts_by_task_and_outcome(make_app: MakeApp) -> None:
    app, bg = make_app()

    @bg.task
    async def charge(fail: bool) -> None:
        if fail:
            raise RuntimeError("declined")

    @bg.task(timeout=0.05)
    async def slow() -> None:
        await asyncio.sleep(WAIT)

    bg.start()
    jobs = [charge.submit(False), charge.submit(False), charge.submit(True), slow.submit()]
    for job in jobs:
        assert job.wait(WAIT)
    samples = scrape(app)
    jobs_total = {
        labels: value for (name, labels), value in samples.items() if name == "asyncbg_jobs_total"
    }
    assert jobs_total == {
        (("outcome", "succeeded"), ("task", "charge")): 2.0,
        (("outcome", "failed"), ("task", "charge")): 1.0,
        (("outcome", "timed_out"), ("task", "slow")): 1.0,
    }


def test_job_duration_histogram_counts_every_finished_job(make_app: MakeApp) -> None:
    app, bg = make_app()

    @bg.task
    async def quick() -> None:
        pass

    bg.start()
    for job in [quick.submit() for _ in range(5)]:
        job.result(WAIT)
    samples = scrape(app)
    task = (("task", "quick"),)
    assert samples[("asyncbg_job_duration_seconds_count", task)] == 5.0
    assert samples[("asyncbg_job_duration_seconds_bucket", (("le", "+Inf"), *task))] == 5.0
    assert samples[("asyncbg_job_duration_seconds_sum", task)] >= 0.0
    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for (name, labels), value in samples.items()
        if name == "asyncbg_job_duration_seconds_bucket"
    )
    counts = [value for _, value in buckets]
    assert counts == sorted(counts)  # cumulative


def test_unruly_job_names_do_not_make_new_series(make_app: MakeApp) -> None:
    import functools

    app, bg = make_app()

    async def add(a: int, b: int) -> int:
        return a + b

    bg.start()
    for i in range(3):
        bg.submit(functools.partial(add, i), 1).result(WAIT)
    samples = scrape(app)
    tasks = {dict(labels)["task"] for (name, labels) in samples if name == "asyncbg_jobs_total"}
    assert tasks == {"other"}


def test_queue_depth_capacity_and_items(make_app: MakeApp) -> None:
    app, bg = make_app()
    started = threading.Event()
    gate = asyncio.Event()

    @bg.consumer("mail", maxsize=20, concurrency=1)
    async def mail(item: int) -> None:
        if item < 0:
            raise ValueError("bad item")
        started.set()
        await gate.wait()

    bg.start()
    bg.enqueue("mail", -1)
    for i in range(5):
        bg.enqueue("mail", i)
    assert started.wait(WAIT)
    samples = scrape(app)
    q = (("queue", "mail"),)
    assert samples[("asyncbg_queue_depth", q)] == 4.0
    assert samples[("asyncbg_queue_capacity", q)] == 20.0
    assert samples[("asyncbg_queue_active", q)] == 1.0
    assert samples[("asyncbg_queue_items_total", (("outcome", "failed"), *q))] == 1.0
    bg.call(gate.set)
    bg.wait_idle(WAIT)
    samples = scrape(app)
    assert samples[("asyncbg_queue_depth", q)] == 0.0
    assert samples[("asyncbg_queue_items_total", (("outcome", "processed"), *q))] == 5.0


def test_loop_up_and_lag(make_app: MakeApp) -> None:
    app, bg = make_app()
    bg.start()
    wait_for(lambda: bg.monitor.lag_stats()["samples"] >= 3, what="heartbeats")
    samples = scrape(app)
    assert samples[("asyncbg_loop_up", ())] == 1.0
    lag = samples[("asyncbg_loop_lag_seconds", ())]
    p50 = samples[("asyncbg_loop_lag_p50_seconds", ())]
    p99 = samples[("asyncbg_loop_lag_p99_seconds", ())]
    assert 0.0 <= p50 <= p99
    assert lag >= 0.0
    bg.stop(timeout=1.0)
    assert scrape(app)[("asyncbg_loop_up", ())] == 0.0


def test_blocked_loop_is_counted_by_offender(make_app: MakeApp) -> None:
    app, bg = make_app()

    @bg.task
    async def hog() -> None:
        time.sleep(0.4)  # noqa: ASYNC251 - blocking the loop on purpose

    bg.start()
    hog.submit().result(WAIT)
    wait_for(lambda: bg.monitor.blocked_by_offender["asyncbg:job:hog"], what="the stall")
    wait_for(lambda: (bg.monitor.lag_stats()["max"] or 0) >= 0.2, what="the late heartbeat")
    samples = scrape(app)
    offender = (("offender", "asyncbg:job:hog"),)
    assert samples[("asyncbg_loop_blocked_by_offender_total", offender)] == 1.0
    assert samples[("asyncbg_loop_blocked_total", ())] >= 1.0
    assert samples[("asyncbg_loop_lag_p99_seconds", ())] >= 0.2


def test_periodic_runs_failures_and_skips(make_app: MakeApp) -> None:
    app, bg = make_app()
    release = asyncio.Event()
    calls = 0

    @bg.periodic(every=0.05, run_at_start=True)
    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await release.wait()  # overlaps the next ticks: they are skipped
            raise RuntimeError("upstream down")

    bg.start()
    pj = bg.periodic_jobs["flaky"]
    wait_for(lambda: pj.skips >= 2, what="skipped ticks")
    bg.call(release.set)
    wait_for(lambda: pj.runs >= 2, what="a second run")
    samples = scrape(app)
    job = (("job", "flaky"),)
    assert samples[("asyncbg_periodic_failures_total", job)] == 1.0
    assert samples[("asyncbg_periodic_runs_total", job)] >= 2.0
    assert samples[("asyncbg_periodic_skips_total", job)] >= 2.0
    assert samples[("asyncbg_periodic_last_duration_seconds", job)] >= 0.0
    assert samples[("asyncbg_periodic_next_due_timestamp_seconds", job)] > time.time() - 1


def test_metrics_can_go_into_the_apps_own_registry(make_app: MakeApp) -> None:
    registry = CollectorRegistry()
    requests = Counter("myapp_requests", "Requests.", registry=registry)
    requests.inc(3)
    app, bg = make_app(ASYNCBG_METRICS_REGISTRY=registry)
    bg.start()
    samples = scrape(app)
    assert samples[("myapp_requests_total", ())] == 3.0
    assert ("asyncbg_loop_up", ()) in samples


def test_metrics_are_refused_to_remote_clients_without_a_hook(make_app: MakeApp) -> None:
    app, bg = make_app()
    bg.start()
    r = app.test_client().get("/_asyncbg/metrics", environ_base={"REMOTE_ADDR": "192.0.2.1"})
    assert r.status_code == 403
    assert r.json is not None


def test_metrics_for_a_scraper_the_hook_accepts(make_app: MakeApp) -> None:
    app, bg = make_app(ASYNCBG_AUTH=lambda req: req.headers.get("Authorization") == "Bearer m")
    bg.start()
    r = app.test_client().get(
        "/_asyncbg/metrics",
        environ_base={"REMOTE_ADDR": "192.0.2.1"},
        headers={"Authorization": "Bearer m"},
    )
    assert r.status_code == 200


def test_metrics_off_is_404_json(make_app: MakeApp) -> None:
    app, bg = make_app(ASYNCBG_METRICS=False)
    bg.start()
    r = app.test_client().get("/_asyncbg/metrics")
    assert r.status_code == 404
    assert r.json is not None
    assert "ASYNCBG_METRICS" in r.json["error"]


def test_metrics_without_prometheus_client_is_404_saying_what_to_install(
    make_app: MakeApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, bg = make_app()
    bg.start()
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import now fails
    r = app.test_client().get("/_asyncbg/metrics")
    assert r.status_code == 404
    assert r.json is not None
    assert "pip install 'asyncbg[metrics]'" in r.json["error"]
    # the rest of the surface does not need it
    assert app.test_client().get("/_asyncbg/health").status_code == 200

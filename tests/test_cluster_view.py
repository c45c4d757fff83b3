"""The whole cluster on the surfaces: GET /nodes, health and metrics list every
node sharing the store (its last heartbeat, loop lag and running count, dead
ones marked) and who leads each store-leased periodic job.

Two apps on one SQLite file stand for two workers: each has its own durable
runner, so its own node id, heartbeat, claims and leases (see
tests/test_durable.py). Every wait is on a gate or a bounded poll of what the
surfaces answer.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from asyncbg import AsyncBG
from asyncbg.engine.cluster import dead_after
from tests.conftest import MakeApp
from tests.helpers_core import WAIT, Gate, wait_for

pytestmark = pytest.mark.timeout(60)

LEASE = 1.0  # a heartbeat every 1/3 s; a node is dead after 4/3 s of silence


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'jobs.db'}"


@pytest.fixture
def make_node(make_app: MakeApp, db: str) -> functools.partial[tuple[Flask, AsyncBG]]:
    """An app on the shared file: one node of the cluster."""
    return functools.partial(
        make_app,
        ASYNCBG_BACKEND=db,
        ASYNCBG_POLL_INTERVAL=0.05,
        ASYNCBG_LEASE=LEASE,
        ASYNCBG_MONITOR_INTERVAL=0.02,
    )


def node_of(bg: AsyncBG) -> str:
    durable = bg._state().durable
    assert durable is not None
    return durable.owner


def nodes(app: Flask) -> dict[str, Any]:
    r = app.test_client().get("/_asyncbg/nodes")
    assert r.status_code == 200, r.data
    assert r.mimetype == "application/json"
    body: dict[str, Any] = r.json
    return body


def node_in(app: Flask, node: str) -> dict[str, Any] | None:
    return next((n for n in nodes(app)["nodes"] if n["id"] == node), None)


def scrape(app: Flask) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = app.test_client().get("/_asyncbg/metrics")
    assert r.status_code == 200, r.data
    samples = {}
    for family in text_string_to_metric_families(r.get_data(as_text=True)):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_every_node_sees_both_nodes_with_heartbeat_lag_and_running_count(
    make_node: Any,
) -> None:
    (app_a, bg_a), (app_b, bg_b) = make_node(), make_node(ASYNCBG_WORKER_CONCURRENCY=0)
    gate, started = Gate(), Gate()
    for bg in (bg_a, bg_b):

        @bg.task(name="held")
        async def held() -> None:
            started.set()
            await gate.wait_async()

    bg_a.start()
    bg_b.start()
    a, b = node_of(bg_a), node_of(bg_b)
    assert a != b  # two apps of one process: two nodes
    assert a.split(":")[:2] == b.split(":")[:2]  # same host and pid, own incarnations

    with app_b.app_context():
        job = bg_b.tasks["held"].submit()  # submitted in B, runs in A
    assert started.wait()
    # A's next heartbeat says it holds one job, and its loop lag (monitored).
    seen_from_b = wait_for(
        lambda: (
            (n := node_in(app_b, a)) is not None
            and n["running"] == 1
            and n["lag"] is not None
            and n
        ),
        what="A's heartbeat with its running job and lag, seen from B",
    )
    assert seen_from_b["alive"] is True
    assert seen_from_b["here"] is False
    assert seen_from_b["lag"] >= 0
    assert [seen_from_b["host"], str(seen_from_b["pid"])] == a.split(":")[:2]
    assert seen_from_b["age"] >= 0
    assert seen_from_b["last_seen"] <= nodes(app_b)["time"] + 1

    body = nodes(app_b)
    assert body["shared"] is True
    assert body["node"] == b
    assert body["lease"] == LEASE
    assert body["dead_after"] == pytest.approx(dead_after(LEASE))
    assert (body["alive"], body["dead"]) == (2, 0)
    here = [n for n in body["nodes"] if n["here"]]
    assert [n["id"] for n in here] == [b]
    assert here[0]["running"] == 0  # B runs nothing
    # Newest heartbeat first.
    seen = [n["last_seen"] for n in body["nodes"]]
    assert seen == sorted(seen, reverse=True)

    # The same cluster from A, where A is "here".
    from_a = nodes(app_a)
    assert from_a["node"] == a
    assert {n["id"]: n["here"] for n in from_a["nodes"]} == {a: True, b: False}

    # Health (detailed) and metrics show it too.
    health = app_b.test_client().get("/_asyncbg/health").json
    assert health["cluster"]["alive"] == 2
    assert {n["id"] for n in health["cluster"]["nodes"]} == {a, b}
    assert "leaders" not in health["cluster"]  # they are on each periodic job
    samples = scrape(app_b)
    assert samples[("asyncbg_cluster_nodes", (("state", "alive"),))] == 2
    assert samples[("asyncbg_cluster_nodes", (("state", "dead"),))] == 0
    assert samples[("asyncbg_node_up", (("node", a),))] == 1
    assert samples[("asyncbg_node_up", (("node", b),))] == 1
    wait_for(
        lambda: scrape(app_b)[("asyncbg_node_running", (("node", a),))] == 1,
        what="A's running count in B's metrics",
    )
    assert scrape(app_b)[("asyncbg_node_lag_seconds", (("node", a),))] >= 0

    gate.set()
    with app_b.app_context():
        job.result(WAIT)
    wait_for(
        lambda: (n := node_in(app_b, a)) is not None and n["running"] == 0,
        what="A's heartbeat after the job ended",
    )


def stall(bg: AsyncBG) -> threading.Event:
    """Block ``bg``'s loop (its heartbeats stop, as in a stuck or paused
    process) until the returned event is set, or for WAIT seconds at most."""
    release, blocked = threading.Event(), threading.Event()

    def block() -> None:
        blocked.set()
        release.wait(WAIT)

    bg.loop_thread.loop.call_soon_threadsafe(block)
    assert blocked.wait(WAIT)
    return release


def test_a_node_whose_heartbeats_stopped_is_marked_dead_and_one_that_stopped_leaves(
    make_node: Any,
) -> None:
    (app_a, bg_a), (app_b, bg_b) = make_node(), make_node()
    bg_a.start()
    bg_b.start()
    a, b = node_of(bg_a), node_of(bg_b)
    wait_for(lambda: nodes(app_a)["alive"] == 2, what="both nodes alive, seen from A")

    release = stall(bg_b)
    try:
        last = node_in(app_a, b)
        assert last is not None
        dead = wait_for(
            lambda: (n := node_in(app_a, b)) is not None and not n["alive"] and n,
            what="B marked dead, seen from A",
        )
        assert dead["age"] > dead_after(LEASE)
        assert dead["last_seen"] - last["last_seen"] < dead_after(LEASE)
        body = nodes(app_a)
        assert (body["alive"], body["dead"]) == (1, 1)
        assert [n["id"] for n in body["nodes"] if n["alive"]] == [a]

        # A dead node elsewhere does not make this one unhealthy.
        health = app_a.test_client().get("/_asyncbg/health")
        assert health.status_code == 200
        assert health.json["status"] == "ok"
        assert (health.json["cluster"]["alive"], health.json["cluster"]["dead"]) == (1, 1)
        samples = scrape(app_a)
        assert samples[("asyncbg_cluster_nodes", (("state", "dead"),))] == 1
        assert samples[("asyncbg_node_up", (("node", b),))] == 0
        assert samples[("asyncbg_node_up", (("node", a),))] == 1
    finally:
        release.set()

    # B's loop runs again: its next heartbeat makes it alive.
    wait_for(lambda: nodes(app_a)["alive"] == 2, what="B alive again")

    # A graceful stop: B leaves the list instead of being shown dead.
    bg_b.stop(timeout=WAIT)
    body = nodes(app_a)
    assert [n["id"] for n in body["nodes"]] == [a]
    assert (body["alive"], body["dead"]) == (1, 0)

    # B's own surface, with its loop stopped, cannot ask the store.
    r = app_b.test_client().get("/_asyncbg/nodes")
    assert r.status_code == 503
    assert "not running" in r.json["error"]
    stopped = app_b.test_client().get("/_asyncbg/health")
    assert stopped.status_code == 503
    assert stopped.json["cluster"] is None


def test_the_leader_of_a_cluster_periodic_job_is_shown_everywhere_and_moves_at_stop(
    make_node: Any,
) -> None:
    (app_a, bg_a), (app_b, bg_b) = make_node(), make_node()
    ticked = {"a": Gate(), "b": Gate()}
    for tag, bg in (("a", bg_a), ("b", bg_b)):

        @bg.periodic(every=0.1, scope="cluster", name="chore")
        async def chore(tag: str = tag) -> None:
            ticked[tag].set()

        @bg.periodic(every=3600, name="local")  # process scope: no lease
        async def local() -> None:
            pass

    bg_a.start()
    bg_b.start()
    apps = {node_of(bg_a): (app_a, bg_a, "a"), node_of(bg_b): (app_b, bg_b, "b")}

    def leader(app: Flask) -> dict[str, Any]:
        found: dict[str, Any] = nodes(app)["leaders"]["chore"]
        return found

    first = wait_for(lambda: (lead := leader(app_a))["held"] and lead, what="a leader")
    holder = first["owner"]
    assert holder in apps
    assert first["epoch"] >= 1
    assert first["expires_at"] > nodes(app_a)["time"]
    holder_app, holder_bg, holder_tag = apps[holder]
    (other,) = [n for n in apps if n != holder]
    other_app, _other_bg, other_tag = apps[other]
    assert ticked[holder_tag].wait()

    # Both nodes show the same holder and epoch; only the holder says "here".
    from_holder, from_other = leader(holder_app), leader(other_app)
    assert (from_holder["owner"], from_holder["epoch"]) == (holder, first["epoch"])
    assert (from_other["owner"], from_other["epoch"]) == (holder, first["epoch"])
    assert (from_holder["here"], from_other["here"]) == (True, False)
    assert set(nodes(holder_app)["leaders"]) == {"chore"}  # a process-scoped job has none

    # Health: each periodic job with its leader (None without a lease).
    periodic = {
        p["name"]: p for p in holder_app.test_client().get("/_asyncbg/health").json["periodic"]
    }
    assert periodic["local"]["leader"] is None
    assert periodic["chore"]["leader"]["owner"] == holder
    assert periodic["chore"]["leader"]["here"] is True
    # Metrics: 1 on the holder, 0 elsewhere; the epoch and expiry.
    on_holder, on_other = scrape(holder_app), scrape(other_app)
    job = (("job", "chore"),)
    assert on_holder[("asyncbg_periodic_leader", job)] == 1
    assert on_other[("asyncbg_periodic_leader", job)] == 0
    assert on_other[("asyncbg_periodic_lease_epoch", job)] == first["epoch"]
    assert on_other[("asyncbg_periodic_lease_expires_timestamp_seconds", job)] > 0

    # The holder stops: it releases the lease, the other takes it at its next tick.
    ticked[other_tag] = Gate()
    holder_bg.stop(timeout=WAIT)
    moved = wait_for(
        lambda: (lead := leader(other_app))["held"] and lead["owner"] == other and lead,
        what="the other node leads",
    )
    assert moved["epoch"] > first["epoch"]
    assert moved["here"] is True
    assert ticked[other_tag].wait()  # and runs the schedule

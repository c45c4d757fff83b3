"""The PostgreSQL and Redis benchmarks run end to end (briefly) against the
session's throw-away servers, every subject included, so that their code
cannot rot.

No speed is asserted: figures are judged as ratios by ``python -m benchmarks
--only postgres`` / ``--only redis``, never in the test suite.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from asyncbg.backends import known_schemes
from tests.servers import PostgresServer, RedisServer

ROOT = Path(__file__).resolve().parent.parent
GROUPS = [
    "idle, same process",
    "idle, submitted by another host process",
    "jobs from 1 host x 1 thread",
    "jobs from 1 host x 4 threads",
    "jobs from 3 hosts x 1 thread",
    "jobs from 3 hosts x 4 threads",
]


@dataclass(frozen=True)
class Bench:
    """One benchmark of the host-process shape: its name and subjects."""

    name: str
    scheme: str  # asyncbg's backend, when this tree has it
    asyncbg: str
    peers: dict[str, str]  # subject -> the distribution it needs
    bare: str


BENCHES = {
    "postgres": Bench(
        "postgres",
        "postgresql",
        "asyncbg postgresql",
        {"procrastinate": "procrastinate", "SAQ PostgresQueue": "saq"},
        "one statement per job",
    ),
    "redis": Bench(
        "redis",
        "redis",
        "asyncbg redis",
        {"arq": "arq", "SAQ Redis Queue": "saq", "Huey RedisHuey": "huey", "RQ": "rq"},
        "one command per job",
    ),
}


def _subjects(bench: Bench) -> list[str]:
    subjects = [bench.bare]
    subjects += [name for name, dist in bench.peers.items() if importlib.util.find_spec(dist)]
    if bench.scheme in known_schemes():
        subjects.append(bench.asyncbg)
    return subjects


Smoke = tuple[Bench, str, dict[str, Any]]


@pytest.fixture(scope="module", params=sorted(BENCHES))
def smoke(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Smoke:
    bench = BENCHES[request.param]
    out = tmp_path_factory.mktemp(f"bench-{bench.name}")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if bench.name == "postgres":
        pg: PostgresServer = request.getfixturevalue("postgres_server")
        env["ASYNCBG_BENCH_PG_URL"] = pg.url("postgres")
    else:
        redis: RedisServer = request.getfixturevalue("redis_server")
        env["ASYNCBG_BENCH_REDIS_URL"] = redis.url(1)  # a database no test uses: it is flushed
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--only", bench.name, "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return bench, proc.stdout, json.loads((out / "results-smoke.json").read_text())


@pytest.mark.timeout(300)
def test_every_subject_has_every_figure(smoke: Smoke) -> None:
    bench, stdout, data = smoke
    assert [s["name"] for s in data["sections"]] == [bench.name]
    rows = data["sections"][0]["rows"]
    have = {(r["group"], r["subject"], r["metric"]) for r in rows}
    for subject in _subjects(bench):
        for group in GROUPS:
            assert (group, subject, "submit call p50") in have, (group, subject)
            assert f"| {bench.name}: {group} | {subject} | submit call p50 |" in stdout
            if group.startswith("idle"):
                assert (group, subject, "start p50") in have, (group, subject)
                assert (group, subject, "start p99") in have, (group, subject)
            else:
                assert (group, subject, "jobs/s") in have, (group, subject)
    for row in rows:
        assert isinstance(row["value"], float | int), row
        assert math.isfinite(row["value"]), row
        if row["metric"] in {"jobs/s", "start p50", "submit call p50"}:
            assert row["value"] > 0, row


@pytest.mark.timeout(300)
def test_ratios_are_taken_in_the_same_run(smoke: Smoke) -> None:
    bench, _, data = smoke
    rows = data["sections"][0]["rows"]
    names = {(r["group"], r["subject"], r["metric"]) for r in rows}
    with_ratio = [r for r in rows if r["ratio"] is not None]
    assert with_ratio
    for r in with_ratio:
        assert (r["group"], r["baseline"], r["metric"]) in names, r
    for r in rows:
        if r["metric"] == "jobs/s" and r["baseline"] is not None:
            # throughput against the fastest of the peer libraries
            assert r["baseline"] in bench.peers, r


@pytest.mark.timeout(300)
def test_asyncbg_rows_carry_the_targets_or_a_note_says_why_not(smoke: Smoke) -> None:
    bench, stdout, data = smoke
    rows = data["sections"][0]["rows"]
    if bench.asyncbg not in _subjects(bench):
        assert not [r for r in rows if r["subject"] == bench.asyncbg]
        assert f"{bench.asyncbg}: not available in this tree" in stdout
        return
    targets = {(r["group"], r["metric"]): r for r in rows if r["subject"] == bench.asyncbg}
    assert targets[("idle, submitted by another host process", "start p50")]["target"]
    for group in GROUPS[2:]:
        row = targets[(group, "jobs/s")]
        assert any(peer in row["target"] for peer in bench.peers), row
        assert isinstance(row["met"], bool), row


@pytest.mark.timeout(300)
def test_the_run_leaves_nothing_behind(smoke: Smoke, request: pytest.FixtureRequest) -> None:
    bench = smoke[0]
    if bench.name == "postgres":
        pg: PostgresServer = request.getfixturevalue("postgres_server")
        names = pg.psql("SELECT datname FROM pg_database").split()
        assert not [n for n in names if n.startswith("bench_")], names
        sessions = pg.psql(
            "SELECT count(*) FROM pg_stat_activity WHERE datname LIKE 'bench\\_%'"
        ).strip()
        assert sessions == "0"
    else:
        import redis

        server: RedisServer = request.getfixturevalue("redis_server")
        client = redis.Redis.from_url(server.url(1))
        try:
            assert client.dbsize() == 0
            # every host's connection is closed (the test's own is the one left on db 1)
            clients = [c for c in client.client_list() if int(c.get("db", -1)) == 1]
            assert len(clients) == 1, clients
        finally:
            client.close()

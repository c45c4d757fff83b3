"""The PostgreSQL benchmark runs end to end (briefly) against the session's
throw-away server, every subject included, so that its code cannot rot.

No speed is asserted: figures are judged as ratios by ``python -m benchmarks
--only postgres``, never in the test suite.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from asyncbg.backends import known_schemes
from tests.servers import PostgresServer

ROOT = Path(__file__).resolve().parent.parent
GROUPS = [
    "idle, same process",
    "idle, submitted by another host process",
    "jobs from 1 host x 1 thread",
    "jobs from 1 host x 4 threads",
    "jobs from 3 hosts x 1 thread",
    "jobs from 3 hosts x 4 threads",
]
ASYNCBG = "asyncbg postgresql"


def _subjects() -> list[str]:
    subjects = ["one statement per job"]
    if importlib.util.find_spec("procrastinate"):
        subjects.append("procrastinate")
    if importlib.util.find_spec("saq"):
        subjects.append("SAQ PostgresQueue")
    if "postgresql" in known_schemes():  # the backend of issue 12 is in this tree
        subjects.append(ASYNCBG)
    return subjects


@pytest.fixture(scope="module")
def pg_smoke(
    postgres_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench-pg")
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        ASYNCBG_BENCH_PG_URL=postgres_server.url("postgres"),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--only", "postgres", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout, json.loads((out / "results-smoke.json").read_text())


@pytest.mark.timeout(300)
def test_every_subject_has_every_figure(pg_smoke: tuple[str, dict[str, Any]]) -> None:
    stdout, data = pg_smoke
    assert [s["name"] for s in data["sections"]] == ["postgres"]
    rows = data["sections"][0]["rows"]
    have = {(r["group"], r["subject"], r["metric"]) for r in rows}
    for subject in _subjects():
        for group in GROUPS:
            assert (group, subject, "submit call p50") in have, (group, subject)
            assert f"| postgres: {group} | {subject} | submit call p50 |" in stdout
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
def test_ratios_are_taken_in_the_same_run(pg_smoke: tuple[str, dict[str, Any]]) -> None:
    _, data = pg_smoke
    rows = data["sections"][0]["rows"]
    names = {(r["group"], r["subject"], r["metric"]) for r in rows}
    with_ratio = [r for r in rows if r["ratio"] is not None]
    assert with_ratio
    for r in with_ratio:
        assert (r["group"], r["baseline"], r["metric"]) in names, r
    for r in rows:
        if r["metric"] == "jobs/s" and r["baseline"] is not None:
            # throughput against the faster of the two queue libraries
            assert r["baseline"] in {"procrastinate", "SAQ PostgresQueue"}, r


@pytest.mark.timeout(300)
def test_asyncbg_rows_carry_the_targets_or_a_note_says_why_not(
    pg_smoke: tuple[str, dict[str, Any]],
) -> None:
    stdout, data = pg_smoke
    section = data["sections"][0]
    rows = section["rows"]
    if ASYNCBG not in _subjects():
        assert not [r for r in rows if r["subject"] == ASYNCBG]
        assert "asyncbg postgresql: not available in this tree" in stdout
        return
    targets = {(r["group"], r["metric"]): r for r in rows if r["subject"] == ASYNCBG}
    assert targets[("idle, submitted by another host process", "start p50")]["target"]
    for group in GROUPS[2:]:
        row = targets[(group, "jobs/s")]
        assert "procrastinate" in row["target"] or "SAQ" in row["target"], row
        assert isinstance(row["met"], bool), row


@pytest.mark.timeout(300)
def test_the_run_leaves_no_database_or_session_behind(
    pg_smoke: tuple[str, dict[str, Any]], postgres_server: PostgresServer
) -> None:
    names = postgres_server.psql("SELECT datname FROM pg_database").split()
    assert not [n for n in names if n.startswith("bench_")], names
    sessions = postgres_server.psql(
        "SELECT count(*) FROM pg_stat_activity WHERE datname LIKE 'bench\\_%'"
    ).strip()
    assert sessions == "0"

"""The Redis backend across real hosts: Hypercorn servers running
``tests/apps/durable_app.py`` (its audit file, outside the store, gets a line
per run start, end and cancellation), on a key prefix of a throw-away
redis-server, read by the test straight from the job hashes.

- ``test_a_host_killed_...``: kill -9 of the host holding jobs, then kill -9 of
  redis-server and a restart on its AOF: every acknowledged job ends succeeded,
  run to its end by the other host, the dead host's runs counted as attempts.
- ``test_a_cancel_from_another_host_...``: a cancel asked on one host reaches
  the run on another long before a renewal (30 s lease): the pub/sub wake-up.
- ``test_a_host_on_a_server_that_loses_work_...``: a host started against a
  server without AOF, or with ``allkeys-lru``, refuses to start and says which
  setting loses what; with ``?preflight=warn`` it starts and logs it.

The three-host runs of the PostgreSQL tests (SIGSTOP past the lease, the
rolling restart under load, the network partition) are not here yet.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from hypercorn_harness import WAIT
from test_durable_processes import Row, new_ids
from test_postgres_processes import Hosts, check_cancel_across_hosts, terminate, wait_audit

from tests.servers import RedisServer

pytestmark = pytest.mark.timeout(90)


class RedisStore:
    """The test's own view of one prefix: the job hashes, read with redis-py."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix

    def rows(self) -> dict[str, Row]:
        client = redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=5)
        try:
            out: dict[str, Row] = {}
            for key in client.scan_iter(match="{" + self.prefix + "}:j:*", count=1000):
                h = client.hgetall(key)
                if "id" not in h:
                    continue
                out[h["id"]] = Row(
                    h["id"],
                    h["queue"],
                    h["status"],
                    int(h["attempts"]),
                    h.get("owner"),
                    _float(h.get("started_at")),
                    _float(h.get("finished_at")),
                    _float(h.get("lease_until")),
                    json.loads(h["result_json"]) if "result_json" in h else None,
                    h.get("error"),
                )
            return out
        finally:
            client.close()

    def wait(
        self, done: Callable[[dict[str, Row]], bool], what: str, timeout: float = WAIT
    ) -> dict[str, Row]:
        """Poll until ``done(rows)`` (a server restarting meanwhile is asked again)."""
        deadline = time.monotonic() + timeout
        rows: dict[str, Row] = {}
        while True:
            with contextlib.suppress(redis.ConnectionError):
                rows = self.rows()
                if done(rows):
                    return rows
            assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
            time.sleep(0.05)  # other processes write it: poll, under a deadline


def _float(text: str | None) -> float | None:
    return None if text is None else float(text)


@pytest.fixture(name="hosts")
def _hosts(tmp_path: Path) -> Iterator[Hosts]:
    # As the PostgreSQL tests': every host killed at teardown, its output kept.
    made = Hosts(tmp_path)
    yield made
    made.kill_all()


@pytest.fixture
def own_redis() -> Callable[..., RedisServer]:
    made: list[RedisServer] = []

    def make(**settings: str) -> RedisServer:
        server = RedisServer(settings=settings).start()
        made.append(server)
        return server

    yield make  # type: ignore[misc]
    for server in made:
        server.cleanup()


def test_a_host_killed_holding_jobs_has_them_run_elsewhere_and_a_killed_server_loses_nothing(
    hosts: Hosts, own_redis: Callable[..., RedisServer]
) -> None:
    server = own_redis()
    prefix = f"p{secrets.token_hex(6)}"
    url = f"{server.url()}?prefix={prefix}"
    store = RedisStore(server.url(), prefix)
    lease = 2.0
    a = hosts.spawn("a", url, lease=lease)
    hosts.ready(a)
    apids = a.worker_pids()
    ids = new_ids(6)
    reply = a.post("/submit", {"kind": "sleep", "seconds": 2.0, "ids": ids})
    assert reply.status == 200, reply
    acknowledged = reply.body["acknowledged"]
    assert acknowledged == ids, reply
    wait_audit(
        hosts.audit,
        lambda au: all(any(r.pid in apids for r in au.runs.get(u, [])) for u in ids),
        "A started every one of them",
    )
    # A dies holding every one of them; B comes up and takes them after the lease.
    os.killpg(a.pid, signal.SIGKILL)  # the supervisor and its worker
    a.wait_exit()
    b = hosts.spawn("b", url, lease=lease, config={"ASYNCBG_CONNECT_TIMEOUT": 10.0})
    hosts.ready(b)
    bpids = b.worker_pids()
    wait_audit(
        hosts.audit,
        lambda au: all(any(r.pid in bpids for r in au.runs.get(u, [])) for u in ids),
        "B started every one of them",
    )
    # Then the server itself is killed (B's runs under way) and restarted on its AOF.
    server.restart(kill=True)
    rows = store.wait(
        lambda rows: all(rows.get(u) and rows[u].status == "succeeded" for u in acknowledged),
        "every acknowledged job succeeded after the server's restart",
        timeout=3 * WAIT,
    )
    audit = wait_audit(
        hosts.audit,
        lambda au: all(any(r.end is not None for r in au.runs.get(u, [])) for u in ids),
        "every job ran to its end",
    )
    for uid in ids:
        runs = audit.runs[uid]
        assert runs[0].pid in apids  # cut off by the kill
        assert any(r.pid in bpids and r.end is not None for r in runs)
        assert rows[uid].attempts >= 2  # the lost run counted
        assert rows[uid].result["pid"] in bpids
    terminate(b)


def test_a_cancel_from_another_host_reaches_the_run_long_before_a_renewal(
    hosts: Hosts, redis_server: RedisServer, redis_prefix: str
) -> None:
    check_cancel_across_hosts(
        hosts,
        f"{redis_server.url()}?prefix={redis_prefix}",
        RedisStore(redis_server.url(), redis_prefix),
    )


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"appendonly": "no"}, "appendonly is no"),
        ({"maxmemory-policy": "allkeys-lru"}, "maxmemory-policy is allkeys-lru"),
    ],
)
def test_a_host_on_a_server_that_loses_work_refuses_to_start_unless_told_to_warn(
    tmp_path: Path,
    hosts: Hosts,
    own_redis: Callable[..., RedisServer],
    settings: dict[str, str],
    says: str,
) -> None:
    server = own_redis(**settings)
    refused = hosts.spawn("refused", server.url(), lease=2.0)
    # The startup fails, so Hypercorn ends instead of serving (its exit code is 0).
    refused.wait_exit(timeout=WAIT)
    assert "BackendError: Redis at" in refused.output.text()
    assert says in refused.output.text()
    assert "loses acknowledged work" in refused.output.text()
    warned = hosts.spawn("warned", f"{server.url()}?preflight=warn", lease=2.0)
    hosts.ready(warned)
    assert says in warned.output.text()
    terminate(warned)

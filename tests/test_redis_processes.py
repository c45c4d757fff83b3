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

- ``test_three_hosts_...``: the PostgreSQL test's run, through the same check
  (``check_three_hosts_under_load``): under steady load kill -9 of the
  periodic leader, SIGSTOP of the next one past its lease, SIGTERM of
  redis-server and a restart on its AOF, a rolling restart of every host; every
  acknowledged id final, nothing stale landed, no slot of the periodic job ran
  twice.
- ``test_a_host_cut_off_...``: the PostgreSQL test's network cut-off, through
  the same check (``check_cut_off_host``): a host in a network namespace,
  reaching redis-server over a veth pair, blackholed past its lease: the others
  take its jobs and the leadership; on heal its late writes are rejected, its
  runs cancelled, and it leads nothing. It needs root and ``ip``, as there.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypercorn_harness import WAIT, Server
from test_durable_processes import Row, new_ids, wait_stopped
from test_postgres_processes import (
    Hosts,
    check_cancel_across_hosts,
    check_cut_off_host,
    check_three_hosts_under_load,
    network_namespace,
    terminate,
    wait_audit,
)

from tests.servers import RedisServer

pytestmark = pytest.mark.timeout(90)


class RedisStore:
    """The test's own view of one prefix: the job hashes, the periodic job's
    anchor (``an:``), granted slots (``sl:``) and lease epoch (``le:``), read
    with redis-py (the :class:`~test_postgres_processes.Shared` of the checks)."""

    relisten = re.compile(r"\[(?P<pid>\d+)\].*listening on Redis at \S+ again")
    restarted = "redis-server restarted (SIGTERM, its AOF reloaded)"

    def __init__(self, url: str, prefix: str, server: RedisServer | None = None) -> None:
        self.url = url
        self.prefix = prefix
        self.server = server

    @classmethod
    def of(cls, server: RedisServer) -> RedisStore:
        """A fresh prefix on ``server``."""
        return cls(server.url(), f"p{secrets.token_hex(6)}", server)

    def backend(self, host: str | None = None) -> str:
        """The hosts' ``ASYNCBG_BACKEND``, reaching the server at ``host``."""
        assert self.server is not None
        return f"{self.server.url(host=host)}?prefix={self.prefix}"

    def restart(self) -> None:
        """SIGTERM of redis-server (the AOF flushed), started again on its folder."""
        assert self.server is not None
        self.server.restart()

    def stop_outside_transaction(self, server: Server) -> int:
        """SIGSTOP of every process of ``server``: one does, since every state
        change is one Lua script, atomic on the server, and a stopped client
        holds nothing there that others wait on (PostgreSQL's row locks)."""
        os.killpg(server.pid, signal.SIGSTOP)
        for pid in server.worker_pids():
            wait_stopped(pid)
        return 1

    def _client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=5)

    def _read(self, kind: str, name: str, read: Callable[[redis.Redis, str], Any]) -> Any:
        """``read(client, key)`` of the key ``{prefix}:<kind>:<...>-<name>`` of
        the periodic job ``name``; None when there is none."""
        client = self._client()
        try:
            keys = list(client.scan_iter(match=f"{{{self.prefix}}}:{kind}:*-{name}", count=1000))
            assert len(keys) <= 1, keys
            return read(client, keys[0]) if keys else None
        finally:
            client.close()

    def anchor(self, name: str) -> float | None:
        got = self._read("an", name, redis.Redis.get)
        return float(got) if got else None

    def slots(self, name: str) -> list[tuple[int, int]]:
        """``(slot, 0)`` of every slot of ``name`` the store let run (Redis
        keeps no epoch per slot, and folds all but the last 1024 to 2048 into a
        floor: far more than a test's runs)."""
        got = self._read("sl", name, lambda client, key: client.zrange(key, 0, -1))
        return [(int(m), 0) for m in got or []]

    def epoch(self, name: str) -> int | None:
        got = self._read("le", name, redis.Redis.get)
        return int(got) if got else None

    def rows(self) -> dict[str, Row]:
        client = self._client()
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

    def make(listen: list[str] | None = None, **settings: str) -> RedisServer:
        server = RedisServer(settings=settings, listen=listen).start()
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


@pytest.mark.timeout(150)
def test_three_hosts_under_load_lose_nothing_and_land_nothing_stale(
    hosts: Hosts, own_redis: Callable[..., RedisServer]
) -> None:
    check_three_hosts_under_load(hosts, RedisStore.of(own_redis()))


@pytest.mark.timeout(120)
def test_a_host_cut_off_past_its_lease_is_taken_over_and_steps_down_on_heal(
    hosts: Hosts, own_redis: Callable[..., RedisServer]
) -> None:
    with network_namespace() as netns:
        server = own_redis(listen=["127.0.0.1", netns.host_addr])
        check_cut_off_host(hosts, RedisStore.of(server), netns)


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

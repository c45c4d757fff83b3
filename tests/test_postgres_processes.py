"""The PostgreSQL backend across real hosts: Hypercorn servers, each its own
"host" (its own process group, folder and node ids), on one schema of a
throw-away PostgreSQL (issue 12, "How each promise is shown").

The app is ``tests/apps/durable_app.py`` with ``ASYNCBG_BACKEND`` a
``postgresql://`` URL; its audit file (outside the store) gets a line per run
start, end and cancellation, and one per run of the ``scope="cluster"``
periodic job ``cluster-tick`` (``CLUSTER_EVERY``). Client threads submit jobs
and items with client-made ids through a load balancer over the hosts in
rotation and retry what was cut off (the same ids: a retried submit makes no
second job) until every id is acknowledged.

- ``test_three_hosts_...``: under steady load, kill -9 of one host (the
  periodic leader), SIGSTOP of another (the leader then) past its lease and
  SIGCONT, a rolling SIGTERM restart of all three, and an immediate restart of
  PostgreSQL; then every acknowledged id is final, every succeeded one ran and
  the store's result names the run that landed, the stopped host's late
  writes were all rejected, released jobs ran again at once (same attempt,
  before their lease could have run out), and no slot of the periodic job ran
  twice. ``test_a_host_stopped_after_a_database_restart_...``: a host stopped
  after a database restart still ends its shutdown, with its release reported.
- ``test_a_host_cut_off_...``: one host's Hypercorn runs in a network namespace
  reaching PostgreSQL over a veth pair; its routes are blackholed past the
  lease: the others take its jobs and the periodic leadership; on heal its
  late writes are rejected, its runs cancelled and it leads nothing.
- ``test_a_cancel_from_another_host_...``: the delay from a cancel request on
  one host to the cancellation of the run on another, with a 30 s lease (a
  renewal every 10 s): only the NOTIFY wake-up explains a short one.

The bodies of ``a``, ``b`` and ``c`` are the checks ``check_three_hosts_under_load``,
``check_cut_off_host`` and ``check_cancel_across_hosts``, over any store of the
:class:`Shared` (or :class:`Rows`) protocol: ``tests/test_redis_processes.py``
runs the same ones on Redis (where the server restart is a SIGTERM and a
restart on the AOF, and one SIGSTOP always lands outside a transaction).

The namespace test needs root and ``ip`` (CI has both): without them it fails,
saying so, instead of skipping (``network_namespace()`` makes the namespace).

Everything waits on conditions with deadlines (the store, the audit file, the
servers' output); the checks read what the hosts cannot lie about: the store
(with psycopg, from the test) and the audit file.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psycopg
import pytest
from hypercorn_harness import WAIT, Server
from test_durable_processes import (
    STALE,
    Batch,
    Clients,
    Row,
    Run,
    batches,
    check_outcomes,
    new_ids,
    reports,
    span,
    wait_stopped,
)

from tests.servers import PostgresServer

APP = str(Path(__file__).resolve().parent / "apps" / "durable_app.py") + ":asgi_app"
#: The stale side's two ways of noticing a lost claim (the engine's warnings).
REJECTED = re.compile(r"\[(?P<pid>\d+)\] \[WARNING\] asyncbg: job \S+ (?P<id>\S+): this process's")
LOST = re.compile(r"\[(?P<pid>\d+)\] \[WARNING\] asyncbg: job \S+ (?P<id>\S+): its claim was lost")
RELISTEN = re.compile(r"\[(?P<pid>\d+)\].*listening on PostgreSQL at \S+ again")
TICK = "cluster-tick"


# -- the store ------------------------------------------------------------------------------


class Store:
    """The test's own view of one schema: read with psycopg, from outside the hosts."""

    #: A worker's line on listening again after the server came back.
    relisten = RELISTEN
    restarted = "PostgreSQL restarted (immediate)"

    def __init__(self, url: str, schema: str, server: PostgresServer | None = None) -> None:
        self.url = url
        self.schema = schema
        self.server = server

    @classmethod
    def of(cls, server: PostgresServer, schema: str) -> Store:
        return cls(server.url(), schema, server)

    def backend(self, host: str | None = None) -> str:
        """The hosts' ``ASYNCBG_BACKEND``, reaching the server at ``host``."""
        assert self.server is not None
        return f"{self.server.url(host=host)}?schema={self.schema}"

    def restart(self) -> None:
        """Stop PostgreSQL immediately (no checkpoint, every connection cut) and start it."""
        assert self.server is not None
        self.server.restart("immediate")

    def stop_outside_transaction(self, server: Server) -> int:
        return stop_outside_transaction(self, server)

    def _query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            return list(conn.execute(sql, params).fetchall())

    def rows(self) -> dict[str, Row]:
        got = self._query(
            "SELECT id, queue, status, attempts, owner, started_at, finished_at, lease_until, "
            f'result_json, error FROM "{self.schema}".jobs'
        )
        return {
            r[0]: Row(*r[:8], json.loads(r[8]) if r[8] is not None else None, r[9]) for r in got
        }

    def wait(
        self, done: Callable[[dict[str, Row]], bool], what: str, timeout: float = WAIT
    ) -> dict[str, Row]:
        """Poll until ``done(rows)`` (a store restarting meanwhile is asked again)."""
        deadline = time.monotonic() + timeout
        rows: dict[str, Row] = {}
        while True:
            with contextlib.suppress(psycopg.OperationalError):
                rows = self.rows()
                if done(rows):
                    return rows
            if time.monotonic() > deadline:
                counts = collections.Counter(r.status for r in rows.values())
                raise AssertionError(f"{what}: not within {timeout}s (store: {dict(counts)})")
            time.sleep(0.05)  # other processes write it: poll, under a deadline

    def anchor(self, name: str) -> float | None:
        got = self._query(
            f'SELECT at FROM "{self.schema}".anchors WHERE name LIKE %s', (f"%-{name}",)
        )
        return float(got[0][0]) if got else None

    def slots(self, name: str) -> list[tuple[int, int]]:
        """``(slot, epoch)`` of every slot of ``name`` the store let run."""
        return [
            (int(s), int(e))
            for s, e in self._query(
                f'SELECT slot, epoch FROM "{self.schema}".slots WHERE name LIKE %s', (f"%-{name}",)
            )
        ]

    def epoch(self, name: str) -> int | None:
        got = self._query(
            f'SELECT epoch FROM "{self.schema}".leases WHERE name LIKE %s', (f"%-{name}",)
        )
        return int(got[0][0]) if got else None

    def idle_in_transaction(self, ports: set[int]) -> int:
        """Sessions from these client ports left inside a transaction."""
        got = self._query(
            "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%%' "
            "AND client_port = ANY(%s)",
            (sorted(ports),),
        )
        return int(got[0][0])


class Rows(Protocol):
    """A store as the checks read it (PostgreSQL's :class:`Store`, Redis's)."""

    def rows(self) -> dict[str, Row]: ...

    def wait(
        self, done: Callable[[dict[str, Row]], bool], what: str, timeout: float = WAIT
    ) -> dict[str, Row]: ...


class Shared(Rows, Protocol):
    """What the three-host checks need of a store beyond its rows: the periodic
    job's anchor, granted slots and leadership epoch; the backend URL; a restart
    of its server; a SIGSTOP of a host that leaves nothing locked."""

    #: A worker's line on listening again after the server came back.
    relisten: re.Pattern[str]
    #: How :meth:`restart` restarts, for the report.
    restarted: str

    def anchor(self, name: str) -> float | None: ...

    def slots(self, name: str) -> list[tuple[int, int]]: ...

    def epoch(self, name: str) -> int | None: ...

    def backend(self, host: str | None = None) -> str: ...

    def restart(self) -> None: ...

    def stop_outside_transaction(self, server: Server) -> int: ...


def held_by(rows: dict[str, Row], pids: set[int]) -> dict[str, Row]:
    """The rows running under a claim of one of ``pids``."""
    return {u: r for u, r in rows.items() if r.status == "running" and r.owner_pid in pids}


def tcp_ports(pid: int) -> set[int]:
    """The local TCP ports of ``pid``'s sockets (its connections to the store among them)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


# -- the audit file ------------------------------------------------------------------------


@dataclass
class Audit:
    """What the runs appended: runs by id (start order), cancellations, ticks."""

    runs: dict[str, list[Run]]
    #: (id, attempt, pid, start) -> when the run saw its CancelledError.
    cancelled: dict[tuple[str, int, int, float], float]
    #: (due, pid, start) of every run of the periodic job.
    ticks: list[tuple[float, int, float]]

    def cancelled_by(self, pids: set[int]) -> dict[str, float]:
        return {k[0]: t for k, t in self.cancelled.items() if k[2] in pids}


def read_audit(path: Path) -> Audit:
    ends: dict[tuple[str, int, int, float], float] = {}
    cancelled: dict[tuple[str, int, int, float], float] = {}
    starts: list[tuple[str, int, int, float]] = []
    ticks: list[tuple[float, int, float]] = []
    if path.exists():
        for line in path.read_text().splitlines():
            d = json.loads(line)
            if "tick" in d:
                ticks.append((d["tick"], d["pid"], d["start"]))
                continue
            key = (d["id"], d["attempt"], d["pid"], d["start"])
            if "end" in d:
                ends[key] = d["end"]
            elif "cancelled" in d:
                cancelled[key] = d["cancelled"]
            else:
                starts.append(key)
    runs: dict[str, list[Run]] = collections.defaultdict(list)
    for key in sorted(starts, key=lambda k: k[3]):
        runs[key[0]].append(Run(*key, ends.get(key)))
    return Audit(runs, cancelled, sorted(ticks, key=lambda t: t[2]))


def wait_audit(
    path: Path, done: Callable[[Audit], bool], what: str, timeout: float = WAIT
) -> Audit:
    deadline = time.monotonic() + timeout
    while True:
        audit = read_audit(path)
        if done(audit):
            return audit
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.02)  # other processes append to it: poll, under a deadline


def slot_numbers(ticks: list[tuple[float, int, float]], anchor: float, period: float) -> list[int]:
    """The slot of each tick on the schedule's grid (k periods after the anchor)."""
    return [round((due - anchor) / period) for due, _, _ in ticks]


def check_ticks(store: Shared, audit: Audit, period: float) -> tuple[int, int]:
    """No slot ran twice, and every run had its slot granted by the store;
    returns (runs, leadership epochs)."""
    anchor = store.anchor(TICK)
    assert anchor is not None
    ks = slot_numbers(audit.ticks, anchor, period)
    twice = [k for k, n in collections.Counter(ks).items() if n > 1]
    assert not twice, [t for t, k in zip(audit.ticks, ks, strict=True) if k in twice]
    granted = {round((slot / 1000 - anchor) / period) for slot, _ in store.slots(TICK)}
    assert set(ks) <= granted, sorted(set(ks) - granted)
    # Each run was on the grid (a run's due time is its slot's time).
    for (due, _, _), k in zip(audit.ticks, ks, strict=True):
        assert abs(due - (anchor + k * period)) < period / 4, (due, anchor, k)
    return len(ks), store.epoch(TICK) or 0


def ticks_by(audit: Audit, pids: set[int], after: float = 0.0) -> list[tuple[float, int, float]]:
    return [t for t in audit.ticks if t[1] in pids and t[2] > after]


# -- hosts, a load balancer, a steady load -----------------------------------------------------


class Hosts:
    """Every Hypercorn server a test starts, each in its own folder: killed at teardown,
    their output kept with the test's files; the one it stopped is continued first."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.audit = tmp_path / "audit.log"
        self.all: dict[str, Server] = {}
        self.stopped: Server | None = None

    def spawn(
        self,
        label: str,
        backend: str,
        *,
        workers: int = 1,
        lease: float,
        config: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        prefix: Sequence[str] = (),
    ) -> Server:
        """Start a host (not waited for: :meth:`ready`)."""
        folder = self.tmp_path / label
        folder.mkdir()
        server = Server(
            folder,
            APP,
            workers=workers,
            graceful_timeout=1,
            config={
                "ASYNCBG_BACKEND": backend,
                "ASYNCBG_LEASE": lease,
                "ASYNCBG_POLL_INTERVAL": 0.2,
                "ASYNCBG_SHUTDOWN_TIMEOUT": 0.2,
                "ASYNCBG_WORKER_CONCURRENCY": 8,
                "ASYNCBG_POOL_SIZE": 3,
                **(config or {}),
            },
            env={
                "AUDIT_FILE": str(self.audit),
                "AUDIT_CANCELLED": "1",
                "ITEM_CONCURRENCY": "2",
                **(env or {}),
            },
            host=host,
            prefix=prefix,
        )
        self.all[label] = server
        return server

    @staticmethod
    def ready(*servers: Server) -> None:
        for server in servers:
            server.wait_ready()

    def label(self, server: Server) -> str:
        return next(k for k, v in self.all.items() if v is server)

    def by_pid(self, pid: int) -> Server:
        return next(s for s in self.all.values() if pid in s.worker_pids())

    def kill_all(self) -> None:
        if self.stopped is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.stopped.pid, signal.SIGCONT)
        for label, server in self.all.items():
            server.kill()
            (self.tmp_path / f"{label}.log").write_text(server.output.text())


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    made = Hosts(tmp_path)
    try:
        yield made
    finally:
        made.kill_all()


class Balancer:
    """A load balancer in front of the hosts: each request to the next host in
    rotation. A host is taken out of rotation before it is stopped, and
    :meth:`drain` waits for the requests it is still serving."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._rotation: list[Server] = []
        self._busy: collections.Counter[int] = collections.Counter()
        self._turn = 0

    def add(self, server: Server) -> None:
        with self._cond:
            self._rotation.append(server)

    def remove(self, server: Server) -> None:
        with self._cond:
            self._rotation.remove(server)

    def drain(self, server: Server, timeout: float = WAIT) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self._busy[server.pid] == 0, timeout), (
                f"{self._busy[server.pid]} request(s) still on {server.pid}"
            )

    def post(self, path: str, body: Any, timeout: float = WAIT) -> Any:
        with self._cond:
            if not self._rotation:
                raise ConnectionRefusedError("no host in rotation")
            self._turn += 1
            server = self._rotation[self._turn % len(self._rotation)]
            self._busy[server.pid] += 1
        try:
            return server.post(path, body, timeout=timeout)
        finally:
            with self._cond:
                self._busy[server.pid] -= 1
                self._cond.notify_all()


class Load:
    """A steady stream of new ids, a few of each kind every ``pace`` seconds
    (the pace is the load's shape, not a wait for anything), until :meth:`stop`."""

    def __init__(
        self,
        clients: Clients,
        mix: dict[str, int],
        seconds: dict[str, float],
        pace: float = 0.25,
    ) -> None:
        self.clients = clients
        self.mix = mix
        self.seconds = seconds
        self.pace = pace
        self._kinds: dict[str, str] = {}
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="load")
        self._thread.start()

    def kinds(self) -> dict[str, str]:
        with self._lock:
            return dict(self._kinds)

    def wait_fed(self, n: int, timeout: float = WAIT) -> None:
        """Wait until ``n`` ids were fed in all."""
        with self._lock:
            assert self._lock.wait_for(lambda: len(self._kinds) >= n, timeout), len(self._kinds)

    def stop(self) -> dict[str, str]:
        self._stop.set()
        self._thread.join(WAIT)
        return self.kinds()

    def _run(self) -> None:
        while not self._stop.wait(self.pace):
            work: list[Batch] = []
            for kind, n in self.mix.items():
                ids = new_ids(n)
                with self._lock:
                    self._kinds.update(dict.fromkeys(ids, kind))
                    self._lock.notify_all()
                work += batches(kind, ids, self.seconds.get(kind, 0.0))
            self.clients.feed(work)


def submit(clients: Clients, kind: str, ids: list[str], seconds: float) -> None:
    clients.feed(batches(kind, ids, seconds))
    clients.wait_acknowledged(ids)


def submit_until_held(
    server: Server,
    store: Rows,
    lengths: Sequence[float],
    kinds: dict[str, str],
    *,
    each: int = 4,
    rounds: int = 8,
    within: float = 1.0,
) -> dict[float, set[str]]:
    """Submit ``each`` sleep jobs of every length in ``lengths`` to ``server``
    until it runs at least one of each length (every host claims what is
    submitted: the one that asks first gets it); return the ids per length."""
    pids = server.worker_pids()
    ids: dict[float, set[str]] = {length: set() for length in lengths}
    for _ in range(rounds):
        for length in lengths:
            batch = new_ids(each)
            reply = server.post("/submit", {"kind": "sleep", "seconds": length, "ids": batch})
            assert reply.status == 200, reply
            assert reply.body["acknowledged"] == batch, reply
            ids[length].update(batch)
            kinds.update(dict.fromkeys(batch, "sleep"))
        try:
            store.wait(
                lambda rows: all(held_by(rows, pids).keys() & group for group in ids.values()),
                "held",
                within,
            )
        except AssertionError:
            continue  # the others claimed them all this time
        return ids
    raise AssertionError(f"{server.pid} ran none of {rounds} rounds of jobs submitted to it")


def stop_outside_transaction(store: Store, server: Server, tries: int = 50) -> int:
    """SIGSTOP every process of ``server`` at a moment none of its store sessions
    is inside a transaction (one stopped there would hold its row locks, and the
    rows would be skipped by every other claimer until it resumes); return how
    many stops that took."""
    pids = server.worker_pids()
    for n in range(1, tries + 1):
        os.killpg(server.pid, signal.SIGSTOP)
        for pid in pids:
            wait_stopped(pid)
        ports = set().union(*(tcp_ports(pid) for pid in pids))
        if store.idle_in_transaction(ports) == 0:
            return n
        os.killpg(server.pid, signal.SIGCONT)
        for pid in pids:
            wait_stopped(pid, stopped=False)
    raise AssertionError(f"no SIGSTOP of {server.pid} in {tries} landed outside a transaction")


def noticed(server: Server, pattern: re.Pattern[str], since: int = 0) -> list[str]:
    """Ids in lines matching ``pattern`` that ``server`` logged after line ``since``."""
    lines = server.output.lines[since:]
    return [m["id"] for line in lines if (m := pattern.search(line))]


def wait_output(server: Server, done: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s\n{server.output.text()}"
        time.sleep(0.02)  # another process prints it: poll, under a deadline


def terminate(*servers: Server) -> None:
    for server in servers:
        server.send(signal.SIGTERM)
    for server in servers:
        assert server.wait_exit(timeout=WAIT) == 0, server.output.text()


@pytest.fixture
def own_postgres() -> Iterator[Callable[..., PostgresServer]]:
    """Factory for PostgreSQL servers of the test's own (restarted, partitioned)."""
    made: list[PostgresServer] = []

    def make(**kwargs: Any) -> PostgresServer:
        server = PostgresServer(**kwargs)
        made.append(server)
        return server

    try:
        yield make
    finally:
        for server in made:
            server.cleanup()


def first_run_after(runs: list[Run], pids: set[int], attempt: int) -> Run | None:
    """The first run of a later attempt by a process not in ``pids``."""
    return next((r for r in runs if r.pid not in pids and r.attempt > attempt), None)


def taken_after_lease(
    held: dict[str, Row], audit: Audit, pids: set[int], lease: float, since: float
) -> list[float]:
    """Each job ``pids`` held ran again in another process as a new attempt,
    once its lease ran out and soon after; return how long after ``since``."""
    took = []
    for uid, before in held.items():
        rerun = first_run_after(audit.runs[uid], pids, before.attempts)
        assert rerun is not None, audit.runs[uid]
        assert before.lease_until is not None
        assert rerun.start >= before.lease_until - 0.01, (before, rerun)
        assert rerun.start <= before.lease_until + lease / 3 + 1.5, (before, rerun)
        took.append(rerun.start - since)
    return took


Rolled = tuple[str, set[int], dict[str, Row], float, float, int]
#: How long the jobs running at a host's SIGTERM take (longer than its grace).
LONG = 4.0


def roll(
    label: str, old: Server, new: Server, balancer: Balancer, store: Rows, kinds: dict[str, str]
) -> tuple[Rolled, Server]:
    """Replace ``old`` by ``new`` (started first) with SIGTERM, while ``old``
    runs jobs longer than its grace period (submitted to it: it is woken first);
    return what it held, when, what its report says it released, and ``new``."""
    opids = old.worker_pids()
    new.wait_ready()
    balancer.add(new)
    submit_until_held(old, store, [LONG], kinds)
    balancer.remove(old)
    balancer.drain(old)
    at_term = held_by(store.rows(), opids)
    old.send(signal.SIGTERM)
    t_term = time.time()
    assert old.wait_exit(timeout=WAIT) == 0, old.output.text()
    t_exit = time.time()
    got = reports(old)
    assert len(got) == len(opids), old.output.text()
    released = int(sum(r["released"] for r in got))
    assert released > 0, old.output.text()
    return (label, opids, at_term, t_term, t_exit, released), new


def check_released(
    rolled: list[Rolled],
    audit: Audit,
) -> list[tuple[float, float]]:
    """A rolling restart: each host's report counted what it released, and each
    run it cut off ran again in another process at once, as the same attempt (a
    lease that ran out would have counted one) and before that lease could have
    run out; return, for each, how long after its host's SIGTERM it started
    again and how long before the lease would have run out."""
    restarts = []
    for label, opids, at_term, t_term, _t_exit, _released in rolled:
        for uid in at_term:
            cut = [r for r in audit.runs[uid] if r.pid in opids and r.end is None]
            if not cut:
                continue  # finished within the grace period
            again = [r for r in audit.runs[uid] if r.pid not in opids and r.start > cut[-1].start]
            assert again, (label, uid, audit.runs[uid])
            assert again[0].attempt == cut[-1].attempt, (label, uid, audit.runs[uid])
            # Before the lease it held at SIGTERM ran out (it can only have been
            # renewed since): the store had it back from its owner, not from a lease.
            until = at_term[uid].lease_until
            assert until is not None
            assert again[0].start < until, (label, uid, again[0].start - until)
            restarts.append((again[0].start - t_term, until - again[0].start))
    assert sum(r[5] for r in rolled) > 0, rolled
    assert restarts, rolled
    return restarts


def check_stale(
    kinds: dict[str, str],
    rows: dict[str, Row],
    audit: Audit,
    pids: set[int],
    lost: set[str],
) -> None:
    """Nothing the stale side (``pids``) wrote about the jobs it lost landed:
    each ended under another process's run (the store's result names that
    run), while the audit shows the stale run."""
    for uid in lost:
        row = rows[uid]
        assert row.owner_pid not in pids, row
        if kinds[uid] != "item":
            assert row.result["pid"] not in pids, row
        stale = [r for r in audit.runs[uid] if r.pid in pids]
        assert stale, audit.runs[uid]
        assert all(r.attempt < row.attempts for r in stale), (row, audit.runs[uid])
        # The stale run itself either got to its end (its outcome then refused)
        # or was cancelled on a renewal that found the claim lost.
        ended = stale[-1].end is not None
        cancelled = (uid, stale[-1].attempt, stale[-1].pid, stale[-1].start) in audit.cancelled
        assert ended or cancelled or kinds[uid] == "trivial", (uid, audit.runs[uid])


# -- a. three hosts under load: kill -9, SIGSTOP, a rolling restart, the database restarted -----


def check_three_hosts_under_load(hosts: Hosts, store: Shared) -> None:
    """Under steady load: kill -9 of the periodic leader, SIGSTOP of the next
    past its lease, a restart of the store's server, a rolling restart; then
    nothing acknowledged is lost and nothing stale landed (the module's ``a``)."""
    lease, every = 2.0, 0.5
    seconds = {"sleep": 1.0, "item": 0.3}
    backend = store.backend()
    started = time.monotonic()

    def host(label: str, workers: int = 1) -> Server:
        return hosts.spawn(
            label, backend, workers=workers, lease=lease, env={"CLUSTER_EVERY": str(every)}
        )

    current = [host("h1"), host("h2", workers=2), host("h3")]
    extra: dict[str, str] = {}  # ids submitted to one host directly
    hosts.ready(*current)
    balancer = Balancer()
    for server in current:
        balancer.add(server)
    clients = Clients(balancer)  # type: ignore[arg-type]  (it only posts)
    load = Load(clients, {"sleep": 2, "trivial": 2, "item": 2}, seconds)
    try:
        # -- kill -9 of the host leading the periodic job, holding running jobs
        audit = wait_audit(hosts.audit, lambda a: len(a.ticks) >= 2, "the periodic job ticking")
        killed = hosts.by_pid(audit.ticks[-1][1])
        kpids = killed.worker_pids()
        store.wait(lambda rows: len(held_by(rows, kpids)) >= 2, "the leader holding jobs")
        balancer.remove(killed)
        os.killpg(killed.pid, signal.SIGKILL)
        t_kill = time.time()
        killed.proc.wait(WAIT)
        at_kill = store.rows()  # the dead write nothing more: what they hold now is exact
        killed_held = held_by(at_kill, kpids)
        current.remove(killed)
        # A process manager starts it again (a new node: it inherits nothing).
        replacement = host(f"{hosts.label(killed)}-again")
        hosts.ready(replacement)
        balancer.add(replacement)
        clients.switch(balancer)  # type: ignore[arg-type]
        current.append(replacement)
        store.wait(
            lambda rows: not held_by({u: rows[u] for u in killed_held}, kpids),
            "the killed host's jobs taken over",
            lease * 4,
        )
        others = set().union(*(s.worker_pids() for s in current))  # the replacement too
        audit = wait_audit(
            hosts.audit,
            lambda a: bool(ticks_by(a, others, after=t_kill)),
            "another host leading the periodic job",
        )
        led_after_kill = ticks_by(audit, others, after=t_kill)[0][2] - t_kill

        # -- SIGSTOP of the host leading now, past its lease, then SIGCONT
        stalled = hosts.by_pid(ticks_by(audit, others, after=t_kill)[-1][1])
        spids = stalled.worker_pids()
        store.wait(lambda rows: len(held_by(rows, spids)) >= 2, "the new leader holding jobs")
        balancer.remove(stalled)
        balancer.drain(stalled)
        hosts.stopped = stalled
        stops = store.stop_outside_transaction(stalled)
        t_stop = time.time()
        stalled_held = held_by(store.rows(), spids)
        rest = set().union(*(s.worker_pids() for s in current if s is not stalled))
        rows = store.wait(
            lambda rows: not held_by({u: rows[u] for u in stalled_held}, spids),
            "the stopped host's jobs taken over",
            lease * 4,
        )
        audit = wait_audit(
            hosts.audit,
            lambda a: bool(ticks_by(a, rest, after=t_stop)),
            "the periodic job led by another host while it is stopped",
        )
        led_after_stop = ticks_by(audit, rest, after=t_stop)[0][2] - t_stop
        # Legitimately its own: a finish that reached the server just before the stop.
        ended_before = {u for u in stalled_held if rows[u].final and rows[u].owner_pid in spids}
        lost_by_stalled = set(stalled_held) - ended_before
        mark = len(stalled.output.lines)
        os.killpg(stalled.pid, signal.SIGCONT)
        t_cont = time.time()
        hosts.stopped = None
        stopped_for = t_cont - t_stop
        wait_output(
            stalled,
            lambda: lost_by_stalled <= set(noticed(stalled, STALE, mark)),
            "the resumed host noticing every claim it lost",
        )
        balancer.add(stalled)
        stale_lines = len(stalled.output.lines)

        # -- the store's server stopped and back (PostgreSQL: immediately, no
        # checkpoint, every connection cut; Redis: SIGTERM, started again on its
        # AOF). Before the rolling restart: the hosts stopped by it then stop
        # after a server restart, as test_a_host_stopped_after_... checks alone.
        marks = {s.pid: len(s.output.lines) for s in current}
        acked_before = len(clients.acknowledged)
        t_restart = time.time()
        store.restart()
        t_back = time.time()
        for server in current:
            wait_output(
                server,
                lambda s=server: relistened(s, marks[s.pid], store.relisten),
                "every worker listening again after the restart",
            )
        clients.wait_until(
            lambda acked: len(acked) >= acked_before + 30, "submits acknowledged again"
        )
        flowing = time.time() - t_back

        # -- a rolling SIGTERM restart of every host, each replaced first
        rolled = [
            roll(
                hosts.label(old),
                old,
                host(f"r{n}", workers=len(old.worker_pids())),
                balancer,
                store,
                extra,
            )
            for n, old in enumerate(list(current), 1)
        ]
        current = [new for _, new in rolled]

        load.wait_fed(300)  # a few hundred, however fast the failures went
        kinds = load.stop()
        clients.wait_acknowledged(kinds)
        kinds.update(extra)
        rows = store.wait(
            lambda rows: all(u in rows and rows[u].final for u in kinds),
            "every acknowledged id final",
            WAIT * 2,
        )
        all_final = time.monotonic() - started
    finally:
        load.stop()
        clients.close()
    audit = read_audit(hosts.audit)
    assert len(kinds) >= 300, len(kinds)
    assert not clients.given_up

    # Every acknowledged id reached its end, succeeded, by a run that ran (the
    # store's result names it, the audit has its end).
    check_outcomes(rows, audit.runs, kinds)

    took_killed = taken_after_lease(killed_held, audit, kpids, lease, t_kill)
    # The stopped host's late writes were all rejected: the store has another run's outcome.
    check_stale(kinds, rows, audit, spids, lost_by_stalled)
    late = noticed(stalled, STALE, mark)[: stale_lines - mark]
    assert set(late) <= set(stalled_held), (late, stalled_held)
    rejected = noticed(stalled, REJECTED, mark)
    lost = noticed(stalled, LOST, mark)
    cancelled = audit.cancelled_by(spids).keys() & lost_by_stalled
    took_stalled = taken_after_lease(
        {u: stalled_held[u] for u in lost_by_stalled}, audit, spids, lease, t_stop
    )
    # And it ran none of the ticks it had armed while stopped.
    assert not [t for t in audit.ticks if t[1] in spids and t_stop <= t[0] <= t_cont], audit.ticks
    restarts = check_released([r for r, _ in rolled], audit)
    assert restarts
    # The periodic job: no slot ran twice, each run's slot was granted by the store.
    runs_of_tick, epochs = check_ticks(store, audit, every)
    assert epochs >= 3, epochs  # taken over after the kill, the stop, the rolling restart

    terminate(*current)
    counts = collections.Counter(kinds.values())
    print(
        f"\n[a] {len(kinds)} ids ({dict(counts)}) acknowledged in {clients.requests} requests "
        f"({clients.retries} retried); all final {all_final:.1f}s after the start\n"
        f"[a] kill -9 of the leader ({len(killed_held)} running): taken over "
        f"{span(took_killed)} after the kill (lease {lease:g}s); periodic led elsewhere "
        f"{led_after_kill:.2f}s after it\n"
        f"[a] SIGSTOP ({stops} stop(s) to land outside a transaction) for {stopped_for:.2f}s "
        f"holding {len(stalled_held)}: taken over {span(took_stalled)} after it, periodic led "
        f"elsewhere {led_after_stop:.2f}s after it; on SIGCONT {len(rejected)} late write(s) "
        f"rejected, {len(lost)} lost claim(s) found on renewal, {len(cancelled)} run(s) "
        f"cancelled; no stale outcome landed\n"
        f"[a] {store.restarted} in {t_back - t_restart:.2f}s; every worker listening "
        f"again and submits acknowledged {flowing:.2f}s after it was up\n"
        f"[a] rolling restart: released {[(r[0], r[5]) for r, _ in rolled]}; the cut-off runs "
        f"started again elsewhere {span([a for a, _ in restarts])} after their host's SIGTERM "
        f"(its exit: {span([r[4] - r[3] for r, _ in rolled])}), same attempt, "
        f"{span([m for _, m in restarts])} before the lease they held then would have run "
        f"out\n"
        f"[a] periodic: {runs_of_tick} runs, {epochs} leadership epochs, no slot twice"
    )


@pytest.mark.timeout(150)
def test_three_hosts_under_load_lose_nothing_and_land_nothing_stale(
    hosts: Hosts, own_postgres: Callable[..., PostgresServer]
) -> None:
    check_three_hosts_under_load(
        hosts, Store.of(own_postgres().start(), f"t_{secrets.token_hex(6)}")
    )


def relistened(server: Server, since: int, pattern: re.Pattern[str] = RELISTEN) -> bool:
    """Every worker of ``server`` logged, after line ``since``, that it listens again."""
    lines = server.output.lines[since:]
    return {int(m["pid"]) for line in lines if (m := pattern.search(line))} >= server.worker_pids()


# -- b. a host cut off by a network namespace past its lease ----------------------------------


@dataclass(frozen=True)
class Netns:
    """A network namespace joined to this one by a veth pair, a /30 of 10.231.0.0/16."""

    name: str
    host_if: str
    ns_if: str
    subnet: str
    host_addr: str
    ns_addr: str

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def cut(self) -> None:
        """Blackhole each side's route to the other: packets in flight and every
        retransmission are dropped (TCP sees a silent partition), new connections
        fail at once; the links and addresses stay up."""
        ip("route", "add", "blackhole", f"{self.ns_addr}/32")
        ip("netns", "exec", self.name, "ip", "route", "add", "blackhole", f"{self.host_addr}/32")

    def heal(self, check: bool = True) -> None:
        ip("route", "del", "blackhole", f"{self.ns_addr}/32", check=check)
        ip(
            *("netns", "exec", self.name, "ip", "route", "del", "blackhole"),
            f"{self.host_addr}/32",
            check=check,
        )


def ip(*args: str, check: bool = True) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)
    if check and done.returncode:
        raise AssertionError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@contextlib.contextmanager
def network_namespace() -> Iterator[Netns]:
    """A namespace of the test's own, removed (with its veth pair and routes) on leaving."""
    if os.geteuid() != 0:
        pytest.fail(
            "this test cuts a host off with a network namespace (ip netns, a veth pair): "
            "it needs root, as in CI; run the suite as root"
        )
    if shutil.which("ip") is None:
        pytest.fail("this test needs iproute2's 'ip' (apt-get install iproute2), as CI has")
    tag = secrets.token_hex(3)
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    free = [n for n in range(256) if f"10.231.{n}." not in used]
    third = free[secrets.randbelow(len(free))]
    made = Netns(
        name=f"asyncbg-{tag}",
        host_if=f"abgh{tag}",
        ns_if=f"abgn{tag}",
        subnet=f"10.231.{third}.0/30",
        host_addr=f"10.231.{third}.1",
        ns_addr=f"10.231.{third}.2",
    )
    try:
        ip("netns", "add", made.name)
        ip("link", "add", made.host_if, "type", "veth", "peer", "name", made.ns_if)
        ip("link", "set", made.ns_if, "netns", made.name)
        ip("addr", "add", f"{made.host_addr}/30", "dev", made.host_if)
        ip("link", "set", made.host_if, "up")
        inside = ("netns", "exec", made.name, "ip")
        ip(*inside, "addr", "add", f"{made.ns_addr}/30", "dev", made.ns_if)
        ip(*inside, "link", "set", made.ns_if, "up")
        ip(*inside, "link", "set", "lo", "up")
        yield made
    finally:
        made.heal(check=False)
        ip("netns", "del", made.name, check=False)  # its end of the pair goes with it
        ip("link", "del", made.host_if, check=False)


@pytest.fixture
def netns() -> Iterator[Netns]:
    with network_namespace() as made:
        yield made


def check_cut_off_host(hosts: Hosts, store: Shared, netns: Netns) -> None:
    """Host C, in ``netns``, leads and holds jobs; its routes are blackholed past
    the lease, then healed (the module's ``b``). The store's server must listen
    on ``netns.host_addr`` too."""
    lease, every, short, long = 2.0, 0.5, 1.5, 8.0
    env = {"CLUSTER_EVERY": str(every)}
    started = time.monotonic()
    # C first, inside the namespace, reaching the server over the veth: it leads.
    c = hosts.spawn(
        "c",
        store.backend(host=netns.host_addr),
        lease=lease,
        env=env,
        host=netns.ns_addr,
        prefix=netns.prefix,
    )
    c.wait_ready()
    cpids = c.worker_pids()
    wait_audit(hosts.audit, lambda a: bool(ticks_by(a, cpids)), "the cut-off host leading")
    a = hosts.spawn("a", store.backend(), lease=lease, env=env)
    b = hosts.spawn("b", store.backend(), lease=lease, env=env)
    hosts.ready(a, b)
    others = a.worker_pids() | b.worker_pids()
    balancer = Balancer()
    for server in (a, b, c):
        balancer.add(server)
    clients = Clients(balancer)  # type: ignore[arg-type]
    load = Load(clients, {"sleep": 1, "trivial": 2}, {"sleep": 0.3})
    direct: dict[str, str] = {}
    try:
        # Jobs that end while it is cut off (their outcome then comes late) and
        # jobs still running when it is back, submitted through C over the veth.
        submitted = submit_until_held(c, store, [short, long], direct)
        short_ids, long_ids = submitted[short], submitted[long]
        balancer.remove(c)
        balancer.drain(c)
        mark = len(c.output.lines)
        netns.cut()
        t_cut = time.time()
        at_cut = store.rows()
        c_held = held_by(at_cut, cpids)
        rows = store.wait(
            lambda rows: not held_by({u: rows[u] for u in c_held}, cpids),
            "the cut-off host's jobs taken over",
            lease * 4,
        )
        taken = time.time() - t_cut
        audit = wait_audit(
            hosts.audit,
            lambda au: bool(ticks_by(au, others, after=t_cut)),
            "the periodic job led by another host",
        )
        led = ticks_by(audit, others, after=t_cut)[0][2] - t_cut
        ended_before = {u for u in c_held if rows[u].final and rows[u].owner_pid in cpids}
        lost_by_c = set(c_held) - ended_before
        cut_for = time.time() - t_cut
        assert cut_for > lease, cut_for
        netns.heal()
        t_heal = time.time()
        wait_output(
            c,
            lambda: lost_by_c <= set(noticed(c, STALE, mark)),
            "the healed host noticing every claim it lost",
        )
        noticed_after = time.time() - t_heal
        # It leads nothing now (asked over the veth), and serves again.
        reply = c.request("GET", "/leader")
        assert reply.status == 200, reply
        assert reply.body["holds_lock"] is False, reply.body
        again = new_ids(5)
        reply = c.post("/submit", {"kind": "trivial", "ids": again})
        assert reply.status == 200, reply
        direct.update(dict.fromkeys(reply.body["acknowledged"], "trivial"))
        kinds = load.stop()
        clients.wait_acknowledged(kinds)
        kinds.update(direct)
        rows = store.wait(
            lambda rows: all(u in rows and rows[u].final for u in kinds),
            "every acknowledged id final",
            WAIT * 2,
        )
        audit = read_audit(hosts.audit)
        all_final = time.monotonic() - started
    finally:
        load.stop()
        clients.close()
    assert not clients.given_up
    check_outcomes(rows, audit.runs, kinds)
    check_stale(kinds, rows, audit, cpids, lost_by_c)
    assert set(noticed(c, STALE, mark)) <= set(c_held)
    took = taken_after_lease({u: c_held[u] for u in lost_by_c}, audit, cpids, lease, t_cut)
    rejected, lost = noticed(c, REJECTED, mark), noticed(c, LOST, mark)
    cancelled = audit.cancelled_by(cpids).keys() & lost_by_c
    # The short runs ended while it was cut off: their outcome was written late, and refused.
    assert short_ids & lost_by_c <= set(rejected) | set(lost), (rejected, lost)
    # The long runs were still going when it came back: cancelled there, unless
    # the renewal that found them lost came after they ended.
    for uid in long_ids & lost_by_c:
        ran = [r for r in audit.runs[uid] if r.pid in cpids]
        assert uid in cancelled or ran[-1].end is not None, (uid, audit.runs[uid])
    # Cut off, it ran no tick: the others led, no slot ran twice.
    assert not ticks_by(audit, cpids, after=t_cut), ticks_by(audit, cpids, after=t_cut)
    runs_of_tick, epochs = check_ticks(store, audit, every)
    assert epochs >= 2, epochs
    terminate(a, b, c)
    print(
        f"\n[b] C cut off (blackholed routes) for {cut_for:.2f}s (lease {lease:g}s) holding "
        f"{len(c_held)}: taken over {span(took)} after the cut (all {taken:.2f}s), periodic "
        f"led elsewhere {led:.2f}s after it\n"
        f"[b] healed: C noticed its {len(lost_by_c)} lost claim(s) within {noticed_after:.2f}s: "
        f"{len(rejected)} late write(s) rejected, {len(lost)} lost claim(s) found on renewal, "
        f"{len(cancelled)} run(s) cancelled; no stale outcome landed, it leads nothing\n"
        f"[b] {len(kinds)} ids, all final {all_final:.1f}s after the start; periodic: "
        f"{runs_of_tick} runs, {epochs} epochs, no slot twice"
    )


@pytest.mark.timeout(120)
def test_a_host_cut_off_past_its_lease_is_taken_over_and_steps_down_on_heal(
    hosts: Hosts, own_postgres: Callable[..., PostgresServer], netns: Netns
) -> None:
    pg = own_postgres(listen=("127.0.0.1", netns.host_addr))
    with open(pg.data / "pg_hba.conf", "a") as hba:  # the namespace's address may connect too
        hba.write(f"host all all {netns.subnet} trust\n")
    check_cut_off_host(hosts, Store.of(pg.start(), f"t_{secrets.token_hex(6)}"), netns)


# -- c. a cancel from another host -------------------------------------------------------------


def check_cancel_across_hosts(hosts: Hosts, backend: str, store: Rows) -> None:
    """Host C (running no task jobs) submits long jobs that host B runs, then
    asks to cancel each: with a 30 s lease (renewals every 10 s) only the
    backend's wake-up channel explains a cancel that reaches the run at once."""
    lease = 30.0
    b = hosts.spawn("b", backend, lease=lease)
    c = hosts.spawn("c", backend, lease=lease, config={"ASYNCBG_WORKER_CONCURRENCY": 0})
    hosts.ready(b, c)
    bpids = b.worker_pids()
    ids = new_ids(6)
    reply = c.post("/submit", {"kind": "sleep", "seconds": 120.0, "ids": ids})
    assert reply.status == 200, reply
    assert reply.body["acknowledged"] == ids, reply
    store.wait(lambda rows: len(held_by(rows, bpids).keys() & set(ids)) == len(ids), "B runs them")
    delays = []
    for uid in ids:
        reply = c.post(f"/cancel/{uid}")
        assert reply.status == 200, reply
        assert reply.body["requested"] is True, reply
        audit = wait_audit(
            hosts.audit, lambda a, u=uid: u in a.cancelled_by(bpids), "the run cancelled on B"
        )
        delays.append(audit.cancelled_by(bpids)[uid] - reply.body["asked"])
    rows = store.wait(
        lambda rows: all(rows[u].status == "cancelled" for u in ids), "every job cancelled"
    )
    assert all(rows[u].owner_pid in bpids for u in ids)
    # Well below the renew interval (lease / 3 = 10 s), whatever the machine's load.
    assert max(delays) < lease / 3 / 10, delays
    terminate(b, c)
    ms = sorted(round(d * 1000, 1) for d in delays)
    print(
        f"\n[c] cancel asked on C, run cancelled on B after {ms} ms (median "
        f"{ms[len(ms) // 2]} ms; renew interval {lease / 3:g} s)"
    )


@pytest.mark.timeout(60)
def test_a_cancel_from_another_host_reaches_the_run_long_before_a_renewal(
    hosts: Hosts, postgres_server: PostgresServer, pg_schema: str
) -> None:
    check_cancel_across_hosts(
        hosts, (store := Store.of(postgres_server, pg_schema)).backend(), store
    )


# -- a host stopped after a database restart ---------------------------------------------------


@pytest.mark.timeout(60)
def test_a_host_stopped_after_a_database_restart_reports_its_release(
    tmp_path: Path, hosts: Hosts, own_postgres: Callable[..., PostgresServer]
) -> None:
    """After PostgreSQL restarted (the pool reconnected, its scheduler woke and
    waited again: on Python 3.11 ``asyncio.wait_for`` makes a new task each
    time), a host's SIGTERM releases its running jobs to the store and its
    shutdown ends, with the release in its report (it once hung there: the
    stop cancelled the pool's later tasks before the backend's close)."""
    pg = own_postgres().start()
    store = Store.of(pg, f"t_{secrets.token_hex(6)}")
    server = hosts.spawn("h", store.backend(), lease=2.0)
    server.wait_ready()
    pids = server.worker_pids()
    mark = len(server.output.lines)
    pg.restart("immediate")
    wait_output(server, lambda: relistened(server, mark), "listening again after the restart")
    ids = new_ids(4)
    reply = server.post("/submit", {"kind": "sleep", "seconds": 30.0, "ids": ids})
    assert reply.status == 200, reply
    store.wait(lambda rows: len(held_by(rows, pids).keys() & set(ids)) == len(ids), "running")
    server.send(signal.SIGTERM)
    assert server.wait_exit(timeout=WAIT) == 0, server.output.text()
    rows = store.rows()
    assert all(rows[u].status == "pending" for u in ids), [rows[u] for u in ids]  # released
    got = reports(server)
    assert [int(r["released"]) for r in got] == [len(ids)], server.output.text()
    assert "did not stop within" not in server.output.text()

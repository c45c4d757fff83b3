"""Host- and cluster-scoped periodic jobs led through a durable backend's lease.

A "process" in the in-process tests is its own loop thread, its own backend
object (on one SQLite file, or one shared MemoryBackend with a clock the test
moves) and its own owner id, which is all the store can tell processes apart
by. The last test runs real processes.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers_core import WAIT, wait_for

import asyncbg
from asyncbg import LoopThread
from asyncbg.backends.base import Backend
from asyncbg.backends.memory import MemoryBackend
from asyncbg.backends.sqlite import SQLiteBackend
from asyncbg.engine.leadership import LEASE_TTL_MIN, StoreLeader, lease_ttl
from asyncbg.engine.periodic import PeriodicJob
from asyncbg.engine.records import Lease

NAME = "asyncbg-test-chore"


class Clock:
    """A wall clock the test moves (for the MemoryBackend's lease times)."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Runs:
    """Who ran when, shared by the jobs of every "process"; waits on a condition."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.log: list[tuple[str, float]] = []

    def job(self, who: str) -> Callable[[], Any]:
        async def chore() -> None:
            with self.cond:
                self.log.append((who, time.time()))
                self.cond.notify_all()

        return chore

    def by(self, who: str) -> int:
        with self.cond:
            return sum(1 for w, _ in self.log if w == who)

    def wait(self, what: str, pred: Callable[[], bool], timeout: float = WAIT) -> None:
        with self.cond:
            if not self.cond.wait_for(pred, timeout):
                pytest.fail(f"timed out after {timeout}s waiting for {what}: {self.log}")


class Faulty:
    """A lease store passing through to ``inner``, that can raise or refuse renewals."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.error: Exception | None = None
        self.refuse_renewals = False
        self.renewals = 0
        self.calls = threading.Condition()
        self.ensures = 0

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    async def acquire(self, name: str, owner: str, ttl: float) -> Lease | None:
        with self.calls:
            self.ensures += 1
            self.calls.notify_all()
        self._check()
        return await self.inner.acquire(name, owner, ttl)

    async def renew_lease(self, lease: Lease, ttl: float) -> Lease | None:
        with self.calls:
            self.ensures += 1
            self.renewals += 1
            self.calls.notify_all()
        self._check()
        if self.refuse_renewals:
            return None
        return await self.inner.renew_lease(lease, ttl)

    async def release_lease(self, lease: Lease) -> bool:
        self._check()
        return await self.inner.release_lease(lease)

    async def claim_slot(self, lease: Lease, slot: int) -> bool:
        self._check()
        return await self.inner.claim_slot(lease, slot)

    async def anchor(self, name: str, proposed: float) -> float:
        self._check()
        return await self.inner.anchor(name, proposed)

    def wait_ensures(self, n: int, timeout: float = WAIT) -> None:
        """Wait until the lease was asked for (taken or renewed) ``n`` more times."""
        with self.calls:
            target = self.ensures + n
            assert self.calls.wait_for(lambda: self.ensures >= target, timeout)


class Proc:
    """One "process": a loop thread, a backend object and an owner id."""

    def __init__(self, owner: str, store: Any, backend: Backend | None = None) -> None:
        self.owner = owner
        self.store = store
        self.backend = backend  # opened and closed here when given
        self.lt = LoopThread(name=f"lease-{owner}")
        self.lt.start()
        if backend is not None:
            self.lt.submit(backend.open()).result(WAIT)
            self.lt.submit(backend.migrate()).result(WAIT)
        self.pj: PeriodicJob | None = None
        self.leader: StoreLeader | None = None

    def start(self, pj: PeriodicJob, *, name: str = NAME) -> PeriodicJob:
        self.pj = pj
        self.leader = StoreLeader(self.store, name, self.owner)
        self.lt.call(functools.partial(pj.start, self.lt, leader=self.leader))
        return pj

    def stop(self) -> None:
        """What the lifecycle does at stop: no more ticks, the drain (a tick
        still asking the store, a run still going), then give the lease up."""
        pj = self.pj
        if pj is not None:
            self.lt.call(pj.stop)
            wait_for(
                lambda: self.lt.call(lambda: pj._lease_task is None and not pj.running),
                what="the drain",
            )
        if self.leader is not None:
            self.lt.submit(self.leader.release()).result(WAIT)

    def close(self) -> None:
        if self.lt.running:
            self.stop()
            if self.backend is not None:
                self.lt.submit(self.backend.close()).result(WAIT)
        self.lt.stop(timeout=2.0)


@pytest.fixture
def procs() -> Iterator[Callable[..., Proc]]:
    made: list[Proc] = []

    def make(owner: str, store: Any, backend: Backend | None = None) -> Proc:
        p = Proc(owner, store, backend)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


class SharedStore:
    """One store that several "processes" open, each with its own backend
    object: an SQLite file, a schema of the session's PostgreSQL, or a key
    prefix of the session's Redis."""

    def __init__(self, kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self.kind = kind
        self.path = tmp_path / "x.db"
        if kind == "postgresql":
            self.server = request.getfixturevalue("postgres_server")
            self.schema = request.getfixturevalue("pg_schema")
        if kind == "redis":
            self.server = request.getfixturevalue("redis_server")
            self.prefix = request.getfixturevalue("redis_prefix")

    def backend(self) -> Backend:
        if self.kind == "sqlite":
            return SQLiteBackend(str(self.path))
        if self.kind == "redis":
            from asyncbg.backends.redis import RedisBackend

            return RedisBackend(self.server.url(), prefix=self.prefix)
        from asyncbg.backends.postgresql import PostgresBackend

        return PostgresBackend(self.server.url(), schema=self.schema)

    def procs(self, make: Callable[..., Proc], *owners: str) -> list[Proc]:
        out = []
        for owner in owners:
            backend = self.backend()
            out.append(make(owner, backend, backend))
        return out

    def slots(self, name: str = NAME) -> list[int]:
        if self.kind == "sqlite":
            return slot_rows(self.path, name)
        if self.kind == "redis":
            import redis

            client = redis.Redis.from_url(self.server.url(), decode_responses=True)
            try:
                return [int(s) for s in client.zrange(f"{{{self.prefix}}}:sl:{name}", 0, -1)]
            finally:
                client.close()
        text = self.server.psql(f"SELECT slot FROM {self.schema}.slots WHERE name = '{name}'")
        return [int(line) for line in text.split()]


@pytest.fixture(params=["sqlite", "postgresql", "redis"])
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> SharedStore:
    return SharedStore(request.param, tmp_path, request)


def sqlite_procs(make: Callable[..., Proc], path: Path, *owners: str) -> list[Proc]:
    out = []
    for owner in owners:
        backend = SQLiteBackend(str(path))
        out.append(make(owner, backend, backend))
    return out


def slot_rows(path: Path, name: str = NAME) -> list[int]:
    with sqlite3.connect(path) as conn:
        return [r[0] for r in conn.execute("SELECT slot FROM slots WHERE name = ?", (name,))]


def lease_row(path: Path, name: str) -> tuple[Any, ...] | None:
    with sqlite3.connect(path) as conn:
        row = conn.execute(
            "SELECT owner, epoch, expires_at FROM leases WHERE name = ?", (name,)
        ).fetchone()
    return None if row is None else tuple(row)


# -- the lease itself -------------------------------------------------------------------


def test_the_ttl_is_the_interval_clamped() -> None:
    assert lease_ttl(0.05) == LEASE_TTL_MIN == 3.0
    assert lease_ttl(10.0) == 10.0
    assert lease_ttl(3600.0) == 30.0


async def test_a_stale_leader_cannot_claim_a_slot_and_each_slot_is_claimed_once() -> None:
    clock = Clock()
    store = MemoryBackend(clock=clock)
    a, b = StoreLeader(store, NAME, "a"), StoreLeader(store, NAME, "b")
    try:
        assert await a.ensure(3.0)
        assert not await b.ensure(3.0)  # a holds it
        assert await a.slot_ok(1)
        assert not await a.slot_ok(1)  # once per slot
        clock.now += 5.0  # a is paused past its lease; b takes over
        assert await b.ensure(3.0)
        assert a.held  # by a's own clock it may still hold: two leaders for a moment
        assert not await a.slot_ok(2)  # but the store fences the old epoch
        assert await b.slot_ok(2)
        assert not await b.slot_ok(1)  # a ran that one
        assert not await a.ensure(3.0)  # renewal refused, b holds it: a follower at once
        assert not a.held
    finally:
        await a.release()
        await b.release()


async def test_a_store_error_keeps_the_lease_until_its_local_deadline() -> None:
    store = Faulty(MemoryBackend())
    now = [0.0]
    leader = StoreLeader(store, NAME, "a", clock=lambda: now[0])
    try:
        assert await leader.ensure(3.0)
        store.error = ConnectionError("store down")
        with pytest.raises(ConnectionError):
            await leader.ensure(3.0)
        assert leader.held  # it may still be ours: the store did not say otherwise
        now[0] = 3.0  # granted for 3 s from the start of the call that took it
        assert not leader.held
        assert await leader.slot_ok(1) is False  # not asked: it may have run out
        store.error = None
        assert await leader.ensure(3.0)  # the store still had it: renewed
        assert leader.held
    finally:
        await leader.release()


async def test_a_slot_claim_answered_after_the_lease_ran_out_is_not_run() -> None:
    # The store took the claim, but its answer came back only after the local
    # deadline (a host cut off from its store mid-claim, healed later): another
    # process may lead by then, so the tick is not run late.
    now = [0.0]
    store = Faulty(MemoryBackend())
    leader = StoreLeader(store, NAME, "a", clock=lambda: now[0])
    inner_claim = store.claim_slot

    async def held_up(lease: Lease, slot: int) -> bool:
        taken = await inner_claim(lease, slot)
        now[0] = 3.0  # the reply arrives once the 3 s lease may have run out
        return taken

    try:
        assert await leader.ensure(3.0)
        store.claim_slot = held_up  # type: ignore[method-assign]
        assert await leader.slot_ok(1) is False
        store.claim_slot = inner_claim  # type: ignore[method-assign]
        now[0] = 3.5
        assert await leader.ensure(3.0)  # taken again (the store's clock never moved)
        assert await leader.slot_ok(2)
        assert not await leader.slot_ok(1)  # claimed above: it runs nowhere
    finally:
        await leader.release()


async def test_the_leader_renews_every_third_of_its_ttl_and_drops_a_lost_lease_at_once() -> None:
    store = Faulty(MemoryBackend())
    leader = StoreLeader(store, NAME, "a")
    errors: list[Exception] = []
    leader.on_error = errors.append
    try:
        t0 = time.monotonic()
        assert await leader.ensure(0.3)  # a short ttl: renewals every 0.1 s
        await asyncio.to_thread(store.wait_ensures, 3)
        assert store.renewals >= 3
        assert time.monotonic() - t0 >= 0.25  # not in a hot loop
        assert leader.held
        store.error = ConnectionError("store down")
        await asyncio.to_thread(store.wait_ensures, 1)
        t1 = time.monotonic()
        await asyncio.to_thread(store.wait_ensures, 1)
        assert time.monotonic() - t1 >= 0.05  # retried a third of the ttl later, no sooner
        assert errors
        assert all(isinstance(e, ConnectionError) for e in errors)
        store.error = None
        store.refuse_renewals = True  # taken by someone else
        await asyncio.to_thread(store.wait_ensures, 1)
        # The memory backend never suspends: the refusal was handled in the
        # keeper's same step, before this coroutine could resume.
        assert not leader.held
        assert leader.lease is None
    finally:
        await leader.release()


async def test_a_release_is_for_good_even_with_a_take_in_flight() -> None:
    store = MemoryBackend()
    took, answered = asyncio.Event(), asyncio.Event()

    class Slow(Faulty):
        async def acquire(self, name: str, owner: str, ttl: float) -> Lease | None:
            lease = await super().acquire(name, owner, ttl)
            took.set()
            await answered.wait()  # the store took it; the answer is on its way
            return lease

    leader = StoreLeader(Slow(store), NAME, "a")
    taking = asyncio.create_task(leader.ensure(3.0))
    await took.wait()
    assert (await store.acquire(NAME, "b", 3.0)) is None  # a has it, in the store
    await leader.release()  # a stops meanwhile
    answered.set()
    assert await taking is False
    assert not leader.held
    assert await store.acquire(NAME, "b", 3.0) is not None  # given straight back
    assert await leader.ensure(3.0) is False  # and never taken again


# -- periodic jobs on the lease --------------------------------------------------------


def test_the_leader_runs_and_the_follower_neither_runs_nor_skips(
    procs, shared: SharedStore
) -> None:
    runs = Runs()
    a, b = shared.procs(procs, "a", "b")
    ja = a.start(PeriodicJob(runs.job("a"), name="chore", every=0.1, scope="host"))
    runs.wait("a to run", lambda: runs.by("a") >= 1)  # a asked first: a leads
    jb = b.start(PeriodicJob(runs.job("b"), name="chore", every=0.1, scope="host"))
    runs.wait("more runs", lambda: runs.by("a") >= 8)
    assert runs.by("b") == 0
    assert a.lt.call(lambda: ja.holds_lock) is True
    snap = b.lt.call(jb.snapshot)
    assert snap["holds_lock"] is False
    assert snap["runs"] == snap["skips"] == snap["failures"] == 0
    assert snap["lock_error"] is None
    a.stop()
    b.stop()
    assert ja.runs == len(runs.log)
    assert len(shared.slots()) == ja.runs  # one slot claimed per run, none twice


def test_release_at_stop_hands_over_at_the_next_tick_and_every_slot_runs_once(
    procs, shared: SharedStore
) -> None:
    runs = Runs()
    a, b = shared.procs(procs, "a", "b")
    ja = a.start(PeriodicJob(runs.job("a"), name="chore", every=0.05, scope="cluster"))
    runs.wait("a to run", lambda: runs.by("a") >= 1)
    jb = b.start(PeriodicJob(runs.job("b"), name="chore", every=0.05, scope="cluster"))
    runs.wait("a to run more", lambda: runs.by("a") >= 5)
    t_stop = time.time()
    a.stop()  # released: b does not wait out the 3 s lease
    runs.wait("b to take over", lambda: runs.by("b") >= 1)
    [first_b] = [t for w, t in runs.log if w == "b"][:1]
    handover = first_b - t_stop
    print(f"handover after release: {handover:.3f}s (ttl {LEASE_TTL_MIN:g}s)")
    assert handover < LEASE_TTL_MIN / 2
    runs.wait("b to run more", lambda: runs.by("b") >= 5)
    b.stop()
    slots = shared.slots()
    assert len(slots) == len(set(slots)) == ja.runs + jb.runs == len(runs.log)
    # The slots are grid times (ms) one period apart: a single sequence across
    # the handover, nothing run twice.
    steps = {b - a for a, b in zip(sorted(slots), sorted(slots)[1:], strict=False)}
    assert min(steps) >= 49  # 50 ms, give or take the rounding to whole ms
    # (b may skip ticks once it leads: an fsync'd commit here can take longer
    # than a 50 ms period, and a tick whose store answer is late is skipped.)
    assert ja.failures == jb.failures == 0


def test_a_lost_lease_makes_the_leader_a_follower_at_once(procs) -> None:
    clock = Clock()
    shared = MemoryBackend(clock=clock)
    store = Faulty(shared)
    runs = Runs()
    a = procs("a", store)
    ja = a.start(PeriodicJob(runs.job("a"), name="chore", every=0.05, scope="cluster"))
    runs.wait("a to run", lambda: runs.by("a") >= 3)

    async def run_out_and_take() -> Lease | None:
        # a's lease runs out (a paused, say) and another process takes it, with
        # no tick of a in between (the memory backend never suspends).
        clock.now += 10.0
        return await shared.acquire(NAME, "intruder", 3600.0)

    assert a.lt.submit(run_out_and_take()).result(WAIT) is not None
    wait_for(lambda: ja.holds_lock is False, what="a to see its lease lost")
    done = ja.runs
    store.wait_ensures(3)  # three more ticks: each tries to take it, none runs
    assert ja.runs == done
    assert ja.skips == 0
    assert ja.failures == 0
    assert ja.holds_lock is False


def test_store_errors_are_counted_and_the_schedule_goes_on(procs) -> None:
    store = Faulty(MemoryBackend())
    store.error = ConnectionError("the store is unreachable")
    runs = Runs()
    a = procs("a", store)
    ja = a.start(PeriodicJob(runs.job("a"), name="chore", every=0.05, scope="cluster"))
    wait_for(lambda: ja.failures >= 3, what="store errors to be counted")
    snap = a.lt.call(ja.snapshot)
    assert snap["runs"] == 0
    assert snap["lock_error"].startswith("ConnectionError: the store is unreachable")
    assert snap["last_error"].startswith("lease: ConnectionError")
    assert snap["next_due"] is not None  # still armed
    store.error = None
    runs.wait("a run once the store is back", lambda: runs.by("a") >= 1)
    wait_for(lambda: ja.lock_error is None, what="the error to clear")
    assert ja.holds_lock is True


def test_fixed_rate_schedules_of_two_processes_tick_on_one_grid(procs, shared: SharedStore) -> None:
    runs = Runs()
    a, b = shared.procs(procs, "a", "b")
    period = 0.2
    ja = a.start(PeriodicJob(runs.job("a"), name="chore", every=period, scope="host"))
    runs.wait("a to run", lambda: runs.by("a") >= 1)
    time.sleep(period * 0.4)  # b starts out of phase on purpose: a delay, not a wait
    jb = b.start(PeriodicJob(runs.job("b"), name="chore", every=period, scope="host"))
    wait_for(lambda: jb._aligned and b.leader is not None, what="b to learn the anchor")
    runs.wait("a to run twice more", lambda: runs.by("a") >= 3)

    def phase(pj: PeriodicJob, p: Proc) -> float:
        due = p.lt.call(lambda: pj.next_due)
        assert due is not None
        return due

    offset = (phase(ja, a) - phase(jb, b)) % period
    assert min(offset, period - offset) < 0.02, offset


def test_cron_occurrences_run_once_each_across_two_processes(procs, shared: SharedStore) -> None:
    runs = Runs()
    a, b = shared.procs(procs, "a", "b")
    every_second = "* * * * * *"  # croniter's sixth field: seconds
    ja = a.start(PeriodicJob(runs.job("a"), name="chore", cron=every_second, scope="cluster"))
    jb = b.start(PeriodicJob(runs.job("b"), name="chore", cron=every_second, scope="cluster"))
    runs.wait("three occurrences", lambda: len(runs.log) >= 3)
    a.stop()
    b.stop()
    slots = sorted(shared.slots())
    assert len(slots) == ja.runs + jb.runs
    assert all(s % 1000 == 0 for s in slots)  # whole seconds: the occurrences
    assert len(set(slots)) == len(slots)
    assert min(ja.runs, jb.runs) == 0  # one leader throughout


def test_fixed_delay_runs_on_the_leader_and_the_follower_keeps_ticking(procs) -> None:
    clock = Clock()
    shared = MemoryBackend(clock=clock)
    fa, fb = Faulty(shared), Faulty(shared)
    runs = Runs()
    a, b = procs("a", fa), procs("b", fb)
    ja = a.start(PeriodicJob(runs.job("a"), name="chore", delay=0.05, scope="cluster"))
    runs.wait("a to run", lambda: runs.by("a") >= 1)
    jb = b.start(PeriodicJob(runs.job("b"), name="chore", delay=0.05, scope="cluster"))
    fb.wait_ensures(3)  # b's delay schedule re-arms though it never runs
    runs.wait("a to run more", lambda: runs.by("a") >= 4)
    assert runs.by("b") == 0
    assert jb.skips == ja.skips == 0


# -- through the extension -----------------------------------------------------------------


def test_cluster_scope_with_the_memory_backend_is_refused_at_start(make_app) -> None:
    _app, bg = make_app()

    @bg.periodic(every=1, scope="cluster")
    async def chore() -> None: ...

    with pytest.raises(ValueError, match="ASYNCBG_BACKEND"):
        bg.start()
    lt = LoopThread(name="bare")
    lt.start()
    try:
        pj = PeriodicJob(chore.fn, name="bare", every=1, scope="cluster")
        with pytest.raises(ValueError, match="needs a shared durable backend"):
            lt.call(pj.start, lt)
    finally:
        lt.stop(timeout=1.0)


def test_host_scope_with_sqlite_takes_the_store_lease_not_the_lock_file_and_releases_it_after_the_drain(  # noqa: E501
    make_app, tmp_path: Path
) -> None:
    db = tmp_path / "x.db"
    locks = tmp_path / "locks"
    _app, bg = make_app(
        import_name="leaseapp", ASYNCBG_BACKEND=f"sqlite:///{db}", ASYNCBG_LOCK_DIR=str(locks)
    )
    started, release = threading.Event(), threading.Event()

    @bg.periodic(every=0.05, scope="host", name="chore")
    async def chore() -> None:
        started.set()
        await asyncio.to_thread(release.wait, WAIT)

    bg.start()
    assert started.wait(WAIT)
    name = "asyncbg-leaseapp-chore"
    node = bg._state().durable.owner  # the app's node: its claims', leases' and heartbeat's
    row = lease_row(db, name)
    assert row is not None
    assert row[0] == node
    assert chore.holds_lock is True
    assert not locks.exists()  # no file lock with a durable backend

    stopping = threading.Thread(target=bg.stop, kwargs={"timeout": WAIT})
    stopping.start()
    wait_for(lambda: bg.loop_thread.stopping, what="the drain to begin")
    row = lease_row(db, name)
    assert row is not None
    assert row[0] == node  # still held while the run drains: no overlap elsewhere
    at_stop = row[2]
    renewed = wait_for(
        lambda: (r := lease_row(db, name)) is not None and r[2] > at_stop and r,
        what="a renewal during the drain",
    )
    assert renewed[0] == node
    release.set()
    stopping.join(WAIT)
    assert not stopping.is_alive()
    row = lease_row(db, name)
    assert row is not None
    assert row[0] is None  # given up: the next process need not wait for it to run out
    assert chore.runs == 1


# -- real processes ---------------------------------------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    from flask import Flask
    from asyncbg import AsyncBG

    db, audit, period = sys.argv[1], sys.argv[2], float(sys.argv[3])
    app = Flask("leasecluster")
    app.config.update(
        ASYNCBG_BACKEND=f"sqlite:///{db}", ASYNCBG_AUTOSTART=False, ASYNCBG_HANDLE_SIGNALS=False
    )
    bg = AsyncBG(app)

    @bg.periodic(every=period, scope="host", name="chore")
    async def chore():
        # Outside asyncbg: one appended line per run, on disk before the run ends:
        # who, when it started, and how late (by its own loop clock) that was.
        line = f"{os.getpid()} {time.time():.6f} {chore.last_start_lateness:.6f}\\n"
        fd = os.open(audit, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    bg.start()
    print("started", flush=True)
    done.wait(120)  # bounded: never outlives a test run
    print(bg.stop(timeout=5), flush=True)
    """
)


class Cluster:
    def __init__(self, tmp_path: Path, period: float) -> None:
        self.db = tmp_path / "cluster.db"
        self.audit = tmp_path / "audit.log"
        self.period = period
        self.script = tmp_path / "member.py"
        self.script.write_text(SCRIPT)
        self.procs: list[subprocess.Popen[str]] = []
        # The children import this checkout's asyncbg.
        root = str(Path(asyncbg.__file__).resolve().parent.parent)
        self.env = {**os.environ, "PYTHONPATH": root}

    def start(self) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [sys.executable, str(self.script), str(self.db), str(self.audit), str(self.period)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
        )
        self.procs.append(p)
        assert p.stdout is not None
        line = p.stdout.readline()  # bounded by the test's timeout
        assert line.strip() == "started", (line, p.stderr.read() if p.poll() is not None else "")
        return p

    def runs(self) -> list[tuple[int, float, float]]:
        """(pid, start, the time it was due) of every run, in the audit's order."""
        if not self.audit.exists():
            return []
        out = []
        for line in self.audit.read_text().splitlines():
            pid, start, late = line.split()
            out.append((int(pid), float(start), float(start) - float(late)))
        return out

    def runs_by(self, pid: int, after: float = -math.inf) -> list[float]:
        return [t for p, t, _ in self.runs() if p == pid and t > after]

    def anchor(self) -> float:
        with sqlite3.connect(self.db) as conn:
            return float(conn.execute("SELECT at FROM anchors").fetchone()[0])

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=WAIT)


@pytest.mark.timeout(90)
def test_real_processes_run_each_period_once_and_take_over_from_a_killed_or_stopped_leader(
    tmp_path: Path,
) -> None:
    period = 0.5
    ttl = lease_ttl(period)
    cluster = Cluster(tmp_path, period)
    try:
        p1 = cluster.start()
        p2 = cluster.start()
        wait_for(lambda: len(cluster.runs()) >= 6, timeout=WAIT * 2, what="six runs")
        holder = cluster.runs()[-1][0]
        other = p2 if holder == p1.pid else p1
        victim = p1 if holder == p1.pid else p2
        assert not cluster.runs_by(other.pid), "a follower ran"

        t_kill = time.time()
        victim.send_signal(signal.SIGKILL)
        victim.wait(WAIT)
        first = wait_for(
            lambda: cluster.runs_by(other.pid, t_kill), timeout=ttl * 4, what="a takeover"
        )[0]
        takeover = first - t_kill
        print(f"takeover after kill -9: {takeover:.3f}s (ttl {ttl:g}s, period {period:g}s)")
        assert takeover < 3 * ttl

        p3 = cluster.start()  # a new follower, for the graceful handover
        wait_for(
            lambda: len(cluster.runs_by(other.pid, time.time() - period)) >= 1,
            timeout=WAIT,
            what="the leader to go on",
        )
        t_term = time.time()
        other.send_signal(signal.SIGTERM)
        _out, err = other.communicate(timeout=WAIT)
        assert other.returncode == 0, err
        first = wait_for(
            lambda: cluster.runs_by(p3.pid, t_term), timeout=ttl * 4, what="a handover"
        )[0]
        handover = first - t_term
        print(f"handover after SIGTERM: {handover:.3f}s (released at stop; ttl {ttl:g}s)")
        assert handover < ttl  # it did not wait for the lease to run out
        wait_for(lambda: len(cluster.runs_by(p3.pid)) >= 3, timeout=WAIT, what="p3 to go on")
        p3.send_signal(signal.SIGTERM)
        p3.communicate(timeout=WAIT)

        # Reconcile. Each run was due at a grid point (anchor + k * period) and
        # started later by the store's round trips (two fsync'd commits, each up
        # to ~125 ms on this disk: a start can land in the next period, so it is
        # the due time that names the period; every process's timer is on the
        # shared grid, so a due time is a grid point give or take the clocks'
        # conversion). Two runs due in one period are two runs of one period.
        anchor = cluster.anchor()
        claimed = set(slot_rows(cluster.db, "asyncbg-leasecluster-chore"))
        runs = cluster.runs()
        periods: dict[int, list[int]] = {}
        for pid, _start, due in runs:
            k = math.floor((due - anchor) / period + 0.5)
            assert abs(due - (anchor + k * period)) < 0.05, "a run due off the grid"
            assert round((anchor + k * period) * 1000) in claimed, "a run of no claimed slot"
            periods.setdefault(k, []).append(pid)
        late = sorted(start - due for _, start, due in runs)
        print(
            f"{len(runs)} runs in {len(periods)} periods; started late by "
            f"{late[0] * 1000:.1f}..{late[-1] * 1000:.1f} ms"
        )
        roles = {victim.pid: "killed", other.pid: "stopped", p3.pid: "last"}
        table = "\n".join(
            f"{roles[pid]:>7} k={math.floor((due - anchor) / period + 0.5)} "
            f"started {start:.3f}, late {(start - due) * 1000:.1f} ms"
            for pid, start, due in runs
        )
        doubled = {k: v for k, v in periods.items() if len(v) > 1}
        assert doubled == {}, f"kill at {t_kill:.3f}, SIGTERM at {t_term:.3f}\n{table}"
        # And by the audit's clock alone: never more runs than periods went by.
        starts = sorted(start for _, start, _ in runs)
        assert len(runs) <= (starts[-1] - starts[0]) / period + 2
        assert {pid for pid, _, _ in runs} == {victim.pid, other.pid, p3.pid}
    finally:
        cluster.close()

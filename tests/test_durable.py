"""Durable jobs and items through the SQLite, PostgreSQL and Redis backends,
within this process.

Two apps on one store stand for two workers (of one host on SQLite, of any
hosts on PostgreSQL and Redis): each has its own loop, its own backend object (its own
connections, and writer thread or listener) and its own node id, as two
Hypercorn workers would. Real processes are in tests/test_durable_processes.py
and tests/test_postgres_processes.py. The tests of what only a file has (its
size, a full disk) take the ``sqlite_db`` fixture.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from asyncbg import AsyncBG, BackendError, JobFailed, JobStatus, QueueFull, current_job
from tests.conftest import MakeApp
from tests.helpers_core import WAIT, Gate, wait_for

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def sqlite_db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'jobs.db'}"


@pytest.fixture(params=["sqlite", "postgresql", "redis"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty store: an SQLite file, or a schema of its own on the
    session's PostgreSQL, or a key prefix of its own on the session's Redis."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        return f"{server.url()}?prefix={request.getfixturevalue('redis_prefix')}"
    server = request.getfixturevalue("postgres_server")
    return f"{server.url()}?schema={request.getfixturevalue('pg_schema')}"


def _fields(url: str, names: str, job_id: str | None = None) -> list[tuple[Any, ...]]:
    """``id`` and the named fields (comma-separated) of every job (or of one),
    straight from the store, not through asyncbg: a table's columns, or a
    Redis hash's fields (numbers as the store holds them)."""
    columns = [n.strip() for n in names.split(",")]
    if url.startswith("redis"):
        import redis

        base, _, prefix = url.partition("?prefix=")
        client = redis.Redis.from_url(base, decode_responses=True)
        try:
            keys = [f"{{{prefix}}}:j:{job_id}"] if job_id else client.keys(f"{{{prefix}}}:j:*")
            rows = [client.hmget(key, ["id", *columns]) for key in keys]
        finally:
            client.close()
        return [(row[0], *(_number(v) for v in row[1:])) for row in rows if row[0] is not None]
    where = " WHERE id = ?" if job_id else ""
    return _select(url, f"SELECT id, {names} FROM jobs{where}", (job_id,) if job_id else ())


def _number(text: str | None) -> Any:
    # A Redis hash holds text: numbers back as the SQL stores return them.
    if text is None:
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _select(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    # Straight from an SQL store, not through asyncbg: ``?`` marks parameters.
    if url.startswith("sqlite:"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()
    import psycopg

    base, _, schema = url.partition("?schema=")
    with psycopg.connect(base, autocommit=True) as pg:
        pg.execute(f'SET search_path TO "{schema}"')
        return pg.execute(sql.replace("?", "%s"), params).fetchall()


def _rows(url: str) -> dict[str, tuple[Any, ...]]:
    return {row[0]: row[1:] for row in _fields(url, "status, attempts, owner, result_json")}


def _worker(make_app: MakeApp, db: str, **config: Any) -> tuple[Any, AsyncBG]:
    config.setdefault("ASYNCBG_POLL_INTERVAL", 0.05)
    return make_app(ASYNCBG_BACKEND=db, **config)


def test_a_submit_is_stored_before_it_returns_and_runs(make_app: MakeApp, db: str) -> None:
    _app, bg = _worker(make_app, db)

    @bg.task
    def add(a: int, b: int) -> int:
        return a + b

    bg.start()
    job = add.submit(2, 3)
    assert job.id in _rows(db)
    assert job.result(WAIT) == 5
    assert _rows(db)[job.id][:2] == ("succeeded", 1)
    assert job.status is JobStatus.SUCCEEDED


def test_arguments_and_results_must_be_json(make_app: MakeApp, db: str) -> None:
    _app, bg = _worker(make_app, db)

    @bg.task
    def echo(value: Any) -> Any:
        return value

    @bg.task
    def odd() -> Any:
        return {1, 2}

    bg.start()
    with pytest.raises(TypeError, match="must be JSON"):
        echo.submit({1, 2})
    assert _rows(db) == {}
    job = odd.submit()
    with pytest.raises(TypeError, match="must be JSON"):
        job.result(WAIT)
    assert _rows(db)[job.id][0] == "failed"


def test_retries_apply_through_the_store(make_app: MakeApp, db: str) -> None:
    _app, bg = _worker(make_app, db)
    seen: list[int] = []

    @bg.task(retries=2, retry_backoff=0)
    def flaky() -> str:
        seen.append(current_job().attempts)
        if len(seen) < 3:
            raise ValueError(f"attempt {len(seen)}")
        return "ok"

    bg.start()
    job = flaky.submit()
    assert job.result(WAIT) == "ok"
    assert seen == [1, 2, 3]
    assert _rows(db)[job.id][:2] == ("succeeded", 3)


def test_a_failure_out_of_retries_is_final(make_app: MakeApp, db: str) -> None:
    _app, bg = _worker(make_app, db)

    @bg.task(retries=1, retry_backoff=0)
    def broken() -> None:
        raise ValueError("nope")

    bg.start()
    job = broken.submit()
    with pytest.raises(ValueError, match="nope"):
        job.result(WAIT)
    assert _rows(db)[job.id][:2] == ("failed", 2)


def test_another_worker_runs_it_and_the_submitter_sees_the_result(
    make_app: MakeApp, db: str
) -> None:
    # Worker A only submits (no room to run); worker B runs.
    app_a, bg_a = _worker(make_app, db, ASYNCBG_WORKER_CONCURRENCY=0)
    app_b, bg_b = _worker(make_app, db)
    where: list[str] = []

    for bg in (bg_a, bg_b):

        @bg.task(name="where")
        def where_task(tag: str) -> str:
            where.append(threading.current_thread().name)
            return tag

    bg_a.start()
    bg_b.start()
    with app_a.app_context():
        job = bg_a.tasks["where"].submit("x")
        assert job.result(WAIT) == "x"
        assert job.status is JobStatus.SUCCEEDED
    owner = _rows(db)[job.id][2]
    with app_b.app_context():
        assert bg_b.get_job(job.id) is not None
    assert owner is not None
    assert len(where) == 1


def test_get_job_finds_a_job_of_another_worker(make_app: MakeApp, db: str) -> None:
    app_a, bg_a = _worker(make_app, db)
    app_b, bg_b = _worker(make_app, db, ASYNCBG_WORKER_CONCURRENCY=0)
    gate = Gate()
    for bg in (bg_a, bg_b):

        @bg.task(name="slow")
        def slow() -> int:
            gate.wait()
            return 7

    bg_a.start()
    bg_b.start()
    with app_a.app_context():
        job = bg_a.tasks["slow"].submit()
    with app_b.app_context():
        seen = wait_for(
            lambda: (j := bg_b.get_job(job.id)) is not None and j.status is JobStatus.RUNNING and j,
            what="the job running, seen from B",
        )
        assert seen.id == job.id
        gate.set()
        assert seen.result(WAIT) == 7
        assert bg_b.get_job("0" * 32) is None


def test_cancel_of_a_queued_job_from_another_worker(make_app: MakeApp, db: str) -> None:
    app_a, bg_a = _worker(make_app, db, ASYNCBG_WORKER_CONCURRENCY=0)
    ran = threading.Event()

    @bg_a.task(name="never")
    def never() -> None:
        ran.set()

    bg_a.start()
    with app_a.app_context():
        job = never.submit()
        assert job.cancel()
        with pytest.raises(Exception, match="cancelled"):
            job.result(WAIT)
    assert _rows(db)[job.id][0] == "cancelled"
    # A worker that can run it now never starts it.
    app_b, bg_b = _worker(make_app, db)

    @bg_b.task(name="never")
    def never_b() -> None:
        ran.set()

    bg_b.start()
    with app_b.app_context():
        marker = bg_b.tasks["never"].submit()
        assert marker.result(WAIT) is None
    assert ran.is_set()  # the marker ran ...
    assert _rows(db)[job.id][0] == "cancelled"  # ... the cancelled one never did


def test_cancel_of_a_running_job_from_another_worker(make_app: MakeApp, db: str) -> None:
    app_a, bg_a = _worker(make_app, db, ASYNCBG_LEASE=1.5)
    app_b, bg_b = _worker(make_app, db, ASYNCBG_WORKER_CONCURRENCY=0)
    started = Gate()
    for bg in (bg_a, bg_b):

        @bg.task(name="forever")
        async def forever() -> None:
            started.set()
            await asyncio.sleep(3600)

    bg_a.start()
    bg_b.start()
    with app_a.app_context():
        job = bg_a.tasks["forever"].submit()
    assert started.wait()
    with app_b.app_context():
        remote = bg_b.get_job(job.id)
        assert remote is not None
        assert remote.cancel()
        with pytest.raises(Exception, match="cancelled"):
            remote.result(WAIT)
    with app_a.app_context():
        assert job.wait(WAIT)
        assert job.status is JobStatus.CANCELLED


def test_idempotency_key_returns_the_active_job(make_app: MakeApp, db: str) -> None:
    _app, bg = _worker(make_app, db)
    gate = Gate()
    runs: list[int] = []

    @bg.task
    def report(n: int) -> int:
        runs.append(n)
        gate.wait()
        return n

    bg.start()
    first = report.using(key="report-42").submit(1)
    second = report.using(key="report-42").submit(2)
    assert second is first
    gate.set()
    assert first.result(WAIT) == 1
    # Once it has finished, the key is free again.
    third = report.using(key="report-42").submit(3)
    assert third.id != first.id
    assert third.result(WAIT) == 3
    assert runs == [1, 3]


def test_a_client_made_id_makes_a_retried_submit_idempotent(make_app: MakeApp, db: str) -> None:
    _app, bg = _worker(make_app, db)
    runs: list[str] = []

    @bg.task
    def once(tag: str) -> str:
        runs.append(tag)
        return tag

    bg.start()
    job = once.using(job_id="order-17").submit("a")
    assert job.id == "order-17"
    assert job.result(WAIT) == "a"
    again = once.using(job_id="order-17").submit("b")
    assert again.id == "order-17"
    assert again.result(WAIT) == "a"
    assert runs == ["a"]
    with pytest.raises(ValueError, match="job_id"):
        once.using(job_id="no spaces")


def test_durable_consumer_items_and_a_bounded_store_count(make_app: MakeApp, db: str) -> None:
    app, bg = _worker(make_app, db)
    started, hold = Gate(), Gate()
    got: list[Any] = []
    done = threading.Event()

    @bg.consumer("mail", maxsize=3, concurrency=1)
    async def mail(item: Any) -> None:
        started.set()
        await hold.wait_async()
        got.append(item)
        if len(got) == 4:
            done.set()

    bg.start()
    with app.app_context():
        bg.enqueue("mail", {"n": 0})
        assert started.wait()  # running: it no longer counts towards maxsize
        for i in range(1, 4):
            bg.enqueue("mail", {"n": i})
        with pytest.raises(QueueFull, match="mail"):
            bg.enqueue("mail", {"n": 99})
        with pytest.raises(TypeError, match="JSON"):
            bg.enqueue("mail", {1, 2})
        hold.set()
        assert done.wait(WAIT)
    assert [item["n"] for item in got] == [0, 1, 2, 3]


def test_stop_releases_running_jobs_to_the_store(make_app: MakeApp, db: str) -> None:
    app_a, bg_a = _worker(make_app, db, ASYNCBG_SHUTDOWN_TIMEOUT=0.2)
    started = Gate()
    runs: list[str] = []

    @bg_a.task(name="long")
    async def long_a() -> str:
        runs.append("a")
        started.set()
        await asyncio.sleep(3600)
        return "a"

    bg_a.start()
    with app_a.app_context():
        job = long_a.submit()
    assert started.wait()
    report = bg_a.stop()
    assert report.released == 1
    assert report.cancelled == 0
    assert report.abandoned == 0
    assert "1 released" in str(report)
    assert not job.done()  # not "abandoned": the store has it, another worker runs it
    assert _rows(db)[job.id][:2] == ("pending", 0)  # handed back, attempt not counted

    app_b, bg_b = _worker(make_app, db)

    @bg_b.task(name="long")
    async def long_b() -> str:
        runs.append("b")
        return "b"

    bg_b.start()
    with app_b.app_context():
        remote = bg_b.get_job(job.id)
        assert remote is not None
        assert remote.result(WAIT) == "b"
    assert runs == ["a", "b"]


def test_progress_reaches_the_store(make_app: MakeApp, db: str) -> None:
    _app, bg = _worker(make_app, db)
    gate = Gate()

    @bg.task
    async def step() -> None:
        current_job().set_progress(3, 10, "three")
        await gate.wait_async()

    bg.start()
    job = step.submit()

    def stored() -> Any:
        fields = _fields(db, "progress_done, progress_total, progress_message", job.id)
        return [row[1:] for row in fields] == [(3.0, 10.0, "three")]

    wait_for(stored, what="the progress in the store")
    gate.set()
    assert job.result(WAIT) is None


def test_a_durable_submit_on_the_loop_thread_must_be_awaited(make_app: MakeApp, db: str) -> None:
    _app, bg = _worker(make_app, db)

    @bg.task
    async def child() -> str:
        return "child"

    @bg.task
    async def parent() -> str:
        with pytest.raises(RuntimeError, match="submit_async"):
            child.submit()
        job = await child.submit_async()
        return await job

    bg.start()
    assert parent.submit().result(WAIT) == "child"


def test_a_remote_failure_raises_jobfailed(make_app: MakeApp, db: str) -> None:
    app_a, bg_a = _worker(make_app, db, ASYNCBG_WORKER_CONCURRENCY=0)
    _app_b, bg_b = _worker(make_app, db)
    for bg in (bg_a, bg_b):

        @bg.task(name="bad")
        def bad() -> None:
            raise KeyError("missing")

    bg_a.start()
    bg_b.start()
    with app_a.app_context():
        job = bg_a.tasks["bad"].submit()
        with pytest.raises(JobFailed, match="KeyError"):
            job.result(WAIT)


def test_submits_claimed_by_their_own_enqueue_keep_to_the_worker_concurrency(
    make_app: MakeApp, db: str
) -> None:
    # Submits staged while this process has room are stored already claimed by
    # it (Take); the room counts what runs, what an enqueue in flight takes and
    # what a claim in flight asks, so no more than ASYNCBG_WORKER_CONCURRENCY
    # jobs ever run at once, and the rest wait in the store, then all run.
    _app, bg = _worker(make_app, db, ASYNCBG_WORKER_CONCURRENCY=3, ASYNCBG_POLL_INTERVAL=0.05)
    gate = Gate()
    lock = threading.Lock()
    running: list[int] = []
    most = [0]

    @bg.task
    async def hold(i: int) -> int:
        with lock:
            running.append(i)
            most[0] = max(most[0], len(running))
        await gate.wait_async()
        with lock:
            running.remove(i)
        return i

    bg.start()

    async def burst() -> list[Any]:
        # From the loop: every submit is staged there, the path that takes.
        return [await hold.submit_async(i) for i in range(5)] + list(
            await asyncio.gather(*(hold.submit_async(i) for i in range(5, 10)))
        )

    jobs = bg.state_for(_app).loop_thread.submit(burst()).result(WAIT)
    wait_for(lambda: len(running) == 3, what="three jobs running")
    assert len(_rows(db)) == 10
    stored = _rows(db).values()
    assert sum(1 for r in stored if r[0] == "running") == 3  # the rest wait in the store
    gate.set()
    assert sorted(job.result(WAIT) for job in jobs) == list(range(10))
    assert most[0] == 3


def test_an_enqueue_and_a_claim_decided_in_one_loop_turn_share_the_room(
    make_app: MakeApp, sqlite_db: str
) -> None:
    # The race behind an occasional fourth job at concurrency 3: a group commit
    # and a claim decided in the same loop turn, before either write's task
    # had run, each counted the same free slots. The enqueue now reserves what
    # it takes when it is decided, and the claim what it asks.
    import concurrent.futures

    from asyncbg.engine.durable import _Staged
    from asyncbg.extension import _PLAIN

    app, bg = _worker(make_app, sqlite_db, ASYNCBG_WORKER_CONCURRENCY=3)
    gate = Gate()

    @bg.task
    async def hold(i: int) -> int:
        await gate.wait_async()
        return i

    bg.start()
    st = bg.state_for(app)
    durable = st.durable
    assert durable is not None

    async def one_turn() -> tuple[int, list[Any]]:
        # The start-up claim may be in flight, its ask holding every slot: the
        # turn below must begin with the room free. A claim's ask is reserved
        # only while its write runs, and none can start before this coroutine
        # yields again.
        while durable._writes:
            await asyncio.gather(*tuple(durable._writes), return_exceptions=True)
        assert durable._task_slots_used() == 0
        waiters = []
        for i in range(3):
            job, record = bg._stored_job(st, hold, (i,), {}, _PLAIN)
            waiter: concurrent.futures.Future[Any] = concurrent.futures.Future()
            durable.history.add(job)
            durable._stage(_Staged(record, job, waiter, None))
            waiters.append(waiter)
        durable._flush()  # the group commit is decided: its write has not run
        _wanted, asked = durable._room()  # a claim decided in the same turn
        durable._unclaim(asked)
        return asked, [await asyncio.wrap_future(w) for w in waiters]

    asked, records = st.loop_thread.submit(one_turn()).result(WAIT)
    assert asked == 0  # the three slots were the enqueue's already
    assert [r.status for r in records] == ["running"] * 3
    gate.set()
    assert sorted(durable.history.get(r.id).result(WAIT) for r in records) == [0, 1, 2]


@pytest.mark.parametrize("with_consumer", [False, True], ids=["tasks", "tasks-and-consumer"])
def test_records_an_enqueue_left_pending_beside_those_it_took_are_looked_for(
    make_app: MakeApp, db: str, monkeypatch: pytest.MonkeyPatch, with_consumer: bool
) -> None:
    # submit_many of four with room for two: two are taken, two stay pending.
    # The claimer must be told of those two; it used to compare the pending
    # with the taken (2 < 2: no wake) and left them to a poll. With a durable
    # consumer too, the claim that finds no task slot still looks at its queue:
    # a freed task slot must look again all the same.
    import asyncbg.engine.durable as engine

    monkeypatch.setattr(engine, "_POLL_FIRST", 60.0)  # no poll finds them in time
    _app, bg = _worker(make_app, db, ASYNCBG_WORKER_CONCURRENCY=3, ASYNCBG_POLL_INTERVAL=60)
    gate = Gate()
    ran: list[int] = []

    @bg.task
    async def step(i: int) -> int:
        if i == 0:
            await gate.wait_async()
        ran.append(i)
        return i

    if with_consumer:

        @bg.consumer("mail")
        async def mail(item: Any) -> None:
            return None

    bg.start()
    st = bg.state_for(_app)
    durable = st.durable
    assert durable is not None
    st.loop_thread.post(durable.wake)  # one look that finds nothing: no freed slot looks again
    wait_for(lambda: not durable._behind)
    first = step.submit(0)
    # Held, and its take's reservation given back: the room is exactly two.
    wait_for(lambda: first.id in durable._held and durable._reserved == 0)
    assert durable._task_slots_used() == 1  # room for two of the four
    jobs = step.submit_many([(i,) for i in range(1, 5)])
    gate.set()
    assert [j.result(WAIT) for j in jobs] == [1, 2, 3, 4]
    assert first.result(WAIT) == 0


def test_a_claim_woken_by_this_process_enqueue_asks_only_for_what_it_left(
    make_app: MakeApp, sqlite_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A claim in flight holds the room it asks. Woken only because this
    # process's enqueues left records pending, it asks for that many and the
    # rest of the room stays free for the next enqueue to take; any other wake
    # asks for all the room. (Under four submitting threads the old claims
    # held the room nearly all the time, and the enqueues took almost nothing.)
    import asyncbg.engine.durable as engine

    monkeypatch.setattr(engine, "_POLL_FIRST", 60.0)  # only the wakes below claim
    app, bg = _worker(make_app, sqlite_db, ASYNCBG_WORKER_CONCURRENCY=8, ASYNCBG_POLL_INTERVAL=60)

    @bg.task
    async def noop() -> None:
        return None

    bg.start()
    st = bg.state_for(app)
    durable = st.durable
    assert durable is not None
    real = durable.store.claim
    waiting: list[asyncio.Future[int]] = []

    async def claim(queues: Any, owner: str, limit: int, lease: float) -> Any:
        if waiting:
            waiting.pop().set_result(limit)
        return await real(queues, owner, limit, lease)

    monkeypatch.setattr(durable.store, "claim", claim)

    async def asked_after(wake: Any, *args: Any) -> int:
        while durable._writes:  # the start-up claim, if still in flight
            await asyncio.gather(*tuple(durable._writes), return_exceptions=True)
        asked = asyncio.get_running_loop().create_future()
        waiting.append(asked)
        wake(*args)
        return await asyncio.wait_for(asked, WAIT)

    submit = st.loop_thread.submit
    assert submit(asked_after(durable.wake)).result(WAIT) == 8  # the first look: all
    assert submit(asked_after(durable._wake_for, 2)).result(WAIT) == 2
    assert submit(asked_after(durable.wake)).result(WAIT) == 8
    assert submit(asked_after(durable._wake_for, 20)).result(WAIT) == 8  # never past the room


def test_submit_many_stores_a_burst_in_one_commit(make_app: MakeApp, db: str) -> None:
    _app, bg = _worker(make_app, db, ASYNCBG_WORKER_CONCURRENCY=0)

    @bg.task
    def square(n: int) -> int:
        return n * n

    bg.start()
    jobs = square.submit_many([(i,) for i in range(50)])
    assert len(jobs) == 50
    rows = _rows(db)
    assert all(job.id in rows for job in jobs)
    # One commit: every record of the burst has the same creation batch (seq
    # numbers drawn in one transaction are consecutive).
    seqs = sorted(s for _, s in _fields(db, "seq"))
    assert seqs == list(range(seqs[0], seqs[0] + 50))
    with pytest.raises(TypeError):
        square.submit_many([(1,), (1, 2)])
    assert len(_rows(db)) == 50  # the bad burst stored nothing


def test_finished_jobs_expire_and_the_file_stops_growing(make_app: MakeApp, sqlite_db: str) -> None:
    db = sqlite_db
    # A steady load with a short retention: rows are deleted after
    # ASYNCBG_JOB_HISTORY_AGE and SQLite reuses the freed pages, so after the
    # first rounds the file keeps its size.
    path = Path(db.removeprefix("sqlite:///"))
    _app, bg = _worker(make_app, db, ASYNCBG_JOB_HISTORY_AGE=0.3, ASYNCBG_LEASE=1.0)

    @bg.task
    def payload(i: int) -> str:
        return "x" * 200 + str(i)

    bg.start()
    sizes = []
    for round_ in range(6):
        jobs = payload.submit_many([(round_ * 1000 + i,) for i in range(1000)])
        for job in jobs:
            job.result(WAIT)
        wait_for(lambda: not _rows(db), timeout=WAIT, what="every finished row expired")
        sizes.append(path.stat().st_size + Path(f"{path}-wal").stat().st_size)
    print("file + WAL bytes after each round of 1000 jobs:", sizes)
    assert max(sizes[2:]) <= sizes[1] * 1.25, sizes


def test_a_stalled_owner_loses_its_claim_and_its_late_result_is_refused(
    make_app: MakeApp, db: str
) -> None:
    # Worker A's loop is blocked past its lease (as SIGSTOP would do to the
    # process); worker B takes the job over and finishes it; A's late result
    # is refused by the token, and A's handle reports B's outcome.
    app_a, bg_a = _worker(make_app, db, ASYNCBG_LEASE=1.0, ASYNCBG_MONITOR=False)
    # B's own lease is long: on a loaded machine its finish must not be late
    # enough for its claim to run out too (the job would end failed, out of attempts).
    app_b, bg_b = _worker(make_app, db, ASYNCBG_LEASE=10.0)
    started = Gate()
    b_ran = threading.Event()

    @bg_a.task(name="stall", retries=1, retry_backoff=0)
    async def stall_a() -> str:
        started.set()
        # The stall under test: A's loop cannot renew until B, past A's lease,
        # has taken the job over and run it (bounded, as a SIGSTOP would be).
        b_ran.wait(WAIT)
        return "a"

    @bg_b.task(name="stall", retries=1, retry_backoff=0)
    async def stall_b() -> str:
        b_ran.set()
        return "b"

    bg_a.start()
    with app_a.app_context():
        job = stall_a.submit()
    assert started.wait()
    bg_b.start()
    with app_b.app_context():
        remote = bg_b.get_job(job.id)
        assert remote is not None
        assert remote.result(WAIT) == "b"
    with app_a.app_context():
        assert job.result(WAIT) == "b"  # the store's outcome, not A's late one
        assert bg_a.state_for(app_a).durable.stale_rejected == 1  # type: ignore[union-attr]
    assert _rows(db)[job.id][:2] == ("succeeded", 2)  # the lost run counted as an attempt


def test_get_job_where_it_was_submitted_sees_another_workers_outcome(
    make_app: MakeApp, db: str
) -> None:
    app_a, bg_a = _worker(make_app, db, ASYNCBG_WORKER_CONCURRENCY=0)
    app_b, bg_b = _worker(make_app, db)
    for bg in (bg_a, bg_b):

        @bg.task(name="elsewhere")
        def elsewhere() -> str:
            return "done"

    bg_a.start()
    bg_b.start()
    with app_a.app_context():
        job = bg_a.tasks["elsewhere"].submit()
    with app_b.app_context():
        remote = bg_b.get_job(job.id)
        assert remote is not None
        assert remote.result(WAIT) == "done"
    with app_a.app_context():
        seen = bg_a.get_job(job.id)
        assert seen is job  # the same handle, brought up to date from the store
        assert seen.status is JobStatus.SUCCEEDED
        assert seen.result(0) == "done"


def test_the_jobs_endpoint_finds_a_client_made_id(make_app: MakeApp, db: str) -> None:
    app, bg = _worker(make_app, db)

    @bg.task
    def once() -> str:
        return "x"

    bg.start()
    job = once.using(job_id="order-17.v2:a_b").submit()
    assert job.result(WAIT) == "x"
    answer = app.test_client().get("/_asyncbg/jobs/order-17.v2:a_b")
    assert answer.status_code == 200, answer.json
    assert answer.json["id"] == "order-17.v2:a_b"
    assert app.test_client().get("/_asyncbg/jobs/not%20an%20id").status_code == 404


def test_a_failing_item_is_not_retried(make_app: MakeApp, db: str) -> None:
    app, bg = _worker(make_app, db)
    calls: list[Any] = []
    done = threading.Event()

    @bg.consumer("jobs")
    async def handle(item: Any) -> None:
        calls.append(item)
        done.set()
        raise ValueError("bad item")

    bg.start()
    with app.app_context():
        bg.enqueue("jobs", "x", job_id="item-1")
    assert done.wait(WAIT)
    wait_for(lambda: _rows(db)["item-1"][0] == "failed", what="the item failed")
    assert _rows(db)["item-1"][1] == 1  # one attempt: a handler's failure is final
    assert calls == ["x"]


def test_a_full_disk_fails_the_submit_with_a_clear_error_and_stores_nothing(
    make_app: MakeApp, sqlite_db: str
) -> None:
    # SQLite's answer to a full disk (SQLITE_FULL), made by capping the file at
    # the pages it has: the submit raises BackendError saying so, nothing is
    # half-stored, and once there is room again submits work.
    db = sqlite_db
    app, bg = _worker(make_app, db, ASYNCBG_WORKER_CONCURRENCY=0)

    @bg.task
    def fill(blob: str) -> None:
        pass

    bg.start()
    fill.submit("warm-up")  # the schema and a first page exist
    backend = bg.state_for(app).backend

    def cap(conn: sqlite3.Connection) -> None:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")

    def uncap(conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA max_page_count = 1073741823")

    before = set(_rows(db))
    bg.loop_thread.submit(backend._run(lambda: cap(backend._connection()))).result(WAIT)
    with pytest.raises(BackendError, match="full"):
        fill.submit("x" * 200_000)
    assert set(_rows(db)) == before
    bg.loop_thread.submit(backend._run(lambda: uncap(backend._connection()))).result(WAIT)
    job = fill.submit("x" * 200_000)
    assert job.id in _rows(db)

"""What only the PostgreSQL backend has: its URL, its schema and migration, a
server that is down, restarted or drops a connection, the connection budget,
NOTIFY wake-ups and cancel requests between processes, and the submit written
in the caller's own transaction (psycopg, and Flask-SQLAlchemy's session).

Against the session's throw-away server (``postgres_server``), a schema of its
own per test. The contract suite (tests/backends) and the durable tests
(tests/test_durable.py) run on it too; real processes on several "hosts" are
in tests/test_postgres_processes.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import Integer
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from asyncbg import AsyncBG, BackendError, ConfigError, JobStatus, current_job
from asyncbg.backends import BackendOptions, open_backend
from asyncbg.backends.postgresql import PostgresBackend, from_url
from asyncbg.engine.records import Claim, JobRecord, Outcome, Take
from tests.conftest import MakeApp
from tests.helpers_core import WAIT, Gate, wait_for
from tests.servers import PostgresServer, free_port
from tests.wakeup_checks import (
    check_a_cancel_from_another_process_reaches_the_run_at_once,
    check_woken_by_the_channel_not_by_polling,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def url(postgres_server: PostgresServer, pg_schema: str) -> str:
    return f"{postgres_server.url()}?schema={pg_schema}"


@pytest.fixture
async def backend(
    postgres_server: PostgresServer, pg_schema: str
) -> AsyncIterator[PostgresBackend]:
    made = PostgresBackend(postgres_server.url(), schema=pg_schema)
    await made.open()
    try:
        await made.migrate()
        yield made
    finally:
        await made.close()


def _worker(make_app: MakeApp, url: str, **config: Any) -> tuple[Any, AsyncBG]:
    config.setdefault("ASYNCBG_POLL_INTERVAL", 5.0)  # wake-ups, not polls, unless a test says
    return make_app(ASYNCBG_BACKEND=url, **config)


def _job(job_id: str) -> JobRecord:
    return JobRecord(id=job_id, queue="q", task="t")


# -- the URL ---------------------------------------------------------------------


def test_the_url_names_the_schema_and_passes_the_rest_to_libpq() -> None:
    made = from_url("postgres://u:secret@db.internal:6432/app?schema=jobs&sslmode=disable", "")
    assert made.schema == "jobs"
    assert made.conninfo == "postgresql://u:secret@db.internal:6432/app?sslmode=disable"
    assert "secret" not in repr(made)
    assert from_url("postgresql+psycopg://u@h/app", "").schema == "asyncbg"
    backend = open_backend("postgresql://u@h/app", "", BackendOptions(pool_size=7))
    assert isinstance(backend, PostgresBackend)
    assert backend.options.pool_size == 7


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgresql://u@h/app?schema=Bad-Name", "schema name"),
        ("postgresql://u@h/app?schema=a&schema=b", "given twice"),
        ("postgresql://u@h", "name the database"),
    ],
)
def test_an_unusable_url_is_a_config_error(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        from_url(url, "")


def test_the_config_keys_reach_the_backend(make_app: MakeApp, url: str) -> None:
    app, bg = make_app(
        ASYNCBG_BACKEND=url,
        ASYNCBG_POOL_SIZE=2,
        ASYNCBG_STATEMENT_TIMEOUT=1.5,
        ASYNCBG_CONNECT_TIMEOUT=2.0,
    )
    backend = bg.state_for(app).backend
    assert isinstance(backend, PostgresBackend)
    assert backend.options == BackendOptions(
        pool_size=2, statement_timeout=1.5, connect_timeout=2.0, lease=30.0
    )


# -- schema --------------------------------------------------------------------------


async def test_the_schema_is_versioned_and_migrating_again_changes_nothing(
    backend: PostgresBackend, postgres_server: PostgresServer, pg_schema: str
) -> None:
    await backend.enqueue([_job("kept")])
    await backend.migrate()
    assert await backend.get("kept") is not None
    assert postgres_server.psql(f"SELECT version FROM {pg_schema}.version").split() == ["1"]


async def test_hosts_migrating_at_once_take_turns(
    postgres_server: PostgresServer, pg_schema: str
) -> None:
    made = [PostgresBackend(postgres_server.url(), schema=pg_schema) for _ in range(4)]
    for b in made:
        await b.open()
    try:
        await asyncio.gather(*(b.migrate() for b in made))
        stored = await made[0].enqueue([_job("a")])
        assert [r.id for r in stored if r] == ["a"]
        assert postgres_server.psql(f"SELECT count(*) FROM {pg_schema}.version").strip() == "1"
    finally:
        for b in made:
            await b.close()


async def test_a_schema_of_a_newer_asyncbg_is_refused(
    backend: PostgresBackend, postgres_server: PostgresServer, pg_schema: str
) -> None:
    postgres_server.psql(f"INSERT INTO {pg_schema}.version (version) VALUES (99)")
    with pytest.raises(BackendError, match="version 99, newer than this asyncbg's 1"):
        await backend.migrate()


# -- a server that is down, restarted or slow ------------------------------------------


async def test_an_unreachable_server_is_a_clear_error_within_the_connect_timeout() -> None:
    port = free_port()  # nothing listens there
    made = PostgresBackend(
        f"postgresql://asyncbg@127.0.0.1:{port}/postgres",
        options=BackendOptions(connect_timeout=1.0),
    )
    started = time.monotonic()
    with pytest.raises(BackendError, match=rf"cannot reach PostgreSQL at .*:{port}.* within 1 s"):
        await made.open()
    assert time.monotonic() - started < 5.0


def test_an_app_whose_server_is_down_fails_to_start_with_that_error(make_app: MakeApp) -> None:
    port = free_port()
    _app, bg = make_app(
        ASYNCBG_BACKEND=f"postgresql://asyncbg@127.0.0.1:{port}/postgres",
        ASYNCBG_CONNECT_TIMEOUT=0.5,
    )
    with pytest.raises(BackendError, match="cannot reach PostgreSQL"):
        bg.start()


async def test_a_statement_over_the_statement_timeout_is_cancelled_by_the_server(
    postgres_server: PostgresServer, pg_schema: str
) -> None:
    made = PostgresBackend(
        postgres_server.url(), schema=pg_schema, options=BackendOptions(statement_timeout=0.2)
    )
    await made.open()
    try:
        with pytest.raises(BackendError, match="statement timeout"):
            await made._rows("a slow read", "SELECT pg_sleep(2)")
    finally:
        await made.close()


async def test_a_dropped_connection_is_replaced_and_the_operation_goes_through(
    backend: PostgresBackend, postgres_server: PostgresServer
) -> None:
    await backend.enqueue([_job("before")])
    # Every connection of the pool and the listener dropped by the server.
    postgres_server.psql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'asyncbg' AND pid <> pg_backend_pid()"
    )
    stored = await backend.enqueue([_job("after")])
    assert [r.id for r in stored if r] == ["after"]
    assert {r.id for r in (await backend.claim(["q"], "n1", 5, 30.0))} == {"before", "after"}


async def test_a_submit_from_another_thread_is_stored_by_that_thread_before_it_returns(
    backend: PostgresBackend, postgres_server: PostgresServer
) -> None:
    # A view's thread writes on a blocking connection of the backend's own: no
    # hop through the loop, and the future is resolved when the call returns.
    # One thread for all of them: a submit right after another thread's goes
    # through the loop instead (the executor of to_thread may switch threads).
    view = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def submit_now(records: list[JobRecord]) -> Any:
        future = backend.enqueue_from_thread(records)
        assert future is not None
        assert future.done()
        return future.result()

    async def submit(records: list[JobRecord]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(view, submit_now, records)

    first = await submit([_job("a"), _job("b")])
    assert [r.id for r in first if r] == ["a", "b"]
    # Idempotent on the id and on an active key, as on the loop.
    keyed = JobRecord(id="k1", queue="q", task="t", key="only-one")
    again = await submit([_job("a"), keyed, keyed.replace(id="k2")])
    assert [r.id for r in again if r] == ["a", "k1", "k1"]

    # Its connections' notifications count as this process's own.
    def blocking_pid() -> int:
        with backend._thread_pool.connection() as conn:
            return int(conn.info.backend_pid)

    assert await asyncio.to_thread(blocking_pid) in backend._own_pids
    assert {c.id for c in await backend.claim(["q"], "n1", 5, 30.0)} == {"a", "b", "k1"}
    # A bounded queue's count needs a transaction: left to the loop (None).
    assert backend.enqueue_from_thread([_job("c")], limits={"q": 5}) is None
    # So is a submit while another thread writes, or right after another
    # thread submitted: several threads share the loop's group commit.
    backend._threads_writing = backend.thread_pool_size
    try:
        assert backend.enqueue_from_thread([_job("c")]) is None
    finally:
        backend._threads_writing = 0

    def twice() -> tuple[Any, Any]:
        # Another thread's submit "just now" (however slow this machine is):
        # crowded; then this thread's own submit was the last one: alone.
        backend._last_submit, backend._last_submitter = time.monotonic() + 3600, -1
        return backend.enqueue_from_thread([_job("c")]), backend.enqueue_from_thread([_job("c")])

    crowded, alone = await asyncio.get_running_loop().run_in_executor(view, twice)
    assert crowded is None
    assert alone is not None
    assert [r.id for r in alone.result() if r] == ["c"]
    # A dropped connection is replaced and the insert sent once more.
    postgres_server.psql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'asyncbg' AND pid <> pg_backend_pid()"
    )
    try:
        after = await submit([_job("after")])
    finally:
        view.shutdown()
    assert [r.id for r in after if r] == ["after"]


async def test_a_submit_from_a_thread_to_a_server_that_is_down_fails_with_a_backend_error(
    pg_schema: str,
) -> None:
    server = PostgresServer().start()
    made = PostgresBackend(
        server.url(), schema=pg_schema, options=BackendOptions(connect_timeout=1.0)
    )
    await made.open()
    try:
        await made.migrate()
        server.stop("immediate")
        started = time.monotonic()
        future = await asyncio.to_thread(made.enqueue_from_thread, [_job("x")])
        assert future is not None
        with pytest.raises(BackendError, match=r"PostgreSQL at .*: an enqueue (failed|found no)"):
            future.result()
        assert time.monotonic() - started < 10  # the connect timeout, not a hang
    finally:
        await made.close()
        server.cleanup()
    with pytest.raises(BackendError, match="not open"):
        made.enqueue_from_thread([_job("y")])


def _restart(server: PostgresServer, mode: str, done: threading.Event) -> threading.Thread:
    def run() -> None:
        server.restart(mode)
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_a_server_restart_under_load_loses_nothing_acknowledged(
    make_app: MakeApp, mode: str, tmp_path: Any
) -> None:
    # A server of its own: restarting the session's would disturb other tests.
    server = PostgresServer().start()
    try:
        _app, bg = _worker(
            make_app, server.url(), ASYNCBG_POLL_INTERVAL=0.1, ASYNCBG_CONNECT_TIMEOUT=10.0
        )
        ran: set[int] = set()

        @bg.task(name="count")
        def count(i: int) -> int:
            ran.add(i)
            return i

        bg.start()
        acknowledged: list[Any] = []
        failed = 0
        restarted = threading.Event()
        thread: threading.Thread | None = None
        deadline = time.monotonic() + 20
        i = 0
        while (i < 400 or not restarted.is_set()) and time.monotonic() < deadline:
            if i == 100:
                thread = _restart(server, mode, restarted)
            try:
                acknowledged.append(count.using(job_id=f"job-{i}").submit(i))
            except BackendError:
                failed += 1  # refused while the server was away: the caller knows
            i += 1
        assert thread is not None
        thread.join(30)
        assert restarted.is_set()
        for job in acknowledged:
            assert job.result(WAIT) == int(job.id.removeprefix("job-"))
        assert {int(j.id.removeprefix("job-")) for j in acknowledged} <= ran
        print(f"{mode} restart: {len(acknowledged)} acknowledged, {failed} refused meanwhile")
    finally:
        server.cleanup()


# -- the connection budget -----------------------------------------------------------------


async def test_a_connection_budget_over_max_connections_is_a_warning_with_the_numbers(
    postgres_server: PostgresServer, pg_schema: str
) -> None:
    from asyncbg.engine.records import NodeRecord

    made = PostgresBackend(
        postgres_server.url(), schema=pg_schema, options=BackendOptions(pool_size=60)
    )
    await made.open()
    try:
        await made.migrate()
        assert await made.preflight() == []  # alone: 62 of 197
        for n in range(3):
            await made.heartbeat(NodeRecord(f"node-{n}", "h", n, time.time()))
        (warning,) = await made.preflight()
        assert "4 processes" in warning
        assert "(pool 60 + 1 for submits from a thread + 1 listener) = 248" in warning
        assert "max_connections 200 - 3 reserved = 197" in warning
    finally:
        await made.close()


# -- wake-ups between processes ---------------------------------------------------------------


def test_another_process_is_woken_by_notify_not_by_polling(make_app: MakeApp, url: str) -> None:
    check_woken_by_the_channel_not_by_polling(lambda **config: _worker(make_app, url, **config))


def test_a_cancel_from_another_process_reaches_the_running_job_at_once(
    make_app: MakeApp, url: str
) -> None:
    # Only the NOTIFY explains a cancel within a second of a 30 s lease.
    check_a_cancel_from_another_process_reaches_the_run_at_once(
        lambda **config: _worker(make_app, url, **config)
    )


def test_progress_and_the_token_of_a_running_job(make_app: MakeApp, url: str) -> None:
    _app, bg = _worker(make_app, url)
    seen: list[int] = []
    gate = Gate()

    @bg.task
    def work() -> None:
        seen.append(current_job().token)
        current_job().set_progress(1, 2, "half")
        gate.wait()

    bg.start()
    job = work.submit()
    wait_for(lambda: (s := bg.get_job(job.id)) is not None and s.progress is not None, what="p")
    gate.set()
    assert job.wait(WAIT)
    assert seen == [1]


# -- in the caller's transaction ------------------------------------------------------------------


@pytest.fixture
def transactional(make_app: MakeApp, url: str) -> tuple[AsyncBG, Any, list[int]]:
    _app, bg = _worker(make_app, url)
    ran: list[int] = []

    @bg.task(name="after_commit")
    def after_commit(order: int) -> int:
        ran.append(order)
        return order

    bg.start()
    return bg, after_commit, ran


def test_a_job_in_the_callers_transaction_exists_only_if_it_commits(
    transactional: tuple[AsyncBG, Any, list[int]], postgres_server: PostgresServer
) -> None:
    bg, after_commit, ran = transactional
    with psycopg.connect(postgres_server.url()) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS orders_tx (id int PRIMARY KEY)")
        conn.commit()
        conn.execute("INSERT INTO orders_tx VALUES (2)")
        rolled_back = after_commit.using(connection=conn).submit(2)
        conn.rollback()
        conn.execute("INSERT INTO orders_tx VALUES (1)")
        committed = after_commit.using(connection=conn, job_id="order-1").submit(1)
        # Not committed yet: not in the store for anyone else.
        assert bg.get_job("order-1") is None
        conn.commit()
        again = after_commit.using(connection=conn, job_id="order-1").submit(1)
        conn.commit()
    assert committed.result(WAIT) == 1
    assert again.id == committed.id
    assert bg.get_job(rolled_back.id) is None
    assert ran == [1]


async def test_submit_async_in_the_callers_async_transaction(
    transactional: tuple[AsyncBG, Any, list[int]], postgres_server: PostgresServer
) -> None:
    _bg, after_commit, ran = transactional
    conn = await psycopg.AsyncConnection.connect(postgres_server.url())
    async with conn, conn.transaction():
        job = await after_commit.using(connection=conn).submit_async(7)
    assert await asyncio.to_thread(job.result, WAIT) == 7
    assert ran == [7]


def test_flask_sqlalchemy_session_commit_carries_the_job(
    make_app: MakeApp, url: str, postgres_server: PostgresServer
) -> None:
    # The README's example: the order and its job commit together, or neither.
    class Base(DeclarativeBase):
        pass

    db = SQLAlchemy(model_class=Base)

    class Order(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "orders_sa"
        id: Mapped[int] = mapped_column(Integer, primary_key=True)

    app, bg = _worker(
        make_app,
        url,
        SQLALCHEMY_DATABASE_URI=postgres_server.url().replace("postgresql:", "postgresql+psycopg:"),
    )
    db.init_app(app)
    sent: list[int] = []

    @bg.task
    def send_confirmation(order_id: int) -> None:
        sent.append(order_id)

    bg.start()
    with app.app_context():
        db.create_all()
        db.session.add(Order(id=1))
        job = send_confirmation.using(connection=db.session).submit(1)
        db.session.commit()
        db.session.add(Order(id=2))
        lost = send_confirmation.using(connection=db.session).submit(2)
        db.session.rollback()
    assert job.wait(WAIT)
    assert job.status is JobStatus.SUCCEEDED
    assert bg.get_job(lost.id) is None
    assert sent == [1]


def test_a_transactional_submit_needs_a_backend_that_can(make_app: MakeApp, tmp_path: Any) -> None:
    _app, bg = make_app(ASYNCBG_BACKEND=f"sqlite:///{tmp_path / 'x.db'}")

    @bg.task
    def noop() -> None:  # pragma: no cover - never submitted
        pass

    bg.start()
    with pytest.raises(BackendError, match="cannot write a job in your transaction"):
        noop.using(connection=object()).submit()


def test_an_unknown_connection_is_a_type_error(
    transactional: tuple[AsyncBG, Any, list[int]],
) -> None:
    _bg, after_commit, _ran = transactional
    with pytest.raises(TypeError, match="takes a psycopg Connection, or a SQLAlchemy Session"):
        after_commit.using(connection=object()).submit(1)


async def test_finish_repeated_after_a_lost_acknowledgement_is_recognised(
    backend: PostgresBackend,
) -> None:
    await backend.enqueue([_job("j")])
    (claim,) = await backend.claim(["q"], "n1", 1, 30.0)
    outcome = Outcome("succeeded", "1")
    assert await backend.finish(claim, outcome)
    assert await backend.finish(claim, outcome)  # the same write again: its own
    assert not await backend.finish(claim, Outcome("failed", error="other"))


async def test_a_batch_carries_every_value_and_text_postgresql_cannot_hold(
    backend: PostgresBackend,
) -> None:
    # A batch travels as one JSON parameter: what JSON has no number for (an
    # infinite timeout), non-ASCII text, quotes and a NUL character, which a
    # text column refuses (an exception's message may hold one; its finish
    # must not fail forever) all arrive.
    odd = JobRecord(
        id="odd",
        queue="q",
        task="t",
        args_json='{"args":["é \\"x\\" \\\\ \\u0000"],"kwargs":{}}',
        key='k "é"',
        timeout=float("inf"),
        created_at=1_700_000_000.123456,
    )
    stored_both = await backend.enqueue([odd, _job("plain")])
    assert [r.id if r is not None else None for r in stored_both] == ["odd", "plain"]
    stored = await backend.get("odd")
    assert stored is not None
    assert (stored.args_json, stored.key, stored.timeout) == (odd.args_json, odd.key, odd.timeout)
    assert stored.created_at == odd.created_at
    claims = await backend.claim(["q"], "n1", 2, 30.0)
    assert sorted(c.id for c in claims) == ["odd", "plain"]
    assert sorted((await backend.renew(claims, 30.0)).kept) == ["odd", "plain"]
    outcomes = [(c, Outcome("failed", error="bad \x00 byte")) for c in claims]
    assert await backend.finish_many(outcomes) == [True, True]
    assert await backend.finish_many(outcomes) == [True, True]  # repeated: its own
    final = await backend.get("odd")
    assert final is not None
    assert final.status == "failed"
    assert final.error == "bad \\x00 byte"


def test_logging_names_the_listener_reconnect(
    make_app: MakeApp, url: str, postgres_server: PostgresServer, caplog: Any
) -> None:
    _app, bg = _worker(make_app, url)
    bg.start()
    with caplog.at_level(logging.INFO, logger="asyncbg"):
        postgres_server.psql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'asyncbg' AND query LIKE 'LISTEN%'"
        )
        wait_for(lambda: "listening on PostgreSQL" in caplog.text, timeout=WAIT, what="re-LISTEN")


async def test_a_claim_whose_answer_was_lost_is_taken_up_at_the_next_claim(
    backend: PostgresBackend, postgres_server: PostgresServer, pg_schema: str
) -> None:
    # The claim's commit landed but its connection broke before the answer
    # came: the rows are running as ours, unknown to the engine. The next
    # claim hands them out (lease renewed) instead of leaving them to their
    # lease. Made here by writing such a claim by hand and marking the lane
    # in doubt, as a claim that raised on a broken connection does (the
    # restart tests above make real ones, when the timing falls that way).
    await backend.enqueue([_job("a"), _job("b")])
    (held,) = await backend.claim(["q"], "me", 1, 30.0)
    postgres_server.psql(
        f"UPDATE {pg_schema}.jobs SET status = 'running', owner = 'me', token = token + 1, "
        f"attempts = attempts + 1, lease_until = extract(epoch from now()) + 30 "
        f"WHERE id <> '{held.id}'"
    )
    backend._in_doubt.add("q")  # what a claim that broke under its answer leaves
    (adopted,) = await backend.claim(["q"], "me", 5, 30.0)
    assert adopted.id != held.id
    assert adopted.token == 1
    assert await backend.finish(adopted, Outcome("succeeded", "1"))
    assert await backend.finish(held, Outcome("succeeded", "2"))
    assert await backend.claim(["q"], "me", 5, 30.0) == []
    assert not backend._in_doubt


async def test_jobs_an_enqueue_took_are_never_adopted_as_claims_in_doubt(
    backend: PostgresBackend,
) -> None:
    # An enqueue that takes its jobs (Take) stores them running as ours, like a
    # claim: they are handed out by it, so a later adoption of claims in doubt
    # (a claim that broke under its answer) must not hand them out again, or
    # the engine would run them twice. On the loop and from a view's thread.
    take = Take("me", 30.0, frozenset({"a", "t"}))
    (loop_taken,) = await backend.enqueue([_job("a")], take=take)
    assert loop_taken is not None
    assert loop_taken.status == "running"

    def from_thread() -> Any:
        future = backend.enqueue_from_thread([_job("t")], take=take)
        assert future is not None
        return future.result()

    (thread_taken,) = await asyncio.to_thread(from_thread)
    assert thread_taken is not None
    assert thread_taken.status == "running"
    await backend.enqueue([_job("p")])  # pending: the claim below takes it
    backend._in_doubt.add("q")  # what a claim that broke under its answer leaves
    claims = await backend.claim(["q"], "me", 5, 30.0)
    assert [c.id for c in claims] == ["p"]
    for record in (loop_taken, thread_taken):
        claim = Claim(record.id, "me", record.token, record)
        assert await backend.finish(claim, Outcome("succeeded", "1"))
    assert not backend._handed.keys() & {"a", "t"}  # finishing forgets them


async def test_jobs_an_enqueue_took_whose_answer_was_lost_are_adopted_by_the_next_claim(
    backend: PostgresBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The insert commits (autocommit), then the connection breaks before the
    # answer: both attempts. The submit fails, but the job is stored running
    # as ours; the next claim of its queue hands it out rather than leave it
    # to its lease.
    real_insert = backend._insert

    async def insert_then_break(conn: Any, records: Any, lease: float = 0.0) -> set[str]:
        await real_insert(conn, records, lease)
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(backend, "_insert", insert_then_break)
    with pytest.raises(BackendError, match="closed the connection"):
        await backend.enqueue([_job("a")], take=Take("me", 30.0, frozenset({"a"})))
    monkeypatch.undo()
    assert backend._in_doubt == {"q"}
    (adopted,) = await backend.claim(["q"], "me", 5, 30.0)
    assert (adopted.id, adopted.token) == ("a", 1)
    assert await backend.finish(adopted, Outcome("succeeded", "1"))


async def test_claimed_slots_fold_into_the_floor_and_the_table_stays_bounded(
    backend: PostgresBackend, postgres_server: PostgresServer, pg_schema: str
) -> None:
    # Slot numbers are grid times in milliseconds, as the periodic runner makes
    # them: 3,200 ticks of a 0.5 s schedule. Every 1024 claims, past 2 x 1024
    # rows the oldest fold into the lease's floor: still refused (claimed), no
    # longer stored; so the table never holds more than 3 x 1024.
    lease = await backend.acquire("s", "n1", 60.0)
    assert lease is not None
    first = 1_764_000_000_123  # an anchor at no round number of ms
    slots = [first + k * 500 for k in range(3200)]
    for slot in slots:
        assert await backend.claim_slot(lease, slot)
    rows = int(postgres_server.psql(f"SELECT count(*) FROM {pg_schema}.slots").strip())
    assert 1024 <= rows <= 3 * 1024
    assert not await backend.claim_slot(lease, slots[0])  # folded: below the floor
    assert not await backend.claim_slot(lease, slots[-1])
    assert await backend.claim_slot(lease, slots[-1] + 500)

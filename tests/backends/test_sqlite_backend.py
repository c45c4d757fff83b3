"""What only the SQLite backend promises: its URL, the file it keeps (WAL, the
settings, the refusals of a file it cannot use, the upgrade of an older
schema), its thread and its group commit, exclusivity between separate
connections and a separate process on one file, and the wake-ups between
them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

import asyncbg.backends._wake as wake_module
import asyncbg.backends.sqlite as sqlite_module
from asyncbg.backends import open_backend
from asyncbg.backends.sqlite import SQLiteBackend, filesystem_type, from_url
from asyncbg.engine.records import Claim, JobQuery, JobRecord, Outcome
from asyncbg.errors import BackendError, ConfigError

LONG = 30.0
WITHIN = 10.0
ROOT = Path(__file__).resolve().parents[2]
V1_SCHEMA = Path(__file__).with_name("sqlite_schema_v1.sql")


def job(job_id: str, **fields: object) -> JobRecord:
    return JobRecord(id=job_id, queue="q", task="t", **fields)  # type: ignore[arg-type]


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[SQLiteBackend, SQLiteBackend]]:
    """Two backends on one file: two connections, as two processes would have."""
    path = str(tmp_path / "shared.db")
    first, second = SQLiteBackend(path), SQLiteBackend(path)
    await first.open()
    await second.open()
    try:
        await first.migrate()
        await second.migrate()
        yield first, second
    finally:
        await first.close()
        await second.close()


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[SQLiteBackend]:
    made = SQLiteBackend(str(tmp_path / "a.db"))
    await made.open()
    try:
        await made.migrate()
        yield made
    finally:
        await made.close()


@contextlib.asynccontextmanager
async def held(backend: SQLiteBackend) -> AsyncIterator[Callable[[int], None]]:
    """Keep the backend's thread busy: calls made in the block queue up behind
    it and run when the block ends. Yields a check that exactly ``n`` calls
    are queued (the calls' tasks must have taken their first step)."""
    loop = asyncio.get_running_loop()
    entered: asyncio.Future[None] = loop.create_future()
    gate = threading.Event()

    def block() -> None:
        loop.call_soon_threadsafe(entered.set_result, None)
        gate.wait(WITHIN)

    blocker = asyncio.ensure_future(backend._run(block))
    await entered
    worker = backend._worker
    assert worker is not None

    def queued(n: int) -> None:
        assert worker._calls.qsize() == n

    try:
        yield queued
    finally:
        gate.set()
        await blocker


async def traced(backend: SQLiteBackend) -> list[str]:
    """Every statement the backend's connection runs from now on."""
    statements: list[str] = []

    def trace() -> None:
        assert backend._conn is not None
        backend._conn.set_trace_callback(statements.append)

    await backend._run(trace)
    return statements


def write_commits(statements: list[str]) -> int:
    """How many write transactions (``BEGIN IMMEDIATE``) ended in a ``COMMIT``."""
    commits, writing = 0, False
    for statement in statements:
        if statement.startswith("BEGIN"):
            writing = statement == "BEGIN IMMEDIATE"
        elif statement == "COMMIT" and writing:
            commits += 1
    return commits


async def drain(backend: SQLiteBackend, owner: str, limit: int = 7) -> list[Claim]:
    """Claim until nothing is left; bounded in rounds."""
    got: list[Claim] = []
    for _ in range(1000):
        claims = await backend.claim(["q"], owner, limit, LONG)
        if not claims:
            return got
        got.extend(claims)
    pytest.fail(f"{owner} still claiming after 1000 rounds")


# -- URLs ----------------------------------------------------------------------


def test_from_url_resolves_a_relative_path_in_the_instance_folder(tmp_path: Path) -> None:
    backend = from_url("sqlite:///sub/jobs.db", str(tmp_path / "instance"))
    assert backend.path == str(tmp_path / "instance" / "sub" / "jobs.db")
    assert (backend.scheme, backend.durable) == ("sqlite", True)
    assert (backend.synchronous, backend.busy_timeout) == ("FULL", 5000)


def test_from_url_takes_an_absolute_path_as_it_is(tmp_path: Path) -> None:
    backend = from_url(f"sqlite:///{tmp_path}/abs.db", "/elsewhere")
    assert backend.path == str(tmp_path / "abs.db")


def test_from_url_reads_the_options() -> None:
    backend = from_url("sqlite:///a.db?synchronous=normal&busy_timeout=250", "/i")
    assert (backend.synchronous, backend.busy_timeout) == ("NORMAL", 250)


def test_open_backend_finds_the_sqlite_module(tmp_path: Path) -> None:
    assert isinstance(open_backend("sqlite:///a.db", str(tmp_path)), SQLiteBackend)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite://host/a.db", "no host"),
        ("sqlite://", "name a database file"),
        ("sqlite:///", "name a database file"),
        ("sqlite:///:memory:", "not shared"),
        ("sqlite:///dir/", "name a database file"),
        ("sqlite:///a.db?mode=ro", "unknown option 'mode'"),
        ("sqlite:///a.db?synchronous=OFF", "OFF could lose"),
        ("sqlite:///a.db?busy_timeout=-1", "whole milliseconds"),
        ("sqlite:///a.db?busy_timeout=1.5", "whole milliseconds"),
        ("sqlite:///a.db?busy_timeout=1&busy_timeout=2", "given twice"),
        ("sqlite:///a.db?nonsense", "cannot read the options"),
    ],
)
def test_from_url_refuses_what_it_cannot_use(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_url(url, "/instance")


async def test_the_instance_folder_is_made_at_open_not_before(tmp_path: Path) -> None:
    instance = tmp_path / "instance"
    backend = from_url("sqlite:///deeper/jobs.db", str(instance))
    assert not instance.exists()
    await backend.open()
    try:
        await backend.migrate()
        assert (instance / "deeper" / "jobs.db").is_file()
    finally:
        await backend.close()


# -- the file and its settings -------------------------------------------------


@pytest.mark.parametrize(("option", "level"), [("FULL", 2), ("NORMAL", 1)])
async def test_the_file_is_in_wal_mode_with_the_settings_asked_for(
    tmp_path: Path, option: str, level: int
) -> None:
    path = tmp_path / "a.db"
    backend = from_url(f"sqlite:///{path}?synchronous={option}&busy_timeout=1234", "/i")
    await backend.open()
    try:
        await backend.migrate()

        def settings() -> tuple[object, ...]:
            conn = backend._conn
            assert conn is not None
            return (
                conn.execute("PRAGMA synchronous").fetchone()[0],
                conn.execute("PRAGMA busy_timeout").fetchone()[0],
                threading.current_thread().name,
                threading.current_thread().daemon,
            )

        assert await backend._run(settings) == (level, 1234, "asyncbg-sqlite", True)
        # Another connection sees WAL: it is the file's mode, not the connection's.
        with sqlite3.connect(path) as other:
            assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        await backend.close()


async def test_preflight_warns_of_synchronous_normal_only(tmp_path: Path) -> None:
    for option, expected in (("FULL", 0), ("NORMAL", 1)):
        backend = from_url(f"sqlite:///{tmp_path}/a.db?synchronous={option}", "/i")
        await backend.open()
        try:
            warnings = await backend.preflight()
        finally:
            await backend.close()
        assert len(warnings) == expected
    assert "power cut" in warnings[0]


async def test_preflight_refuses_a_network_filesystem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "filesystem_type", lambda path: "nfs4")
    backend = SQLiteBackend(str(tmp_path / "a.db"))
    await backend.open()
    try:
        with pytest.raises(BackendError, match=r"network filesystem \(nfs4\)"):
            await backend.preflight()
    finally:
        await backend.close()


def test_filesystem_type_takes_the_longest_mount_point() -> None:
    mounts = "/dev/vda / ext4 rw 0 0\nsrv:/x /mnt/my\\040share nfs4 rw 0 0\n"
    assert filesystem_type("/mnt/my share/db/a.db", mounts) == "nfs4"
    assert filesystem_type("/mnt/my shared/a.db", mounts) == "ext4"
    assert filesystem_type("/a.db", "") is None


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (99)")
    backend = SQLiteBackend(str(path))
    await backend.open()
    try:
        with pytest.raises(BackendError, match="schema version 99 is newer"):
            await backend.migrate()
    finally:
        await backend.close()


def _index_names(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()
    return {name for (name,) in rows}


async def test_a_version_1_file_is_upgraded_in_place(tmp_path: Path) -> None:
    # The schema as version 1 of this module wrote it (sqlite_schema_v1.sql is
    # a frozen copy of it, not this module's text).
    path = tmp_path / "v1.db"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.executescript(V1_SCHEMA.read_text())
        conn.execute("INSERT INTO schema_version (version) VALUES (1)")
    assert "jobs_pending" not in _index_names(path)
    backends = [SQLiteBackend(str(path)) for _ in range(2)]
    await asyncio.gather(*(b.open() for b in backends))
    try:
        first, second = backends
        # A version 1 file works before the upgrade, but for limits.
        await first.enqueue([job("old1"), job("old2")])
        # Two processes upgrading at once, twice: idempotent.
        await asyncio.gather(*(b.migrate() for b in backends))
        await asyncio.gather(*(b.migrate() for b in backends))
        stored = await second.enqueue([job("new"), job("refused")], limits={"q": 3})
        assert [None if r is None else r.id for r in stored] == ["new", None]
        assert (await first.query(JobQuery())).total == 3
    finally:
        await asyncio.gather(*(b.close() for b in backends))
    assert "jobs_pending" in _index_names(path)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(2,)]


async def test_a_new_file_and_an_upgraded_one_have_the_same_schema(tmp_path: Path) -> None:
    def schema(path: Path) -> list[tuple[str, str]]:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            rows = conn.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall()
        return [(str(name), str(sql)) for name, sql in rows]

    upgraded = tmp_path / "v1.db"
    with contextlib.closing(sqlite3.connect(upgraded, isolation_level=None)) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.executescript(V1_SCHEMA.read_text())
        conn.execute("INSERT INTO schema_version (version) VALUES (1)")
    for path in (upgraded, tmp_path / "new.db"):
        backend = SQLiteBackend(str(path))
        await backend.open()
        try:
            await backend.migrate()
        finally:
            await backend.close()
    assert schema(upgraded) == schema(tmp_path / "new.db")


async def test_the_limit_is_counted_through_the_pending_index(backend: SQLiteBackend) -> None:
    def plan(conn: sqlite3.Connection) -> list[str]:
        rows = conn.execute(
            """EXPLAIN QUERY PLAN SELECT count(*) FROM (SELECT 1 FROM jobs
            INDEXED BY jobs_pending WHERE queue = 'q' AND status = 'pending' LIMIT 5)"""
        ).fetchall()
        return [str(row[-1]) for row in rows]

    assert any("COVERING INDEX jobs_pending" in step for step in await backend._read(plan))


async def test_an_operation_before_open_or_after_close_is_refused(tmp_path: Path) -> None:
    backend = SQLiteBackend(str(tmp_path / "a.db"))
    with pytest.raises(BackendError, match="not open"):
        await backend.get("a")
    await backend.open()
    await backend.migrate()
    thread = await backend._run(threading.current_thread)
    await backend.close()
    await backend.close()
    thread.join(WITHIN)
    assert not thread.is_alive()
    with pytest.raises(BackendError, match="not open"):
        await backend.get("a")


# -- files it cannot use -------------------------------------------------------


async def test_a_directory_is_refused_at_open(tmp_path: Path) -> None:
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(BackendError, match="is a directory"):
        await SQLiteBackend(str(tmp_path / "dir.db")).open()


async def test_a_missing_folder_of_an_absolute_path_is_refused_at_open(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="cannot open it"):
        await SQLiteBackend(str(tmp_path / "nosuch" / "a.db")).open()


async def test_a_file_of_garbage_is_refused_at_open(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(os.urandom(64 * 1024))
    with pytest.raises(BackendError, match="not an SQLite database"):
        await SQLiteBackend(str(path)).open()


@pytest.fixture
def read_only_file(tmp_path: Path) -> Iterator[Path]:
    """An SQLite file this process cannot write: mode 0444, or, for root (who
    ignores modes), the immutable attribute, which binds root too."""
    path = tmp_path / "ro.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x)")
    if os.geteuid() != 0:
        path.chmod(0o444)
        yield path
        path.chmod(0o644)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(path)], check=False).returncode:
        pytest.skip("running as root, and chattr +i is not available to make a file read-only")
    try:
        yield path
    finally:
        subprocess.run([chattr, "-i", str(path)], check=True)


async def test_a_read_only_file_is_refused_at_open(read_only_file: Path) -> None:
    with pytest.raises(BackendError, match="read-only"):
        await SQLiteBackend(str(read_only_file)).open()


async def test_a_file_that_cannot_be_put_in_wal_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real SQLite refusal: the dot-file VFS has no shared memory, so the
    # journal mode stays what it was.
    path = tmp_path / "a.db"
    connect = sqlite3.connect
    monkeypatch.setattr(
        sqlite_module.sqlite3,
        "connect",
        lambda _path, **kw: connect(f"file:{path}?vfs=unix-dotfile", uri=True, **kw),
    )
    with pytest.raises(BackendError, match="journal mode 'delete', not WAL"):
        await SQLiteBackend(str(path)).open()


async def test_a_file_locked_by_another_connection_is_refused_after_the_busy_timeout(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a.db"
    with sqlite3.connect(path, isolation_level=None) as holder:
        holder.execute("CREATE TABLE t (x)")
        # A reader in rollback-journal mode keeps the file from switching to WAL.
        holder.execute("BEGIN")
        holder.execute("SELECT * FROM t").fetchall()
        with pytest.raises(BackendError, match="WAL mode: database is locked"):
            await SQLiteBackend(str(path), busy_timeout=50).open()
        holder.execute("COMMIT")


async def test_a_write_waiting_for_another_writer_does_not_block_the_loop(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "a.db")
    backend = SQLiteBackend(path, busy_timeout=300)
    await backend.open()
    try:
        await backend.migrate()
        with sqlite3.connect(path, isolation_level=None) as holder:
            holder.execute("BEGIN IMMEDIATE")
            ticks = 0
            enqueue = asyncio.ensure_future(backend.enqueue([job("a")]))
            while not enqueue.done() and ticks < 100_000:
                ticks += 1
                await asyncio.sleep(0.001)
            holder.execute("ROLLBACK")
        with pytest.raises(BackendError, match="database is locked"):
            await enqueue
        # The loop went on turning for the whole 300 ms the write waited.
        assert ticks >= 50
        assert await backend.get("a") is None
    finally:
        await backend.close()


# -- group commit ---------------------------------------------------------------


async def test_writes_queued_together_share_one_commit(backend: SQLiteBackend) -> None:
    statements = await traced(backend)
    async with held(backend) as queued:
        writes = [asyncio.ensure_future(backend.enqueue([job(f"j{i:02}")])) for i in range(64)]
        # A read queued behind the writes sees every one of them.
        read = asyncio.ensure_future(backend.query(JobQuery(limit=100)))
        await asyncio.sleep(0)  # one loop turn: every task queues its call
        queued(65)
    stored = await asyncio.gather(*writes)
    assert [[r.id for r in s if r] for s in stored] == [[f"j{i:02}"] for i in range(64)]
    assert (await read).total == 64
    assert write_commits(statements) == 1
    # None of them raised: no savepoint each (two statements fewer a call).
    assert "SAVEPOINT call" not in statements


async def test_concurrent_enqueues_in_one_loop_turn_take_fewer_commits(
    backend: SQLiteBackend,
) -> None:
    statements = await traced(backend)
    n = 64
    await asyncio.gather(*(backend.enqueue([job(f"j{i:02}")]) for i in range(n)))
    assert (await backend.query(JobQuery())).total == n
    assert 1 <= write_commits(statements) < n


async def test_without_coalescing_every_write_is_its_own_commit(tmp_path: Path) -> None:
    backend = SQLiteBackend(str(tmp_path / "a.db"), _coalesce=False)
    await backend.open()
    try:
        await backend.migrate()
        statements = await traced(backend)
        async with held(backend) as queued:
            writes = asyncio.gather(*(backend.enqueue([job(f"j{i}")]) for i in range(8)))
            await asyncio.sleep(0)
            queued(8)
        await writes
        assert write_commits(statements) == 8
        assert "SAVEPOINT call" not in statements
    finally:
        await backend.close()


async def test_a_failing_call_in_a_group_rolls_back_only_itself(backend: SQLiteBackend) -> None:
    statements = await traced(backend)

    def insert_then_raise(conn: sqlite3.Connection, now: float) -> None:
        conn.execute("UPDATE counters SET value = -1 WHERE name = 'beat'")
        raise ValueError("the call's own failure")

    def bad_sql(conn: sqlite3.Connection, now: float) -> None:
        conn.execute("UPDATE counters SET value = -2 WHERE name = 'beat'")
        conn.execute("INSERT INTO nosuch VALUES (1)")

    async with held(backend) as queued:
        calls = [
            asyncio.ensure_future(backend.enqueue([job("a")])),
            asyncio.ensure_future(backend._write(insert_then_raise)),
            asyncio.ensure_future(backend._write(bad_sql)),
            asyncio.ensure_future(backend.enqueue([job("b")])),
        ]
        await asyncio.sleep(0)
        queued(4)
    a, raised, failed, b = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(raised, ValueError)
    assert isinstance(failed, BackendError)
    assert "no such table: nosuch" in str(failed)
    assert [r.id for r in (await backend.query(JobQuery())).records] == ["b", "a"]
    assert isinstance(a, list)
    assert isinstance(b, list)
    assert [[r.id for r in s if r] for s in (a, b)] == [["a"], ["b"]]
    beat = await backend._read(
        lambda conn: conn.execute("SELECT value FROM counters WHERE name = 'beat'").fetchone()
    )
    assert beat == (0,)
    assert write_commits(statements) == 1
    # Run together first, then (once one raised) again, each in its savepoint.
    assert statements.count("SAVEPOINT call") == 4
    assert statements.count("BEGIN IMMEDIATE") == 2


async def test_a_failed_commit_fails_every_call_of_the_group(backend: SQLiteBackend) -> None:
    # A deferred foreign key is checked at COMMIT: a real failure of the commit itself.
    def foreign_keys_on() -> None:
        assert backend._conn is not None
        backend._conn.execute("PRAGMA foreign_keys = ON")

    await backend._run(foreign_keys_on)
    await backend._write(
        lambda conn, now: conn.execute(
            """CREATE TABLE child (parent TEXT
            REFERENCES jobs (id) DEFERRABLE INITIALLY DEFERRED)"""
        )
    )

    def orphan(conn: sqlite3.Connection, now: float) -> None:
        conn.execute("INSERT INTO child VALUES ('nosuch')")

    async with held(backend) as queued:
        calls = [
            asyncio.ensure_future(backend.enqueue([job("a")])),
            asyncio.ensure_future(backend._write(orphan)),
        ]
        await asyncio.sleep(0)
        queued(2)
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        assert isinstance(result, BackendError)
        assert "FOREIGN KEY constraint failed" in str(result)
    assert await backend.get("a") is None
    # The transaction was rolled back: the next write commits on its own.
    [b] = await backend.enqueue([job("b")])
    assert await backend.get("b") == b


async def test_a_group_reads_the_clock_once_after_taking_the_write_lock(
    backend: SQLiteBackend,
) -> None:
    async with held(backend) as queued:
        calls = asyncio.gather(*(backend._write(lambda conn, now: now) for _ in range(3)))
        await asyncio.sleep(0)
        queued(3)
        before = time.time()
    nows = await calls
    assert len(set(nows)) == 1
    assert nows[0] >= before


# -- many connections, many processes -------------------------------------------


async def test_two_backends_migrating_one_new_file_at_once(tmp_path: Path) -> None:
    for attempt in range(5):
        path = str(tmp_path / f"new{attempt}.db")
        backends = [SQLiteBackend(path) for _ in range(2)]
        await asyncio.gather(*(b.open() for b in backends))
        try:
            await asyncio.gather(*(b.migrate() for b in backends))
            await asyncio.gather(*(b.migrate() for b in backends))
        finally:
            await asyncio.gather(*(b.close() for b in backends))
        with sqlite3.connect(path) as conn:
            assert conn.execute("SELECT version FROM schema_version").fetchall() == [
                (sqlite_module.SCHEMA_VERSION,)
            ]


async def test_claims_are_exclusive_across_two_connections(
    pair: tuple[SQLiteBackend, SQLiteBackend],
) -> None:
    first, second = pair
    ids = [f"j{i:03}" for i in range(200)]
    await first.enqueue([job(i) for i in ids])
    per_owner = await asyncio.gather(drain(first, "n1"), drain(second, "n2"))
    claimed = sorted(c.id for claims in per_owner for c in claims)
    assert claimed == ids
    assert {c.token for claims in per_owner for c in claims} == {1}


async def test_a_wait_sees_a_finish_written_by_another_connection(
    pair: tuple[SQLiteBackend, SQLiteBackend],
) -> None:
    first, second = pair
    await first.enqueue([job("a")])
    [claim] = await second.claim(["q"], "n2", 1, LONG)
    waiter = asyncio.ensure_future(first.wait(["a"], WITHIN))
    assert await second.finish(claim, Outcome("succeeded", "1"))
    started = time.monotonic()
    [record] = await waiter
    assert record.status == "succeeded"
    assert time.monotonic() - started < WITHIN / 2


async def test_an_active_key_is_unique_across_connections(
    pair: tuple[SQLiteBackend, SQLiteBackend],
) -> None:
    first, second = pair
    stored = await asyncio.gather(
        *(b.enqueue([job(f"{i}", key="k")]) for i, b in enumerate(pair * 10))
    )
    assert {len(s) for s in stored} == {1}
    assert len({r.id for s in stored for r in s if r}) == 1
    assert (await first.query(JobQuery())).total == (await second.query(JobQuery())).total == 1


_CLAIMER = textwrap.dedent(
    """
    import asyncio, json, sys
    from asyncbg.backends.sqlite import SQLiteBackend

    async def main():
        backend = SQLiteBackend(sys.argv[1])
        await backend.open()
        await backend.migrate()
        print("ready", flush=True)
        sys.stdin.readline()  # go
        got = []
        for _ in range(1000):
            claims = await backend.claim(["q"], "other-process", 5, 30.0)
            if not claims:
                break
            got.extend(c.id for c in claims)
        await backend.close()
        print(json.dumps(got), flush=True)

    asyncio.run(main())
    """
)


async def test_claims_are_exclusive_across_processes(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.db")
    backend = SQLiteBackend(path)
    await backend.open()
    try:
        await backend.migrate()
        ids = [f"j{i:03}" for i in range(200)]
        await backend.enqueue([job(i) for i in ids])
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CLAIMER,
            path,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert child.stdin is not None
        assert child.stdout is not None
        try:
            ready = await asyncio.wait_for(child.stdout.readline(), WITHIN)
            assert ready == b"ready\n"
            child.stdin.write(b"go\n")
            await child.stdin.drain()
            mine = await drain(backend, "this-process", limit=5)
            line = await asyncio.wait_for(child.stdout.readline(), WITHIN)
            assert await asyncio.wait_for(child.wait(), WITHIN) == 0
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
        theirs: list[str] = json.loads(line)
        assert sorted([c.id for c in mine] + theirs) == ids
    finally:
        await backend.close()


# -- wake-ups between processes ------------------------------------------------


class Woken:
    """An ``on_new_work`` callback that counts its calls; ``wait`` for the next."""

    def __init__(self, backend: SQLiteBackend) -> None:
        self.calls = 0
        self.at: float | None = None
        self._event = asyncio.Event()
        backend.on_new_work(self)

    def __call__(self) -> None:
        self.calls += 1
        self.at = time.perf_counter()
        self._event.set()

    async def wait(self) -> None:
        async with asyncio.timeout(WITHIN):
            await self._event.wait()
        self._event.clear()


def exists(path: str) -> bool:
    return os.path.exists(path)


def pending_datagram(backend: SQLiteBackend) -> bool:
    """Whether a datagram waits unread on the backend's wake-up socket."""
    assert backend._wake is not None
    readable, _, _ = select.select([backend._wake.fileno()], [], [], 0)
    return bool(readable)


def not_told(backend: SQLiteBackend, woken: Woken, calls: int) -> bool:
    """Nothing was sent to ``backend``: its callback did not run again and no
    datagram waits. Sends happen before the sender's future resolves, so this
    holds as soon as the sender's call has returned."""
    return woken.calls == calls and not pending_datagram(backend)


async def test_an_enqueue_wakes_the_other_backend_on_the_file_not_itself(
    pair: tuple[SQLiteBackend, SQLiteBackend],
) -> None:
    first, second = pair
    assert first.wakes_other_processes
    assert second.wakes_other_processes
    woken_first, woken_second = Woken(first), Woken(second)
    await first.enqueue([job("a")])
    await woken_second.wait()
    assert woken_second.calls == 1
    assert not_told(first, woken_first, 0)
    # And the other way round.
    await second.enqueue([job("b")])
    await woken_first.wait()
    assert not_told(second, woken_second, 1)


Operation = Callable[[SQLiteBackend, Claim], Awaitable[object]]
OPERATIONS: dict[str, tuple[bool, Operation]] = {
    "enqueue of a new record": (True, lambda b, claim: b.enqueue([job("new")])),
    "enqueue of a known id": (False, lambda b, claim: b.enqueue([job("a")])),
    "enqueue refused by a limit": (False, lambda b, claim: b.enqueue([job("x")], limits={"q": 0})),
    "retry": (True, lambda b, claim: b.retry(claim, time.time(), "again")),
    "release": (True, lambda b, claim: b.release([claim])),
    "finish": (False, lambda b, claim: b.finish(claim, Outcome("succeeded", "1"))),
    "claim": (False, lambda b, claim: b.claim(["q"], "n1", 1, LONG)),
    "cancel": (False, lambda b, claim: b.cancel("a")),
}


@pytest.mark.parametrize("operation", OPERATIONS)
async def test_what_wakes_the_others(
    pair: tuple[SQLiteBackend, SQLiteBackend], operation: str
) -> None:
    first, second = pair
    await first.enqueue([job("a", max_attempts=3), job("b")])
    [claim] = await first.claim(["q"], "n1", 1, LONG)
    woken = Woken(second)
    wakes, call = OPERATIONS[operation]
    await call(first, claim)
    if wakes:
        await woken.wait()
        assert woken.calls == 1
    else:
        assert not_told(second, woken, 0)


async def test_datagrams_read_together_make_one_call(
    pair: tuple[SQLiteBackend, SQLiteBackend],
) -> None:
    first, second = pair
    woken = Woken(second)
    assert first._wake is not None
    # Three sends with no loop turn between them: three datagrams wait together.
    assert [first._wake.notify() for _ in range(3)] == [1, 1, 1]
    await woken.wait()
    assert woken.calls == 1
    assert not pending_datagram(second)


async def test_a_failing_callback_is_logged_and_the_others_still_run(
    pair: tuple[SQLiteBackend, SQLiteBackend], caplog: pytest.LogCaptureFixture
) -> None:
    first, second = pair

    def broken() -> None:
        raise RuntimeError("boom")

    second.on_new_work(broken)
    woken = Woken(second)
    await first.enqueue([job("a")])
    await woken.wait()
    assert "on_new_work callback" in caplog.text
    assert "boom" in caplog.text


_ENQUEUER = textwrap.dedent(
    """
    import asyncio, sys
    from asyncbg.backends.sqlite import SQLiteBackend
    from asyncbg.engine.records import JobRecord

    async def main():
        backend = SQLiteBackend(sys.argv[1])
        await backend.open()
        await backend.migrate()
        print("ready", flush=True)
        sys.stdin.readline()  # go
        await backend.enqueue([JobRecord(id="from-child", queue="q", task="t")])
        await backend.close()
        print("done", flush=True)

    asyncio.run(main())
    """
)


async def test_an_enqueue_in_another_process_wakes_this_one(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.db")
    backend = SQLiteBackend(path)
    await backend.open()
    try:
        await backend.migrate()
        woken = Woken(backend)
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _ENQUEUER,
            path,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert child.stdin is not None
        assert child.stdout is not None
        try:
            assert await asyncio.wait_for(child.stdout.readline(), WITHIN) == b"ready\n"
            assert woken.calls == 0
            child.stdin.write(b"go\n")
            await child.stdin.drain()
            await woken.wait()
            assert await asyncio.wait_for(child.stdout.readline(), WITHIN) == b"done\n"
            assert await asyncio.wait_for(child.wait(), WITHIN) == 0
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
        assert await backend.get("from-child") is not None
        # The child removed its own socket at close: only ours is left.
        assert backend._wake is not None
        assert os.listdir(backend._wake.folder) == [backend._wake.name]
    finally:
        await backend.close()


async def test_the_socket_lives_in_a_private_folder_named_after_the_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a.db"
    backend = SQLiteBackend(str(path))
    await backend.open()
    try:
        # Another path to the same file names the same folder.
        (tmp_path / "link.db").symlink_to(path)
        assert wake_module.wake_folder(str(tmp_path / "link.db")) == wake_module.wake_folder(
            str(path)
        )
        channel = backend._wake
        assert channel is not None
        assert channel.folder == wake_module.wake_folder(str(path))
        assert os.path.dirname(channel.folder) == wake_module.wake_root()
        assert os.stat(channel.folder).st_mode & 0o777 == 0o700
        assert channel.name.startswith(f"{os.getpid()}-")
        assert len(os.fsencode(channel.path)) <= 100
        assert exists(channel.path)
    finally:
        await backend.close()


async def test_close_removes_the_socket_and_the_empty_folder(
    pair: tuple[SQLiteBackend, SQLiteBackend],
) -> None:
    first, second = pair
    assert first._wake is not None
    assert second._wake is not None
    first_channel, second_channel = first._wake, second._wake
    await first.close()
    assert first._wake is None
    assert first_channel.fileno() == -1
    assert not exists(first_channel.path)
    assert os.listdir(second_channel.folder) == [second_channel.name]
    await second.close()
    assert not exists(second_channel.folder)


async def test_a_socket_whose_owner_died_is_removed(
    pair: tuple[SQLiteBackend, SQLiteBackend],
) -> None:
    first, second = pair
    assert first._wake is not None
    # A socket file nobody is bound to any more, as a killed process leaves it.
    dead = os.path.join(first._wake.folder, "999999-deadbeef.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as gone:
        gone.bind(dead)
    assert exists(dead)
    woken = Woken(second)
    await first.enqueue([job("a")])
    assert not exists(dead)
    await woken.wait()


async def test_a_peer_that_does_not_read_never_blocks_a_commit(
    pair: tuple[SQLiteBackend, SQLiteBackend],
) -> None:
    first, second = pair
    assert first._wake is not None
    # A bound socket nobody reads, its queue full: a send to it gets EAGAIN.
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as stuck,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler,
    ):
        stuck.bind(os.path.join(first._wake.folder, "999999-stuck.sock"))
        try:
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                for _ in range(100_000):
                    filler.sendto(b"w", stuck.getsockname())
            woken = Woken(second)
            async with asyncio.timeout(WITHIN):
                await first.enqueue([job("a")])
            # The others are still told, and the stuck one is left alone.
            await woken.wait()
            assert exists(stuck.getsockname())
        finally:
            os.unlink(stuck.getsockname())


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A folder with a short path (pytest's are too long for a socket path)."""
    folder = tempfile.mkdtemp(prefix="abg")
    try:
        yield Path(folder)
    finally:
        shutil.rmtree(folder)


def _blocked_root(short: Path, database: Path) -> str:
    (short / "a-file").write_text("not a folder")
    return str(short / "a-file")


def _open_folder(short: Path, database: Path) -> str:
    # The folder is there, but others may enter it.
    folder = short / os.path.basename(wake_module.wake_folder(str(database)))
    folder.mkdir()
    folder.chmod(0o755)
    return str(short)


def _long_root(short: Path, database: Path) -> str:
    root = short / ("x" * 100)
    root.mkdir()
    return str(root)


@pytest.mark.parametrize(
    ("root", "reason"),
    [
        (_blocked_root, "cannot create it"),
        (_open_folder, "others may enter it"),
        (_long_root, "over 100 bytes"),
    ],
)
async def test_without_a_usable_folder_the_backend_opens_without_wake_ups(
    tmp_path: Path,
    short_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    root: Callable[[Path, Path], str],
    reason: str,
) -> None:
    where = root(short_tmp, tmp_path / "a.db")
    monkeypatch.setattr(wake_module, "wake_root", lambda: where)
    backend = SQLiteBackend(str(tmp_path / "a.db"))
    backend.on_new_work(lambda: None)
    with caplog.at_level(logging.WARNING, logger="asyncbg"):
        await backend.open()
    try:
        assert "no wake-ups between processes" in caplog.text
        assert reason in caplog.text
        assert backend._wake is None
        assert not backend.wakes_other_processes
        assert SQLiteBackend.wakes_other_processes
        await backend.migrate()
        assert await backend.enqueue([job("a")]) != [None]
    finally:
        await backend.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
async def test_a_forked_child_closing_its_copy_leaves_the_parents_socket_alone(
    pair: tuple[SQLiteBackend, SQLiteBackend],
) -> None:
    first, second = pair
    channel = first._wake
    assert channel is not None
    woken = Woken(first)
    with warnings.catch_warnings():
        # 3.12+ warns that forking a multi-threaded process is risky: the child
        # here only closes a socket and leaves with os._exit.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: close the inherited copy, nothing else
        try:
            channel.close()
        finally:
            os._exit(0)
    _, status = await asyncio.to_thread(os.waitpid, pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The socket file is still there, and the loop still watches the socket
    # (the child did not take it out of the epoll set it shares with us).
    assert exists(channel.path)
    await second.enqueue([job("a")])
    await woken.wait()


async def test_claims_and_renewals_do_not_wait_for_the_disk_but_enqueues_do(
    backend: SQLiteBackend,
) -> None:
    # FULL by default: an acknowledged enqueue (or outcome) is synced; a group
    # of claims and renewals alone is committed as NORMAL (lost in a power cut,
    # its jobs just run again), and the next strict group puts FULL back first.
    assert backend.synchronous == "FULL"
    statements = await traced(backend)
    await backend.enqueue([JobRecord(id="j", queue="q", task="t")])
    assert not any("synchronous" in s for s in statements)
    claims = await backend.claim(["q"], "n1", 1, LONG)
    await backend.renew(claims, LONG)
    relaxed = [s for s in statements if "synchronous" in s]
    assert relaxed == ["PRAGMA synchronous = NORMAL"]  # once for both
    statements.clear()
    assert await backend.finish(claims[0], Outcome("succeeded", "null"))
    assert statements[:2] == ["PRAGMA synchronous = FULL", "BEGIN IMMEDIATE"]
    assert statements[-1] == "COMMIT"
    statements.clear()
    await backend.enqueue([JobRecord(id="k", queue="q", task="t")])
    assert not any("synchronous" in s for s in statements)

    def setting(conn: sqlite3.Connection) -> int:
        return int(conn.execute("PRAGMA synchronous").fetchone()[0])

    assert await backend._read(setting) == 2  # FULL again

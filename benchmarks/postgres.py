"""8. Durable on many hosts: the PostgreSQL backend (issue 12), against
procrastinate, SAQ's Postgres queue and one statement per job, on one server.

One PostgreSQL server for the whole run: a throw-away one started here
(``tests/servers.py``: initdb in a temporary folder, a free loopback port,
``fsync=on``, ``synchronous_commit=on``, stopped by PID at the end), or the
server named by ``ASYNCBG_BENCH_PG_URL`` (a ``postgresql://`` URL of a role
that may create databases). Every subject gets a fresh database per trial,
dropped after.

Every "host" is its own OS process (``python -m benchmarks.postgres host KIND
URL ROLE``, driven by ``fleet.py``, which says what is measured: the submit
call, submit-to-start in the same process and from another host process,
jobs/s from 1 and 4 threads on 1 and 3 hosts, CPU and WAL per job). asyncbg:
a Flask app with ``ASYNCBG_BACKEND`` set and one ``@bg.task``; the others:
their worker on an asyncio loop thread, as a Flask app would embed it.

Subjects: asyncbg on ``postgresql://...`` (its defaults); procrastinate 3
(``App(connector=PsycopgConnector(...))``: a sync-opened app for ``defer``
from the submitting threads, as procrastinate's docs show for sync code, and
an async-opened one running the worker on the loop thread, LISTEN/NOTIFY on);
SAQ's ``PostgresQueue`` (``enqueue`` from the threads onto the loop thread
that runs its ``Worker``, LISTEN/NOTIFY on); and one statement per job with
psycopg: an INSERT and a COMMIT per submit, consumer threads each claiming
one row per statement (``UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP
LOCKED LIMIT 1) RETURNING``), committing, running the job, then one UPDATE
and COMMIT to complete it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from . import fleet
from .fleet import CONCURRENCY, TALLY, TASK, LoopThread, LoopWorkerHost, Submit, ctx_stamp, stamp
from .harness import Mode, Section

ROOT = Path(__file__).resolve().parent.parent
URL_ENV = "ASYNCBG_BENCH_PG_URL"
#: A JSON object of config keys for asyncbg's hosts instead of its defaults
#: (``'{"ASYNCBG_POOL_SIZE": 8}'``), to see what a setting buys; noted in the run.
CONFIG_ENV = "ASYNCBG_BENCH_PG_CONFIG"

ASYNCBG = "asyncbg postgresql"
PROCRASTINATE = "procrastinate"
SAQ = "SAQ PostgresQueue"
BARE = "one statement per job"

#: Consumer threads per host of the one-statement-per-job baseline, and how long
#: one sleeps after finding nothing (4 threads: a look every 1.25 ms on average).
BARE_CONSUMERS = 4
BARE_POLL = 0.005


# ----------------------------------------------------------- the subjects


class _AsyncBGHost(fleet.AsyncBGHost):
    """A Flask app with asyncbg on the PostgreSQL backend and the task."""

    config_env = CONFIG_ENV
    keys = (
        "ASYNCBG_POLL_INTERVAL",
        "ASYNCBG_WORKER_CONCURRENCY",
        "ASYNCBG_POOL_SIZE",
        "ASYNCBG_STATEMENT_TIMEOUT",
        "ASYNCBG_LEASE",
    )


class _ProcrastinateHost:
    """procrastinate: ``defer`` from the threads through a sync-opened app; the
    worker on a loop thread through an async-opened one (the same task)."""

    def __init__(self, url: str, run: bool) -> None:
        import procrastinate

        self.defer_app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))
        task = self.defer_app.task(name=TASK)(stamp)
        self.defer_app.open()
        self.submit: Submit = lambda gen, i, sent: task.defer(gen=gen, i=i, sent=sent)
        self.lt: LoopThread | None = None
        self.worker: Any = None
        if run:
            self.lt = LoopThread("procrastinate-loop")
            self.work_app = procrastinate.App(
                connector=procrastinate.PsycopgConnector(conninfo=url)
            )
            self.work_app.task(name=TASK)(stamp)

            async def start() -> Any:
                await self.work_app.open_async()
                return asyncio.ensure_future(
                    self.work_app.run_worker_async(
                        concurrency=CONCURRENCY, install_signal_handlers=False, wait=True
                    )
                )

            self.worker = self.lt.call(start())

    def make_submit(self) -> Submit:
        return self.submit

    def settings(self) -> dict[str, Any]:
        return {"concurrency": CONCURRENCY}

    def close(self) -> None:
        try:
            if self.lt is not None:

                async def stop() -> None:
                    self.worker.cancel()  # procrastinate's graceful stop
                    with contextlib.suppress(asyncio.CancelledError):
                        await self.worker
                    await self.work_app.close_async()

                self.lt.call(stop(), 30)
                self.lt.close()
        finally:
            self.defer_app.close()


class _SaqHost(LoopWorkerHost):
    """SAQ's PostgresQueue and Worker on a loop thread; ``enqueue`` from the threads."""

    def __init__(self, url: str, run: bool) -> None:
        from saq import Worker
        from saq.queue.postgres import PostgresQueue

        self.lt = LoopThread("saq-loop")
        self.queue = PostgresQueue.from_url(url)
        self.lt.call(self.queue.connect())
        self.worker: Any = None
        if run:
            self.worker = Worker(self.queue, [(TASK, ctx_stamp)], concurrency=CONCURRENCY)
            self.worker.SIGNALS = []  # its loop is not the main thread's: no handlers
            self.start_worker(self.worker.start)
        self.bind(lambda **kw: self.queue.enqueue(TASK, **kw))

    async def stop(self) -> None:
        if self.worker is not None:
            await self.worker.stop()
        await self.queue.disconnect()


BARE_SCHEMA = (
    "CREATE TABLE bench_jobs (id bigserial PRIMARY KEY, task text NOT NULL, "
    "args jsonb NOT NULL, status text NOT NULL DEFAULT 'queued', "
    "created_at timestamptz NOT NULL DEFAULT now(), finished_at timestamptz)",
    "CREATE INDEX bench_jobs_queued ON bench_jobs (id) WHERE status = 'queued'",
)
BARE_INSERT = "INSERT INTO bench_jobs (task, args) VALUES (%s, %s)"
BARE_CLAIM = (
    "UPDATE bench_jobs SET status = 'running' WHERE id = (SELECT id FROM bench_jobs "
    "WHERE status = 'queued' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id, args"
)
BARE_FINISH = "UPDATE bench_jobs SET status = 'done', finished_at = now() WHERE id = %s"


class _BareHost:
    """psycopg, one statement and one commit per step: an INSERT per submit (a
    connection per submitting thread); consumer threads claim one row each."""

    def __init__(self, url: str, run: bool) -> None:
        self.url = url
        self.conns: list[Any] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.consumers: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self.submit = self.make_submit()
        if run:
            for k in range(BARE_CONSUMERS):
                conn = self._connect()
                t = threading.Thread(
                    target=self._consume, args=(conn,), name=f"bare-consumer-{k}", daemon=True
                )
                t.start()
                self.consumers.append(t)

    def _connect(self) -> Any:
        import psycopg

        conn = psycopg.connect(self.url)
        with self.lock:
            self.conns.append(conn)
        return conn

    def make_submit(self) -> Submit:
        conn = self._connect()

        def insert(gen: int, i: int, sent: float) -> None:
            conn.execute(BARE_INSERT, (TASK, json.dumps([gen, i, sent])))
            conn.commit()

        return insert

    def _consume(self, conn: Any) -> None:
        try:
            while not self.stopping.is_set():
                row = conn.execute(BARE_CLAIM).fetchone()
                conn.commit()
                if row is None:
                    self.stopping.wait(BARE_POLL)
                    continue
                job_id, (gen, i, sent) = row
                TALLY.hit(gen, i, sent)
                conn.execute(BARE_FINISH, (job_id,))
                conn.commit()
        except BaseException as e:
            if not self.stopping.is_set():
                self.errors.append(e)
                raise

    def settings(self) -> dict[str, Any]:
        return {"consumers": BARE_CONSUMERS, "poll": BARE_POLL}

    def close(self) -> None:
        self.stopping.set()
        for t in self.consumers:
            t.join(10)
        with self.lock:
            for conn in self.conns:
                with contextlib.suppress(Exception):
                    conn.close()


HOST_CLASSES: dict[str, Callable[[str, bool], Any]] = {
    "asyncbg": _AsyncBGHost,
    "procrastinate": _ProcrastinateHost,
    "saq": _SaqHost,
    "bare": _BareHost,
}


def prepare(kind: str, url: str) -> None:
    """Create the subject's tables in a fresh database, before any host starts
    (asyncbg migrates itself, under a transaction-scoped advisory lock)."""
    if kind == "bare":
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            for sql in BARE_SCHEMA:
                conn.execute(sql)
    elif kind == "procrastinate":
        import procrastinate

        app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))
        with app.open():
            app.schema_manager.apply_schema()
    elif kind == "saq":
        # SAQ migrates at connect, but a second process connecting meanwhile
        # skips the migration (a try-lock) and runs on without the tables.
        from saq.queue.postgres import PostgresQueue

        async def migrate() -> None:
            q = PostgresQueue.from_url(url, min_size=1, max_size=1)
            await q.connect()
            await q.disconnect()

        asyncio.run(migrate())


# ------------------------------------------------------------ the server


class _Server:
    """The run's PostgreSQL: databases made and dropped through an admin URL."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.postmaster = self._postmaster()

    def _postmaster(self) -> int | None:
        """The server's postmaster PID when it runs on this machine (a loopback
        or socket URL, its backend's parent named postgres), else None."""
        import psycopg

        host = urlsplit(self.admin_url).hostname or ""
        if host not in ("", "localhost", "127.0.0.1", "::1") and not host.startswith("/"):
            return None
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
        try:
            with open(f"/proc/{row[0] if row else 0}/stat") as f:
                stat = f.read()
            ppid = int(stat.rpartition(")")[2].split()[1])
            with open(f"/proc/{ppid}/comm") as f:
                name = f.read().strip()
        except (OSError, ValueError, IndexError):
            return None
        return ppid if name.startswith("postgres") else None

    def log_bytes(self) -> int:
        """The server's current WAL position, in bytes."""
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            row = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
            return int(row[0]) if row else 0

    def pids(self) -> list[int]:
        """The postmaster and its children (backends, WAL writer, checkpointer...)."""
        return [] if self.postmaster is None else fleet.children(self.postmaster)

    def url(self, database: str) -> str:
        parts = urlsplit(self.admin_url)
        return urlunsplit(parts._replace(path="/" + database))

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(sql)

    @contextlib.contextmanager
    def database(self, prefix: str) -> Iterator[str]:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        self._admin(f'CREATE DATABASE "{name}"')
        try:
            yield self.url(name)
        finally:
            # the hosts are gone; WITH (FORCE) ends any straggling session
            with contextlib.suppress(Exception):
                self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def version(self) -> str:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            return str(row[0]) if row else "?"


def _notes(sec: Section, unavailable: str | None, version: str, missing: list[str]) -> None:
    fleet.asyncbg_note(SPEC, sec, unavailable, CONFIG_ENV)
    for name in missing:
        sec.notes.append(f"{name} is not installed: no {name} rows (pip install 'asyncbg[bench]')")
    versions = [f"PostgreSQL {version} (fsync on, synchronous_commit on)"]
    for dist in ("procrastinate", "saq", "psycopg"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version as dist_version

            versions.append(f"{dist} {dist_version(dist)}")
    sec.notes.append(
        ", ".join(versions) + f"; every host is its own process; procrastinate and SAQ run "
        f"their worker with concurrency {CONCURRENCY} (asyncbg's default), LISTEN/NOTIFY on; "
        f"one statement per job: {BARE_CONSUMERS} consumer threads per host, each sleeping "
        f"{BARE_POLL * 1e3:.0f} ms after an empty claim; a job counts when its first line "
        "runs; jobs/s ratios are to the faster of procrastinate and SAQ in the same group; "
        "CPU per job: user + system time of the host processes and of the server's "
        "processes over the measurement, from /proc (clock ticks: coarse on short runs); "
        "WAL per job: the server's WAL position moved over the measurement, per job"
    )


@contextlib.contextmanager
def _server() -> Iterator[_Server]:
    url = os.environ.get(URL_ENV)
    if url:
        yield _Server(url)
        return
    sys.path.insert(0, str(ROOT))  # tests/servers.py, when run from elsewhere
    from tests.servers import PostgresServer

    pg = PostgresServer()
    try:
        pg.start()
        yield _Server(pg.url("postgres"))
    finally:
        pg.cleanup()


SPEC = fleet.Spec(
    section="postgres",
    module="benchmarks.postgres",
    subjects={ASYNCBG: "asyncbg", PROCRASTINATE: "procrastinate", SAQ: "saq", BARE: "bare"},
    asyncbg=ASYNCBG,
    peers=(PROCRASTINATE, SAQ),
    bare=BARE,
    log="WAL per job",
    prepare=prepare,
    other_start_ms=20.0,
)
DISTS = {PROCRASTINATE: "procrastinate", SAQ: "saq", BARE: "psycopg"}


def run(mode: Mode, admin_url: str | None = None) -> Section:
    """The PostgreSQL benchmark against ``admin_url``'s server (default: env
    ``ASYNCBG_BENCH_PG_URL``, else a throw-away server started here)."""
    with contextlib.ExitStack() as stack:
        server = _Server(admin_url) if admin_url else stack.enter_context(_server())
        sec, unavailable, missing = fleet.run(
            SPEC, server, mode, lambda name: importlib.util.find_spec(DISTS[name]) is not None
        )
        _notes(sec, unavailable, server.version(), missing)
    return sec


if __name__ == "__main__":
    # through the module's importable name, so that the job functions are the
    # ones every process registers under the same name
    from benchmarks.postgres import HOST_CLASSES as _CLASSES

    sys.exit(
        fleet.host_main(
            "benchmarks.postgres",
            sys.argv[1:],
            _CLASSES,
            quiet=("procrastinate", "saq", "psycopg", "psycopg.pool"),
        )
    )

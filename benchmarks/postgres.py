"""8. Durable on many hosts: the PostgreSQL backend (issue 12), against
procrastinate, SAQ's Postgres queue and one statement per job, on one server.

One PostgreSQL server for the whole run: a throw-away one started here
(``tests/servers.py``: initdb in a temporary folder, a free loopback port,
``fsync=on``, ``synchronous_commit=on``, stopped by PID at the end), or the
server named by ``ASYNCBG_BENCH_PG_URL`` (a ``postgresql://`` URL of a role
that may create databases). Every subject gets a fresh database per trial,
dropped after.

Every "host" is its own OS process (``python -m benchmarks.postgres host KIND
URL ROLE``) running one subject's app on that database with its own node
(asyncbg: a Flask app with ``ASYNCBG_BACKEND`` set and one ``@bg.task``; the
others: their worker on an asyncio loop thread, as a Flask app would embed
it); this process only drives them over their stdin/stdout, one line per
command and one per answer. Measured per subject and trial:

- the submit call, idle: how long ``submit`` holds a sync thread (a durable
  submit returns once its record is committed);
- submit-to-start in the same process: from just before the submit call to
  the job's first line (``time.perf_counter`` on both sides, in the host);
- submit-to-start from another host process: a second process that runs no
  jobs (asyncbg: ``ASYNCBG_WORKER_CONCURRENCY=0``; the others: no worker)
  submits, the first one claims and runs the job; ``time.time()`` on both
  sides (one machine, one clock);
- jobs/s end to end from 1 and 4 submitting threads per host, with 1 and 3
  host processes: every host submits its share at the same moment, a job
  counts when its first line runs in whichever host claimed it; the rate is
  the jobs over the span from the first gate opening to the last job's start.

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
import logging
import os
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .harness import Deadline, LineChild, Mode, Section, interleaved, median, percentile

ROOT = Path(__file__).resolve().parent.parent
TASK = "bench_pg_stamp"  # the same name in every process and for every subject
START_TIMEOUT = 10.0  # a job that has not started by then fails the run
URL_ENV = "ASYNCBG_BENCH_PG_URL"
#: A JSON object of config keys for asyncbg's hosts instead of its defaults
#: (``'{"ASYNCBG_POOL_SIZE": 8}'``), to see what a setting buys; noted in the run.
CONFIG_ENV = "ASYNCBG_BENCH_PG_CONFIG"

ASYNCBG = "asyncbg postgresql"
PROCRASTINATE = "procrastinate"
SAQ = "SAQ PostgresQueue"
BARE = "one statement per job"
KINDS = {ASYNCBG: "asyncbg", PROCRASTINATE: "procrastinate", SAQ: "saq", BARE: "bare"}

#: Jobs a worker runs at once in one host: asyncbg's default
#: ``ASYNCBG_WORKER_CONCURRENCY``, given to procrastinate's and SAQ's workers too
#: (their defaults are 1 and 10).
CONCURRENCY = 32
#: Consumer threads per host of the one-statement-per-job baseline, and how long
#: one sleeps after finding nothing (4 threads: a look every 1.25 ms on average).
BARE_CONSUMERS = 4
BARE_POLL = 0.005
#: Host processes in the multi-host measurements.
HOSTS = (1, 3)
THREADS = (1, 4)
#: Submits each host makes before it says it is ready (their jobs count nowhere).
WARM_UP = 5


# ------------------------------------------------------------------ the job


class _Tally:
    """Which jobs of the current generation started in this process, and when."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.gen = 0
        self.hits = 0
        self.last = 0.0  # time.time() at the latest first line
        self.perf: dict[int, float] = {}  # job number -> perf_counter at its first line
        self.lag: dict[int, float] = {}  # job number -> time.time() there minus at submit
        self.event = threading.Event()

    def arm(self, gen: int) -> None:
        with self.lock:
            self.gen = gen
            self.hits = 0
            self.last = 0.0
            self.perf = {}
            self.lag = {}
            self.event = threading.Event()

    def hit(self, gen: int, i: int, sent: float) -> None:
        perf = time.perf_counter()
        wall = time.time()
        with self.lock:
            if gen != self.gen:
                return  # a job of an earlier measurement
            self.hits += 1
            self.last = max(self.last, wall)
            self.perf[i] = perf
            self.lag[i] = wall - sent
            event = self.event
        event.set()


_TALLY = _Tally()


async def stamp(gen: int, i: int, sent: float) -> int:
    """asyncbg's and procrastinate's job (module level, JSON arguments)."""
    _TALLY.hit(gen, i, sent)
    return i


async def saq_stamp(ctx: Any, *, gen: int, i: int, sent: float) -> int:
    """SAQ's job: SAQ passes its context first and the arguments by keyword."""
    _TALLY.hit(gen, i, sent)
    return i


# ----------------------------------------------------------- the subjects

Submit = Callable[[int, int, float], object]


class _Unavailable(Exception):
    """This subject cannot run in this tree (asyncbg without the backend)."""


class _LoopThread:
    """An asyncio loop in a daemon thread, as a Flask app embeds one."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


def _extra_config() -> dict[str, Any]:
    text = os.environ.get(CONFIG_ENV, "").strip()
    if not text:
        return {}
    config = json.loads(text)
    if not isinstance(config, dict) or not all(str(k).startswith("ASYNCBG_") for k in config):
        raise ValueError(f"{CONFIG_ENV}: a JSON object of ASYNCBG_* keys, not {text!r}")
    return config


class _AsyncBGHost:
    """A Flask app with asyncbg on the PostgreSQL backend and the task."""

    def __init__(self, url: str, run: bool) -> None:
        from flask import Flask

        from asyncbg import AsyncBG, BackendUnavailable

        app = Flask("bench_postgres")
        app.config.update(
            ASYNCBG_HANDLE_SIGNALS=False, ASYNCBG_AUTOSTART=False, ASYNCBG_BACKEND=url
        )
        app.config.update(_extra_config())
        if not run:
            app.config["ASYNCBG_WORKER_CONCURRENCY"] = 0
        try:
            self.bg = AsyncBG(app)
        except BackendUnavailable as e:
            raise _Unavailable(f"BackendUnavailable: {e}") from e
        self.config = app.config
        task = self.bg.task(name=TASK)(stamp)
        self.submit: Submit = task.submit
        self.bg.start()

    def make_submit(self) -> Submit:
        return self.submit

    def settings(self) -> dict[str, Any]:
        keys = (
            "ASYNCBG_POLL_INTERVAL",
            "ASYNCBG_WORKER_CONCURRENCY",
            "ASYNCBG_POOL_SIZE",
            "ASYNCBG_STATEMENT_TIMEOUT",
            "ASYNCBG_LEASE",
        )
        return {k: self.config.get(k) for k in keys}

    def close(self) -> None:
        self.bg.stop(5)


class _ProcrastinateHost:
    """procrastinate: ``defer`` from the threads through a sync-opened app; the
    worker on a loop thread through an async-opened one (the same task)."""

    def __init__(self, url: str, run: bool) -> None:
        import procrastinate

        self.defer_app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))
        task = self.defer_app.task(name=TASK)(stamp)
        self.defer_app.open()
        self.submit: Submit = lambda gen, i, sent: task.defer(gen=gen, i=i, sent=sent)
        self.lt: _LoopThread | None = None
        self.worker: Any = None
        if run:
            self.lt = _LoopThread("procrastinate-loop")
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


class _SaqHost:
    """SAQ's PostgresQueue and Worker on a loop thread; ``enqueue`` from the threads."""

    def __init__(self, url: str, run: bool) -> None:
        from saq import Worker
        from saq.queue.postgres import PostgresQueue

        self.lt = _LoopThread("saq-loop")
        self.queue = PostgresQueue.from_url(url)
        self.lt.call(self.queue.connect())
        self.worker: Any = None
        self.task: Any = None
        if run:
            self.worker = Worker(self.queue, [(TASK, saq_stamp)], concurrency=CONCURRENCY)
            self.worker.SIGNALS = []  # its loop is not the main thread's: no handlers

            async def start() -> Any:
                return asyncio.ensure_future(self.worker.start())

            self.task = self.lt.call(start())
        q, lt = self.queue, self.lt

        def submit(gen: int, i: int, sent: float) -> object:
            return lt.call(q.enqueue(TASK, gen=gen, i=i, sent=sent))

        self.submit: Submit = submit

    def make_submit(self) -> Submit:
        return self.submit

    def settings(self) -> dict[str, Any]:
        return {"concurrency": CONCURRENCY}

    def close(self) -> None:
        async def stop() -> None:
            if self.worker is not None:
                await self.worker.stop()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.task
            await self.queue.disconnect()

        try:
            self.lt.call(stop(), 30)
        finally:
            self.lt.close()


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
                _TALLY.hit(gen, i, sent)
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


# ------------------------------------------------------------ a host process


class _Load:
    """``threads`` threads submitting ``per`` jobs each once the gate opens."""

    def __init__(self, system: Any, gen: int, per: int, threads: int, cap: float) -> None:
        self.system = system
        self.gen = gen
        self.per = per
        self.deadline = Deadline(cap)
        self.gate = threading.Barrier(threads + 1)
        self.calls: list[list[float]] = [[] for _ in range(threads)]
        self.sent = [0] * threads
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._produce, args=(k,), daemon=True) for k in range(threads)
        ]
        for t in self.threads:
            t.start()

    def _produce(self, k: int) -> None:
        perf = time.perf_counter
        mine = self.calls[k]
        try:
            submit = self.system.make_submit()  # bare: this thread's connection
            self.gate.wait()
            for j in range(self.per):
                t0 = perf()
                submit(self.gen, k * self.per + j, 0.0)
                mine.append(perf() - t0)
                self.sent[k] += 1
                if j & 15 == 15 and self.deadline.passed():
                    break
        except BaseException as e:
            self.errors.append(e)
            self.gate.abort()
            raise

    def go(self) -> tuple[float, int, list[float]]:
        """Open the gate; when every thread is done: (time.time() at the gate,
        jobs submitted, every call's duration)."""
        with contextlib.suppress(threading.BrokenBarrierError):
            self.gate.wait()
        t0 = time.time()
        for t in self.threads:
            t.join(max(1.0, self.deadline.end - time.monotonic()) + 30)
        if self.errors:
            raise RuntimeError(f"a submitting thread failed: {self.errors[0]!r}")
        if any(t.is_alive() for t in self.threads):
            raise RuntimeError("a submitting thread is stuck")
        return t0, sum(self.sent), [x for c in self.calls for x in c]


def _idle(system: Any, n: int, seed: str, cap: float) -> tuple[list[float], list[float]]:
    """Paced samples in this process: (submit calls, submit-to-start), seconds."""
    rng = random.Random(seed)
    deadline = Deadline(cap)
    calls: list[float] = []
    starts: list[float] = []
    perf = time.perf_counter
    for i in range(n):
        gen = 1_000_000 + i
        _TALLY.arm(gen)
        event = _TALLY.event
        t0 = perf()
        system.submit(gen, i, time.time())
        calls.append(perf() - t0)
        if not event.wait(START_TIMEOUT):
            raise RuntimeError(f"a job did not start within {START_TIMEOUT:.0f} s")
        starts.append(_TALLY.perf[i] - t0)
        # each sample finds the workers idle, at a random point of any polling
        time.sleep(rng.uniform(0.0003, 0.005))
        if deadline.passed():
            break
    return calls, starts


class _Commands:
    """What a host process answers: one method per command, one line per answer."""

    def __init__(self, system: Any, say: Callable[..., None]) -> None:
        self.system = system
        self.say = say
        self.load: _Load | None = None

    def idle(self, n: str, seed: str, cap: str) -> None:
        calls, starts = _idle(self.system, int(n), seed, float(cap))
        self.say("idle", json.dumps({"calls": calls, "starts": starts}))

    def watch(self, gen: str) -> None:
        """Arm for one job that another process submits."""
        _TALLY.arm(int(gen))
        self.say("watching")

    def submit(self, gen: str, i: str) -> None:
        t0 = time.perf_counter()
        self.system.submit(int(gen), int(i), time.time())
        self.say("ok", repr(time.perf_counter() - t0))

    def wait(self, i: str) -> None:
        """The lag of job ``i`` once it has started here."""
        if _TALLY.event.wait(START_TIMEOUT):
            self.say("hit", repr(_TALLY.lag[int(i)]))
        else:
            self.say("late")

    def arm(self, gen: str, per: str, threads: str, cap: str) -> None:
        _TALLY.arm(int(gen))
        self.load = _Load(self.system, int(gen), int(per), int(threads), float(cap))
        self.say("armed")

    def go(self) -> None:
        assert self.load is not None
        t0, sent, calls = self.load.go()
        self.load = None
        self.say("sent", sent, repr(t0), json.dumps(calls))

    def count(self) -> None:
        with _TALLY.lock:
            hits, last = _TALLY.hits, _TALLY.last
        errors = getattr(self.system, "errors", None)
        if errors:
            raise RuntimeError(f"a consumer failed: {errors[0]!r}")
        self.say("count", hits, repr(last))


def host_main(argv: list[str]) -> int:
    """``host KIND URL run|submit``: one subject's app; one answer per command line."""
    if len(argv) != 4 or argv[0] != "host" or argv[1] not in HOST_CLASSES:
        print(
            "usage: python -m benchmarks.postgres host KIND URL run|submit "
            f"(KIND: {', '.join(HOST_CLASSES)})",
            file=sys.stderr,
        )
        return 2
    kind, url, role = argv[1:]
    for name in ("asyncbg", "procrastinate", "saq", "psycopg", "psycopg.pool"):
        logging.getLogger(name).setLevel(logging.ERROR)
    out = sys.stdout

    def say(*words: object) -> None:
        out.write(" ".join(str(w) for w in words) + "\n")
        out.flush()

    try:
        system = HOST_CLASSES[kind](url, role == "run")
    except _Unavailable as e:
        say("unavailable", json.dumps(str(e)))
        return 0
    try:
        # warm the connections up (a pool opens its connections in the background);
        # generation 0 is nobody's measurement, wherever these jobs run
        for i in range(WARM_UP):
            system.submit(0, i, time.time())
        say("ready", json.dumps(system.settings()))
        commands = _Commands(system, say)
        for line in sys.stdin:
            cmd, *args = line.split()
            if cmd == "quit" or cmd.startswith("_") or not hasattr(commands, cmd):
                break
            getattr(commands, cmd)(*args)
        return 0
    finally:
        system.close()


# ------------------------------------------------------- driving the hosts


class _Host(LineChild):
    """One host process, driven over its stdin and stdout."""

    def __init__(self, kind: str, url: str, role: str) -> None:
        super().__init__("benchmarks.postgres", ["host", kind, url, role])
        try:
            first = self.expect("ready", "unavailable", timeout=120)
        except BaseException:
            self.close()
            raise
        if first[0] == "unavailable":
            self.close()
            raise _Unavailable(json.loads(first[1]))
        self.settings: dict[str, Any] = json.loads(first[1])

    def send(self, *words: object) -> None:  # type: ignore[override]
        super().send(" ".join(str(w) for w in words))

    def expect(self, *words: str, timeout: float = START_TIMEOUT + 5) -> list[str]:
        line = self.next_line(timeout)
        parts = (line or "").rstrip("\n").split(" ", 1)
        if parts[0] not in words:
            raise RuntimeError(
                f"host {self.proc.args[3:6]!r}: expected {'/'.join(words)}, got "
                f"{(line or '(its end)')[:200]!r}; its stderr ends: {self.stderr_tail(3000)}"
            )
        return parts + [""] * (2 - len(parts))

    def ask(self, *words: object, answer: str, timeout: float = START_TIMEOUT + 5) -> str:
        self.send(*words)
        return self.expect(answer, timeout=timeout)[1]

    def close(self, wait: float = 30.0) -> None:
        super().close(wait)


@contextlib.contextmanager
def _hosts(kind: str, url: str, roles: list[str]) -> Iterator[list[_Host]]:
    """Host processes started one after the other (the first migrates), all
    closed at the end."""
    made: list[_Host] = []
    try:
        for role in roles:
            made.append(_Host(kind, url, role))
        yield made
    finally:
        for h in made:
            with contextlib.suppress(Exception):
                h.close()


_GENS = iter(range(1, 1 << 60))


def _remote(
    runner: _Host, submitter: _Host, n: int, deadline: Deadline, rng: random.Random
) -> tuple[list[float], list[float]]:
    """Jobs submitted by ``submitter``, run by ``runner``: (lags, submit calls)."""
    lags: list[float] = []
    calls: list[float] = []
    for i in range(n):
        gen = next(_GENS)
        runner.ask("watch", gen, answer="watching")
        time.sleep(rng.uniform(0.0, 0.02))  # a random phase against any polling
        calls.append(float(submitter.ask("submit", gen, i, answer="ok")))
        runner.send("wait", i)
        kind, value = runner.expect("hit", "late")
        if kind == "late":
            raise RuntimeError(
                f"a job submitted by another host did not start within {START_TIMEOUT:.0f} s"
            )
        lags.append(float(value))
        if deadline.passed():
            break
    return lags, calls


def _cpu(pids: list[int]) -> float | None:
    """CPU seconds (user + system, every thread) used so far by ``pids``; None
    when one cannot be read (another machine's, or gone)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            return None
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def _jobs(
    hosts: list[_Host], server: _Server, per_host: int, threads: int, deadline: Deadline
) -> dict[str, Any]:
    """Every host submits ``per_host`` jobs from ``threads`` threads at once:
    {"rate": jobs/s end to end, "calls": every submit call, "host cpu" and
    "server cpu": CPU seconds per job of the host processes and of the
    server's processes over the measurement, when they can be read; "wal":
    bytes of WAL per job, the whole server's, so one subject at a time}."""
    gen = next(_GENS)
    per = max(1, per_host // threads)
    cap = max(1.0, deadline.end - time.monotonic())
    for h in hosts:
        h.send("arm", gen, per, threads, repr(cap))
    for h in hosts:
        h.expect("armed")
    pids = [h.proc.pid for h in hosts]
    host_cpu, server_pids = _cpu(pids), server.pids()
    server_cpu = _cpu(server_pids)
    wal = server.wal()
    for h in hosts:
        h.send("go")
    total = 0
    t0 = float("inf")
    calls: list[float] = []
    for h in hosts:
        answer = h.expect("sent", timeout=cap + 60)[1].split(" ", 2)
        total += int(answer[0])
        t0 = min(t0, float(answer[1]))
        calls.extend(json.loads(answer[2]))
    end = time.monotonic() + START_TIMEOUT + max(0.0, deadline.end - time.monotonic())
    while True:
        counts = [h.ask("count", answer="count").split() for h in hosts]
        hits = sum(int(c[0]) for c in counts)
        if hits >= total:
            last = max(float(c[1]) for c in counts)
            res = {"rate": total / (last - t0), "calls": calls, "jobs": total}
            res["wal"] = (server.wal() - wal) / total
            after = _cpu(pids)
            if host_cpu is not None and after is not None:
                res["host cpu"] = (after - host_cpu) / total
            # a backend that connected meanwhile counts from zero
            after = _cpu([p for p in server.pids() if p in server_pids])
            if server_cpu is not None and after is not None:
                joined = _cpu([p for p in server.pids() if p not in server_pids]) or 0.0
                res["server cpu"] = (after - server_cpu + joined) / total
            return res
        if time.monotonic() > end:
            return {"rate": float("nan"), "calls": calls, "jobs": total}
        time.sleep(0.02)  # the coordinator's look; the rate is from the jobs' own clocks


Figures = dict[tuple[str, str], float]


def _put(figures: Figures, group: str, what: str, values: list[float], scale: float) -> None:
    if values:
        figures[(group, f"{what} p50")] = percentile(values, 50) * scale
        figures[(group, f"{what} p99")] = percentile(values, 99) * scale


def _put_jobs(figures: Figures, group: str, res: dict[str, Any]) -> None:
    figures[(group, "jobs/s")] = res["rate"]
    _put(figures, group, "submit call", res["calls"], 1e6)
    for what in ("host cpu", "server cpu"):
        if what in res:
            figures[(group, f"{what} per job")] = res[what] * 1e6
    if "wal" in res:
        figures[(group, "WAL per job")] = res["wal"]


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

    def wal(self) -> int:
        """The server's current WAL position, in bytes."""
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            row = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
            return int(row[0]) if row else 0

    def pids(self) -> list[int]:
        """The postmaster and its children (backends, WAL writer, checkpointer...)."""
        if self.postmaster is None:
            return []
        found = [self.postmaster]
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        ppid = int(f.read().rpartition(")")[2].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                if ppid == self.postmaster:
                    found.append(int(entry))
        return found

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


def _trial(
    kind: str, server: _Server, mode: Mode, deadline: Deadline, rng: random.Random
) -> tuple[Figures, dict[str, Any]]:
    """Every figure of one subject, on a fresh database."""
    figures: Figures = {}
    raw: dict[str, Any] = {}
    with server.database(f"bench_{kind}") as url:
        prepare(kind, url)
        with _hosts(kind, url, ["run"]) as (first,):
            raw["settings"] = first.settings
            cap = max(1.0, deadline.end - time.monotonic())
            idle = json.loads(
                first.ask(
                    "idle", mode.postgres_samples, f"{kind}-{rng.random()}", repr(cap),
                    answer="idle", timeout=cap + 60,
                )
            )  # fmt: skip
            _put(figures, "idle", "submit call", idle["calls"], 1e6)
            _put(figures, "idle", "start", idle["starts"], 1e3)
            raw["start"] = idle["starts"]
            with _hosts(kind, url, ["submit"]) as (other,):
                n = max(5, mode.postgres_samples // 2)
                lags, calls = _remote(first, other, n, deadline, rng)
            _put(figures, "other", "start", lags, 1e3)
            _put(figures, "other", "submit call", calls, 1e6)
            raw["other host start"] = lags
            for threads in THREADS:
                res = _jobs([first], server, mode.postgres_jobs, threads, deadline)
                _put_jobs(figures, f"1x{threads}", res)
            # even past the deadline (every loop below is bounded in count and
            # time): a trial always has every group
            if max(HOSTS) > 1:
                with _hosts(kind, url, ["run"] * (max(HOSTS) - 1)) as more:
                    everyone = [first, *more]
                    for threads in THREADS:
                        res = _jobs(everyone, server, mode.postgres_jobs, threads, deadline)
                        _put_jobs(figures, f"{len(everyone)}x{threads}", res)
    return figures, raw


# ------------------------------------------------------------------- the run


def _groups() -> dict[str, str]:
    groups = {
        "idle": "idle, same process",
        "other": "idle, submitted by another host process",
    }
    for hosts in HOSTS:
        for threads in THREADS:
            groups[f"{hosts}x{threads}"] = (
                f"jobs from {hosts} host{'s' if hosts > 1 else ''} x {threads} "
                f"thread{'s' if threads > 1 else ''}"
            )
    return groups


def _unit(key: str, metric: str) -> str:
    if metric == "jobs/s":
        return "1/s"
    if metric.startswith("WAL"):
        return "B"
    return "ms" if metric.startswith("start") else "us"


def _faster_baseline(sec: Section, group: str) -> str | None:
    best: tuple[float, str] | None = None
    for name in (PROCRASTINATE, SAQ):
        row = sec.find(group, name, "jobs/s")
        if row is not None and row.value == row.value and (best is None or row.value > best[0]):
            best = (row.value, name)
    return None if best is None else best[1]


def _add_rows(sec: Section, res: dict[str, list[Any]]) -> None:
    for key, group in _groups().items():
        for name, trials in res.items():
            metrics = sorted({m for figures, _ in trials for (k, m) in figures if k == key})
            metrics.sort(key=lambda m: (m != "jobs/s", not m.startswith("submit"), m))
            for metric in metrics:
                vals = [figures[(key, metric)] for figures, _ in trials if (key, metric) in figures]
                sec.add(group, name, metric, median(vals), _unit(key, metric))
        if key in ("idle", "other"):
            for metric in {r.metric for r in sec.rows if r.group == group}:
                sec.ratio(group, metric, BARE)
            continue
        # jobs/s against the faster of procrastinate and SAQ in this group; the
        # submit calls against one statement per job
        fast = _faster_baseline(sec, group)
        if fast is not None:
            sec.ratio(group, "jobs/s", fast)
        for metric in {r.metric for r in sec.rows if r.group == group} - {"jobs/s"}:
            sec.ratio(group, metric, BARE)
        _throughput_target(sec, group)
    for name, trials in res.items():
        sec.raw.setdefault("samples", {})[name] = {
            what: [x for _, raw in trials for x in raw.get(what, [])]
            for what in ("start", "other host start")
        }
        sec.raw.setdefault("settings", {})[name] = trials[0][1].get("settings") if trials else None


def _throughput_target(sec: Section, group: str) -> None:
    row = sec.find(group, ASYNCBG, "jobs/s")
    if row is None:
        return
    parts: list[str] = []
    met = row.value == row.value
    fast = _faster_baseline(sec, group)
    for base, need in ((fast, 3.0), (BARE, None)):
        b = None if base is None else sec.find(group, base, "jobs/s")
        label = base or "procrastinate/SAQ"
        if b is None or not b.value or b.value != b.value:
            parts.append(f"{label}: not measured")
            met = met and need is None
        elif need is None:
            parts.append(f"{row.value / b.value:.2f}x {label}")
        else:
            parts.append(f">= {need:.0f}x {label} ({row.value / b.value:.2f}x)")
            met = met and row.value >= need * b.value
    row.target = ", ".join(parts)
    row.met = met


def _targets(sec: Section) -> None:
    sec.target(_groups()["other"], ASYNCBG, "start p50", "<= 20 ms", lambda r: r.value <= 20)


def _notes(sec: Section, unavailable: str | None, version: str, missing: list[str]) -> None:
    if unavailable is not None:
        sec.notes.append(
            f"{ASYNCBG}: not available in this tree ({unavailable}); its rows and targets "
            "are missing from this run: jobs/s >= 3x the faster of procrastinate and SAQ, "
            "cross-host submit-to-start p50 <= 20 ms"
        )
    else:
        s = (sec.raw.get("settings") or {}).get(ASYNCBG) or {}
        extra = _extra_config()
        which = f"{CONFIG_ENV} {json.dumps(extra)}, otherwise its defaults" if extra else "defaults"
        sec.notes.append(
            f"{ASYNCBG}: {which} ({', '.join(f'{k} {v!r}' for k, v in s.items())}); the "
            "submitting host of the cross-host rows runs ASYNCBG_WORKER_CONCURRENCY=0"
        )
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


def _probe(server: _Server) -> str | None:
    """Why asyncbg cannot run on PostgreSQL in this tree, or None if it can."""
    try:
        with server.database("bench_probe") as url, _hosts("asyncbg", url, ["submit"]):
            return None
    except _Unavailable as e:
        return str(e)


def run(mode: Mode, admin_url: str | None = None) -> Section:
    """The PostgreSQL benchmark against ``admin_url``'s server (default: env
    ``ASYNCBG_BENCH_PG_URL``, else a throw-away server started here)."""
    sec = Section("postgres")
    with contextlib.ExitStack() as stack:
        server = _Server(admin_url) if admin_url else stack.enter_context(_server())
        unavailable = _probe(server)
        names: list[str] = []
        missing: list[str] = []
        if unavailable is None:
            names.append(ASYNCBG)
        for name, dist in ((PROCRASTINATE, "procrastinate"), (SAQ, "saq")):
            (names if importlib.util.find_spec(dist) else missing).append(name)
        names.append(BARE)
        deadline = Deadline(mode.time_budget)
        rng = random.Random("postgres")
        res = interleaved(
            {
                name: (lambda k=KINDS[name]: _trial(k, server, mode, deadline, rng))
                for name in names
            },
            mode.trials,
            deadline,
        )
        _add_rows(sec, res)
        _targets(sec)
        _notes(sec, unavailable, server.version(), missing)
    return sec


if __name__ == "__main__":
    # through the module's importable name, so that the job functions are the
    # ones every process registers under the same name
    from benchmarks.postgres import host_main as _host_main

    sys.exit(_host_main(sys.argv[1:]))

"""9. Durable on many hosts: the Redis backend (issue 13), against arq, SAQ's
Redis queue, Huey's RedisHuey, RQ and one command per job, on one server.

One redis-server for the whole run: a throw-away one started here
(``tests/servers.py``: a temporary folder, a free loopback port,
``appendonly yes``, ``appendfsync everysec``, ``maxmemory-policy noeviction``,
stopped by PID at the end), or the server named by ``ASYNCBG_BENCH_REDIS_URL``
(a ``redis://`` URL of a database this benchmark may empty: it runs
``FLUSHDB`` there before and after every trial).

Every "host" is its own OS process (``python -m benchmarks.redis host KIND
URL ROLE``, driven by ``fleet.py``, which says what is measured: the submit
call, submit-to-start in the same process and from another host process,
jobs/s from 1 and 4 threads on 1 and 3 hosts, CPU and AOF bytes per job).
asyncbg: a Flask app with ``ASYNCBG_BACKEND`` set and one ``@bg.task``; the
others: their worker embedded as a Flask app would embed it.

Subjects: asyncbg on ``redis://...`` (its defaults); arq (``create_pool``,
``enqueue_job`` from the threads onto a loop thread that runs its ``Worker``
with ``max_jobs`` 32 and its default 0.5 s poll); SAQ's Redis ``Queue``
(``enqueue`` onto the loop thread that runs its ``Worker``, concurrency 32);
Huey's ``RedisHuey`` (blocking ``BRPOP`` storage, its consumer embedded with
4 worker threads); RQ (``Queue.enqueue`` from the threads, 4 ``SimpleWorker``
threads per host, each blocking on ``BLPOP``); and one command per job with
redis-py: ``LPUSH`` of the job per submit, 4 consumer threads each taking one
with ``BLMOVE`` onto a processing list, running it, then ``LREM`` (Redis's
reliable-queue pattern: the floor, with no record, lease or retry).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import fleet
from .fleet import (
    CONCURRENCY,
    TALLY,
    TASK,
    LoopThread,
    LoopWorkerHost,
    Submit,
    ctx_stamp,
    sync_stamp,
)
from .harness import Mode, Section

ROOT = Path(__file__).resolve().parent.parent
URL_ENV = "ASYNCBG_BENCH_REDIS_URL"
#: A JSON object of config keys for asyncbg's hosts instead of its defaults
#: (``'{"ASYNCBG_POOL_SIZE": 8}'``), to see what a setting buys; noted in the run.
CONFIG_ENV = "ASYNCBG_BENCH_REDIS_CONFIG"

ASYNCBG = "asyncbg redis"
ARQ = "arq"
SAQ = "SAQ Redis Queue"
HUEY = "Huey RedisHuey"
RQ = "RQ"
BARE = "one command per job"

#: Worker threads per host of the thread-based subjects (Huey, RQ, the floor).
THREADS = 4
QUEUE = "bench"


# ----------------------------------------------------------- the subjects


class _AsyncBGHost(fleet.AsyncBGHost):
    """A Flask app with asyncbg on the Redis backend and the task."""

    config_env = CONFIG_ENV
    keys = ("ASYNCBG_WORKER_CONCURRENCY", "ASYNCBG_POOL_SIZE", "ASYNCBG_LEASE")


class _ArqHost(LoopWorkerHost):
    """arq's pool and Worker on a loop thread; ``enqueue_job`` from the threads."""

    def __init__(self, url: str, run: bool) -> None:
        from arq import create_pool
        from arq.connections import RedisSettings
        from arq.worker import Worker, func

        self.lt = LoopThread("arq-loop")
        self.pool = self.lt.call(create_pool(RedisSettings.from_dsn(url)))
        self.worker: Any = None
        if run:

            async def make() -> Any:  # a Worker takes the loop it is made on
                return Worker(
                    functions=[func(ctx_stamp, name=TASK)],
                    redis_pool=self.pool,
                    max_jobs=CONCURRENCY,
                    handle_signals=False,
                )

            self.worker = self.lt.call(make())
            self.start_worker(self.worker.main)
        self.bind(lambda **kw: self.pool.enqueue_job(TASK, **kw))

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()  # main() polls forever; close() then ends its jobs
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.worker is not None:
            await self.worker.close()  # closes the pool it was given
        else:
            await self.pool.aclose()


class _SaqHost(LoopWorkerHost):
    """SAQ's Redis Queue and Worker on a loop thread; ``enqueue`` from the threads."""

    def __init__(self, url: str, run: bool) -> None:
        from saq import Queue, Worker

        self.lt = LoopThread("saq-loop")
        self.queue = Queue.from_url(url)
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


class _HueyHost:
    """RedisHuey; its consumer embedded in this process (``THREADS`` threads)."""

    def __init__(self, url: str, run: bool) -> None:
        from huey import RedisHuey

        self.huey = RedisHuey(QUEUE, url=url)
        task = self.huey.task(name=TASK)(sync_stamp)
        self.submit: Submit = lambda gen, i, sent: task(gen, i, sent)
        self.consumer: Any = None
        if run:
            self.consumer = fleet.start_huey_consumer(
                self.huey, workers=THREADS, worker_type="thread", periodic=False
            )

    def make_submit(self) -> Submit:
        return self.submit

    def settings(self) -> dict[str, Any]:
        return {"workers": THREADS, "blocking": self.huey.storage.blocking}

    def close(self) -> None:
        if self.consumer is not None:
            # not joined (each worker would end its 1 s BRPOP first): the
            # measurements are over and the process exits next
            self.consumer.stop(graceful=False)


class _RqHost:
    """RQ: ``enqueue`` from the threads; ``THREADS`` SimpleWorker threads run the jobs."""

    def __init__(self, url: str, run: bool) -> None:
        from redis import Redis
        from rq import Queue, SimpleWorker
        from rq.timeouts import TimerDeathPenalty

        class Worker(SimpleWorker):
            # not the main thread: no signal handlers, and job timeouts by a
            # timer thread instead of SIGALRM (as RQ offers where signals fail)
            death_penalty_class = TimerDeathPenalty

            def _install_signal_handlers(self) -> None:
                pass

        self.conn: Any = Redis.from_url(url)
        self.queue = Queue(QUEUE, connection=self.conn)
        queue = self.queue
        self.submit: Submit = lambda gen, i, sent: queue.enqueue(sync_stamp, gen, i, sent)
        self.workers = [Worker([queue], connection=self.conn) for _ in range(THREADS if run else 0)]
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._work, args=(w,), name=f"rq-{k}", daemon=True)
            for k, w in enumerate(self.workers)
        ]
        for t in self.threads:
            t.start()

    def _work(self, worker: Any) -> None:
        try:
            worker.work(logging_level="ERROR")
        except BaseException as e:
            self.errors.append(e)
            raise

    def make_submit(self) -> Submit:
        return self.submit

    def settings(self) -> dict[str, Any]:
        return {"workers": THREADS, "worker": "SimpleWorker"}

    def close(self) -> None:
        # what its SIGTERM handler sets; not joined (each worker would end its
        # 1 s BLPOP first): the measurements are over and the process exits next
        for w in self.workers:
            w._stop_requested = True


class _BareHost:
    """redis-py, one command per step: ``LPUSH`` per submit; consumer threads
    ``BLMOVE`` a job onto a processing list, run it and ``LREM`` it."""

    pending = "bench:pending"
    processing = "bench:processing"

    def __init__(self, url: str, run: bool) -> None:
        from redis import Redis

        self.conn: Any = Redis.from_url(url)
        self.stopping = threading.Event()
        self.errors: list[BaseException] = []
        self.consumers = [
            threading.Thread(target=self._consume, name=f"bare-{k}", daemon=True)
            for k in range(THREADS if run else 0)
        ]
        for t in self.consumers:
            t.start()
        self.submit = self.make_submit()

    def make_submit(self) -> Submit:
        conn, key = self.conn, self.pending

        def push(gen: int, i: int, sent: float) -> None:
            conn.lpush(key, json.dumps([TASK, gen, i, sent]))

        return push

    def _consume(self) -> None:
        try:
            while not self.stopping.is_set():
                raw = self.conn.blmove(self.pending, self.processing, 0.2, "RIGHT", "LEFT")
                if raw is None:
                    continue
                _, gen, i, sent = json.loads(raw)
                TALLY.hit(gen, i, sent)
                self.conn.lrem(self.processing, 1, raw)
        except BaseException as e:
            if not self.stopping.is_set():
                self.errors.append(e)
                raise

    def settings(self) -> dict[str, Any]:
        return {"consumers": THREADS}

    def close(self) -> None:
        self.stopping.set()
        for t in self.consumers:
            t.join(5)  # one BLMOVE timeout (0.2 s) at most
        self.conn.close()


HOST_CLASSES: dict[str, Any] = {
    "asyncbg": _AsyncBGHost,
    "arq": _ArqHost,
    "saq": _SaqHost,
    "huey": _HueyHost,
    "rq": _RqHost,
    "bare": _BareHost,
}


def prepare(kind: str, url: str) -> None:
    """Nothing to create on Redis: every subject makes its keys as it goes."""


# ------------------------------------------------------------ the server


class _Server:
    """The run's redis-server: one database, emptied before and after each trial."""

    def __init__(self, url: str) -> None:
        from redis import Redis

        self.base_url = url
        self.client: Any = Redis.from_url(url, socket_timeout=10)
        info = self.client.info("server")
        host = urlsplit(url).hostname or ""
        local = host in ("", "localhost", "127.0.0.1", "::1")
        self.pid: int | None = int(info["process_id"]) if local else None
        self.redis_version = str(info.get("redis_version", "?"))

    def pids(self) -> list[int]:
        """The server and its children (an AOF rewrite's fork)."""
        return [] if self.pid is None else fleet.children(self.pid)

    def log_bytes(self) -> int:
        """The AOF's size so far (0 without AOF)."""
        info = self.client.info("persistence")
        return int(info.get("aof_current_size", 0) or 0)

    def settings(self) -> dict[str, str]:
        got: dict[str, str] = {}
        for key in ("appendonly", "appendfsync", "maxmemory-policy"):
            got.update({str(k): str(v) for k, v in self.client.config_get(key).items()})
        return got

    @contextlib.contextmanager
    def database(self, prefix: str) -> Iterator[str]:
        self.client.flushdb()
        try:
            yield self.base_url
        finally:
            # the hosts are gone: nothing of this trial is left for the next
            with contextlib.suppress(Exception):
                self.client.flushdb()

    def close(self) -> None:
        self.client.close()


def _notes(sec: Section, server: _Server, unavailable: str | None, missing: list[str]) -> None:
    fleet.asyncbg_note(SPEC, sec, unavailable, CONFIG_ENV)
    for name in missing:
        sec.notes.append(f"{name} is not installed: no {name} rows (pip install 'asyncbg[bench]')")
    s = server.settings()
    versions = [
        f"Redis {server.redis_version} (appendonly {s.get('appendonly')}, appendfsync "
        f"{s.get('appendfsync')}, maxmemory-policy {s.get('maxmemory-policy')})"
    ]
    for dist in ("redis", "hiredis", "arq", "saq", "huey", "rq"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version as dist_version

            versions.append(f"{dist} {dist_version(dist)}")
    sec.notes.append(
        ", ".join(versions) + f"; every host is its own process; arq and SAQ run their "
        f"worker with {CONCURRENCY} jobs at once (asyncbg's default), arq polling every "
        f"0.5 s (its default); Huey, RQ and one command per job: {THREADS} worker threads "
        "per host, each blocking on the server; a job counts when its first line runs; "
        "jobs/s ratios are to the fastest of arq, SAQ, Huey and RQ in the same group; "
        "CPU per job: user + system time of the host processes and of redis-server over "
        "the measurement, from /proc (clock ticks: coarse on short runs); AOF per job: "
        "the growth of aof_current_size over the measurement, per job"
    )


@contextlib.contextmanager
def _server() -> Iterator[_Server]:
    url = os.environ.get(URL_ENV)
    if url:
        server = _Server(url)
        try:
            yield server
        finally:
            server.close()
        return
    sys.path.insert(0, str(ROOT))  # tests/servers.py, when run from elsewhere
    from tests.servers import RedisServer

    made = RedisServer().start()
    try:
        server = _Server(made.url(1))
        try:
            yield server
        finally:
            server.close()
    finally:
        made.cleanup()


SPEC = fleet.Spec(
    section="redis",
    module="benchmarks.redis",
    subjects={
        ASYNCBG: "asyncbg",
        ARQ: "arq",
        SAQ: "saq",
        HUEY: "huey",
        RQ: "rq",
        BARE: "bare",
    },
    asyncbg=ASYNCBG,
    peers=(ARQ, SAQ, HUEY, RQ),
    bare=BARE,
    log="AOF per job",
    prepare=prepare,
    other_start_ms=2.0,
)
DISTS = {ARQ: "arq", SAQ: "saq", HUEY: "huey", RQ: "rq", BARE: "redis"}


def run(mode: Mode, url: str | None = None) -> Section:
    """The Redis benchmark against ``url``'s server (default: env
    ``ASYNCBG_BENCH_REDIS_URL``, else a throw-away server started here)."""
    with contextlib.ExitStack() as stack:
        server = _Server(url) if url else stack.enter_context(_server())
        sec, unavailable, missing = fleet.run(
            SPEC, server, mode, lambda name: importlib.util.find_spec(DISTS[name]) is not None
        )
        _notes(sec, server, unavailable, missing)
    return sec


if __name__ == "__main__":
    # through the module's importable name, so that the job functions are the
    # ones every process registers under the same name
    from benchmarks.redis import HOST_CLASSES as _CLASSES

    sys.exit(
        fleet.host_main(
            "benchmarks.redis", sys.argv[1:], _CLASSES, quiet=("arq", "saq", "huey", "rq")
        )
    )

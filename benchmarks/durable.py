"""7. Durable on one host: the SQLite backend (issue 11), with ``synchronous=FULL``
and ``NORMAL`` each.

Measured per subject, one fresh temporary folder per trial (deleted after):

- the submit call, idle: how long ``task.submit(...)`` holds a sync thread (a
  durable submit returns once its record is committed);
- submit-to-start in the same process: from just before the submit call to the
  job's first line (``time.perf_counter`` on both sides);
- submit-to-start from another process: process A (``python -m
  benchmarks.durable peer ...``, the same app on the same file, running no
  jobs) submits, this process runs the job; ``time.time()`` on both sides (one
  host, one clock);
- jobs/s end to end from 1 and 4 submitting threads (every job started; the
  count is taken in the job), with each call's duration under that load.

Subjects: asyncbg on the SQLite backend; asyncbg's in-memory path (the same
task and threads, no store); Huey's ``SqliteHuey`` with its consumer embedded
as the Huey docs show (``huey.create_consumer(workers=4, worker_type="thread")``
then ``consumer.start()``); and bare ``sqlite3``, one ``BEGIN IMMEDIATE``,
INSERT, COMMIT per job on a WAL file, one connection per thread: the floor
without group commit (its jobs/s are inserts/s; nothing runs them).
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import logging
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from . import fleet
from .harness import Deadline, LineChild, Mode, Section, interleaved, median, percentile

ROOT = Path(__file__).resolve().parent.parent
TASK = "bench_durable_stamp"  # the same name in every process and for every subject
SYNCS = ("FULL", "NORMAL")
START_TIMEOUT = 10.0  # a job that has not started by then fails the run

DURABLE = "asyncbg durable"
MEMORY = "asyncbg memory"
HUEY = "Huey SqliteHuey"
BARE = "bare sqlite3"

# Huey's worker threads poll the file, sleeping initial_delay after an empty poll,
# times backoff after each further one, up to max_delay (defaults 0.1 s, 1.15,
# 10 s: an idle consumer ends up seconds behind). Fixed at 10 ms here: a worker
# that finds a task polls again at once, so throughput does not depend on it, and
# four workers then look at the file every 2.5 ms on average, for well under 1%
# of a core.
HUEY_POLL = 0.01
HUEY_CONSUMER: dict[str, Any] = {
    "workers": 4,
    "worker_type": "thread",
    "periodic": False,
    "initial_delay": HUEY_POLL,
    "backoff": 1.15,
    "max_delay": HUEY_POLL,
    "shutdown_timeout": 5.0,
}

Submit = Callable[[int, int, float], object]


# ------------------------------------------------------------------ the job


class _Run:
    """One measurement: which job numbers started when, and when all have."""

    def __init__(self, gen: int, target: int) -> None:
        self.gen = gen
        self.target = target
        self.hits = 0
        self.perf: dict[int, float] = {}  # job number -> perf_counter at its first line
        self.lag: dict[int, float] = {}  # job number -> time.time() there minus at submit
        self.done = threading.Event()
        self.lock = threading.Lock()

    def hit(self, i: int, perf: float, lag: float) -> None:
        self.perf[i] = perf
        self.lag[i] = lag
        with self.lock:
            self.hits += 1
            if self.hits >= self.target:
                self.done.set()

    def retarget(self, target: int) -> None:
        """Wait for ``target`` jobs instead (the producers stopped early)."""
        with self.lock:
            self.target = target
            if self.hits >= target:
                self.done.set()


class _Sink:
    """Where every subject's job reports; a job of an earlier run is ignored."""

    def __init__(self) -> None:
        self._gens = itertools.count(1)
        self.run = _Run(0, 0)

    def arm(self, target: int) -> _Run:
        run = _Run(next(self._gens), target)
        self.run = run
        return run

    def hit(self, gen: int, i: int, sent: float) -> None:
        perf = time.perf_counter()
        wall = time.time()
        run = self.run
        if run.gen == gen:
            run.hit(i, perf, wall - sent)


_SINK = _Sink()


async def stamp(gen: int, i: int, sent: float) -> int:
    """asyncbg's job (module level and JSON arguments: it can be durable)."""
    _SINK.hit(gen, i, sent)
    return i


def stamp_sync(gen: int, i: int, sent: float) -> int:
    """Huey's job (Huey takes no coroutine functions). It returns a value, so
    Huey stores a result as asyncbg records a final state."""
    _SINK.hit(gen, i, sent)
    return i


# ------------------------------------------------------------------ subjects


class _System(Protocol):
    runs_jobs: bool  # False: the submit call is all there is (bare sqlite3)
    remote: list[str] | None  # the peer's arguments, when another process can submit
    remote_pace: float  # the longest random pause before a cross-process sample
    poll: float  # how often it looks for new work in its own process (0: woken at once)
    submit: Submit

    def make_submit(self) -> Submit: ...

    def close(self) -> None: ...


#: Jobs per submit_many call in the burst measurement.
BURST = 50


def _url(path: str, sync: str) -> str:
    return f"sqlite:///{path}?synchronous={sync}"  # an absolute path: four slashes


class _AsyncBG:
    """A Flask app with asyncbg and the task; durable when ``path`` is given."""

    runs_jobs = True

    def __init__(self, path: str | None, sync: str, **config: Any) -> None:
        from flask import Flask

        from asyncbg import AsyncBG

        app = Flask("bench_durable")
        app.config.update(ASYNCBG_HANDLE_SIGNALS=False, ASYNCBG_AUTOSTART=False, **config)
        if path is not None:
            app.config["ASYNCBG_BACKEND"] = _url(path, sync)
        # raises BackendUnavailable while the engine cannot run durable jobs
        self.bg = AsyncBG(app)
        self.config = app.config
        task = self.bg.task(name=TASK)(stamp)
        self.submit: Submit = task.submit
        #: A burst of submits in one call (one commit for a durable task).
        self.submit_many: Callable[[list[tuple[int, int, float]]], object] | None = task.submit_many
        self.bg.start()
        self.remote = None if path is None else ["asyncbg", path, sync]
        poll = app.config.get("ASYNCBG_POLL_INTERVAL")
        known = isinstance(poll, int | float) and not isinstance(poll, bool) and poll > 0
        self.remote_pace = min(0.1, max(0.005, float(poll))) if known else 0.1
        # a durable submit should wake this process's claim loop at once; if it
        # waited for a poll instead, the pacing below spans (some of) the period
        self.poll = 0.0 if path is None else self.remote_pace

    def make_submit(self) -> Submit:
        return self.submit

    def close(self) -> None:
        self.bg.stop(5)


def _make_huey(path: str, sync: str) -> tuple[Any, Submit]:
    from huey import SqliteHuey
    from huey.storage import SqliteStorage

    class Storage(SqliteStorage):  # type: ignore[misc]
        # Huey's own knob (fsync=True|False) knows FULL and OFF only.
        def _create_connection(self) -> sqlite3.Connection:
            conn: sqlite3.Connection = super()._create_connection()
            conn.execute(f"pragma synchronous={sync}")
            return conn

    huey = SqliteHuey("bench", filename=path, storage_class=Storage)
    return huey, huey.task(name=TASK)(stamp_sync)


class _Huey:
    """SqliteHuey on a file; its consumer embedded in this process (4 threads)."""

    runs_jobs = True
    remote_pace = HUEY_POLL
    poll = HUEY_POLL

    def __init__(self, path: str, sync: str, consume: bool = True) -> None:
        self.huey, self.submit = _make_huey(path, sync)
        self.remote = ["huey", path, sync]
        self.consumer: Any = None
        if consume:
            self.consumer = fleet.start_huey_consumer(self.huey, **HUEY_CONSUMER)

    def make_submit(self) -> Submit:
        return self.submit

    def close(self) -> None:
        try:
            if self.consumer is not None:
                self.consumer.stop(graceful=True)  # joins the workers, 5 s at most
        finally:
            self.huey.storage.close()


class _Bare:
    """One BEGIN IMMEDIATE, INSERT, COMMIT per job; a connection per thread."""

    runs_jobs = False
    remote = None
    remote_pace = 0.0
    poll = 0.0

    def __init__(self, path: str, sync: str) -> None:
        self.path = path
        self.sync = sync
        self.conns: list[sqlite3.Connection] = []
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            mode = conn.execute("pragma journal_mode=wal").fetchone()[0]
            if mode != "wal":
                raise RuntimeError(f"{path}: journal_mode {mode!r}, not WAL")
            conn.execute(
                "CREATE TABLE jobs (id TEXT PRIMARY KEY, task TEXT NOT NULL, "
                "args TEXT NOT NULL, status TEXT NOT NULL, created_at REAL NOT NULL)"
            )
        finally:
            conn.close()
        self.submit = self.make_submit()

    def make_submit(self) -> Submit:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute(f"pragma synchronous={self.sync}")  # a per-connection setting
        conn.execute("pragma busy_timeout=5000")
        self.conns.append(conn)

        def insert(gen: int, i: int, sent: float) -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT INTO jobs VALUES (?, ?, ?, 'queued', ?)",
                (uuid.uuid4().hex, TASK, json.dumps([gen, i, sent]), time.time()),
            )
            conn.execute("COMMIT")

        return insert

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


# -------------------------------------------------------------- measurements


def _idle(
    system: _System, n: int, deadline: Deadline, rng: random.Random
) -> tuple[list[float], list[float]]:
    """Paced samples: (submit-to-start, submit call), in seconds."""
    starts: list[float] = []
    calls: list[float] = []
    perf = time.perf_counter
    for i in range(n):
        run = _SINK.arm(1)
        t0 = perf()
        system.submit(run.gen, i, time.time())
        t1 = perf()
        calls.append(t1 - t0)
        if system.runs_jobs:
            if not run.done.wait(START_TIMEOUT):
                raise RuntimeError(f"a job did not start within {START_TIMEOUT:.0f} s")
            starts.append(run.perf[i] - t0)
        # pace the samples so that each one finds the workers idle, and at a
        # random point of a polling cycle: one that just ran a job polls again
        # a period later, so a fixed pause would always land at the same phase
        time.sleep(rng.uniform(0.0003, 0.003 + min(system.poll, 0.02)))
        if deadline.passed():
            break
    return starts, calls


class _Load:
    """``threads`` threads submitting ``per`` jobs each once the gate opens."""

    def __init__(
        self,
        system: _System,
        run: _Run,
        per: int,
        threads: int,
        deadline: Deadline,
        burst: int = 1,
    ):
        self.system = system
        self.burst = burst
        self.run = run
        self.per = per
        self.deadline = deadline
        self.gate = threading.Barrier(threads + 1)
        self.calls: list[list[float]] = [[] for _ in range(threads)]
        self.sent = [0] * threads
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._produce, args=(k,), daemon=True) for k in range(threads)
        ]

    def _produce(self, k: int) -> None:
        perf = time.perf_counter
        mine = self.calls[k]
        try:
            submit = self.system.make_submit()  # bare sqlite3: this thread's connection
            many = getattr(self.system, "submit_many", None) if self.burst > 1 else None
            self.gate.wait()
            if many is not None:
                self._bursts(k, many)
                return
            for j in range(self.per):
                t0 = perf()
                submit(self.run.gen, k * self.per + j, 0.0)
                mine.append(perf() - t0)
                self.sent[k] += 1
                if j & 63 == 63 and self.deadline.passed():
                    break
        except BaseException as e:
            self.errors.append(e)
            self.gate.abort()
            raise

    def _bursts(self, k: int, many: Callable[[list[tuple[int, int, float]]], object]) -> None:
        perf = time.perf_counter
        for first in range(0, self.per, self.burst):
            calls = [
                (self.run.gen, k * self.per + j, 0.0)
                for j in range(first, min(self.per, first + self.burst))
            ]
            t0 = perf()
            many(calls)
            self.calls[k].append((perf() - t0) / len(calls))
            self.sent[k] += len(calls)
            if self.deadline.passed():
                break

    def go(self) -> float:
        """Start the threads, open the gate together with them; the time then."""
        for t in self.threads:
            t.start()
        with contextlib.suppress(threading.BrokenBarrierError):
            self.gate.wait()
        return time.perf_counter()

    def join(self) -> int:
        """Wait for every thread (bounded); how many jobs they submitted."""
        for t in self.threads:
            t.join(max(1.0, self.deadline.end - time.monotonic()) + 30)
        if self.errors:
            first = self.errors[0]
            raise RuntimeError(f"a submitting thread failed: {first!r}") from first
        if any(t.is_alive() for t in self.threads):
            return 0
        return sum(self.sent)


def _jobs(
    system: _System, n: int, threads: int, deadline: Deadline, burst: int = 1
) -> tuple[float, list[float]]:
    """(jobs/s from ``threads`` submitting threads, every submit call's duration;
    per job for bursts of ``burst`` submitted in one call where the system can)."""
    per = max(1, n // threads)
    run = _SINK.arm(per * threads)
    load = _Load(system, run, per, threads, deadline, burst)
    t0 = load.go()
    total = load.join()
    finished = total > 0
    if finished and system.runs_jobs:
        run.retarget(total)
        finished = run.done.wait(max(1.0, deadline.end - time.monotonic()) + 30)
    t1 = time.perf_counter()
    calls = [x for c in load.calls for x in c]
    return (total / (t1 - t0) if finished else float("nan")), calls


class _Peer(LineChild):
    """Process A: ``python -m benchmarks.durable peer KIND PATH SYNC``, one line per
    command on its stdin ("go GEN I" -> it submits, answers "ok SECONDS")."""

    def __init__(self, argv: list[str]) -> None:
        super().__init__("benchmarks.durable", ["peer", *argv])
        try:
            self.expect("ready", timeout=60)
        except BaseException:
            self.close()
            raise

    def expect(self, word: str, timeout: float = START_TIMEOUT) -> str:
        line = self.next_line(timeout)
        parts = (line or "").split()
        if not parts or parts[0] != word:
            raise RuntimeError(
                f"peer {self.proc.args!r}: expected {word!r}, got {line!r}; "
                f"its stderr ends: {self.stderr_tail(2000)}"
            )
        return " ".join(parts[1:])


def _remote(
    system: _System, n: int, deadline: Deadline, rng: random.Random
) -> tuple[list[float], list[float]]:
    """Samples submitted by process A, run here: (submit-to-start, A's submit call)."""
    assert system.remote is not None
    lags: list[float] = []
    calls: list[float] = []
    peer = _Peer(system.remote)
    try:
        for i in range(n):
            # a random phase against this process's polling
            time.sleep(rng.uniform(0.0, system.remote_pace))
            run = _SINK.arm(1)
            peer.send(f"go {run.gen} {i}")
            calls.append(float(peer.expect("ok")))
            if not run.done.wait(START_TIMEOUT):
                raise RuntimeError(
                    f"a job submitted by another process did not start here within "
                    f"{START_TIMEOUT:.0f} s"
                )
            lags.append(run.lag[i])
            if deadline.passed():
                break
    finally:
        peer.close()
    return lags, calls


Figures = dict[tuple[str, str], float]


def _put(figures: Figures, group: str, what: str, values: list[float], scale: float) -> None:
    if values:
        figures[(group, f"{what} p50")] = percentile(values, 50) * scale
        figures[(group, f"{what} p99")] = percentile(values, 99) * scale


def _trial(
    open_system: Callable[[str], _System], mode: Mode, deadline: Deadline, rng: random.Random
) -> tuple[Figures, dict[str, list[float]]]:
    """Every figure of one subject, on a fresh file in a fresh folder."""
    folder = tempfile.mkdtemp(prefix="asyncbg-bench-durable-")
    figures: Figures = {}
    raw: dict[str, list[float]] = {}
    try:
        system = open_system(os.path.join(folder, "jobs.db"))
        try:
            starts, calls = _idle(system, mode.durable_samples, deadline, rng)
            _put(figures, "idle", "submit call", calls, 1e6)
            _put(figures, "idle", "start", starts, 1e6)
            raw["start"] = starts
            if system.remote is not None:
                n = max(5, mode.durable_samples // 2)
                lags, rcalls = _remote(system, n, deadline, rng)
                _put(figures, "other", "start", lags, 1e3)
                _put(figures, "other", "submit call", rcalls, 1e6)
                raw["other process start"] = lags
            for threads in (1, 4):
                rate, tcalls = _jobs(system, mode.durable_jobs, threads, deadline)
                figures[(str(threads), "jobs/s")] = rate
                _put(figures, str(threads), "submit call", tcalls, 1e6)
            rate, tcalls = _jobs(system, mode.durable_jobs, 4, deadline, BURST)
            figures[("burst", "jobs/s")] = rate
            _put(figures, "burst", "submit call", tcalls, 1e6)
        finally:
            system.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return figures, raw


# ------------------------------------------------------------------- the run


def _durable_unavailable() -> str | None:
    """Why this tree cannot run asyncbg durable jobs, or None if it can."""
    from asyncbg import BackendUnavailable

    folder = tempfile.mkdtemp(prefix="asyncbg-bench-durable-")
    try:
        system = _AsyncBG(os.path.join(folder, "probe.db"), "FULL")
    except BackendUnavailable as e:
        return f"BackendUnavailable: {e}"
    else:
        system.close()
        return None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _subjects(durable: bool, huey: bool, sync: str) -> dict[str, Callable[[str], _System]]:
    subjects: dict[str, Callable[[str], _System]] = {}
    if durable:
        subjects[DURABLE] = lambda path: _AsyncBG(path, sync)
    subjects[MEMORY] = lambda path: _AsyncBG(None, sync)
    if huey:
        subjects[HUEY] = lambda path: _Huey(path, sync)
    subjects[BARE] = lambda path: _Bare(path, sync)
    return subjects


def _groups(sync: str) -> dict[str, str]:
    return {
        "idle": f"{sync}: idle",
        "other": f"{sync}: from another process",
        "1": f"{sync}: jobs from 1 thread",
        "4": f"{sync}: jobs from 4 threads",
        "burst": f"{sync}: jobs from 4 threads, bursts of {BURST} (submit_many where there is one)",
    }


def _unit(key: str, metric: str) -> str:
    if metric == "jobs/s":
        return "1/s"
    return "ms" if key == "other" and metric.startswith("start") else "us"


def _add_rows(sec: Section, sync: str, res: dict[str, list[Any]]) -> None:
    groups = _groups(sync)
    for key, group in groups.items():
        for name, trials in res.items():
            metrics = sorted({m for figures, _ in trials for (k, m) in figures if k == key})
            # jobs/s first, then the submit call, then start; p50 before p99
            metrics.sort(key=lambda m: (m != "jobs/s", not m.startswith("submit"), m))
            for metric in metrics:
                vals = [figures[(key, metric)] for figures, _ in trials if (key, metric) in figures]
                sec.add(group, name, metric, median(vals), _unit(key, metric))
        metrics = {r.metric for r in sec.rows if r.group == group}
        base = {"idle": MEMORY, "other": HUEY}.get(key, BARE)
        for metric in metrics:
            sec.ratio(group, metric, base)
    for name, trials in res.items():
        sec.raw.setdefault(sync, {})[name] = {
            what: [x for _, raw in trials for x in raw.get(what, [])]
            for what in ("start", "other process start")
        }


def _targets(sec: Section, sync: str) -> None:
    groups = _groups(sync)
    sec.target(groups["idle"], DURABLE, "start p50", "<= 2 ms", lambda r: r.value <= 2000)
    sec.target(groups["other"], DURABLE, "start p50", "<= 50 ms", lambda r: r.value <= 50)
    if sync != "FULL":
        return
    for key in ("4", "burst"):
        _throughput_target(sec, groups[key])


def _throughput_target(sec: Section, group: str) -> None:
    row = sec.find(group, DURABLE, "jobs/s")
    if row is None:
        return
    parts: list[str] = []
    met = row.value == row.value
    for base, need in ((HUEY, 10.0), (BARE, 5.0)):
        b = sec.find(group, base, "jobs/s")
        if b is None or not b.value or b.value != b.value:
            parts.append(f">= {need:.0f}x {base} (not measured)")
            met = False
        else:
            parts.append(f">= {need:.0f}x {base} ({row.value / b.value:.1f}x)")
            met = met and row.value >= need * b.value
    row.target = ", ".join(parts)
    row.met = met


def _notes(sec: Section, unavailable: str | None, huey: bool) -> None:
    if unavailable is not None:
        sec.notes.append(
            f"asyncbg durable: not available in this tree ({unavailable}); its rows and "
            "targets are missing from this run: in-process start p50 <= 2 ms, "
            "cross-process start p50 <= 50 ms, FULL jobs/s from 4 threads >= 10x Huey "
            "and >= 5x bare sqlite3"
        )
    else:
        s = sec.raw.get("settings", {})
        sec.notes.append(
            "asyncbg durable: ASYNCBG_POLL_INTERVAL "
            f"{s.get('ASYNCBG_POLL_INTERVAL')!r}, ASYNCBG_WORKER_CONCURRENCY "
            f"{s.get('ASYNCBG_WORKER_CONCURRENCY')!r} here (the defaults); the other "
            "process runs the same app with ASYNCBG_WORKER_CONCURRENCY=0"
        )
    if huey:
        import huey as huey_mod

        sec.notes.append(
            f"Huey {huey_mod.__version__}: consumer in this process, 4 worker threads, "
            f"polling every {HUEY_POLL * 1e3:.0f} ms fixed (initial_delay = max_delay; "
            "Huey's defaults back off from 0.1 s to 10 s); one connection shared by all "
            "its threads; a worker deletes a task's row when it takes it (at most once: "
            "a crash mid-job loses the job)"
        )
    else:
        sec.notes.append("huey is not installed: no Huey rows (pip install 'asyncbg[bench]')")
    sec.notes.append(
        f"SQLite {sqlite3.sqlite_version}; asyncbg memory does not depend on synchronous= "
        "and is measured again in each group; bare sqlite3 runs no job (jobs/s = "
        "inserts/s); jobs/s count a job when its first line runs"
    )


def run(mode: Mode) -> Section:
    sec = Section("durable")
    logging.getLogger("huey").setLevel(logging.ERROR)
    unavailable = _durable_unavailable()
    huey = importlib.util.find_spec("huey") is not None
    for sync in SYNCS:
        deadline = Deadline(mode.time_budget)
        rng = random.Random(f"durable-{sync}")
        subjects = _subjects(unavailable is None, huey, sync)
        res = interleaved(
            {
                name: (lambda o=open_system, d=deadline, r=rng: _trial(o, mode, d, r))
                for name, open_system in subjects.items()
            },
            mode.trials,
            deadline,
        )
        _add_rows(sec, sync, res)
        _targets(sec, sync)
    if unavailable is None:
        sec.raw["settings"] = _settings()
    _notes(sec, unavailable, huey)
    return sec


def _settings() -> dict[str, Any]:
    folder = tempfile.mkdtemp(prefix="asyncbg-bench-durable-")
    try:
        system = _AsyncBG(os.path.join(folder, "settings.db"), "FULL")
        try:
            keys = ("ASYNCBG_POLL_INTERVAL", "ASYNCBG_WORKER_CONCURRENCY")
            return {k: system.config.get(k) for k in keys}
        finally:
            system.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------- process A


def peer_main(argv: list[str]) -> int:
    """``peer asyncbg|huey PATH SYNC``: submit one job per "go GEN I" line, run none."""
    if len(argv) != 4 or argv[0] != "peer" or argv[1] not in ("asyncbg", "huey"):
        print("usage: python -m benchmarks.durable peer asyncbg|huey PATH SYNC", file=sys.stderr)
        return 2
    kind, path, sync = argv[1:]
    system: _AsyncBG | _Huey
    if kind == "asyncbg":
        logging.getLogger("asyncbg").setLevel(logging.ERROR)
        system = _AsyncBG(path, sync, ASYNCBG_WORKER_CONCURRENCY=0)
    else:
        system = _Huey(path, sync, consume=False)
    try:
        print("ready", flush=True)
        while True:
            parts = sys.stdin.readline().split()
            if not parts or parts[0] != "go":
                return 0
            gen, i = int(parts[1]), int(parts[2])
            sent = time.time()
            t0 = time.perf_counter()
            system.submit(gen, i, sent)
            print(f"ok {time.perf_counter() - t0!r}", flush=True)
    finally:
        system.close()


if __name__ == "__main__":
    # through the module's importable name, so that Huey's registry (which keys a
    # task by its function's module) names the job as the other process does
    from benchmarks.durable import peer_main as _peer_main

    sys.exit(_peer_main(sys.argv[1:]))

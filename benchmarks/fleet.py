"""Host processes on one server, driven over their stdin and stdout: the
machinery the PostgreSQL and Redis benchmarks share (``postgres.py``,
``redis.py``); each of those brings its subjects, its server and its targets.

Every "host" is its own OS process (``python -m benchmarks.<module> host KIND
URL ROLE``) running one subject's app with its own node; the coordinator only
drives them, one line per command and one per answer. Measured per subject
and trial, on a fresh database (or key space) of the server:

- the submit call, idle: how long ``submit`` holds a sync thread;
- submit-to-start in the same process: from just before the submit call to
  the job's first line (``time.perf_counter`` on both sides, in the host);
- submit-to-start from another host process: a second process that runs no
  jobs submits, the first one claims and runs the job; ``time.time()`` on both
  sides (one machine, one clock);
- jobs/s end to end from 1 and 4 submitting threads per host, with 1 and 3
  host processes: every host submits its share at the same moment, a job
  counts when its first line runs in whichever host claimed it; the rate is
  the jobs over the span from the first gate opening to the last job's start;
  with the CPU the hosts and the server used per job, and the bytes the
  server's log (PostgreSQL's WAL, Redis's AOF) grew by per job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .harness import Deadline, LineChild, Mode, Section, interleaved, median, percentile

TASK = "bench_fleet_stamp"  # the same name in every process and for every subject
START_TIMEOUT = 10.0  # a job that has not started by then fails the run
#: Jobs a worker runs at once in one host: asyncbg's default
#: ``ASYNCBG_WORKER_CONCURRENCY``, given to the peers' workers too.
CONCURRENCY = 32
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


TALLY = _Tally()


async def stamp(gen: int, i: int, sent: float) -> int:
    """The job of asyncbg and procrastinate (module level, JSON arguments)."""
    TALLY.hit(gen, i, sent)
    return i


async def ctx_stamp(ctx: Any, *, gen: int, i: int, sent: float) -> int:
    """The job of SAQ and arq: they pass their context first (arguments by keyword)."""
    TALLY.hit(gen, i, sent)
    return i


def sync_stamp(gen: int, i: int, sent: float) -> int:
    """The job of Huey and RQ, which run plain functions in their worker threads."""
    TALLY.hit(gen, i, sent)
    return i


# ----------------------------------------------------------- the subjects

Submit = Callable[[int, int, float], object]


class Unavailable(Exception):
    """This subject cannot run in this tree (asyncbg without the backend)."""


class System(Protocol):
    """One subject's app in a host process."""

    submit: Submit

    def make_submit(self) -> Submit:
        """A submit function for one submitting thread."""

    def settings(self) -> dict[str, Any]:
        """The settings the run notes."""

    def close(self) -> None:
        """Stop its workers and close its connections."""


class LoopThread:
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


def extra_config(env: str) -> dict[str, Any]:
    """The JSON object of ``ASYNCBG_*`` config keys in environment variable ``env``."""
    text = os.environ.get(env, "").strip()
    if not text:
        return {}
    config = json.loads(text)
    if not isinstance(config, dict) or not all(str(k).startswith("ASYNCBG_") for k in config):
        raise ValueError(f"{env}: a JSON object of ASYNCBG_* keys, not {text!r}")
    return config


class AsyncBGHost:
    """A Flask app with asyncbg on the backend at the URL and the task.

    Subclasses name the environment variable of extra config keys and the
    settings the run notes."""

    config_env = "ASYNCBG_BENCH_CONFIG"
    keys: tuple[str, ...] = ("ASYNCBG_WORKER_CONCURRENCY", "ASYNCBG_LEASE")

    def __init__(self, url: str, run: bool) -> None:
        from flask import Flask

        from asyncbg import AsyncBG, BackendUnavailable

        app = Flask("bench_fleet")
        app.config.update(
            ASYNCBG_HANDLE_SIGNALS=False, ASYNCBG_AUTOSTART=False, ASYNCBG_BACKEND=url
        )
        app.config.update(extra_config(self.config_env))
        if not run:
            app.config["ASYNCBG_WORKER_CONCURRENCY"] = 0
        try:
            self.bg = AsyncBG(app)
        except BackendUnavailable as e:
            raise Unavailable(f"BackendUnavailable: {e}") from e
        self.config = app.config
        task = self.bg.task(name=TASK)(stamp)
        self.submit: Submit = task.submit
        self.bg.start()

    def make_submit(self) -> Submit:
        return self.submit

    def settings(self) -> dict[str, Any]:
        return {k: self.config.get(k) for k in self.keys}

    def close(self) -> None:
        self.bg.stop(5)


class LoopWorkerHost:
    """A peer whose worker runs as a task on a loop thread, enqueued onto that
    loop from the submitting threads (SAQ, arq). Subclasses make ``enqueue``
    (a coroutine function of the job's keyword arguments) and the worker."""

    lt: LoopThread
    task: Any = None

    def start_worker(self, main: Callable[[], Any]) -> None:
        async def start() -> Any:
            return asyncio.ensure_future(main())

        self.task = self.lt.call(start())

    def bind(self, enqueue: Callable[..., Any]) -> None:
        lt = self.lt

        def submit(gen: int, i: int, sent: float) -> object:
            return lt.call(enqueue(gen=gen, i=i, sent=sent))

        self.submit: Submit = submit

    def make_submit(self) -> Submit:
        return self.submit

    def settings(self) -> dict[str, Any]:
        return {"concurrency": CONCURRENCY}

    async def stop(self) -> None:
        """Stop the worker and disconnect (on the loop thread)."""
        raise NotImplementedError

    async def _stop(self) -> None:
        await self.stop()
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    def close(self) -> None:
        try:
            self.lt.call(self._stop(), 30)
        finally:
            self.lt.close()


def start_huey_consumer(huey: Any, **options: Any) -> Any:
    """Huey's consumer of ``huey`` started in this process, as Huey's docs show
    for embedding it (``create_consumer(**options)`` then ``start()``), this
    process's signal handlers kept: ``start()`` installs SIGINT/SIGTERM/SIGHUP
    handlers for its ``run()`` loop, which is not used here."""
    consumer = huey.create_consumer(**options)
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    if hasattr(signal, "SIGHUP"):
        saved[signal.SIGHUP] = signal.getsignal(signal.SIGHUP)
    try:
        consumer.start()
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    return consumer


# ------------------------------------------------------------ a host process


class _Load:
    """``threads`` threads submitting ``per`` jobs each once the gate opens."""

    def __init__(self, system: System, gen: int, per: int, threads: int, cap: float) -> None:
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
            submit = self.system.make_submit()  # a bare baseline: this thread's connection
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


def _idle(system: System, n: int, seed: str, cap: float) -> tuple[list[float], list[float]]:
    """Paced samples in this process: (submit calls, submit-to-start), seconds."""
    rng = random.Random(seed)
    deadline = Deadline(cap)
    calls: list[float] = []
    starts: list[float] = []
    perf = time.perf_counter
    for i in range(n):
        gen = 1_000_000 + i
        TALLY.arm(gen)
        event = TALLY.event
        t0 = perf()
        system.submit(gen, i, time.time())
        calls.append(perf() - t0)
        if not event.wait(START_TIMEOUT):
            raise RuntimeError(f"a job did not start within {START_TIMEOUT:.0f} s")
        starts.append(TALLY.perf[i] - t0)
        # each sample finds the workers idle, at a random point of any polling
        time.sleep(rng.uniform(0.0003, 0.005))
        if deadline.passed():
            break
    return calls, starts


class _Commands:
    """What a host process answers: one method per command, one line per answer."""

    def __init__(self, system: System, say: Callable[..., None]) -> None:
        self.system = system
        self.say = say
        self.load: _Load | None = None

    def idle(self, n: str, seed: str, cap: str) -> None:
        calls, starts = _idle(self.system, int(n), seed, float(cap))
        self.say("idle", json.dumps({"calls": calls, "starts": starts}))

    def watch(self, gen: str) -> None:
        """Arm for one job that another process submits."""
        TALLY.arm(int(gen))
        self.say("watching")

    def submit(self, gen: str, i: str) -> None:
        t0 = time.perf_counter()
        self.system.submit(int(gen), int(i), time.time())
        self.say("ok", repr(time.perf_counter() - t0))

    def wait(self, i: str) -> None:
        """The lag of job ``i`` once it has started here."""
        if TALLY.event.wait(START_TIMEOUT):
            self.say("hit", repr(TALLY.lag[int(i)]))
        else:
            self.say("late")

    def arm(self, gen: str, per: str, threads: str, cap: str) -> None:
        TALLY.arm(int(gen))
        self.load = _Load(self.system, int(gen), int(per), int(threads), float(cap))
        self.say("armed")

    def go(self) -> None:
        assert self.load is not None
        t0, sent, calls = self.load.go()
        self.load = None
        self.say("sent", sent, repr(t0), json.dumps(calls))

    def count(self) -> None:
        with TALLY.lock:
            hits, last = TALLY.hits, TALLY.last
        errors = getattr(self.system, "errors", None)
        if errors:
            raise RuntimeError(f"a consumer failed: {errors[0]!r}")
        self.say("count", hits, repr(last))


def host_main(
    module: str,
    argv: list[str],
    classes: Mapping[str, Callable[[str, bool], System]],
    quiet: Sequence[str] = (),
) -> int:
    """``host KIND URL run|submit``: one subject's app; one answer per command line.

    ``quiet``: loggers set to ERROR (the peers' own chatter).
    """
    if len(argv) != 4 or argv[0] != "host" or argv[1] not in classes:
        print(
            f"usage: python -m {module} host KIND URL run|submit (KIND: {', '.join(classes)})",
            file=sys.stderr,
        )
        return 2
    kind, url, role = argv[1:]
    for name in ("asyncbg", *quiet):
        logging.getLogger(name).setLevel(logging.ERROR)
    out = sys.stdout

    def say(*words: object) -> None:
        out.write(" ".join(str(w) for w in words) + "\n")
        out.flush()

    try:
        system = classes[kind](url, role == "run")
    except Unavailable as e:
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


class Host(LineChild):
    """One host process, driven over its stdin and stdout."""

    def __init__(self, module: str, kind: str, url: str, role: str) -> None:
        super().__init__(module, ["host", kind, url, role])
        self.what = [kind, url, role]
        try:
            first = self.expect("ready", "unavailable", timeout=120)
        except BaseException:
            self.close()
            raise
        if first[0] == "unavailable":
            self.close()
            raise Unavailable(json.loads(first[1]))
        self.settings: dict[str, Any] = json.loads(first[1])

    def send(self, *words: object) -> None:
        super().send(" ".join(str(w) for w in words))

    def expect(self, *words: str, timeout: float = START_TIMEOUT + 5) -> list[str]:
        line = self.next_line(timeout)
        parts = (line or "").rstrip("\n").split(" ", 1)
        if parts[0] not in words:
            raise RuntimeError(
                f"host {self.what!r}: expected {'/'.join(words)}, got "
                f"{(line or '(its end)')[:200]!r}; its stderr ends: {self.stderr_tail(3000)}"
            )
        return parts + [""] * (2 - len(parts))

    def ask(self, *words: object, answer: str, timeout: float = START_TIMEOUT + 5) -> str:
        self.send(*words)
        return self.expect(answer, timeout=timeout)[1]

    def close(self, wait: float = 30.0) -> None:
        super().close(wait)


@contextlib.contextmanager
def hosts(module: str, kind: str, url: str, roles: list[str]) -> Iterator[list[Host]]:
    """Host processes started one after the other (the first migrates), all
    closed at the end."""
    made: list[Host] = []
    try:
        for role in roles:
            made.append(Host(module, kind, url, role))
        yield made
    finally:
        for h in made:  # every one asked first: they stop at the same time
            with contextlib.suppress(Exception):
                h.send("quit")
        for h in made:
            with contextlib.suppress(Exception):
                h.close()


_GENS = iter(range(1, 1 << 60))


def _remote(
    runner: Host, submitter: Host, n: int, deadline: Deadline, rng: random.Random
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


def cpu(pids: list[int]) -> float | None:
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


def children(parent: int) -> list[int]:
    """``parent`` and the processes whose parent it is."""
    found = [parent]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == parent:
                found.append(int(entry))
    return found


class Server(Protocol):
    """The run's server, as the measurements see it."""

    def pids(self) -> list[int]:
        """Its processes on this machine (none when it runs elsewhere)."""

    def log_bytes(self) -> int:
        """How far its log (WAL, AOF) has grown so far, in bytes."""

    def database(self, prefix: str) -> contextlib.AbstractContextManager[str]:
        """A fresh database (or key space) for one trial: its URL, dropped after."""


def _jobs(
    hosts: list[Host], server: Server, per_host: int, threads: int, deadline: Deadline
) -> dict[str, Any]:
    """Every host submits ``per_host`` jobs from ``threads`` threads at once:
    {"rate": jobs/s end to end, "calls": every submit call, "host cpu" and
    "server cpu": CPU seconds per job of the host processes and of the
    server's processes over the measurement, when they can be read; "log":
    bytes of the server's log per job, the whole server's, so one subject at
    a time}."""
    gen = next(_GENS)
    per = max(1, per_host // threads)
    cap = max(1.0, deadline.end - time.monotonic())
    for h in hosts:
        h.send("arm", gen, per, threads, repr(cap))
    for h in hosts:
        h.expect("armed")
    pids = [h.proc.pid for h in hosts]
    host_cpu, server_pids = cpu(pids), server.pids()
    server_cpu = cpu(server_pids)
    log = server.log_bytes()
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
            res["log"] = (server.log_bytes() - log) / total
            after = cpu(pids)
            if host_cpu is not None and after is not None:
                res["host cpu"] = (after - host_cpu) / total
            # a server process that started meanwhile (a backend) counts from zero
            after = cpu([p for p in server.pids() if p in server_pids])
            if server_cpu is not None and after is not None:
                joined = cpu([p for p in server.pids() if p not in server_pids]) or 0.0
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


# ------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Spec:
    """What one benchmark of this shape is: its module, subjects and targets."""

    section: str  # the section's name in the report
    module: str  # the importable module whose ``host`` command runs the subjects
    subjects: Mapping[str, str]  # subject name -> host KIND
    asyncbg: str  # the subject name of asyncbg
    peers: tuple[str, ...]  # the libraries the jobs/s target compares asyncbg with
    bare: str  # the floor: idle rows and submit calls are compared with it
    log: str  # the metric name of the server's log growth ("WAL per job")
    prepare: Callable[[str, str], None]  # (kind, url): the subject's schema, before any host
    need: float = 3.0  # asyncbg's jobs/s, at least this many times the fastest peer's
    other_start_ms: float = 20.0  # the target for the cross-host start p50


def _put_jobs(spec: Spec, figures: Figures, group: str, res: dict[str, Any]) -> None:
    figures[(group, "jobs/s")] = res["rate"]
    _put(figures, group, "submit call", res["calls"], 1e6)
    for what in ("host cpu", "server cpu"):
        if what in res:
            figures[(group, f"{what} per job")] = res[what] * 1e6
    if "log" in res:
        figures[(group, spec.log)] = res["log"]


def _trial(
    spec: Spec, kind: str, server: Server, mode: Mode, deadline: Deadline, rng: random.Random
) -> tuple[Figures, dict[str, Any]]:
    """Every figure of one subject, on a fresh database."""
    figures: Figures = {}
    raw: dict[str, Any] = {}
    with server.database(f"bench_{kind}") as url:
        spec.prepare(kind, url)
        with hosts(spec.module, kind, url, ["run"]) as (first,):
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
            with hosts(spec.module, kind, url, ["submit"]) as (other,):
                n = max(5, mode.postgres_samples // 2)
                lags, calls = _remote(first, other, n, deadline, rng)
            _put(figures, "other", "start", lags, 1e3)
            _put(figures, "other", "submit call", calls, 1e6)
            raw["other host start"] = lags
            for threads in THREADS:
                res = _jobs([first], server, mode.postgres_jobs, threads, deadline)
                _put_jobs(spec, figures, f"1x{threads}", res)
            # even past the deadline (every loop below is bounded in count and
            # time): a trial always has every group
            if max(HOSTS) > 1:
                with hosts(spec.module, kind, url, ["run"] * (max(HOSTS) - 1)) as more:
                    everyone = [first, *more]
                    for threads in THREADS:
                        res = _jobs(everyone, server, mode.postgres_jobs, threads, deadline)
                        _put_jobs(spec, figures, f"{len(everyone)}x{threads}", res)
    return figures, raw


def groups() -> dict[str, str]:
    """Group key -> the group's title in the report."""
    out = {
        "idle": "idle, same process",
        "other": "idle, submitted by another host process",
    }
    for n in HOSTS:
        for threads in THREADS:
            out[f"{n}x{threads}"] = (
                f"jobs from {n} host{'s' if n > 1 else ''} x {threads} "
                f"thread{'s' if threads > 1 else ''}"
            )
    return out


def _unit(spec: Spec, metric: str) -> str:
    if metric == "jobs/s":
        return "1/s"
    if metric == spec.log:
        return "B"
    return "ms" if metric.startswith("start") else "us"


def _fastest_peer(spec: Spec, sec: Section, group: str) -> str | None:
    best: tuple[float, str] | None = None
    for name in spec.peers:
        row = sec.find(group, name, "jobs/s")
        if row is not None and row.value == row.value and (best is None or row.value > best[0]):
            best = (row.value, name)
    return None if best is None else best[1]


def _add_rows(spec: Spec, sec: Section, res: dict[str, list[Any]]) -> None:
    for key, group in groups().items():
        for name, trials in res.items():
            metrics = sorted({m for figures, _ in trials for (k, m) in figures if k == key})
            metrics.sort(key=lambda m: (m != "jobs/s", not m.startswith("submit"), m))
            for metric in metrics:
                vals = [figures[(key, metric)] for figures, _ in trials if (key, metric) in figures]
                sec.add(group, name, metric, median(vals), _unit(spec, metric))
        if key in ("idle", "other"):
            for metric in {r.metric for r in sec.rows if r.group == group}:
                sec.ratio(group, metric, spec.bare)
            continue
        # jobs/s against the fastest peer in this group; the rest against the floor
        fast = _fastest_peer(spec, sec, group)
        if fast is not None:
            sec.ratio(group, "jobs/s", fast)
        for metric in {r.metric for r in sec.rows if r.group == group} - {"jobs/s"}:
            sec.ratio(group, metric, spec.bare)
        _throughput_target(spec, sec, group)
    for name, trials in res.items():
        sec.raw.setdefault("samples", {})[name] = {
            what: [x for _, raw in trials for x in raw.get(what, [])]
            for what in ("start", "other host start")
        }
        sec.raw.setdefault("settings", {})[name] = trials[0][1].get("settings") if trials else None


def _throughput_target(spec: Spec, sec: Section, group: str) -> None:
    row = sec.find(group, spec.asyncbg, "jobs/s")
    if row is None:
        return
    parts: list[str] = []
    met = row.value == row.value
    fast = _fastest_peer(spec, sec, group)
    for base, need in ((fast, spec.need), (spec.bare, None)):
        b = None if base is None else sec.find(group, base, "jobs/s")
        label = base or "/".join(spec.peers)
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


def asyncbg_note(spec: Spec, sec: Section, unavailable: str | None, config_env: str) -> None:
    """The note on asyncbg's settings in this run, or on why it is missing."""
    if unavailable is not None:
        sec.notes.append(
            f"{spec.asyncbg}: not available in this tree ({unavailable}); its rows and "
            f"targets are missing from this run: jobs/s >= {spec.need:.0f}x the fastest of "
            f"{', '.join(spec.peers)}, cross-host submit-to-start p50 <= "
            f"{spec.other_start_ms:g} ms"
        )
        return
    s = (sec.raw.get("settings") or {}).get(spec.asyncbg) or {}
    extra = extra_config(config_env)
    which = f"{config_env} {json.dumps(extra)}, otherwise its defaults" if extra else "defaults"
    sec.notes.append(
        f"{spec.asyncbg}: {which} ({', '.join(f'{k} {v!r}' for k, v in s.items())}); the "
        "submitting host of the cross-host rows runs ASYNCBG_WORKER_CONCURRENCY=0"
    )


def _probe(spec: Spec, server: Server) -> str | None:
    """Why asyncbg cannot run on this server in this tree, or None if it can."""
    kind = spec.subjects[spec.asyncbg]
    try:
        with server.database("bench_probe") as url, hosts(spec.module, kind, url, ["submit"]):
            return None
    except Unavailable as e:
        return str(e)


def run(
    spec: Spec, server: Server, mode: Mode, installed: Callable[[str], bool]
) -> tuple[Section, str | None, list[str]]:
    """Every subject's trials, interleaved, into a section with its ratios and
    the throughput targets: (the section, why asyncbg could not run or None,
    the subjects not installed). The caller adds its targets and notes."""
    sec = Section(spec.section)
    unavailable = _probe(spec, server)
    names: list[str] = []
    missing: list[str] = []
    for name in spec.subjects:
        if name == spec.asyncbg:
            if unavailable is None:
                names.append(name)
        else:
            (names if installed(name) else missing).append(name)
    deadline = Deadline(mode.time_budget)
    rng = random.Random(spec.section)

    def trial(name: str) -> Callable[[], tuple[Figures, dict[str, Any]]]:
        def one() -> tuple[Figures, dict[str, Any]]:
            return _trial(spec, spec.subjects[name], server, mode, deadline, rng)

        return one

    res = interleaved({name: trial(name) for name in names}, mode.trials, deadline)
    _add_rows(spec, sec, res)
    sec.target(
        groups()["other"],
        spec.asyncbg,
        "start p50",
        f"<= {spec.other_start_ms:g} ms",
        lambda r: r.value <= spec.other_start_ms,
    )
    return sec, unavailable, missing

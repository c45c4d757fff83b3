"""What every benchmark shares: run modes, interleaved trials, contention, statistics."""

from __future__ import annotations

import contextlib
import gc
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Mode:
    """How big and how long each benchmark is in one run."""

    name: str
    trials: int
    latency_samples: int  # per trial and subject, idle
    contended_samples: int  # per trial and subject, with a GIL-hungry thread
    poll_samples: int  # the seed poller sleeps up to 1 s per sample
    throughput_jobs: int
    queue_items: int
    periodic_ticks: int
    periodic_trials: int
    http_seconds: float
    http_trials: int
    view_calls: int
    shutdown_queued: int
    shutdown_running: int
    shutdown_timeout: float
    memory_items: int
    history_bound: int
    durable_jobs: int  # per jobs/s measurement of the durable benchmark
    durable_samples: int  # latency samples per trial and subject (half across processes)
    time_budget: float = 600.0  # per benchmark, seconds; loops stop early past it
    postgres_jobs: int = 30  # per host and jobs/s measurement of the PostgreSQL benchmark
    postgres_samples: int = 10  # latency samples per trial and subject (half across hosts)


MODES: Mapping[str, Mode] = {
    "smoke": Mode(
        "smoke",
        trials=1,
        latency_samples=20,
        contended_samples=4,
        poll_samples=1,
        throughput_jobs=1000,
        queue_items=1000,
        periodic_ticks=10,
        periodic_trials=1,
        http_seconds=0.5,
        http_trials=1,
        view_calls=50,
        shutdown_queued=200,
        shutdown_running=20,
        shutdown_timeout=0.2,
        memory_items=2000,
        history_bound=100,
        durable_jobs=30,
        durable_samples=10,
        time_budget=20.0,
        postgres_jobs=30,
        postgres_samples=10,
    ),
    "quick": Mode(
        "quick",
        trials=3,
        latency_samples=300,
        contended_samples=30,
        poll_samples=3,
        throughput_jobs=30_000,
        queue_items=30_000,
        periodic_ticks=150,
        periodic_trials=1,
        http_seconds=2.0,
        http_trials=2,
        view_calls=1000,
        shutdown_queued=10_000,
        shutdown_running=1000,
        shutdown_timeout=0.5,
        memory_items=100_000,
        history_bound=1000,
        durable_jobs=300,
        durable_samples=60,
        time_budget=60.0,
        postgres_jobs=500,
        postgres_samples=40,
    ),
    "full": Mode(
        "full",
        trials=5,
        latency_samples=1000,
        contended_samples=60,
        poll_samples=5,
        throughput_jobs=100_000,
        queue_items=100_000,
        periodic_ticks=500,
        periodic_trials=3,
        http_seconds=5.0,
        http_trials=3,
        view_calls=3000,
        shutdown_queued=10_000,
        shutdown_running=1000,
        shutdown_timeout=1.0,
        memory_items=100_000,
        history_bound=1000,
        durable_jobs=2000,
        durable_samples=200,
        time_budget=600.0,
        postgres_jobs=1000,
        postgres_samples=150,
    ),
}


class Deadline:
    """A time budget: every load loop checks it so that nothing runs unbounded."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def passed(self) -> bool:
        return time.monotonic() >= self.end


@contextlib.contextmanager
def gil_hog(enabled: bool = True) -> Iterator[None]:
    """Run a thread that wants the GIL all the time (pure Python arithmetic)."""
    if not enabled:
        yield
        return
    stop = threading.Event()
    started = threading.Event()

    def spin() -> None:
        started.set()
        x = 0
        while not stop.is_set():
            for _ in range(2000):
                x += 1

    t = threading.Thread(target=spin, name="gil-hog", daemon=True)
    t.start()
    started.wait(5)
    try:
        yield
    finally:
        stop.set()
        t.join(10)


def interleaved(
    subjects: Mapping[str, Callable[[], Any]], trials: int, deadline: Deadline | None = None
) -> dict[str, list[Any]]:
    """Call every subject once per trial, the order rotated each trial.

    Machines drift in speed minute to minute: rotating spreads that drift over
    all subjects instead of penalising whoever runs last.
    """
    names = list(subjects)
    out: dict[str, list[Any]] = {n: [] for n in names}
    for t in range(trials):
        k = t % len(names)
        for name in names[k:] + names[:k]:
            gc.collect()
            out[name].append(subjects[name]())
        if deadline is not None and deadline.passed():
            break
    return out


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    i = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[i]


def median(values: list[float]) -> float:
    vals = [v for v in values if v == v]
    return statistics.median(vals) if vals else float("nan")


@dataclass
class Row:
    """One line of the results table."""

    group: str
    subject: str
    metric: str
    value: float
    unit: str
    baseline: str | None = None  # the subject this row's ratio is taken against
    ratio: float | None = None
    target: str | None = None
    met: bool | None = None


@dataclass
class Section:
    """What one benchmark returns: rows for the table, raw data for JSON and charts."""

    name: str
    rows: list[Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, group: str, subject: str, metric: str, value: float, unit: str) -> Row:
        row = Row(group, subject, metric, value, unit)
        self.rows.append(row)
        return row

    def find(self, group: str, subject: str, metric: str) -> Row | None:
        for r in self.rows:
            if (r.group, r.subject, r.metric) == (group, subject, metric):
                return r
        return None

    def ratio(self, group: str, metric: str, baseline: str) -> None:
        """Fill in every row's ratio to ``baseline``'s value in the same group/metric."""
        base = self.find(group, baseline, metric)
        if base is None or not base.value:
            return
        for r in self.rows:
            if r.group == group and r.metric == metric:
                r.baseline = baseline
                r.ratio = r.value / base.value

    def target(
        self, group: str, subject: str, metric: str, text: str, ok: Callable[[Row], bool]
    ) -> None:
        row = self.find(group, subject, metric)
        if row is None:
            return
        row.target = text
        row.met = bool(ok(row)) if row.value == row.value else False


ROOT = Path(__file__).resolve().parent.parent


class LineChild:
    """A child Python process (``python -m MODULE ARGV...``, with this tree first
    on its path) driven one line at a time over its stdin and stdout; its stderr
    is kept to quote when it answers something unexpected."""

    def __init__(self, module: str, argv: list[str]) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.err = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed by close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *argv],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err,
            text=True, bufsize=1, cwd=ROOT, env=env,
        )  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def send(self, line: str) -> None:
        """Write one line to the child's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def next_line(self, timeout: float) -> str | None:
        """The child's next line (None at its end), or a line saying nothing came."""
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return f"(nothing within {timeout:.0f} s)"

    def stderr_tail(self, chars: int) -> str:
        """The last ``chars`` characters the child wrote to its stderr."""
        self.err.seek(0)
        return self.err.read()[-chars:]

    def close(self, wait: float = 10.0) -> None:
        """Ask the child to quit, wait ``wait`` seconds, then kill it by its PID."""
        try:
            if self.proc.poll() is None:
                with contextlib.suppress(OSError, ValueError):
                    self.send("quit")
                try:
                    self.proc.wait(wait)
                except subprocess.TimeoutExpired:
                    self.proc.kill()  # by its PID
                    self.proc.wait(10)
        finally:
            for f in (self.proc.stdin, self.proc.stdout):
                if f is not None:
                    with contextlib.suppress(OSError, ValueError):
                        f.close()
            self.err.close()

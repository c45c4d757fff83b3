"""4. HTTP under Hypercorn (loopback, bounded in time) and per-request cost of views.

Load comes from ``wrk`` when it is installed (Debian's ``wrk`` package; .ci/run
installs it), otherwise from a bounded Python client with keep-alive connections.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .harness import Deadline, Mode, Section, interleaved, median, percentile

ROOT = Path(__file__).resolve().parent.parent
CONNECTIONS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def hypercorn(with_asyncbg: bool) -> Iterator[str]:
    """Serve benchmarks.http_app under Hypercorn (one worker) on 127.0.0.1."""
    port = _free_port()
    env = dict(os.environ, BENCH_ASYNCBG="1" if with_asyncbg else "0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [
        sys.executable, "-m", "hypercorn", "--bind", f"127.0.0.1:{port}", "--workers", "1",
        "--log-level", "warning", "benchmarks.http_app:app",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = Deadline(30)
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"hypercorn exited at start: {err[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/noop")
                if conn.getresponse().status == 200:
                    conn.close()
                    break
            except OSError:
                if deadline.passed():
                    raise RuntimeError("hypercorn did not answer within 30 s") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def _wrk(url: str, seconds: float) -> tuple[float, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s", "--latency", url],
        capture_output=True, text=True, timeout=seconds + 30, check=True,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    p99 = float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")
    return rps, p99


def _python_client(url: str, seconds: float, max_requests: int = 200_000) -> tuple[float, float]:
    host_port, path = url.removeprefix("http://").split("/", 1)
    host, port = host_port.split(":")
    deadline = Deadline(seconds)
    lat: list[list[float]] = [[] for _ in range(CONNECTIONS)]
    per = max_requests // CONNECTIONS

    def client(out: list[float]) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        for _ in range(per):
            t0 = time.perf_counter()
            conn.request("GET", "/" + path)
            conn.getresponse().read()
            out.append(time.perf_counter() - t0)
            if deadline.passed():
                break
        conn.close()

    t0 = time.perf_counter()
    ts = [threading.Thread(target=client, args=(o,), daemon=True) for o in lat]
    for t in ts:
        t.start()
    for t in ts:
        t.join(seconds + 30)
    elapsed = time.perf_counter() - t0
    flat = [x for o in lat for x in o]
    return len(flat) / elapsed, percentile(flat, 99)


def load(url: str, seconds: float) -> tuple[float, float]:
    """req/s and p99 latency (s) of GET ``url`` for ``seconds``."""
    if shutil.which("wrk"):
        return _wrk(url, seconds)
    return _python_client(url, seconds)


def _view_cost(app: object, path: str, n: int, deadline: Deadline) -> float:
    client = app.test_client()  # type: ignore[attr-defined]
    for _ in range(min(50, n)):
        client.get(path)
    t0 = time.perf_counter()
    done = 0
    for _ in range(n):
        client.get(path)
        done += 1
        if done % 100 == 0 and deadline.passed():
            break
    return (time.perf_counter() - t0) / done


def run(mode: Mode) -> Section:
    sec = Section("http")
    sec.notes.append(f"load generator: {'wrk' if shutil.which('wrk') else 'python client'}")
    # Per-request cost through Flask's test client: no server, no network.
    from .http_app import create_app

    stock = create_app(False)
    ours = create_app(True)
    group = "per request, test client"
    deadline = Deadline(mode.time_budget)
    n = mode.view_calls
    try:
        res = interleaved(
            {
                "sync view": lambda: _view_cost(stock, "/noop", n, deadline),
                "stock Flask async view": lambda: _view_cost(stock, "/async", n, deadline),
                "asyncbg async view": lambda: _view_cost(ours, "/async", n, deadline),
                "sync view submitting a job": lambda: _view_cost(ours, "/submit", n, deadline),
            },
            mode.trials,
        )
    finally:
        ours.extensions["asyncbg"].stop(5)
    for name, vals in res.items():
        sec.add(group, name, "cost", median(vals) * 1e6, "us")
    sec.ratio(group, "cost", "stock Flask async view")
    sec.target(group, "asyncbg async view", "cost", "<= 0.5x stock async", lambda r: r.ratio <= 0.5)

    # The same views served by Hypercorn, under load.
    group = f"Hypercorn, {CONNECTIONS} connections"
    with hypercorn(True) as ours_url, hypercorn(False) as stock_url:
        targets = {
            "sync no-op view": ours_url + "/noop",
            "sync view submitting a job": ours_url + "/submit",
            "stock Flask async view": stock_url + "/async",
            "asyncbg async view": ours_url + "/async",
        }
        for url in targets.values():
            load(url, 1.0 if mode.name != "smoke" else 0.2)  # warm up
        res = interleaved(
            {name: (lambda u=u: load(u, mode.http_seconds)) for name, u in targets.items()},
            mode.http_trials,
        )
    for name, vals in res.items():
        sec.add(group, name, "req/s", median([v[0] for v in vals]), "1/s")
        sec.add(group, name, "p99", median([v[1] for v in vals]) * 1e3, "ms")
    sec.ratio(group, "req/s", "sync no-op view")
    sec.ratio(group, "p99", "sync no-op view")
    sec.target(
        group, "sync view submitting a job", "req/s", ">= 0.9x no-op view", lambda r: r.ratio >= 0.9
    )
    base = sec.find(group, "stock Flask async view", "req/s")
    row = sec.find(group, "asyncbg async view", "req/s")
    if base is not None and row is not None and base.value:
        row.target = f"vs stock async: {row.value / base.value:.2f}x"
    return sec

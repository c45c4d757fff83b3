"""Real ``hypercorn`` (and ``flask run``) subprocesses for the deployment tests.

A :class:`Server` runs the repo's ``hypercorn.toml`` with the bind overridden to
port 0 on loopback (the kernel picks a free port; the test reads it from
Hypercorn's "Running on" line), in its own process group so a test can send
Ctrl-C the way a terminal does and teardown can kill every process it made.
Everything waits on the process's output or on HTTP answers, with deadlines.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HYPERCORN_TOML = REPO / "hypercorn.toml"

#: Upper bound of every wait: generous for a loaded 2-core machine, short
#: enough that a broken behaviour fails instead of hanging.
WAIT = 30.0

_RUNNING_ON = re.compile(r"Running on http://127\.0\.0\.1:(\d+)")
REPORT = re.compile(
    r"\[(?P<pid>\d+)\].*asyncbg shutdown: (?P<completed>\d+) completed, "
    r"(?P<cancelled>\d+) cancelled, (?P<queued>\d+) still queued"
)


@dataclass
class Reply:
    """An HTTP answer: status, headers (lower-case names) and the JSON body."""

    status: int
    headers: dict[str, str]
    body: Any


def hypercorn_command() -> list[str]:
    """The ``hypercorn`` console script of the running interpreter's environment."""
    script = Path(sys.executable).with_name("hypercorn")
    return [str(script)] if script.exists() else [sys.executable, "-m", "hypercorn"]


class Output:
    """Lines a subprocess prints (stdout and stderr together), waitable."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def matches(self, pattern: str | re.Pattern[str]) -> list[re.Match[str]]:
        """Every line matching ``pattern`` so far."""
        rx = re.compile(pattern)
        with self._cond:
            return [m for line in self.lines if (m := rx.search(line))]

    def wait_for(
        self, pattern: str | re.Pattern[str], count: int = 1, timeout: float = WAIT
    ) -> list[re.Match[str]]:
        """Wait until ``count`` lines match ``pattern``; return the matches.

        :raises AssertionError: on timeout or if the process closed its output first.
        """
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for line in self.lines if (m := rx.search(line))]
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    why = "the process ended" if self._closed else f"{timeout}s passed"
                    raise AssertionError(
                        f"{why} before {count} line(s) matched {rx.pattern!r}; output:\n"
                        + "\n".join(self.lines)
                    )
                self._cond.wait(remaining)

    def join(self, timeout: float = WAIT) -> None:
        self._thread.join(timeout)


class Server:
    """``hypercorn --config hypercorn.toml <app>`` on 127.0.0.1, port chosen by the kernel.

    :param app: the application path given to Hypercorn.
    :param workers: overrides ``workers`` of the toml when not None (so do
        ``graceful_timeout`` and ``worker_class``).
    :param config: ``DEMO_*``/``ASYNCBG_*`` settings, passed as ``FLASK_<KEY>``.
    :param env: more environment variables for the server.
    :param host: the address to bind and to send requests to (loopback by
        default; a network namespace's address for the partition tests).
    :param prefix: a command the server runs under (``ip netns exec NAME``,
        which execs it: the process is still the one started here).
    """

    def __init__(
        self,
        tmp_path: Path,
        app: str = "asyncbg.demo:asgi_app",
        *,
        workers: int | None = None,
        graceful_timeout: int | None = None,
        worker_class: str | None = None,
        config: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        prefix: Sequence[str] = (),
    ) -> None:
        self.workers = workers
        self.host = host
        self._running_on = re.compile(rf"Running on http://{re.escape(host)}:(\d+)")
        args = [*prefix, *hypercorn_command(), "--config", str(HYPERCORN_TOML)]
        args += ["--bind", f"{host}:0"]
        if workers is not None:
            args += ["--workers", str(workers)]
        if graceful_timeout is not None:
            args += ["--graceful-timeout", str(int(graceful_timeout))]
        if worker_class is not None:
            args += ["--worker-class", worker_class]
        args.append(app)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        env.pop("WERKZEUG_RUN_MAIN", None)
        settings = {"ASYNCBG_LOCK_DIR": str(tmp_path / "locks"), **(config or {})}
        for key, value in settings.items():
            env[f"FLASK_{key}"] = value if isinstance(value, str) else json.dumps(value)
        self.proc = subprocess.Popen(
            args,
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, like a shell job
        )
        self.pid = self.proc.pid
        assert self.proc.stdout is not None
        self.output = Output(self.proc.stdout)
        self.port = 0

    def wait_ready(self, timeout: float = WAIT) -> Server:
        """Wait until every worker listens and the app answers; return self."""
        expected = max(1, self.workers or 1)
        found = self.output.wait_for(self._running_on, count=expected, timeout=timeout)
        self.port = int(found[0].group(1))
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.get("/").status == 200:
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.05)  # polling a socket that is about to answer, under a deadline

    def worker_pids(self) -> set[int]:
        """PIDs of the processes that logged "Running on" (the workers)."""
        return {int(m.group(1)) for m in self.output.matches(r"\[(\d+)\] \[INFO\] Running on")}

    # -- HTTP ---------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = WAIT,
    ) -> Reply:
        """Send one request (a new connection each time) and return the JSON reply."""
        hdrs = dict(headers or {})
        if json_body is not None:
            data = json.dumps(json_body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        req = urllib.request.Request(
            f"http://{self.host}:{self.port}{path}", data=data, headers=hdrs, method=method
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw, resp_headers = resp.status, resp.read(), resp.headers
        except urllib.error.HTTPError as err:
            status, raw, resp_headers = err.code, err.read(), err.headers
        body = json.loads(raw) if raw else None
        return Reply(status, {k.lower(): v for k, v in resp_headers.items()}, body)

    def get(self, path: str, **kwargs: Any) -> Reply:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, json_body: Any = None, **kwargs: Any) -> Reply:
        return self.request("POST", path, json_body=json_body, **kwargs)

    # -- signals and exit ------------------------------------------------------------

    def send(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the Hypercorn process itself (the supervisor with workers >= 1)."""
        os.kill(self.pid, sig)

    def ctrl_c(self) -> None:
        """SIGINT to the whole process group, as a terminal's Ctrl-C does."""
        os.killpg(self.pid, signal.SIGINT)

    def wait_exit(self, timeout: float = WAIT) -> int:
        """Wait for the process to exit and return its exit code.

        :raises AssertionError: after ``timeout``, with the output so far.
        """
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"still running after {timeout}s; output:\n{self.output.text()}"
            ) from None
        self.output.join()
        return code

    def kill(self) -> None:
        """SIGKILL the whole process group (workers included) and reap the process."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(WAIT)
        self.output.join()


class WorkerConnections:
    """Keep-alive connections pinned to chosen workers of a ``workers >= 1`` server.

    Hypercorn's workers share one listening socket: the kernel hands each new
    connection to one worker, which serves every request on it. Connections are
    opened until one lands on the worker wanted (``GET whoami_path`` answers
    ``{"pid": ...}``); the others are kept for their own workers. A connection
    the server closes (Hypercorn ends one after ``keep_alive_max_requests``) is
    replaced the same way.
    """

    def __init__(self, server: Server, whoami_path: str = "/whoami", attempts: int = 400) -> None:
        self.server = server
        self.whoami_path = whoami_path
        self.attempts = attempts
        self._idle: dict[int, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()

    def _open(self) -> tuple[int, http.client.HTTPConnection]:
        conn = http.client.HTTPConnection(self.server.host, self.server.port, timeout=WAIT)
        conn.request("GET", self.whoami_path)
        resp = conn.getresponse()
        pid = int(json.loads(resp.read())["pid"])
        return pid, conn

    def checkout(self, pid: int) -> http.client.HTTPConnection:
        """A connection served by the worker ``pid`` (for one thread at a time).

        :raises AssertionError: if no new connection landed on it in ``attempts`` tries.
        """
        with self._lock:
            idle = self._idle.get(pid)
            if idle:
                return idle.pop()
        for _ in range(self.attempts):
            got, conn = self._open()
            if got == pid:
                return conn
            with self._lock:
                spare = self._idle.setdefault(got, [])
                if len(spare) < 2:
                    spare.append(conn)
                    continue
            conn.close()
        raise AssertionError(f"no connection landed on worker {pid} in {self.attempts} tries")

    def checkin(self, pid: int, conn: http.client.HTTPConnection) -> None:
        """Give back a connection taken with :meth:`checkout`."""
        with self._lock:
            self._idle.setdefault(pid, []).append(conn)

    def get(self, pid: int, path: str) -> Reply:
        """``GET path`` served by the worker ``pid``."""
        return self.request(pid, "GET", path)

    def request(self, pid: int, method: str, path: str, json_body: Any = None) -> Reply:
        """One request served by the worker ``pid``. A kept connection the server
        has closed meanwhile (idle past its keep-alive timeout, or at its request
        limit) is dropped with the others kept for ``pid``, and the request is
        sent once more on a new one."""
        body = None if json_body is None else json.dumps(json_body).encode()
        sent = {} if body is None else {"Content-Type": "application/json"}
        for last in (False, True):
            conn = self.checkout(pid)
            try:
                conn.request(method, path, body=body, headers=sent)
                resp = conn.getresponse()
                raw = resp.read()
            except (http.client.RemoteDisconnected, ConnectionError, http.client.BadStatusLine):
                conn.close()
                if last:
                    raise
                with self._lock:
                    stale = self._idle.pop(pid, [])
                for old in stale:
                    old.close()
                continue
            headers = {k.lower(): v for k, v in resp.getheaders()}
            if resp.will_close:
                conn.close()
            else:
                self.checkin(pid, conn)
            return Reply(resp.status, headers, json.loads(raw) if raw else None)
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        with self._lock:
            for conns in self._idle.values():
                for conn in conns:
                    conn.close()
            self._idle.clear()


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    """Wait for ``server`` to be ready; kill its process group when done."""
    try:
        yield server.wait_ready()
    finally:
        server.kill()


def reports(server: Server) -> list[re.Match[str]]:
    """The shutdown report lines logged so far."""
    return server.output.matches(REPORT)


def run_log(path: Path, kind: str) -> list[tuple[int, float]]:
    """``(pid, time)`` of every periodic run of ``kind`` the demo appended to ``path``."""
    if not path.exists():
        return []
    runs = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == kind:
            runs.append((int(parts[1]), float(parts[2])))
    return runs


def wait_for_runs(
    path: Path, kind: str, count: int, timeout: float = WAIT, poll: float = 0.05
) -> list[tuple[int, float]]:
    """Wait until ``path`` holds ``count`` runs of ``kind``; return them all.

    :raises AssertionError: after ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        runs = run_log(path, kind)
        if len(runs) >= count:
            return runs
        if time.monotonic() > deadline:
            raise AssertionError(f"only {len(runs)} {kind} run(s) after {timeout}s: {runs}")
        time.sleep(poll)  # the file is written by another process: poll it, under a deadline

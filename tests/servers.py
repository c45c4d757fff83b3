"""Throw-away database servers for the tests and benchmarks, started on free
loopback ports with their data in a temporary folder and stopped by PID.

PostgreSQL: Debian keeps ``initdb`` and ``postgres`` off the PATH, in
PostgreSQL's versioned folder under ``/usr/lib/postgresql``; they refuse to run
as root, so as root the server runs as the ``postgres`` user (which the Debian
package creates) with a folder that user owns. ``ASYNCBG_TEST_PG_BIN`` names
another folder of binaries. Authentication is ``trust`` on loopback only.

Redis: ``redis-server`` from the PATH (Debian's ``redis-server`` package;
``ASYNCBG_TEST_REDIS_SERVER`` names another binary), with ``appendonly yes``
and ``maxmemory-policy noeviction`` unless a test asks for the settings that
lose data (the preflight tests), no RDB snapshots, and its AOF in the folder.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["PostgresServer", "RedisServer", "free_port", "postgres_bin", "redis_server_bin"]

_START_WITHIN = 30.0
_STOP_WITHIN = 30.0


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _start_again(server: PostgresServer | RedisServer) -> None:
    # Start a stopped server on its port and data, trying again (bounded)
    # while what the old process held is not free yet.
    server.process = None
    deadline = time.monotonic() + _START_WITHIN
    while True:
        try:
            server.start()
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            server.process = None
            time.sleep(0.05)


def postgres_bin() -> Path | None:
    """Return the folder holding ``initdb`` and ``postgres``, or None."""
    named = os.environ.get("ASYNCBG_TEST_PG_BIN")
    if named:
        return Path(named)
    found = shutil.which("initdb")
    if found:  # a link on the PATH to the versioned folder, which has them all
        return Path(found).resolve().parent
    folders = glob.glob("/usr/lib/postgresql/*/bin")
    folders.sort(key=lambda f: int(Path(f).parent.name) if Path(f).parent.name.isdigit() else 0)
    for folder in reversed(folders):
        if (Path(folder) / "initdb").exists():
            return Path(folder)
    return None


class PostgresServer:
    """One PostgreSQL cluster in a temporary folder, run as a child process.

    ``start()`` initialises it once and starts it; ``stop(mode)`` sends the
    shutdown signal for ``"smart"``, ``"fast"`` or ``"immediate"`` to the
    postmaster's PID and waits for it; ``restart(mode)`` does both, on the
    same port and data. ``listen`` is the addresses to listen on (loopback
    by default; a network namespace's address for the partition tests).
    """

    _SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}

    def __init__(
        self,
        *,
        port: int | None = None,
        listen: Sequence[str] = ("127.0.0.1",),
        settings: dict[str, str] | None = None,
    ) -> None:
        found = postgres_bin()
        if found is None:
            raise RuntimeError(
                "PostgreSQL's initdb was not found (looked in ASYNCBG_TEST_PG_BIN, the PATH "
                "and /usr/lib/postgresql/*/bin): install Debian's postgresql package"
            )
        self.bin = found
        self.port = port or free_port()
        self.listen = tuple(listen)
        self.settings = dict(settings or {})
        self.root = Path(tempfile.mkdtemp(prefix="asyncbg-pg-"))
        self.data = self.root / "data"
        self.log_path = self.root / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._user: str | None = None
        if os.geteuid() == 0:
            self._user = "postgres"
            entry = pwd.getpwnam(self._user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._initdb()

    # -- addresses -------------------------------------------------------------

    @property
    def host(self) -> str:
        return self.listen[0]

    def url(self, database: str = "postgres", host: str | None = None) -> str:
        """A ``postgresql://`` URL for ``database`` as the superuser ``asyncbg``."""
        return f"postgresql://asyncbg@{host or self.host}:{self.port}/{database}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process and self.process.poll() is None else None

    # -- lifecycle -------------------------------------------------------------

    def _run(self, args: list[str]) -> None:
        done = subprocess.run(
            args, user=self._user, capture_output=True, timeout=120, cwd=self.root, check=False
        )
        if done.returncode:
            raise RuntimeError(
                f"{args[0]} failed ({done.returncode}): {done.stderr.decode(errors='replace')}"
            )

    def _initdb(self) -> None:
        self._run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "asyncbg",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )

    def start(self) -> PostgresServer:
        """Start the server and wait (bounded) until it accepts connections.

        :raises RuntimeError: when it exits or is not ready in time (with its log).
        """
        if self.pid is not None:
            return self
        options = {
            "listen_addresses": ",".join(self.listen),
            "port": str(self.port),
            "unix_socket_directories": str(self.root),
            "max_connections": "200",
            "fsync": "on",
            "synchronous_commit": "on",
            **self.settings,
        }
        args = [str(self.bin / "postgres"), "-D", str(self.data)]
        for name, value in options.items():
            args += ["-c", f"{name}={value}"]
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.process = subprocess.Popen(
            args, user=self._user, stdout=log, stderr=subprocess.STDOUT, cwd=self.root
        )
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_WITHIN
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited ({self.process.returncode}):\n{self.log()}")
            if self._accepts():
                return
            time.sleep(0.02)
        raise RuntimeError(f"postgres not ready within {_START_WITHIN} s:\n{self.log()}")

    def _accepts(self) -> bool:
        # The postmaster writes "ready" as the last line of its pid file once
        # it accepts connections (the status PostgreSQL's own pg_ctl -w reads).
        try:
            lines = (self.data / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return False
        return len(lines) >= 8 and lines[7].strip() == "ready"

    def stop(self, mode: str = "fast") -> None:
        """Stop the server by signalling its PID; wait (bounded) until it is gone."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(self._SIGNALS[mode])
        try:
            process.wait(timeout=_STOP_WITHIN)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=_STOP_WITHIN)

    def restart(self, mode: str = "fast") -> None:
        """Stop with ``mode`` and start again on the same port and data."""
        self.stop(mode)
        _start_again(self)  # an immediate stop can leave the old children for a moment

    def cleanup(self) -> None:
        """Stop the server and remove its folder."""
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-4000:]
        return ""

    # -- helpers ---------------------------------------------------------------

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` with psql over the Unix socket; return what it printed."""
        done = subprocess.run(
            [
                str(self.bin / "psql"),
                "-h",
                str(self.root),
                "-p",
                str(self.port),
                "-U",
                "asyncbg",
                "-d",
                database,
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ],
            capture_output=True,
            timeout=60,
            check=False,
            user=self._user,
        )
        if done.returncode:
            raise RuntimeError(f"psql failed: {done.stderr.decode(errors='replace')}")
        return done.stdout.decode()


def redis_server_bin() -> str | None:
    """Return the ``redis-server`` binary to run, or None."""
    return os.environ.get("ASYNCBG_TEST_REDIS_SERVER") or shutil.which("redis-server")


class RedisServer:
    """One ``redis-server`` in a temporary folder, run as a child process.

    ``settings`` are ``redis-server`` options over the defaults here
    (``{"appendonly": "no"}`` for a server that loses acknowledged writes);
    ``stop()`` sends SIGTERM to its PID (a clean shutdown, the AOF flushed),
    ``kill()`` SIGKILL; ``restart()`` starts it again on the same port and
    folder, so a server started with AOF reloads what it acknowledged.
    ``listen`` binds several addresses (loopback and one inside a network
    namespace, say); the first is the one :meth:`url` and :meth:`command` use.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        settings: dict[str, str] | None = None,
        listen: Sequence[str] | None = None,
    ) -> None:
        found = redis_server_bin()
        if found is None:
            raise RuntimeError(
                "redis-server was not found (looked in ASYNCBG_TEST_REDIS_SERVER and the "
                "PATH): install Debian's redis-server package (.ci/run does)"
            )
        self.bin = found
        self.listen = list(listen or [host])
        self.host = self.listen[0]
        self.port = port or free_port(self.host)
        self.settings = {
            "appendonly": "yes",
            "appendfsync": "everysec",
            "maxmemory-policy": "noeviction",
            **(settings or {}),
        }
        self.root = Path(tempfile.mkdtemp(prefix="asyncbg-redis-"))
        self.log_path = self.root / "server.log"
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0, host: str | None = None) -> str:
        """A ``redis://`` URL of database ``db``."""
        return f"redis://{host or self.host}:{self.port}/{db}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process and self.process.poll() is None else None

    def start(self) -> RedisServer:
        """Start the server and wait (bounded) until it answers PING.

        :raises RuntimeError: when it exits or is not ready in time (with its log).
        """
        if self.pid is not None:
            return self
        options = {
            "port": str(self.port),
            "bind": " ".join(self.listen),
            "dir": str(self.root),
            "save": "",
            "daemonize": "no",
            "protected-mode": "no",
            "logfile": "",
            **self.settings,
        }
        args = [self.bin]
        for name, value in options.items():
            args += [f"--{name}", value]
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + _START_WITHIN
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited ({self.process.returncode}):\n{self.log()}"
                )
            with contextlib.suppress(OSError, RuntimeError):
                if self.command("PING") == "+PONG":
                    return self
            time.sleep(0.01)
        raise RuntimeError(f"redis-server not ready within {_START_WITHIN} s:\n{self.log()}")

    def command(self, *words: str) -> str:
        """Send one command (inline, words without spaces) and return the
        first line of the reply, as ``+PONG`` or ``:3`` or ``-ERR ...``.

        :raises OSError: when the server cannot be reached.
        :raises RuntimeError: when it answers nothing.
        """
        with socket.create_connection((self.host, self.port), timeout=5) as sock:
            sock.sendall((" ".join(words) + "\r\n").encode())
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise RuntimeError("redis-server closed the connection")
                reply += chunk
        return reply.decode(errors="replace").split("\r\n", 1)[0]

    def stop(self) -> None:
        """SIGTERM to its PID (a clean shutdown); wait (bounded) until it is gone."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL to its PID: no shutdown, whatever the AOF holds is what survives."""
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signum)
        try:
            process.wait(timeout=_STOP_WITHIN)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=_STOP_WITHIN)

    def restart(self, *, kill: bool = False) -> None:
        """Stop it (SIGKILL with ``kill``) and start it again on the same port and folder."""
        self.kill() if kill else self.stop()
        _start_again(self)  # the port can stay taken for a moment after a kill

    def cleanup(self) -> None:
        """Kill the server and remove its folder."""
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-4000:]
        return ""

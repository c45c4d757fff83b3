"""`flask run --debug`: periodic jobs run in the reloader's child only, once per period."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

WAIT = 30.0

APP_MODULE = textwrap.dedent(
    """
    import os

    from flask import Flask

    from asyncbg import AsyncBG

    PID_FILE = os.environ["ASYNCBG_TEST_PID_FILE"]

    bg = AsyncBG()

    @bg.periodic(every=0.2, run_at_start=True)
    async def write_pid():
        with open(PID_FILE, "a") as f:
            f.write(f"{os.getpid()}\\n")

    app = Flask(__name__)
    app.config["ASYNCBG_SHUTDOWN_TIMEOUT"] = 1.0
    bg.init_app(app)
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pids_written(tmp_path: Path, *flags: str, lines: int) -> tuple[int, list[int]]:
    """Run ``flask run`` with ``flags`` until the PID file has ``lines`` lines.

    Returns the PID of the process started (the reloader parent when reloading)
    and the PIDs read from the file. The process group is killed at the end.
    """
    (tmp_path / "reload_app.py").write_text(APP_MODULE)
    pid_file = tmp_path / "pids.txt"
    env = {
        **os.environ,
        "ASYNCBG_TEST_PID_FILE": str(pid_file),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("WERKZEUG_RUN_MAIN", None)
    env.pop("FLASK_DEBUG", None)
    cmd = [sys.executable, "-m", "flask", "--app", "reload_app", "run"]
    cmd += ["--host", "127.0.0.1", "--port", str(free_port()), *flags]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + WAIT
        # Another process's file output: polled, with a deadline.
        while True:
            text = pid_file.read_text() if pid_file.exists() else ""
            pids = [int(line) for line in text.splitlines() if line.strip()]
            if len(pids) >= lines:
                return proc.pid, pids
            assert proc.poll() is None, f"flask run exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"only {len(pids)} runs in {WAIT}s"
            time.sleep(0.05)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            proc.wait()


def test_periodic_job_runs_only_in_the_reloader_child(tmp_path):
    # 8 runs at 0.2 s: a parent running it too would have shown up by then.
    parent, pids = pids_written(tmp_path, "--debug", lines=8)
    assert len(set(pids)) == 1, pids
    assert pids[0] != parent, "the periodic job ran in the reloader's parent"


def test_periodic_job_runs_with_debug_and_no_reload(tmp_path):
    server, pids = pids_written(tmp_path, "--debug", "--no-reload", lines=3)
    assert set(pids) == {server}

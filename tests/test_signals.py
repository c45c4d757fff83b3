"""SIGTERM and SIGINT: graceful stop, then the handler installed before asyncbg.

Each test runs a small script in a subprocess, waits for its "ready" line (a job
is running by then) and sends it a real signal.
"""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

WAIT = 20.0

SCRIPT = textwrap.dedent(
    """
    import asyncio
    import logging
    import signal
    import sys
    import threading

    from flask import Flask

    from asyncbg import AsyncBG

    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="%(name)s: %(message)s", force=True
    )
    signum = getattr(signal, sys.argv[1])
    previous = sys.argv[2]

    resumed = threading.Event()

    if previous == "custom":
        def custom_handler(sig, frame):
            print("custom previous handler ran", flush=True)
            resumed.set()
        signal.signal(signum, custom_handler)
    elif signum == signal.SIGINT:
        signal.signal(signum, signal.default_int_handler)  # what Python installs
    else:
        signal.signal(signum, signal.SIG_DFL)

    app = Flask("signals_app")
    app.config["ASYNCBG_HANDLE_SIGNALS"] = True
    app.config["ASYNCBG_SHUTDOWN_TIMEOUT"] = 10.0
    bg = AsyncBG(app)  # autostarts in the main thread: installs the handlers

    stopping = asyncio.Event()
    bg.loop_thread.add_stop_hook(stopping.set)
    running = threading.Event()

    async def job():
        running.set()
        await stopping.wait()  # still running when the signal arrives
        await asyncio.sleep(0.05)
        print("job finished its work after the signal", flush=True)

    bg.submit(job)
    running.wait(10)
    try:
        # The signal may come as soon as "ready" is out, before the wait begins.
        print("ready", flush=True)
        resumed.wait()  # lock waits run signal handlers in the main thread
    except KeyboardInterrupt:
        print("KeyboardInterrupt reached the main thread", flush=True)
        raise
    print("main thread resumed", flush=True)
    """
)

REPORT = "asyncbg shutdown: 1 completed, 0 cancelled, 0 still queued"
JOB_DONE = "job finished its work after the signal"


def run_and_signal(tmp_path: Path, signame: str, previous: str) -> tuple[int, list[str]]:
    """Run the script, wait for "ready", send the signal; return (returncode, lines)."""
    script = tmp_path / "signals_app.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), signame, previous],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + WAIT
        while "ready" not in seen:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            assert line is not None, "script ended before it was ready:\n" + "\n".join(seen)
            seen.append(line)
        proc.send_signal(getattr(signal, signame))
        returncode = proc.wait(WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(WAIT)
    while (line := lines.get_nowait()) is not None:
        seen.append(line)
    return returncode, seen


def index_of(lines: list[str], text: str) -> int:
    for i, line in enumerate(lines):
        if text in line:
            return i
    pytest.fail(f"{text!r} not in the output:\n" + "\n".join(lines))


def test_sigterm_lets_the_running_job_finish_then_calls_the_previous_handler(tmp_path):
    returncode, out = run_and_signal(tmp_path, "SIGTERM", "custom")
    job, report, chained = (
        index_of(out, JOB_DONE),
        index_of(out, REPORT),
        index_of(out, "custom previous handler ran"),
    )
    assert job < report < chained, out
    assert "main thread resumed" in out
    assert returncode == 0, out


def test_sigterm_logs_that_it_stops_gracefully(tmp_path):
    _returncode, out = run_and_signal(tmp_path, "SIGTERM", "custom")
    assert index_of(out, "SIGTERM received, stopping gracefully") < index_of(out, REPORT)


def test_sigterm_with_the_default_handler_ends_the_process_by_sigterm(tmp_path):
    returncode, out = run_and_signal(tmp_path, "SIGTERM", "default")
    assert index_of(out, JOB_DONE) < index_of(out, REPORT)
    assert "main thread resumed" not in out
    assert returncode == -signal.SIGTERM, out


def test_sigint_stops_gracefully_then_raises_keyboard_interrupt(tmp_path):
    returncode, out = run_and_signal(tmp_path, "SIGINT", "default")
    job, report, interrupt = (
        index_of(out, JOB_DONE),
        index_of(out, REPORT),
        index_of(out, "KeyboardInterrupt reached the main thread"),
    )
    assert job < report < interrupt, out
    assert "main thread resumed" not in out
    # an uncaught KeyboardInterrupt ends Python by SIGINT
    assert returncode == -signal.SIGINT, out


def test_sigint_with_a_custom_previous_handler_calls_it_after_the_stop(tmp_path):
    returncode, out = run_and_signal(tmp_path, "SIGINT", "custom")
    assert index_of(out, REPORT) < index_of(out, "custom previous handler ran")
    assert returncode == 0, out


def test_no_signal_handlers_are_installed_when_signal_handling_is_off(make_app):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    _app, bg = make_app(ASYNCBG_HANDLE_SIGNALS=False)
    bg.start()
    after = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    assert after == before

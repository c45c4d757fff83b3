"""A process whose app never calls stop() still exits promptly, after the shutdown grace."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

#: Bound on a whole child process (start-up, Flask import, grace, exit).
PROCESS_TIMEOUT = 45.0

_PRELUDE = """
import asyncio, sys, threading, time
from flask import Flask
from asyncbg import AsyncBG, LoopThread

def make_bg(**config):
    app = Flask("exit_app")
    app.config.update({"ASYNCBG_HANDLE_SIGNALS": False, **config})
    return AsyncBG(app)

def say(line):
    print(line, flush=True)
"""


def _run(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter; its exit is bounded by PROCESS_TIMEOUT."""
    return subprocess.run(
        [sys.executable, "-c", _PRELUDE + textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        cwd=tmp_path,
        check=False,
    )


def test_loop_thread_never_stopped_exits_and_runs_the_finally(tmp_path: Path) -> None:
    proc = _run(
        """
        lt = LoopThread(shutdown_timeout=1.0)
        lt.start()
        started = threading.Event()

        async def forever():
            try:
                started.set()
                await asyncio.Event().wait()
            finally:
                say("forever: finally ran")

        lt.submit(forever())
        assert started.wait(10)
        say("main: leaving without stop()")
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines == ["main: leaving without stop()", "forever: finally ran"], proc.stderr


def test_loop_thread_never_stopped_gives_a_running_job_its_grace(tmp_path: Path) -> None:
    proc = _run(
        """
        lt = LoopThread(shutdown_timeout=5.0)
        lt.start()
        started = threading.Event()

        async def needs_a_moment():
            started.set()
            await asyncio.sleep(0.3)
            say("job: finished")

        lt.submit(needs_a_moment())
        assert started.wait(10)
        say("main: leaving without stop()")
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["main: leaving without stop()", "job: finished"]


def test_asyncbg_never_stopped_gives_a_running_job_its_grace(tmp_path: Path) -> None:
    proc = _run(
        """
        bg = make_bg(ASYNCBG_SHUTDOWN_TIMEOUT=5.0)
        started = threading.Event()

        async def needs_a_moment():
            started.set()
            await asyncio.sleep(0.3)
            say("job: finished")

        bg.submit(needs_a_moment)
        assert started.wait(10)
        say("main: leaving without stop()")
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["main: leaving without stop()", "job: finished"]


def test_asyncbg_never_stopped_cancels_a_job_past_the_grace_and_runs_its_finally(
    tmp_path: Path,
) -> None:
    proc = _run(
        """
        bg = make_bg(ASYNCBG_SHUTDOWN_TIMEOUT=0.5)
        started = threading.Event()

        async def forever():
            try:
                started.set()
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                say("forever: cancelled")
                raise
            finally:
                say("forever: finally ran")

        bg.submit(forever)
        assert started.wait(10)
        say("main: leaving without stop()")
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "main: leaving without stop()",
        "forever: cancelled",
        "forever: finally ran",
    ]


def test_sync_job_hanging_in_a_worker_thread_does_not_block_exit(tmp_path: Path) -> None:
    proc = _run(
        """
        bg = make_bg(ASYNCBG_SHUTDOWN_TIMEOUT=0.5)
        started = threading.Event()

        def hangs():
            started.set()
            time.sleep(1000)

        bg.submit(hangs)
        assert started.wait(10)
        say("main: leaving without stop()")
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["main: leaving without stop()"]


def test_asyncio_to_thread_hanging_does_not_block_exit(tmp_path: Path) -> None:
    proc = _run(
        """
        bg = make_bg(ASYNCBG_SHUTDOWN_TIMEOUT=0.5)
        started = threading.Event()

        async def waits_on_a_thread():
            await asyncio.to_thread(lambda: (started.set(), time.sleep(1000)))

        bg.submit(waits_on_a_thread)
        assert started.wait(10)
        say("main: leaving without stop()")
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["main: leaving without stop()"]


def test_exit_status_is_kept_when_the_main_thread_exits_with_an_error(tmp_path: Path) -> None:
    proc = _run(
        """
        bg = make_bg(ASYNCBG_SHUTDOWN_TIMEOUT=5.0)
        started = threading.Event()

        async def needs_a_moment():
            started.set()
            await asyncio.sleep(0.3)
            say("job: finished")

        bg.submit(needs_a_moment)
        assert started.wait(10)
        sys.exit(3)
        """,
        tmp_path,
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.splitlines() == ["job: finished"]


def test_a_stopped_asyncbg_exits_at_once(tmp_path: Path) -> None:
    proc = _run(
        """
        bg = make_bg()

        async def quick():
            return 1

        assert bg.submit(quick).result(10) == 1
        report = bg.stop()
        say(f"stopped finished={report.finished}")
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["stopped finished=True"]

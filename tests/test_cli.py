"""``flask asyncbg list`` and ``flask asyncbg run NAME``."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask, current_app

from asyncbg import AsyncBG

WAIT = 10.0

MakeApp = Callable[..., tuple[Flask, AsyncBG]]


@pytest.fixture
def make_app(make_app: MakeApp) -> MakeApp:
    """conftest's factory, under this file's app name."""
    return functools.partial(
        make_app,
        import_name="asyncbg_cli_test",
    )


def register_examples(bg: AsyncBG) -> dict[str, list[str]]:
    """A periodic job of each kind, a consumer and two tasks; returns a call log."""
    calls: dict[str, list[str]] = {"nightly": [], "tick": [], "add": []}

    @bg.periodic(cron="0 3 * * *", scope="host", timeout=600)
    async def nightly() -> None:
        calls["nightly"].append(current_app.name)

    @bg.periodic(every=0.01, run_at_start=True)
    async def tick() -> None:
        calls["tick"].append("ran")

    @bg.consumer("mail", concurrency=4, maxsize=250)
    async def mail(item: object) -> None:
        pass

    @bg.task(timeout=30, retries=3)
    async def add(a: int, b: int = 0, *, note: str = "") -> int:
        calls["add"].append(note)
        return a + b

    @bg.task
    def resize(path: str) -> str:  # a sync task: runs in a worker thread
        raise OSError(f"cannot open {path}")

    return calls


# -- list ---------------------------------------------------------------------------------


def test_list_shows_periodic_jobs_consumers_and_tasks(make_app: MakeApp) -> None:
    app, bg = make_app()
    register_examples(bg)
    result = app.test_cli_runner().invoke(args=["asyncbg", "list"])
    assert result.exit_code == 0, result.output
    lines = [line.split() for line in result.output.splitlines()]
    assert ["Periodic", "jobs", "(2):"] in lines
    assert ["nightly", "cron", "0", "3", "*", "*", "*", "host", "600s"] in lines
    assert ["tick", "every", "0.01s", "process", "-"] in lines
    assert ["Consumers", "(1):"] in lines
    assert ["mail", "4", "250"] in lines
    assert ["Tasks", "(2):"] in lines
    assert ["add", "30s", "3", "async"] in lines
    assert ["resize", "-", "0", "sync"] in lines


def test_list_as_json(make_app: MakeApp) -> None:
    app, bg = make_app()
    register_examples(bg)
    result = app.test_cli_runner().invoke(args=["asyncbg", "list", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["periodic"][0] == {
        "name": "nightly",
        "schedule": "cron 0 3 * * *",
        "scope": "host",
        "timeout": 600.0,
    }
    assert data["consumers"] == [{"queue": "mail", "concurrency": 4, "size": 250}]
    assert [t["name"] for t in data["tasks"]] == ["add", "resize"]


def test_list_with_nothing_registered(make_app: MakeApp) -> None:
    app, _bg = make_app()
    result = app.test_cli_runner().invoke(args=["asyncbg", "list"])
    assert result.exit_code == 0
    assert "Periodic jobs (0):" in result.output
    assert not _bg.loop_thread.running  # listing starts nothing


# -- run ----------------------------------------------------------------------------------


def test_run_a_periodic_job_once_with_the_app_context_and_no_schedules(make_app: MakeApp) -> None:
    app, bg = make_app()
    calls = register_examples(bg)
    result = app.test_cli_runner().invoke(args=["asyncbg", "run", "nightly"])
    assert result.exit_code == 0, result.output
    assert "periodic job nightly: succeeded in" in result.output
    assert calls["nightly"] == ["asyncbg_cli_test"]
    assert calls["tick"] == []  # the schedules were never started
    assert not bg.loop_thread.running  # started for the command, stopped after


def test_run_a_task_with_json_and_text_arguments(make_app: MakeApp) -> None:
    app, bg = make_app()
    calls = register_examples(bg)
    result = app.test_cli_runner().invoke(
        args=["asyncbg", "run", "add", "40", "--kwarg", "b=2", "-k", "note=from cron"]
    )
    assert result.exit_code == 0, result.output
    assert "task add: succeeded in" in result.output
    assert result.output.rstrip().endswith(": 42")
    assert calls["add"] == ["from cron"]


def test_run_a_failing_task_exits_1_with_the_traceback(make_app: MakeApp) -> None:
    app, bg = make_app()
    register_examples(bg)
    result = app.test_cli_runner().invoke(args=["asyncbg", "run", "resize", "/nope.png"])
    assert result.exit_code == 1
    assert "task resize: failed after" in result.output
    assert "OSError: cannot open /nope.png" in result.output
    assert "Traceback" in result.output


def test_run_a_task_that_times_out_exits_1(make_app: MakeApp) -> None:
    import asyncio

    app, bg = make_app()

    @bg.task(timeout=0.05)
    async def stuck() -> None:
        await asyncio.sleep(WAIT)

    result = app.test_cli_runner().invoke(args=["asyncbg", "run", "stuck"])
    assert result.exit_code == 1
    assert "task stuck: timed_out after" in result.output


def test_run_handles_the_queue_items_the_task_enqueued_before_stopping(make_app: MakeApp) -> None:
    app, bg = make_app()
    sent: list[int] = []

    @bg.consumer("outbox", concurrency=2)
    async def outbox(item: int) -> None:
        sent.append(item)

    @bg.task
    async def fan_out(n: int) -> None:
        for i in range(n):
            await bg.enqueue_async("outbox", i)

    result = app.test_cli_runner().invoke(args=["asyncbg", "run", "fan_out", "20"])
    assert result.exit_code == 0, result.output
    assert sorted(sent) == list(range(20))
    assert bg.last_report is not None
    assert bg.last_report.still_queued == 0


def test_run_in_a_process_where_asyncbg_already_runs_leaves_it_running(
    make_app: MakeApp,
) -> None:
    app, bg = make_app()
    register_examples(bg)
    bg.start()
    result = app.test_cli_runner().invoke(args=["asyncbg", "run", "add", "1", "2"])
    assert result.exit_code == 0, result.output
    assert bg.loop_thread.running


def test_run_an_unknown_name_is_a_usage_error_listing_known_names(make_app: MakeApp) -> None:
    app, bg = make_app()
    register_examples(bg)
    result = app.test_cli_runner().invoke(args=["asyncbg", "run", "nope"])
    assert result.exit_code == 2
    assert "no periodic job or task named 'nope'" in result.output
    assert "add, mail" not in result.output  # queues are not runnable
    assert "add, nightly, resize, tick" in result.output


def test_run_a_periodic_job_with_arguments_is_a_usage_error(make_app: MakeApp) -> None:
    app, bg = make_app()
    register_examples(bg)
    result = app.test_cli_runner().invoke(args=["asyncbg", "run", "nightly", "1"])
    assert result.exit_code == 2
    assert "takes no arguments" in result.output


def test_run_with_a_malformed_kwarg_is_a_usage_error(make_app: MakeApp) -> None:
    app, bg = make_app()
    register_examples(bg)
    result = app.test_cli_runner().invoke(args=["asyncbg", "run", "add", "-k", "no-equals"])
    assert result.exit_code == 2
    assert "KEY=VALUE" in result.output


def test_run_a_name_that_is_both_needs_kind(make_app: MakeApp) -> None:
    app, bg = make_app()

    @bg.periodic(every=60, name="sync")
    async def sync_periodic() -> None:
        pass

    @bg.task(name="sync")
    async def sync_task() -> str:
        return "task"

    runner = app.test_cli_runner()
    ambiguous = runner.invoke(args=["asyncbg", "run", "sync"])
    assert ambiguous.exit_code == 2
    assert "--kind" in ambiguous.output
    chosen = runner.invoke(args=["asyncbg", "run", "sync", "--kind", "task"])
    assert chosen.exit_code == 0, chosen.output
    assert "task sync: succeeded" in chosen.output


# -- a real `flask` process ------------------------------------------------------------


APP_MODULE = """
    import os
    import pathlib

    from flask import Flask, current_app

    from asyncbg import AsyncBG

    app = Flask(__name__)
    bg = AsyncBG(app)
    marks = pathlib.Path(os.environ["MARK_DIR"])


    @bg.periodic(every=3600, run_at_start=True)
    async def other():
        (marks / "other-ran").write_text("yes")


    @bg.periodic(every=3600)
    async def cleanup():
        (marks / "cleanup-ran").write_text(current_app.name)
"""


def test_flask_asyncbg_run_in_a_real_flask_process(tmp_path: Path) -> None:
    (tmp_path / "cliapp.py").write_text(textwrap.dedent(APP_MODULE))
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {**os.environ, "MARK_DIR": str(marks), "PYTHONPATH": str(tmp_path)}
    env.pop("FLASK_APP", None)
    proc = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "cliapp", "asyncbg", "run", "cleanup"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "periodic job cleanup: succeeded in" in proc.stdout
    assert (marks / "cleanup-ran").read_text() == "cliapp"
    # asyncbg does not autostart in flask commands, and run starts no schedules
    assert not (marks / "other-ran").exists()


def test_flask_asyncbg_list_in_a_real_flask_process(tmp_path: Path) -> None:
    (tmp_path / "cliapp.py").write_text(textwrap.dedent(APP_MODULE))
    env = {**os.environ, "MARK_DIR": str(tmp_path), "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "cliapp", "asyncbg", "list"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "cleanup" in proc.stdout
    assert not (tmp_path / "other-ran").exists()

"""What asyncbg puts in front of people (issue 9).

Item 4: what it adds to an app by default, and the one key that adds nothing.
Item 15: its log lines, ``flask asyncbg list`` in both formats, and the
progress a finished job shows.
"""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import pytest
from conftest import MakeApp
from flask import Flask
from flask.cli import routes_command

import asyncbg
from asyncbg import AsyncBG, current_job


def _rules(app: Flask) -> set[str]:
    return {rule.rule for rule in app.url_map.iter_rules()}


def _routes_output(app: Flask) -> str:
    result = app.test_cli_runner().invoke(routes_command)
    assert result.exit_code == 0, result.output
    return result.output


def test_by_default_health_answers_and_nothing_leaves_the_prefix(make_app: MakeApp) -> None:
    app, bg = make_app()
    bg.start()
    assert app.test_client().get("/_asyncbg/health").status_code == 200
    assert {r for r in _rules(app) if not r.startswith("/_asyncbg/")} == {"/static/<path:filename>"}
    assert "asyncbg" in app.cli.commands


def test_by_default_the_apps_template_list_is_its_own(make_app: MakeApp) -> None:
    app, _ = make_app()
    assert app.jinja_env.list_templates() == []


def test_the_dashboard_page_renders_without_joining_the_apps_templates(
    make_app: MakeApp, tmp_path: Path
) -> None:
    # An app template with the page's name must not replace the page.
    (tmp_path / "templates" / "asyncbg").mkdir(parents=True)
    (tmp_path / "templates" / "asyncbg" / "dashboard.html").write_text("the app's own page")
    app, bg = make_app(ASYNCBG_DASHBOARD=True)
    app.root_path = str(tmp_path)
    app.jinja_env.loader = app.create_global_jinja_loader()
    bg.start()
    assert app.jinja_env.list_templates() == ["asyncbg/dashboard.html"]  # the app's, only
    r = app.test_client().get("/_asyncbg/")
    assert r.status_code == 200
    page = r.get_data(as_text=True)
    assert "the app's own page" not in page
    assert 'href="/_asyncbg/static/dashboard.css"' in page
    assert 'src="/_asyncbg/static/dashboard.js"' in page
    assert app.test_client().get("/_asyncbg/static/dashboard.js").status_code == 200


def test_mount_false_adds_no_route_template_or_command(make_app: MakeApp) -> None:
    plain = Flask("asyncbg_test_app")
    app, bg = make_app(ASYNCBG_MOUNT=False)
    bg.start()
    assert _rules(app) == _rules(plain)
    assert "asyncbg" not in app.blueprints
    assert "asyncbg" not in app.cli.commands
    assert app.jinja_env.list_templates() == []
    assert app.test_client().get("/_asyncbg/health").status_code == 404
    assert _routes_output(app) == _routes_output(plain)
    # The rest of asyncbg works as ever.
    assert bg.submit(lambda: 42).result(5) == 42


def test_mount_false_from_an_unbound_extension() -> None:
    bg = AsyncBG()
    app = Flask("asyncbg_test_app")
    app.config.update(ASYNCBG_MOUNT=False, ASYNCBG_AUTOSTART=False, ASYNCBG_HANDLE_SIGNALS=False)
    bg.init_app(app)
    assert "asyncbg" not in app.blueprints
    assert "asyncbg" not in app.cli.commands
    assert app.extensions["asyncbg"] is bg


# -- item 15a: the logger's name is not repeated in the message ------------------------------

_LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical", "log"}


def _log_messages() -> list[tuple[str, int, str]]:
    """Every string literal a log call in the package starts its message with."""
    found = []
    for path in sorted(Path(asyncbg.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr not in _LOG_METHODS and "log_failure" not in node.func.attr:
                continue
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.append((path.name, node.lineno, arg.value))
                elif isinstance(arg, ast.JoinedStr) and isinstance(arg.values[0], ast.Constant):
                    found.append((path.name, node.lineno, str(arg.values[0].value)))
    return found


def test_no_log_message_starts_with_the_loggers_name() -> None:
    messages = _log_messages()
    assert len(messages) > 30  # the scan sees the package's log calls
    offenders = [m for m in messages if m[2].lower().startswith("asyncbg")]
    assert offenders == []


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record).splitlines()[0])


def test_a_failure_logs_the_name_once_with_a_name_formatter(make_app: MakeApp) -> None:
    _, bg = make_app()
    handler = _Lines()
    logger = logging.getLogger("asyncbg")
    logger.addHandler(handler)
    try:

        @bg.task(name="explode")
        async def explode() -> None:
            raise ValueError("boom")

        bg.start()
        explode.submit().wait(5)
        bg.stop(timeout=1.0)
    finally:
        logger.removeHandler(handler)
    assert any(line.startswith("asyncbg: job explode ") for line in handler.lines), handler.lines


# -- item 15b: `flask asyncbg list --json` has the table's columns ----------------------------


def test_list_json_keys_are_the_table_columns(make_app: MakeApp) -> None:
    app, bg = make_app()

    @bg.periodic(every=30)
    async def refresh_prices() -> None:
        pass

    @bg.consumer("emails", concurrency=4, maxsize=100)
    async def emails(item: object) -> None:
        pass

    @bg.task(timeout=30, retries=3)
    def resize(path: str) -> None:
        pass

    runner = app.test_cli_runner()
    table = runner.invoke(args=["asyncbg", "list"]).output.splitlines()
    data = json.loads(runner.invoke(args=["asyncbg", "list", "--json"]).output)
    for key, title in (
        ("periodic", "Periodic jobs"),
        ("consumers", "Consumers"),
        ("tasks", "Tasks"),
    ):
        header = table[table.index(f"{title} (1):") + 1].split()
        assert [list(item) for item in data[key]] == [header], key
    assert data["consumers"][0]["size"] == 100
    assert data["tasks"][0]["kind"] == "sync"
    assert table[table.index("Tasks (1):") + 2].split()[-1] == "sync"


# -- item 15c: a job that succeeded shows its progress complete ------------------------------


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        ("succeed", {"done": 10.0, "total": 10.0, "message": "batch 3 of 10", "fraction": 1.0}),
        ("fail", {"done": 3.0, "total": 10.0, "message": "batch 3 of 10", "fraction": 0.3}),
    ],
)
def test_progress_is_complete_on_success_and_kept_on_failure(
    make_app: MakeApp, outcome: str, expected: dict[str, object]
) -> None:
    _, bg = make_app()

    @bg.task
    async def import_catalog() -> str:
        current_job().set_progress(3, 10, "batch 3 of 10")
        if outcome == "fail":
            raise RuntimeError("the catalog went away")
        return "imported"

    bg.start()
    job = import_catalog.submit()
    job.wait(5)
    assert job.to_dict()["progress"] == expected


def test_progress_without_a_total_is_left_as_reported(make_app: MakeApp) -> None:
    _, bg = make_app()

    @bg.task
    def count_rows() -> None:
        current_job().set_progress(42, message="rows")

    bg.start()
    job = count_rows.submit()
    job.wait(5)
    assert job.status.value == "succeeded"
    assert job.to_dict()["progress"] == {
        "done": 42.0,
        "total": None,
        "message": "rows",
        "fraction": None,
    }

"""What asyncbg adds to an app by default, and the one key that adds nothing (issue 9, item 4)."""

from __future__ import annotations

from pathlib import Path

from conftest import MakeApp
from flask import Flask
from flask.cli import routes_command

from asyncbg import AsyncBG


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

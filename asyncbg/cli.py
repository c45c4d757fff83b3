"""``flask asyncbg ...``: list what is registered, run one job once.

Registered on the app by :meth:`AsyncBG.init_app <asyncbg.AsyncBG.init_app>`.
asyncbg does not start by itself inside ``flask`` commands other than ``run``;
``flask asyncbg run`` starts the loop (without the periodic schedules), runs
the one job and stops again.
"""

from __future__ import annotations

import json
from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup

from .engine.view import RunKind, RunResult, StateView

__all__ = ["asyncbg_cli"]

asyncbg_cli = AppGroup("asyncbg", help="Inspect and run asyncbg's jobs.")


def _view() -> StateView:
    # The extension keeps each app's view here (AsyncBG.init_app).
    view: StateView | None = current_app.extensions.get("asyncbg.view")
    if view is None:
        raise click.ClickException("this app has no AsyncBG (call AsyncBG(app) or init_app)")
    return view


#: The sections of ``flask asyncbg list``: key in the JSON, title, columns. The
#: JSON objects have exactly the table's columns as keys, so the two never differ.
_SECTIONS = (
    ("periodic", "Periodic jobs", ("name", "schedule", "scope", "timeout")),
    ("consumers", "Consumers", ("queue", "concurrency", "size")),
    ("tasks", "Tasks", ("name", "timeout", "retries", "kind")),
)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _cell(column: str, value: Any) -> str:
    if column == "timeout":
        return "-" if value is None else f"{value:g}s"
    return str(value)


@asyncbg_cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def list_command(as_json: bool) -> None:
    """List registered periodic jobs, queue consumers and tasks.

    ``--json`` prints an object with ``periodic``, ``consumers`` and ``tasks``
    lists, whose objects have the tables' columns as keys (timeouts in seconds
    or null).
    """
    reg = _view().registry()
    if as_json:
        click.echo(json.dumps(reg, indent=2))
        return
    for i, (key, title, columns) in enumerate(_SECTIONS):
        rows = [[_cell(c, item[c]) for c in columns] for item in reg[key]]
        if i:
            click.echo()
        click.echo(f"{title} ({len(rows)}):")
        if rows:
            click.echo(_table([list(columns), *rows]))


def _parse_value(text: str) -> Any:
    """A command-line value: JSON if it parses (``3``, ``true``, ``"x"``), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _parse_kwargs(items: tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` options as keyword arguments, each value as :func:`_parse_value`.

    :raises click.BadParameter: for an item without ``=`` or whose key is not a name.
    """
    keywords: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--kwarg")
        keywords[key] = _parse_value(value)
    return keywords


def _resolve(view: StateView, name: str, kind: str | None) -> RunKind:
    """What ``name`` is: a periodic job or a task (``kind`` chooses when it is both).

    :raises click.UsageError: if it is both and ``kind`` is None, or neither.
    """
    reg = view.registry()
    periodic = {pj["name"] for pj in reg["periodic"]} if kind in (None, "periodic") else set()
    tasks = {t["name"] for t in reg["tasks"]} if kind in (None, "task") else set()
    if name in periodic and name in tasks:
        raise click.UsageError(f"{name!r} is both a periodic job and a task; add --kind")
    if name in periodic:
        return "periodic"
    if name in tasks:
        return "task"
    known = sorted({pj["name"] for pj in reg["periodic"]} | {t["name"] for t in reg["tasks"]})
    raise click.UsageError(
        f"no periodic job or task named {name!r} (known: {', '.join(known) or 'none'})"
    )


@asyncbg_cli.command("run")
@click.argument("name")
@click.argument("args", nargs=-1)
@click.option(
    "--kwarg",
    "-k",
    "kwargs",
    multiple=True,
    metavar="KEY=VALUE",
    help="A keyword argument for a task (repeatable).",
)
@click.option(
    "--kind",
    type=click.Choice(["periodic", "task"]),
    default=None,
    help="What NAME is, when a periodic job and a task share it.",
)
def run_command(
    name: str, args: tuple[str, ...], kwargs: tuple[str, ...], kind: str | None
) -> None:
    """Run the periodic job or task NAME once, in this process, and print the outcome.

    ARGS and --kwarg values are passed to a task, each parsed as JSON when it
    is valid JSON (3, true, "text", [1, 2]) and passed as text otherwise. The
    loop starts without the periodic schedules and stops when the job and the
    queue items it enqueued are done.
    Exit status: 0 if the job succeeded, 1 otherwise.
    """
    view = _view()
    what = _resolve(view, name, kind)
    positional = [_parse_value(a) for a in args]
    keywords = _parse_kwargs(kwargs)
    if what == "periodic" and (positional or keywords):
        raise click.UsageError(f"periodic job {name!r} takes no arguments")
    try:
        run = view.run_once(what, name, positional, keywords)
    except TypeError as exc:
        hint = "ARGS are positional, -k KEY=VALUE keywords"
        raise click.ClickException(f"{exc} ({hint})") from None
    try:
        ok = _report(run, f"periodic job {name}" if what == "periodic" else f"task {name}")
        if run.started_loop:
            # Items the job queued for consumers are handled before the loop stops.
            try:
                view.wait_idle()
            except TimeoutError as exc:
                click.echo(f"asyncbg: {exc}; stopping anyway", err=True)
    finally:
        if run.started_loop:
            view.stop()
    click.get_current_context().exit(0 if ok else 1)


def _report(run: RunResult, what: str) -> bool:
    """Print how ``run`` went; True if the job succeeded."""
    status = run.record.status
    if run.interrupted:
        click.echo(f"{what}: interrupted, cancelled", err=True)
    elif status == "succeeded":
        shown = "" if run.result_repr is None else f": {run.result_repr}"
        click.echo(f"{what}: succeeded in {run.took:.3f}s{shown}")
        return True
    elif run.traceback is not None:
        click.echo(f"{what}: failed after {run.took:.3f}s", err=True)
        click.echo(run.traceback, err=True)
    else:
        click.echo(f"{what}: {status} after {run.took:.3f}s: {run.message}", err=True)
    return False

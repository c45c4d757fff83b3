"""``flask asyncbg ...``: list what is registered, run one job once.

Registered on the app by :meth:`AsyncBG.init_app <asyncbg.AsyncBG.init_app>`.
asyncbg does not start by itself inside ``flask`` commands other than ``run``;
``flask asyncbg run`` starts the loop (without the periodic schedules), runs
the one job and stops again.
"""

from __future__ import annotations

import json
import time
import traceback
from typing import TYPE_CHECKING, Any

import click
from flask import current_app
from flask.cli import AppGroup

from .engine.jobs import Job
from .engine.tasks import TaskOptions
from .errors import JobCancelled, JobTimedOut

if TYPE_CHECKING:
    from .extension import AsyncBG

__all__ = ["asyncbg_cli"]

asyncbg_cli = AppGroup("asyncbg", help="Inspect and run asyncbg's jobs.")


def _bg() -> AsyncBG:
    from .extension import AsyncBG

    bg = current_app.extensions.get("asyncbg")
    if not isinstance(bg, AsyncBG):
        raise click.ClickException("this app has no AsyncBG (call AsyncBG(app) or init_app)")
    return bg


#: The sections of ``flask asyncbg list``: key in the JSON, title, columns. The
#: JSON objects have exactly the table's columns as keys, so the two never differ.
_SECTIONS = (
    ("periodic", "Periodic jobs", ("name", "schedule", "scope", "timeout")),
    ("consumers", "Consumers", ("queue", "concurrency", "size")),
    ("tasks", "Tasks", ("name", "timeout", "retries", "kind")),
)


def _registry(bg: AsyncBG) -> dict[str, list[dict[str, Any]]]:
    return {
        "periodic": [
            {"name": name, "schedule": pj.schedule, "scope": pj.scope, "timeout": pj.timeout}
            for name, pj in sorted(bg.periodic_jobs.items())
        ],
        "consumers": [
            {"queue": name, "concurrency": q.concurrency, "size": q.maxsize}
            for name, q in sorted(bg.queues.items())
        ],
        "tasks": [
            {
                "name": name,
                "timeout": t.options.timeout,
                "retries": t.options.retries,
                "kind": "async" if t.is_async else "sync",
            }
            for name, t in sorted(bg.tasks.items())
        ],
    }


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
    reg = _registry(_bg())
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
    bg = _bg()
    pj = bg.periodic_jobs.get(name) if kind in (None, "periodic") else None
    task = bg.tasks.get(name) if kind in (None, "task") else None
    if pj is not None and task is not None:
        raise click.UsageError(f"{name!r} is both a periodic job and a task; add --kind")
    if pj is None and task is None:
        known = sorted({*bg.periodic_jobs, *bg.tasks})
        raise click.UsageError(
            f"no periodic job or task named {name!r} (known: {', '.join(known) or 'none'})"
        )
    positional = [_parse_value(a) for a in args]
    keywords: dict[str, Any] = {}
    for item in kwargs:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--kwarg")
        keywords[key] = _parse_value(value)

    if pj is not None:
        if positional or keywords:
            raise click.UsageError(f"periodic job {name!r} takes no arguments")
        options = TaskOptions(timeout=pj.timeout)
        job = bg.runner.create(pj.fn, (), {}, name=pj.name, options=options, is_async=True)
        what = f"periodic job {name}"
    else:
        assert task is not None
        try:
            # Before the loop starts: such a job would fail every attempt.
            task.check_arguments(tuple(positional), keywords)
        except TypeError as exc:
            hint = "ARGS are positional, -k KEY=VALUE keywords"
            raise click.ClickException(f"{exc} ({hint})") from None
        job = bg.runner.create(
            task.fn,
            tuple(positional),
            keywords,
            name=task.name,
            options=task.options,
            is_async=task.is_async,
            check_args=False,
        )
        what = f"task {name}"

    started_here = not bg.loop_thread.running
    if started_here:
        bg.start(periodic=False)
    try:
        ok = _run_and_report(bg, job, what)
        if started_here:
            # Items the job queued for consumers are handled before the loop stops.
            try:
                bg.wait_idle(bg.shutdown_timeout)
            except TimeoutError as exc:
                click.echo(f"asyncbg: {exc}; stopping anyway", err=True)
    finally:
        if started_here:
            bg.stop()
    click.get_current_context().exit(0 if ok else 1)


def _run_and_report(bg: AsyncBG, job: Job[Any], what: str) -> bool:
    t0 = time.monotonic()
    bg.runner.submit(job)
    try:
        job.wait()
    except KeyboardInterrupt:
        job.cancel()
        job.wait(5.0)
        click.echo(f"{what}: interrupted, cancelled", err=True)
        return False
    took = time.monotonic() - t0
    try:
        result = job.result(0)
    except (JobCancelled, JobTimedOut) as exc:
        click.echo(f"{what}: {job.status.value} after {took:.3f}s: {exc}", err=True)
        return False
    except Exception as exc:
        click.echo(f"{what}: failed after {took:.3f}s", err=True)
        click.echo("".join(traceback.format_exception(exc)).rstrip(), err=True)
        return False
    shown = "" if result is None else f": {result!r}"
    click.echo(f"{what}: succeeded in {took:.3f}s{shown}")
    return True

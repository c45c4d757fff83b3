"""Run Flask's own test suite twice, without and with asyncbg attached to every app.

Usage::

    python scripts/flask_suite.py [--cache-dir DIR] [--keep-going]

It downloads the sdist of the installed Flask (``pip download --no-binary
:all: --no-deps flask==<version>``; cached in ``--cache-dir``, by default
``<temp dir>/asyncbg-flask-suite``), unpacks it and runs its ``tests/``:

1. plain;
2. with a plugin that makes every ``Flask(...)`` call ``AsyncBG(app)`` with the
   default configuration, except ``ASYNCBG_AUTOSTART`` and
   ``ASYNCBG_HANDLE_SIGNALS`` off (a thread and signal handlers per app would
   measure the test harness, not asyncbg's footprint on an app);
3. the same with ``ASYNCBG_MOUNT = False``.

Every test that passes plain must pass with asyncbg, except those listed, with
the reason, in :data:`BY_DESIGN` (run 2 only) and :data:`KNOWN`. It prints one
summary line and exits 1 on a regression, 2 if the suite could not be run at
all (download, unpack, or a pytest run that did not complete).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from importlib.metadata import version
from pathlib import Path

#: Flask tests that fail with asyncbg's default surface mounted, by design: the
#: health route is mounted by default (probes need it without setup), and these
#: tests compare ``flask routes`` with an exact listing. With ``ASYNCBG_MOUNT =
#: False`` they pass (the third run checks that).
BY_DESIGN: dict[str, str] = {
    f"tests/test_cli.py::TestRoutes::{name}": (
        "`flask routes` lists asyncbg's /_asyncbg/* routes, mounted by default"
    )
    for name in ("test_no_routes", "test_simple", "test_sort")
}

#: Flask tests expected to fail with asyncbg attached (mounted or not), and why.
#: Remove an entry once the work it waits for has landed (the script says when).
KNOWN: dict[str, str] = {}

# Loaded in both runs. Flask 3.1's tests import ``_pytest.monkeypatch.notset``,
# which pytest 9 no longer has; the outcome recorder is how the runs are compared.
_COMMON_PLUGIN = textwrap.dedent(
    '''
    """Outcome recorder and pytest compatibility for Flask's test suite."""
    import json
    import os

    import _pytest.compat
    import _pytest.monkeypatch

    if not hasattr(_pytest.monkeypatch, "notset"):
        _pytest.monkeypatch.notset = _pytest.compat.NOTSET

    _outcomes = {}


    def pytest_runtest_logreport(report):
        previous = _outcomes.get(report.nodeid)
        if report.when == "call" or report.outcome != "passed":
            if previous in (None, "passed"):
                _outcomes[report.nodeid] = report.outcome
        elif previous is None:
            _outcomes[report.nodeid] = "passed"


    def pytest_collectreport(report):
        if report.outcome == "failed":
            _outcomes[report.nodeid or "<collection>"] = "error"


    def pytest_sessionfinish(session, exitstatus):
        with open(os.environ["ASYNCBG_SUITE_OUTCOMES"], "w") as f:
            json.dump(_outcomes, f, indent=1, sort_keys=True)
    '''
)

_ATTACH_PLUGIN = textwrap.dedent(
    '''
    """Attach asyncbg to every Flask app created during the run."""
    import os

    import flask

    from asyncbg import AsyncBG

    _original_init = flask.Flask.__init__
    _mount = os.environ["ASYNCBG_SUITE_MOUNT"] == "1"


    def _init_with_asyncbg(self, *args, **kwargs):
        _original_init(self, *args, **kwargs)
        self.config["ASYNCBG_AUTOSTART"] = False
        self.config["ASYNCBG_HANDLE_SIGNALS"] = False
        self.config["ASYNCBG_MOUNT"] = _mount
        AsyncBG(self)


    flask.Flask.__init__ = _init_with_asyncbg
    '''
)


def fetch_sources(flask_version: str, cache: Path) -> Path:
    """Return the unpacked Flask sdist for ``flask_version``, downloading it once.

    :raises RuntimeError: if pip cannot download it or the archive has no tests.
    """
    root = cache / f"flask-{flask_version}"
    if (root / "tests" / "conftest.py").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / f"flask-{flask_version}.tar.gz"
    if not archive.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
        cmd += [f"flask=={flask_version}", "-d", str(cache)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0 or not archive.is_file():
            raise RuntimeError(
                f"could not download Flask {flask_version}'s sdist with pip "
                f"(exit {done.returncode}):\n{done.stdout}{done.stderr}"
            )
    # Unpack next to the final place and rename: a concurrent or interrupted
    # run never sees a half-written tree.
    staging = Path(tempfile.mkdtemp(prefix="unpack-", dir=cache))
    with tarfile.open(archive) as tar:
        tar.extractall(staging, filter="data")
    unpacked = staging / f"flask-{flask_version}"
    if not (unpacked / "tests" / "conftest.py").is_file():
        raise RuntimeError(f"{archive} holds no tests/conftest.py")
    try:
        unpacked.rename(root)
    except OSError:
        if not (root / "tests" / "conftest.py").is_file():
            raise
    return root


def start_suite(root: Path, plugins_dir: Path, label: str, mount: bool | None) -> Run:
    """Start Flask's tests under ``root`` in a subprocess.

    ``mount`` None runs them plain; otherwise every app gets ``AsyncBG(app)``
    with ``ASYNCBG_MOUNT = mount``.
    """
    outcomes = plugins_dir / f"outcomes-{label}.json"
    outcomes.unlink(missing_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(plugins_dir), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
        "ASYNCBG_SUITE_OUTCOMES": str(outcomes),
        "ASYNCBG_SUITE_MOUNT": "1" if mount else "0",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    # Plugins of this environment that Flask's suite does not expect: pytest-asyncio
    # fails on Flask's "filterwarnings = error", pytest-timeout is not needed.
    cmd = [sys.executable, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider"]
    cmd += ["-p", "no:asyncio", "-p", "no:timeout", "-p", "_asyncbg_suite_common"]
    if mount is not None:
        cmd += ["-p", "_asyncbg_suite_attach"]
    proc = subprocess.Popen(
        cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return Run(label, proc, outcomes)


class Run:
    """One pytest run of Flask's suite, in progress."""

    def __init__(self, label: str, proc: subprocess.Popen[str], outcomes: Path) -> None:
        self.label, self.proc, self.outcomes = label, proc, outcomes

    def result(self, timeout: float = 600.0) -> dict[str, str]:
        """Wait for the run; return ``{nodeid: outcome}``.

        :raises RuntimeError: if pytest did not get through the run (an exit
            status other than 0 or 1, or no tests run).
        :raises subprocess.TimeoutExpired: if it takes longer than ``timeout``.
        """
        try:
            output, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise
        if self.proc.returncode not in (0, 1) or not self.outcomes.is_file():
            raise RuntimeError(
                f"Flask's suite ({self.label}) did not complete "
                f"(pytest exit {self.proc.returncode}):\n{output[-6000:]}"
            )
        result: dict[str, str] = json.loads(self.outcomes.read_text())
        if not result:
            raise RuntimeError(f"Flask's suite ({self.label}) ran no tests:\n{output[-6000:]}")
        return result


def _counts(outcomes: dict[str, str]) -> str:
    passed = sum(o == "passed" for o in outcomes.values())
    failed = sum(o in ("failed", "error") for o in outcomes.values())
    skipped = sum(o == "skipped" for o in outcomes.values())
    return f"{passed} passed, {failed} failed, {skipped} skipped"


def compare(
    plain: dict[str, str], attached: dict[str, str], allowed: dict[str, str]
) -> tuple[list[str], list[str], list[str]]:
    """Return (regressions, allowed failures seen, allowed failures that now pass).

    A regression is a test that passed plain and did not pass with asyncbg
    (failed, errored, skipped or missing), unless ``allowed`` lists it.
    """
    broken = sorted(t for t, o in plain.items() if o == "passed" and attached.get(t) != "passed")
    regressions = [t for t in broken if t not in allowed]
    seen = [t for t in broken if t in allowed]
    fixed = sorted(t for t in allowed if attached.get(t) == "passed")
    return regressions, seen, fixed


def main(argv: list[str] | None = None) -> int:
    """Run the suites and print the comparison.

    Returns 0 if nothing regressed, 1 on a regression, 2 if a run could not be made.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "asyncbg-flask-suite",
        help="where the sdist is downloaded and unpacked (reused across runs)",
    )
    args = parser.parse_args(argv)
    flask_version = version("flask")
    t0 = time.monotonic()
    try:
        root = fetch_sources(flask_version, args.cache_dir)
        with tempfile.TemporaryDirectory(prefix="asyncbg-suite-plugins-") as tmp:
            plugins = Path(tmp)
            (plugins / "_asyncbg_suite_common.py").write_text(_COMMON_PLUGIN)
            (plugins / "_asyncbg_suite_attach.py").write_text(_ATTACH_PLUGIN)
            # Two at a time: each run is one process, and this keeps the wall time
            # near that of Flask's suite alone.
            plain_run = start_suite(root, plugins, "plain", None)
            mounted_run = start_suite(root, plugins, "asyncbg", True)
            plain, mounted = plain_run.result(), mounted_run.result()
            unmounted = start_suite(root, plugins, "asyncbg-unmounted", False).result()
    except (RuntimeError, OSError, subprocess.TimeoutExpired, tarfile.TarError) as exc:
        print(f"flask suite: could not run: {exc}", file=sys.stderr)
        return 2
    failed = False
    parts = [f"without asyncbg {_counts(plain)}"]
    for label, outcomes, allowed in (
        ("with asyncbg", mounted, {**BY_DESIGN, **KNOWN}),
        ("with asyncbg and ASYNCBG_MOUNT=False", unmounted, KNOWN),
    ):
        regressions, seen, fixed = compare(plain, outcomes, allowed)
        for test in seen:
            kind = "by design" if test in BY_DESIGN else "known failure"
            print(f"{label}: {kind}: {test}: {allowed[test]}")
        for test in fixed:
            print(f"{label}: listed as failing but passes, remove it from the list: {test}")
        for test in regressions:
            print(f"{label}: REGRESSION: {test}: {outcomes.get(test, 'missing')}")
        failed = failed or bool(regressions)
        parts.append(
            f"{label} {_counts(outcomes)} ({len(regressions)} regression(s), {len(seen)} listed)"
        )
    print(f"flask {flask_version} suite in {time.monotonic() - t0:.1f}s: " + "; ".join(parts))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

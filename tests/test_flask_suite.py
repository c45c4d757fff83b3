"""Flask's own test suite still passes with asyncbg attached to every app.

Runs ``scripts/flask_suite.py``: it downloads the installed Flask's sdist with
pip (once per test session, into this session's temp dir) and runs its tests
plain, with ``AsyncBG(app)`` on every app, and with ``ASYNCBG_MOUNT = False``.
Without network access to the package index this test fails: it says so.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "flask_suite.py"


@pytest.mark.timeout(600)
def test_flask_suite_passes_with_asyncbg_attached(tmp_path_factory: pytest.TempPathFactory) -> None:
    cache = tmp_path_factory.getbasetemp() / "flask-sdist"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--cache-dir", str(cache)],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    summary = done.stdout.strip().splitlines()[-1]
    assert summary.count("(0 regression(s)") == 2, output
    assert "with asyncbg and ASYNCBG_MOUNT=False" in summary, output

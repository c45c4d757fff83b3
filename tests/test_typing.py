"""Static types users see: ``mypy --strict`` on user-style code.

``typing_user_code.py`` must pass (every ``assert_type`` in it holds), and a
small snippet of mistakes must be reported, each on its line with its error
code. mypy runs as a subprocess on this checkout's ``asyncbg`` (``MYPYPATH``),
whatever copy is installed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from asyncbg import Task

ROOT = Path(__file__).resolve().parents[1]
USER_CODE = Path(__file__).with_name("typing_user_code.py")

pytestmark = pytest.mark.timeout(240)

# Mistakes, one per line, each marked with the mypy error codes it must get
# (mypy explains some calls twice: a count, then a type).
# Keyword arguments are checked for submit/run (ParamSpec); bg.call forwards
# positional arguments only (a TypeVarTuple), as anyio.from_thread.run_sync does.
ERRORS = """
from asyncbg import AsyncBG

bg = AsyncBG()


@bg.task(retries=3)
async def send_email(to: str, subject: str) -> str:
    return to


async def fetch(url: str) -> bytes:
    return url.encode()


def add(a: int, b: int) -> int:
    return a + b


async def views() -> None:
    send_email.submit(1, "hi")  # E: arg-type
    send_email.submit("a@b.c")  # E: call-arg
    send_email.submit("a@b.c", "hi", urgent=True)  # E: call-arg
    await send_email.run("a@b.c", 2)  # E: arg-type
    bg.submit(add, 1)  # E: call-overload
    bg.submit(add, 1, 2, 3)  # E: call-overload
    bg.submit(add, 1, c=2)  # E: call-arg arg-type
    bg.submit(fetch, b"https://example.com")  # E: call-overload
    bg.submit(send_email, "a@b.c")  # E: call-overload
    await bg.run(fetch)  # E: call-overload
    bg.call(add, 1)  # E: arg-type
    bg.call(add, 1, "2")  # E: call-arg arg-type
    bg.call(fetch, "https://example.com")  # E: deprecated
    count: int = send_email.submit("a@b.c", "hi").result()  # E: assignment
    data = await bg.run(fetch, "https://example.com")
    text: str = data  # E: assignment
    print(count, text)
"""


def run_mypy(path: Path, cache_dir: Path) -> tuple[int, str]:
    env = {**os.environ, "MYPYPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            # bg.call(async_fn) is marked @deprecated: reported only with this.
            "--enable-error-code",
            "deprecated",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(cache_dir),
            "--no-color-output",
            "--no-pretty",
            str(path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=200,
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module's mypy runs: the second run reuses the first's work."""
    return tmp_path_factory.mktemp("mypy-cache")


def test_user_code_passes_mypy_strict(mypy_cache: Path) -> None:
    code, output = run_mypy(USER_CODE, mypy_cache)
    assert code == 0, output
    assert "Success: no issues found" in output


def test_mistakes_are_reported_where_they_are(mypy_cache: Path, tmp_path: Path) -> None:
    snippet = tmp_path / "user_errors.py"
    snippet.write_text(textwrap.dedent(ERRORS).lstrip())
    expected = {
        (n, error_code)
        for n, line in enumerate(snippet.read_text().splitlines(), 1)
        if (m := re.search(r"# E: ([\w -]+)$", line))
        for error_code in m.group(1).split()
    }
    code, output = run_mypy(snippet, mypy_cache)
    reported = {
        (int(m.group(1)), m.group(2))
        for m in re.finditer(r"^.*user_errors\.py:(\d+): error: .*\[([\w-]+)\]$", output, re.M)
    }
    assert code == 1, output
    assert reported == expected, output


def test_mistakes_name_the_problem(mypy_cache: Path, tmp_path: Path) -> None:
    # The messages a user reads: the bad argument, and bg.run for an async function.
    snippet = tmp_path / "user_errors.py"
    snippet.write_text(textwrap.dedent(ERRORS).lstrip())
    _, output = run_mypy(snippet, mypy_cache)
    assert 'Argument 1 to "submit" of "Task" has incompatible type "int"; expected "str"' in output
    assert 'Missing positional argument "subject" in call to "submit" of "Task"' in output
    assert "await bg.run(fn, ...) instead" in output
    # A sync function's mistake is explained against its own signature, not
    # against the async overload listed before it.
    lines = snippet.read_text().splitlines()
    for call in ("bg.call(add, 1)", 'bg.call(add, 1, "2")'):
        n = next(i for i, line in enumerate(lines, 1) if line.strip().startswith(call + "  #"))
        said = [line for line in output.splitlines() if f"user_errors.py:{n}:" in line]
        assert said, output
        assert not any("Coroutine" in line for line in said), said


def test_user_code_imports_and_makes_tasks() -> None:
    # The overloads are for type checkers; at run time the decorators still
    # make Tasks, bare and with options.
    spec = importlib.util.spec_from_file_location("typing_user_code", USER_CODE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert isinstance(module.send_email, Task)
    assert module.send_email.is_async
    assert isinstance(module.resize, Task)
    assert not module.resize.is_async
    assert module.render.name == "render_page"
    assert module.fetch.options.retries == 3
    assert sorted(module.bg.tasks) == ["fetch", "render_page", "resize", "send_email"]

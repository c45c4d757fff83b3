"""The README's Quick start runs as pasted, and passes ``mypy --strict`` (issue 9, item 14).

Its code blocks are taken from README.md, written to ``shop.py`` in a temp dir,
and imported in a fresh interpreter (it starts asyncbg at import and installs
signal handlers, as a real app does), where Flask's test client drives every
endpoint, before and after ``bg.stop()``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"

DRIVER = textwrap.dedent(
    """
    import shop

    client = shop.app.test_client()
    assert callable(shop.asgi_app)
    assert shop.bg.loop_thread.running, "the Quick start says it starts at import"

    r = client.post("/task", json={"to": "ann"})
    assert r.status_code == 200 and r.get_json() == {"success": "OK"}, r.data
    shop.bg.wait_idle(5)
    assert shop.delivered == [{"to": "ann"}], shop.delivered

    r = client.get("/world")
    assert r.status_code == 200 and r.get_json() == {"tick": 0, "entities": {}}, r.data

    r = client.post("/emails")
    assert r.status_code == 202, r.data
    job_id = r.get_json()["id"]
    shop.bg.wait_idle(5)
    job = client.get(f"/jobs/{job_id}").get_json()
    assert job["status"] == "succeeded", job
    assert job["result"] == "sent 'hi' to a@b.c", job
    assert job["progress"]["fraction"] == 1.0, job
    assert client.get("/jobs/nope").status_code == 404

    r = client.get("/now")
    assert r.status_code == 200 and r.get_json() == {"result": "sent 'now' to a@b.c"}, r.data

    assert client.get("/_asyncbg/health").status_code == 200

    shop.bg.stop(timeout=2)
    calls = [("post", "/task"), ("get", "/world"), ("post", "/emails"), ("get", "/now")]
    for method, path in calls:
        kwargs = {"json": {"to": "bob"}} if path == "/task" else {}
        r = getattr(client, method)(path, **kwargs)
        assert r.status_code == 503, (path, r.status_code, r.data)
        assert r.headers.get("Retry-After") == "1", path
    print("quickstart ok")
    """
)


def quickstart_code() -> str:
    """The Python code blocks of the README's "Quick start" section, in order."""
    text = README.read_text()
    section = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```$", section, flags=re.DOTALL | re.MULTILINE)
    assert blocks, "no python block under ## Quick start"
    return "\n\n".join(blocks)


@pytest.fixture
def shop_dir(tmp_path: Path) -> Path:
    (tmp_path / "shop.py").write_text(quickstart_code())
    (tmp_path / "drive.py").write_text(DRIVER)
    return tmp_path


def test_the_quick_start_runs_as_pasted(shop_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "drive.py"],
        cwd=shop_dir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "quickstart ok" in done.stdout


@pytest.mark.timeout(300)
def test_the_quick_start_passes_mypy_strict(shop_dir: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--cache-dir",
            str(shop_dir / ".mypy"),
            "shop.py",
        ],
        cwd=shop_dir,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr

"""``hypercorn asyncbg.demo:app``: the plain Flask app, with no lifespan events.

Hypercorn's WSGI wrapper never tells a WSGI app that the server starts or
stops, so asyncbg starts when the app is imported (or lazily, on first use,
with autostart off) and drains at interpreter exit.
"""

from __future__ import annotations

import signal
import time

import pytest
from hypercorn_harness import WAIT, Server, reports, run_log, running, wait_for_runs

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize("workers", [0, 1])
def test_the_plain_flask_app_drains_its_jobs_at_exit(tmp_path, workers):
    server = Server(
        tmp_path,
        "asyncbg.demo:app",
        workers=workers,
        graceful_timeout=2,
        config={"ASYNCBG_SHUTDOWN_TIMEOUT": 5.0},
    )
    with running(server):
        assert server.get("/world").status == 200
        job = server.post("/jobs", {"steps": 4, "step_seconds": 0.25}).body["id"]
        deadline = time.monotonic() + WAIT
        while server.get(f"/jobs/{job}").body["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.02)  # polling the job's status over HTTP, under a deadline
        server.send(signal.SIGTERM)
        assert server.wait_exit() == 0, server.output.text()
        server.output.wait_for(f"demo job {job} completed")
        [report] = reports(server)
        assert int(report["completed"]) >= 1, report.group(0)
        assert int(report["cancelled"]) == 0, report.group(0)


def test_the_plain_flask_app_with_autostart_off_starts_on_first_use(tmp_path):
    run_file = tmp_path / "runs.log"
    server = Server(
        tmp_path,
        "asyncbg.demo:app",
        config={
            "ASYNCBG_AUTOSTART": False,
            "DEMO_TICK_SECONDS": 0.2,
            "DEMO_RUN_LOG": str(run_file),
        },
    )
    with running(server):
        # Serving GET / needs no asyncbg: nothing has started it yet.
        assert server.get("/").body["asyncbg_running"] is False
        assert run_log(run_file, "world") == []
        assert server.get("/world").status == 200  # bg.call starts the loop
        assert server.get("/").body["asyncbg_running"] is True
        wait_for_runs(run_file, "world", 2)

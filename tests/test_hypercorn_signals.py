"""SIGTERM and SIGINT under a real Hypercorn: in-flight requests finish, jobs drain.

Each test starts ``hypercorn --config hypercorn.toml asyncbg.demo:asgi_app`` on
a kernel-chosen loopback port, starts demo jobs over HTTP, signals the server
and checks the exit code, the exit time bound (graceful timeout + asyncbg's
shutdown timeout + 1 s), the one-line shutdown report, and that every job
accepted before the signal either completed or was cancelled and counted.
``workers = 0`` is Hypercorn's single-process mode (its own signal handlers);
``workers = 1`` (the toml's) and ``2`` add a supervisor that tells the workers
to stop and ``terminate()``s the remaining ones once the first has exited.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypercorn_harness import WAIT, Output, Reply, Server, reports, running

GRACEFUL = 2  # Hypercorn's graceful_timeout in these tests
SHUTDOWN = 3.0  # ASYNCBG_SHUTDOWN_TIMEOUT
EXIT_BOUND = GRACEFUL + SHUTDOWN + 1.0  # what the deployment promises

pytestmark = pytest.mark.timeout(120)


def make_server(tmp_path: Path, workers: int | None, worker_class: str | None = None) -> Server:
    return Server(
        tmp_path,
        workers=workers,
        graceful_timeout=GRACEFUL,
        worker_class=worker_class,
        config={"ASYNCBG_SHUTDOWN_TIMEOUT": SHUTDOWN, "DEMO_TICK_SECONDS": 0.2},
    )


def start_job(server: Server, steps: int, step_seconds: float) -> Reply:
    reply = server.post("/jobs", {"steps": steps, "step_seconds": step_seconds})
    assert reply.status == 202, reply
    return reply


def start_jobs_in_progress(server: Server) -> tuple[list[str], list[str]]:
    """Two jobs that finish within the shutdown timeout and one that cannot.

    Returns (short job ids, long job ids) once all three are running.
    """
    short = [start_job(server, steps=4, step_seconds=0.25).body["id"] for _ in range(2)]
    long = [start_job(server, steps=100, step_seconds=0.5).body["id"]]
    for job_id in short + long:
        wait_until_running(server, job_id)
    return short, long


def wait_until_running(server: Server, job_id: str) -> None:
    deadline = time.monotonic() + WAIT
    while server.get(f"/jobs/{job_id}").body["status"] != "running":
        assert time.monotonic() < deadline, f"job {job_id} never started"
        time.sleep(0.02)  # polling the job's status over HTTP, under a deadline


def job_outcomes(server: Server) -> dict[str, str]:
    """``{job id: "completed" | "cancelled"}`` from the demo's log lines."""
    return {
        m.group(1): m.group(2)
        for m in server.output.matches(r"demo job ([0-9a-f]{32}) (completed|cancelled)")
    }


def signal_and_time_exit(server: Server, send: object) -> tuple[int, float]:
    t0 = time.monotonic()
    send()  # type: ignore[operator]
    code = server.wait_exit(timeout=EXIT_BOUND + WAIT)
    return code, time.monotonic() - t0


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_drains_jobs_reports_and_exits_zero_within_the_bound(tmp_path, workers, signame):
    with running(make_server(tmp_path, workers)) as server:
        short, long = start_jobs_in_progress(server)
        sig = getattr(signal, signame)
        # SIGINT is sent as Ctrl-C is: to the whole process group.
        send = server.ctrl_c if sig == signal.SIGINT else (lambda: server.send(sig))
        code, elapsed = signal_and_time_exit(server, send)

        assert code == 0, server.output.text()
        assert elapsed <= EXIT_BOUND, f"exited after {elapsed:.2f}s\n{server.output.text()}"
        [report] = reports(server)
        assert int(report["completed"]) >= len(short), report.group(0)
        assert int(report["cancelled"]) >= len(long), report.group(0)
        assert int(report["queued"]) == 0, report.group(0)
        outcomes = job_outcomes(server)
        assert {j: outcomes.get(j) for j in short} == dict.fromkeys(short, "completed")
        assert {j: outcomes.get(j) for j in long} == dict.fromkeys(long, "cancelled")


def test_ctrl_c_under_the_uvloop_worker_class_drains_and_exits_zero(tmp_path):
    # Single process: Hypercorn's uvloop handler and asyncbg's both see the signal.
    with running(make_server(tmp_path, workers=0, worker_class="uvloop")) as server:
        short, long = start_jobs_in_progress(server)
        code, elapsed = signal_and_time_exit(server, server.ctrl_c)
        assert code == 0, server.output.text()
        assert elapsed <= EXIT_BOUND, f"exited after {elapsed:.2f}s\n{server.output.text()}"
        assert len(reports(server)) == 1, server.output.text()
        outcomes = job_outcomes(server)
        assert [outcomes.get(j) for j in short + long] == ["completed", "completed", "cancelled"]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_request_in_flight_at_sigterm_is_answered(tmp_path, workers):
    with running(make_server(tmp_path, workers)) as server:
        replies: list[Reply] = []
        # An async view awaiting a 1 s job on the loop: in flight when the signal lands.
        client = threading.Thread(target=lambda: replies.append(server.get("/compute?delay=1")))
        client.start()
        server.output.wait_for(r"demo compute started")
        server.send(signal.SIGTERM)
        client.join(WAIT)
        assert server.wait_exit() == 0, server.output.text()
        assert [r.status for r in replies] == [200], server.output.text()
        assert replies[0].body["result"] == sum(i * i for i in range(30))


def assert_exited_at_once(server: Server, since: float, drain: float) -> None:
    server.wait_exit()
    elapsed = time.monotonic() - since
    # Structural: far below the drain it would otherwise have waited for.
    assert elapsed < drain / 2, server.output.text()
    [abandoned] = server.output.matches(r"SIGINT while shutting down, exiting now: (\d+) running")
    assert int(abandoned.group(1)) >= 1
    assert reports(server) == [], "the drain was not cut short"


@pytest.mark.parametrize("workers", [0, 1])
def test_a_second_ctrl_c_during_the_drain_exits_at_once(tmp_path, workers):
    drain = 20.0
    server = Server(
        tmp_path,
        workers=workers,
        graceful_timeout=GRACEFUL,
        config={"ASYNCBG_SHUTDOWN_TIMEOUT": drain},
    )
    with running(server):
        job_id = start_job(server, steps=200, step_seconds=0.5).body["id"]
        wait_until_running(server, job_id)
        server.ctrl_c()
        # A person's second Ctrl-C comes a moment later: by then Hypercorn has
        # handled the first and asyncbg is draining. (Two signals a millisecond
        # apart can deadlock Hypercorn's own supervisor: its handler takes a
        # multiprocessing lock and is not reentrant.)
        server.output.wait_for(r"lifespan shutdown, draining")
        t0 = time.monotonic()
        server.ctrl_c()
        assert_exited_at_once(server, t0, drain)


def test_a_second_ctrl_c_while_requests_are_in_flight_exits_at_once(tmp_path):
    # Single process: the second Ctrl-C lands while Hypercorn still waits for an
    # in-flight request, before asyncbg has begun to drain.
    drain = 20.0
    server = Server(
        tmp_path,
        workers=0,
        graceful_timeout=int(drain),
        config={"ASYNCBG_SHUTDOWN_TIMEOUT": drain},
    )
    with running(server):
        job_id = start_job(server, steps=200, step_seconds=0.5).body["id"]
        wait_until_running(server, job_id)
        errors: list[OSError] = []

        def in_flight() -> None:
            try:
                server.get("/compute?delay=60")
            except OSError as exc:  # the forced exit drops the connection
                errors.append(exc)

        client = threading.Thread(target=in_flight)
        client.start()
        server.output.wait_for(r"demo compute started")
        server.ctrl_c()
        server.output.wait_for(r"asyncbg: SIGINT received; draining once the server stops")
        t0 = time.monotonic()
        server.ctrl_c()
        assert_exited_at_once(server, t0, drain)
        assert not server.output.matches(r"lifespan shutdown"), server.output.text()
        client.join(WAIT)
        assert len(errors) == 1, "the in-flight request was dropped"


def test_two_workers_both_drain_and_report_on_sigterm_to_the_supervisor(tmp_path):
    with running(make_server(tmp_path, workers=2)) as server:
        workers = server.worker_pids()
        assert len(workers) == 2, server.output.text()
        # Requests land on whichever worker accepts first: keep starting jobs
        # until both workers run some.
        by_worker: dict[int, list[str]] = {pid: [] for pid in workers}
        deadline = time.monotonic() + WAIT
        while not all(by_worker.values()):
            assert time.monotonic() < deadline, by_worker
            reply = start_job(server, steps=6, step_seconds=0.25)
            by_worker[reply.body["pid"]].append(reply.body["id"])
        long_reply = start_job(server, steps=100, step_seconds=0.5)
        accepted = [j for ids in by_worker.values() for j in ids] + [long_reply.body["id"]]

        code, elapsed = signal_and_time_exit(server, lambda: server.send(signal.SIGTERM))

        assert code == 0, server.output.text()
        assert elapsed <= EXIT_BOUND, f"exited after {elapsed:.2f}s\n{server.output.text()}"
        assert {int(r["pid"]) for r in reports(server)} == workers, server.output.text()
        # The worker without the long job exits first and the supervisor then
        # terminate()s the other one, in the middle of its drain: it drains on.
        server.output.wait_for(r"SIGTERM received while draining; the drain goes on")
        outcomes = job_outcomes(server)
        assert set(accepted) <= set(outcomes), server.output.text()
        assert outcomes[long_reply.body["id"]] == "cancelled"
        total_cancelled = sum(int(r["cancelled"]) for r in reports(server))
        assert total_cancelled >= 1


FORK_SCRIPT = """
import os, signal, sys, time
from flask import Flask
from asyncbg import AsyncBG

bg = AsyncBG(Flask("forked_app"))  # autostarts in the main thread: handlers in place
bg.serve_under_server()  # what the ASGI lifespan startup does under Hypercorn
ready_r, ready_w = os.pipe()
child = os.fork()
if child == 0:
    os.write(ready_w, b"!")  # a signal sent before fork() has returned here is lost
    time.sleep(20)  # bounded: if SIGTERM is ignored, the child still ends
    os._exit(0)
os.read(ready_r, 1)
os.kill(child, signal.SIGTERM)
_, status = os.waitpid(child, 0)
print(os.waitstatus_to_exitcode(status), flush=True)
bg.stop()
"""


def test_a_process_forked_from_a_server_worker_still_dies_on_sigterm(tmp_path):
    # multiprocessing's Pool.terminate() ends its (forked) workers with SIGTERM.
    proc = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT],
        capture_output=True,
        text=True,
        timeout=WAIT,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(-signal.SIGTERM)], proc.stderr


DRAIN_SCRIPT = """
import asyncio, logging, sys
from flask import Flask
from asyncbg import AsyncBG

logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True)
bg = AsyncBG(Flask("drain_app"))  # autostarts in the main thread: handlers in place
bg.loop_thread.add_stop_hook(lambda: print("draining", flush=True))

async def forever():
    await asyncio.Event().wait()

bg.submit(forever)
bg.stop(timeout=60)
print("stop returned", flush=True)
"""


def test_ctrl_c_during_a_drain_outside_a_server_exits_at_once(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", DRAIN_SCRIPT],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    output = Output(proc.stdout)
    try:
        output.wait_for("draining")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(WAIT)
        elapsed = time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()
        output.join()
    assert code == 128 + signal.SIGINT, output.text()
    assert elapsed < 30, output.text()  # structural: the drain would take 60 s
    assert "SIGINT while shutting down, exiting now: 1 running task(s) abandoned" in output.text()
    assert "stop returned" not in output.text()

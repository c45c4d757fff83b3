"""``scope="host"`` periodic jobs under real Hypercorn workers: one run per period per host.

The demo's ``host_chore`` (host scope) and ``world_tick`` (process scope) append
one line per run to a file; the tests read who ran them and when. Every server
in a test shares one lock directory, as processes on one host do.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypercorn_harness import WAIT, Server, run_log, running, wait_for_runs

from asyncbg.engine.host_lock import HostLock

PERIOD = 0.5  # DEMO_HOST_TICK_SECONDS

pytestmark = pytest.mark.timeout(120)


def make_server(tmp_path: Path, run_file: Path, workers: int) -> Server:
    return Server(
        tmp_path,
        workers=workers,
        graceful_timeout=1,
        config={
            "ASYNCBG_SHUTDOWN_TIMEOUT": 1.0,
            "DEMO_HOST_TICK_SECONDS": PERIOD,
            "DEMO_TICK_SECONDS": PERIOD,
            "DEMO_RUN_LOG": str(run_file),
        },
    )


def runs_since(run_file: Path, since: float) -> list[tuple[int, float]]:
    return [(pid, t) for pid, t in run_log(run_file, "host") if t > since]


def assert_never_twice_in_a_period(runs: list[tuple[int, float]]) -> None:
    times = sorted(t for _pid, t in runs)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Two processes running it would put two runs in one period.
    assert min(gaps) > PERIOD / 2, f"runs too close together: {runs}"


def test_a_host_scoped_job_runs_in_one_worker_once_per_period(tmp_path):
    run_file = tmp_path / "runs.log"
    with running(make_server(tmp_path, run_file, workers=2)) as server:
        workers = server.worker_pids()
        assert len(workers) == 2
        host_runs = wait_for_runs(run_file, "host", 8)
        # Both workers are alive and run their own process-scoped tick...
        wait_for_runs(run_file, "world", 2)
        deadline = time.monotonic() + WAIT
        while {pid for pid, _t in run_log(run_file, "world")} != workers:
            assert time.monotonic() < deadline, run_log(run_file, "world")
            time.sleep(0.05)  # polling a file other processes write, under a deadline
        # ...while the host-scoped job ran in one of them only, once per period.
        host_runs = run_log(run_file, "host")
        assert len({pid for pid, _t in host_runs}) == 1, host_runs
        assert {pid for pid, _t in host_runs} <= workers
        assert_never_twice_in_a_period(host_runs)


def test_after_sigkill_of_the_lock_holder_another_worker_takes_over_within_a_period(tmp_path):
    run_file = tmp_path / "runs.log"
    first = make_server(tmp_path, run_file, workers=2)
    with running(first):
        holder = wait_for_runs(run_file, "host", 2)[-1][0]
        assert holder in first.worker_pids()
        # A second server on the same host (same lock directory): its worker
        # stays ready to take over but does not run the job meanwhile.
        with running(make_server(tmp_path, run_file, workers=1)) as second:
            runs_before = len(run_log(run_file, "host"))
            wait_for_runs(run_file, "host", runs_before + 3)
            assert {pid for pid, _t in run_log(run_file, "host")} == {holder}

            killed_at = time.time()
            os.kill(holder, signal.SIGKILL)
            deadline = time.monotonic() + WAIT
            while not (after := [(p, t) for p, t in run_log(run_file, "host") if p != holder]):
                assert time.monotonic() < deadline, "nobody took the job over"
                time.sleep(0.05)  # polling a file other processes write, under a deadline
            _taker, taken_at = after[0]
            # Within about one period: the kernel frees the lock the moment the
            # holder dies, and every other worker tries it on each of its ticks.
            assert taken_at - killed_at <= PERIOD + 1.0, (taken_at - killed_at, after)

            # Hypercorn's supervisor now shuts the rest of the first server down
            # (it does not replace a dead worker; its other worker may run the job
            # meanwhile). Its handling takes a multiprocessing lock the dead
            # worker may have held, so do not count on it: end that server here.
            first.kill()
            first_gone = time.time()
            [survivor] = second.worker_pids()
            deadline = time.monotonic() + WAIT
            while len(later_runs := runs_since(run_file, first_gone)) < 3:
                assert time.monotonic() < deadline, run_log(run_file, "host")
                time.sleep(0.05)  # polling a file other processes write, under a deadline
            assert {p for p, _t in later_runs} == {survivor}
            assert_never_twice_in_a_period(later_runs)


FORK_SCRIPT = """
import os, signal, sys
from asyncbg.engine.host_lock import HostLock

lock = HostLock(sys.argv[1], "forked")
assert lock.try_acquire()
child = os.fork()
if child == 0:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # let the test read the holder's output to its end
    os.dup2(devnull, 2)
    signal.pause()  # outlives the holder, never touches the lock again
    os._exit(0)
print(child, flush=True)
os._exit(0)  # the holder dies without releasing anything
"""


def test_a_forked_child_does_not_keep_the_lock_of_a_holder_that_died(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=WAIT,
        start_new_session=True,
    )
    assert proc.returncode == 0, proc.stderr
    child = int(proc.stdout)
    try:
        assert HostLock(str(tmp_path), "forked").try_acquire()
    finally:
        os.kill(child, signal.SIGKILL)

"""The health report: is the loop alive and responsive, and what is it doing.

Built from a :class:`~asyncbg.engine.view.StateView`, whose reads never call
into the loop, so a stuck or dead loop is reported rather than waited for. No
Flask import.
"""

from __future__ import annotations

import time
from typing import Any

from ..engine.records import JobQuery
from ..engine.view import StateView
from ..errors import NotRunning

__all__ = ["health_report"]

#: At most this many running jobs are listed in a report (all are counted).
MAX_RUNNING_LISTED = 100


def health_report(
    view: StateView, *, max_lag: float | None, detailed: bool = True
) -> tuple[bool, dict[str, Any]]:
    """Return ``(healthy, report)`` for the app ``view`` shows.

    Unhealthy when the loop is not running, or when its lag right now is over
    ``max_lag`` seconds (None: lag never makes it unhealthy). Degraded (status
    ``"degraded"``, still healthy) when a host-scoped periodic job cannot take
    its host lock: that job stops running on this host, but the process can
    serve, so a load balancer must not take it out. The short report
    (``detailed=False``) says only the status and why it is unhealthy; the
    detailed one adds ``warnings`` (what degrades it), lag percentiles,
    blocked-loop counts, running jobs, queues and periodic jobs, and the
    ``cluster`` (with a durable backend: the nodes sharing the store, dead ones
    marked, and each store-leased periodic job's ``leader``; see
    :meth:`StateView.cluster`; None while the loop is not running). A dead
    node never makes this process unhealthy. Results and arguments of jobs
    are never in it. Never raises for a job's state.

    :raises BackendError: in the detailed report, if the store failed.
    """
    alive = view.loop_running()
    lag = view.loop_lag() if alive else None
    problems: list[str] = []
    if not alive:
        problems.append("the event loop is not running")
    if lag is not None and max_lag is not None and lag > max_lag:
        problems.append(f"event loop lag {lag:.3f}s is over {max_lag:g}s")
    healthy = not problems
    periodic = view.periodic_snapshots()
    warnings = [
        f"periodic job {pj['name']} cannot take its host lock: {pj['lock_error']}"
        for pj in periodic
        if pj["lock_error"] is not None
    ]
    report: dict[str, Any] = {
        "status": "unhealthy" if not healthy else "degraded" if warnings else "ok",
        "problems": problems,
        "loop": {"alive": alive, "lag": lag},
        "time": time.time(),
    }
    if not detailed:
        return healthy, report
    report["warnings"] = warnings
    report["loop"].update(_loop_details(view, alive, lag, max_lag))
    report["jobs"] = _jobs(view)
    report["queues"] = view.queue_snapshots()
    cluster = _cluster(view, alive)
    leaders: dict[str, Any] = {} if cluster is None else cluster.pop("leaders")
    report["periodic"] = [{**pj, "leader": leaders.get(pj["name"])} for pj in periodic]
    report["cluster"] = cluster
    return healthy, report


def _cluster(view: StateView, alive: bool) -> dict[str, Any] | None:
    if not alive:
        return None
    try:
        return view.cluster()
    except NotRunning:  # stopped meanwhile
        return None


def _loop_details(
    view: StateView, alive: bool, lag: float | None, max_lag: float | None
) -> dict[str, Any]:
    stats = view.loop_stats()
    # A stopped loop's last samples say nothing about now: left out.
    lag_stats: dict[str, Any] = stats["lag"] if alive else {"current": None}
    return {
        "lag": lag,
        "lag_p50": lag_stats.get("p50"),
        "lag_p99": lag_stats.get("p99"),
        "lag_max": lag_stats.get("max"),
        "lag_samples": lag_stats.get("samples", 0),
        "lag_window": stats["window"],
        "max_lag": max_lag,
        "monitored": stats["monitored"],
        "blocked": stats["blocked"],
    }


def _jobs(view: StateView) -> dict[str, Any]:
    counts = view.job_counts()
    running = view.query_jobs(JobQuery(statuses=frozenset({"running"}), limit=MAX_RUNNING_LISTED))
    return {
        "running": running.total,
        "pending": counts["pending"],
        "known": counts["known"],
        "running_jobs": [record.to_dict(include_result=False) for record in running.records],
    }

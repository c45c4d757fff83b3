"""The health report: is the loop alive and responsive, and what is it doing.

Built from state read directly (never by calling into the loop), so a stuck or
dead loop is reported rather than waited for. No Flask import.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..engine.jobs import JobStatus

if TYPE_CHECKING:
    from ..extension import AsyncBG

__all__ = ["health_report"]

#: At most this many running jobs are listed in a report (all are counted).
MAX_RUNNING_LISTED = 100


def health_report(
    bg: AsyncBG, *, max_lag: float | None, detailed: bool = True
) -> tuple[bool, dict[str, Any]]:
    """Return ``(healthy, report)`` for ``bg``.

    Unhealthy when the loop is not running, or when its lag right now is over
    ``max_lag`` seconds (None: lag never makes it unhealthy). Degraded (status
    ``"degraded"``, still healthy) when a host-scoped periodic job cannot take
    its host lock: that job stops running on this host, but the process can
    serve, so a load balancer must not take it out. The short report
    (``detailed=False``) says only the status and why it is unhealthy; the
    detailed one adds ``warnings`` (what degrades it), lag percentiles,
    blocked-loop counts, running jobs, queues and periodic jobs. Results and
    arguments of jobs are never in it. Never raises for a job's state.
    """
    lt = bg.loop_thread
    monitor = bg.monitor
    alive = lt.running
    lag = monitor.current_lag() if alive else None
    problems: list[str] = []
    if not alive:
        problems.append("the event loop is not running")
    if lag is not None and max_lag is not None and lag > max_lag:
        problems.append(f"event loop lag {lag:.3f}s is over {max_lag:g}s")
    healthy = not problems
    warnings = [
        f"periodic job {name} cannot take its host lock: {pj.lock_error}"
        for name, pj in sorted(bg.periodic_jobs.items())
        if pj.lock_error is not None
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

    lag_stats = monitor.lag_stats() if alive else {"current": None}
    report["loop"].update(
        {
            "lag": lag,
            "lag_p50": lag_stats.get("p50"),
            "lag_p99": lag_stats.get("p99"),
            "lag_max": lag_stats.get("max"),
            "lag_samples": lag_stats.get("samples", 0),
            "lag_window": monitor.window,
            "max_lag": max_lag,
            "monitored": monitor.active,
            "blocked": monitor.blocked_stats(),
        }
    )
    jobs = bg.history.jobs()
    running = [j for j in jobs if j.status is JobStatus.RUNNING]
    report["jobs"] = {
        "running": len(running),
        "pending": sum(1 for j in jobs if j.status is JobStatus.PENDING),
        "known": len(jobs),
        "running_jobs": [
            j.to_dict(include_result=False) for j in running[-MAX_RUNNING_LISTED:][::-1]
        ],
    }
    report["queues"] = [q.snapshot() for _, q in sorted(bg.queues.items())]
    report["periodic"] = [pj.snapshot() for _, pj in sorted(bg.periodic_jobs.items())]
    return healthy, report

"""Prometheus metrics: job outcomes and durations, queues, loop lag, periodic jobs.

Counting happens on the loop without ``prometheus_client`` (:class:`JobStats`, a
few dict updates per finished job); the text format is produced at scrape time
by :class:`MetricsExporter`, which needs the optional extra
``pip install 'asyncbg[metrics]'``. Scraping reads state directly and never
waits for the loop, so a stuck loop can still be scraped. No Flask import.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..engine.stats import DURATION_BUCKETS, JobStats

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

    from ..extension import AsyncBG

__all__ = ["DURATION_BUCKETS", "JobStats", "MetricsExporter", "MetricsUnavailable"]


class MetricsUnavailable(RuntimeError):
    """``prometheus_client`` is not installed (``pip install 'asyncbg[metrics]'``)."""


def _import_prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise MetricsUnavailable(
            "metrics need prometheus_client: pip install 'asyncbg[metrics]'"
        ) from None
    return prometheus_client


class MetricsExporter:
    """Serves an :class:`~asyncbg.AsyncBG`'s state in the Prometheus text format.

    :param registry: a ``prometheus_client`` registry to add asyncbg's collector
        to (e.g. ``prometheus_client.REGISTRY`` to serve it with the app's own
        metrics); by default a private one.
    """

    def __init__(self, bg: AsyncBG, registry: CollectorRegistry | None = None) -> None:
        self.bg = bg
        self._registry = registry
        self._registered = False
        self._lock = threading.Lock()

    @staticmethod
    def available() -> bool:
        """True if ``prometheus_client`` can be imported."""
        try:
            _import_prometheus()
        except MetricsUnavailable:
            return False
        return True

    def registry(self) -> CollectorRegistry:
        """The registry asyncbg's collector is in (made and filled on first use).

        :raises MetricsUnavailable: if ``prometheus_client`` is not installed.
        """
        prometheus_client = _import_prometheus()
        with self._lock:
            if self._registry is None:
                self._registry = prometheus_client.CollectorRegistry(auto_describe=True)
            if not self._registered:
                self._registry.register(_Collector(self.bg))
                self._registered = True
            return self._registry

    def render(self) -> tuple[bytes, str]:
        """The current metrics as (body, content type) in the Prometheus text format.

        :raises MetricsUnavailable: if ``prometheus_client`` is not installed.
        """
        prometheus_client = _import_prometheus()
        body: bytes = prometheus_client.generate_latest(self.registry())
        return body, str(prometheus_client.CONTENT_TYPE_LATEST)


class _Collector:
    """Builds every asyncbg metric family from the live state at each scrape."""

    def __init__(self, bg: AsyncBG) -> None:
        self.bg = bg

    def describe(self) -> list[Metric]:
        # Names only, for the registry's duplicate check; no state read.
        return list(self._families(describe=True))

    def collect(self) -> Iterator[Metric]:
        return self._families(describe=False)

    def _families(self, *, describe: bool) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )
        from prometheus_client.utils import floatToGoString

        bg = self.bg
        stats = bg.job_stats

        jobs = CounterMetricFamily(
            "asyncbg_jobs", "Jobs finished, by task and outcome.", labels=["task", "outcome"]
        )
        durations = HistogramMetricFamily(
            "asyncbg_job_duration_seconds",
            "Run time of finished jobs (first start to finish, retries included).",
            labels=["task"],
        )
        running = GaugeMetricFamily("asyncbg_jobs_running", "Jobs running on the loop now.")
        q_depth = GaugeMetricFamily(
            "asyncbg_queue_depth", "Items waiting in each queue.", labels=["queue"]
        )
        q_capacity = GaugeMetricFamily(
            "asyncbg_queue_capacity", "Capacity (maxsize) of each queue.", labels=["queue"]
        )
        q_active = GaugeMetricFamily(
            "asyncbg_queue_active", "Items being handled now, per queue.", labels=["queue"]
        )
        q_items = CounterMetricFamily(
            "asyncbg_queue_items",
            "Items handled by each queue's consumer, by outcome.",
            labels=["queue", "outcome"],
        )
        up = GaugeMetricFamily("asyncbg_loop_up", "1 while the event loop is running.")
        lag = GaugeMetricFamily(
            "asyncbg_loop_lag_seconds", "Event loop lag now (heartbeat lateness)."
        )
        lag_p50 = GaugeMetricFamily(
            "asyncbg_loop_lag_p50_seconds", "Median event loop lag over the last window."
        )
        lag_p99 = GaugeMetricFamily(
            "asyncbg_loop_lag_p99_seconds", "99th percentile event loop lag over the last window."
        )
        blocked = CounterMetricFamily(
            "asyncbg_loop_blocked",
            "Times the event loop was blocked longer than the threshold.",
        )
        blocked_by = CounterMetricFamily(
            "asyncbg_loop_blocked_by_offender",
            "Times the event loop was blocked, by the task or callback blocking it.",
            labels=["offender"],
        )
        p_runs = CounterMetricFamily(
            "asyncbg_periodic_runs", "Runs of each periodic job.", labels=["job"]
        )
        p_failures = CounterMetricFamily(
            "asyncbg_periodic_failures", "Failed runs of each periodic job.", labels=["job"]
        )
        p_skips = CounterMetricFamily(
            "asyncbg_periodic_skips",
            "Ticks of each periodic job skipped (previous run still going, loop busy).",
            labels=["job"],
        )
        p_duration = GaugeMetricFamily(
            "asyncbg_periodic_last_duration_seconds",
            "Run time of each periodic job's last run.",
            labels=["job"],
        )
        p_next = GaugeMetricFamily(
            "asyncbg_periodic_next_due_timestamp_seconds",
            "When each periodic job is next due (Unix time).",
            labels=["job"],
        )
        families = [
            jobs,
            durations,
            running,
            q_depth,
            q_capacity,
            q_active,
            q_items,
            up,
            lag,
            lag_p50,
            lag_p99,
            blocked,
            blocked_by,
            p_runs,
            p_failures,
            p_skips,
            p_duration,
            p_next,
        ]
        if describe:
            yield from families
            return

        for (task, outcome), count in sorted(stats.outcome_counts().items()):
            jobs.add_metric([task, outcome], count)
        for task, (counts, total) in sorted(stats.histograms().items()):
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, n in zip(stats.buckets, counts, strict=True):
                cumulative += n
                buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
            durations.add_metric([task], buckets, total)
        running.add_metric([], bg.runner.active)
        for name, q in sorted(bg.queues.items()):
            q_depth.add_metric([name], q.depth)
            q_capacity.add_metric([name], q.maxsize)
            q_active.add_metric([name], q.active)
            q_items.add_metric([name, "processed"], q.processed)
            q_items.add_metric([name, "failed"], q.failed)
        up.add_metric([], 1.0 if bg.loop_thread.running else 0.0)
        lag_stats = bg.monitor.lag_stats()
        for family, key in ((lag, "current"), (lag_p50, "p50"), (lag_p99, "p99")):
            value = lag_stats[key]
            family.add_metric([], math.nan if value is None else value)
        monitor = bg.monitor
        blocked.add_metric([], monitor.blocked_total)
        for offender, count in sorted(dict(monitor.blocked_by_offender).items()):
            blocked_by.add_metric([offender], count)
        for name, pj in sorted(bg.periodic_jobs.items()):
            p_runs.add_metric([name], pj.runs)
            p_failures.add_metric([name], pj.failures)
            p_skips.add_metric([name], pj.skips)
            p_duration.add_metric(
                [name], math.nan if pj.last_duration is None else pj.last_duration
            )
            p_next.add_metric([name], math.nan if pj.next_due is None else pj.next_due)
        yield from families

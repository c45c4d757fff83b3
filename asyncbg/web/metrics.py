"""Prometheus metrics: job outcomes and durations, queues, loop lag, periodic jobs,
and with a durable backend the cluster (nodes alive and dead, each node's
heartbeat, running count and lag, each store-leased periodic job's leader).
Every process reports the whole cluster from the store: aggregate the
``asyncbg_node_*`` series with ``max by (node)``.

Counting happens on the loop without ``prometheus_client`` (:class:`JobStats`, a
few dict updates per finished job); the text format is produced at scrape time
by :class:`MetricsExporter` from a :class:`~asyncbg.engine.view.StateView`, and
needs the optional extra ``pip install 'asyncbg[metrics]'``. Scraping reads
state directly and never waits for the loop, so a stuck loop can still be
scraped. No Flask import.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..engine.stats import DURATION_BUCKETS, JobStats
from ..errors import NotRunning

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

    from ..engine.view import StateView

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
    """Serves the state a :class:`~asyncbg.engine.view.StateView` shows in the
    Prometheus text format.

    :param registry: a ``prometheus_client`` registry to add asyncbg's collector
        to (e.g. ``prometheus_client.REGISTRY`` to serve it with the app's own
        metrics); by default a private one.
    """

    def __init__(self, view: StateView, registry: CollectorRegistry | None = None) -> None:
        self.view = view
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
                self._registry.register(_Collector(self.view))
                self._registered = True
            return self._registry

    def render(self) -> tuple[bytes, str]:
        """The current metrics as (body, content type) in the Prometheus text format.

        :raises MetricsUnavailable: if ``prometheus_client`` is not installed.
        """
        prometheus_client = _import_prometheus()
        body: bytes = prometheus_client.generate_latest(self.registry())
        return body, str(prometheus_client.CONTENT_TYPE_LATEST)


_COUNTER, _GAUGE, _HISTOGRAM = "counter", "gauge", "histogram"

#: Every family asyncbg serves, in the order they are exposed: key, kind,
#: metric name, help text, labels.
_FAMILIES: tuple[tuple[str, str, str, str, tuple[str, ...]], ...] = (
    ("jobs", _COUNTER, "asyncbg_jobs", "Jobs finished, by task and outcome.", ("task", "outcome")),
    (
        "durations",
        _HISTOGRAM,
        "asyncbg_job_duration_seconds",
        "Run time of finished jobs (first start to finish, retries included).",
        ("task",),
    ),
    ("running", _GAUGE, "asyncbg_jobs_running", "Jobs running on the loop now.", ()),
    ("q_depth", _GAUGE, "asyncbg_queue_depth", "Items waiting in each queue.", ("queue",)),
    (
        "q_capacity",
        _GAUGE,
        "asyncbg_queue_capacity",
        "Capacity (maxsize) of each queue.",
        ("queue",),
    ),
    ("q_active", _GAUGE, "asyncbg_queue_active", "Items being handled now, per queue.", ("queue",)),
    (
        "q_items",
        _COUNTER,
        "asyncbg_queue_items",
        "Items handled by each queue's consumer, by outcome.",
        ("queue", "outcome"),
    ),
    ("up", _GAUGE, "asyncbg_loop_up", "1 while the event loop is running.", ()),
    ("lag", _GAUGE, "asyncbg_loop_lag_seconds", "Event loop lag now (heartbeat lateness).", ()),
    (
        "lag_p50",
        _GAUGE,
        "asyncbg_loop_lag_p50_seconds",
        "Median event loop lag over the last window.",
        (),
    ),
    (
        "lag_p99",
        _GAUGE,
        "asyncbg_loop_lag_p99_seconds",
        "99th percentile event loop lag over the last window.",
        (),
    ),
    (
        "blocked",
        _COUNTER,
        "asyncbg_loop_blocked",
        "Times the event loop was blocked longer than the threshold.",
        (),
    ),
    (
        "blocked_by",
        _COUNTER,
        "asyncbg_loop_blocked_by_offender",
        "Times the event loop was blocked, by the task or callback blocking it.",
        ("offender",),
    ),
    ("p_runs", _COUNTER, "asyncbg_periodic_runs", "Runs of each periodic job.", ("job",)),
    (
        "p_failures",
        _COUNTER,
        "asyncbg_periodic_failures",
        "Failed runs of each periodic job.",
        ("job",),
    ),
    (
        "p_skips",
        _COUNTER,
        "asyncbg_periodic_skips",
        "Ticks of each periodic job skipped (previous run still going, loop busy).",
        ("job",),
    ),
    (
        "p_duration",
        _GAUGE,
        "asyncbg_periodic_last_duration_seconds",
        "Run time of each periodic job's last run.",
        ("job",),
    ),
    (
        "p_next",
        _GAUGE,
        "asyncbg_periodic_next_due_timestamp_seconds",
        "When each periodic job is next due (Unix time).",
        ("job",),
    ),
    (
        "c_nodes",
        _GAUGE,
        "asyncbg_cluster_nodes",
        "Nodes sharing the durable store, alive (heartbeat within lease + lease/3) or dead.",
        ("state",),
    ),
    (
        "n_up",
        _GAUGE,
        "asyncbg_node_up",
        "1 while a node of the cluster heartbeats, 0 once it counts as dead.",
        ("node",),
    ),
    (
        "n_seen",
        _GAUGE,
        "asyncbg_node_last_seen_timestamp_seconds",
        "When each node of the cluster last sent a heartbeat (Unix time).",
        ("node",),
    ),
    (
        "n_running",
        _GAUGE,
        "asyncbg_node_running",
        "Durable jobs each node held at its last heartbeat.",
        ("node",),
    ),
    (
        "n_lag",
        _GAUGE,
        "asyncbg_node_lag_seconds",
        "Each node's event loop lag at its last heartbeat.",
        ("node",),
    ),
    (
        "p_leader",
        _GAUGE,
        "asyncbg_periodic_leader",
        "1 while this node holds the lease of a store-leased periodic job.",
        ("job",),
    ),
    (
        "p_epoch",
        _GAUGE,
        "asyncbg_periodic_lease_epoch",
        "The epoch of each store-leased periodic job's lease.",
        ("job",),
    ),
    (
        "p_expires",
        _GAUGE,
        "asyncbg_periodic_lease_expires_timestamp_seconds",
        "When each store-leased periodic job's lease runs out unless renewed (Unix time).",
        ("job",),
    ),
)


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else value


class _Collector:
    """Builds every asyncbg metric family from the view at each scrape."""

    def __init__(self, view: StateView) -> None:
        self.view = view

    def describe(self) -> list[Metric]:
        # Names only, for the registry's duplicate check; no state read.
        return list(_new_families().values())

    def collect(self) -> Iterator[Metric]:
        families = _new_families()
        self._add_jobs(families)
        self._add_queues(families)
        self._add_loop(families)
        self._add_periodic(families)
        self._add_cluster(families)
        return iter(families.values())

    def _add_jobs(self, f: dict[str, Any]) -> None:
        from prometheus_client.utils import floatToGoString

        view = self.view
        stats = view.job_stats()
        for (task, outcome), count in sorted(stats["outcomes"].items()):
            f["jobs"].add_metric([task, outcome], count)
        for task, (counts, total) in sorted(stats["histograms"].items()):
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, n in zip(stats["buckets"], counts, strict=True):
                cumulative += n
                buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
            f["durations"].add_metric([task], buckets, total)
        f["running"].add_metric([], view.job_counts()["active"])

    def _add_queues(self, f: dict[str, Any]) -> None:
        queues = self.view.queue_snapshots()
        _add_per_name(f, queues, _QUEUE_SAMPLES)
        for q in queues:
            f["q_items"].add_metric([q["name"], "processed"], q["processed"])
            f["q_items"].add_metric([q["name"], "failed"], q["failed"])

    def _add_loop(self, f: dict[str, Any]) -> None:
        view = self.view
        f["up"].add_metric([], 1.0 if view.loop_running() else 0.0)
        stats = view.loop_stats()
        for key, stat in (("lag", "current"), ("lag_p50", "p50"), ("lag_p99", "p99")):
            f[key].add_metric([], _nan_if_none(stats["lag"][stat]))
        blocked = stats["blocked"]
        f["blocked"].add_metric([], blocked["count"])
        for offender, count in sorted(blocked["by_offender"].items()):
            f["blocked_by"].add_metric([offender], count)

    def _add_periodic(self, f: dict[str, Any]) -> None:
        _add_per_name(f, self.view.periodic_snapshots(), _PERIODIC_SAMPLES)

    def _add_cluster(self, f: dict[str, Any]) -> None:
        # Nothing with the memory backend, nor while the loop (the way to the store) is down.
        if not self.view.loop_running():
            return
        try:
            cluster = self.view.cluster()
        except NotRunning:
            return
        if not cluster["shared"]:
            return
        f["c_nodes"].add_metric(["alive"], cluster["alive"])
        f["c_nodes"].add_metric(["dead"], cluster["dead"])
        for node in cluster["nodes"]:
            label = [node["id"]]
            f["n_up"].add_metric(label, 1.0 if node["alive"] else 0.0)
            f["n_seen"].add_metric(label, node["last_seen"])
            f["n_running"].add_metric(label, node["running"])
            f["n_lag"].add_metric(label, _nan_if_none(node["lag"]))
        for job, leader in sorted(cluster["leaders"].items()):
            f["p_leader"].add_metric([job], 1.0 if leader["here"] else 0.0)
            f["p_epoch"].add_metric([job], _nan_if_none(leader["epoch"]))
            f["p_expires"].add_metric([job], _nan_if_none(leader["expires_at"]))


#: (family key, snapshot field) of the one-sample-per-name families.
_QUEUE_SAMPLES = (("q_depth", "depth"), ("q_capacity", "capacity"), ("q_active", "active"))
_PERIODIC_SAMPLES = (
    ("p_runs", "runs"),
    ("p_failures", "failures"),
    ("p_skips", "skips"),
    ("p_duration", "last_duration"),
    ("p_next", "next_due"),
)


def _add_per_name(
    f: dict[str, Any], snapshots: list[dict[str, Any]], samples: tuple[tuple[str, str], ...]
) -> None:
    # One sample per snapshot, labelled with its name; None (not yet known) is NaN.
    for snapshot in snapshots:
        for key, field in samples:
            f[key].add_metric([snapshot["name"]], _nan_if_none(snapshot[field]))


def _new_families() -> dict[str, Any]:
    # Made afresh for every scrape: a family holds the samples added to it.
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    kinds = {
        _COUNTER: CounterMetricFamily,
        _GAUGE: GaugeMetricFamily,
        _HISTOGRAM: HistogramMetricFamily,
    }
    return {
        key: kinds[kind](name, doc, labels=list(labels))
        for key, kind, name, doc, labels in _FAMILIES
    }

"""On-loop job counters: :class:`JobStats` counts finished jobs by task and
outcome and keeps their duration histograms, a few dict updates per finished job
and no ``prometheus_client``; :mod:`asyncbg.web.metrics` serves them.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .jobs import Job

__all__ = ["DURATION_BUCKETS", "JobStats"]

#: Upper bounds (seconds) of the job duration histogram's buckets.
DURATION_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    math.inf,
)

# Label values come from task and function names; anything else (the repr of a
# functools.partial, with an address in it) would make a new series per job.
_PLAIN_LABEL = re.compile(r"[\w.:<>\-]{1,120}")


_LABEL_CACHE_SIZE = 1000


def _label(name: str) -> str:
    return name if _PLAIN_LABEL.fullmatch(name) else "other"


class _Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self, n: int) -> None:
        self.counts = [0] * n
        self.sum = 0.0


class JobStats:
    """Counts of finished jobs by task and outcome, and their duration histograms.

    :meth:`record` is a job-finish hook (loop thread); readers in other threads
    take copies.
    """

    def __init__(self, buckets: Sequence[float] = DURATION_BUCKETS) -> None:
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.buckets: tuple[float, ...] = tuple(bounds)
        self.outcomes: dict[tuple[str, str], int] = {}
        self.durations: dict[str, _Histogram] = {}
        self._labels: dict[str, str] = {}

    def record(self, job: Job[Any]) -> None:
        """Count one finished job (its name, final status and run time)."""
        # On the loop for every job: kept to a few dict operations.
        name = job.name
        task = self._labels.get(name)
        if task is None:
            task = _label(name)
            if len(self._labels) < _LABEL_CACHE_SIZE:
                self._labels[name] = task
        key = (task, job.status)  # a StrEnum: hashes and prints as its value
        outcomes = self.outcomes
        outcomes[key] = outcomes.get(key, 0) + 1
        started, finished = job.started_at, job.finished_at
        if started is None or finished is None:
            return  # cancelled before it started: no duration
        duration = finished - started
        if duration < 0.0:  # the wall clock was set back meanwhile
            duration = 0.0
        hist = self.durations.get(task)
        if hist is None:
            hist = self.durations[task] = _Histogram(len(self.buckets))
        hist.counts[bisect.bisect_left(self.buckets, duration)] += 1
        hist.sum += duration

    def outcome_counts(self) -> dict[tuple[str, str], int]:
        """A copy of ``{(task, outcome): count}``."""
        return {(task, str(outcome)): n for (task, outcome), n in list(self.outcomes.items())}

    def histograms(self) -> dict[str, tuple[list[int], float]]:
        """``{task: (per-bucket counts, sum of durations)}`` (copies; not cumulative)."""
        return {task: (list(h.counts), h.sum) for task, h in list(self.durations.items())}

"""When a periodic job's next run is due: fixed rate, fixed delay and cron.

Pure arithmetic on the times given to it: no clock is read and no asyncio is
touched here (:mod:`asyncbg.engine.periodic` reads the clocks, arms the timers
and counts what is skipped).

Fixed rate means run N is due at ``anchor + N * period``, so the time a run
takes never shifts the ones after it; occurrences that fell while the loop was
busy are skipped, not run late in a burst. Fixed delay means the next run is
due ``delay`` after the previous one ended. Cron follows its expression in
wall-clock time.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from croniter import croniter

__all__ = ["CronTrigger", "DelayTrigger", "RateTrigger", "Trigger"]


class RateTrigger:
    """Fixed rate: run N is due at ``anchor + N * period`` (loop clock)."""

    __slots__ = ("anchor", "n", "period")

    def __init__(self, period: float) -> None:
        self.period = period
        self.anchor = 0.0
        self.n = 0

    def __str__(self) -> str:
        return f"every {self.period:g}s"

    def first_due(self, now: float, run_at_start: bool) -> float:
        """Anchor the schedule at ``now``; the first run is due now or a period later."""
        self.anchor = now
        self.n = 0 if run_at_start else 1
        return now + self.n * self.period

    def realign(self, anchor: float, due: float) -> float:
        """Move the schedule onto ``anchor + N * period`` (an anchor shared with
        other processes, in this clock), N the period nearest to ``due`` (the
        run armed now); return that run's due time, at most half a period
        from ``due``."""
        self.anchor = anchor
        self.n = round((due - anchor) / self.period)
        return anchor + self.n * self.period

    def next_due(self, now: float) -> tuple[float, int]:
        """The next run's due time after one fired, and how many whole periods
        before it were missed (the loop was busy at ``now``)."""
        self.n += 1
        due = self.anchor + self.n * self.period
        late = now - due
        if late < self.period:
            return due, 0
        missed = int(late // self.period)
        self.n += missed
        return self.anchor + self.n * self.period, missed


class DelayTrigger:
    """Fixed delay: the next run is due ``delay`` after the previous one ended."""

    __slots__ = ("delay",)

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def __str__(self) -> str:
        return f"delay {self.delay:g}s"

    def first_due(self, now: float, run_at_start: bool) -> float:
        """The first run is due now or a delay later."""
        return now + (0 if run_at_start else 1) * self.delay

    def due_after(self, now: float) -> float:
        """Due time of the run after one that ended (or was not started) at ``now``."""
        return now + self.delay


class CronTrigger:
    """A cron expression's occurrences, in wall-clock seconds since the epoch."""

    __slots__ = ("_iter", "expression")

    def __init__(self, expression: str) -> None:
        """:raises ValueError: if ``expression`` is not a valid cron expression."""
        if not croniter.is_valid(expression):
            raise ValueError(f"not a valid cron expression: {expression!r}")
        self.expression = expression
        self._iter: Any = None

    def __str__(self) -> str:
        return f"cron {self.expression}"

    def start(self, now: dt.datetime) -> None:
        """Count occurrences from ``now`` (an aware datetime: it carries the time zone)."""
        self._iter = croniter(self.expression, now)

    def next_due(self, wall_now: float) -> tuple[float, int]:
        """The next occurrence not more than a second before ``wall_now``, and how
        many earlier ones were missed (the loop was busy)."""
        missed = 0
        nxt: float = self._iter.get_next(float)
        while nxt < wall_now - 1.0:
            missed += 1
            nxt = self._iter.get_next(float)
        return nxt, missed


Trigger = RateTrigger | DelayTrigger | CronTrigger

"""The narrow view of one app's state that the web surface, health, metrics
and the CLI read: they never touch the extension's attributes.

Every method is synchronous, safe from any thread, and answers from state read
directly (never by waiting on the loop) unless it says otherwise, so a blocked
or stopped loop is reported rather than waited for. Today the view answers
from this process; with a shared backend it answers for every process that
shares it, and the surfaces do not change.
"""

from __future__ import annotations

from typing import Any, Protocol

from .records import JobPage, JobQuery, JobRecord

__all__ = ["StateView"]


class StateView(Protocol):
    """What the surfaces may read and ask of one app's asyncbg."""

    @property
    def name(self) -> str:
        """The extension's name (the page's title)."""
        ...

    def loop_running(self) -> bool:
        """True while the app's event loop runs."""
        ...

    def get_job(self, job_id: str) -> JobRecord | None:
        """Return a job's record, or None when unknown or forgotten."""
        ...

    def query_jobs(self, query: JobQuery) -> JobPage:
        """Return a page of job records, newest first."""
        ...

    def job_counts(self) -> dict[str, int]:
        """Return how many jobs are ``running``, ``pending`` and ``known``."""
        ...

    def queue_snapshots(self) -> list[dict[str, Any]]:
        """Return each queue's state, sorted by name."""
        ...

    def periodic_snapshots(self) -> list[dict[str, Any]]:
        """Return each periodic job's state, sorted by name."""
        ...

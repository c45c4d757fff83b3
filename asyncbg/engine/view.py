"""The narrow view of one app's state that the web surface, health, metrics
and the CLI read: they never touch the extension's attributes.

Every method is synchronous, safe from any thread, and answers from state read
directly (never by waiting on the loop) unless it says otherwise, so a blocked
or stopped loop is reported rather than waited for. The methods that act
(:meth:`StateView.cancel_job`, :meth:`StateView.wait_job`,
:meth:`StateView.run_periodic_now`, :meth:`StateView.run_once` and the loop's
:meth:`StateView.wait_idle` and :meth:`StateView.stop`) say what they wait for.
Today the view answers from this process; with a shared backend it answers for
every process that shares it, and the surfaces do not change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from .records import JobPage, JobQuery, JobRecord

__all__ = ["RunKind", "RunResult", "StateView"]

#: What ``flask asyncbg run NAME`` runs: a periodic job or a task.
RunKind = Literal["periodic", "task"]


@dataclass(frozen=True, slots=True)
class RunResult:
    """How one :meth:`StateView.run_once` went.

    ``record`` is the job as it ended (or as it was when the wait was
    interrupted); ``took`` the seconds from submission to its end. The texts
    are made where the job ran: ``result_repr`` is the repr of a success's
    return value, ``message`` says why a cancelled or timed-out job did not
    succeed, ``traceback`` is a failure's formatted traceback.
    """

    record: JobRecord
    took: float
    started_loop: bool
    interrupted: bool = False
    result_repr: str | None = None
    message: str | None = None
    traceback: str | None = None


class StateView(Protocol):
    """What the surfaces may read and ask of one app's asyncbg."""

    @property
    def name(self) -> str:
        """The extension's name (the page's title)."""
        ...

    # -- the loop ------------------------------------------------------------------

    def loop_running(self) -> bool:
        """True while the app's event loop runs."""
        ...

    def loop_lag(self) -> float | None:
        """The loop's lag now in seconds (None while it is not monitored or
        before the first heartbeat)."""
        ...

    def loop_stats(self) -> dict[str, Any]:
        """The monitor's readings: ``lag`` (``current``, ``p50``, ``p99``,
        ``max``, ``samples``, ``window``, ``interval``), ``monitored`` (bool),
        ``window`` (seconds) and ``blocked`` (``count``, ``threshold``,
        ``by_offender``, ``last``)."""
        ...

    # -- jobs ----------------------------------------------------------------------

    def get_job(self, job_id: str) -> JobRecord | None:
        """Return a job's record, or None when unknown or forgotten."""
        ...

    def query_jobs(self, query: JobQuery) -> JobPage:
        """Return a page of job records, newest first."""
        ...

    def job_counts(self) -> dict[str, int]:
        """Return how many jobs are ``running``, ``pending`` and ``known``, and
        how many are ``active`` (started by a runner and not finished, retries
        waiting for their next attempt included)."""
        ...

    def job_stats(self) -> dict[str, Any]:
        """Return the statistics of finished jobs: ``buckets`` (the duration
        histogram's upper bounds), ``outcomes`` (``{(task, outcome): count}``)
        and ``histograms`` (``{task: (per-bucket counts, sum)}``, not cumulative)."""
        ...

    # -- queues, schedules and definitions -----------------------------------------

    def queue_snapshots(self) -> list[dict[str, Any]]:
        """Return each queue's state, sorted by name."""
        ...

    def periodic_snapshots(self) -> list[dict[str, Any]]:
        """Return each periodic job's state, sorted by name."""
        ...

    def registry(self) -> dict[str, list[dict[str, Any]]]:
        """Return what is registered, each list sorted by name: ``periodic``
        (``name``, ``schedule``, ``scope``, ``timeout``), ``consumers``
        (``queue``, ``concurrency``, ``size``) and ``tasks`` (``name``,
        ``timeout``, ``retries``, ``kind``: ``"async"`` or ``"sync"``)."""
        ...

    def cluster(self) -> dict[str, Any]:
        """Return the whole cluster sharing this app's store (asking the store,
        through the loop, when it is durable).

        ``shared`` (False with the memory backend: then nothing else is
        filled), ``node`` (this app's node id), ``lease`` and ``dead_after``
        (seconds: a node silent for longer is dead), ``time`` (now, on this
        host), ``alive`` and ``dead`` (how many nodes), ``nodes`` (each:
        ``id``, ``host``, ``pid``, ``started_at``, ``last_seen``, ``age``,
        ``running``, ``lag``, ``alive``, ``here``; newest heartbeat first) and
        ``leaders``: for each store-leased periodic job (scope host or
        cluster) of this app by name, ``owner``, ``epoch``, ``expires_at``,
        ``held`` and ``here`` (see :mod:`asyncbg.engine.cluster`).

        :raises NotRunning: with a durable backend while the loop is not running.
        :raises BackendError: if the store failed.
        """
        ...

    # -- acting (these may wait, as they say) --------------------------------------

    def cancel_job(self, job_id: str, *, wait: float = 0.0) -> tuple[str, JobRecord | None]:
        """Ask for a job to be cancelled, then wait up to ``wait`` seconds for it to end.

        Returns a :class:`~asyncbg.engine.records.CancelResult` value and the
        job's record after the wait (None for ``UNKNOWN``): ``FINAL`` if it had
        already ended, ``REQUESTED`` if the request was made (the record says
        whether it has ended since).

        :raises NotRunning: if the job is not final and the loop is not running.
        :raises RuntimeError: if called on the loop thread with ``wait`` > 0.
        """
        ...

    def wait_job(self, job_id: str, timeout: float | None) -> JobRecord | None:
        """Wait up to ``timeout`` seconds (None: no limit) for a job to end and
        return its record then (final or not), or None when unknown.

        :raises RuntimeError: if called on the loop thread while the job runs.
        """
        ...

    def run_periodic_now(self, name: str, *, timeout: float) -> tuple[bool, dict[str, Any]]:
        """Start a run of the periodic job ``name`` now, out of schedule.

        Returns whether a run started (not when one is already in progress or
        the schedule is not started) and the job's snapshot after asking.

        :raises KeyError: if there is no periodic job of that name.
        :raises NotRunning: if the loop is not running.
        :raises TimeoutError: if the loop does not answer within ``timeout``
            (the run starts when it does).
        """
        ...

    def run_once(
        self, kind: RunKind, name: str, args: Sequence[Any], kwargs: dict[str, Any]
    ) -> RunResult:
        """Run the periodic job or task ``name`` once in this process and wait for its end.

        The arguments are checked before anything starts. If the loop is not
        running it is started without the periodic schedules
        (``RunResult.started_loop``: the caller then calls :meth:`wait_idle`
        and :meth:`stop`). A ``KeyboardInterrupt`` during the wait cancels the
        job (waiting 5 s for it) and returns with ``interrupted`` set.

        :raises KeyError: if there is no periodic job or task of that kind and name.
        :raises TypeError: if the arguments do not fit the task (or a periodic
            job is given any).
        :raises RuntimeError: if the loop cannot start (see ``AsyncBG.start``).
        """
        ...

    def wait_idle(self) -> None:
        """Wait, at most ``ASYNCBG_SHUTDOWN_TIMEOUT``, until no job runs and every
        queue is empty.

        :raises TimeoutError: if work is still going then (it goes on).
        :raises RuntimeError: if called from the loop thread.
        """
        ...

    def stop(self) -> None:
        """Stop the loop gracefully (see ``AsyncBG.stop``); idempotent."""
        ...

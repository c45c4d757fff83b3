"""The :class:`~asyncbg.engine.view.StateView` of one app, answered from this process.

The HTTP surface, health, metrics and the CLI read an app's asyncbg only
through its view; :class:`AppView` answers from the app's
:class:`~asyncbg.lifecycle.AppState` and the extension's task registry. Live
:class:`~asyncbg.Job` handles never leave it: jobs go out as
:class:`~asyncbg.engine.records.JobRecord`.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from .engine.cluster import dead_after, lease_dict, node_dicts
from .engine.jobs import Job, JobStatus, TaskOptions
from .engine.records import CancelResult, JobPage, JobQuery, JobRecord, LeaseState, NodeRecord
from .engine.tasks import Task
from .engine.view import RunKind, RunResult
from .errors import JobCancelled, JobTimedOut, NotRunning

if TYPE_CHECKING:
    from .engine.durable import DurableRunner
    from .lifecycle import AppState

T = TypeVar("T")

__all__ = ["AppView"]

#: How long an interrupted ``run_once`` waits for the cancelled job to end.
_INTERRUPT_WAIT = 5.0


class AppView:
    """One app's :class:`~asyncbg.engine.view.StateView`, from its state in this process.

    :param state: the app's state.
    :param tasks: the extension's task registry (read live: tasks declared
        later are seen).
    """

    def __init__(self, state: AppState, tasks: Mapping[str, Task[Any, Any]]) -> None:
        self._state = state
        self._tasks = tasks

    def __repr__(self) -> str:
        return f"<AppView of {self._state!r}>"

    @property
    def name(self) -> str:
        """The extension's name."""
        return self._state.name

    # -- the loop ------------------------------------------------------------------

    def loop_running(self) -> bool:
        """True while the app's event loop runs."""
        return self._state.loop_thread.running

    def loop_lag(self) -> float | None:
        """The loop's lag now (None while unmonitored or before the first heartbeat)."""
        return self._state.monitor.current_lag()

    def loop_stats(self) -> dict[str, Any]:
        """The monitor's readings (see :meth:`StateView.loop_stats`)."""
        monitor = self._state.monitor
        return {
            "lag": monitor.lag_stats(),
            "monitored": monitor.active,
            "window": monitor.window,
            "blocked": monitor.blocked_stats(),
        }

    # -- jobs ----------------------------------------------------------------------

    def _live(self, job_id: str) -> Job[Any] | None:
        return self._state.history.get(job_id) if isinstance(job_id, str) else None

    def _store(self) -> DurableRunner | None:
        # The durable runner, when the store can be asked from this thread: the
        # loop runs and this is not its thread (which cannot wait on itself).
        durable = self._state.durable
        lt = self._state.loop_thread
        if durable is None or not lt.running or lt.in_loop_thread():
            return None
        return durable

    def _ask(self, durable: DurableRunner, coro: Coroutine[Any, Any, T]) -> T:
        return self._state.loop_thread.submit(coro).result(durable.ack_timeout)

    def _local_jobs(self, durable: DurableRunner | None) -> list[Job[Any]]:
        # This process's jobs the store does not hold (all of them without one).
        jobs = self._state.history.jobs()
        return jobs if durable is None else [j for j in jobs if j._runner is not durable]

    def get_job(self, job_id: str) -> JobRecord | None:
        """A job's record, or None when unknown or forgotten (with a durable
        backend, the store's record first: any process's job, with its owner).

        :raises BackendError: if the store failed.
        """
        durable = self._store()
        if durable is not None and isinstance(job_id, str):
            record = self._ask(durable, durable.store.get(job_id))
            if record is not None:
                return record
        job = self._live(job_id)
        return None if job is None else job.record()

    def query_jobs(self, query: JobQuery) -> JobPage:
        """A page of job records, newest first (only the page is converted);
        with a durable backend, the store's jobs and this process's others.

        :raises BackendError: if the store failed.
        """
        statuses, task = query.statuses, query.task
        durable = self._store()
        selected = [
            job
            for job in reversed(self._local_jobs(durable))
            # A JobStatus is a StrEnum: it is found in a set of status strings.
            if (statuses is None or job.status in statuses) and (task is None or job.name == task)
        ]
        if durable is None:
            page = selected[query.offset : query.offset + query.limit]
            return JobPage(tuple(job.record() for job in page), len(selected))
        # Enough of both, newest first, to cut the page from.
        wanted = query.offset + query.limit
        stored = self._ask(
            durable,
            durable.store.query(JobQuery(statuses=statuses, task=task, offset=0, limit=wanted)),
        )
        merged = sorted(
            [*stored.records, *(job.record() for job in selected[:wanted])],
            key=lambda r: r.created_at,
            reverse=True,
        )
        return JobPage(tuple(merged[query.offset : wanted]), stored.total + len(selected))

    def job_counts(self) -> dict[str, int]:
        """How many jobs are running, pending, known and active (with a durable
        backend: the store's counts, for every process, plus this one's others).

        :raises BackendError: if the store failed.
        """
        durable = self._store()
        jobs = self._local_jobs(durable)
        counts = {
            "running": sum(1 for j in jobs if j.status is JobStatus.RUNNING),
            "pending": sum(1 for j in jobs if j.status is JobStatus.PENDING),
            "known": len(jobs),
            "active": self._state.runner.active,
        }
        if durable is not None:
            for by_status in self._stored_stats(durable).values():
                counts["running"] += by_status.get("running", 0)
                counts["pending"] += by_status.get("pending", 0)
                counts["known"] += sum(by_status.values())
        return counts

    def _stored_stats(self, durable: DurableRunner) -> dict[str, dict[str, int]]:
        return self._ask(durable, durable.store.stats())

    def job_stats(self) -> dict[str, Any]:
        """The statistics of finished jobs (copies)."""
        stats = self._state.job_stats
        return {
            "buckets": stats.buckets,
            "outcomes": stats.outcome_counts(),
            "histograms": stats.histograms(),
        }

    # -- queues, schedules and definitions -----------------------------------------

    def queue_snapshots(self) -> list[dict[str, Any]]:
        """Each queue's state, sorted by name (a durable queue's depth is the
        count of its items stored and not started, from every process).

        :raises BackendError: if the store failed.
        """
        st = self._state
        snapshots = [q.snapshot() for _, q in sorted(st.queues.items())]
        durable = self._store()
        if durable is not None and any(st.stored_queue(q) for q in st.queues.values()):
            stats = self._stored_stats(durable)
            for snap in snapshots:
                if st.stored_queue(st.queues[snap["name"]]) is not None:
                    snap["depth"] = stats.get(snap["name"], {}).get("pending", 0)
                    snap["durable"] = True
        return snapshots

    def periodic_snapshots(self) -> list[dict[str, Any]]:
        """Each periodic job's state, sorted by name."""
        return [pj.snapshot() for _, pj in sorted(self._state.periodic_jobs.items())]

    def registry(self) -> dict[str, list[dict[str, Any]]]:
        """What is registered (see :meth:`StateView.registry`)."""
        st = self._state
        return {
            "periodic": [
                {"name": name, "schedule": pj.schedule, "scope": pj.scope, "timeout": pj.timeout}
                for name, pj in sorted(st.periodic_jobs.items())
            ],
            "consumers": [
                {"queue": name, "concurrency": q.concurrency, "size": q.maxsize}
                for name, q in sorted(st.queues.items())
            ],
            "tasks": [
                {
                    "name": name,
                    "timeout": t.options.timeout,
                    "retries": t.options.retries,
                    "kind": "async" if t.is_async else "sync",
                }
                for name, t in sorted(self._tasks.items())
            ],
        }

    def cluster(self) -> dict[str, Any]:
        """The nodes sharing this app's store and the leaders of its store-leased
        periodic jobs (see :meth:`StateView.cluster`), in one visit to the store.

        :raises NotRunning: with a durable backend while the loop is not running.
        :raises BackendError: if the store failed.
        """
        st = self._state
        if st.durable is None:
            return {"shared": False, "node": None, "nodes": [], "leaders": {}}
        durable = self._store()
        if durable is None:
            raise NotRunning("the event loop is not running: the store is asked through it")
        nodes, leases = self._ask(durable, _read_cluster(durable))
        now = time.time()
        here = durable.owner
        listed = node_dicts(nodes, now=now, lease=durable.lease, here=here)
        alive = sum(1 for n in listed if n["alive"])
        by_name = {lease.name: lease for lease in leases}
        leaders = {
            name: lease_dict(by_name.get(st.lease_name(pj)), now=now, here=here)
            for name, pj in sorted(st.periodic_jobs.items())
            if pj.scope != "process"
        }
        return {
            "shared": True,
            "node": here,
            "lease": durable.lease,
            "dead_after": dead_after(durable.lease),
            "time": now,
            "alive": alive,
            "dead": len(listed) - alive,
            "nodes": listed,
            "leaders": leaders,
        }

    # -- acting ----------------------------------------------------------------------

    def cancel_job(self, job_id: str, *, wait: float = 0.0) -> tuple[str, JobRecord | None]:
        """Ask for a job to be cancelled and wait up to ``wait`` seconds for its end.

        The live job is held across both, so its record is found even if the
        history forgets it the moment it ends (``ASYNCBG_JOB_HISTORY_SIZE = 0``).

        :raises NotRunning: if the job is not final and the loop is not running.
        :raises RuntimeError: if called on the loop thread with ``wait`` > 0.
        """
        job = self._handle(job_id)
        if job is None:
            return CancelResult.UNKNOWN, None
        # cancel() is False for a job that has ended, and when the loop is gone.
        if job.done() or not job.cancel():
            if job.done():
                return CancelResult.FINAL, job.record()
            raise NotRunning("the event loop is not running")
        if wait > 0:
            job.wait(wait)
        return CancelResult.REQUESTED, job.record()

    def wait_job(self, job_id: str, timeout: float | None) -> JobRecord | None:
        """Wait up to ``timeout`` seconds for a job's end; its record then, or None.

        :raises RuntimeError: if called on the loop thread while the job runs.
        """
        job = self._handle(job_id)
        if job is None:
            return None
        job.wait(timeout)
        return job.record()

    def _handle(self, job_id: str) -> Job[Any] | None:
        # A live handle: this process's, or one for a job in the store.
        job = self._live(job_id)
        durable = self._store()
        if job is None and durable is not None and isinstance(job_id, str):
            job = self._ask(durable, durable.lookup(job_id))
        return job

    def run_periodic_now(self, name: str, *, timeout: float) -> tuple[bool, dict[str, Any]]:
        """Start a run of the periodic job ``name`` now (see :meth:`StateView.run_periodic_now`).

        :raises KeyError: if there is no periodic job of that name.
        :raises NotRunning: if the loop is not running.
        :raises TimeoutError: if the loop does not answer within ``timeout``.
        """
        pj = self._state.periodic_jobs[name]
        started = self._state.loop_thread.call(pj.run_now, timeout=timeout)
        return started, pj.snapshot()

    def run_once(
        self, kind: RunKind, name: str, args: Sequence[Any], kwargs: dict[str, Any]
    ) -> RunResult:
        """Run one periodic job or task once here (see :meth:`StateView.run_once`).

        :raises KeyError: if there is no periodic job or task of that kind and name.
        :raises TypeError: if the arguments do not fit.
        :raises RuntimeError: if the loop cannot start.
        """
        job = self._new_job(kind, name, tuple(args), kwargs)
        st = self._state
        started_loop = not st.loop_thread.running
        if started_loop:
            if st.durable is not None:
                st.durable.claiming = False  # a CLI run takes no one else's work
            st.start(periodic=False)
        try:
            t0 = time.monotonic()
            st.runner.submit(job)
            try:
                job.wait()
            except KeyboardInterrupt:
                job.cancel()
                job.wait(_INTERRUPT_WAIT)
                took = time.monotonic() - t0
                return RunResult(job.record(), took, started_loop, interrupted=True)
            return _run_result(job, time.monotonic() - t0, started_loop)
        except BaseException:
            # The caller stops a loop this started only once it has the result.
            if started_loop:
                st.stop()
            raise

    def _new_job(
        self, kind: RunKind, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Job[Any]:
        # Checked here, before the loop starts: such a job would fail every attempt.
        runner = self._state.runner
        if kind == "periodic":
            pj = self._state.periodic_jobs[name]
            if args or kwargs:
                raise TypeError(f"periodic job {name!r} takes no arguments")
            options = TaskOptions(timeout=pj.timeout)
            return runner.create(pj.fn, (), {}, name=pj.name, options=options, is_async=True)
        return runner.create_for(self._tasks[name], args, kwargs)

    def wait_idle(self) -> None:
        """Wait, at most ``ASYNCBG_SHUTDOWN_TIMEOUT``, for every job and queue item.

        :raises TimeoutError: if work is still going then.
        :raises RuntimeError: if called from the loop thread.
        """
        self._state.wait_idle(self._state.shutdown_timeout)

    def stop(self) -> None:
        """Stop the app's loop gracefully; idempotent."""
        self._state.stop()


async def _read_cluster(durable: DurableRunner) -> tuple[list[NodeRecord], list[LeaseState]]:
    return await durable.store.nodes(), await durable.store.leases()


def _run_result(job: Job[Any], took: float, started_loop: bool) -> RunResult:
    # The texts come from the live outcome: the repr of the return value, the
    # message of a cancellation or timeout, the traceback of a failure.
    try:
        result = job.result(0)
    except (JobCancelled, JobTimedOut) as exc:
        return RunResult(job.record(), took, started_loop, message=str(exc))
    except Exception as exc:
        text = "".join(traceback.format_exception(exc)).rstrip()
        return RunResult(job.record(), took, started_loop, traceback=text)
    shown = None if result is None else repr(result)
    return RunResult(job.record(), took, started_loop, result_repr=shown)

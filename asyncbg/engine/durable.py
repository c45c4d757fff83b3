"""Durable jobs: submitted into a backend's store, claimed by whichever process
has room, run at least once.

:class:`DurableRunner` is the engine's side of the seam
(:mod:`asyncbg.backends.base`), on the loop thread of one process:

- **submit** stages the record on the loop; everything staged in one loop turn
  goes to the store in one ``enqueue`` call (one commit), and the submitting
  thread returns once that commit is acknowledged;
- a **claimer** takes due records of the queues this process serves, as many
  as it has room for (``concurrency`` for tasks, each consumer's own), when
  woken (a local submit, a finished job, the backend's cross-process wake-up)
  or by polling with backoff;
- a **renewer** extends every held claim in one call each ``lease / 3``, and
  cancels the local run of a claim it lost (or whose cancel was asked for);
- every outcome is a fenced write (``finish``, ``retry``, ``progress``): a
  stale owner's late result changes nothing and is counted;
- at stop, runs still going after the grace period are **released** to the
  store, not cancelled, and counted in the report's ``released``.

A backend write is never cancelled half-way: writes run in tasks of their own
that stop() waits for. No Flask import: tasks and consumers come in as mappings.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ..errors import BackendError, JobCancelled, JobTimedOut, NotRunning, QueueFull
from .cluster import forget_after
from .jobs import DEFAULT_OPTIONS, Job, JobHistory, JobStatus, TaskOptions, _current_job
from .logthrottle import describe_exception
from .node import new_node
from .records import (
    CancelResult,
    Claim,
    JobPage,
    JobQuery,
    JobRecord,
    LeaseState,
    NodeRecord,
    Outcome,
    RenewResult,
    Take,
    decode_json,
    encode_arguments,
    encode_json,
)
from .runner import CloseTolerant, JobRunner

if TYPE_CHECKING:
    from .consumers import WorkQueue
    from .loop import LoopThread
    from .tasks import Task

__all__ = ["DurableRunner", "Store", "item_record", "task_record"]

log = logging.getLogger("asyncbg")

T = TypeVar("T")

# The claimer's poll delay grows from this after activity, to poll_interval.
_POLL_FIRST = 0.01
# The pauses between tries to store an outcome while the store is away.
_OUTCOME_RETRY_FIRST, _OUTCOME_RETRY_MAX = 0.05, 1.0
# How long a store wait lasts before a waiter looks again (store polls inside).
_WAIT_SLICE = 1.0
# Progress writes of one job are coalesced over this many seconds.
_PROGRESS_EVERY = 0.25
# Finished records are expired at most this often.
_EXPIRE_EVERY = 60.0
# Error text kept in a record.
_ERROR_LIMIT = 2000


class Store(Protocol):
    """The part of :class:`asyncbg.backends.base.Backend` the runner uses."""

    async def enqueue(
        self,
        records: Sequence[JobRecord],
        *,
        limits: Mapping[str, int] | None = None,
        take: Take | None = None,
    ) -> list[JobRecord | None]: ...

    def enqueue_from_thread(
        self,
        records: Sequence[JobRecord],
        *,
        limits: Mapping[str, int] | None = None,
        take: Take | None = None,
    ) -> concurrent.futures.Future[list[JobRecord | None]] | None: ...

    async def claim(
        self, queues: Sequence[str], owner: str, limit: int, lease: float
    ) -> list[Claim]: ...

    async def renew(self, claims: Sequence[Claim], lease: float) -> RenewResult: ...

    async def finish(self, claim: Claim, outcome: Outcome) -> bool: ...

    async def finish_many(self, outcomes: Sequence[tuple[Claim, Outcome]]) -> list[bool]: ...

    async def retry(self, claim: Claim, run_at: float, error: str | None) -> bool: ...

    async def release(self, claims: Sequence[Claim]) -> int: ...

    async def progress(
        self, claim: Claim, done: float, total: float | None, message: str | None
    ) -> bool: ...

    async def get(self, job_id: str) -> JobRecord | None: ...

    async def query(self, query: JobQuery) -> JobPage: ...

    async def stats(self) -> dict[str, dict[str, int]]: ...

    async def cancel(self, job_id: str) -> str: ...

    async def wait(self, job_ids: Sequence[str], timeout: float) -> list[JobRecord]: ...

    async def expire(self, finished_before: float) -> int: ...

    async def heartbeat(self, node: NodeRecord, *, forget_after: float = ...) -> None: ...

    async def nodes(self) -> list[NodeRecord]: ...

    async def forget_node(self, node_id: str) -> None: ...

    async def leases(self) -> list[LeaseState]: ...

    def on_new_work(self, callback: Callable[[], object]) -> None: ...

    def on_cancel_request(self, callback: Callable[[str], object]) -> None: ...

    def enqueue_in(self, connection: object, records: Sequence[JobRecord]) -> list[JobRecord]: ...

    async def enqueue_in_async(
        self, connection: object, records: Sequence[JobRecord]
    ) -> list[JobRecord]: ...


@dataclass(slots=True)
class _Staged:
    """A record waiting for the next group commit, and who waits for it."""

    record: JobRecord
    job: Job[Any] | None
    waiter: concurrent.futures.Future[JobRecord | None] | None
    limit: int | None


@dataclass(frozen=True, slots=True)
class _Attempt:
    """How one run of a claim ended: its status, result (JSON) or exception, and
    whether a failure may be retried."""

    status: JobStatus
    result_json: str | None = None
    exc: BaseException | None = None
    retry: bool = True


@dataclass(slots=True)
class _Held:
    """A claim this process holds and the local run of it."""

    claim: Claim
    job: Job[Any]
    queue: WorkQueue | None
    task: asyncio.Task[None] | None = None
    #: Why the runner cancelled the run: "cancel" (asked), "lost" (fenced out), "stop".
    why: str | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    progress_written: object = None
    #: The run is over and its outcome is being written: the fenced write,
    #: not a cancel, decides what becomes of it (a stale one is refused, counted).
    settling: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class _Want:
    """One claim to make: up to ``n`` records of ``lanes``; ``capped`` when
    ``n`` is what this process's enqueues left pending, less than its room."""

    lanes: list[str]
    n: int
    capped: bool = False


def _left_unclaimed(stored: Sequence[JobRecord | None]) -> int:
    # How many records of an enqueue's answer are pending (those it took are
    # running): a claim should look for them.
    return sum(1 for r in stored if r is not None and r.status == "pending")


class DurableRunner:
    """Runs the durable jobs and items of one app through a backend (loop thread).

    :param tasks: the app's tasks by name (a live mapping: tasks declared later count).
    :param queues: the app's consumers by queue name (live too).
    :param lease: seconds a claim is held without renewal; renewed every lease/3.
    :param concurrency: durable task jobs this process runs at once (0: it only submits).
    :param poll_interval: longest pause between two looks at the store when idle.
    :param history_age: finished records older than this are expired from the store.
    """

    def __init__(
        self,
        loop_thread: LoopThread,
        runner: JobRunner,
        history: JobHistory,
        store: Store,
        tasks: Mapping[str, Task[Any, Any]],
        queues: Mapping[str, WorkQueue],
        *,
        lease: float = 30.0,
        concurrency: int = 32,
        poll_interval: float = 1.0,
        history_age: float = 3600.0,
        ack_timeout: float = 60.0,
    ) -> None:
        self.loop_thread = loop_thread
        self.runner = runner
        self.history = history
        self.store = store
        self.tasks = tasks
        self.queues = queues
        self.lease = lease
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self.history_age = history_age
        self.ack_timeout = ack_timeout
        #: This app's node (host, pid, an incarnation of its own): its claims'
        #: owner, its leases' and its heartbeat's.
        self.node = new_node()
        self.owner = self.node.id
        #: The loop's lag now, sent with each heartbeat (set by the app's lifecycle).
        self.loop_lag: Callable[[], float | None] = _no_lag
        #: Outcomes of this process refused because another claim had the job.
        self.stale_rejected = 0
        #: Claims handed back to the store at stop (the report's ``released``).
        self.released = 0
        self._staged: list[_Staged] = []
        # Task slots an enqueue in flight takes (Take: on the loop or from a
        # submitting thread, changed under the lock), and a claim in flight asks.
        self._reserved = 0
        self._reserve_lock = threading.Lock()
        self._claiming_tasks = 0
        # True when the store may hold work this process had no room to claim
        # (the last claim came back full, or found no room): a freed slot looks.
        self._behind = True
        # What the next claim asks for its task lanes. When every wake since
        # the last claim came from this process's own enqueues, the number of
        # records they left pending (``_hint``): a claim in flight holds the
        # room it asks, and the rest stays free for the next enqueue to take.
        # Any other wake (another process, a freed slot, a full claim) or a
        # poll asks for all the room.
        self._look_all = True
        self._hint = 0
        self._flush_scheduled = False
        self._held: dict[str, _Held] = {}
        self._to_release: list[Claim] = []
        self._writes: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._wake: asyncio.Event | None = None
        self._finishing: list[tuple[Claim, Outcome, asyncio.Future[bool]]] = []
        self._progress_dirty: set[str] = set()
        self._progress_timer: asyncio.TimerHandle | None = None
        self._stopping = False
        self._last_expire = 0.0
        #: False in a process that must not take other processes' work (a CLI run).
        self.claiming = True

    def __repr__(self) -> str:
        return f"<DurableRunner {self.owner} holding {len(self._held)}>"

    # -- which work this process serves ------------------------------------------

    def _task_lanes(self) -> list[str]:
        return [name for name, t in self.tasks.items() if t.options.durable is not False]

    def _queue_lanes(self) -> list[WorkQueue]:
        return [q for q in self.queues.values() if q.durable is not False]

    @property
    def running(self) -> int:
        """Claims held by this process right now."""
        return len(self._held)

    @property
    def idle(self) -> bool:
        """True when nothing is staged, held or being written by this process."""
        return not self._staged and not self._held and not self._writes

    # -- lifecycle (loop thread) ---------------------------------------------------

    def start(self) -> None:
        """Begin claiming and renewing; on the loop, once the store is open."""
        loop = asyncio.get_running_loop()
        self._stopping = False
        self._wake = asyncio.Event()
        self.store.on_new_work(self.wake)
        self.store.on_cancel_request(self._cancel_asked)
        # Plain tasks, not spawned ones: the drain at stop waits for jobs, not for these.
        self._loops = [
            loop.create_task(self._claim_loop(), name="asyncbg:durable:claim"),
            loop.create_task(self._renew_loop(), name="asyncbg:durable:renew"),
        ]

    def stop_claiming(self) -> None:
        """First thing at stop: no new claims; what is staged is committed now."""
        self._stopping = True
        if self._loops:
            self._loops[0].cancel()
        self._flush()

    async def close(self) -> None:
        """After the drain: wait for every write, release what is still held."""
        if self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)
        claims = self._to_release + [h.claim for h in self._held.values()]
        self._to_release = []
        if claims:
            try:
                self.released += await self.store.release(claims)
            except Exception as exc:
                log.error(
                    "could not release %d job(s) at stop (%s): they run again once their "
                    "lease runs out",
                    len(claims),
                    describe_exception(exc),
                )
            else:
                log.info("released %d durable job(s) to the store at stop", len(claims))
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops = []

    def wake(self) -> None:
        """Make the claimer look at the store now, with all its room (loop thread)."""
        self._look_all = True
        if self._wake is not None:
            self._wake.set()

    def _wake_for(self, left: int) -> None:
        # Loop thread: this process's enqueue left ``left`` records pending.
        self._hint += left
        if self._wake is not None:
            self._wake.set()

    # -- submitting (any thread) ---------------------------------------------------

    def submit(self, job: Job[Any], record: JobRecord) -> Job[Any]:
        """Store ``record`` (the job ``job`` stands for) and return the job's
        handle once the commit is acknowledged: ``job``, or the existing job when
        the record's id or key was already there.

        :raises RuntimeError: on the loop thread, which cannot wait for the
            commit (await :meth:`submit_async` there).
        :raises NotRunning: if the loop is stopping.
        :raises BackendError: if the store failed or did not answer in time.
        """
        return self.submit_many([(job, record)])[0]

    def submit_many(self, pairs: Sequence[tuple[Job[Any], JobRecord]]) -> list[Job[Any]]:
        """As :meth:`submit` for many jobs at once: one commit for all of them
        (a burst pays one fsync, not one each); returns their handles in order.

        :raises RuntimeError: on the loop thread.
        :raises NotRunning: if the loop is stopping (nothing is stored).
        :raises BackendError: if the store failed (nothing is stored).
        """
        self.loop_thread.check_not_loop_thread(
            "a durable submit (it waits for the commit): await task.submit_async(...)"
        )
        for job, _ in pairs:
            job._runner = self
            self.history.add(job)  # first: the claim may come before this thread wakes
        try:
            stored = self._store_from_thread([record for _, record in pairs], None)
        except BaseException:
            for job, _ in pairs:
                self.history.discard(job)
            raise
        return [self._handle(job, s) for (job, _), s in zip(pairs, stored, strict=True)]

    def submit_in(self, connection: object, record: JobRecord) -> Job[Any]:
        """Write ``record`` in the caller's open transaction on ``connection``
        and return a handle at once: the job exists if and only if that
        transaction commits (any process may then claim it; this one is woken
        by the backend's notification). Waiting on the handle before the commit
        in another thread finds no job (it ends cancelled, as a forgotten job).

        :raises BackendError: when the backend cannot write in a caller's
            transaction, or the statement failed (the transaction is the
            caller's to roll back).
        :raises TypeError: for a connection the backend does not know.
        """
        return self._handle_in(self.store.enqueue_in(connection, [record])[0])

    async def submit_in_async(self, connection: object, record: JobRecord) -> Job[Any]:
        """As :meth:`submit_in`, on an async connection (psycopg's ``AsyncConnection``).

        :raises BackendError: as :meth:`submit_in`.
        :raises TypeError: as :meth:`submit_in`.
        """
        stored = await self.store.enqueue_in_async(connection, [record])
        return self._handle_in(stored[0])

    def _handle_in(self, stored: JobRecord) -> Job[Any]:
        # A handle made from the record, not put in this process's history:
        # the caller's transaction may still roll back.
        existing = self.history.get(stored.id)
        if existing is not None:
            return existing
        return Job.from_record(self, stored, self._options_of(stored))

    def _store_from_thread(
        self, records: list[JobRecord], limit: int | None
    ) -> list[JobRecord | None]:
        # Straight to the backend's own thread where it has one (two loop hops
        # fewer), else staged on the loop for its next group commit.
        lt = self.loop_thread
        if not lt.running or lt.stopping:
            raise NotRunning(f"{lt.name} is not running or is shutting down")
        limits = None if limit is None else {records[0].queue: limit}
        # Claimed by the enqueue itself where there is room, as on the loop.
        take = self._take_for(records) if limit is None else None
        try:
            direct = self.store.enqueue_from_thread(records, limits=limits, take=take)
        except BaseException:
            self._unreserve(take)
            raise
        if direct is None:
            self._unreserve(take)
            entries = [_Staged(r, None, concurrent.futures.Future(), limit) for r in records]
            lt.post(self._stage_all, entries)
            return [self._acknowledged(e.waiter, e.record) for e in entries if e.waiter]
        try:
            stored = direct.result(self.ack_timeout)
        except BaseException as exc:
            self._unreserve(take)
            if isinstance(exc, concurrent.futures.TimeoutError):
                raise self._no_ack(records[0]) from None
            raise
        taken = take.stored(stored) if take is not None else []
        try:
            # The loop starts what was taken, then gives the slots back.
            lt.post(self._start_taken, taken, take, _left_unclaimed(stored))
        except NotRunning:
            self._unreserve(take)  # stopping: the leases run out, and they run again
        return stored

    def _start_taken(self, taken: list[JobRecord], take: Take | None, left: int) -> None:
        # Loop thread: the records a submitting thread's enqueue stored claimed
        # here are started; a claim looks for the others, if any.
        try:
            for record in taken:
                if record.id not in self._held:
                    self._start(Claim(record.id, self.owner, record.token, record))
        finally:
            self._unreserve(take)
        if left:
            self._wake_for(left)

    async def submit_async(self, job: Job[Any], record: JobRecord) -> Job[Any]:
        """As :meth:`submit`, awaited from any event loop (the loop's own included)."""
        job._runner = self
        self.history.add(job)
        waiter: concurrent.futures.Future[JobRecord | None] = concurrent.futures.Future()
        try:
            self.loop_thread.post(self._stage, _Staged(record, job, waiter, None))
        except NotRunning:
            self.history.discard(job)
            raise
        stored = await asyncio.wrap_future(waiter)
        return self._handle(job, stored)

    def put(self, record: JobRecord, limit: int, timeout: float | None) -> None:
        """Store a consumer's item (``record``); refused while its queue holds
        ``limit`` pending items, waiting up to ``timeout`` for room.

        :raises QueueFull: if the queue stayed full.
        :raises RuntimeError: on the loop thread (await :meth:`put_async`).
        """
        self.loop_thread.check_not_loop_thread(
            "bg.enqueue() of a durable queue (it waits for the commit): await bg.enqueue_async(...)"
        )
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = _POLL_FIRST
        while True:
            if self._store_from_thread([record], limit)[0] is not None:
                return
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise _full(record.queue, limit, timeout)
            time.sleep(delay if remaining is None else min(delay, remaining))
            delay = min(2 * delay, self.poll_interval)

    async def put_async(self, record: JobRecord, limit: int, timeout: float | None) -> None:
        """As :meth:`put`, from any event loop."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        delay = _POLL_FIRST
        while True:
            waiter: concurrent.futures.Future[JobRecord | None] = concurrent.futures.Future()
            self.loop_thread.post(self._stage, _Staged(record, None, waiter, limit))
            if await asyncio.wrap_future(waiter) is not None:
                return
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise _full(record.queue, limit, timeout)
            await asyncio.sleep(delay if remaining is None else min(delay, remaining))
            delay = min(2 * delay, self.poll_interval)

    def _acknowledged(
        self, waiter: concurrent.futures.Future[JobRecord | None], record: JobRecord
    ) -> JobRecord | None:
        try:
            return waiter.result(self.ack_timeout)
        except concurrent.futures.TimeoutError:
            raise self._no_ack(record) from None

    def _no_ack(self, record: JobRecord) -> BackendError:
        return BackendError(
            f"the store did not acknowledge job {record.task} {record.id} within "
            f"{self.ack_timeout:g}s; it may or may not have been stored"
        )

    def _handle(self, job: Job[Any], stored: JobRecord | None) -> Job[Any]:
        if stored is None:  # pragma: no cover - only items carry a limit
            raise QueueFull(f"queue {job.name!r} is full")
        if stored.id == job.id:
            return job
        # Its key belonged to a job already queued or running: that one is the job.
        self.history.discard(job)
        existing = self.history.get(stored.id)
        if existing is not None:
            return existing
        return Job.from_record(self, stored, self._options_of(stored))

    async def lookup(self, job_id: str) -> Job[Any] | None:
        """Return the handle of a stored job this process may not know (loop thread).

        :raises BackendError: if the store failed.
        """
        job = self.history.get(job_id)
        if job is not None and (job.done() or job._runner is not self or job_id in self._held):
            return job  # final, in memory, or running here: the handle is up to date
        record = await self.store.get(job_id)
        if job is not None:
            # Ours, not running here: another process may have run it meanwhile.
            if record is not None and job.apply_record(record):
                self._stored_end(job)
            return job
        if record is None:
            return None
        return Job.from_record(self, record, self._options_of(record))

    def _options_of(self, record: JobRecord) -> TaskOptions:
        task = self.tasks.get(record.task)
        return task.options if task is not None else DEFAULT_OPTIONS

    # -- the group commit (loop thread) ---------------------------------------------

    def _stage(self, entry: _Staged) -> None:
        self._staged.append(entry)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            # After every callback already waiting in this turn: one commit for all.
            asyncio.get_running_loop().call_soon(self._flush)

    def _stage_all(self, entries: list[_Staged]) -> None:
        for entry in entries:
            self._stage(entry)

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._staged = self._staged, []
        if batch:
            # The slots are reserved now, not when the write's task first runs:
            # a claim decided in between would count them free too.
            take = self._take_for([e.record for e in batch if e.limit is None])
            try:
                self._write(self._enqueue(batch, take))
            except BaseException:
                self._unreserve(take)
                raise

    def _write(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        # Its own task, not cancelled at stop and awaited by close(): a write is
        # never cut off half-way (a cancelled claim would still commit, unseen).
        task = asyncio.get_running_loop().create_task(coro)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        self.loop_thread.protect(task)
        return task

    async def _written(self, coro: Coroutine[Any, Any, T]) -> T:
        # Await a write; if the waiter is cancelled, the write goes on.
        return await asyncio.shield(self._write(coro))

    async def _enqueue(self, batch: list[_Staged], take: Take | None) -> None:
        # ``take``'s slots stay reserved until its jobs are held (counted by
        # _held): a submitting thread answered here may take again at once.
        limits = {e.record.queue: e.limit for e in batch if e.limit is not None}
        try:
            try:
                stored = await self.store.enqueue(
                    [e.record for e in batch], limits=limits or None, take=take
                )
            except BaseException as exc:
                error = (
                    exc if isinstance(exc, Exception) else BackendError("the store write stopped")
                )
                for e in batch:
                    self._refuse(e, error)
                if not isinstance(exc, Exception):
                    raise
                return
            taken = take.stored(stored) if take is not None else []
            for e, record in zip(batch, stored, strict=True):
                if e.waiter is not None:
                    e.waiter.set_result(record)
            # Every submitter is answered first: with eager task start (3.12+) a
            # job begins inside _start, and one that blocks the loop must not
            # hold back the acknowledgement of its own submit.
            for record in taken:
                if record.id not in self._held:  # stored claimed by this process: run it here
                    self._start(Claim(record.id, self.owner, record.token, record))
        finally:
            self._unreserve(take)
        left = _left_unclaimed(stored)
        if left:
            self._wake_for(left)

    def _task_slots_used(self) -> int:
        # Task jobs held here, those an enqueue in flight is taking and those a
        # claim in flight asks for (read under _reserve_lock to count and
        # reserve in one step). Also read from submitting threads: a copy of
        # the held claims, in one step.
        held = sum(1 for h in tuple(self._held.values()) if h.queue is None)
        return held + self._reserved + self._claiming_tasks

    def _take_for(self, records: Sequence[JobRecord]) -> Take | None:
        """The task jobs among ``records`` this process has room for, claimed
        by their enqueue itself (one statement fewer each, and no other process
        woken for them), their slots reserved until :meth:`_unreserve`. Only
        jobs due now, of the queues served here. Loop thread or a submitting
        thread."""
        if not self.claiming or self._stopping:
            return None
        lanes = set(self._task_lanes())
        with self._reserve_lock:
            room = self.concurrency - self._task_slots_used()
            ids: list[str] = []
            for r in records:
                if len(ids) >= room:
                    break
                if r.run_at is None and r.task in self.tasks and r.queue in lanes:
                    ids.append(r.id)
            if not ids:
                return None
            self._reserved += len(ids)
        return Take(self.owner, self.lease, frozenset(ids))

    def _unreserve(self, take: Take | None) -> None:
        if take is not None:
            with self._reserve_lock:
                self._reserved -= len(take.ids)

    def _refuse(self, entry: _Staged, error: Exception) -> None:
        if entry.job is not None:
            self.history.discard(entry.job)
        if entry.waiter is not None:
            entry.waiter.set_exception(error)

    # -- claiming (loop thread) ------------------------------------------------------

    def _room(self, limit: int | None = None) -> tuple[list[_Want], int]:
        """What to claim now, one :class:`_Want` per claim, and how many of
        those are task slots (at most ``limit`` when given): reserved
        (``_claiming_tasks``) in the same step as they are counted, until
        :meth:`_unclaim`."""
        wanted: list[_Want] = []
        asked = 0
        if not self.claiming:
            return wanted, asked
        lanes = self._task_lanes()
        with self._reserve_lock:
            running_tasks = self._task_slots_used()
            free = self.concurrency - running_tasks
            asked = free if limit is None else min(free, limit)
            if lanes and asked > 0:
                wanted.append(_Want(lanes, asked, capped=asked < free))
                self._claiming_tasks += asked
            else:
                asked = 0
        for q in self._queue_lanes():
            if q.concurrency > q.active:
                wanted.append(_Want([q.name], q.concurrency - q.active))
        return wanted, asked

    async def _claim_loop(self) -> None:
        assert self._wake is not None
        delay = _POLL_FIRST
        while True:
            woken = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
                    woken = True
            self._wake.clear()
            limit = None if self._look_all or not woken else self._hint
            self._look_all, self._hint = False, 0
            try:
                got, full = await self._claim_once(limit)
            except Exception as exc:
                self.runner.log_failure(
                    "durable claim",
                    "claim",
                    exc,
                    "claiming durable jobs failed (%s); trying again",
                    describe_exception(exc),
                    level=logging.WARNING,
                )
                delay = self.poll_interval
                continue
            if full:
                self.wake()  # more may be due: look again at once, with all the room
            delay = _POLL_FIRST if got or woken else min(2 * delay, self.poll_interval)

    async def _claim_once(self, limit: int | None = None) -> tuple[int, bool]:
        wanted, asked = self._room(limit)
        if not wanted or self._stopping:
            self._unclaim(asked)
            self._behind = True  # no room to look: the next free slot looks
            return 0, False
        # Only consumers' queues are looked at when the task slots are all
        # taken: a task slot freed from now on looks again (set before the
        # claim is awaited, as a slot may be freed while it runs).
        tasks_left_out = asked == 0 and limit != 0 and bool(self._task_lanes())
        if tasks_left_out:
            self._behind = True
        try:
            task = self._write(self._claim(wanted, asked))
        except BaseException:
            self._unclaim(asked)
            raise
        got, full = await asyncio.shield(task)
        self._behind = full or tasks_left_out
        return got, full

    def _unclaim(self, asked: int) -> None:
        with self._reserve_lock:
            self._claiming_tasks -= asked

    async def _claim(self, wanted: list[_Want], asked: int) -> tuple[int, bool]:
        # Issued together: a backend that group-commits makes them one transaction.
        # Started in the write's own task, so a claim made as stop begins is
        # released, never left to its lease. The ``asked`` task slots (reserved
        # by _room) are given back once what came is held.
        try:
            results = await asyncio.gather(
                *(self.store.claim(w.lanes, self.owner, w.n, self.lease) for w in wanted)
            )
            got, full = 0, False
            for want, claims in zip(wanted, results, strict=True):
                got += len(claims)
                # A capped claim that got all it asked found what it was told of.
                full = full or (len(claims) == want.n and not want.capped)
                for claim in claims:
                    self._start(claim)
            return got, full
        finally:
            self._unclaim(asked)

    def _start(self, claim: Claim) -> None:
        if self._stopping:
            self._to_release.append(claim)
            return
        record = claim.record
        queue = self.queues.get(record.queue) if record.task not in self.tasks else None
        job = self.history.get(record.id)
        if job is None or job.done():
            job = Job.from_record(self, record, self._options_of(record))
            self.history.add(job)
        if job._fn is None:
            self._bind(job, record, queue)
        job._runner = self
        held = _Held(claim, job, queue)
        self._held[record.id] = held
        self.runner.active += 1
        if queue is not None:
            queue.begin_stored_item()
        held.task = self.loop_thread.spawn(self._run(held), name=f"asyncbg:durable:{record.task}")

    def _bind(self, job: Job[Any], record: JobRecord, queue: WorkQueue | None) -> None:
        args, kwargs = record.arguments()
        if queue is not None:
            job._fn = queue.handle
            job._args = (args[0] if args else None,)
            job._kwargs = {"propagate": True}
            job._is_async = True
            return
        task = self.tasks[record.task]
        job._fn = task.fn
        job._args = tuple(args)
        job._kwargs = kwargs
        job._is_async = task.is_async

    # -- running a claim (loop thread) -----------------------------------------------

    async def _run(self, held: _Held) -> None:
        job, claim = held.job, held.claim
        _current_job.set(job)
        job.status = JobStatus.RUNNING
        job.started_at = claim.record.started_at or time.time()
        job.attempts = claim.record.attempts
        job.token = claim.token
        finished = False
        try:
            attempt = await self._attempt(held)
            held.settling = True
            finished = await self._settle(held, attempt)
        except Exception as exc:
            # The store failed the outcome's write: the claim stays the store's,
            # and the job runs again once its lease has run out.
            self.runner.log_failure(
                "durable outcome",
                job.name,
                exc,
                "job %s %s: its outcome could not be stored (%s); it runs again once "
                "its lease runs out",
                job.name,
                job.id,
                describe_exception(exc),
            )
        except asyncio.CancelledError:
            if held.why != "lost":  # stopping, or the loop going away: hand it back
                self._to_release.append(claim)
            raise
        finally:
            self._held.pop(claim.id, None)
            held.ended.set()
            if held.queue is not None:
                held.queue.end_stored_item()
            if not finished:
                if not job.done():
                    job.status = JobStatus.PENDING  # the store has it: another run follows
                self.runner.left_without_outcome()
            if self._behind:  # work may be waiting for this slot
                self.wake()

    async def _attempt(self, held: _Held) -> _Attempt:
        """Run the job's code once and return how it went.

        :raises asyncio.CancelledError: when the run was cancelled for a reason
            that writes no outcome (its claim lost, the loop stopping).
        """
        job = held.job
        timeout = job.options.timeout
        context = (
            contextlib.nullcontext()
            if held.queue is not None
            else CloseTolerant(self.runner.context())
        )
        expired = False
        try:
            with context:
                if timeout is None:
                    result = await self.runner._call(job)
                else:
                    async with asyncio.timeout(timeout) as scope:
                        try:
                            result = await self.runner._call(job)
                        finally:
                            expired = scope.expired()
        except asyncio.CancelledError:
            if expired:
                return _Attempt(JobStatus.TIMED_OUT, exc=JobTimedOut(f"timed out after {timeout}s"))
            if held.why == "cancel" or (held.why is None and job._cancel_requested):
                return _Attempt(JobStatus.CANCELLED)
            raise
        except Exception as exc:
            # A consumer's failing item is logged and done with, as in memory;
            # only a run that was lost (its process died) runs it again.
            return _Attempt(JobStatus.FAILED, exc=exc, retry=held.queue is None)
        except (SystemExit, KeyboardInterrupt) as exc:
            # The code asked to stop: a failure, never retried (as in memory).
            return _Attempt(JobStatus.FAILED, exc=exc, retry=False)
        try:
            text = encode_json(result, f"the result of {job.name!r}")
        except TypeError as exc:  # the same result every time: no retry
            return _Attempt(JobStatus.FAILED, exc=exc, retry=False)
        return _Attempt(JobStatus.SUCCEEDED, result_json=text)

    async def _settle(self, held: _Held, attempt: _Attempt) -> bool:
        """Write the attempt's outcome (fenced); True once the local job is final."""
        job, claim = held.job, held.claim
        status, exc = attempt.status, attempt.exc
        error = None if exc is None else describe_exception(exc, _ERROR_LIMIT)
        retry_at = None
        if exc is not None and attempt.retry and claim.record.attempts < claim.record.max_attempts:
            retry_at = time.time() + job.options.backoff(claim.record.attempts)
            ok = await self._written(self.store.retry(claim, retry_at, error))
        else:
            ok = await self._finish(claim, Outcome(status.value, attempt.result_json, error))
        if not ok:
            self.stale_rejected += 1
            log.warning(
                "job %s %s: this process's claim was lost (token %d); its %s was not "
                "recorded (another run holds the job)",
                job.name,
                job.id,
                claim.token,
                status.value,
            )
            return False
        self._log_outcome(held, status, exc, retry_at)
        if retry_at is not None:
            return False
        return job._finish(status, decode_json(attempt.result_json), exc)

    async def _finish(self, claim: Claim, outcome: Outcome) -> bool:
        # A store that is away (a server restart, a partition) gets the
        # outcome once it is back, however long that takes: then the fenced
        # write decides (refused if another process took the job meanwhile,
        # counted as stale). A backend's finish is idempotent, so a write whose
        # acknowledgement was lost and is made again is recognised as its own.
        # Only the stop ends the tries (the claim is then released, or left
        # to its lease).
        delay = _OUTCOME_RETRY_FIRST
        while True:
            try:
                return await self._finish_once(claim, outcome)
            except BackendError as exc:
                if self._stopping:
                    raise
                log.debug(
                    "storing the outcome of %s failed (%s); again in %.2gs", claim.id, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(2 * delay, _OUTCOME_RETRY_MAX)

    async def _finish_once(self, claim: Claim, outcome: Outcome) -> bool:
        # The outcomes of one loop turn go out in one write (one statement
        # each), not one write each: a finish is most of a durable job's cost.
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._finishing.append((claim, outcome, waiter))
        if len(self._finishing) == 1:
            asyncio.get_running_loop().call_soon(self._flush_finishes)
        return await asyncio.shield(waiter)

    def _flush_finishes(self) -> None:
        batch, self._finishing = self._finishing, []
        if batch:
            self._write(self._finish_all(batch))

    async def _finish_all(self, batch: list[tuple[Claim, Outcome, asyncio.Future[bool]]]) -> None:
        try:
            done = await self.store.finish_many([(claim, outcome) for claim, outcome, _ in batch])
        except BaseException as exc:
            for _, _, waiter in batch:
                if not waiter.done():
                    waiter.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, _, waiter), ok in zip(batch, done, strict=True):
            if not waiter.done():
                waiter.set_result(ok)

    def _log_outcome(
        self,
        held: _Held,
        status: JobStatus,
        exc: BaseException | None,
        retry_at: float | None,
    ) -> None:
        job, claim = held.job, held.claim
        if exc is None or status is JobStatus.CANCELLED:
            return
        if retry_at is not None:
            self.runner.log_failure(
                "job attempt",
                job.name,
                exc,
                "job %s %s attempt %d/%d %s (%s); retrying in %.3gs (any process)",
                job.name,
                job.id,
                claim.record.attempts,
                claim.record.max_attempts,
                status.value,
                describe_exception(exc),
                max(0.0, retry_at - time.time()),
                level=logging.WARNING,
            )
        elif held.queue is None:  # a consumer's handler logs its own failures
            self.runner.log_failure(
                "job",
                job.name,
                exc,
                "job %s %s %s (%d attempt(s))",
                job.name,
                job.id,
                status.value,
                claim.record.attempts,
            )

    # -- what a job asks of its owner (the _Owner protocol) --------------------------

    def _cancel(self, job: Job[Any]) -> None:
        held = self._held.get(job.id)
        if held is not None:
            if held.task is not None and not held.task.done():
                held.why = "cancel"
                held.task.cancel()
            return
        if not job.done():
            self._write(self._cancel_stored(job))

    async def _cancel_stored(self, job: Job[Any]) -> None:
        result = await self.store.cancel(job.id)
        if result in (CancelResult.CANCELLED, CancelResult.FINAL) and not job.done():
            record = await self.store.get(job.id)
            if record is not None and job.apply_record(record):
                self._stored_end(job)

    def _stored_end(self, job: Job[Any]) -> None:
        # A job that ended elsewhere (or in the store): into the bounded history,
        # if it is the handle the history keeps.
        if self.history.get(job.id) is job:
            self.history.finished(job)

    def _finished(self, job: Job[Any]) -> None:
        self.runner._finished(job)

    def _wait(self, job: Job[Any], timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not job.done():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            slice_ = _WAIT_SLICE if remaining is None else min(_WAIT_SLICE, remaining)
            try:
                self.loop_thread.submit(self._refresh(job, slice_)).result(
                    slice_ + self.ack_timeout
                )
            except NotRunning:
                return job.done()
        return True

    async def _wait_async(self, job: Job[Any]) -> None:
        while not job.done():
            if self.loop_thread.in_loop_thread():
                await self._refresh(job, _WAIT_SLICE)
            else:
                await asyncio.wrap_future(self.loop_thread.submit(self._refresh(job, _WAIT_SLICE)))

    async def _refresh(self, job: Job[Any], timeout: float) -> None:
        """Wait up to ``timeout`` for the stored job to end; bring ``job`` up to date."""
        held = self._held.get(job.id)
        if held is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await held.ended.wait()
            if job.done() or job.id in self._held:
                return
        records = await self.store.wait([job.id], timeout)
        if job.done() or job.id in self._held:
            return
        if not records:
            if job._finish(JobStatus.CANCELLED, exc=_forgotten(job), count=False):
                self._stored_end(job)
            return
        if job.apply_record(records[0]):
            self._stored_end(job)

    def _progressed(self, job: Job[Any]) -> None:
        if self.loop_thread.in_loop_thread():
            self._mark_progress(job.id)
        else:
            with contextlib.suppress(NotRunning):
                self.loop_thread.post(self._mark_progress, job.id)

    def _mark_progress(self, job_id: str) -> None:
        self._progress_dirty.add(job_id)
        if self._progress_timer is None:
            self._progress_timer = asyncio.get_running_loop().call_later(
                _PROGRESS_EVERY, self._flush_progress
            )

    def _flush_progress(self) -> None:
        self._progress_timer = None
        dirty, self._progress_dirty = self._progress_dirty, set()
        for job_id in dirty:
            held = self._held.get(job_id)
            progress = None if held is None else held.job.progress
            if held is None or progress is None or progress is held.progress_written:
                continue
            held.progress_written = progress
            self._write(
                self.store.progress(held.claim, progress.done, progress.total, progress.message)
            )

    # -- renewing (loop thread) ------------------------------------------------------

    async def _renew_loop(self) -> None:
        while True:
            # The first heartbeat at start: the node is listed at once.
            try:
                await self._renew_once()
            except Exception as exc:
                self.runner.log_failure(
                    "durable renew",
                    "renew",
                    exc,
                    "renewing durable claims failed (%s); trying again in %.3gs",
                    describe_exception(exc),
                    self.lease / 3,
                    level=logging.WARNING,
                )
            await asyncio.sleep(self.lease / 3)

    async def _renew_once(self) -> None:
        claims = [h.claim for h in self._held.values()]
        if claims:
            result = await self._written(self.store.renew(claims, self.lease))
            for job_id in result.lost:
                self._cancel_held(job_id, "lost")
            for job_id in result.cancel_requested:
                self._cancel_held(job_id, "cancel")
        node = dataclasses.replace(self.node, running=len(self._held), lag=self.loop_lag())
        await self._written(self.store.heartbeat(node, forget_after=forget_after(self.lease)))
        now = time.time()
        if now - self._last_expire >= min(_EXPIRE_EVERY, self.history_age or _EXPIRE_EVERY):
            self._last_expire = now
            await self._written(self.store.expire(now - self.history_age))

    def _cancel_asked(self, job_id: str) -> None:
        # Another process asked to cancel a job: if this one holds it, renew
        # that claim now (the renewal says whether the cancel is real).
        held = self._held.get(job_id)
        if held is not None and not self._stopping:
            self._write(self._renew_claim(held.claim))

    async def _renew_claim(self, claim: Claim) -> None:
        try:
            result = await self.store.renew([claim], self.lease)
        except Exception as exc:  # the regular renewal will look again
            log.debug("renewing %s on a cancel request failed: %s", claim.id, exc)
            return
        for job_id in result.cancel_requested:
            self._cancel_held(job_id, "cancel")

    def _cancel_held(self, job_id: str, why: str) -> None:
        held = self._held.get(job_id)
        if held is None or held.task is None or held.task.done() or held.settling:
            return
        if why == "lost":
            log.warning(
                "job %s %s: its claim was lost (lease ran out and another process took "
                "it); cancelling the local run",
                held.job.name,
                job_id,
            )
        held.why = why
        held.task.cancel()


def _no_lag() -> float | None:
    return None


def task_record(
    task: Task[Any, Any],
    job: Job[Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    key: str | None,
) -> JobRecord:
    """Return the record that stores ``job`` of ``task``.

    :raises TypeError: if an argument is not JSON, naming the task.
    """
    return JobRecord(
        id=job.id,
        queue=task.name,
        task=task.name,
        args_json=encode_arguments(args, kwargs, task.name),
        max_attempts=task.options.retries + 1,
        key=key,
        created_at=job.created_at,
        timeout=task.options.timeout,
    )


#: Runs a durable item gets in all: a failure of its handler ends it at once
#: (as in memory), but a run lost with its process counts as an attempt, so an
#: item that kills its worker every time ends failed instead of looping.
ITEM_ATTEMPTS = 3


def item_record(queue: str, item: Any, job_id: str, key: str | None) -> JobRecord:
    """Return the record that stores ``item`` of the consumer of ``queue``
    (an item is a job of its consumer: handled once, run again only if the
    process running it died, up to :data:`ITEM_ATTEMPTS` runs).

    :raises TypeError: if the item is not JSON.
    """
    return JobRecord(
        id=job_id,
        queue=queue,
        task=queue,
        args_json=encode_json(
            {"args": [item], "kwargs": {}}, f"an item for the durable queue {queue!r}"
        ),
        key=key,
        max_attempts=ITEM_ATTEMPTS,
    )


def _full(queue: str, limit: int, timeout: float | None) -> QueueFull:
    return QueueFull(
        f"queue {queue!r} is full ({limit} items stored) and stayed full for {timeout or 0.0}s"
    )


def _forgotten(job: Job[Any]) -> Exception:
    return JobCancelled(f"job {job.name} {job.id} is no longer in the store (expired or unknown)")

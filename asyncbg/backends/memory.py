"""The in-memory backend: job state in dicts of this process.

Nothing is durable and nothing is shared with other processes (``durable`` is
False): it is the default, and the reference the contract suite in
``tests/backends`` is written against. Every operation runs on one event loop
and changes state without an ``await`` in the middle, so each is atomic
without a lock.

Where :mod:`asyncbg.backends.base` leaves a choice open, this backend decides
(and the contract suite checks it, so every backend decides the same way):

- Claimable records are taken oldest first by due time: ``run_at`` when set,
  else ``created_at``; a running record whose lease ran out is due at its
  ``lease_until``. Ties go to the one queued first.
- A deadline is exclusive: a lease ``until`` T has run out when the clock
  reads T.
- Lease expiry is noticed at claim time. A claim that finds a lost record with
  attempts left takes it (token + 1, attempts + 1); one with no attempts left
  becomes ``failed`` (its error says the lease was lost) and does not count
  towards the claim's ``limit``. Until a claim finds it, a lost record stays
  running, and its owner's renewal keeps it: the token has not moved, nobody
  else ran it, so nothing is fenced yet.
- A job whose cancel was requested while running ends ``cancelled`` when its
  owner retries or releases it, instead of being queued again: a cancel
  request is never lost by handing the job back.
- A periodic lease is strict, unlike a job claim: once it ran out it cannot be
  renewed (or used to claim a slot) even if nobody acquired it since.
  ``acquire`` by the owner of the live lease returns that lease unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import itertools
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter

from ..engine.records import (
    CancelResult,
    Claim,
    JobPage,
    JobQuery,
    JobRecord,
    Lease,
    LeaseState,
    NodeRecord,
    Outcome,
    RenewResult,
    Take,
)
from ..errors import ConfigError
from . import _redact
from .base import NODE_FORGET_AFTER, Backend, BackendOptions, lost_lease_error, require_pending

__all__ = ["MemoryBackend", "from_url"]

# A heap entry: (when it is due, a tiebreaker, job id). For queued jobs the
# tiebreaker is a ticket, valid while it is the job's current one; for leases
# it is the claim's token. Stale entries are skipped when they reach the top
# (lazy deletion keeps cancel and renew O(log n)).
_Entry = tuple[float, int, str]

# Slot numbers remembered per schedule before the oldest fold into a floor.
_SLOT_MEMORY = 1024


@dataclass(slots=True)
class _Lane:
    """One queue's claimable work, as heaps of entries."""

    ready: list[_Entry] = field(default_factory=list)  # pending and due
    scheduled: list[_Entry] = field(default_factory=list)  # pending, run_at to come
    leases: list[_Entry] = field(default_factory=list)  # running: (lease_until, token, id)


@dataclass(slots=True)
class _Slots:
    """The slots claimed of one schedule: every slot <= ``floor`` counts as
    claimed, so the set stays bounded while a schedule ticks for months."""

    floor: int | None = None
    recent: set[int] = field(default_factory=set)

    def add(self, slot: int) -> bool:
        """Mark ``slot`` claimed; False when it already was."""
        if (self.floor is not None and slot <= self.floor) or slot in self.recent:
            return False
        self.recent.add(slot)
        if len(self.recent) > 2 * _SLOT_MEMORY:
            ordered = sorted(self.recent)
            self.floor = ordered[-_SLOT_MEMORY - 1]
            self.recent = set(ordered[-_SLOT_MEMORY:])
        return True


class MemoryBackend(Backend):
    """Job state in this process's memory: fast, lost at exit, not shared.

    ``clock`` returns seconds since the epoch (``time.time`` by default); the
    tests pass their own to move time.
    """

    scheme = "memory"
    durable = False

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._jobs: dict[str, JobRecord] = {}
        self._lanes: dict[str, _Lane] = {}
        self._tickets: dict[str, int] = {}  # id -> ticket of its live queue entry
        self._ticket = itertools.count()
        self._keys: dict[str, str] = {}  # key -> id, for pending and running jobs only
        self._counts: dict[str, Counter[str]] = {}
        # Replaced at every final transition: waiters hold the one they saw.
        self._finished = asyncio.Event()
        self._leases: dict[str, Lease] = {}
        self._epochs: dict[str, int] = {}  # outlives a released lease: epochs never repeat
        self._slots: dict[str, _Slots] = {}
        self._anchors: dict[str, float] = {}
        self._nodes: dict[str, NodeRecord] = {}

    def __repr__(self) -> str:
        return f"<MemoryBackend jobs={len(self._jobs)}>"

    # -- jobs and queue items --------------------------------------------------

    async def enqueue(
        self,
        records: Sequence[JobRecord],
        *,
        limits: Mapping[str, int] | None = None,
        take: Take | None = None,
    ) -> list[JobRecord | None]:
        """Store ``records``; return the stored record for each.

        A record whose id is already stored, or whose ``key`` belongs to a
        pending or running job, is not stored: the existing record is returned.
        Otherwise a record whose queue is in ``limits`` is refused (None) when
        the queue already has that many pending records or more.

        :raises ValueError: when a record is not ``pending`` (nothing is stored).
        """
        require_pending(records)
        now = self._clock()
        bounds = limits or {}
        stored = [self._enqueue_one(record, now, bounds) for record in records]
        if take is not None:
            for i, (record, got) in enumerate(zip(records, stored, strict=True)):
                if got is record and record.id in take.ids:
                    stored[i] = self._take(record, take.owner, take.lease, now).record
        return stored

    async def claim(
        self, queues: Sequence[str], owner: str, limit: int, lease: float
    ) -> list[Claim]:
        """Take up to ``limit`` due records of ``queues`` for ``owner``, oldest
        first: each becomes running with a lease of ``lease`` seconds, a token
        one higher and one more attempt. Records whose lease ran out are taken
        again, or failed when they have no attempts left."""
        now = self._clock()
        lanes = [self._lanes[q] for q in dict.fromkeys(queues) if q in self._lanes]
        claims: list[Claim] = []
        while len(claims) < limit:
            heap = self._oldest(lanes, now)
            if heap is None:
                break
            record = self._jobs[heapq.heappop(heap)[2]]
            if record.status == "running" and record.attempts >= record.max_attempts:
                self._fail_lost(record, now)
            else:
                claims.append(self._take(record, owner, lease, now))
        return claims

    async def renew(self, claims: Sequence[Claim], lease: float) -> RenewResult:
        """Extend to ``lease`` seconds from now every claim still held (same
        owner and token, still running; see the module notes on expiry)."""
        now = self._clock()
        kept: list[str] = []
        lost: list[str] = []
        cancel: list[str] = []
        for claim in claims:
            record = self._held(claim)
            if record is None:
                lost.append(claim.id)
                continue
            self._set_lease(record, now + lease)
            kept.append(claim.id)
            if record.cancel_requested:
                cancel.append(claim.id)
        return RenewResult(tuple(kept), tuple(lost), tuple(cancel))

    async def finish(self, claim: Claim, outcome: Outcome) -> bool:
        """Record the final outcome; False (nothing written) for a stale claim."""
        record = self._held(claim)
        if record is None:
            return False
        self._put(
            record,
            record.replace(
                status=outcome.status,
                result_json=outcome.result_json,
                error=outcome.error,
                finished_at=self._clock(),
                lease_until=None,
            ),
        )
        return True

    async def retry(self, claim: Claim, run_at: float, error: str | None) -> bool:
        """Queue the job again for ``run_at`` with ``error`` stored (it ends
        cancelled instead when a cancel was requested); False for a stale claim."""
        record = self._held(claim)
        if record is None:
            return False
        self._hand_back(record, record.replace(run_at=run_at, error=error))
        return True

    async def release(self, claims: Sequence[Claim]) -> int:
        """Queue held claims again at once, their attempt not counted (a job
        whose cancel was requested ends cancelled); return how many were held."""
        held = 0
        for claim in claims:
            record = self._held(claim)
            if record is not None:
                held += 1
                self._hand_back(record, record.replace(attempts=record.attempts - 1))
        return held

    async def progress(
        self, claim: Claim, done: float, total: float | None, message: str | None
    ) -> bool:
        """Record progress; False for a stale claim."""
        record = self._held(claim)
        if record is None:
            return False
        self._put(
            record,
            record.replace(progress_done=done, progress_total=total, progress_message=message),
        )
        return True

    async def get(self, job_id: str) -> JobRecord | None:
        """Return the record, or None when unknown or expired."""
        return self._jobs.get(job_id)

    async def query(self, query: JobQuery) -> JobPage:
        """Return one page of matching records, newest first (by ``created_at``,
        then the later enqueued), and the count of all matches."""
        matches = [
            r
            for r in reversed(self._jobs.values())
            if (query.statuses is None or r.status in query.statuses)
            and (query.task is None or r.task == query.task)
        ]
        # A stable sort: equal created_at keep the later-enqueued-first order.
        matches.sort(key=attrgetter("created_at"), reverse=True)
        start = max(0, query.offset)
        return JobPage(tuple(matches[start : start + max(0, query.limit)]), len(matches))

    async def stats(self) -> dict[str, dict[str, int]]:
        """Return counts per queue and status: ``{queue: {status: n}}`` (no zeros)."""
        stats = {q: {s: n for s, n in c.items() if n} for q, c in self._counts.items()}
        return {q: counts for q, counts in stats.items() if counts}

    async def cancel(self, job_id: str) -> str:
        """Cancel a job; return a :class:`~asyncbg.engine.records.CancelResult` value.

        A pending job becomes cancelled at once and never starts; a running one
        gets ``cancel_requested``, which its owner's next renewal reports.
        """
        record = self._jobs.get(job_id)
        if record is None:
            return CancelResult.UNKNOWN
        if record.final:
            return CancelResult.FINAL
        if record.status == "running":
            if not record.cancel_requested:
                self._put(record, record.replace(cancel_requested=True))
            return CancelResult.REQUESTED
        self._tickets.pop(job_id, None)
        self._put(record, record.replace(status="cancelled", finished_at=self._clock()))
        return CancelResult.CANCELLED

    async def wait(self, job_ids: Sequence[str], timeout: float) -> list[JobRecord]:
        """Return once every known job of ``job_ids`` is final or ``timeout``
        seconds passed: the records known then (unknown ids left out)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            records = [r for r in map(self._jobs.get, job_ids) if r is not None]
            remaining = deadline - loop.time()
            if remaining <= 0 or all(r.final for r in records):
                return records
            finished = self._finished
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await finished.wait()

    async def expire(self, finished_before: float) -> int:
        """Forget final records finished before ``finished_before``; return how many."""
        doomed = [
            r
            for r in self._jobs.values()
            if r.final and r.finished_at is not None and r.finished_at < finished_before
        ]
        for record in doomed:
            # Not in the key index: a key is dropped at the final transition.
            del self._jobs[record.id]
            self._counts[record.queue][record.status] -= 1
        return len(doomed)

    # -- periodic leadership ---------------------------------------------------

    async def acquire(self, name: str, owner: str, ttl: float) -> Lease | None:
        """Take the lease of schedule ``name`` for ``ttl`` seconds with a new
        epoch when nobody holds it live; the owner of the live lease gets it
        back unchanged; None while another owner holds it."""
        now = self._clock()
        current = self._leases.get(name)
        if current is not None and current.expires_at > now:
            return current if current.owner == owner else None
        epoch = self._epochs.get(name, 0) + 1
        self._epochs[name] = epoch
        lease = self._leases[name] = Lease(name, owner, epoch, now + ttl)
        return lease

    async def renew_lease(self, lease: Lease, ttl: float) -> Lease | None:
        """Extend a live lease to ``ttl`` seconds from now; None when it ran out
        (even if nobody took it since), was released or was taken."""
        now = self._clock()
        if not self._live(lease, now):
            return None
        renewed = self._leases[lease.name] = dataclasses.replace(lease, expires_at=now + ttl)
        return renewed

    async def release_lease(self, lease: Lease) -> bool:
        """Give a lease up; False when it was no longer held live."""
        held = self._live(lease, self._clock())
        current = self._leases.get(lease.name)
        if current is not None and (current.owner, current.epoch) == (lease.owner, lease.epoch):
            del self._leases[lease.name]
        return held

    async def claim_slot(self, lease: Lease, slot: int) -> bool:
        """Claim tick ``slot`` of the lease's schedule: True at most once per
        (schedule, slot), and only while ``lease`` is the live current epoch."""
        if not self._live(lease, self._clock()):
            return False
        return self._slots.setdefault(lease.name, _Slots()).add(slot)

    async def anchor(self, name: str, proposed: float) -> float:
        """Return the stored anchor of schedule ``name``, storing ``proposed``
        when there is none yet."""
        return self._anchors.setdefault(name, proposed)

    async def leases(self) -> list[LeaseState]:
        """Return the lease of every schedule ever acquired, sorted by name
        (owner and expiry None once released; a lease that ran out as it was)."""
        states = []
        for name, epoch in sorted(self._epochs.items()):
            lease = self._leases.get(name)
            if lease is None:
                states.append(LeaseState(name, None, epoch, None))
            else:
                states.append(LeaseState(name, lease.owner, lease.epoch, lease.expires_at))
        return states

    # -- nodes -----------------------------------------------------------------

    async def heartbeat(self, node: NodeRecord, *, forget_after: float = NODE_FORGET_AFTER) -> None:
        """Store ``node`` with ``last_seen`` set to now; forget the other nodes
        not heard from for more than ``forget_after`` seconds."""
        now = self._clock()
        for old in [n.id for n in self._nodes.values() if n.last_seen < now - forget_after]:
            del self._nodes[old]
        # Re-inserted so that dict order is heartbeat order: it breaks ties in nodes().
        self._nodes.pop(node.id, None)
        self._nodes[node.id] = dataclasses.replace(node, last_seen=now)

    async def forget_node(self, node_id: str) -> None:
        """Delete the node ``node_id`` (nothing when unknown)."""
        self._nodes.pop(node_id, None)

    async def nodes(self) -> list[NodeRecord]:
        """Return every node not forgotten, newest heartbeat first."""
        return sorted(reversed(self._nodes.values()), key=attrgetter("last_seen"), reverse=True)

    # -- internals -------------------------------------------------------------

    def _put(self, old: JobRecord | None, new: JobRecord) -> None:
        # Every change of a stored record goes through here, so the counts,
        # the key index and the waiters never miss one.
        self._jobs[new.id] = new
        if old is not None:
            self._counts[old.queue][old.status] -= 1
        self._counts.setdefault(new.queue, Counter())[new.status] += 1
        if new.final and (old is None or not old.final):
            if new.key is not None and self._keys.get(new.key) == new.id:
                del self._keys[new.key]
            self._finished.set()
            self._finished = asyncio.Event()

    def _enqueue_one(
        self, record: JobRecord, now: float, limits: Mapping[str, int]
    ) -> JobRecord | None:
        existing = self._jobs.get(record.id)
        if existing is None and record.key is not None and record.key in self._keys:
            existing = self._jobs[self._keys[record.key]]
        if existing is not None:
            return existing
        limit = limits.get(record.queue)
        if limit is not None and self._pending(record.queue) >= limit:
            return None
        self._put(None, record)
        if record.key is not None:
            self._keys[record.key] = record.id
        self._queue(record, now)
        return record

    def _pending(self, queue: str) -> int:
        counts = self._counts.get(queue)
        return 0 if counts is None else counts["pending"]

    def _queue(self, record: JobRecord, now: float) -> None:
        ticket = self._tickets[record.id] = next(self._ticket)
        lane = self._lanes.setdefault(record.queue, _Lane())
        if record.run_at is not None and record.run_at > now:
            heapq.heappush(lane.scheduled, (record.run_at, ticket, record.id))
        else:
            due = record.created_at if record.run_at is None else record.run_at
            heapq.heappush(lane.ready, (due, ticket, record.id))

    def _oldest(self, lanes: Sequence[_Lane], now: float) -> list[_Entry] | None:
        # The heap whose top is the oldest claimable entry of all the lanes.
        best: list[_Entry] | None = None
        for lane in lanes:
            for heap in (self._due(lane, now), self._expired(lane, now)):
                if heap and (best is None or heap[0][0] < best[0][0]):
                    best = heap
        return best

    def _due(self, lane: _Lane, now: float) -> list[_Entry]:
        while lane.scheduled and lane.scheduled[0][0] <= now:
            heapq.heappush(lane.ready, heapq.heappop(lane.scheduled))
        ready = lane.ready
        while ready and self._tickets.get(ready[0][2]) != ready[0][1]:
            heapq.heappop(ready)
        return ready

    def _expired(self, lane: _Lane, now: float) -> list[_Entry] | None:
        leases = lane.leases
        while leases:
            until, token, job_id = leases[0]
            record = self._jobs.get(job_id)
            if (
                record is not None
                and record.status == "running"
                and record.token == token
                and record.lease_until == until
            ):
                return leases if until <= now else None
            heapq.heappop(leases)
        return None

    def _take(self, record: JobRecord, owner: str, lease: float, now: float) -> Claim:
        self._tickets.pop(record.id, None)
        until = now + lease
        running = record.replace(
            status="running",
            owner=owner,
            token=record.token + 1,
            attempts=record.attempts + 1,
            started_at=now,
            lease_until=until,
        )
        self._put(record, running)
        heapq.heappush(self._lanes[record.queue].leases, (until, running.token, running.id))
        return Claim(running.id, owner, running.token, running)

    def _fail_lost(self, record: JobRecord, now: float) -> None:
        error = lost_lease_error(record.owner, record.attempts, record.max_attempts)
        self._put(
            record, record.replace(status="failed", error=error, finished_at=now, lease_until=None)
        )

    def _held(self, claim: Claim) -> JobRecord | None:
        record = self._jobs.get(claim.id)
        if (
            record is None
            or record.status != "running"
            or record.owner != claim.owner
            or record.token != claim.token
        ):
            return None
        return record

    def _set_lease(self, record: JobRecord, until: float) -> None:
        self._put(record, record.replace(lease_until=until))
        heapq.heappush(self._lanes[record.queue].leases, (until, record.token, record.id))

    def _hand_back(self, old: JobRecord, changed: JobRecord) -> None:
        # A retried or released job: queued again, or cancelled if that was asked.
        now = self._clock()
        if old.cancel_requested:
            self._put(old, changed.replace(status="cancelled", finished_at=now, lease_until=None))
            return
        queued = changed.replace(status="pending", owner=None, started_at=None, lease_until=None)
        self._put(old, queued)
        self._queue(queued, now)

    def _live(self, lease: Lease, now: float) -> bool:
        current = self._leases.get(lease.name)
        return (
            current is not None
            and (current.owner, current.epoch) == (lease.owner, lease.epoch)
            and current.expires_at > now
        )


def from_url(url: str, instance_path: str, options: BackendOptions | None = None) -> MemoryBackend:
    """Return a new :class:`MemoryBackend` for ``memory://``.

    :raises ConfigError: when anything follows ``memory://`` (the memory
        backend has no location and no options).
    """
    del options  # nothing here is pooled or networked
    scheme, sep, rest = url.partition("://")
    if scheme.lower() != "memory" or not sep or rest:
        raise ConfigError(
            f"ASYNCBG_BACKEND {_redact(url)!r}: the memory backend takes no location or "
            f"options; write 'memory://' exactly (or leave ASYNCBG_BACKEND unset)"
        )
    return MemoryBackend()

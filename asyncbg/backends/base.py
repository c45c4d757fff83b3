"""The seam: what every backend does, as one abstract class.

Every operation is a coroutine run on asyncbg's loop and is atomic on the
engine (one transaction, one Lua script, one critical section): a caller never
sees half of it. Records cross the seam (:mod:`asyncbg.engine.records`); live
handles never do. A backend is one module in this package, named after its URL
scheme (``memory``, ``sqlite``, ``postgresql``, ``redis``), that defines
``from_url(url, instance_path)``; :func:`asyncbg.backends.open_backend` finds
it by that name, so adding a backend touches no other module.

The semantics (``shared/BACKENDS.md`` in the project's notes, and
``docs/architecture.md``):

- enqueue is idempotent on the record's id and, while a job with the same
  ``key`` is queued or running, on the key: the existing record is returned;
  with ``limits``, a record of a bounded queue that already holds its limit
  of pending records is refused (None in its place), atomically with the
  rest of the call, but never a record that idempotency answers;
- a claim takes queued records whose ``run_at`` has come, marks them running,
  sets the owner, a lease deadline on the backend's clock and a token one
  higher than any before for that job; no record is held by two claims;
- finish, retry, progress and release are compare-and-set on (id, owner,
  token): a stale claim changes nothing and gets False;
- a claim whose lease ran out may be claimed again (its token grows); a lost
  claim counts as an attempt, and a job out of attempts ends failed;
- periodic leadership is a lease row with an epoch; a slot is claimed at most
  once per (schedule, slot number), and only by the current epoch's holder;
  ``leases`` reads every schedule's row, whoever holds it;
- a heartbeat replaces its node's row and deletes the rows of nodes silent for
  longer than its ``forget_after``, so ``nodes`` stays bounded; a node that
  stops gracefully deletes its own (``forget_node``); who is dead is decided
  by the reader (:mod:`asyncbg.engine.cluster`).
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import importlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import ModuleType
from urllib.parse import parse_qsl

from ..engine import records as rec
from ..engine.cluster import NODE_FORGET_AFTER
from ..errors import BackendError, BackendUnavailable, ConfigError

__all__ = [
    "NODE_FORGET_AFTER",
    "Backend",
    "BackendOptions",
    "Wakeups",
    "cancel_result",
    "lost_lease_error",
    "poll_until_final",
    "require_driver",
    "require_pending",
    "url_options",
]

log = logging.getLogger("asyncbg")


@dataclasses.dataclass(frozen=True, slots=True)
class BackendOptions:
    """What a networked backend takes from the app's config besides its URL
    (``ASYNCBG_POOL_SIZE``, ``ASYNCBG_STATEMENT_TIMEOUT``,
    ``ASYNCBG_CONNECT_TIMEOUT``, ``ASYNCBG_LEASE``,
    ``ASYNCBG_JOB_HISTORY_AGE``); a backend uses what applies to it."""

    #: Connections per process to the engine (the pool's largest size).
    pool_size: int = 4
    #: Seconds a statement may run before the server cancels it.
    statement_timeout: float = 10.0
    #: Seconds to reach the engine at start (and to get a pooled connection).
    connect_timeout: float = 5.0
    #: The job lease, for checks sized by it (the nodes heard from lately).
    lease: float = 30.0
    #: Seconds a final record is kept (``ASYNCBG_JOB_HISTORY_AGE``): the engine
    #: expires older ones; a backend with its own expiry (Redis) keeps them longer.
    history_age: float = 3600.0


# wait()'s polls of a store that another process may finish a job in.
_POLL_FIRST, _POLL_MAX = 0.005, 0.1


def require_driver(module: str, extra: str) -> ModuleType:
    """Import a backend's optional driver, as a backend module does at its top.

    :raises BackendUnavailable: when it is not installed, naming the extra
        that installs it (``pip install 'asyncbg[postgres]'``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailable(
            f"this backend needs {module!r}, which is not installed ({exc}): "
            f"pip install 'asyncbg[{extra}]'"
        ) from None


async def poll_until_final(
    read: Callable[[], Awaitable[list[rec.JobRecord]]],
    timeout: float,
    woken: Callable[[], asyncio.Event | None],
) -> list[rec.JobRecord]:
    """What :meth:`Backend.wait` does on a store other processes write: read
    the records, and until every one is final or ``timeout`` seconds passed,
    wait for ``woken()`` (an event a finish seen by this backend object sets;
    None once closed) or a poll delay, 5 ms doubling to 100 ms.

    :raises BackendError: whatever ``read`` raises.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = _POLL_FIRST
    while True:
        finished = woken()
        records = await read()
        remaining = deadline - loop.time()
        if remaining <= 0 or all(r.final for r in records) or finished is None:
            return records
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(delay, remaining)):
                await finished.wait()
        delay = min(2 * delay, _POLL_MAX)


def url_options(query: str, shown: str) -> list[tuple[str, str]]:
    """Return the options of a backend URL's query string, in order.

    :raises ConfigError: naming the URL (``shown``, its password hidden) when
        the options cannot be read or one is given twice.
    """
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ConfigError(f"ASYNCBG_BACKEND {shown!r}: cannot read the options") from None
    names = [name for name, _ in pairs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"ASYNCBG_BACKEND {shown!r}: the option {repeated[0]!r} is given twice")
    return pairs


def require_pending(records: Iterable[rec.JobRecord]) -> None:
    """Check what an enqueue takes: only ``pending`` records.

    :raises ValueError: naming the first record of another status.
    """
    for record in records:
        if record.status != "pending":
            raise ValueError(f"enqueue takes pending records, not {record.status!r}")


def cancel_result(status: str | None) -> str:
    """Return the :class:`~asyncbg.engine.records.CancelResult` of a cancel
    that found a job in ``status`` (None: no such job)."""
    if status is None:
        return rec.CancelResult.UNKNOWN
    if status in rec.FINAL_STATUSES:
        return rec.CancelResult.FINAL
    if status == "running":
        return rec.CancelResult.REQUESTED
    return rec.CancelResult.CANCELLED


class Wakeups:
    """The wake-up side of a backend on a server other processes share: the
    callbacks registered by :meth:`Backend.on_new_work` and
    :meth:`Backend.on_cancel_request`, called by the backend's listener, and
    the event :meth:`Backend.wait` waits on between polls. Mixed in before
    :class:`Backend`; :meth:`_open_wakeups` is called at open, on the loop."""

    def __init__(self) -> None:
        self._work_callbacks: list[Callable[[], object]] = []
        self._cancel_callbacks: list[Callable[[str], object]] = []
        self._finished: asyncio.Event | None = None

    def _open_wakeups(self) -> None:
        self._finished = asyncio.Event()

    def on_new_work(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` on the loop when another process made work claimable
        (its wake-up message); once after every reconnect of the listener."""
        self._work_callbacks.append(callback)

    def on_cancel_request(self, callback: Callable[[str], object]) -> None:
        """Call ``callback(job_id)`` on the loop when another process asked to
        cancel a running job (a hint: the owner's renewal carries the truth)."""
        self._cancel_callbacks.append(callback)

    def _new_work(self) -> None:
        self._call(self._work_callbacks)

    def _cancel_asked(self, job_id: str) -> None:
        self._call(self._cancel_callbacks, job_id)

    @staticmethod
    def _call(callbacks: Sequence[Callable[..., object]], *args: object) -> None:
        for callback in callbacks:
            try:
                callback(*args)
            except Exception:
                log.exception("an asyncbg wake-up callback raised")

    def _done(self) -> None:
        # A job ended in a way waiters should hear of at once: wake them.
        if self._finished is not None:
            finished, self._finished = self._finished, asyncio.Event()
            finished.set()


def lost_lease_error(owner: str | None, attempts: int, max_attempts: int) -> str:
    """Return the error a job gets when its lease ran out with no attempts left.

    One text for every backend, so that a failed job reads the same whatever
    stored it.
    """
    return (
        f"its lease ran out: the owner {owner!r} stopped renewing it, "
        f"and it had no attempts left ({attempts} of {max_attempts})"
    )


class Backend(abc.ABC):
    """One store of job state, shared by every process that opens the same URL.

    ``durable`` is False only for the in-memory backend: with it, work lives
    and dies with the process, and the engine keeps today's fast path.
    """

    #: The URL scheme this backend answers to.
    scheme: str = ""
    #: True when what is stored survives the process (and is shared with others).
    durable: bool = True
    #: True when :meth:`on_new_work` callbacks are called for other processes'
    #: work; False when the engine learns of it only by polling. A backend may
    #: set it False on an instance that could not set its channel up at open.
    wakes_other_processes: bool = False

    # -- lifecycle -------------------------------------------------------------

    async def open(self) -> None:  # noqa: B027 (optional: most backends connect here)
        """Connect (or open the file). Called once on the loop, before anything else.

        :raises BackendError: when the engine cannot be reached in time.
        """

    async def close(self) -> None:  # noqa: B027
        """Close connections; called once, in the lifecycle's async phase."""

    async def migrate(self) -> None:  # noqa: B027
        """Create or upgrade the schema; idempotent, safe from many processes at once."""

    async def preflight(self) -> list[str]:
        """Check the engine's settings; return warnings to log.

        :raises BackendError: for a setting that would lose acknowledged work.
        """
        return []

    # -- wake-ups from other processes -----------------------------------------

    def on_new_work(self, callback: Callable[[], object]) -> None:  # noqa: B027
        """Register ``callback``, which the backend calls (with no arguments, on
        the loop's thread) when another process may have made work claimable:
        stored a new record, retried or released one.

        A hint, not a promise: calls may be spurious, coalesced or missed, and
        the engine polls anyway. Work made by this same backend object is not
        reported (waking within a process is the engine's business); another
        backend object on the same store counts as another process. The
        default does nothing (``wakes_other_processes`` is False). May be
        called before :meth:`open`; a callback that raises is logged.
        """

    def on_cancel_request(self, callback: Callable[[str], object]) -> None:  # noqa: B027
        """Register ``callback``, which the backend calls with a job id (on the
        loop's thread) when another process asked to cancel that running job.

        A hint that lets the owner look at once instead of at its next
        renewal (which carries the truth either way). The default does nothing.
        """

    # -- jobs and queue items --------------------------------------------------

    @abc.abstractmethod
    async def enqueue(
        self,
        records: Sequence[rec.JobRecord],
        *,
        limits: Mapping[str, int] | None = None,
        take: rec.Take | None = None,
    ) -> list[rec.JobRecord | None]:
        """Store ``records`` in one commit; return the stored record for each
        (the existing one where the id, or an active job's key, was already there).

        ``limits`` maps queue names to bounds: a record whose queue is in it is
        refused (None in its place, nothing stored for it) when that queue
        already has ``limits[queue]`` or more ``pending`` records, counting
        those stored earlier in the same call; running and final records do
        not count. Idempotency comes first: a record whose id, or active key,
        is already there gets the existing record and is never refused. The
        records after a refused one are still considered. Without ``limits``
        no slot is None.

        ``take`` claims the records whose ids it names as they are stored, in
        the same commit, as :meth:`claim` would right after: each comes back
        running for ``take.owner`` with token 1, one attempt and a lease of
        ``take.lease`` seconds on the backend's clock (other processes are not
        woken for them). A named record answered by idempotency is not taken
        (the existing record comes back as it is).
        """

    def enqueue_from_thread(
        self,
        records: Sequence[rec.JobRecord],
        *,
        limits: Mapping[str, int] | None = None,
        take: rec.Take | None = None,
    ) -> concurrent.futures.Future[list[rec.JobRecord | None]] | None:
        """Start :meth:`enqueue` from a thread other than the loop's, when the
        backend has its own way in (SQLite: its writer thread; Redis: a
        blocking client in the calling thread); return a future resolved after
        the commit, or None (the default) to have the engine go through the
        loop. Same arguments, results and errors as :meth:`enqueue`."""
        return None

    def enqueue_in(
        self, connection: object, records: Sequence[rec.JobRecord]
    ) -> list[rec.JobRecord]:
        """Write ``records`` in the caller's open transaction on ``connection``
        (the caller's thread; no commit): they exist if and only if the caller
        commits. Idempotent on id and active key as :meth:`enqueue` (no limits).

        :raises BackendError: by default: this backend cannot write in a
            caller's transaction (only a backend on the app's own database can).
        :raises TypeError: for a connection the backend does not know.
        """
        raise BackendError(
            f"the {self.scheme or type(self).__name__} backend cannot write a job in your "
            f"transaction (using(connection=...)): that needs ASYNCBG_BACKEND on the "
            f"database of that transaction, a postgresql:// URL"
        )

    async def enqueue_in_async(
        self, connection: object, records: Sequence[rec.JobRecord]
    ) -> list[rec.JobRecord]:
        """As :meth:`enqueue_in`, on an async connection.

        :raises BackendError: by default, as :meth:`enqueue_in`.
        :raises TypeError: for a connection the backend does not know.
        """
        return self.enqueue_in(connection, records)

    @abc.abstractmethod
    async def claim(
        self, queues: Sequence[str], owner: str, limit: int, lease: float
    ) -> list[rec.Claim]:
        """Take up to ``limit`` due records of ``queues`` for ``owner``, oldest first,
        each with a lease of ``lease`` seconds and a fresh token."""

    @abc.abstractmethod
    async def renew(self, claims: Sequence[rec.Claim], lease: float) -> rec.RenewResult:
        """Extend the lease of every claim still held (one call for all of them)."""

    @abc.abstractmethod
    async def finish(self, claim: rec.Claim, outcome: rec.Outcome) -> bool:
        """Record the final outcome; False (nothing written) for a stale claim."""

    async def finish_many(self, outcomes: Sequence[tuple[rec.Claim, rec.Outcome]]) -> list[bool]:
        """:meth:`finish` for many claims at once (one commit where the engine
        allows); for each, False for a stale claim. The default finishes them
        one after the other."""
        return [await self.finish(claim, outcome) for claim, outcome in outcomes]

    @abc.abstractmethod
    async def retry(self, claim: rec.Claim, run_at: float, error: str | None) -> bool:
        """Queue the job again for ``run_at``; False for a stale claim."""

    @abc.abstractmethod
    async def release(self, claims: Sequence[rec.Claim]) -> int:
        """Hand claims back unstarted-as-it-were (at stop); return how many were
        still held. A release does not count as an attempt."""

    @abc.abstractmethod
    async def progress(
        self, claim: rec.Claim, done: float, total: float | None, message: str | None
    ) -> bool:
        """Record progress; False for a stale claim."""

    @abc.abstractmethod
    async def get(self, job_id: str) -> rec.JobRecord | None:
        """Return the record, or None when unknown or expired."""

    @abc.abstractmethod
    async def query(self, query: rec.JobQuery) -> rec.JobPage:
        """Return one page of records, newest first, and the count of all matches."""

    @abc.abstractmethod
    async def stats(self) -> dict[str, dict[str, int]]:
        """Return counts per queue and status: ``{queue: {status: n}}``."""

    @abc.abstractmethod
    async def cancel(self, job_id: str) -> str:
        """Cancel a job; return a :class:`~asyncbg.engine.records.CancelResult` value.

        A queued job becomes cancelled at once and never starts; a running one
        gets ``cancel_requested`` for its owner to see at its next renewal.
        """

    @abc.abstractmethod
    async def wait(self, job_ids: Sequence[str], timeout: float) -> list[rec.JobRecord]:
        """Return once every job is final or ``timeout`` passed: the records
        known at that moment (unknown ids are left out)."""

    @abc.abstractmethod
    async def expire(self, finished_before: float) -> int:
        """Forget final records finished before that time; return how many."""

    # -- periodic leadership ---------------------------------------------------

    @abc.abstractmethod
    async def acquire(self, name: str, owner: str, ttl: float) -> rec.Lease | None:
        """Take the lease of schedule ``name`` when nobody holds it (or it ran
        out): a new epoch. Return None while another owner holds it."""

    @abc.abstractmethod
    async def renew_lease(self, lease: rec.Lease, ttl: float) -> rec.Lease | None:
        """Extend a held lease; None when it was lost (ran out and taken, or released)."""

    @abc.abstractmethod
    async def release_lease(self, lease: rec.Lease) -> bool:
        """Give a held lease up; False when it was no longer held."""

    @abc.abstractmethod
    async def claim_slot(self, lease: rec.Lease, slot: int) -> bool:
        """rec.Claim tick ``slot`` of the lease's schedule: True at most once per
        (schedule, slot), and only while ``lease`` is the current epoch."""

    @abc.abstractmethod
    async def anchor(self, name: str, proposed: float) -> float:
        """Return the stored anchor (slot 0's time) of schedule ``name``,
        storing ``proposed`` when there is none yet."""

    @abc.abstractmethod
    async def leases(self) -> list[rec.LeaseState]:
        """Return the lease row of every schedule ever acquired in this store,
        whoever holds it (other processes' too), sorted by name: a read, for
        the surfaces.

        Each is as stored: ``owner`` and ``expires_at`` None once released
        (the epoch kept); a lease that ran out keeps its owner and its past
        ``expires_at`` (on the store's clock) until someone acquires it again.
        A schedule with only an anchor and no lease is not listed.
        """

    # -- nodes -----------------------------------------------------------------

    @abc.abstractmethod
    async def heartbeat(
        self, node: rec.NodeRecord, *, forget_after: float = NODE_FORGET_AFTER
    ) -> None:
        """Record that ``node`` is alive, with its running count and loop lag,
        ``last_seen`` set to now on the store's clock (replacing its earlier
        row), and in the same call forget every other node whose ``last_seen``
        is more than ``forget_after`` seconds before now, so that the list
        stays bounded however many processes came and went."""

    @abc.abstractmethod
    async def forget_node(self, node_id: str) -> None:
        """Delete the row of node ``node_id`` (nothing when there is none): it
        stopped gracefully, so the surfaces stop listing it instead of showing
        it dead. A heartbeat of that node after this brings it back."""

    @abc.abstractmethod
    async def nodes(self) -> list[rec.NodeRecord]:
        """Return every node not forgotten yet (see :meth:`heartbeat`), newest
        heartbeat first (ties: the latest heartbeat call first). Dead ones
        included: telling them apart is the caller's business
        (:func:`asyncbg.engine.cluster.dead_after`)."""

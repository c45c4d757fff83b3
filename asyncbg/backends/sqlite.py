"""The SQLite backend: job state in one database file, shared by the processes
of one host.

``sqlite:///relative/path.db`` is a file under the app's instance folder,
``sqlite:////abs/path.db`` an absolute one; options ``synchronous`` (FULL by
default, or EXTRA, NORMAL) and ``busy_timeout`` (milliseconds, 5000 by default).

How it runs:

- Every statement runs on one dedicated daemon thread per backend object
  (``asyncbg-sqlite``), on one connection opened there; the coroutines hand
  the work over and await a future, so the loop never blocks on the file.
- The file is in WAL mode (readers never block the writer; verified at open).
  Every write transaction is ``BEGIN IMMEDIATE … COMMIT``: a deferred
  transaction that reads then writes gets ``SQLITE_BUSY`` at once, ignoring
  ``busy_timeout``, whereas an immediate one waits for the other processes'
  writers.
- Writes are group-committed. When the thread takes a write from its queue, it
  takes every write queued right behind it too (up to 256; the first read or
  other call ends the group) and runs them all in one transaction, one after
  the other; only when one raises is the transaction rolled back and the group
  run again, each write in its own ``SAVEPOINT``: the one that raises is
  rolled back to its savepoint and gets its exception, the others commit.
  Every future is resolved only after the ``COMMIT`` returned, so an
  acknowledged write is on disk (as far as ``synchronous`` syncs); when the
  transaction as a whole fails (the write lock not had within
  ``busy_timeout``, the ``COMMIT`` itself), every write of the group gets a
  :class:`~asyncbg.errors.BackendError`. So the N enqueues made in one loop
  turn share one commit (one fsync) instead of taking N. A read runs in its
  own snapshot transaction, in queue order: it sees every write queued before
  it. What follows a commit on the loop (waking this process's ``wait()``
  callers) runs once the caller's future is resolved, so after the commit.
- Time is ``time.time()`` read on that thread once the write lock is held, one
  reading per group: every write of a group sees the same ``now``, and the
  clock of one transaction never goes back behind an earlier commit's by more
  than the host's clock itself.
- Other processes on the file are woken (``on_new_work``) through Unix
  datagram sockets, one per backend object, in a private folder per database
  (:mod:`asyncbg.backends._wake`): at open the object binds its socket and
  the loop watches it (``add_reader``); the datagrams read together make one
  call of each callback. After a commit that made work claimable (an enqueue
  that stored a new record, a retry or a release that queued a job again),
  the writer thread sends one datagram to every other socket in the folder,
  once per group and before resolving the group's futures. It is sent from
  the writer thread, not the loop: it lists a folder and makes one system
  call per peer, which the loop should not wait for, and that thread is where
  the commit is known. The socket is non-blocking as well, so a peer that does
  not read (paused, its queue full: ``EAGAIN``, it has unread datagrams
  anyway) never stalls a commit; a socket file nobody is bound to
  (``ECONNREFUSED``: its process died) is removed. An object never wakes
  itself (in-process wake-ups are the engine's); another object on the same
  file is woken as another process would be. When the folder cannot be used
  (it cannot be made, is not private to this user, or the socket path would
  be over 100 bytes) or the loop cannot watch a socket, a warning is logged,
  that object's ``wakes_other_processes`` is False, and it opens anyway:
  the others then learn of its work by polling. ``close`` removes the
  socket. A forked child must open its own backend: the inherited object's
  thread does not exist there, and its socket is the parent's.

It follows every decision listed in :mod:`asyncbg.backends.memory`: claim
order by due time (``run_at``, else ``created_at``; a lost lease at its
``lease_until``) with ties to the one queued first (a ``seq`` number, drawn
again at every retry or release); a lost job out of attempts fails at claim
time without using the claim's limit; a cancel request survives a hand-back;
periodic leases are strict; slots fold into a floor after 2048.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import heapq
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from ..engine.records import (
    FINAL_STATUSES,
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
from ..errors import BackendError, ConfigError
from . import _redact
from ._wake import WakeChannel
from .base import (
    NODE_FORGET_AFTER,
    Backend,
    BackendOptions,
    lost_lease_error,
    poll_until_final,
    require_pending,
)

__all__ = ["SQLiteBackend", "from_url"]

T = TypeVar("T")

log = logging.getLogger("asyncbg")

#: The schema this module writes; ``migrate`` brings a file up to it.
SCHEMA_VERSION = 2

_SYNCHRONOUS = ("FULL", "EXTRA", "NORMAL")
_DEFAULT_BUSY_TIMEOUT = 5000
# Slot numbers remembered per schedule before the oldest fold into a floor (as memory).
_SLOT_MEMORY = 1024
# Write calls at most in one group commit (one transaction).
_GROUP_LIMIT = 256
# Ids per statement where a list of them becomes ``IN (?, ?, …)``.
_CHUNK = 500
# Filesystems on which WAL's shared-memory index is not shared between hosts.
_NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs"}
)

_FIELDS = tuple(f.name for f in dataclasses.fields(JobRecord))
_COLUMNS = ", ".join(_FIELDS)
_FINAL = "(" + ", ".join(f"'{s}'" for s in sorted(FINAL_STATUSES)) + ")"
# A claim's fenced writes: the same job, owner and token, and still running.
_HELD = "id = :id AND owner = :owner AND token = :token AND status = 'running'"

# Version 1, as it was first written: never edit it (files of version 1 hold
# exactly this). A new file gets it and then every step of _UPGRADES, as an
# old file does, so both end the same.
_SCHEMA = f"""
CREATE TABLE jobs (
    id TEXT PRIMARY KEY NOT NULL,
    queue TEXT NOT NULL,
    task TEXT NOT NULL,
    args_json TEXT,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    token INTEGER NOT NULL,
    owner TEXT,
    key TEXT,
    created_at REAL NOT NULL,
    run_at REAL,
    started_at REAL,
    finished_at REAL,
    lease_until REAL,
    progress_done REAL,
    progress_total REAL,
    progress_message TEXT,
    result_json TEXT,
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    timeout REAL,
    seq INTEGER NOT NULL,
    due REAL GENERATED ALWAYS AS (CASE status
        WHEN 'pending' THEN coalesce(run_at, created_at)
        WHEN 'running' THEN lease_until END) VIRTUAL
);
CREATE INDEX jobs_claim ON jobs (queue, due, seq) WHERE status IN ('pending', 'running');
CREATE INDEX jobs_unscheduled ON jobs (queue, created_at, seq)
    WHERE status = 'pending' AND run_at IS NULL;
CREATE UNIQUE INDEX jobs_active_key ON jobs (key)
    WHERE key IS NOT NULL AND status IN ('pending', 'running');
CREATE INDEX jobs_newest ON jobs (created_at);
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE status IN {_FINAL};
CREATE TABLE counters (name TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL);
INSERT INTO counters (name, value) VALUES ('seq', 0), ('beat', 0);
CREATE TABLE leases (
    name TEXT PRIMARY KEY NOT NULL,
    owner TEXT,
    epoch INTEGER NOT NULL,
    expires_at REAL,
    slot_floor INTEGER
);
CREATE TABLE slots (
    name TEXT NOT NULL,
    slot INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    PRIMARY KEY (name, slot)
) WITHOUT ROWID;
CREATE TABLE anchors (name TEXT PRIMARY KEY NOT NULL, at REAL NOT NULL);
CREATE TABLE nodes (
    id TEXT PRIMARY KEY NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at REAL NOT NULL,
    last_seen REAL NOT NULL,
    running INTEGER NOT NULL,
    lag REAL,
    beat INTEGER NOT NULL
);
"""

# The steps from the version before to each version; each is idempotent.
_UPGRADES: dict[int, str] = {
    # enqueue(limits=) counts a queue's pending records through this index.
    # status is in it although constant: SQLite (3.40) does not see that the
    # index's own WHERE answers the query's, and would read every row without.
    2: """CREATE INDEX IF NOT EXISTS jobs_pending ON jobs (queue, status)
    WHERE status = 'pending'""",
}

# Claimable records of one queue in claim order, in two index-driven parts:
# everything due by now, then pending records without run_at created ahead of
# the clock (claimable at once, but ordered by their created_at, so last).
_CLAIMABLE = (
    """SELECT due, seq, id, status = 'running' AND attempts >= max_attempts
    FROM jobs INDEXED BY jobs_claim
    WHERE queue = :queue AND status IN ('pending', 'running') AND due <= :now
    ORDER BY due, seq""",
    """SELECT created_at, seq, id, 0
    FROM jobs INDEXED BY jobs_unscheduled
    WHERE queue = :queue AND status = 'pending' AND run_at IS NULL AND created_at > :now
    ORDER BY created_at, seq""",
)

# A retried or released job: queued again, or cancelled if that was asked.
_HAND_BACK = f"""UPDATE jobs SET
    status = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'pending' END,
    owner = CASE WHEN cancel_requested THEN owner END,
    started_at = CASE WHEN cancel_requested THEN started_at END,
    finished_at = CASE WHEN cancel_requested THEN :now END,
    lease_until = NULL,
    seq = :seq,
    {{changes}}
    WHERE {_HELD} RETURNING status"""
_RETRY = _HAND_BACK.format(changes="run_at = :run_at, error = :error")
_RELEASE = _HAND_BACK.format(changes="attempts = attempts - 1")


def _record(row: Sequence[Any]) -> JobRecord:
    values = dict(zip(_FIELDS, row, strict=True))
    values["cancel_requested"] = bool(values["cancel_requested"])
    return JobRecord(**values)


def _chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def _script(conn: sqlite3.Connection, script: str) -> None:
    # Not executescript: it would COMMIT the caller's transaction first.
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _next(conn: sqlite3.Connection, counter: str, n: int = 1) -> int:
    # The first of ``n`` numbers of a counter; inside the caller's write transaction.
    row = conn.execute(
        "UPDATE counters SET value = value + ? WHERE name = ? RETURNING value", (n, counter)
    ).fetchone()
    return int(row[0]) - n + 1


def _describe(exc: sqlite3.Error) -> str:
    text = str(exc)
    if isinstance(exc, sqlite3.DatabaseError) and "not a database" in text:
        return f"it is not an SQLite database ({text})"
    if "readonly" in text:
        return f"it is read-only ({text})"
    return text


@dataclasses.dataclass(slots=True)
class _Write:
    """One write call: ``fn(conn, now)``, the future that gets its outcome, and
    ``wakes``, which tells from its result whether it made work claimable."""

    fn: Callable[[sqlite3.Connection, float], Any]
    future: concurrent.futures.Future[Any]
    wakes: Callable[[Any], bool] | None = None
    #: True for a write whose loss in a power cut loses nothing acknowledged
    #: (a claim, a renewal, progress, a heartbeat: the job just runs again).
    relaxed: bool = False


_STOP = object()


class _Worker:
    """One daemon thread that runs calls in queue order, each answered by a future.

    A write call taken from the queue takes with it every write call queued
    right behind it, up to ``group_limit`` in all, and hands them to
    ``write_group`` as one list (one transaction); the first call of any other
    kind ends the group and runs after it, so queue order is kept.
    """

    def __init__(self, write_group: Callable[[list[_Write]], None], group_limit: int) -> None:
        self._write_group = write_group
        self._group_limit = max(1, group_limit)
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="asyncbg-sqlite", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Queue ``fn``; the future holds its result or its exception."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._calls.put((future, fn))
        return future

    def submit_write(
        self,
        fn: Callable[[sqlite3.Connection, float], T],
        wakes: Callable[[T], bool] | None = None,
        relaxed: bool = False,
    ) -> concurrent.futures.Future[T]:
        """Queue the write ``fn``, to run in a group; its future is resolved by
        ``write_group``."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._calls.put(_Write(fn, future, wakes, relaxed))
        return future

    def stop(self) -> None:
        """Let the queued calls run, then end the thread (without waiting for it)."""
        self._calls.put(_STOP)

    @property
    def thread(self) -> threading.Thread:
        """The thread every statement runs on."""
        return self._thread

    def _run(self) -> None:
        held: Any = None
        while True:
            item, held = (self._calls.get() if held is None else held), None
            if item is _STOP:
                return
            if isinstance(item, _Write):
                group, held = self._group(item)
                self._run_group(group)
                del group
            else:
                future, fn = item
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:
                        future.set_exception(exc)
                del future, fn
            # Nothing of a finished call stays referenced while the thread waits.
            del item

    def _group(self, first: _Write) -> tuple[list[_Write], Any]:
        # The writes queued right behind ``first``, and the call that ended the group.
        group = [first]
        while len(group) < self._group_limit:
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                return group, None
            if not isinstance(item, _Write):
                return group, item
            group.append(item)
        return group, None

    def _run_group(self, group: list[_Write]) -> None:
        live = [call for call in group if call.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            self._write_group(live)
        except BaseException as exc:  # pragma: no cover - write_group answers every call
            for call in live:
                if not call.future.done():
                    call.future.set_exception(exc)


class SQLiteBackend(Backend):
    """Job state in an SQLite file in WAL mode, shared by this host's processes.

    ``path`` is the database file; ``synchronous`` is FULL, EXTRA or NORMAL;
    ``busy_timeout`` is how long (ms) a write waits for another process's
    writer. ``make_parent`` creates the file's folder at open (for a path in
    the instance folder, which Flask does not create).
    """

    scheme = "sqlite"
    durable = True
    # False on an object whose wake-up socket could not be set up at open.
    wakes_other_processes = True

    def __init__(
        self,
        path: str,
        *,
        synchronous: str = "FULL",
        busy_timeout: int = _DEFAULT_BUSY_TIMEOUT,
        make_parent: bool = False,
        _coalesce: bool = True,
    ) -> None:
        if synchronous not in _SYNCHRONOUS:
            raise ConfigError(f"synchronous must be one of {_SYNCHRONOUS}, not {synchronous!r}")
        self.path = path
        self.synchronous = synchronous
        self.busy_timeout = busy_timeout
        self._make_parent = make_parent
        # One write per transaction when False: the benchmark's "before".
        self._group_limit = _GROUP_LIMIT if _coalesce else 1
        self._worker: _Worker | None = None
        self._conn: sqlite3.Connection | None = None
        # The connection's synchronous setting now: NORMAL after a relaxed
        # group until a strict one puts the configured one back.
        self._synchronous_now = synchronous
        # Replaced whenever this object writes a final state: waiters hold the one they saw.
        self._finished: asyncio.Event | None = None
        self._wake: WakeChannel | None = None
        self._callbacks: list[Callable[[], object]] = []

    def __repr__(self) -> str:
        return f"<SQLiteBackend {self.path!r} synchronous={self.synchronous}>"

    # -- the thread ------------------------------------------------------------

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._worker is None:
            raise BackendError(f"the SQLite backend on {self.path} is not open")
        return await asyncio.wrap_future(self._worker.submit(fn))

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:  # pragma: no cover - _run refuses first
            raise BackendError(f"the SQLite backend on {self.path} is not open")
        return self._conn

    async def _write(
        self,
        fn: Callable[[sqlite3.Connection, float], T],
        wakes: Callable[[T], bool] | None = None,
        *,
        relaxed: bool = False,
    ) -> T:
        """Run ``fn(conn, now)`` in a ``BEGIN IMMEDIATE`` transaction on the
        thread, possibly shared with the writes queued next to it (each in its
        own savepoint if one of them raises); return once it is committed. ``wakes(result)`` (on the
        thread, after the commit) says whether it made work claimable: the
        other processes are then told.

        :raises BackendError: for an SQLite error (this call's changes are
            rolled back), or when the group's transaction fails as a whole.
        """
        if self._worker is None:
            raise BackendError(f"the SQLite backend on {self.path} is not open")
        return await asyncio.wrap_future(self._worker.submit_write(fn, wakes, relaxed))

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` in one read transaction (one snapshot) on the thread;
        it sees every write queued before it.

        :raises BackendError: for an SQLite error.
        """
        return await self._run(lambda: self._snapshot(fn))

    def _snapshot(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        # On the backend's thread: one read transaction.
        conn = self._connection()
        try:
            conn.execute("BEGIN")
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise self._error(exc) from exc
            raise
        return result

    def _write_group(self, calls: list[_Write]) -> None:
        """On the thread: run ``calls`` in one ``BEGIN IMMEDIATE … COMMIT``, then
        resolve their futures (only once the commit returned).

        One call runs as it is: on an exception the transaction is rolled back.
        Several run one after the other; when one raises, the transaction is
        rolled back and they run again, each in a savepoint: the one that
        raises is rolled back to its savepoint and gets its exception, the
        others commit. When the transaction as a whole fails (``BEGIN``,
        ``COMMIT``, or an error after which SQLite rolled everything back),
        every call gets a BackendError.
        """
        conn = self._connection()
        single = len(calls) == 1
        # A group of claims and renewals only need not wait for the disk: lost
        # in a power cut, its jobs just run again (at least once holds). The
        # next strict commit syncs the WAL, these frames included. The setting
        # changes only when the kind of group does (one statement, not two
        # around every relaxed group).
        relaxed = self.synchronous != "NORMAL" and all(call.relaxed for call in calls)
        try:
            self._set_synchronous(conn, "NORMAL" if relaxed else self.synchronous)
            conn.execute("BEGIN IMMEDIATE")
            # The clock is read once the write lock is held: commit order is
            # time order. One reading serves the whole group.
            outcomes = self._run_calls(conn, calls, time.time())
            conn.execute("COMMIT" if any(ok for ok, _ in outcomes) else "ROLLBACK")
        except BaseException as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            for call in calls:
                call.future.set_exception(self._error(exc, group=not single))
            return
        # Before the futures: the other processes may start on it a little sooner.
        self._wake_others(calls, outcomes)
        for call, (ok, value) in zip(calls, outcomes, strict=True):
            if ok:
                call.future.set_result(value)
            else:
                call.future.set_exception(value)

    def _set_synchronous(self, conn: sqlite3.Connection, level: str) -> None:
        # Outside a transaction, where SQLite takes the setting.
        if self._synchronous_now != level:
            self._synchronous_now = ""  # unknown until the statement returned
            conn.execute(f"PRAGMA synchronous = {level}")
            self._synchronous_now = level

    def _run_calls(
        self, conn: sqlite3.Connection, calls: list[_Write], now: float
    ) -> list[tuple[bool, Any]]:
        # Each call's (True, result) or (False, exception); raises when the
        # transaction is lost. Several run one after the other without a
        # savepoint each at first (two statements fewer a call: each lets go
        # of the GIL, which takes a while to get back under load). When one
        # raises, everything is rolled back, a new transaction begun (the
        # clock read again) and every call run again in its savepoint: they
        # only write through ``conn``, so running one again is harmless.
        if len(calls) == 1:
            return [(True, calls[0].fn(conn, now))]
        outcomes: list[tuple[bool, Any]] = []
        try:
            for call in calls:
                outcomes.append((True, call.fn(conn, now)))
            return outcomes
        except Exception:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.execute("BEGIN IMMEDIATE")
        now = time.time()
        return [self._in_savepoint(conn, call, now) for call in calls]

    def _in_savepoint(self, conn: sqlite3.Connection, call: _Write, now: float) -> tuple[bool, Any]:
        # (True, result) or (False, exception); raises when the transaction is lost.
        conn.execute("SAVEPOINT call")
        try:
            result = call.fn(conn, now)
        except Exception as exc:
            if not conn.in_transaction:
                raise  # SQLite rolled the whole transaction back (I/O error, disk full)
            conn.execute("ROLLBACK TO call")
            conn.execute("RELEASE call")
            return False, self._error(exc)
        conn.execute("RELEASE call")
        return True, result

    def _error(self, exc: BaseException, *, group: bool = False) -> BaseException:
        # An SQLite error as the BackendError a caller gets; other exceptions as
        # they are, but for a failed group, where every call gets a BackendError.
        if isinstance(exc, sqlite3.Error):
            error = BackendError(f"SQLite {self.path}: {_describe(exc)}")
        elif group:
            error = BackendError(
                f"SQLite {self.path}: the transaction shared with other writes failed: {exc!r}"
            )
        else:
            return exc
        error.__cause__ = exc
        return error

    def _wake_others(self, calls: list[_Write], outcomes: list[tuple[bool, Any]]) -> None:
        # On the thread, after a commit: when a write of it made work claimable,
        # one datagram to every other backend object on the file (never
        # blocking). Nothing here may fail the writes: they are committed.
        wake = self._wake
        if wake is None:
            return
        try:
            if any(
                ok and call.wakes is not None and call.wakes(value)
                for call, (ok, value) in zip(calls, outcomes, strict=True)
            ):
                wake.notify()
        except Exception:  # pragma: no cover - the predicates and notify do not raise
            log.exception("cannot wake the other processes of %s", self.path)

    def _woken(self) -> None:
        # On the loop: another backend object on the file may have made work.
        for callback in list(self._callbacks):
            try:
                callback()
            except Exception:
                log.exception("an on_new_work callback of %s failed", self.path)

    def on_new_work(self, callback: Callable[[], object]) -> None:
        """Register ``callback``: called on the loop when another backend object
        on this file (another process, or another object in this one) stored a
        new record, or retried or released one. See the module notes."""
        self._callbacks.append(callback)

    def _notify(self) -> None:
        # Wakes this process's waiters at once; others find out by polling.
        if self._finished is not None:
            self._finished.set()
            self._finished = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------

    async def open(self) -> None:
        """Start the thread and open the file there, in WAL mode.

        :raises BackendError: when the file cannot be opened (a directory, a
            missing folder), is read-only, is not an SQLite database, or
            cannot be put in WAL mode.
        """
        if self._worker is not None:
            return
        self._finished = asyncio.Event()
        self._worker = _Worker(self._write_group, self._group_limit)
        try:
            await asyncio.wrap_future(self._worker.submit(self._connect))
        except BaseException:
            self._worker.stop()
            self._worker = None
            raise
        self._wake = await self._run(lambda: WakeChannel.open(self.path))
        if self._wake is not None:
            try:
                self._wake.listen(asyncio.get_running_loop(), self._woken)
            except (NotImplementedError, OSError) as exc:
                log.warning(
                    "no wake-ups between processes for %s, which will only be "
                    "polled: this loop cannot watch a socket (%s)",
                    self.path,
                    exc,
                )
                self._wake.close()
                self._wake = None
        self.wakes_other_processes = self._wake is not None

    def _connect(self) -> None:
        path = self.path
        if self._make_parent:
            try:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            except OSError as exc:
                raise BackendError(f"SQLite {path}: cannot create its folder: {exc}") from None
        if os.path.isdir(path):
            raise BackendError(f"SQLite {path}: cannot open it: it is a directory, not a file")
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise BackendError(f"SQLite {path}: it is read-only (this process may not write it)")
        try:
            conn = sqlite3.connect(
                path, timeout=self.busy_timeout / 1000, isolation_level=None, cached_statements=256
            )
        except sqlite3.Error as exc:
            raise BackendError(f"SQLite {path}: cannot open it: {_describe(exc)}") from None
        try:
            self._configure(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._synchronous_now = self.synchronous

    def _configure(self, conn: sqlite3.Connection) -> None:
        path = self.path
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout)}")
            mode = self._switch_to_wal(conn)
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        except sqlite3.Error as exc:
            raise BackendError(
                f"SQLite {path}: cannot open it in WAL mode: {_describe(exc)}"
            ) from None
        if mode != "wal":
            raise BackendError(
                f"SQLite {path}: the file stays in journal mode {mode!r}, not WAL (a VFS "
                f"or filesystem without shared memory?); asyncbg needs WAL so that "
                f"readers never block the writer"
            )
        conn.create_function("lost_lease_error", 3, lost_lease_error, deterministic=True)

    def _switch_to_wal(self, conn: sqlite3.Connection) -> str:
        # Two processes opening a new file at once: the switch to WAL can get
        # SQLITE_BUSY at once, without the busy handler (a lock upgrade that
        # would deadlock), so it is retried here within the busy timeout.
        deadline = time.monotonic() + self.busy_timeout / 1000
        pause = 0.001
        while True:
            try:
                return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)  # on the backend's own thread, never the loop
            pause = min(pause * 2, 0.05)

    async def close(self) -> None:
        """Close the connection and end the thread, then the wake-up socket
        (its file removed); a second call does nothing."""
        worker, self._worker = self._worker, None
        if worker is None:
            return

        def disconnect() -> None:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

        try:
            await asyncio.wrap_future(worker.submit(disconnect))
        finally:
            worker.stop()
            # After the thread's last write: nothing sends on it any more.
            wake, self._wake = self._wake, None
            if wake is not None:
                wake.close()

    async def migrate(self) -> None:
        """Create the schema when the file has none, or upgrade an older one in
        place (version 1 gains the ``jobs_pending`` index); idempotent, and safe
        when several processes migrate at once (``BEGIN IMMEDIATE`` serialises
        them).

        :raises BackendError: when the file's schema is newer than this
            module's, or for an SQLite error.
        """

        def migrate(conn: sqlite3.Connection, now: float) -> None:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
            version = row[0] or 0
            if version > SCHEMA_VERSION:
                raise BackendError(
                    f"SQLite {self.path}: schema version {version} is newer than this "
                    f"asyncbg knows ({SCHEMA_VERSION}); upgrade asyncbg"
                )
            if version == SCHEMA_VERSION:
                return
            if version < 1:
                _script(conn, _SCHEMA)
            for step in range(max(version, 1) + 1, SCHEMA_VERSION + 1):
                _script(conn, _UPGRADES[step])
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))

        await self._write(migrate)

    async def preflight(self) -> list[str]:
        """Return warnings about the chosen settings (``synchronous=NORMAL``).

        :raises BackendError: when the file is on a network filesystem, where
            WAL's shared memory (and so claim exclusivity) does not hold.
        """
        fstype = await self._run(lambda: filesystem_type(self.path))
        if fstype in _NETWORK_FILESYSTEMS:
            raise BackendError(
                f"SQLite {self.path} is on a network filesystem ({fstype}): WAL does not "
                f"work there; put the file on a local disk"
            )
        warnings = []
        if self.synchronous == "NORMAL":
            warnings.append(
                f"{self.path}: synchronous=NORMAL: a crash of the process loses nothing, but "
                f"a power cut or an OS crash may lose the last commits, i.e. jobs whose "
                f"enqueue was acknowledged (or finishes that were); FULL (the default) "
                f"syncs every commit"
            )
        return warnings

    # -- jobs and queue items --------------------------------------------------

    async def enqueue(
        self,
        records: Sequence[JobRecord],
        *,
        limits: Mapping[str, int] | None = None,
        take: Take | None = None,
    ) -> list[JobRecord | None]:
        """Store ``records`` in one transaction; return the stored record for each.

        A record whose id is already stored, or whose ``key`` belongs to a
        pending or running job, is not stored: the existing record is returned.
        Otherwise a record whose queue is in ``limits`` is refused (None) when
        the queue already has that many pending records or more, counted in
        the same transaction (through the ``jobs_pending`` index, and no
        further than the limit) plus those this call stored before it.

        :raises ValueError: when a record is not ``pending`` (nothing is stored).
        :raises BackendError: for an SQLite error (nothing is stored).
        """
        if not records:
            return []
        return await self._write(*self._enqueue_call(records, limits, take))

    def _enqueue_call(
        self,
        records: Sequence[JobRecord],
        limits: Mapping[str, int] | None,
        take: Take | None = None,
    ) -> tuple[
        Callable[[sqlite3.Connection, float], list[JobRecord | None]],
        Callable[[list[JobRecord | None]], bool],
    ]:
        # The write of an enqueue and its wake-up test, for either way in.
        require_pending(records)
        # Not dataclasses.astuple: it deep-copies every value (17 us a record here).
        rows = [tuple(getattr(r, name) for name in _FIELDS) for r in records]
        bounds = dict(limits or {})

        def enqueue(conn: sqlite3.Connection, now: float) -> list[JobRecord | None]:
            first = _next(conn, "seq", len(rows))
            pending: dict[str, int] = {}  # per bounded queue, as counted and then stored
            out: list[JobRecord | None] = []
            for i, (record, row) in enumerate(zip(records, rows, strict=True)):
                if take is not None and record.id in take.ids:
                    # Stored claimed: the enqueue is its claim (token 1, one attempt).
                    record = record.replace(
                        status="running",
                        owner=take.owner,
                        token=1,
                        attempts=1,
                        started_at=now,
                        lease_until=now + take.lease,
                    )
                    row = tuple(getattr(record, name) for name in _FIELDS)
                out.append(_enqueue_one(conn, record, row, first + i, bounds, pending))
            return out

        def stored_new(stored: list[JobRecord | None]) -> bool:
            # _enqueue_one returns the very record it stored (a known one is read back).
            return any(s is r for s, r in zip(stored, records, strict=True))

        return enqueue, stored_new

    def enqueue_from_thread(
        self,
        records: Sequence[JobRecord],
        *,
        limits: Mapping[str, int] | None = None,
        take: Take | None = None,
    ) -> concurrent.futures.Future[list[JobRecord | None]] | None:
        """As :meth:`enqueue`, handed straight to the writer thread from any
        other thread (a view's): the future resolves once the commit is done.

        It skips two hops through the loop, and still shares a commit with
        the writes queued beside it (other submitting threads' included).

        :raises ValueError: when a record is not ``pending`` (nothing is stored).
        :raises BackendError: if the backend is not open.
        """
        if self._worker is None:
            raise BackendError(f"the SQLite backend on {self.path} is not open")
        if not records:
            done: concurrent.futures.Future[list[JobRecord | None]] = concurrent.futures.Future()
            done.set_result([])
            return done
        return self._worker.submit_write(*self._enqueue_call(records, limits, take))

    async def claim(
        self, queues: Sequence[str], owner: str, limit: int, lease: float
    ) -> list[Claim]:
        """Take up to ``limit`` due records of ``queues`` for ``owner``, oldest
        first: each becomes running with a lease of ``lease`` seconds, a token
        one higher and one more attempt. Records whose lease ran out are taken
        again, or failed when they have no attempts left.

        :raises BackendError: for an SQLite error (nothing is claimed).
        """
        lanes = list(dict.fromkeys(queues))
        if limit <= 0 or not lanes:
            return []

        def claim(conn: sqlite3.Connection, now: float) -> tuple[list[Claim], int]:
            picked, spent = _pick(conn, lanes, limit, now)
            for chunk in _chunks(spent):
                conn.execute(
                    f"""UPDATE jobs SET status = 'failed', finished_at = ?, lease_until = NULL,
                    error = lost_lease_error(owner, attempts, max_attempts)
                    WHERE id IN ({_marks(len(chunk))})""",
                    (now, *chunk),
                )
            taken: dict[str, JobRecord] = {}
            for chunk in _chunks(picked):
                cursor = conn.execute(
                    f"""UPDATE jobs SET status = 'running', owner = ?, token = token + 1,
                    attempts = attempts + 1, started_at = ?, lease_until = ?
                    WHERE id IN ({_marks(len(chunk))}) RETURNING {_COLUMNS}""",
                    (owner, now, now + lease, *chunk),
                )
                taken.update((r.id, r) for r in map(_record, cursor))
            # RETURNING has no order: the claims come in the order they were picked.
            records = [taken[i] for i in picked]
            return [Claim(r.id, owner, r.token, r) for r in records], len(spent)

        claims, failed = await self._write(claim, relaxed=True)
        if failed:
            self._notify()
        return claims

    async def renew(self, claims: Sequence[Claim], lease: float) -> RenewResult:
        """Extend to ``lease`` seconds from now every claim still held (same
        owner and token, still running), in one transaction.

        :raises BackendError: for an SQLite error.
        """

        def renew(conn: sqlite3.Connection, now: float) -> RenewResult:
            kept: list[str] = []
            lost: list[str] = []
            cancel: list[str] = []
            for claim in claims:
                row = conn.execute(
                    f"UPDATE jobs SET lease_until = :until WHERE {_HELD} "
                    f"RETURNING cancel_requested",
                    {**_held(claim), "until": now + lease},
                ).fetchone()
                if row is None:
                    lost.append(claim.id)
                    continue
                kept.append(claim.id)
                if row[0]:
                    cancel.append(claim.id)
            return RenewResult(tuple(kept), tuple(lost), tuple(cancel))

        return await self._write(renew, relaxed=True)

    async def finish(self, claim: Claim, outcome: Outcome) -> bool:
        """Record the final outcome; False (nothing written) for a stale claim.

        :raises BackendError: for an SQLite error.
        """
        return (await self.finish_many([(claim, outcome)]))[0]

    async def finish_many(self, outcomes: Sequence[tuple[Claim, Outcome]]) -> list[bool]:
        """Record many outcomes in one write; for each, False for a stale claim.

        :raises BackendError: for an SQLite error (nothing is written).
        """

        def finish(conn: sqlite3.Connection, now: float) -> list[bool]:
            return [
                conn.execute(
                    f"""UPDATE jobs SET status = :status, result_json = :result,
                    error = :error, finished_at = :now, lease_until = NULL WHERE {_HELD}""",
                    {
                        **_held(claim),
                        "status": outcome.status,
                        "result": outcome.result_json,
                        "error": outcome.error,
                        "now": now,
                    },
                ).rowcount
                == 1
                for claim, outcome in outcomes
            ]

        if not outcomes:
            return []
        done = await self._write(finish)
        if any(done):
            self._notify()
        return done

    async def retry(self, claim: Claim, run_at: float, error: str | None) -> bool:
        """Queue the job again for ``run_at`` with ``error`` stored (it ends
        cancelled instead when a cancel was requested); False for a stale claim.

        :raises BackendError: for an SQLite error.
        """

        def retry(conn: sqlite3.Connection, now: float) -> str | None:
            params = {**_held(claim), "now": now, "run_at": run_at, "error": error}
            params["seq"] = _next(conn, "seq")
            row = conn.execute(_RETRY, params).fetchone()
            return None if row is None else str(row[0])

        status = await self._write(retry, lambda status: status == "pending")
        if status == "cancelled":
            self._notify()
        return status is not None

    async def release(self, claims: Sequence[Claim]) -> int:
        """Queue held claims again at once, their attempt not counted (a job
        whose cancel was requested ends cancelled); return how many were held.

        :raises BackendError: for an SQLite error (nothing is released).
        """

        def release(conn: sqlite3.Connection, now: float) -> list[str]:
            first = _next(conn, "seq", len(claims))
            statuses = []
            for i, claim in enumerate(claims):
                params = {**_held(claim), "now": now, "seq": first + i}
                row = conn.execute(_RELEASE, params).fetchone()
                if row is not None:
                    statuses.append(str(row[0]))
            return statuses

        if not claims:
            return 0
        statuses = await self._write(release, lambda statuses: "pending" in statuses)
        if "cancelled" in statuses:
            self._notify()
        return len(statuses)

    async def progress(
        self, claim: Claim, done: float, total: float | None, message: str | None
    ) -> bool:
        """Record progress; False for a stale claim.

        :raises BackendError: for an SQLite error.
        """

        def progress(conn: sqlite3.Connection, now: float) -> bool:
            cursor = conn.execute(
                f"""UPDATE jobs SET progress_done = :done, progress_total = :total,
                progress_message = :message WHERE {_HELD}""",
                {**_held(claim), "done": done, "total": total, "message": message},
            )
            return cursor.rowcount == 1

        return await self._write(progress, relaxed=True)

    async def get(self, job_id: str) -> JobRecord | None:
        """Return the record, or None when unknown or expired.

        :raises BackendError: for an SQLite error.
        """
        records = await self._read(lambda conn: _get_many(conn, [job_id]))
        return records[0] if records else None

    async def query(self, query: JobQuery) -> JobPage:
        """Return one page of matching records, newest first (by ``created_at``,
        then the later enqueued), and the count of all matches, from one snapshot.

        :raises BackendError: for an SQLite error.
        """
        where: list[str] = []
        params: list[Any] = []
        if query.statuses is not None:
            where.append(f"status IN ({_marks(len(query.statuses))})")
            params.extend(sorted(query.statuses))
        if query.task is not None:
            where.append("task = ?")
            params.append(query.task)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        page = (max(0, query.limit), max(0, query.offset))

        def select(conn: sqlite3.Connection) -> JobPage:
            cursor = conn.execute(
                f"SELECT {_COLUMNS} FROM jobs {clause} "
                f"ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?",
                (*params, *page),
            )
            records = tuple(map(_record, cursor))
            total = conn.execute(f"SELECT count(*) FROM jobs {clause}", params).fetchone()[0]
            return JobPage(records, int(total))

        return await self._read(select)

    async def stats(self) -> dict[str, dict[str, int]]:
        """Return counts per queue and status: ``{queue: {status: n}}`` (no zeros).

        :raises BackendError: for an SQLite error.
        """

        def stats(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
            counts: dict[str, dict[str, int]] = {}
            for queue_name, status, n in conn.execute(
                "SELECT queue, status, count(*) FROM jobs GROUP BY queue, status"
            ):
                counts.setdefault(queue_name, {})[status] = int(n)
            return counts

        return await self._read(stats)

    async def cancel(self, job_id: str) -> str:
        """Cancel a job; return a :class:`~asyncbg.engine.records.CancelResult` value.

        A pending job becomes cancelled at once and never starts; a running one
        gets ``cancel_requested``, which its owner's next renewal reports.

        :raises BackendError: for an SQLite error.
        """

        def cancel(conn: sqlite3.Connection, now: float) -> str:
            row = conn.execute(
                "SELECT status, cancel_requested FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            if row is None:
                return CancelResult.UNKNOWN
            status, requested = row
            if status in FINAL_STATUSES:
                return CancelResult.FINAL
            if status == "running":
                if not requested:
                    conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
                return CancelResult.REQUESTED
            conn.execute(
                "UPDATE jobs SET status = 'cancelled', finished_at = ? WHERE id = ?",
                (now, job_id),
            )
            return CancelResult.CANCELLED

        result = await self._write(cancel)
        if result == CancelResult.CANCELLED:
            self._notify()
        return result

    async def wait(self, job_ids: Sequence[str], timeout: float) -> list[JobRecord]:
        """Return once every known job of ``job_ids`` is final or ``timeout``
        seconds passed: the records known then (unknown ids left out).

        The file is polled (5 ms, doubling to 100 ms), since another process
        may finish the jobs; a final write by this object wakes it at once.

        :raises BackendError: for an SQLite error.
        """
        ids = list(job_ids)
        return await poll_until_final(
            lambda: self._read(lambda conn: _get_many(conn, ids)), timeout, lambda: self._finished
        )

    async def expire(self, finished_before: float) -> int:
        """Forget final records finished before ``finished_before``; return how many.

        :raises BackendError: for an SQLite error.
        """

        def expire(conn: sqlite3.Connection, now: float) -> int:
            cursor = conn.execute(
                f"DELETE FROM jobs WHERE status IN {_FINAL} AND finished_at < ?",
                (finished_before,),
            )
            return cursor.rowcount

        return await self._write(expire)

    # -- periodic leadership ---------------------------------------------------

    async def acquire(self, name: str, owner: str, ttl: float) -> Lease | None:
        """Take the lease of schedule ``name`` for ``ttl`` seconds with a new
        epoch when nobody holds it live; the owner of the live lease gets it
        back unchanged; None while another owner holds it.

        :raises BackendError: for an SQLite error.
        """

        def acquire(conn: sqlite3.Connection, now: float) -> Lease | None:
            row = conn.execute(
                "SELECT owner, epoch, expires_at FROM leases WHERE name = ?", (name,)
            ).fetchone()
            if row is not None and row[0] is not None and row[2] > now:
                return Lease(name, row[0], row[1], row[2]) if row[0] == owner else None
            lease = Lease(name, owner, (0 if row is None else row[1]) + 1, now + ttl)
            conn.execute(
                """INSERT INTO leases (name, owner, epoch, expires_at) VALUES (?, ?, ?, ?)
                ON CONFLICT (name) DO UPDATE SET owner = excluded.owner,
                epoch = excluded.epoch, expires_at = excluded.expires_at""",
                (name, owner, lease.epoch, lease.expires_at),
            )
            return lease

        return await self._write(acquire)

    async def renew_lease(self, lease: Lease, ttl: float) -> Lease | None:
        """Extend a live lease to ``ttl`` seconds from now; None when it ran out
        (even if nobody took it since), was released or was taken.

        :raises BackendError: for an SQLite error.
        """

        def renew(conn: sqlite3.Connection, now: float) -> Lease | None:
            cursor = conn.execute(
                """UPDATE leases SET expires_at = ? WHERE name = ? AND owner = ?
                AND epoch = ? AND expires_at > ?""",
                (now + ttl, lease.name, lease.owner, lease.epoch, now),
            )
            return dataclasses.replace(lease, expires_at=now + ttl) if cursor.rowcount else None

        return await self._write(renew)

    async def release_lease(self, lease: Lease) -> bool:
        """Give a lease up; False when it was no longer held live. The epoch is
        kept, so the next holder's is higher.

        :raises BackendError: for an SQLite error.
        """

        def release(conn: sqlite3.Connection, now: float) -> bool:
            held = (lease.name, lease.owner, lease.epoch)
            row = conn.execute(
                "SELECT expires_at FROM leases WHERE name = ? AND owner = ? AND epoch = ?", held
            ).fetchone()
            if row is None:
                return False
            conn.execute(
                """UPDATE leases SET owner = NULL, expires_at = NULL
                WHERE name = ? AND owner = ? AND epoch = ?""",
                held,
            )
            return row[0] is not None and row[0] > now

        return await self._write(release)

    async def claim_slot(self, lease: Lease, slot: int) -> bool:
        """Claim tick ``slot`` of the lease's schedule: True at most once per
        (schedule, slot), and only while ``lease`` is the live current epoch.

        :raises BackendError: for an SQLite error.
        """

        def claim(conn: sqlite3.Connection, now: float) -> bool:
            row = conn.execute(
                """SELECT slot_floor FROM leases WHERE name = ? AND owner = ? AND epoch = ?
                AND expires_at > ?""",
                (lease.name, lease.owner, lease.epoch, now),
            ).fetchone()
            if row is None or (row[0] is not None and slot <= row[0]):
                return False
            cursor = conn.execute(
                "INSERT INTO slots (name, slot, epoch) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                (lease.name, slot, lease.epoch),
            )
            if cursor.rowcount != 1:
                return False
            _fold_slots(conn, lease.name)
            return True

        return await self._write(claim)

    async def anchor(self, name: str, proposed: float) -> float:
        """Return the stored anchor of schedule ``name``, storing ``proposed``
        when there is none yet.

        :raises BackendError: for an SQLite error.
        """

        def anchor(conn: sqlite3.Connection, now: float) -> float:
            conn.execute(
                "INSERT INTO anchors (name, at) VALUES (?, ?) ON CONFLICT DO NOTHING",
                (name, proposed),
            )
            return float(
                conn.execute("SELECT at FROM anchors WHERE name = ?", (name,)).fetchone()[0]
            )

        return await self._write(anchor)

    async def leases(self) -> list[LeaseState]:
        """Return the lease row of every schedule ever acquired, sorted by name
        (owner and expiry NULL once released; a lease that ran out as it was).

        :raises BackendError: for an SQLite error.
        """

        def leases(conn: sqlite3.Connection) -> list[LeaseState]:
            cursor = conn.execute("SELECT name, owner, epoch, expires_at FROM leases ORDER BY name")
            return [LeaseState(*row) for row in cursor]

        return await self._read(leases)

    # -- nodes -----------------------------------------------------------------

    async def heartbeat(self, node: NodeRecord, *, forget_after: float = NODE_FORGET_AFTER) -> None:
        """Store ``node`` with ``last_seen`` set to now; forget (delete) the
        other nodes not heard from for more than ``forget_after`` seconds.

        :raises BackendError: for an SQLite error.
        """

        def beat(conn: sqlite3.Connection, now: float) -> None:
            conn.execute(
                "DELETE FROM nodes WHERE last_seen < ? AND id != ?", (now - forget_after, node.id)
            )
            conn.execute(
                """INSERT OR REPLACE INTO nodes
                (id, host, pid, started_at, last_seen, running, lag, beat)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    node.id,
                    node.host,
                    node.pid,
                    node.started_at,
                    now,
                    node.running,
                    node.lag,
                    _next(conn, "beat"),
                ),
            )

        await self._write(beat, relaxed=True)

    async def forget_node(self, node_id: str) -> None:
        """Delete the row of node ``node_id`` (nothing when unknown).

        :raises BackendError: for an SQLite error.
        """

        def forget(conn: sqlite3.Connection, now: float) -> None:
            conn.execute("DELETE FROM nodes WHERE id = ?", (node_id,))

        await self._write(forget, relaxed=True)

    async def nodes(self) -> list[NodeRecord]:
        """Return every node not forgotten, newest heartbeat first.

        :raises BackendError: for an SQLite error.
        """

        def nodes(conn: sqlite3.Connection) -> list[NodeRecord]:
            cursor = conn.execute(
                """SELECT id, host, pid, started_at, last_seen, running, lag FROM nodes
                ORDER BY last_seen DESC, beat DESC"""
            )
            return [NodeRecord(*row) for row in cursor]

        return await self._read(nodes)


# -- statements, run on the backend's thread -----------------------------------


def _held(claim: Claim) -> dict[str, Any]:
    return {"id": claim.id, "owner": claim.owner, "token": claim.token}


def _enqueue_one(
    conn: sqlite3.Connection,
    record: JobRecord,
    row: tuple[Any, ...],
    seq: int,
    limits: Mapping[str, int],
    pending: dict[str, int],
) -> JobRecord | None:
    # ``record`` itself when stored, the existing record (read back) when its id
    # or active key is known, or None when its queue is full.
    limit = limits.get(record.queue)
    if limit is not None:
        if record.queue not in pending:
            pending[record.queue] = _count_pending(conn, record.queue, limit)
        if pending[record.queue] >= limit:
            # Refused, unless idempotency answers it: then it is not new.
            return _existing(conn, record)
    # DO NOTHING without a target covers the id and the active-key index alike.
    inserted = conn.execute(
        f"""INSERT INTO jobs ({_COLUMNS}, seq) VALUES ({_marks(len(row) + 1)})
        ON CONFLICT DO NOTHING RETURNING id""",
        (*row, seq),
    ).fetchone()
    if inserted is None:
        existing = _existing(conn, record)
        if existing is None:  # pragma: no cover - only the id and the key are unique
            raise BackendError(f"the insert of {record.id!r} conflicted with nothing known")
        return existing
    if limit is not None:
        pending[record.queue] += 1
    return record


def _existing(conn: sqlite3.Connection, record: JobRecord) -> JobRecord | None:
    # The stored record with the id of ``record``, or the active one with its key.
    row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (record.id,)).fetchone()
    if row is None and record.key is not None:
        row = conn.execute(
            f"""SELECT {_COLUMNS} FROM jobs
            WHERE key = ? AND status IN ('pending', 'running')""",
            (record.key,),
        ).fetchone()
    return None if row is None else _record(row)


def _count_pending(conn: sqlite3.Connection, queue_name: str, limit: int) -> int:
    # The pending records of a queue, counted up to ``limit`` at most: the cost
    # is bounded by the limit, not by the queue's length.
    row = conn.execute(
        """SELECT count(*) FROM (SELECT 1 FROM jobs INDEXED BY jobs_pending
        WHERE queue = ? AND status = 'pending' LIMIT ?)""",
        (queue_name, max(limit, 0)),
    ).fetchone()
    return int(row[0])


def _lane(
    conn: sqlite3.Connection, queue_name: str, now: float
) -> Generator[tuple[Any, ...], None, None]:
    # One queue's claimable records in claim order, read lazily.
    for sql in _CLAIMABLE:
        cursor = conn.execute(sql, {"queue": queue_name, "now": now})
        try:
            while rows := cursor.fetchmany(64):
                yield from rows
        finally:
            cursor.close()


def _pick(
    conn: sqlite3.Connection, queues: Sequence[str], limit: int, now: float
) -> tuple[list[str], list[str]]:
    """Return the ids to claim (up to ``limit``, in order) and the ids of the
    lost jobs out of attempts met before them (to fail, not counted)."""
    lanes = [_lane(conn, q, now) for q in queues]
    picked: list[str] = []
    spent: list[str] = []
    try:
        # As the memory backend's heaps: by (due, seq), ties to the queue named first.
        for _due, _seq, job_id, is_spent in heapq.merge(*lanes, key=lambda r: (r[0], r[1])):
            (spent if is_spent else picked).append(job_id)
            if len(picked) >= limit:
                break
    finally:
        for lane in lanes:
            lane.close()
    return picked, spent


def _get_many(conn: sqlite3.Connection, ids: Sequence[str]) -> list[JobRecord]:
    found: dict[str, JobRecord] = {}
    for chunk in _chunks(list(dict.fromkeys(ids))):
        cursor = conn.execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE id IN ({_marks(len(chunk))})", chunk
        )
        found.update((r.id, r) for r in map(_record, cursor))
    return [found[i] for i in ids if i in found]


def _fold_slots(conn: sqlite3.Connection, name: str) -> None:
    # Past 2 x 1024 remembered slots, every slot up to the 1025th newest folds
    # into the schedule's floor (counted as claimed), as the memory backend does.
    over = conn.execute(
        "SELECT slot FROM slots WHERE name = ? ORDER BY slot DESC LIMIT 1 OFFSET ?",
        (name, 2 * _SLOT_MEMORY),
    ).fetchone()
    if over is None:
        return
    floor = conn.execute(
        "SELECT slot FROM slots WHERE name = ? ORDER BY slot DESC LIMIT 1 OFFSET ?",
        (name, _SLOT_MEMORY),
    ).fetchone()[0]
    conn.execute(
        "UPDATE leases SET slot_floor = max(coalesce(slot_floor, ?), ?) WHERE name = ?",
        (floor, floor, name),
    )
    conn.execute("DELETE FROM slots WHERE name = ? AND slot <= ?", (name, floor))


def filesystem_type(path: str, mounts: str | None = None) -> str | None:
    """Return the type of the filesystem ``path`` is on (``ext4``, ``nfs4``…),
    from ``mounts`` (the text of ``/proc/mounts``, read when None); None when
    it cannot be told (not Linux)."""
    if mounts is None:
        try:
            with open("/proc/mounts", encoding="utf-8", errors="replace") as file:
                mounts = file.read()
        except OSError:
            return None
    target = os.path.realpath(path)
    best: tuple[int, str] | None = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        # /proc/mounts escapes a space in a mount point as \040.
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= best[0]):
            best = (len(point), fields[2])
    return None if best is None else best[1]


def from_url(url: str, instance_path: str, options: BackendOptions | None = None) -> SQLiteBackend:
    """Return a new :class:`SQLiteBackend` for ``sqlite:///relative/path.db``
    (under ``instance_path``, whose folder is made at open) or
    ``sqlite:////absolute/path.db``, with options ``?synchronous=FULL|EXTRA|NORMAL``
    and ``busy_timeout=<ms>``.

    :raises ConfigError: for a host, a missing path, ``:memory:``, an unknown
        or repeated option, or a value an option does not take.
    """
    del options  # nothing here is pooled or networked
    shown = _redact(url)
    parts = urlsplit(url)
    if parts.scheme.lower() != "sqlite":
        raise ConfigError(f"ASYNCBG_BACKEND {shown!r}: not an sqlite:// URL")
    if parts.netloc or parts.fragment:
        raise ConfigError(
            f"ASYNCBG_BACKEND {shown!r}: an SQLite URL names a file, no host: write "
            f"'sqlite:///relative/path.db' (in the instance folder) or "
            f"'sqlite:////absolute/path.db'"
        )
    path = unquote(parts.path[1:])
    if not path or path.endswith("/") or path == ":memory:":
        raise ConfigError(
            f"ASYNCBG_BACKEND {shown!r}: name a database file, as in 'sqlite:///asyncbg.db' "
            f"(an in-memory SQLite database is not shared: use 'memory://')"
        )
    settings = _options(parts.query, shown)
    relative = not os.path.isabs(path)
    if relative:
        path = os.path.join(instance_path, path)
    return SQLiteBackend(os.path.normpath(path), make_parent=relative, **settings)


def _options(query: str, shown: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ConfigError(f"ASYNCBG_BACKEND {shown!r}: cannot read the options {query!r}") from None
    for name, value in pairs:
        if name in options:
            raise ConfigError(f"ASYNCBG_BACKEND {shown!r}: the option {name!r} is given twice")
        if name == "synchronous":
            options[name] = _synchronous(value, shown)
        elif name == "busy_timeout":
            options[name] = _busy_timeout(value, shown)
        else:
            raise ConfigError(
                f"ASYNCBG_BACKEND {shown!r}: unknown option {name!r}; an SQLite URL takes "
                f"synchronous=FULL|EXTRA|NORMAL and busy_timeout=<milliseconds>"
            )
    return options


def _synchronous(value: str, shown: str) -> str:
    mode = value.upper()
    if mode not in _SYNCHRONOUS:
        raise ConfigError(
            f"ASYNCBG_BACKEND {shown!r}: synchronous={value!r}: use FULL (the default), "
            f"EXTRA or NORMAL (OFF could lose acknowledged jobs even at a process crash)"
        )
    return mode


def _busy_timeout(value: str, shown: str) -> int:
    if not value.isdigit():
        raise ConfigError(
            f"ASYNCBG_BACKEND {shown!r}: busy_timeout={value!r}: give whole milliseconds, "
            f"such as busy_timeout=5000"
        )
    return int(value)

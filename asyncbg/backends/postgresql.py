"""The PostgreSQL backend: job state in tables of one schema, shared by every
process of every host that opens the same database.

``postgresql://user:password@host:port/database`` (``postgres://`` too), with
the URL options ``schema`` (``asyncbg`` by default: the tables live there, so
several apps can share a database) and any libpq parameter psycopg accepts
(``sslmode=require``, ``application_name=…``). The pool size, the statement
timeout and the connect timeout are config keys (``ASYNCBG_POOL_SIZE``,
``ASYNCBG_STATEMENT_TIMEOUT``, ``ASYNCBG_CONNECT_TIMEOUT``). It needs the
``postgres`` extra: psycopg 3 and psycopg_pool.

How it runs:

- One ``psycopg_pool.AsyncConnectionPool`` per backend object, opened on
  asyncbg's loop at start (a clear :class:`~asyncbg.errors.BackendError`
  within the connect timeout when the server cannot be reached) and closed in
  the lifecycle's async phase. Connections are in autocommit: nearly every
  operation is one statement (CTEs where it takes several steps), so one
  round trip and one commit; the few that need several statements run in one
  explicit transaction. A statement that fails because its connection broke
  (a server restart, a dropped connection) is tried once more on a fresh
  connection when running it twice is harmless, which every operation but
  ``claim`` and ``retry`` is (enqueue is keyed by the client-made id and the
  key; a finish that already landed is recognised as its own).
- A submit from another thread (a sync view's) runs its insert in that thread
  on one blocking connection (a ``psycopg_pool.ConnectionPool`` of one, made
  at the first such submit and closed after a minute unused): one round trip,
  without the two hops through the loop and psycopg's asyncio wait. While
  another thread writes or has just submitted, a submit goes through the
  loop instead, whose group commit makes one statement of several threads'
  submits; so does a bounded queue's item.
- Nothing depends on session state, so a transaction-pooling proxy works:
  leadership and leases are rows with an epoch; the only advisory locks are
  transaction-scoped (the migration, and the count of a bounded queue).
- Time is the server's ``now()`` (the transaction's start) for leases,
  ``started_at`` and ``finished_at``; ``created_at`` and ``run_at`` come from
  the client's clock, as the engine computes them.
- Claims are ``FOR UPDATE SKIP LOCKED`` in claim order, fenced writes are
  compare-and-set on (id, owner, token, running).
- Wake-ups: a dedicated connection per backend object (not pooled) listens on
  one channel per schema; an enqueue, retry or release that made work
  claimable sends ``work``, a cancel asked for a running job sends
  ``cancel:<id>``. Notifications from this object's own pooled connections
  (the blocking ones included) are ignored (waking within a process is the
  engine's business). After the listener reconnects it reports new work once
  (notifications are lost while it is away), and the engine polls anyway.

It follows every decision listed in :mod:`asyncbg.backends.memory`, as the
SQLite backend does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import math
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit, urlunsplit

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
from .base import (
    NODE_FORGET_AFTER,
    Backend,
    BackendOptions,
    Wakeups,
    cancel_result,
    poll_until_final,
    require_driver,
    require_pending,
    url_options,
)

psycopg: Any = require_driver("psycopg", "postgres")
psycopg_pool: Any = require_driver("psycopg_pool", "postgres")

__all__ = ["PostgresBackend", "from_url"]

T = TypeVar("T")

log = logging.getLogger("asyncbg")

#: The schema this module writes; ``migrate`` brings a database up to it.
SCHEMA_VERSION = 1

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,47}$")
_FIELDS = tuple(f.name for f in dataclasses.fields(JobRecord))
_COLUMNS = ", ".join(_FIELDS)
_FINAL = "(" + ", ".join(f"'{s}'" for s in sorted(FINAL_STATUSES)) + ")"
_NOW = "extract(epoch from now())::float8"
# The SQL types of the columns, for a batch's rows as one JSON parameter.
_TYPES = {
    "id": "text",
    "queue": "text",
    "task": "text",
    "args_json": "text",
    "status": "text",
    "attempts": "int4",
    "max_attempts": "int4",
    "token": "int8",
    "owner": "text",
    "key": "text",
    "created_at": "float8",
    "run_at": "float8",
    "started_at": "float8",
    "finished_at": "float8",
    "lease_until": "float8",
    "progress_done": "float8",
    "progress_total": "float8",
    "progress_message": "text",
    "result_json": "text",
    "error": "text",
    "cancel_requested": "bool",
    "timeout": "float8",
}
# The columns that name a claim, and those of an outcome after them.
_HELD_COLUMNS = (("id", "text"), ("owner", "text"), ("token", "int8"))
_OUTCOME_COLUMNS = (*_HELD_COLUMNS, ("status", "text"), ("result", "text"), ("error", "text"))


def _recordset(columns: Sequence[tuple[str, str]], alias: str) -> str:
    """The rows of one JSON parameter (an array of objects) as a table.

    A batch is one statement either way, but one text parameter costs the
    client a ``json.dumps`` where one array per column cost psycopg a Python
    dumper each: 1.3 ms against 0.7 ms for a one-job enqueue here."""
    names = ", ".join(f"{name} {kind}" for name, kind in columns)
    return f"json_to_recordset(%s::json) AS {alias}({names})"


def _json_rows(names: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """``rows`` as the JSON array of objects :func:`_recordset` reads."""
    objects = [dict(zip(names, row, strict=True)) for row in rows]
    try:
        return json.dumps(objects, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:
        # An infinite or NaN float (a timeout of inf): JSON has no such
        # number, float8 reads the text 'inf' or 'nan'.
        return json.dumps(
            [{k: _finite(v) for k, v in o.items()} for o in objects],
            ensure_ascii=False,
            separators=(",", ":"),
        )


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


def _pg_text(text: str | None) -> str | None:
    """``text`` as PostgreSQL can store it: text holds no NUL character (an
    exception's message may), so each is written as ``\\x00``."""
    return text if text is None or "\x00" not in text else text.replace("\x00", "\\x00")


# A submit from a thread within this long of another thread's goes through the
# loop. Longer than a grouped submit takes under load (2-6 ms here): threads
# that submit together come back together, and the first of them again must
# not find the others' last submits already out of the window.
_CROWDED_WITHIN = 0.05
# The listener's reconnect backoff.
_LISTEN_RETRY_FIRST, _LISTEN_RETRY_MAX = 0.05, 2.0
# Slot numbers remembered per schedule before the oldest fold into a floor (as memory).
_SLOT_MEMORY = 1024

# Version 1. Never edit a version once released: add a step to _UPGRADES.
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {{s}}.jobs (
    id text PRIMARY KEY,
    queue text NOT NULL,
    task text NOT NULL,
    args_json text,
    status text NOT NULL,
    attempts int4 NOT NULL,
    max_attempts int4 NOT NULL,
    token int8 NOT NULL,
    owner text,
    key text,
    created_at float8 NOT NULL,
    run_at float8,
    started_at float8,
    finished_at float8,
    lease_until float8,
    progress_done float8,
    progress_total float8,
    progress_message text,
    result_json text,
    error text,
    cancel_requested bool NOT NULL DEFAULT false,
    timeout float8,
    seq int8 NOT NULL DEFAULT nextval('{{s}}.seq'),
    due float8 GENERATED ALWAYS AS (CASE status
        WHEN 'pending' THEN coalesce(run_at, created_at)
        WHEN 'running' THEN lease_until END) STORED
);
CREATE INDEX IF NOT EXISTS jobs_claim ON {{s}}.jobs (queue, due, seq)
    WHERE status IN ('pending', 'running');
CREATE UNIQUE INDEX IF NOT EXISTS jobs_active_key ON {{s}}.jobs (key)
    WHERE key IS NOT NULL AND status IN ('pending', 'running');
CREATE INDEX IF NOT EXISTS jobs_pending ON {{s}}.jobs (queue) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS jobs_newest ON {{s}}.jobs (created_at);
CREATE INDEX IF NOT EXISTS jobs_finished ON {{s}}.jobs (finished_at) WHERE status IN {_FINAL};
CREATE TABLE IF NOT EXISTS {{s}}.leases (
    name text PRIMARY KEY,
    owner text,
    epoch int8 NOT NULL,
    expires_at float8,
    slot_floor int8
);
CREATE TABLE IF NOT EXISTS {{s}}.slots (
    name text NOT NULL,
    slot int8 NOT NULL,
    epoch int8 NOT NULL,
    PRIMARY KEY (name, slot)
);
CREATE TABLE IF NOT EXISTS {{s}}.anchors (name text PRIMARY KEY, at float8 NOT NULL);
CREATE TABLE IF NOT EXISTS {{s}}.nodes (
    id text PRIMARY KEY,
    host text NOT NULL,
    pid int4 NOT NULL,
    started_at float8 NOT NULL,
    last_seen float8 NOT NULL,
    running int4 NOT NULL,
    lag float8
)
"""

# The steps from the version before to each version; each is idempotent.
_UPGRADES: dict[int, str] = {}


class _Statements:
    """Every statement of one schema, its name put in once at open."""

    def __init__(self, schema: str) -> None:
        s = f'"{schema}"'
        self.schema = s
        self.channel = f"asyncbg_{schema}"
        held = "j.id = c.id AND j.owner = c.owner AND j.token = c.token AND j.status = 'running'"
        # A record that comes running is taken as it is stored (see enqueue's
        # ``take``): its start and lease are the server's; only pending ones wake.
        taken_as = {
            "started_at": f"CASE WHEN u.status = 'running' THEN {_NOW} END",
            "lease_until": f"CASE WHEN u.status = 'running' THEN {_NOW} + %s END",
        }
        self.insert = f"""INSERT INTO {s}.jobs ({_COLUMNS})
            SELECT {", ".join(taken_as.get(n, f"u.{n}") for n in _FIELDS)}
            FROM {_recordset([(n, _TYPES[n]) for n in _FIELDS], "u")}
            ON CONFLICT DO NOTHING
            RETURNING id, CASE WHEN status = 'pending' THEN pg_notify(%s, 'work') END IS NULL"""
        self.existing = f"""SELECT {_COLUMNS} FROM {s}.jobs WHERE id = ANY(%s::text[])
            UNION ALL SELECT {_COLUMNS} FROM {s}.jobs
            WHERE key = ANY(%s::text[]) AND status IN ('pending', 'running')"""
        self.count_pending = f"""SELECT count(*) FROM (SELECT 1 FROM {s}.jobs
            WHERE queue = %s AND status = 'pending' LIMIT %s) AS bounded"""
        # The lost jobs out of attempts are failed (not counted in the limit) by
        # the first part; the second takes the claimable ones, in claim order.
        self.claim = f"""WITH clock AS (SELECT {_NOW} AS now),
            spent AS (
                SELECT id FROM {s}.jobs, clock
                WHERE queue = ANY(%(queues)s::text[]) AND status = 'running'
                AND lease_until <= clock.now AND attempts >= max_attempts
                FOR UPDATE OF jobs SKIP LOCKED LIMIT 1000
            ),
            failed AS (
                UPDATE {s}.jobs j SET status = 'failed', finished_at = clock.now,
                lease_until = NULL,
                error = format('its lease ran out: the owner %%L stopped renewing it, '
                    'and it had no attempts left (%%s of %%s)', j.owner, j.attempts,
                    j.max_attempts)
                FROM spent, clock WHERE j.id = spent.id RETURNING j.id
            ),
            picked AS (
                SELECT id FROM {s}.jobs, clock
                WHERE queue = ANY(%(queues)s::text[]) AND status IN ('pending', 'running')
                AND (due <= clock.now OR (status = 'pending' AND run_at IS NULL))
                AND NOT (status = 'running' AND attempts >= max_attempts)
                ORDER BY due, seq
                FOR UPDATE OF jobs SKIP LOCKED LIMIT %(limit)s
            ),
            claimed AS (
                UPDATE {s}.jobs j SET status = 'running', owner = %(owner)s,
                token = j.token + 1, attempts = j.attempts + 1, started_at = clock.now,
                lease_until = clock.now + %(lease)s
                FROM picked, clock WHERE j.id = picked.id
                RETURNING {", ".join(f"j.{n}" for n in _FIELDS)}, j.due, j.seq
            )
            SELECT claimed.*, f.n FROM (SELECT count(*) AS n FROM failed) AS f
            LEFT JOIN claimed ON true"""
        self.renew = f"""UPDATE {s}.jobs j SET lease_until = {_NOW} + %s
            FROM {_recordset(_HELD_COLUMNS, "c")}
            WHERE {held} RETURNING j.id, j.owner, j.token, j.cancel_requested"""
        # A finish that already landed (the same owner, token and outcome) is
        # its own: a retry after a lost acknowledgement gets True again.
        self.finish = f"""UPDATE {s}.jobs j SET status = c.status, result_json = c.result,
            error = c.error, finished_at = {_NOW}, lease_until = NULL
            FROM {_recordset(_OUTCOME_COLUMNS, "c")}
            WHERE j.id = c.id AND j.owner = c.owner AND j.token = c.token
            AND (j.status = 'running' OR (j.status = c.status
                AND j.result_json IS NOT DISTINCT FROM c.result
                AND j.error IS NOT DISTINCT FROM c.error))
            RETURNING j.id, j.owner, j.token"""
        hand_back = f"""UPDATE {s}.jobs j SET
            status = CASE WHEN j.cancel_requested THEN 'cancelled' ELSE 'pending' END,
            owner = CASE WHEN j.cancel_requested THEN j.owner END,
            started_at = CASE WHEN j.cancel_requested THEN j.started_at END,
            finished_at = CASE WHEN j.cancel_requested THEN {_NOW} END,
            lease_until = NULL, seq = nextval('{s}.seq'), {{changes}}
            FROM {{source}} WHERE {held}
            RETURNING j.id, j.status,
                pg_notify(%s, CASE WHEN j.cancel_requested THEN 'done' ELSE 'work' END)
                IS NULL"""
        self.retry = hand_back.format(
            changes="run_at = %s, error = %s",
            source="(SELECT %s::text AS id, %s::text AS owner, %s::int8 AS token) AS c",
        )
        self.release = hand_back.format(
            changes="attempts = j.attempts - 1",
            source=_recordset(_HELD_COLUMNS, "c"),
        )
        self.adopt = f"""UPDATE {s}.jobs j SET lease_until = {_NOW} + %(lease)s
            WHERE j.id IN (
                SELECT id FROM {s}.jobs WHERE owner = %(owner)s AND status = 'running'
                AND queue = ANY(%(queues)s::text[]) AND NOT (id = ANY(%(handed)s::text[]))
                ORDER BY due, seq LIMIT %(limit)s FOR UPDATE SKIP LOCKED
            )
            RETURNING {", ".join(f"j.{n}" for n in _FIELDS)}"""
        self.progress = f"""UPDATE {s}.jobs SET progress_done = %s, progress_total = %s,
            progress_message = %s
            WHERE id = %s AND owner = %s AND token = %s AND status = 'running'"""
        self.get_many = f"SELECT {_COLUMNS} FROM {s}.jobs WHERE id = ANY(%s::text[])"
        self.stats = f"SELECT queue, status, count(*) FROM {s}.jobs GROUP BY queue, status"
        self.cancel = f"""WITH target AS (
                SELECT id, status, cancel_requested FROM {s}.jobs WHERE id = %(id)s FOR UPDATE
            ),
            changed AS (
                UPDATE {s}.jobs j SET
                status = CASE WHEN t.status = 'pending' THEN 'cancelled' ELSE j.status END,
                finished_at = CASE WHEN t.status = 'pending' THEN {_NOW} ELSE j.finished_at END,
                cancel_requested = j.cancel_requested OR t.status = 'running'
                FROM target t WHERE j.id = t.id AND t.status IN ('pending', 'running')
                RETURNING j.id, pg_notify(%(channel)s, CASE WHEN t.status = 'running'
                    THEN 'cancel:' || j.id ELSE 'done' END) IS NULL
            )
            SELECT status, (SELECT count(*) FROM changed) FROM target"""
        self.expire = f"DELETE FROM {s}.jobs WHERE status IN {_FINAL} AND finished_at < %s"
        self.acquire = f"""INSERT INTO {s}.leases AS l (name, owner, epoch, expires_at)
            VALUES (%(name)s, %(owner)s, 1, {_NOW} + %(ttl)s)
            ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, epoch = l.epoch + 1,
                expires_at = excluded.expires_at
            WHERE l.owner IS NULL OR l.expires_at <= {_NOW}
            RETURNING owner, epoch, expires_at"""
        self.lease_row = f"SELECT owner, epoch, expires_at FROM {s}.leases WHERE name = %s"
        self.renew_lease = f"""UPDATE {s}.leases SET expires_at = {_NOW} + %s
            WHERE name = %s AND owner = %s AND epoch = %s AND expires_at > {_NOW}
            RETURNING expires_at"""
        self.release_lease = f"""WITH old AS (
                SELECT name, expires_at FROM {s}.leases
                WHERE name = %s AND owner = %s AND epoch = %s FOR UPDATE
            )
            UPDATE {s}.leases l SET owner = NULL, expires_at = NULL FROM old
            WHERE l.name = old.name RETURNING coalesce(old.expires_at > {_NOW}, false)"""
        # FOR SHARE holds off a takeover (an UPDATE of the lease row) until
        # this commits: the slot is taken under an epoch that was current.
        self.claim_slot = f"""WITH held AS (
                SELECT slot_floor FROM {s}.leases
                WHERE name = %(name)s AND owner = %(owner)s AND epoch = %(epoch)s
                AND expires_at > {_NOW} FOR SHARE
            )
            INSERT INTO {s}.slots (name, slot, epoch)
            SELECT %(name)s, %(slot)s, %(epoch)s FROM held
            WHERE held.slot_floor IS NULL OR %(slot)s > held.slot_floor
            ON CONFLICT DO NOTHING RETURNING slot"""
        self.fold_slots = f"""WITH floor AS (
                SELECT slot FROM {s}.slots WHERE name = %(name)s
                ORDER BY slot DESC LIMIT 1 OFFSET %(keep)s
            ),
            raised AS (
                UPDATE {s}.leases SET slot_floor = greatest(coalesce(slot_floor, floor.slot),
                    floor.slot)
                FROM floor WHERE name = %(name)s RETURNING 1
            )
            DELETE FROM {s}.slots USING floor
            WHERE name = %(name)s AND {s}.slots.slot <= floor.slot"""
        self.count_slots = f"SELECT count(*) FROM {s}.slots WHERE name = %s"
        self.anchor = f"""WITH stored AS (
                INSERT INTO {s}.anchors (name, at) VALUES (%(name)s, %(at)s)
                ON CONFLICT DO NOTHING RETURNING at
            )
            SELECT at FROM stored UNION ALL SELECT at FROM {s}.anchors WHERE name = %(name)s"""
        # The beat, and the forgetting of nodes silent for long (never this one).
        self.heartbeat = f"""WITH gone AS (
                DELETE FROM {s}.nodes WHERE last_seen < {_NOW} - %(forget)s AND id <> %(id)s
            )
            INSERT INTO {s}.nodes AS n (id, host, pid, started_at, last_seen, running, lag)
            VALUES (%(id)s, %(host)s, %(pid)s, %(started)s, {_NOW}, %(running)s, %(lag)s)
            ON CONFLICT (id) DO UPDATE SET last_seen = excluded.last_seen,
                running = excluded.running, lag = excluded.lag"""
        self.forget_node = f"DELETE FROM {s}.nodes WHERE id = %s"
        self.leases = f"SELECT name, owner, epoch, expires_at FROM {s}.leases ORDER BY name"
        self.nodes = f"""SELECT id, host, pid, started_at, last_seen, running, lag
            FROM {s}.nodes ORDER BY last_seen DESC, id"""


def _record(row: Sequence[Any]) -> JobRecord:
    return JobRecord(**dict(zip(_FIELDS, row[: len(_FIELDS)], strict=True)))


def _records_json(records: Sequence[JobRecord]) -> str:
    # The records as one parameter of the insert: a batch is one statement.
    return _json_rows(_FIELDS, ([getattr(r, name) for name in _FIELDS] for r in records))


def _claims_json(claims: Iterable[Claim]) -> str:
    return _json_rows(("id", "owner", "token"), ((c.id, c.owner, c.token) for c in claims))


def _taken(records: Sequence[JobRecord], take: Take | None) -> tuple[Sequence[JobRecord], float]:
    # The records an enqueue stores claimed (``take``) as running, and their
    # lease (0 when none is taken): the server puts their start and deadline.
    if take is None:
        return records, 0.0
    return [
        r.replace(status="running", owner=take.owner, token=1, attempts=1)
        if r.id in take.ids
        else r
        for r in records
    ], take.lease


def _first_stored(records: Sequence[JobRecord], stored: set[str]) -> dict[str, JobRecord]:
    # The record stored for each id: the first of the batch with it.
    first: dict[str, JobRecord] = {}
    for record in records:
        if record.id in stored:
            first.setdefault(record.id, record)
    return first


def _missing(records: Sequence[JobRecord], stored: set[str]) -> list[JobRecord]:
    # The records an insert did not store: each gets what is there instead.
    first = _first_stored(records, stored)
    return [r for r in records if first.get(r.id) is not r]


def _answer(
    records: Sequence[JobRecord], stored: set[str], known: Sequence[JobRecord]
) -> list[JobRecord | None]:
    """Each record that was stored is itself; each other one gets the stored
    record with its id, or the active one with its key (an earlier record of
    the same batch included)."""
    first = _first_stored(records, stored)
    keys: dict[str, JobRecord] = {}
    for record in first.values():
        if record.key is not None:
            keys.setdefault(record.key, record)
    by_id = {r.id: r for r in known}
    by_key = {r.key: r for r in known if r.key is not None and not r.final}
    answer: list[JobRecord | None] = []
    for record in records:
        if first.get(record.id) is record:
            answer.append(record)
            continue
        found = first.get(record.id) or by_id.get(record.id)
        if found is None and record.key is not None:
            found = keys.get(record.key) or by_key.get(record.key)
        if found is None:  # pragma: no cover - only the id and the key are unique
            raise BackendError(f"the insert of {record.id!r} conflicted with nothing known")
        answer.append(found)
    return answer


def _dbapi_cursor(connection: object) -> Any:
    """A DB-API cursor on the caller's connection: psycopg's own, or the one
    under a SQLAlchemy ``Session`` or ``Connection``."""
    if isinstance(connection, psycopg.AsyncConnection):
        raise TypeError(
            "using(connection=...) got a psycopg AsyncConnection: await task.using(...)"
            ".submit_async(...) with it"
        )
    if isinstance(connection, psycopg.Connection):
        return connection.cursor()
    target: Any = connection
    if callable(getattr(target, "connection", None)) and hasattr(target, "commit"):
        target = target.connection()  # a SQLAlchemy Session: its Connection
    proxied = getattr(target, "connection", None)
    if proxied is not None and hasattr(target, "exec_driver_sql"):
        return proxied.cursor()  # a SQLAlchemy Connection: the DB-API connection under it
    raise TypeError(
        f"using(connection=...) takes a psycopg Connection, or a SQLAlchemy Session or "
        f"Connection on the backend's database, not {type(connection).__name__}"
    )


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0] if "\n" in text else text


def _broken(exc: BaseException) -> bool:
    # The connection broke under the statement (a server restart, a dropped
    # link), as against the statement being refused by a live server.
    return isinstance(exc, psycopg.OperationalError) and not isinstance(
        exc, psycopg.errors.QueryCanceled
    )


class PostgresBackend(Wakeups, Backend):
    """Job state in schema ``schema`` of a PostgreSQL database (see the module).

    :param conninfo: what psycopg connects with (a URL or a libpq string).
    :param schema: the schema holding the tables (made by :meth:`migrate`).
    :param options: the pool size and the timeouts.
    """

    scheme = "postgresql"
    durable = True
    wakes_other_processes = True

    def __init__(
        self,
        conninfo: str,
        *,
        schema: str = "asyncbg",
        options: BackendOptions | None = None,
        shown: str | None = None,
    ) -> None:
        if not _SCHEMA_NAME.match(schema):
            raise ConfigError(
                f"the PostgreSQL schema name {schema!r} is not usable: lower-case letters, "
                f"digits and _, starting with a letter or _, at most 48 characters"
            )
        self.conninfo = conninfo
        self.schema = schema
        self.options = options or BackendOptions()
        self._shown = shown or _redact(conninfo)
        self._sql = _Statements(schema)
        self._pool: Any = None
        # Blocking connections for submits from other threads (views): made
        # on the first one, closed after a while unused (see thread_pool_size).
        self._thread_pool: Any = None
        self._thread_lock = threading.Lock()
        self._threads_writing = 0
        self._last_submit, self._last_submitter = -math.inf, 0
        self._own_pids: set[int] = set()
        Wakeups.__init__(self)
        self._listener: asyncio.Task[None] | None = None
        # Claims handed out and not ended (id -> token); the lanes where a claim
        # may have committed unseen; how many claims are in flight.
        self._handed: dict[str, int] = {}
        self._in_doubt: set[str] = set()
        self._claiming = 0
        # Slots claimed per schedule since the last look at their number.
        self._slots_claimed: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<PostgresBackend {self._shown} schema={self.schema}>"

    # -- connections -------------------------------------------------------------

    @property
    def thread_pool_size(self) -> int:
        """The blocking connections submits from other threads write on: one,
        for one thread at a time (several at once share the loop's group
        commit). Each process therefore holds up to ``pool + 2`` connections
        (the pool, this one, the listener)."""
        return 1

    def _connect_kwargs(self) -> dict[str, Any]:
        timeout_ms = int(self.options.statement_timeout * 1000)
        return {
            "autocommit": True,
            "connect_timeout": max(1, round(self.options.connect_timeout)),
            "options": f"-c statement_timeout={timeout_ms}",
            "application_name": "asyncbg",
            # A server behind a partition answers nothing, not even a reset:
            # keepalives find an idle connection dead within ~10 s (the
            # listener's included), and tcp_user_timeout bounds how long sent
            # data may go unacknowledged on a busy one.
            "keepalives": 1,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 3,
            "tcp_user_timeout": int(self._answer_within * 1000),
        }

    @property
    def _answer_within(self) -> float:
        # The longest an operation waits for the server (the connection, then
        # the statement), after which it fails rather than hangs.
        return self.options.connect_timeout + self.options.statement_timeout + 1.0

    async def _configure(self, conn: Any) -> None:
        # Every pooled connection's server pid: notifications they send are ours.
        self._own_pids.add(conn.info.backend_pid)

    def _configure_blocking(self, conn: Any) -> None:
        self._own_pids.add(conn.info.backend_pid)

    async def open(self) -> None:
        """Open the pool and the listening connection, within the connect timeout.

        :raises BackendError: when the server cannot be reached in time (the
            message says where and why).
        """
        self._open_wakeups()
        pool = psycopg_pool.AsyncConnectionPool(
            self.conninfo,
            min_size=1,
            max_size=max(1, self.options.pool_size),
            kwargs=self._connect_kwargs(),
            configure=self._configure,
            open=False,
            name=f"asyncbg-{self.schema}",
            timeout=self.options.connect_timeout,
            reconnect_timeout=max(self.options.connect_timeout, 60.0),
        )
        try:
            await pool.open(wait=True, timeout=self.options.connect_timeout)
        except Exception as exc:
            await pool.close(timeout=0)
            raise BackendError(
                f"cannot reach PostgreSQL at {self._shown} within "
                f"{self.options.connect_timeout:g} s (ASYNCBG_CONNECT_TIMEOUT): "
                f"{await self._why_not(exc)}"
            ) from None
        self._pool = pool
        # No connection until a thread submits; one idle a minute is closed.
        self._thread_pool = psycopg_pool.ConnectionPool(
            self.conninfo,
            min_size=0,
            max_size=self.thread_pool_size,
            kwargs=self._connect_kwargs(),
            configure=self._configure_blocking,
            open=False,
            name=f"asyncbg-{self.schema}-threads",
            timeout=self.options.connect_timeout,
            max_idle=60.0,
            reconnect_timeout=max(self.options.connect_timeout, 60.0),
        )
        self._thread_pool.open(wait=False)
        ready = asyncio.get_running_loop().create_future()
        self._listener = asyncio.get_running_loop().create_task(
            self._listen(ready), name="asyncbg:postgresql:listen"
        )
        with contextlib.suppress(TimeoutError):
            # The first LISTEN is waited for (bounded): a submit right after
            # start in another process should find this one listening.
            async with asyncio.timeout(self.options.connect_timeout):
                await asyncio.shield(ready)

    async def _why_not(self, exc: BaseException) -> str:
        # The pool's timeout says little; one direct attempt says why.
        try:
            conn = await psycopg.AsyncConnection.connect(self.conninfo, **self._connect_kwargs())
        except Exception as direct:
            return _describe(direct)
        await conn.close()
        return _describe(exc)

    async def close(self) -> None:
        """Stop listening and close the pool (its connections end at once)."""
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
            self._listener = None
        if self._thread_pool is not None:
            # Blocking: its connections close and its worker threads are joined
            # (each waits on a queue, so at once), off the loop.
            thread_pool, self._thread_pool = self._thread_pool, None
            await asyncio.to_thread(thread_pool.close, 5.0)
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close(timeout=5.0)

    async def _run(
        self, what: str, fn: Callable[[Any], Awaitable[T]], *, repeatable: bool = True
    ) -> T:
        """Run ``fn(conn)`` on a pooled connection; once more on a fresh one if
        the connection broke and ``repeatable``.

        :raises BackendError: for any database error, saying what failed.
        """
        if self._pool is None:
            raise BackendError(f"the PostgreSQL backend on {self._shown} is not open")
        for attempt in (1, 2):
            try:
                async with asyncio.timeout(self._answer_within), self._pool.connection() as conn:
                    return await fn(conn)
            except TimeoutError:
                raise BackendError(
                    f"PostgreSQL at {self._shown}: {what} got no answer within "
                    f"{self._answer_within:g} s (the server or the network is away)"
                ) from None
            except psycopg_pool.PoolTimeout as exc:
                raise self._no_connection(what, exc) from None
            except psycopg.Error as exc:
                if attempt == 1 and repeatable and _broken(exc):
                    continue
                raise BackendError(
                    f"PostgreSQL at {self._shown}: {what} failed: {_describe(exc)}"
                ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _no_connection(self, what: str, exc: BaseException) -> BackendError:
        return BackendError(
            f"PostgreSQL at {self._shown}: {what} found no connection within "
            f"{self.options.connect_timeout:g} s (the server is down or every pooled "
            f"connection is busy): {_describe(exc)}"
        )

    async def _rows(
        self, what: str, sql: str, params: Any = None, *, repeatable: bool = True
    ) -> list[tuple[Any, ...]]:
        async def fetch(conn: Any) -> list[tuple[Any, ...]]:
            cursor = await conn.execute(sql, params)
            return list(await cursor.fetchall()) if cursor.description else []

        return await self._run(what, fetch, repeatable=repeatable)

    # -- schema --------------------------------------------------------------------

    async def migrate(self) -> None:
        """Create or upgrade the schema, under a transaction advisory lock so
        that hosts starting at once take turns; idempotent.

        :raises BackendError: when the database refuses (no right to create
            the schema, or it was written by a newer asyncbg).
        """
        s = self._sql.schema

        async def migrate(conn: Any) -> None:
            async with conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext(%s))", (f"asyncbg:{self.schema}",)
                )
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {s}.version "
                    f"(version int4 NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                cursor = await conn.execute(f"SELECT max(version) FROM {s}.version")
                row = await cursor.fetchone()
                version = row[0] if row and row[0] is not None else 0
                if version > SCHEMA_VERSION:
                    raise BackendError(
                        f"the asyncbg schema {self.schema!r} at {self._shown} is at version "
                        f"{version}, newer than this asyncbg's {SCHEMA_VERSION}: upgrade asyncbg"
                    )
                if version == 0:
                    await conn.execute(f"CREATE SEQUENCE IF NOT EXISTS {s}.seq")
                    for statement in _SCHEMA.format(s=s).split(";"):
                        await conn.execute(statement)
                    await conn.execute(f"INSERT INTO {s}.version (version) VALUES (1)")
                    version = 1
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in _UPGRADES[step].format(s=s).split(";"):
                        await conn.execute(statement)
                    await conn.execute(f"INSERT INTO {s}.version (version) VALUES (%s)", (step,))

        await self._run("the migration", migrate)

    async def preflight(self) -> list[str]:
        """Check the connection budget: the nodes heard from lately, each with
        up to ``pool + 2`` connections (the pool, the blocking one of submits
        from threads, the listener), against
        ``max_connections`` less the reserved ones.

        :raises BackendError: when the server cannot be asked.
        """
        s = self._sql.schema
        rows = await self._rows(
            "the preflight",
            f"""SELECT current_setting('max_connections')::int,
                current_setting('superuser_reserved_connections')::int,
                (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'),
                (SELECT count(*) FROM {s}.nodes WHERE last_seen > {_NOW} - %s)""",
            (self.options.lease * 2,),
        )
        most, reserved, used, nodes = rows[0]
        per_process = self.options.pool_size + self.thread_pool_size + 1
        processes = nodes + 1
        budget = most - reserved
        if processes * per_process > budget:
            return [
                f"PostgreSQL connection budget: {processes} processes (the {nodes} heard from "
                f"in the last {self.options.lease * 2:g} s and this one) x (pool "
                f"{self.options.pool_size} + {self.thread_pool_size} for submits from "
                f"a thread + 1 listener) = {processes * per_process} "
                f"connections at most, over max_connections {most} - "
                f"{reserved} reserved = {budget} ({used} in use now): lower "
                f"ASYNCBG_POOL_SIZE, or raise max_connections, or put a pooler in front"
            ]
        return []

    # -- wake-ups -------------------------------------------------------------------

    async def _listen(self, ready: asyncio.Future[None]) -> None:
        delay = _LISTEN_RETRY_FIRST
        first = True
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.conninfo, **self._connect_kwargs()
                )
            except Exception as exc:
                log.warning(
                    "cannot listen for wake-ups on PostgreSQL at %s (%s); polling "
                    "meanwhile, trying again in %.2g s",
                    self._shown,
                    _describe(exc),
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(2 * delay, _LISTEN_RETRY_MAX)
                continue
            try:
                async with conn:
                    await conn.execute(f'LISTEN "{self._sql.channel}"')
                    if not ready.done():
                        ready.set_result(None)
                    if not first:  # what was sent while away is lost: look now
                        log.info("listening on PostgreSQL at %s again", self._shown)
                        self._new_work()
                    first = False
                    delay = _LISTEN_RETRY_FIRST
                    async for notify in conn.notifies():
                        self._notified(notify.pid, notify.payload)
            except psycopg.Error as exc:
                log.warning(
                    "the PostgreSQL wake-up connection to %s broke (%s); reconnecting",
                    self._shown,
                    _describe(exc),
                )
                await asyncio.sleep(delay)
                delay = min(2 * delay, _LISTEN_RETRY_MAX)

    def _notified(self, pid: int, payload: str) -> None:
        if payload == "done":
            self._done()
            return
        if payload.startswith("cancel:"):
            self._cancel_asked(payload.removeprefix("cancel:"))
            return
        if pid not in self._own_pids:
            self._new_work()

    # -- jobs and queue items ---------------------------------------------------------

    async def enqueue(
        self,
        records: Sequence[JobRecord],
        *,
        limits: Mapping[str, int] | None = None,
        take: Take | None = None,
    ) -> list[JobRecord | None]:
        """Store ``records`` in one statement (one transaction with ``limits``);
        return the stored record for each.

        A record whose id is already stored, or whose ``key`` belongs to a
        pending or running job, is not stored: the existing record is
        returned, so an enqueue repeated after a lost acknowledgement makes no
        second job. A record of a queue in ``limits`` is refused (None) when
        that queue already has its limit of pending records, counted under a
        transaction advisory lock of the queue (so two hosts cannot both take
        the last place).

        :raises ValueError: when a record is not ``pending`` (nothing is stored).
        :raises BackendError: for a database error (nothing is stored).
        """
        require_pending(records)
        if not records:
            return []
        records, lease = _taken(records, take)
        bounded = {q: n for q, n in (limits or {}).items() if any(r.queue == q for r in records)}
        try:
            if bounded:
                stored = await self._run(
                    "an enqueue", lambda conn: self._enqueue_bounded(conn, records, bounded, lease)
                )
            else:
                stored = await self._run(
                    "an enqueue", lambda conn: self._enqueue_free(conn, records, lease)
                )
        except BackendError as exc:
            self._enqueue_in_doubt(exc, records, take)
            raise
        return self._took(stored, take)

    def _took(self, stored: list[JobRecord | None], take: Take | None) -> list[JobRecord | None]:
        # The jobs an enqueue stored claimed (``take``) are handed out as a
        # claim's are: an adoption (see _adopt) must not hand them out again.
        if take is not None:
            for r in take.stored(stored):
                self._handed[r.id] = r.token
        return stored

    def _enqueue_in_doubt(
        self, exc: BackendError, records: Sequence[JobRecord], take: Take | None
    ) -> None:
        # An enqueue that took jobs and broke with its answer lost may have
        # committed them running as ours, unknown to the engine: the next
        # claim of their queues adopts them rather than leave them to a lease.
        cause = exc.__cause__
        if take is not None and isinstance(cause, psycopg.Error) and _broken(cause):
            self._in_doubt.update([r.queue for r in records if r.id in take.ids])

    def enqueue_from_thread(
        self,
        records: Sequence[JobRecord],
        *,
        limits: Mapping[str, int] | None = None,
        take: Take | None = None,
    ) -> concurrent.futures.Future[list[JobRecord | None]] | None:
        """As :meth:`enqueue`, run in the calling thread (a view's) on a
        blocking connection of the backend's own (see :attr:`thread_pool_size`):
        the returned future is already resolved. It skips the two hops through
        the loop and psycopg's asyncio wait per statement: a one-job submit
        from a thread is one round trip. None (the loop's group commit then
        takes it) for a bounded queue (``limits``), whose count needs a
        transaction of several statements, and while another thread writes or
        has just submitted (within 50 ms): the submits of several threads then
        share one statement there, one commit for all, rather than taking one
        each.

        :raises ValueError: when a record is not ``pending`` (nothing is stored).
        :raises BackendError: if the backend is not open.
        """
        require_pending(records)
        pool = self._thread_pool
        if pool is None:
            raise BackendError(f"the PostgreSQL backend on {self._shown} is not open")
        if limits and any(r.queue in limits for r in records):
            return None
        now, me = time.monotonic(), threading.get_ident()
        with self._thread_lock:
            # Another thread writing, or one that submitted a moment ago: the
            # submits of several threads share the loop's next statement (one
            # commit for all) rather than each taking one of its own.
            crowded = self._threads_writing >= self.thread_pool_size or (
                self._last_submitter != me and now - self._last_submit < _CROWDED_WITHIN
            )
            self._last_submit, self._last_submitter = now, me
            if crowded:
                return None
            self._threads_writing += 1
        done: concurrent.futures.Future[list[JobRecord | None]] = concurrent.futures.Future()
        taking, lease = _taken(records, take)
        try:
            done.set_result(self._took(self._insert_blocking(pool, taking, lease), take))
        except BackendError as exc:
            self._enqueue_in_doubt(exc, taking, take)
            done.set_exception(exc)
        finally:
            with self._thread_lock:
                self._threads_writing -= 1
        return done

    def _insert_blocking(
        self, pool: Any, records: Sequence[JobRecord], lease: float
    ) -> list[JobRecord | None]:
        # The enqueue's statements on a blocking connection, in this thread;
        # once more on a fresh one if the connection broke (keyed by the id).
        if not records:
            return []
        params = self._insert_params(records, lease)
        for attempt in (1, 2):
            try:
                with pool.connection(timeout=self.options.connect_timeout) as conn:
                    stored = {row[0] for row in conn.execute(self._sql.insert, params)}
                    missing = _missing(records, stored)
                    known = []
                    if missing:
                        cursor = conn.execute(self._sql.existing, self._existing_params(missing))
                        known = [_record(row) for row in cursor]
                return _answer(records, stored, known)
            except psycopg_pool.PoolTimeout as exc:
                raise self._no_connection("an enqueue", exc) from None
            except psycopg.Error as exc:
                if attempt == 1 and _broken(exc):
                    continue
                raise BackendError(
                    f"PostgreSQL at {self._shown}: an enqueue failed: {_describe(exc)}"
                ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _insert_params(self, records: Sequence[JobRecord], lease: float = 0.0) -> tuple[Any, ...]:
        return (lease, _records_json(records), self._sql.channel)

    def _existing_params(self, records: Sequence[JobRecord]) -> tuple[Any, ...]:
        return ([r.id for r in records], [r.key for r in records if r.key is not None])

    async def _insert(
        self, conn: Any, records: Sequence[JobRecord], lease: float = 0.0
    ) -> set[str]:
        cursor = await conn.execute(self._sql.insert, self._insert_params(records, lease))
        return {row[0] for row in await cursor.fetchall()}

    async def _existing(self, conn: Any, records: Sequence[JobRecord]) -> list[JobRecord]:
        cursor = await conn.execute(self._sql.existing, self._existing_params(records))
        return [_record(row) for row in await cursor.fetchall()]

    async def _enqueue_free(
        self, conn: Any, records: Sequence[JobRecord], lease: float = 0.0
    ) -> list[JobRecord | None]:
        stored = await self._insert(conn, records, lease)
        missing = _missing(records, stored)
        known = await self._existing(conn, missing) if missing else []
        return list(_answer(records, stored, known))

    def enqueue_in(self, connection: object, records: Sequence[JobRecord]) -> list[JobRecord]:
        """Write ``records`` in the caller's open transaction on ``connection``,
        in the caller's thread, without committing: a psycopg ``Connection``,
        a SQLAlchemy ``Session`` (Flask-SQLAlchemy's ``db.session``) or
        ``Connection`` on this database (psycopg or psycopg2 underneath). The
        ``work`` notification is sent at the caller's commit, as PostgreSQL
        delivers notifications; a rollback leaves no job and wakes nobody.
        The tables are this backend's schema, whatever the connection's
        ``search_path``.

        :raises TypeError: for another kind of connection (an async one: use
            ``submit_async``), naming what is accepted.
        :raises ValueError: when a record is not ``pending``.
        :raises BackendError: for a database error (the caller's transaction
            is then aborted: the caller rolls it back).
        """
        require_pending(records)
        cursor = _dbapi_cursor(connection)
        try:
            cursor.execute(self._sql.insert, self._insert_params(records))
            stored = {row[0] for row in cursor.fetchall()}
            missing = _missing(records, stored)
            known: list[JobRecord] = []
            if missing:
                cursor.execute(self._sql.existing, self._existing_params(missing))
                known = [_record(row) for row in cursor.fetchall()]
        except Exception as exc:
            if type(exc).__module__.partition(".")[0] not in ("psycopg", "psycopg2"):
                raise
            raise BackendError(
                f"PostgreSQL: writing the job in your transaction failed: {_describe(exc)}"
            ) from exc
        finally:
            cursor.close()
        return [r for r in _answer(records, stored, known) if r is not None]

    async def enqueue_in_async(
        self, connection: object, records: Sequence[JobRecord]
    ) -> list[JobRecord]:
        """As :meth:`enqueue_in`, on a psycopg ``AsyncConnection`` in the
        caller's transaction (on any event loop); any other connection goes to
        :meth:`enqueue_in` as it is.

        :raises TypeError: for a connection :meth:`enqueue_in` does not take either.
        :raises ValueError: when a record is not ``pending``.
        :raises BackendError: for a database error.
        """
        if not isinstance(connection, psycopg.AsyncConnection):
            return self.enqueue_in(connection, records)  # a sync one: as a plain submit
        require_pending(records)
        try:
            stored = await self._insert(connection, records)
            missing = _missing(records, stored)
            known = await self._existing(connection, missing) if missing else []
        except psycopg.Error as exc:
            raise BackendError(
                f"PostgreSQL: writing the job in your transaction failed: {_describe(exc)}"
            ) from exc
        return [r for r in _answer(records, stored, known) if r is not None]

    async def _enqueue_bounded(
        self,
        conn: Any,
        records: Sequence[JobRecord],
        limits: Mapping[str, int],
        lease: float = 0.0,
    ) -> list[JobRecord | None]:
        async with conn.transaction():
            for queue_name in sorted(limits):  # one order: no deadlock between hosts
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext(%s))",
                    (f"asyncbg:{self.schema}:queue:{queue_name}",),
                )
            known = await self._existing(conn, records)
            by_id = {r.id: r for r in known}
            by_key = {r.key: r for r in known if r.key is not None and not r.final}
            pending: dict[str, int] = {}
            for queue_name, limit in limits.items():
                cursor = await conn.execute(self._sql.count_pending, (queue_name, max(limit, 0)))
                row = await cursor.fetchone()
                pending[queue_name] = int(row[0])
            chosen: list[JobRecord] = []
            taken_ids: set[str] = set()
            taken_keys: set[str] = set()
            refused: set[int] = set()
            for i, record in enumerate(records):
                repeat = (
                    record.id in by_id
                    or record.id in taken_ids
                    or (
                        record.key is not None
                        and (record.key in by_key or record.key in taken_keys)
                    )
                )
                bound = limits.get(record.queue)
                if not repeat and bound is not None and pending[record.queue] >= bound:
                    refused.add(i)
                    continue
                if not repeat:
                    chosen.append(record)
                    taken_ids.add(record.id)
                    if record.key is not None:
                        taken_keys.add(record.key)
                    if bound is not None:
                        pending[record.queue] += 1
            stored = await self._insert(conn, chosen, lease) if chosen else set()
            kept = [r for i, r in enumerate(records) if i not in refused]
            missing = _missing(kept, stored)
            known += await self._existing(conn, missing) if missing else []
            answers = iter(_answer(kept, stored, known))
            return [None if i in refused else next(answers) for i in range(len(records))]

    async def claim(
        self, queues: Sequence[str], owner: str, limit: int, lease: float
    ) -> list[Claim]:
        """Take up to ``limit`` due records of ``queues`` for ``owner`` in one
        statement, oldest first (``FOR UPDATE SKIP LOCKED``: claimers on other
        hosts take other rows), each running with a lease of ``lease`` seconds
        on the server's clock, a token one higher and one more attempt. Lost
        jobs out of attempts are failed in the same statement.

        :raises BackendError: for a database error (nothing is claimed).
        """
        lanes = list(dict.fromkeys(queues))
        if limit <= 0 or not lanes:
            return []
        params = {"queues": lanes, "owner": owner, "limit": limit, "lease": lease}
        alone = not self._claiming
        self._claiming += 1
        try:
            if alone and self._in_doubt.intersection(lanes):
                adopted = await self._adopt(params)
                if adopted:
                    return adopted
            try:
                rows = await self._rows("a claim", self._sql.claim, params, repeatable=False)
            except BackendError as exc:
                if isinstance(exc.__cause__, psycopg.Error) and _broken(exc.__cause__):
                    # It may have committed with its answer lost: those rows
                    # are ours and running, unknown to the caller (see _adopt).
                    self._in_doubt.update(lanes)
                raise
        finally:
            self._claiming -= 1
        n = len(_FIELDS)
        # One row at least, which carries the count of lost jobs failed.
        if rows and rows[0][n + 2]:
            self._done()
        taken = sorted((row for row in rows if row[0] is not None), key=lambda r: (r[n], r[n + 1]))
        return self._hand_out(owner, map(_record, taken))

    def _hand_out(self, owner: str, records: Iterable[JobRecord]) -> list[Claim]:
        claims = [Claim(r.id, owner, r.token, r) for r in records]
        self._handed.update((c.id, c.token) for c in claims)
        return claims

    def _ended(self, claims: Iterable[Claim]) -> None:
        for claim in claims:
            if self._handed.get(claim.id) == claim.token:
                del self._handed[claim.id]

    async def _adopt(self, params: dict[str, Any]) -> list[Claim]:
        """Claims of this owner running in the store that were never handed out:
        a claim whose commit landed and whose answer was lost (the connection
        broke under it) made them. They are handed out now, their leases
        renewed, instead of waiting for those to run out. Only while no other
        claim is in flight (whose rows would look the same)."""
        rows = await self._rows(
            "an adoption of claims in doubt",
            self._sql.adopt,
            {**params, "handed": list(self._handed)},
        )
        if len(rows) < params["limit"]:
            self._in_doubt.difference_update(params["queues"])
        if rows:
            log.info(
                "%d claim(s) whose answer was lost with the connection taken up again",
                len(rows),
            )
        return self._hand_out(params["owner"], map(_record, rows))

    async def renew(self, claims: Sequence[Claim], lease: float) -> RenewResult:
        """Extend to ``lease`` seconds from the server's now every claim still
        held (same owner and token, still running), in one statement.

        :raises BackendError: for a database error.
        """
        if not claims:
            return RenewResult()
        rows = await self._rows(
            "a renewal",
            self._sql.renew,
            (lease, _claims_json(claims)),
        )
        # By (id, owner, token): a stale claim and the fresh one of a job differ.
        kept = {(job_id, owner, token): requested for job_id, owner, token, requested in rows}
        held = [(c, (c.id, c.owner, c.token) in kept) for c in claims]
        self._ended(c for c, ok in held if not ok)
        return RenewResult(
            tuple(c.id for c, ok in held if ok),
            tuple(c.id for c, ok in held if not ok),
            tuple(c.id for c, ok in held if ok and kept[(c.id, c.owner, c.token)]),
        )

    async def finish(self, claim: Claim, outcome: Outcome) -> bool:
        """Record the final outcome; False (nothing written) for a stale claim.

        :raises BackendError: for a database error.
        """
        return (await self.finish_many([(claim, outcome)]))[0]

    async def finish_many(self, outcomes: Sequence[tuple[Claim, Outcome]]) -> list[bool]:
        """Record many outcomes in one statement; for each, False for a stale claim.

        :raises BackendError: for a database error (nothing is written).
        """
        if not outcomes:
            return []
        rows = await self._rows(
            "a finish",
            self._sql.finish,
            (
                _json_rows(
                    [name for name, _ in _OUTCOME_COLUMNS],
                    (
                        (c.id, c.owner, c.token, o.status, o.result_json, _pg_text(o.error))
                        for c, o in outcomes
                    ),
                ),
            ),
        )
        done = {(job_id, owner, token) for job_id, owner, token in rows}
        if done:
            self._done()
        self._ended(c for c, _ in outcomes)
        return [(c.id, c.owner, c.token) in done for c, _ in outcomes]

    async def retry(self, claim: Claim, run_at: float, error: str | None) -> bool:
        """Queue the job again for ``run_at`` with ``error`` stored (it ends
        cancelled instead when a cancel was requested); False for a stale claim.

        :raises BackendError: for a database error.
        """
        rows = await self._rows(
            "a retry",
            self._sql.retry,
            (run_at, _pg_text(error), claim.id, claim.owner, claim.token, self._sql.channel),
            repeatable=False,
        )
        self._ended([claim])
        if rows and rows[0][1] == "cancelled":
            self._done()
        return bool(rows)

    async def release(self, claims: Sequence[Claim]) -> int:
        """Queue held claims again at once, their attempt not counted (a job
        whose cancel was requested ends cancelled); return how many were held.

        :raises BackendError: for a database error (nothing is released).
        """
        if not claims:
            return 0
        rows = await self._rows(
            "a release",
            self._sql.release,
            (_claims_json(claims), self._sql.channel),
            repeatable=False,
        )
        self._ended(claims)
        if any(row[1] == "cancelled" for row in rows):
            self._done()
        return len(rows)

    async def progress(
        self, claim: Claim, done: float, total: float | None, message: str | None
    ) -> bool:
        """Record progress; False for a stale claim.

        :raises BackendError: for a database error.
        """

        async def progress(conn: Any) -> bool:
            cursor = await conn.execute(
                self._sql.progress,
                (done, total, _pg_text(message), claim.id, claim.owner, claim.token),
            )
            return bool(cursor.rowcount == 1)

        return await self._run("a progress write", progress)

    async def get(self, job_id: str) -> JobRecord | None:
        """Return the record, or None when unknown or expired.

        :raises BackendError: for a database error.
        """
        records = await self._get_many([job_id])
        return records[0] if records else None

    async def _get_many(self, ids: Sequence[str]) -> list[JobRecord]:
        unique = list(dict.fromkeys(ids))
        rows = await self._rows("a read", self._sql.get_many, (unique,))
        found = {r.id: r for r in map(_record, rows)}
        return [found[i] for i in ids if i in found]

    async def query(self, query: JobQuery) -> JobPage:
        """Return one page of matching records, newest first (by ``created_at``,
        then the later enqueued), and the count of all matches, in one statement.

        :raises BackendError: for a database error.
        """
        where: list[str] = []
        params: list[Any] = []
        if query.statuses is not None:
            where.append("status = ANY(%s::text[])")
            params.append(sorted(query.statuses))
        if query.task is not None:
            where.append("task = %s")
            params.append(query.task)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        s = self._sql.schema
        rows = await self._rows(
            "a query",
            f"""SELECT {_COLUMNS}, count(*) OVER () FROM {s}.jobs {clause}
            ORDER BY created_at DESC, seq DESC LIMIT %s OFFSET %s""",
            (*params, max(0, query.limit), max(0, query.offset)),
        )
        if rows:
            return JobPage(tuple(map(_record, rows)), int(rows[0][-1]))
        count = await self._rows("a query", f"SELECT count(*) FROM {s}.jobs {clause}", params)
        return JobPage((), int(count[0][0]))

    async def stats(self) -> dict[str, dict[str, int]]:
        """Return counts per queue and status: ``{queue: {status: n}}`` (no zeros).

        :raises BackendError: for a database error.
        """
        counts: dict[str, dict[str, int]] = {}
        for queue_name, status, n in await self._rows("the stats", self._sql.stats):
            counts.setdefault(queue_name, {})[status] = int(n)
        return counts

    async def cancel(self, job_id: str) -> str:
        """Cancel a job in one statement; return a
        :class:`~asyncbg.engine.records.CancelResult` value.

        A pending job becomes cancelled at once and never starts (a claim
        cannot take it meanwhile: its row is locked); a running one gets
        ``cancel_requested`` and its owner a ``cancel:<id>`` notification.

        :raises BackendError: for a database error.
        """
        rows = await self._rows(
            "a cancel", self._sql.cancel, {"id": job_id, "channel": self._sql.channel}
        )
        result = cancel_result(rows[0][0] if rows else None)
        if result == CancelResult.CANCELLED:
            self._done()
        return result

    async def wait(self, job_ids: Sequence[str], timeout: float) -> list[JobRecord]:
        """Return once every known job of ``job_ids`` is final or ``timeout``
        seconds passed: the records known then (unknown ids left out).

        Polls (5 ms, doubling to 100 ms); a finish by this object, or a
        ``done`` notification (a job cancelled by any process), wakes it at
        once. Finishes send no notification: one per finished batch, to
        every host, cost more than the polls of the few who wait.

        :raises BackendError: for a database error.
        """
        ids = list(job_ids)
        return await poll_until_final(lambda: self._get_many(ids), timeout, lambda: self._finished)

    async def expire(self, finished_before: float) -> int:
        """Forget final records finished before ``finished_before``; return how many.

        :raises BackendError: for a database error.
        """

        async def expire(conn: Any) -> int:
            cursor = await conn.execute(self._sql.expire, (finished_before,))
            return int(cursor.rowcount)

        return await self._run("an expiry", expire)

    # -- periodic leadership ----------------------------------------------------------

    async def acquire(self, name: str, owner: str, ttl: float) -> Lease | None:
        """Take the lease of schedule ``name`` for ``ttl`` seconds of the
        server's clock with a new epoch when nobody holds it live; the owner of
        the live lease gets it back unchanged; None while another owner holds it.

        :raises BackendError: for a database error.
        """
        rows = await self._rows(
            "a lease acquire", self._sql.acquire, {"name": name, "owner": owner, "ttl": ttl}
        )
        if rows:
            return Lease(name, rows[0][0], int(rows[0][1]), float(rows[0][2]))
        rows = await self._rows("a lease read", self._sql.lease_row, (name,))
        if rows and rows[0][0] == owner and rows[0][2] is not None:
            held = Lease(name, owner, int(rows[0][1]), float(rows[0][2]))
            if held.expires_at > await self._now():
                return held
        return None

    async def _now(self) -> float:
        return float((await self._rows("a clock read", f"SELECT {_NOW}"))[0][0])

    async def renew_lease(self, lease: Lease, ttl: float) -> Lease | None:
        """Extend a live lease to ``ttl`` seconds from the server's now; None
        when it ran out (even if nobody took it since), was released or taken.

        :raises BackendError: for a database error.
        """
        rows = await self._rows(
            "a lease renewal",
            self._sql.renew_lease,
            (ttl, lease.name, lease.owner, lease.epoch),
        )
        return dataclasses.replace(lease, expires_at=float(rows[0][0])) if rows else None

    async def release_lease(self, lease: Lease) -> bool:
        """Give a lease up; False when it was no longer held live. The epoch is
        kept, so the next holder's is higher.

        :raises BackendError: for a database error.
        """
        rows = await self._rows(
            "a lease release", self._sql.release_lease, (lease.name, lease.owner, lease.epoch)
        )
        return bool(rows and rows[0][0])

    async def claim_slot(self, lease: Lease, slot: int) -> bool:
        """Claim tick ``slot`` of the lease's schedule: True at most once per
        (schedule, slot), and only while ``lease`` is the live current epoch
        (a unique row; the lease row is share-locked meanwhile).

        :raises BackendError: for a database error.
        """
        params = {"name": lease.name, "owner": lease.owner, "epoch": lease.epoch, "slot": slot}
        rows = await self._rows("a slot claim", self._sql.claim_slot, params)
        if not rows:
            return False
        # Every 1024 slots this object claimed of a schedule (the leader claims
        # them all), those past the 1024 newest fold into the lease's floor once
        # over 2048 are stored, as the other backends do after every claim:
        # the table stays under 3 x 1024 rows per schedule.
        claimed = self._slots_claimed.get(lease.name, 0) + 1
        self._slots_claimed[lease.name] = claimed % _SLOT_MEMORY
        if claimed >= _SLOT_MEMORY:
            count = await self._rows("a slot count", self._sql.count_slots, (lease.name,))
            if count[0][0] > 2 * _SLOT_MEMORY:
                await self._rows(
                    "a slot fold", self._sql.fold_slots, {"name": lease.name, "keep": _SLOT_MEMORY}
                )
        return True

    async def anchor(self, name: str, proposed: float) -> float:
        """Return the stored anchor of schedule ``name``, storing ``proposed``
        when there is none yet.

        :raises BackendError: for a database error.
        """
        rows = await self._rows("an anchor", self._sql.anchor, {"name": name, "at": proposed})
        return float(rows[0][0])

    # -- nodes ------------------------------------------------------------------------

    async def heartbeat(self, node: NodeRecord, *, forget_after: float = NODE_FORGET_AFTER) -> None:
        """Store ``node`` with ``last_seen`` set to the server's now, and forget
        the other nodes not heard from for ``forget_after`` seconds.

        :raises BackendError: for a database error.
        """
        await self._rows(
            "a heartbeat",
            self._sql.heartbeat,
            {
                "id": node.id,
                "host": node.host,
                "pid": node.pid,
                "started": node.started_at,
                "running": node.running,
                "lag": node.lag,
                "forget": forget_after,
            },
        )

    async def forget_node(self, node_id: str) -> None:
        """Delete the row of node ``node_id`` (at its graceful stop); nothing
        when it is not there.

        :raises BackendError: for a database error.
        """
        await self._rows("a node's goodbye", self._sql.forget_node, (node_id,))

    async def leases(self) -> list[LeaseState]:
        """Return every schedule's lease row, by name: a released one with no
        owner and no expiry (its epoch kept), a lapsed one as stored.

        :raises BackendError: for a database error.
        """
        rows = await self._rows("a lease list", self._sql.leases)
        return [LeaseState(name, owner, int(epoch), at) for name, owner, epoch, at in rows]

    async def nodes(self) -> list[NodeRecord]:
        """Return every node that sent a heartbeat, newest heartbeat first.

        :raises BackendError: for a database error.
        """
        return [NodeRecord(*row) for row in await self._rows("a node list", self._sql.nodes)]


def from_url(
    url: str, instance_path: str, options: BackendOptions | None = None
) -> PostgresBackend:
    """Return a new :class:`PostgresBackend` for ``postgresql://…`` (or
    ``postgres://…``, or ``postgresql+psycopg://…`` as SQLAlchemy writes it),
    with the option ``schema=<name>`` (``asyncbg`` by default); the other
    query options go to libpq as they are.

    :raises ConfigError: for a URL with no host or database, a repeated
        option, or an unusable schema name.
    """
    del instance_path
    shown = _redact(url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower().partition("+")[0]
    if scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"ASYNCBG_BACKEND {shown!r}: not a postgresql:// URL")
    pairs = url_options(parts.query, shown)
    schema = "asyncbg"
    rest = []
    for name, value in pairs:
        if name == "schema":
            schema = value
        else:
            rest.append((name, value))
    if not parts.path.strip("/") and not any(n == "dbname" for n, _ in rest):
        raise ConfigError(
            f"ASYNCBG_BACKEND {shown!r}: name the database, as in "
            f"'postgresql://user@host:5432/mydb'"
        )
    conninfo = urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(rest), ""))
    return PostgresBackend(conninfo, schema=schema, options=options, shown=_redact(conninfo))

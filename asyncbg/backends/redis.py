"""The Redis backend: job state in keys of one prefix on a Redis server,
shared by every process of every host that opens the same server and prefix.

``redis://[user:password@]host:port/db`` (``rediss://`` for TLS), with the URL
options ``prefix`` (``asyncbg`` by default: several apps can share a server),
``preflight`` (``refuse``, the default, or ``warn``), ``wait_replicas`` and
``wait_timeout`` (see below). The pool size and the timeouts are config keys
(``ASYNCBG_POOL_SIZE``, ``ASYNCBG_STATEMENT_TIMEOUT``,
``ASYNCBG_CONNECT_TIMEOUT``). It needs the ``redis`` extra (redis-py's
``redis.asyncio``; install ``hiredis`` too for faster replies).

How it runs:

- One connection pool per backend object, opened on asyncbg's loop at start
  (a clear :class:`~asyncbg.errors.BackendError` within the connect timeout
  when the server cannot be reached) and closed in the lifecycle's async
  phase; one more connection listens for wake-ups (pub/sub); and a blocking
  pool of the same size, made at open and closed with it, on which a submit
  from another thread (a view's) runs its enqueue script in that thread.
- Every state change is one Lua script (:mod:`asyncbg.backends._redis_lua`
  lists the keys), atomic on the server and checked against the owner and the
  token of the claim. Each is safe to send twice: enqueue is keyed by the
  client-made id and the key, a claim by a request id whose answer is kept
  for a minute, a finish or a hand-back that already landed is recognised as
  its own. A command whose connection broke is therefore sent once more.
- Queues are Streams with a consumer group: a claim moves the due jobs of a
  queue from its sorted set (by due time, on the server's ``TIME``) into the
  stream and reads them through the group in the same script, so the group's
  pending entries list is the set of jobs claimed, each under the node
  holding it (one taken by its own enqueue never enters the stream);
  a renewal is ``XCLAIM … JUSTID`` to the holder itself; completion is a
  script that checks the owner and the token before it acknowledges the entry
  (a plain ``XACK`` names no consumer). Leases are deadlines on the server's
  clock in a sorted set per queue; a claim takes lapsed ones with a higher
  token, or fails them when out of attempts.
- Wake-ups ride pub/sub: ``work`` when an enqueue, retry or release made work
  claimable, ``cancel`` (the job id) when a cancel was asked for a running
  job, ``done`` when a cancel ended a job. Own messages are ignored; after a
  reconnect the listener reports new work once; the engine polls anyway.
- Periodic leadership is a lock key per schedule (``SET NX PX`` of the owner
  and an ``INCR`` epoch; compare-and-extend and compare-and-delete in Lua) and
  a sorted set of claimed slots (``ZADD NX``), so a slot runs at most once
  while the primary lives. Across a failover to a replica the epoch can go
  back (the replica may not have the last ``INCR``): ``wait_replicas=N`` makes
  every lease and slot write wait (``WAIT``, at most ``wait_timeout`` s) for
  N replicas, and treats one they did not all confirm as not won.
- Final records expire with the engine's history age (``expire``), and their
  hashes carry a TTL an hour longer, so a store nobody serves stays bounded.

Where Redis is weaker than PostgreSQL: an acknowledged write survives a crash
of the server only with ``appendonly yes`` (``appendfsync everysec`` loses up
to a second of writes on a power cut, not on a kill of the process) and only
while nothing evicts keys (``maxmemory-policy noeviction``): the preflight
refuses a server without them (``preflight=warn`` logs instead). Replication
is asynchronous: a failover can lose acknowledged writes unless
``wait_replicas`` is set. There is no transactional submit (``using(connection=)``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit, urlunsplit

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
from ..errors import BackendError, ConfigError
from . import _redact
from . import _redis_lua as lua
from .base import (
    NODE_FORGET_AFTER,
    Backend,
    BackendOptions,
    Wakeups,
    cancel_result,
    lost_lease_error,
    poll_until_final,
    require_driver,
    require_pending,
    url_options,
)

redis_sync: Any = require_driver("redis", "redis")
redis_asyncio: Any = require_driver("redis.asyncio", "redis")
redis_exceptions: Any = require_driver("redis.exceptions", "redis")
redis_retry: Any = require_driver("redis.retry", "redis")
redis_backoff: Any = require_driver("redis.backoff", "redis")

__all__ = ["RedisBackend", "from_url"]

T = TypeVar("T")

log = logging.getLogger("asyncbg")

#: The layout of keys this module writes; ``migrate`` refuses a newer one.
SCHEMA_VERSION = 1

_PREFIX = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_FIELD_TYPES: dict[str, type] = {
    f.name: (
        str
        if "str" in str(f.type)
        else bool
        if "bool" in str(f.type)
        else int
        if "int" in str(f.type)
        else float
    )
    for f in dataclasses.fields(JobRecord)
}
_NODE_FIELDS = ("host", "pid", "started_at", "last_seen", "running", "lag")
# A final record's hash lives this much longer than the history age (expire
# normally forgets it first; this bounds a store no process serves).
_FINAL_TTL_EXTRA = 3600.0
# Slot numbers remembered per schedule before the oldest fold into a floor (as memory).
_SLOT_MEMORY = 1024
# Final records expire() forgets per script call (the server is single-threaded).
_EXPIRE_BATCH = 1000
# The listener's reconnect backoff, and how long it may hear nothing before it pings.
_LISTEN_RETRY_FIRST, _LISTEN_RETRY_MAX = 0.05, 2.0
_LISTEN_IDLE = 5.0
# The text a job out of attempts gets when its lease ran out, as every backend writes it.
_SPENT = (
    lost_lease_error("OWNER", 111, 222)
    .replace("OWNER", "%s")
    .replace("111", "%s")
    .replace("222", "%s")
)
_EVICTING = re.compile(r"^(allkeys|volatile)-")


def _encode(record: JobRecord) -> dict[str, str]:
    # The record's fields as text (None left out: a missing field is None).
    out: dict[str, str] = {}
    for name in _FIELD_TYPES:
        value = getattr(record, name)
        if value is None:
            continue
        if isinstance(value, bool):
            out[name] = "1" if value else "0"
        elif isinstance(value, float):
            out[name] = repr(value)
        else:
            out[name] = str(value)
    return out


def _decode(flat: Sequence[Any]) -> JobRecord:
    # A job's hash, as HGETALL answers inside a script (a flat list), to a record.
    raw = dict(zip(flat[::2], flat[1::2], strict=True))
    values: dict[str, Any] = {}
    for name, kind in _FIELD_TYPES.items():
        text = raw.get(name)
        if text is None:
            continue
        if kind is bool:
            values[name] = text == "1"
        elif kind is int:
            values[name] = int(text)
        elif kind is float:
            values[name] = float(text)
        else:
            values[name] = text
    return JobRecord(**values)


async def _aclose(closable: Any) -> None:
    # redis-py 5.0.1 named it aclose(); close() before that.
    await (closable.aclose() if hasattr(closable, "aclose") else closable.close())


def _broken(exc: BaseException) -> bool:
    # The connection broke before a reply (sent again: every script may be),
    # as against a reply that is late (a timeout) or an error the server sent.
    return isinstance(exc, redis_exceptions.ConnectionError) and not isinstance(
        exc, redis_exceptions.TimeoutError
    )


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0] if "\n" in text else text


def _enqueued(
    records: Sequence[JobRecord], answers: Sequence[Any], take: Take | None
) -> list[JobRecord | None]:
    # The ENQUEUE script's answer per record: stored as given, stored taken
    # (as given, running for ``take``'s owner from the server's times),
    # refused, or the stored one (taken by this enqueue sent before, or
    # another job's under the id or key).
    out: list[JobRecord | None] = []
    for record, answer in zip(records, answers, strict=True):
        code = answer[0]
        if code == "S":
            out.append(record)
        elif code == "t" and take is not None:
            out.append(
                record.replace(
                    status="running",
                    owner=take.owner,
                    token=1,
                    attempts=1,
                    started_at=float(answer[1]),
                    lease_until=float(answer[2]),
                )
            )
        elif code == "R":
            out.append(None)
        else:
            out.append(_decode(answer[1]))
    return out


class RedisBackend(Wakeups, Backend):
    """Job state under key prefix ``prefix`` of a Redis server (see the module).

    :param url: what redis-py connects with (``redis://`` or ``rediss://``).
    :param prefix: the name in the hash tag every key starts with.
    :param options: the pool size and the timeouts.
    :param preflight: ``"refuse"`` (raise at start) or ``"warn"`` (log) when
        the server's settings lose acknowledged work.
    :param wait_replicas: replicas every lease and slot write waits for (0: none).
    :param wait_timeout: seconds such a wait lasts at most.
    """

    scheme = "redis"
    durable = True
    wakes_other_processes = True

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "asyncbg",
        options: BackendOptions | None = None,
        preflight: str = "refuse",
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
        shown: str | None = None,
    ) -> None:
        if not _PREFIX.match(prefix):
            raise ConfigError(
                f"the Redis key prefix {prefix!r} is not usable: 1 to 64 letters, digits, "
                f"'_', '.' or '-'"
            )
        if preflight not in ("refuse", "warn"):
            raise ConfigError(f"the Redis preflight is 'refuse' or 'warn', not {preflight!r}")
        if wait_replicas < 0 or wait_timeout <= 0:
            raise ConfigError(
                f"wait_replicas must be 0 or more and wait_timeout above 0, not "
                f"{wait_replicas!r} and {wait_timeout!r}"
            )
        self.url = url
        self.prefix = prefix
        self.options = options or BackendOptions()
        self.preflight_mode = preflight
        self.wait_replicas = wait_replicas
        self.wait_timeout = wait_timeout
        self._shown = shown or _redact(url)
        self._tag = "{" + prefix + "}:"
        self._sender = uuid.uuid4().hex
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        # The same scripts on a blocking client, for submits from other threads.
        self._sync_client: Any = None
        self._sync_enqueue: Any = None
        Wakeups.__init__(self)
        self._listener: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<RedisBackend {self._shown} prefix={self.prefix}>"

    @property
    def _final_ttl(self) -> float:
        return self.options.history_age + _FINAL_TTL_EXTRA

    @property
    def _answer_within(self) -> float:
        # The longest an operation waits (a connection, then the reply; once
        # more after a broken connection), after which it fails rather than hangs.
        return 2 * (self.options.connect_timeout + self.options.statement_timeout) + 1.0

    # -- connections -------------------------------------------------------------

    def _client_kwargs(self) -> dict[str, Any]:
        return {
            "decode_responses": True,
            "socket_connect_timeout": self.options.connect_timeout,
            "socket_timeout": self.options.statement_timeout,
            "socket_keepalive": True,
            "health_check_interval": 0,
            # This module sends again what is safe to send again, once.
            "retry": redis_retry.Retry(redis_backoff.NoBackoff(), 0),
            "client_name": "asyncbg",
        }

    async def open(self) -> None:
        """Connect (one PING within the connect timeout) and start listening.

        :raises BackendError: when the server cannot be reached in time (the
            message says where and why).
        """
        self._open_wakeups()
        pool = redis_asyncio.BlockingConnectionPool.from_url(
            self.url,
            max_connections=max(1, self.options.pool_size),
            timeout=self.options.connect_timeout,
            **self._client_kwargs(),
        )
        client = redis_asyncio.Redis(connection_pool=pool)
        try:
            async with asyncio.timeout(self.options.connect_timeout + 1.0):
                await client.ping()
        except Exception as exc:
            await _aclose(client)
            await pool.disconnect()
            reason = "no answer" if isinstance(exc, TimeoutError) else _describe(exc)
            raise BackendError(
                f"cannot reach Redis at {self._shown} within "
                f"{self.options.connect_timeout:g} s (ASYNCBG_CONNECT_TIMEOUT): {reason}"
            ) from None
        self._client = client
        self._sync_client = redis_sync.Redis(
            connection_pool=redis_sync.BlockingConnectionPool.from_url(
                self.url,
                max_connections=max(1, self.options.pool_size),
                timeout=self.options.connect_timeout,
                **self._client_kwargs(),
            )
        )
        self._sync_enqueue = self._sync_client.register_script(lua.ENQUEUE)
        self._scripts = {name: client.register_script(getattr(lua, name)) for name in lua.__all__}
        ready = asyncio.get_running_loop().create_future()
        self._listener = asyncio.get_running_loop().create_task(
            self._listen(ready), name="asyncbg:redis:listen"
        )
        with contextlib.suppress(TimeoutError):
            # The first SUBSCRIBE is waited for (bounded): a submit right after
            # start in another process should find this one listening.
            async with asyncio.timeout(self.options.connect_timeout):
                await asyncio.shield(ready)

    async def close(self) -> None:
        """Stop listening and close the pool."""
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
            self._listener = None
        if self._sync_client is not None:
            sync, self._sync_client = self._sync_client, None
            with contextlib.suppress(Exception):
                sync.connection_pool.disconnect()
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(Exception):
                await _aclose(client)
            with contextlib.suppress(Exception):
                await client.connection_pool.disconnect()

    async def _run(self, what: str, call: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``call(client)``; once more if the connection broke (every
        operation here is safe to repeat).

        :raises BackendError: for any Redis error, saying what failed.
        """
        if self._client is None:
            raise BackendError(f"the Redis backend on {self._shown} is not open")
        for attempt in (1, 2):
            try:
                async with asyncio.timeout(self._answer_within / 2):
                    return await call(self._client)
            except TimeoutError:
                raise BackendError(
                    f"Redis at {self._shown}: {what} got no answer within "
                    f"{self._answer_within / 2:g} s (the server or the network is away)"
                ) from None
            except redis_exceptions.RedisError as exc:
                if attempt == 1 and _broken(exc):
                    continue
                raise self._failed(what, exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _failed(self, what: str, exc: BaseException) -> BackendError:
        return BackendError(f"Redis at {self._shown}: {what} failed: {_describe(exc)}")

    async def _script(self, what: str, name: str, *args: Any) -> Any:
        script = self._scripts[name]
        return await self._run(what, lambda client: script(keys=[self._tag], args=list(args)))

    async def _replicated(self, what: str, name: str, *args: Any) -> tuple[Any, bool]:
        """Run a lease or slot script, then (with ``wait_replicas``) ``WAIT`` on
        the same connection; return its answer and whether enough replicas
        confirmed it."""
        if not self.wait_replicas:
            return await self._script(what, name, *args), True
        script = self._scripts[name]

        async def both(client: Any) -> tuple[Any, bool]:
            async with client.pipeline(transaction=False) as pipe:
                await script(keys=[self._tag], args=list(args), client=pipe)
                pipe.execute_command("WAIT", self.wait_replicas, int(self.wait_timeout * 1000))
                answer, acked = await pipe.execute()
            return answer, int(acked) >= self.wait_replicas

        answer, enough = await self._run(what, both)
        if not enough:
            log.warning(
                "Redis at %s: %s was not confirmed by %d replica(s) within %g s "
                "(wait_replicas): treated as not won",
                self._shown,
                what,
                self.wait_replicas,
                self.wait_timeout,
            )
        return answer, enough

    # -- schema and preflight -----------------------------------------------------

    async def migrate(self) -> None:
        """Record the key layout's version (nothing else to create: keys are
        made as they are written); idempotent.

        :raises BackendError: when the keys were written by a newer asyncbg.
        """

        async def migrate(client: Any) -> int:
            key = self._tag + "version"
            await client.set(key, SCHEMA_VERSION, nx=True)
            return int(await client.get(key))

        version = await self._run("the migration", migrate)
        if version > SCHEMA_VERSION:
            raise BackendError(
                f"the asyncbg keys {self._tag}* at {self._shown} are at version {version}, "
                f"newer than this asyncbg's {SCHEMA_VERSION}: upgrade asyncbg"
            )

    async def preflight(self) -> list[str]:
        """Check the settings that decide whether acknowledged work survives:
        ``appendonly`` (without it a restart of the server loses every job),
        ``maxmemory-policy`` (one that evicts drops jobs, or results, when
        memory runs out) and ``appendfsync``.

        :raises BackendError: with ``preflight=refuse`` (the default), for
            ``appendonly no`` or an evicting policy, saying what each loses.
        """

        async def read(client: Any) -> dict[str, str]:
            found: dict[str, str] = {}
            for name in ("appendonly", "maxmemory-policy", "appendfsync"):
                found.update(await client.config_get(name))
            return found

        try:
            settings = await self._run("the preflight", read)
        except BackendError as exc:
            if isinstance(exc.__cause__, redis_exceptions.ResponseError):
                return [
                    f"Redis at {self._shown}: cannot read its settings ({exc.__cause__}); "
                    f"make sure appendonly is yes and maxmemory-policy is noeviction, or "
                    f"acknowledged jobs can be lost"
                ]
            raise
        losses: list[str] = []
        if settings.get("appendonly") != "yes":
            losses.append(
                "appendonly is no: a restart or crash of the server loses every queued "
                "and running job (set appendonly yes)"
            )
        policy = settings.get("maxmemory-policy", "")
        if _EVICTING.match(policy):
            what = (
                "queued and running jobs"
                if policy.startswith("allkeys-")
                else "finished jobs' results before their time"
            )
            losses.append(
                f"maxmemory-policy is {policy}: when memory runs out Redis evicts "
                f"keys, losing {what} (set maxmemory-policy noeviction)"
            )
        warnings: list[str] = []
        if settings.get("appendfsync") == "no" and settings.get("appendonly") == "yes":
            warnings.append(
                f"Redis at {self._shown}: appendfsync is no: a power cut of the server "
                f"can lose the last ~30 s of acknowledged jobs (appendfsync everysec "
                f"bounds it to ~1 s)"
            )
        if losses:
            text = f"Redis at {self._shown} loses acknowledged work: " + "; ".join(losses)
            if self.preflight_mode == "refuse":
                raise BackendError(text + " (or add ?preflight=warn to the URL to start anyway)")
            warnings.insert(0, text)
        return warnings

    # -- wake-ups -------------------------------------------------------------------

    async def _listen(self, ready: asyncio.Future[None]) -> None:
        delay = _LISTEN_RETRY_FIRST
        first, away = True, False
        channels = [self._tag + name for name in ("work", "cancel", "done")]
        while True:
            client = redis_asyncio.Redis.from_url(self.url, **self._client_kwargs())
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(*channels)
                if not ready.done():
                    ready.set_result(None)
                if not first:  # what was sent while away is lost: look now
                    log.info("listening on Redis at %s again", self._shown)
                    self._new_work()
                first, away = False, False
                delay = _LISTEN_RETRY_FIRST
                await self._hear(pubsub)
            except (redis_exceptions.RedisError, OSError, TimeoutError) as exc:
                # Said once per outage; the attempts after it at debug level.
                log.log(
                    logging.DEBUG if away else logging.WARNING,
                    "the Redis wake-up connection to %s broke (%s); polling meanwhile, "
                    "reconnecting in %.2g s",
                    self._shown,
                    _describe(exc),
                    delay,
                )
                away = True
                await asyncio.sleep(delay)
                delay = min(2 * delay, _LISTEN_RETRY_MAX)
            finally:
                with contextlib.suppress(Exception):
                    await _aclose(pubsub)
                with contextlib.suppress(Exception):
                    await _aclose(client)

    async def _hear(self, pubsub: Any) -> None:
        # Messages until the connection breaks; a PING after a quiet while
        # (a server behind a partition answers nothing, not even a reset).
        quiet = 0.0
        pinged = False
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if message is None:
                quiet += 1.0
                if quiet >= _LISTEN_IDLE:
                    if pinged:
                        raise TimeoutError(f"no answer to a PING within {_LISTEN_IDLE:g} s")
                    await pubsub.ping()
                    pinged, quiet = True, 0.0
                continue
            quiet, pinged = 0.0, False
            if message.get("type") != "message":
                continue
            channel = message["channel"].removeprefix(self._tag)
            data = message["data"]
            if channel == "work":
                if data != self._sender:
                    self._new_work()
            elif channel == "cancel":
                self._cancel_asked(data)
            elif channel == "done":
                self._done()

    # -- jobs and queue items ---------------------------------------------------------

    async def enqueue(
        self,
        records: Sequence[JobRecord],
        *,
        limits: Mapping[str, int] | None = None,
        take: Take | None = None,
    ) -> list[JobRecord | None]:
        """Store ``records`` in one script; return the stored record for each.

        A record whose id is already stored, or whose ``key`` belongs to a
        pending or running job, is not stored: the existing record is
        returned, so an enqueue sent again after a lost reply makes no second
        job. A record of a queue in ``limits`` is refused (None) when that
        queue already has its limit of pending records (counted in the same
        script: no two hosts can both take the last place).

        :raises ValueError: when a record is not ``pending`` (nothing is stored).
        :raises BackendError: for a Redis error (nothing is stored).
        """
        if not records:
            return []
        answers = await self._script(
            "an enqueue", "ENQUEUE", *self._enqueue_args(records, limits, take)
        )
        return _enqueued(records, answers, take)

    def _enqueue_args(
        self, records: Sequence[JobRecord], limits: Mapping[str, int] | None, take: Take | None
    ) -> list[Any]:
        require_pending(records)
        return [
            json.dumps([_encode(r) for r in records]),
            json.dumps(dict(limits or {})),
            take.owner if take is not None else "",
            repr(float(take.lease)) if take is not None else "0",
            json.dumps(sorted(take.ids)) if take is not None else "[]",
            uuid.uuid4().hex,
            self._sender,
        ]

    def enqueue_from_thread(
        self,
        records: Sequence[JobRecord],
        *,
        limits: Mapping[str, int] | None = None,
        take: Take | None = None,
    ) -> concurrent.futures.Future[list[JobRecord | None]] | None:
        """As :meth:`enqueue`, run in the calling thread (a view's) on a
        blocking client of its own pool: the returned future is already
        resolved once the script answered. It skips the two hops through the
        loop; ``take`` as for :meth:`enqueue`.

        :raises ValueError: when a record is not ``pending`` (nothing is stored).
        :raises BackendError: if the backend is not open.
        """
        client, script = self._sync_client, self._sync_enqueue
        if client is None or script is None:
            raise BackendError(f"the Redis backend on {self._shown} is not open")
        done: concurrent.futures.Future[list[JobRecord | None]] = concurrent.futures.Future()
        if not records:
            done.set_result([])
            return done
        args = self._enqueue_args(records, limits, take)
        for attempt in (1, 2):
            try:
                done.set_result(_enqueued(records, script(keys=[self._tag], args=args), take))
                return done
            except redis_exceptions.RedisError as exc:
                if attempt == 1 and _broken(exc):
                    continue
                done.set_exception(self._failed("an enqueue", exc))
                return done
        raise AssertionError("unreachable")  # pragma: no cover

    async def claim(
        self, queues: Sequence[str], owner: str, limit: int, lease: float
    ) -> list[Claim]:
        """Take up to ``limit`` due records of ``queues`` for ``owner`` in one
        script, oldest due first, each running with a lease of ``lease``
        seconds on the server's clock, a token one higher and one more
        attempt; lost jobs out of attempts are failed in the same script.

        :raises BackendError: for a Redis error (nothing is claimed).
        """
        lanes = list(dict.fromkeys(queues))
        if limit <= 0 or not lanes:
            return []
        answer = await self._script(
            "a claim",
            "CLAIM",
            owner,
            limit,
            repr(float(lease)),
            uuid.uuid4().hex,
            _SPENT,
            repr(self._final_ttl),
            *lanes,
        )
        if answer[0]:
            self._done()
        return [Claim(r.id, owner, r.token, r) for r in map(_decode, answer[1:])]

    async def renew(self, claims: Sequence[Claim], lease: float) -> RenewResult:
        """Extend to ``lease`` seconds from the server's now every claim still
        held (same owner and token, still running), in one script.

        :raises BackendError: for a Redis error.
        """
        if not claims:
            return RenewResult()
        flat: list[Any] = [repr(float(lease))]
        for c in claims:
            flat += [c.id, c.owner, str(c.token)]
        answer = await self._script("a renewal", "RENEW", *flat)
        return RenewResult(
            tuple(c.id for c, a in zip(claims, answer, strict=True) if a),
            tuple(c.id for c, a in zip(claims, answer, strict=True) if not a),
            tuple(c.id for c, a in zip(claims, answer, strict=True) if a == 2),
        )

    async def finish(self, claim: Claim, outcome: Outcome) -> bool:
        """Record the final outcome; False (nothing written) for a stale claim.

        :raises BackendError: for a Redis error.
        """
        return (await self.finish_many([(claim, outcome)]))[0]

    async def finish_many(self, outcomes: Sequence[tuple[Claim, Outcome]]) -> list[bool]:
        """Record many outcomes in one script; for each, False for a stale claim.
        A finish that already landed (the same owner, token and outcome) is its
        own: sent again after a lost reply it gets True again.

        :raises BackendError: for a Redis error.
        """
        if not outcomes:
            return []
        rows = [
            [c.id, c.owner, str(c.token), o.status, o.result_json, o.error] for c, o in outcomes
        ]
        answer = await self._script("a finish", "FINISH", repr(self._final_ttl), json.dumps(rows))
        return [bool(a) for a in answer]

    async def retry(self, claim: Claim, run_at: float, error: str | None) -> bool:
        """Queue the job again for ``run_at`` with ``error`` stored (it ends
        cancelled instead when a cancel was requested); False for a stale claim.

        :raises BackendError: for a Redis error.
        """
        answer = await self._script(
            "a retry",
            "HAND_BACK",
            repr(self._final_ttl),
            "retry",
            self._sender,
            repr(float(run_at)),
            json.dumps(error),
            claim.id,
            claim.owner,
            str(claim.token),
        )
        if answer[0] == "cancelled":
            self._done()
        return bool(answer[0])

    async def release(self, claims: Sequence[Claim]) -> int:
        """Queue held claims again at once, their attempt not counted (a job
        whose cancel was requested ends cancelled); return how many were held.

        :raises BackendError: for a Redis error (nothing is released).
        """
        if not claims:
            return 0
        flat: list[Any] = []
        for c in claims:
            flat += [c.id, c.owner, str(c.token)]
        answer = await self._script(
            "a release", "HAND_BACK", repr(self._final_ttl), "release", self._sender, *flat
        )
        if "cancelled" in answer:
            self._done()
        return sum(1 for a in answer if a)

    async def progress(
        self, claim: Claim, done: float, total: float | None, message: str | None
    ) -> bool:
        """Record progress; False for a stale claim.

        :raises BackendError: for a Redis error.
        """
        answer = await self._script(
            "a progress write",
            "PROGRESS",
            claim.id,
            claim.owner,
            str(claim.token),
            json.dumps([repr(float(done)), None if total is None else repr(float(total)), message]),
        )
        return bool(answer)

    async def get(self, job_id: str) -> JobRecord | None:
        """Return the record, or None when unknown or expired.

        :raises BackendError: for a Redis error.
        """
        records = await self._get_many([job_id])
        return records[0] if records else None

    async def _get_many(self, ids: Sequence[str]) -> list[JobRecord]:
        unique = list(dict.fromkeys(ids))

        async def read(client: Any) -> list[dict[str, str]]:
            async with client.pipeline(transaction=False) as pipe:
                for job_id in unique:
                    pipe.hgetall(self._tag + "j:" + job_id)
                return list(await pipe.execute())

        found: dict[str, JobRecord] = {}
        for job_id, raw in zip(unique, await self._run("a read", read), strict=True):
            if raw and "id" in raw:
                found[job_id] = _decode([x for pair in raw.items() for x in pair])
        return [found[i] for i in ids if i in found]

    async def query(self, query: JobQuery) -> JobPage:
        """Return one page of matching records, newest first (by ``created_at``,
        then the later enqueued), and the count of all matches, in one script.

        :raises BackendError: for a Redis error.
        """
        statuses = sorted(query.statuses) if query.statuses is not None else []
        if query.statuses is not None and not statuses:
            return JobPage((), 0)
        answer = await self._script(
            "a query",
            "QUERY",
            max(0, query.offset),
            max(0, query.limit),
            query.task if query.task is not None else "",
            *statuses,
        )
        return JobPage(tuple(map(_decode, answer[1:])), int(answer[0]))

    async def stats(self) -> dict[str, dict[str, int]]:
        """Return counts per queue and status: ``{queue: {status: n}}`` (no zeros).

        :raises BackendError: for a Redis error.
        """
        raw = await self._run("the stats", lambda client: client.hgetall(self._tag + "n"))
        counts: dict[str, dict[str, int]] = {}
        for field, n in raw.items():
            queue_name, _, status = field.rpartition("\0")
            if int(n) > 0:
                counts.setdefault(queue_name, {})[status] = int(n)
        return counts

    async def cancel(self, job_id: str) -> str:
        """Cancel a job in one script; return a
        :class:`~asyncbg.engine.records.CancelResult` value.

        A pending job becomes cancelled at once and never starts; a running
        one gets ``cancel_requested`` and its owner a ``cancel`` message.

        :raises BackendError: for a Redis error.
        """
        status = await self._script("a cancel", "CANCEL", job_id, repr(self._final_ttl))
        result = cancel_result(status or None)
        if result == CancelResult.CANCELLED:
            self._done()
        return result

    async def wait(self, job_ids: Sequence[str], timeout: float) -> list[JobRecord]:
        """Return once every known job of ``job_ids`` is final or ``timeout``
        seconds passed: the records known then (unknown ids left out).

        Polls (5 ms, doubling to 100 ms); a ``done`` message (a job ended by a
        cancel, in any process) wakes it at once. Finishes send no message:
        one per finished batch to every host would cost more than the polls
        of the few who wait.

        :raises BackendError: for a Redis error.
        """
        ids = list(job_ids)
        return await poll_until_final(lambda: self._get_many(ids), timeout, lambda: self._finished)

    async def expire(self, finished_before: float) -> int:
        """Forget final records finished before ``finished_before`` (in scripts
        of at most 1000 each); return how many.

        :raises BackendError: for a Redis error.
        """
        total = 0
        while True:
            n = int(
                await self._script(
                    "an expiry", "EXPIRE", repr(float(finished_before)), _EXPIRE_BATCH
                )
            )
            total += n
            if n < _EXPIRE_BATCH:
                return total

    # -- periodic leadership ----------------------------------------------------------

    async def acquire(self, name: str, owner: str, ttl: float) -> Lease | None:
        """Take the lease of schedule ``name`` for ``ttl`` seconds (``SET NX PX``,
        a new ``INCR`` epoch) when nobody holds it live; the owner of the live
        lease gets it back unchanged; None while another owner holds it (or,
        with ``wait_replicas``, when the replicas did not confirm it: then it is
        given up at once).

        :raises BackendError: for a Redis error.
        """
        answer, enough = await self._replicated(
            "a lease acquire", "ACQUIRE", name, owner, repr(float(ttl))
        )
        if not answer:
            return None
        lease = Lease(name, answer[0], int(answer[1]), float(answer[2]))
        if not enough:
            await self.release_lease(lease)
            return None
        return lease

    async def renew_lease(self, lease: Lease, ttl: float) -> Lease | None:
        """Extend a live lease to ``ttl`` seconds from the server's now; None
        when it ran out (even if nobody took it since), was released or taken.

        :raises BackendError: for a Redis error.
        """
        answer, enough = await self._replicated(
            "a lease renewal",
            "RENEW_LEASE",
            lease.name,
            lease.owner,
            str(lease.epoch),
            repr(float(ttl)),
        )
        if not answer or not enough:
            return None
        return dataclasses.replace(lease, expires_at=float(answer))

    async def release_lease(self, lease: Lease) -> bool:
        """Give a lease up; False when it was no longer held live. The epoch is
        kept, so the next holder's is higher.

        :raises BackendError: for a Redis error.
        """
        answer = await self._script(
            "a lease release", "RELEASE_LEASE", lease.name, lease.owner, str(lease.epoch)
        )
        return bool(answer)

    async def claim_slot(self, lease: Lease, slot: int) -> bool:
        """Claim tick ``slot`` of the lease's schedule: True at most once per
        (schedule, slot), and only while ``lease`` is the live current epoch
        (with ``wait_replicas``, only once the replicas confirmed it).

        :raises BackendError: for a Redis error.
        """
        answer, enough = await self._replicated(
            "a slot claim",
            "SLOT",
            lease.name,
            lease.owner,
            str(lease.epoch),
            str(slot),
            _SLOT_MEMORY,
        )
        return bool(answer) and enough

    async def anchor(self, name: str, proposed: float) -> float:
        """Return the stored anchor of schedule ``name``, storing ``proposed``
        when there is none yet.

        :raises BackendError: for a Redis error.
        """
        return float(await self._script("an anchor", "ANCHOR", name, repr(float(proposed))))

    async def leases(self) -> list[LeaseState]:
        """Return every schedule's lease as last written, by name: a released
        one with no owner and no expiry (its epoch kept), a lapsed one as stored.

        :raises BackendError: for a Redis error.
        """
        rows = await self._script("a lease list", "LEASES")
        return sorted(
            (
                LeaseState(name, owner or None, int(epoch), float(at) if at else None)
                for name, owner, epoch, at in rows
            ),
            key=lambda state: state.name,
        )

    # -- nodes ------------------------------------------------------------------------

    async def heartbeat(self, node: NodeRecord, *, forget_after: float = NODE_FORGET_AFTER) -> None:
        """Store ``node`` with ``last_seen`` set to the server's now, and forget
        the other nodes not heard from for ``forget_after`` seconds.

        :raises BackendError: for a Redis error.
        """
        await self._script(
            "a heartbeat",
            "HEARTBEAT",
            repr(float(forget_after)),
            node.id,
            node.host,
            node.pid,
            repr(float(node.started_at)),
            node.running,
            "" if node.lag is None else repr(float(node.lag)),
        )

    async def forget_node(self, node_id: str) -> None:
        """Delete the row of node ``node_id`` (at its graceful stop); nothing
        when it is not there.

        :raises BackendError: for a Redis error.
        """
        await self._script("a node's goodbye", "FORGET_NODE", node_id)

    async def nodes(self) -> list[NodeRecord]:
        """Return every node that sent a heartbeat, newest heartbeat first.

        :raises BackendError: for a Redis error.
        """
        beats: list[tuple[float, int, NodeRecord]] = []
        for node_id, flat in await self._script("a node list", "NODES"):
            raw = dict(zip(flat[::2], flat[1::2], strict=True))
            lag = raw.get("lag")
            node = NodeRecord(
                node_id,
                raw["host"],
                int(raw["pid"]),
                float(raw["started_at"]),
                float(raw["last_seen"]),
                int(raw["running"]),
                float(lag) if lag else None,
            )
            beats.append((node.last_seen, int(raw.get("beat", 0)), node))
        beats.sort(key=lambda b: (b[0], b[1]), reverse=True)
        return [node for _, _, node in beats]


def from_url(url: str, instance_path: str, options: BackendOptions | None = None) -> RedisBackend:
    """Return a new :class:`RedisBackend` for ``redis://…`` or ``rediss://…``,
    with the options ``prefix`` (``asyncbg`` by default), ``preflight``
    (``refuse`` or ``warn``), ``wait_replicas`` and ``wait_timeout``; other
    query options go to redis-py as they are.

    :raises ConfigError: for a URL with no host, a repeated or unreadable
        option, or an unusable prefix.
    """
    del instance_path
    shown = _redact(url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss"):
        raise ConfigError(f"ASYNCBG_BACKEND {shown!r}: not a redis:// URL")
    if not parts.hostname:
        raise ConfigError(
            f"ASYNCBG_BACKEND {shown!r}: name the server, as in 'redis://localhost:6379/0'"
        )
    pairs = url_options(parts.query, shown)
    ours = {"prefix": "asyncbg", "preflight": "refuse", "wait_replicas": "0", "wait_timeout": "1"}
    rest = []
    for name, value in pairs:
        if name in ours:
            ours[name] = value
        else:
            rest.append((name, value))
    try:
        wait_replicas = int(ours["wait_replicas"])
        wait_timeout = float(ours["wait_timeout"])
    except ValueError:
        raise ConfigError(
            f"ASYNCBG_BACKEND {shown!r}: wait_replicas is a whole number and wait_timeout "
            f"a number of seconds"
        ) from None
    plain = urlunsplit((scheme, parts.netloc, parts.path, urlencode(rest), ""))
    return RedisBackend(
        plain,
        prefix=ours["prefix"],
        options=options,
        preflight=ours["preflight"],
        wait_replicas=wait_replicas,
        wait_timeout=wait_timeout,
        shown=_redact(plain),
    )

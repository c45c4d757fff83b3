"""What only the Redis backend has: its URL, its key layout (one hash tag, a
version, streams whose pending list is the held set, TTLs on final records),
the preflight of the settings that lose acknowledged work, a server that is
down, killed or drops a connection, scripts sent twice, pub/sub wake-ups and
cancel requests between processes, and ``WAIT`` on a real replica.

Against the session's throw-away server (``redis_server``), a key prefix of
its own per test; the tests that kill, restart or misconfigure a server start
their own. The contract suite (tests/backends) and the durable tests
(tests/test_durable.py) run on Redis too; real processes on several "hosts"
are in tests/test_redis_processes.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis as redis_sync
import redis.asyncio as redis_asyncio
from redis.crc import key_slot

from asyncbg import AsyncBG, BackendError, ConfigError, current_job
from asyncbg.backends import BackendOptions, open_backend
from asyncbg.backends.redis import RedisBackend, from_url
from asyncbg.engine.records import JobQuery, JobRecord, NodeRecord, Outcome, Take
from tests.conftest import MakeApp
from tests.helpers_core import WAIT, Gate, wait_for
from tests.servers import RedisServer, free_port
from tests.wakeup_checks import (
    check_a_cancel_from_another_process_reaches_the_run_at_once,
    check_woken_by_the_channel_not_by_polling,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def url(redis_server: RedisServer, redis_prefix: str) -> str:
    return f"{redis_server.url()}?prefix={redis_prefix}"


@pytest.fixture
async def backend(redis_server: RedisServer, redis_prefix: str) -> AsyncIterator[RedisBackend]:
    made = RedisBackend(redis_server.url(), prefix=redis_prefix)
    await made.open()
    try:
        await made.migrate()
        yield made
    finally:
        await made.close()


@pytest.fixture
def raw(redis_server: RedisServer) -> Any:
    """A plain redis-py client on the session's server, to look under asyncbg."""
    client = redis_sync.Redis.from_url(redis_server.url(), decode_responses=True)
    yield client
    client.close()


def _worker(make_app: MakeApp, url: str, **config: Any) -> tuple[Any, AsyncBG]:
    config.setdefault("ASYNCBG_POLL_INTERVAL", 5.0)  # wake-ups, not polls, unless a test says
    return make_app(ASYNCBG_BACKEND=url, **config)


def _job(job_id: str, **fields: Any) -> JobRecord:
    return JobRecord(id=job_id, queue="q", task="t", **fields)


def _own_server(**settings: str) -> RedisServer:
    return RedisServer(settings=settings).start()


# -- the URL ---------------------------------------------------------------------


def test_the_url_names_the_prefix_and_the_options_and_passes_the_rest_to_redis_py() -> None:
    made = from_url(
        "redis://u:secret@cache.internal:6380/2?prefix=jobs&preflight=warn"
        "&wait_replicas=1&wait_timeout=0.5&ssl_cert_reqs=none",
        "",
    )
    assert (made.prefix, made.preflight_mode) == ("jobs", "warn")
    assert (made.wait_replicas, made.wait_timeout) == (1, 0.5)
    assert made.url == "redis://u:secret@cache.internal:6380/2?ssl_cert_reqs=none"
    assert "secret" not in repr(made)
    assert from_url("rediss://h", "").prefix == "asyncbg"
    backend = open_backend("redis://h:6379/0", "", BackendOptions(pool_size=7))
    assert isinstance(backend, RedisBackend)
    assert backend.options.pool_size == 7


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://h/0?prefix=bad{name}", "prefix"),
        ("redis://h/0?prefix=a&prefix=b", "given twice"),
        ("redis:///0", "name the server"),
        ("redis://h/0?preflight=maybe", "'refuse' or 'warn'"),
        ("redis://h/0?wait_replicas=two", "whole number"),
    ],
)
def test_an_unusable_url_is_a_config_error(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        from_url(url, "")


def test_the_config_keys_reach_the_backend(make_app: MakeApp, url: str) -> None:
    app, bg = make_app(
        ASYNCBG_BACKEND=url,
        ASYNCBG_POOL_SIZE=2,
        ASYNCBG_STATEMENT_TIMEOUT=1.5,
        ASYNCBG_CONNECT_TIMEOUT=2.0,
        ASYNCBG_JOB_HISTORY_AGE=60.0,
    )
    backend = bg.state_for(app).backend
    assert isinstance(backend, RedisBackend)
    assert backend.options == BackendOptions(
        pool_size=2, statement_timeout=1.5, connect_timeout=2.0, lease=30.0, history_age=60.0
    )


# -- the keys ----------------------------------------------------------------------


async def test_every_key_shares_one_hash_tag_so_a_cluster_slot_holds_them(
    backend: RedisBackend, raw: Any, redis_prefix: str
) -> None:
    # A bit of everything: jobs pending, running, final; a lease, a slot, an
    # anchor, a node.
    await backend.enqueue([_job(f"j{i}", key=f"k{i}") for i in range(5)])
    claims = await backend.claim(["q"], "n1", 3, 30.0)
    await backend.finish(claims[0], Outcome("succeeded", "1"))
    await backend.retry(claims[1], time.time() + 60, "again")
    await backend.cancel("j4")
    lease = await backend.acquire("tick", "n1", 10.0)
    assert lease is not None
    assert await backend.claim_slot(lease, 1)
    await backend.anchor("tick", 1.0)
    await backend.heartbeat(NodeRecord("n1", "h", 1, time.time()))
    keys = list(raw.scan_iter(match=f"*{redis_prefix}*"))
    assert len(keys) > 15
    assert all(k.startswith("{" + redis_prefix + "}:") for k in keys)
    assert {key_slot(k.encode()) for k in keys} == {key_slot(redis_prefix.encode())}


async def test_the_layout_is_versioned_and_a_newer_one_is_refused(
    backend: RedisBackend, raw: Any, redis_prefix: str
) -> None:
    await backend.enqueue([_job("kept")])
    await backend.migrate()
    assert await backend.get("kept") is not None
    assert raw.get("{" + redis_prefix + "}:version") == "1"
    raw.set("{" + redis_prefix + "}:version", "99")
    with pytest.raises(BackendError, match="version 99, newer than this asyncbg's 1"):
        await backend.migrate()


async def test_the_group_pending_list_is_the_held_set_and_a_stale_finish_acks_nothing(
    backend: RedisBackend, raw: Any, redis_prefix: str
) -> None:
    stream = "{" + redis_prefix + "}:q:q"
    await backend.enqueue([_job("j", max_attempts=3)])
    (old,) = await backend.claim(["q"], "n1", 1, 0.2)
    assert [(e["consumer"]) for e in raw.xpending_range(stream, "g", "-", "+", 10)] == ["n1"]

    async def taken() -> list[Any]:
        return await backend.claim(["q"], "n2", 1, 30.0)

    new: list[Any] = []
    deadline = time.monotonic() + WAIT
    while not new and time.monotonic() < deadline:
        new = await taken()
        await asyncio.sleep(0.02)
    assert new
    assert new[0].token == old.token + 1
    # The entry moved to n2 with XCLAIM; n1's late finish is refused and
    # acknowledges nothing (a plain XACK would have: it names no consumer).
    assert [e["consumer"] for e in raw.xpending_range(stream, "g", "-", "+", 10)] == ["n2"]
    assert not await backend.finish(old, Outcome("succeeded", "stale"))
    assert [e["consumer"] for e in raw.xpending_range(stream, "g", "-", "+", 10)] == ["n2"]
    assert await backend.finish(new[0], Outcome("succeeded", "fresh"))
    assert raw.xpending(stream, "g")["pending"] == 0
    assert raw.xlen(stream) == 0  # acknowledged and deleted: the stream stays small
    record = await backend.get("j")
    assert record is not None
    assert record.result_json == "fresh"


async def test_a_renewal_is_an_xclaim_to_itself_that_resets_the_idle_time(
    backend: RedisBackend, raw: Any, redis_prefix: str
) -> None:
    stream = "{" + redis_prefix + "}:q:q"
    await backend.enqueue([_job("j")])
    (claim,) = await backend.claim(["q"], "n1", 1, 30.0)

    def idle() -> int:
        (entry,) = raw.xpending_range(stream, "g", "-", "+", 10)
        assert entry["consumer"] == "n1"
        return int(entry["time_since_delivered"])

    wait_for(lambda: idle() >= 100, what="the entry to be idle for 100 ms")
    result = await backend.renew([claim], 30.0)
    assert result.kept == ("j",)
    assert idle() < 100


async def test_a_final_record_carries_a_ttl_past_the_history_age(
    redis_server: RedisServer, redis_prefix: str, raw: Any
) -> None:
    made = RedisBackend(
        redis_server.url(), prefix=redis_prefix, options=BackendOptions(history_age=60.0)
    )
    await made.open()
    try:
        await made.enqueue([_job("a"), _job("b")])
        claims = await made.claim(["q"], "n1", 2, 30.0)
        await made.finish(claims[0], Outcome("succeeded", "1"))
        ttl = raw.pttl("{" + redis_prefix + "}:j:" + claims[0].id)
        assert 60_000 < ttl <= (60 + 3600) * 1000
        assert raw.pttl("{" + redis_prefix + "}:j:" + claims[1].id) == -1  # running: no TTL
        # expire() forgets it (and its index entries) before the TTL would.
        assert await made.expire(time.time() + 1) == 1
        assert (await made.stats())["q"] == {"running": 1}
        page = await made.query(JobQuery())
        assert [r.id for r in page.records] == [claims[1].id]
        assert page.total == 1
    finally:
        await made.close()


# -- scripts sent twice ----------------------------------------------------------------


async def test_every_state_change_sent_again_after_a_lost_reply_is_recognised(
    backend: RedisBackend,
) -> None:
    # redis-py (or this backend) sends a command again when its reply was lost:
    # each script must answer the same and change nothing more.
    await backend.enqueue([_job("f"), _job("r"), _job("l")])
    claims = {c.id: c for c in await backend.claim(["q"], "n1", 3, 30.0)}
    outcome = Outcome("succeeded", "1")
    assert await backend.finish(claims["f"], outcome)
    assert await backend.finish(claims["f"], outcome)
    assert not await backend.finish(claims["f"], Outcome("failed", error="other"))
    assert await backend.retry(claims["r"], time.time() + 60, "later")
    assert await backend.retry(claims["r"], time.time() + 60, "later")
    assert await backend.release([claims["l"]]) == 1
    assert await backend.release([claims["l"]]) == 1
    released = await backend.get("l")
    assert released is not None
    assert (released.status, released.attempts) == ("pending", 0)
    # A claim sent again with the same request id gets the same jobs back.
    script = backend._scripts["CLAIM"]
    args = ["n2", 5, "30.0", "req-1", "%s %s %s", "60.0", "q"]
    first = await script(keys=[backend._tag], args=args)
    again = await script(keys=[backend._tag], args=args)
    assert first == again
    assert len(first) == 2
    # An enqueue that took its record, sent again, still took it (not answered
    # by idempotency as someone else's).
    take_args = [
        '[{"id":"t","queue":"q","task":"t","status":"pending","created_at":"1.0"}]',
        "{}",
        "n3",
        "30.0",
        '["t"]',
        "req-2",
        "sender",
    ]
    one = await backend._scripts["ENQUEUE"](keys=[backend._tag], args=take_args)
    two = await backend._scripts["ENQUEUE"](keys=[backend._tag], args=take_args)
    assert (one[0][0], two[0][0]) == ("t", "T")  # the first answers the server's times only


async def test_an_enqueue_that_takes_its_records_stores_them_held_outside_the_stream(
    backend: RedisBackend, raw: Any, redis_prefix: str
) -> None:
    stored = await backend.enqueue([_job("a"), _job("b")], take=Take("me", 30.0, frozenset("a")))
    assert [r.status if r else None for r in stored] == ["running", "pending"]
    # The taken record answered is the stored one (made from the server's
    # times and what was sent, not read back).
    assert stored[0] == await backend.get("a")
    (claim,) = await backend.claim(["q"], "other", 5, 30.0)
    assert claim.id == "b"
    assert raw.zcard("{" + redis_prefix + "}:l:q") == 2  # both have a lease deadline


async def test_a_submit_from_another_thread_is_stored_by_that_thread_before_it_returns(
    backend: RedisBackend,
) -> None:
    # A view's thread writes with a blocking client of its own: no hop through
    # the loop, and the future is resolved when the call returns.
    def submit(records: list[JobRecord]) -> Any:
        future = backend.enqueue_from_thread(records, limits={"q": 2})
        assert future is not None
        assert future.done()
        return future

    first = await asyncio.to_thread(submit, [_job("a"), _job("b"), _job("c")])
    assert [r.id if r else None for r in first.result()] == ["a", "b", None]  # bounded
    again = await asyncio.to_thread(submit, [_job("a")])
    assert [r.id for r in again.result() if r] == ["a"]  # idempotent on the id
    assert {c.id for c in await backend.claim(["q"], "n1", 5, 30.0)} == {"a", "b"}


async def test_a_submit_from_a_thread_to_a_server_that_is_down_fails_with_a_backend_error() -> None:
    server = _own_server()
    made = RedisBackend(server.url(), options=BackendOptions(connect_timeout=1.0))
    await made.open()
    try:
        server.kill()
        future = await asyncio.to_thread(made.enqueue_from_thread, [_job("x")])
        assert future is not None
        with pytest.raises(BackendError, match=r"Redis at .*: an enqueue failed"):
            future.result()
    finally:
        await made.close()
        server.cleanup()
    with pytest.raises(BackendError, match="not open"):
        made.enqueue_from_thread([_job("y")])


# -- the preflight ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"appendonly": "no"}, "appendonly is no: a restart or crash of the server loses"),
        ({"maxmemory-policy": "allkeys-lru"}, "maxmemory-policy is allkeys-lru"),
        ({"maxmemory-policy": "volatile-ttl"}, "losing finished jobs' results"),
    ],
)
async def test_a_server_that_loses_acknowledged_work_is_refused_or_warned_of(
    settings: dict[str, str], says: str
) -> None:
    server = _own_server(**settings)
    try:
        refusing = RedisBackend(server.url())
        await refusing.open()
        try:
            with pytest.raises(BackendError, match=says):
                await refusing.preflight()
        finally:
            await refusing.close()
        warning = RedisBackend(server.url(), preflight="warn")
        await warning.open()
        try:
            (text,) = await warning.preflight()
            assert says in text
        finally:
            await warning.close()
    finally:
        server.cleanup()


def test_an_app_on_a_server_without_aof_fails_to_start_saying_why(make_app: MakeApp) -> None:
    server = _own_server(appendonly="no")
    try:
        _app, bg = make_app(ASYNCBG_BACKEND=server.url())
        with pytest.raises(BackendError, match="appendonly is no"):
            bg.start()
    finally:
        server.cleanup()


async def test_the_preflight_passes_on_a_server_set_for_durability(backend: RedisBackend) -> None:
    assert await backend.preflight() == []


# -- a server that is down, killed or drops a connection --------------------------------


async def test_an_unreachable_server_is_a_clear_error_within_the_connect_timeout() -> None:
    port = free_port()  # nothing listens there
    made = RedisBackend(f"redis://127.0.0.1:{port}/0", options=BackendOptions(connect_timeout=1.0))
    started = time.monotonic()
    with pytest.raises(BackendError, match=rf"cannot reach Redis at .*:{port}.* within 1 s"):
        await made.open()
    assert time.monotonic() - started < 5.0


def test_an_app_whose_server_is_down_fails_to_start_with_that_error(make_app: MakeApp) -> None:
    _app, bg = make_app(
        ASYNCBG_BACKEND=f"redis://127.0.0.1:{free_port()}/0", ASYNCBG_CONNECT_TIMEOUT=0.5
    )
    with pytest.raises(BackendError, match="cannot reach Redis"):
        bg.start()


async def test_a_stopped_server_is_a_clear_error_for_each_operation_then_it_comes_back() -> None:
    server = _own_server()
    try:
        made = RedisBackend(server.url(), options=BackendOptions(connect_timeout=1.0))
        await made.open()
        try:
            await made.enqueue([_job("before")])
            server.kill()
            with pytest.raises(BackendError, match=r"Redis at .*: an enqueue failed"):
                await made.enqueue([_job("during")])
            await asyncio.to_thread(server.restart)
            stored = await made.enqueue([_job("after")])
            assert [r.id for r in stored if r] == ["after"]
            ids = {c.id for c in await made.claim(["q"], "n1", 5, 30.0)}
            assert ids == {"before", "after"}  # AOF kept what was acknowledged
        finally:
            await made.close()
    finally:
        server.cleanup()


async def test_a_dropped_connection_is_replaced_and_the_operation_goes_through(
    backend: RedisBackend, raw: Any
) -> None:
    await backend.enqueue([_job("before")])
    raw.client_kill_filter(_type="normal", skipme=True)  # every other client dropped
    stored = await backend.enqueue([_job("after")])
    assert [r.id for r in stored if r] == ["after"]
    assert {r.id for r in (await backend.claim(["q"], "n1", 5, 30.0))} == {"before", "after"}


def _kill_and_restart(server: RedisServer, done: threading.Event) -> threading.Thread:
    def run() -> None:
        server.restart(kill=True)
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_kill_9_of_the_server_under_load_loses_nothing_acknowledged(make_app: MakeApp) -> None:
    # appendonly yes, appendfsync everysec: a killed process's AOF writes are
    # in the page cache, so every acknowledged submit survives the restart.
    server = _own_server()
    try:
        _app, bg = _worker(
            make_app, server.url(), ASYNCBG_POLL_INTERVAL=0.1, ASYNCBG_CONNECT_TIMEOUT=2.0
        )
        ran: set[int] = set()

        @bg.task(name="count")
        def count(i: int) -> int:
            ran.add(i)
            return i

        bg.start()
        acknowledged: list[Any] = []
        refused = 0
        restarted = threading.Event()
        thread: threading.Thread | None = None
        deadline = time.monotonic() + 20
        i = 0
        while (i < 400 or not restarted.is_set()) and time.monotonic() < deadline:
            if i == 100:
                thread = _kill_and_restart(server, restarted)
            try:
                acknowledged.append(count.using(job_id=f"job-{i}").submit(i))
            except BackendError:
                refused += 1  # refused while the server was away: the caller knows
            i += 1
        assert thread is not None
        thread.join(30)
        assert restarted.is_set()
        for job in acknowledged:
            assert job.result(WAIT) == int(job.id.removeprefix("job-"))
        assert {int(j.id.removeprefix("job-")) for j in acknowledged} <= ran
        print(f"kill -9: {len(acknowledged)} acknowledged, {refused} refused meanwhile")
    finally:
        server.cleanup()


# -- wake-ups between processes ----------------------------------------------------------


def test_another_process_is_woken_by_pubsub_not_by_polling(make_app: MakeApp, url: str) -> None:
    check_woken_by_the_channel_not_by_polling(lambda **config: _worker(make_app, url, **config))


def test_a_cancel_from_another_process_reaches_the_running_job_at_once(
    make_app: MakeApp, url: str
) -> None:
    # Only the pub/sub message explains a cancel within a second of a 30 s lease.
    check_a_cancel_from_another_process_reaches_the_run_at_once(
        lambda **config: _worker(make_app, url, **config)
    )


def test_logging_names_the_listener_reconnect(
    make_app: MakeApp, url: str, raw: Any, caplog: Any
) -> None:
    _app, bg = _worker(make_app, url)
    bg.start()
    with caplog.at_level(logging.INFO, logger="asyncbg"):
        raw.client_kill_filter(_type="pubsub")
        wait_for(lambda: "listening on Redis" in caplog.text, timeout=WAIT, what="re-SUBSCRIBE")
    assert "the Redis wake-up connection" in caplog.text


def test_progress_and_the_token_of_a_running_job(make_app: MakeApp, url: str) -> None:
    _app, bg = _worker(make_app, url)
    seen: list[int] = []
    gate = Gate()

    @bg.task
    async def step() -> None:
        job = current_job()
        seen.append(job.token)
        job.set_progress(1, 4, "a quarter")
        await gate.wait_async()

    bg.start()
    job = step.submit()
    wait_for(lambda: seen, what="the job to start")

    def stored() -> bool:
        other = bg.get_job(job.id)
        return other is not None and other.progress is not None and other.progress.done == 1

    wait_for(stored, what="the progress in the store")
    gate.set()
    assert job.result(WAIT) is None
    assert seen == [1]


async def test_scripts_flushed_from_the_server_are_loaded_again(
    backend: RedisBackend, raw: Any
) -> None:
    await backend.enqueue([_job("a")])
    raw.script_flush()
    stored = await backend.enqueue([_job("b")])
    assert [r.id for r in stored if r] == ["b"]


async def test_claimed_slots_fold_into_the_floor_and_the_set_stays_bounded(
    backend: RedisBackend, raw: Any, redis_prefix: str
) -> None:
    lease = await backend.acquire("s", "n1", 60.0)
    assert lease is not None
    first = 1_764_000_000_123
    slots = [first + k * 500 for k in range(3200)]
    for slot in slots:
        assert await backend.claim_slot(lease, slot)
    assert 1024 <= raw.zcard("{" + redis_prefix + "}:sl:s") <= 2 * 1024 + 1
    assert not await backend.claim_slot(lease, slots[0])  # folded: below the floor
    assert not await backend.claim_slot(lease, slots[-1])
    assert await backend.claim_slot(lease, slots[-1] + 500)


# -- WAIT on a real replica ---------------------------------------------------------------


async def test_wait_replicas_confirms_lease_writes_and_refuses_what_a_paused_replica_missed() -> (
    None
):
    primary = _own_server(**{"repl-diskless-sync-delay": "0"})  # sync at once, not after 5 s
    replica = _own_server(replicaof=f"127.0.0.1 {primary.port}")
    try:
        plain = redis_asyncio.Redis.from_url(replica.url(), decode_responses=True)
        try:  # until the replica has synced and follows the primary
            deadline = time.monotonic() + WAIT
            while (await plain.info("replication"))["master_link_status"] != "up":
                assert time.monotonic() < deadline, "the replica never synced"
                await asyncio.sleep(0.02)
        finally:
            await plain.aclose()
        # "up" on the replica comes before the primary counts it for WAIT (its first
        # REPLCONF ACK): wait for the primary to see it acknowledge a write.
        first = redis_asyncio.Redis.from_url(primary.url(), decode_responses=True)
        try:
            await first.set("synced", "1")
            assert await first.execute_command("WAIT", 1, int(WAIT * 1000)) == 1
        finally:
            await first.aclose()
        made = RedisBackend(primary.url(), wait_replicas=1, wait_timeout=0.3)
        await made.open()
        try:
            lease = await made.acquire("tick", "n1", 10.0)
            assert lease is not None  # the replica confirmed the epoch
            assert await made.claim_slot(lease, 1)
            assert replica.command("GET", "{asyncbg}:le:tick") == "$1"
            os.kill(replica.pid or 0, signal.SIGSTOP)
            try:
                started = time.monotonic()
                assert not await made.claim_slot(lease, 2)  # written, not confirmed: not won
                assert await made.renew_lease(lease, 10.0) is None
                assert await made.acquire("other", "n1", 10.0) is None  # and given up
                assert time.monotonic() - started < 3.0  # each wait bounded by wait_timeout
                states = {s.name: s for s in await made.leases()}
                assert states["other"].owner is None
            finally:
                os.kill(replica.pid or 0, signal.SIGCONT)
        finally:
            await made.close()
    finally:
        replica.cleanup()
        primary.cleanup()


def test_an_app_stopped_while_the_server_is_down_ends_its_shutdown_and_says_so(
    make_app: MakeApp, caplog: Any
) -> None:
    server = _own_server()
    try:
        _app, bg = _worker(
            make_app,
            server.url(),
            ASYNCBG_CONNECT_TIMEOUT=1.0,
            ASYNCBG_STATEMENT_TIMEOUT=1.0,
            ASYNCBG_SHUTDOWN_TIMEOUT=1.0,
        )
        started = Gate()

        @bg.task
        async def hang() -> None:
            started.set()
            await asyncio.sleep(3600)

        bg.start()
        hang.submit()
        assert started.wait(WAIT)
        server.kill()
        began = time.monotonic()
        with caplog.at_level(logging.INFO, logger="asyncbg"):
            bg.stop()
        assert time.monotonic() - began < 10.0  # bounded by the timeouts, never a hang
        assert "could not release 1 job(s) at stop" in caplog.text  # its lease brings it back
        assert "1 cancelled" in caplog.text
    finally:
        server.cleanup()

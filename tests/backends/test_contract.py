"""The contract every backend passes (``conftest.BACKENDS`` lists them).

The semantics are those of :mod:`asyncbg.backends.base` and the notes of
:mod:`asyncbg.backends.memory`. These tests run against real servers too, so
time is real: leases are short and a test waits for a condition with a
bounded poll (:func:`until`), never a sleep sized by guess. Each node is an
owner string; one backend object stands for the shared store.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from asyncbg.backends.base import Backend
from asyncbg.engine.records import (
    CancelResult,
    Claim,
    JobQuery,
    JobRecord,
    Lease,
    LeaseState,
    NodeRecord,
    Outcome,
    Take,
)

# Short enough to expire within a test, long enough to outlive a round trip.
LEASE = 0.25
LONG = 30.0
WITHIN = 5.0


def job(
    job_id: str | None = None, *, queue: str = "q", task: str = "t", **fields: Any
) -> JobRecord:
    return JobRecord(id=job_id or uuid.uuid4().hex, queue=queue, task=task, **fields)


async def put(backend: Backend, records: list[JobRecord]) -> list[JobRecord]:
    """Enqueue without limits, where no slot of the result is None."""
    stored = await backend.enqueue(records)
    assert None not in stored
    return [r for r in stored if r is not None]


async def until(check: Callable[[], Awaitable[bool]], what: str, within: float = WITHIN) -> None:
    """Poll ``check`` until it is true; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within} s: {what}")
        await asyncio.sleep(0.01)


async def claim_one(backend: Backend, owner: str = "n1", lease: float = LONG) -> Claim:
    claims = await backend.claim(["q"], owner, 1, lease)
    assert len(claims) == 1
    return claims[0]


async def claim_eventually(backend: Backend, owner: str, lease: float = LONG) -> Claim:
    """Claim one record of ``q``, retrying until one is claimable."""
    got: list[Claim] = []

    async def claimed() -> bool:
        got.extend(await backend.claim(["q"], owner, 1, lease))
        return bool(got)

    await until(claimed, f"{owner} claims a record")
    return got[0]


async def acquire_eventually(backend: Backend, name: str, owner: str) -> Lease:
    """Acquire the lease of ``name``, retrying until it is free."""
    got: list[Lease] = []

    async def acquired() -> bool:
        lease = await backend.acquire(name, owner, LONG)
        got.extend([lease] if lease is not None else [])
        return bool(got)

    await until(acquired, f"{owner} acquires {name!r}")
    return got[0]


async def expired_and_reclaimed(backend: Backend, reclaimer: str = "n2") -> tuple[Claim, Claim]:
    """A claim of n1 whose lease ran out, and ``reclaimer``'s claim of the same job."""
    await backend.enqueue([job("j", max_attempts=3)])
    old = await claim_one(backend, "n1", lease=LEASE)
    new = await claim_eventually(backend, reclaimer)
    return old, new


# -- enqueue, claim, finish --------------------------------------------------


async def test_enqueue_claim_finish_round_trip(backend: Backend) -> None:
    [stored] = await put(backend, [job("a", args_json='{"args":[1],"kwargs":{}}')])
    assert (stored.id, stored.status) == ("a", "pending")

    claim = await claim_one(backend)
    assert (claim.id, claim.owner, claim.token) == ("a", "n1", 1)
    running = claim.record
    assert (running.status, running.owner, running.attempts) == ("running", "n1", 1)
    assert running.started_at is not None
    assert running.lease_until is not None
    assert running.lease_until > running.started_at
    assert running.arguments() == ([1], {})

    assert await backend.finish(claim, Outcome("succeeded", result_json='"ok"'))
    done = await backend.get("a")
    assert done is not None
    assert (done.status, done.result_json, done.error) == ("succeeded", '"ok"', None)
    assert done.finished_at is not None
    assert await backend.claim(["q"], "n1", 10, LONG) == []


async def test_an_outcome_with_odd_text_is_stored(backend: Backend) -> None:
    # An exception's message may hold anything: quotes, non-ASCII, a NUL
    # character (which PostgreSQL text cannot hold: it keeps "\x00" there).
    await put(backend, [job("odd", key='k "é"')])
    claim = await claim_one(backend)
    error = 'bad "é" \\ \x00 end'
    outcome = Outcome("failed", error=error)
    assert await backend.finish(claim, outcome)
    done = await backend.get("odd")
    assert done is not None
    assert done.status == "failed"
    assert done.error in (error, error.replace("\x00", "\\x00"))


async def test_enqueue_refuses_a_record_that_is_not_pending_and_stores_nothing(
    backend: Backend,
) -> None:
    with pytest.raises(ValueError, match="enqueue takes pending records, not 'running'"):
        await backend.enqueue([job("ok"), job("bad", status="running")])
    assert await backend.get("ok") is None


async def test_get_of_an_unknown_id_is_none(backend: Backend) -> None:
    assert await backend.get("nope") is None


async def test_enqueue_is_idempotent_by_id(backend: Backend) -> None:
    [first] = await put(backend, [job("a", task="first")])
    [again] = await put(backend, [job("a", task="second")])
    assert again == first
    assert (await backend.query(JobQuery())).total == 1


async def test_enqueue_of_a_finished_id_returns_the_final_record(backend: Backend) -> None:
    await backend.enqueue([job("a")])
    assert await backend.finish(await claim_one(backend), Outcome("failed", error="boom"))
    [again] = await put(backend, [job("a")])
    assert (again.status, again.error) == ("failed", "boom")


async def test_enqueue_is_idempotent_by_key_while_pending(backend: Backend) -> None:
    await backend.enqueue([job("a", key="k")])
    [second] = await put(backend, [job("b", key="k")])
    assert second.id == "a"
    assert await backend.get("b") is None


async def test_enqueue_is_idempotent_by_key_while_running(backend: Backend) -> None:
    await backend.enqueue([job("a", key="k")])
    await claim_one(backend)
    [second] = await put(backend, [job("b", key="k")])
    assert (second.id, second.status) == ("a", "running")


async def test_enqueue_of_one_key_twice_in_a_batch_stores_the_first(backend: Backend) -> None:
    stored = await put(backend, [job("a", key="k"), job("b", key="k"), job("c", key="other")])
    assert [r.id for r in stored] == ["a", "a", "c"]


async def test_key_is_free_again_once_the_job_is_final(backend: Backend) -> None:
    await backend.enqueue([job("a", key="k")])
    assert await backend.finish(await claim_one(backend), Outcome("succeeded", "null"))
    [second] = await put(backend, [job("b", key="k")])
    assert (second.id, second.status) == ("b", "pending")


# -- bounded queues (enqueue with limits) -------------------------------------


async def test_enqueue_refuses_a_record_at_its_queue_limit(backend: Backend) -> None:
    stored = await backend.enqueue(
        [job("a"), job("b"), job("c"), job("x", queue="free")], limits={"q": 2}
    )
    assert [None if r is None else r.id for r in stored] == ["a", "b", None, "x"]
    assert await backend.get("c") is None
    assert await backend.stats() == {"q": {"pending": 2}, "free": {"pending": 1}}
    # The limit holds across calls too.
    assert await backend.enqueue([job("d")], limits={"q": 2}) == [None]
    assert await backend.enqueue([job("e")], limits={"q": 0, "other": 1}) == [None]


async def test_records_after_a_refused_one_are_still_stored(backend: Backend) -> None:
    stored = await backend.enqueue(
        [job("a"), job("b"), job("r1", queue="r"), job("r2", queue="r")],
        limits={"q": 1, "r": 5},
    )
    assert [None if r is None else r.id for r in stored] == ["a", None, "r1", "r2"]
    assert [await backend.get(i) is not None for i in ("a", "b", "r1", "r2")] == [
        True,
        False,
        True,
        True,
    ]


async def test_a_refused_record_leaves_its_key_free(backend: Backend) -> None:
    assert await backend.enqueue([job("a", key="k")], limits={"q": 0}) == [None]
    [b] = await put(backend, [job("b", key="k")])
    assert b.id == "b"


async def test_an_idempotent_enqueue_is_never_refused(backend: Backend) -> None:
    await put(backend, [job("a"), job("b", key="k"), job("c")])
    assert await backend.finish(await claim_one(backend), Outcome("failed", error="boom"))
    # q holds two pending records (b, c): at a limit of 1 nothing new gets in,
    # but a known id (pending or final) or an active key gets its record.
    stored = await backend.enqueue(
        [job("c"), job("a"), job("other", key="k"), job("new")], limits={"q": 1}
    )
    assert [None if r is None else (r.id, r.status) for r in stored] == [
        ("c", "pending"),
        ("a", "failed"),
        ("b", "pending"),
        None,
    ]


async def test_the_limit_counts_only_pending_records(backend: Backend) -> None:
    await put(backend, [job("a"), job("b"), job("c"), job("d")])
    a, b = await backend.claim(["q"], "n1", 2, LONG)
    assert await backend.finish(a, Outcome("succeeded", "null"))
    assert await backend.cancel("c") == CancelResult.CANCELLED
    # a succeeded, b running, c cancelled: d is the only pending one.
    stored = await backend.enqueue([job("e"), job("f")], limits={"q": 2})
    assert [None if r is None else r.id for r in stored] == ["e", None]
    # A released record is pending again, and counts.
    assert await backend.release([b]) == 1
    assert await backend.enqueue([job("g")], limits={"q": 3}) == [None]


async def test_claim_takes_the_oldest_first(backend: Backend) -> None:
    await backend.enqueue([job("c", created_at=1002.0), job("a", created_at=1000.0)])
    await backend.enqueue([job("b", created_at=1001.0)])
    claims = await backend.claim(["q"], "n1", 2, LONG)
    assert [c.id for c in claims] == ["a", "b"]


async def test_claim_takes_only_from_the_named_queues_up_to_the_limit(backend: Backend) -> None:
    await backend.enqueue([job(f"{q}{i}", queue=q) for q in ("x", "y", "z") for i in range(3)])
    claims = await backend.claim(["x", "z", "nosuch"], "n1", 4, LONG)
    assert len(claims) == 4
    assert {c.id[0] for c in claims} == {"x", "z"}
    assert await backend.claim(["q"], "n1", 4, LONG) == []


async def test_claim_waits_for_run_at(backend: Backend) -> None:
    now = time.time()
    await backend.enqueue([job("later", run_at=now + 60), job("soon", run_at=now + 0.2)])
    claim = await claim_eventually(backend, "n1")
    assert claim.id == "soon"
    # Allow for a server clock a little off from ours.
    assert time.time() >= now + 0.2 - 0.05
    assert await backend.claim(["q"], "n1", 10, LONG) == []


async def test_claim_is_exclusive_under_concurrent_claimers(backend: Backend) -> None:
    ids = [f"j{i:03}" for i in range(200)]
    await backend.enqueue([job(i) for i in ids])

    async def drain(owner: str) -> list[Claim]:
        got: list[Claim] = []
        while claims := await backend.claim(["q"], owner, 7, LONG):
            got.extend(claims)
            await asyncio.sleep(0)
        return got

    per_owner = await asyncio.gather(*(drain(f"n{i}") for i in range(8)))
    claimed = [c for claims in per_owner for c in claims]
    assert sorted(c.id for c in claimed) == ids
    assert {c.token for c in claimed} == {1}


# -- leases of claims --------------------------------------------------------


async def test_renew_extends_a_held_claim(backend: Backend) -> None:
    await backend.enqueue([job("a")])
    claim = await claim_one(backend, lease=LONG)
    result = await backend.renew([claim], 2 * LONG)
    assert (result.kept, result.lost, result.cancel_requested) == (("a",), (), ())
    renewed = await backend.get("a")
    assert renewed is not None
    assert claim.record.lease_until is not None
    assert renewed.lease_until is not None
    assert renewed.lease_until > claim.record.lease_until


async def test_expired_lease_is_claimed_again_with_a_higher_token(backend: Backend) -> None:
    old, new = await expired_and_reclaimed(backend)
    assert new.id == old.id
    assert new.token > old.token
    assert (new.owner, new.record.attempts) == ("n2", 2)
    result = await backend.renew([old, new], LONG)
    assert (result.kept, result.lost) == (("j",), ("j",))


async def test_job_out_of_attempts_whose_lease_expired_ends_failed(backend: Backend) -> None:
    await backend.enqueue([job("j", max_attempts=1)])
    await claim_one(backend, "n1", lease=LEASE)

    async def failed() -> bool:
        assert await backend.claim(["q"], "n2", 1, LONG) == []
        record = await backend.get("j")
        return record is not None and record.status == "failed"

    await until(failed, "the job out of attempts fails")
    record = await backend.get("j")
    assert record is not None
    assert record.error is not None
    assert "lease" in record.error
    assert record.finished_at is not None


async def _finish_many_one(backend: Backend, claim: Claim) -> bool:
    return (await backend.finish_many([(claim, Outcome("succeeded", "1"))])) == [True]


STALE_WRITES: dict[str, Callable[[Backend, Claim], Awaitable[bool]]] = {
    "finish": lambda b, c: b.finish(c, Outcome("succeeded", "1")),
    "finish_many": _finish_many_one,
    "retry": lambda b, c: b.retry(c, time.time(), "late"),
    "progress": lambda b, c: b.progress(c, 1, 2, "late"),
    "release": lambda b, c: _release_one(b, c),
}


async def _release_one(backend: Backend, claim: Claim) -> bool:
    return await backend.release([claim]) == 1


@pytest.mark.parametrize("write", STALE_WRITES)
async def test_write_with_a_stale_token_is_rejected(backend: Backend, write: str) -> None:
    # The same owner claimed it again (another worker of the node): only the token differs.
    old, new = await expired_and_reclaimed(backend, reclaimer="n1")
    assert (new.owner, new.token) == ("n1", old.token + 1)
    before = await backend.get("j")
    assert not await STALE_WRITES[write](backend, old)
    assert await backend.get("j") == before


@pytest.mark.parametrize("write", STALE_WRITES)
async def test_write_by_another_owner_is_rejected(backend: Backend, write: str) -> None:
    await backend.enqueue([job("j")])
    claim = await claim_one(backend)
    before = await backend.get("j")
    forged = Claim(claim.id, "intruder", claim.token, claim.record)
    assert not await STALE_WRITES[write](backend, forged)
    assert await backend.get("j") == before


# -- retry, release, progress ------------------------------------------------


async def test_retry_queues_the_job_again_for_run_at_with_its_error(backend: Backend) -> None:
    await backend.enqueue([job("a", max_attempts=3)])
    claim = await claim_one(backend)
    assert await backend.retry(claim, time.time() + 60, "boom")
    record = await backend.get("a")
    assert record is not None
    assert (record.status, record.owner, record.error, record.attempts) == (
        "pending",
        None,
        "boom",
        1,
    )
    assert await backend.claim(["q"], "n1", 1, LONG) == []


async def test_retry_due_now_is_claimed_again_with_a_higher_token(backend: Backend) -> None:
    await backend.enqueue([job("a", max_attempts=3)])
    first = await claim_one(backend)
    assert await backend.retry(first, time.time() - 1, "boom")
    second = await claim_one(backend, "n2")
    assert second.token > first.token
    assert second.record.attempts == 2


async def test_released_job_is_claimable_at_once_and_its_attempt_not_counted(
    backend: Backend,
) -> None:
    await backend.enqueue([job("a"), job("b")])
    claims = await backend.claim(["q"], "n1", 2, LONG)
    assert await backend.release(claims) == 2
    record = await backend.get("a")
    assert record is not None
    assert (record.status, record.owner, record.attempts) == ("pending", None, 0)
    again = await backend.claim(["q"], "n2", 2, LONG)
    assert [c.id for c in again] == ["a", "b"]
    assert all(c.record.attempts == 1 and c.token == 2 for c in again)


async def test_release_counts_only_the_claims_still_held(backend: Backend) -> None:
    await backend.enqueue([job("a"), job("b")])
    a, b = await backend.claim(["q"], "n1", 2, LONG)
    assert await backend.finish(a, Outcome("succeeded", "null"))
    assert await backend.release([a, b]) == 1


async def test_progress_is_recorded_on_the_record(backend: Backend) -> None:
    await backend.enqueue([job("a")])
    claim = await claim_one(backend)
    assert await backend.progress(claim, 3, 4, "three of four")
    record = await backend.get("a")
    assert record is not None
    assert (record.progress_done, record.progress_total, record.progress_message) == (
        3,
        4,
        "three of four",
    )


# -- cancel ------------------------------------------------------------------


async def test_cancel_of_a_queued_job_means_it_never_starts(backend: Backend) -> None:
    await backend.enqueue([job("a"), job("b")])
    assert await backend.cancel("a") == CancelResult.CANCELLED
    record = await backend.get("a")
    assert record is not None
    assert record.status == "cancelled"
    assert record.finished_at is not None
    assert [c.id for c in await backend.claim(["q"], "n1", 10, LONG)] == ["b"]


async def test_cancel_of_a_running_job_is_reported_at_its_renewal(backend: Backend) -> None:
    await backend.enqueue([job("a"), job("b")])
    a, b = await backend.claim(["q"], "n1", 2, LONG)
    assert await backend.cancel("a") == CancelResult.REQUESTED
    result = await backend.renew([a, b], LONG)
    assert set(result.kept) == {"a", "b"}
    assert result.cancel_requested == ("a",)
    assert await backend.finish(a, Outcome("cancelled"))


async def test_cancel_of_a_final_or_unknown_job(backend: Backend) -> None:
    await backend.enqueue([job("a")])
    assert await backend.finish(await claim_one(backend), Outcome("succeeded", "null"))
    assert await backend.cancel("a") == CancelResult.FINAL
    assert await backend.cancel("nope") == CancelResult.UNKNOWN


@pytest.mark.parametrize("hand_back", ["retry", "release"])
async def test_job_handed_back_after_a_cancel_request_ends_cancelled(
    backend: Backend, hand_back: str
) -> None:
    await backend.enqueue([job("a", max_attempts=3)])
    claim = await claim_one(backend)
    assert await backend.cancel("a") == CancelResult.REQUESTED
    assert await STALE_WRITES[hand_back](backend, claim)
    record = await backend.get("a")
    assert record is not None
    assert record.status == "cancelled"
    assert await backend.claim(["q"], "n1", 1, LONG) == []


# -- query, stats, expire ----------------------------------------------------


async def test_query_is_newest_first_in_pages_with_the_total(backend: Backend) -> None:
    await backend.enqueue([job(f"j{i}", created_at=1000.0 + i) for i in range(7)])
    pages = [await backend.query(JobQuery(offset=o, limit=3)) for o in (0, 3, 6, 9)]
    assert [[r.id for r in p.records] for p in pages] == [
        ["j6", "j5", "j4"],
        ["j3", "j2", "j1"],
        ["j0"],
        [],
    ]
    assert {p.total for p in pages} == {7}


async def test_query_filters_by_status_and_task(backend: Backend) -> None:
    await backend.enqueue([job(f"j{i}", task="ab"[i % 2], created_at=1000.0 + i) for i in range(6)])
    await backend.claim(["q"], "n1", 3, LONG)  # j0, j1, j2
    running = await backend.query(JobQuery(statuses=frozenset({"running"})))
    assert ([r.id for r in running.records], running.total) == (["j2", "j1", "j0"], 3)
    task_a = await backend.query(JobQuery(task="a"))
    assert [r.id for r in task_a.records] == ["j4", "j2", "j0"]
    both = await backend.query(JobQuery(statuses=frozenset({"pending"}), task="b", limit=1))
    assert ([r.id for r in both.records], both.total) == (["j5"], 2)


async def test_stats_count_per_queue_and_status(backend: Backend) -> None:
    await backend.enqueue([job("x1", queue="x"), job("x2", queue="x"), job("y1", queue="y")])
    await backend.claim(["x"], "n1", 1, LONG)
    assert await backend.stats() == {"x": {"running": 1, "pending": 1}, "y": {"pending": 1}}


async def test_expire_forgets_final_records_finished_before_the_time(backend: Backend) -> None:
    await backend.enqueue([job("old"), job("new"), job("running"), job("pending")])
    old, new, _ = await backend.claim(["q"], "n1", 3, LONG)
    assert await backend.finish(old, Outcome("succeeded", "null"))
    assert await backend.finish(new, Outcome("failed", error="boom"))
    finished = await backend.get("new")
    assert finished is not None
    assert finished.finished_at is not None
    assert await backend.expire(finished.finished_at - 1) == 0
    assert await backend.expire(finished.finished_at + 1) == 2
    assert await backend.get("old") is None
    assert await backend.get("new") is None
    assert {r.id for r in (await backend.query(JobQuery())).records} == {"running", "pending"}
    assert await backend.stats() == {"q": {"running": 1, "pending": 1}}


# -- wait --------------------------------------------------------------------


async def test_wait_returns_when_the_jobs_finish(backend: Backend) -> None:
    await backend.enqueue([job("a"), job("b")])
    a, b = await backend.claim(["q"], "n1", 2, LONG)
    waiter = asyncio.create_task(backend.wait(["a", "b", "nope"], WITHIN))
    await asyncio.sleep(0)
    assert await backend.finish(a, Outcome("succeeded", "1"))
    assert await backend.finish(b, Outcome("failed", error="boom"))
    started = time.monotonic()
    records = await waiter
    assert time.monotonic() - started < WITHIN / 2
    assert [(r.id, r.status) for r in records] == [("a", "succeeded"), ("b", "failed")]


async def test_wait_returns_at_the_timeout(backend: Backend) -> None:
    await backend.enqueue([job("a")])
    started = time.monotonic()
    records = await backend.wait(["a"], 0.2)
    elapsed = time.monotonic() - started
    assert 0.15 <= elapsed < WITHIN / 2
    assert [(r.id, r.status) for r in records] == [("a", "pending")]


# -- periodic leadership -----------------------------------------------------


async def test_lease_is_exclusive_while_held(backend: Backend) -> None:
    lease = await backend.acquire("s", "n1", LONG)
    assert lease is not None
    assert lease.owner == "n1"
    assert await backend.acquire("s", "n2", LONG) is None
    again = await backend.acquire("s", "n1", LONG)
    assert again is not None
    assert again.epoch == lease.epoch
    other = await backend.acquire("other", "n2", LONG)
    assert other is not None
    assert other.owner == "n2"


async def test_lease_after_expiry_goes_to_a_higher_epoch_and_the_old_cannot_renew(
    backend: Backend,
) -> None:
    old = await backend.acquire("s", "n1", LEASE)
    assert old is not None
    new = await acquire_eventually(backend, "s", "n2")
    assert new.epoch > old.epoch
    assert await backend.renew_lease(old, LONG) is None
    assert not await backend.release_lease(old)
    assert await backend.acquire("s", "n1", LONG) is None


async def test_renew_lease_extends_a_held_lease(backend: Backend) -> None:
    lease = await backend.acquire("s", "n1", LONG)
    assert lease is not None
    renewed = await backend.renew_lease(lease, 2 * LONG)
    assert renewed is not None
    assert (renewed.owner, renewed.epoch) == ("n1", lease.epoch)
    assert renewed.expires_at > lease.expires_at


async def test_released_lease_goes_to_another_owner_with_a_higher_epoch(
    backend: Backend,
) -> None:
    old = await backend.acquire("s", "n1", LONG)
    assert old is not None
    assert await backend.release_lease(old)
    assert not await backend.release_lease(old)
    new = await backend.acquire("s", "n2", LONG)
    assert new is not None
    assert new.epoch > old.epoch
    assert await backend.renew_lease(old, LONG) is None


async def test_slot_is_claimed_at_most_once(backend: Backend) -> None:
    lease = await backend.acquire("s", "n1", LONG)
    assert lease is not None
    assert await backend.claim_slot(lease, 5)
    assert not await backend.claim_slot(lease, 5)
    assert await backend.claim_slot(lease, 6)
    other = await backend.acquire("other", "n1", LONG)
    assert other is not None
    assert await backend.claim_slot(other, 5)


async def test_slot_is_unique_across_an_epoch_change_and_a_stale_epoch_cannot_claim(
    backend: Backend,
) -> None:
    old = await backend.acquire("s", "n1", LEASE)
    assert old is not None
    assert await backend.claim_slot(old, 1)
    new = await acquire_eventually(backend, "s", "n2")
    assert not await backend.claim_slot(new, 1)
    assert not await backend.claim_slot(old, 2)
    assert await backend.claim_slot(new, 2)


async def test_anchor_is_stored_once(backend: Backend) -> None:
    assert await backend.anchor("s", 100.0) == 100.0
    assert await backend.anchor("s", 200.0) == 100.0
    assert await backend.anchor("other", 300.0) == 300.0


async def test_leases_list_every_schedule_with_its_holder_sorted_by_name(
    backend: Backend,
) -> None:
    assert await backend.leases() == []
    await backend.anchor("only-anchored", 1.0)  # an anchor is not a lease
    before = time.time()
    b = await backend.acquire("b", "n2", LONG)
    a = await backend.acquire("a", "n1", LONG)
    assert a is not None
    assert b is not None
    leases = await backend.leases()
    assert [(s.name, s.owner, s.epoch) for s in leases] == [("a", "n1", 1), ("b", "n2", 1)]
    assert all(isinstance(s, LeaseState) for s in leases)
    assert leases[0].expires_at == pytest.approx(a.expires_at)
    assert leases[0].expires_at is not None
    assert leases[0].expires_at > before
    assert all(s.live(time.time()) for s in leases)

    renewed = await backend.renew_lease(a, 2 * LONG)
    assert renewed is not None
    [shown] = [s for s in await backend.leases() if s.name == "a"]
    assert shown.expires_at == pytest.approx(renewed.expires_at)


async def test_a_released_lease_is_listed_without_owner_and_keeps_its_epoch(
    backend: Backend,
) -> None:
    first = await backend.acquire("s", "n1", LONG)
    assert first is not None
    assert await backend.release_lease(first)
    [released] = await backend.leases()
    assert released == LeaseState("s", None, first.epoch, None)
    assert not released.live(time.time())

    second = await backend.acquire("s", "n2", LONG)
    assert second is not None
    [taken] = await backend.leases()
    assert (taken.owner, taken.epoch) == ("n2", first.epoch + 1)


async def test_a_lease_that_ran_out_is_listed_as_it_was_until_taken(backend: Backend) -> None:
    old = await backend.acquire("s", "n1", LEASE)
    assert old is not None

    async def ran_out() -> bool:
        [state] = await backend.leases()
        return not state.live(time.time())

    await until(ran_out, "the lease runs out")
    [state] = await backend.leases()
    assert (state.owner, state.epoch, state.expires_at) == ("n1", old.epoch, old.expires_at)
    new = await acquire_eventually(backend, "s", "n2")
    [state] = await backend.leases()
    assert (state.owner, state.epoch) == ("n2", new.epoch)
    assert state.live(time.time())


# -- nodes -------------------------------------------------------------------


async def test_heartbeats_list_the_nodes_newest_first(backend: Backend) -> None:
    def node(node_id: str, running: int) -> NodeRecord:
        return NodeRecord(node_id, host="h", pid=1, started_at=1000.0, running=running)

    async def beat_past(beat: NodeRecord, other: str) -> bool:
        # Beats again until the clock has moved past the other's (a clock may be coarse).
        await backend.heartbeat(beat)
        seen = {n.id: n.last_seen for n in await backend.nodes()}
        return seen[beat.id] > seen.get(other, 0.0)

    await backend.heartbeat(node("a", 1))
    await until(lambda: beat_past(node("b", 2), "a"), "b beats after a")
    await until(lambda: beat_past(node("a", 5), "b"), "a beats after b")
    nodes = await backend.nodes()
    assert [(n.id, n.running) for n in nodes] == [("a", 5), ("b", 2)]
    assert nodes[0].last_seen > nodes[1].last_seen > 0


async def test_a_heartbeat_keeps_what_it_sends_and_the_nodes_heard_from_recently(
    backend: Backend,
) -> None:
    await backend.heartbeat(
        NodeRecord("a", host="h1", pid=7, started_at=1000.0, running=3, lag=0.125)
    )
    await backend.heartbeat(NodeRecord("b", host="h2", pid=8, started_at=1001.0))
    got = {n.id: n for n in await backend.nodes()}
    assert set(got) == {"a", "b"}  # the default window keeps both
    a = got["a"]
    assert (a.host, a.pid, a.started_at, a.running, a.lag) == ("h1", 7, 1000.0, 3, 0.125)
    assert got["b"].lag is None


async def test_a_heartbeat_forgets_the_nodes_silent_for_longer_than_forget_after(
    backend: Backend,
) -> None:
    def node(node_id: str) -> NodeRecord:
        return NodeRecord(node_id, host="h", pid=1, started_at=1000.0)

    await backend.heartbeat(node("old"))

    async def forgotten() -> bool:
        # "new" forgets whoever was silent for more than 50 ms.
        await backend.heartbeat(node("new"), forget_after=0.05)
        return "old" not in {n.id for n in await backend.nodes()}

    await until(forgotten, "the silent node is forgotten")
    assert [n.id for n in await backend.nodes()] == ["new"]
    # The node that beats is never forgotten by its own heartbeat.
    await backend.heartbeat(node("new"), forget_after=0.0)
    assert "new" in {n.id for n in await backend.nodes()}


async def test_forget_node_deletes_only_that_node(backend: Backend) -> None:
    for node_id in ("a", "b"):
        await backend.heartbeat(NodeRecord(node_id, host="h", pid=1, started_at=1000.0))
    await backend.forget_node("a")
    assert [n.id for n in await backend.nodes()] == ["b"]
    await backend.forget_node("a")  # already gone: nothing
    await backend.forget_node("never-seen")
    assert [n.id for n in await backend.nodes()] == ["b"]
    # A heartbeat after it brings the node back.
    await backend.heartbeat(NodeRecord("a", host="h", pid=1, started_at=1000.0))
    assert {n.id for n in await backend.nodes()} == {"a", "b"}


async def test_finish_many_records_each_outcome_and_refuses_only_the_stale(
    backend: Backend,
) -> None:
    await put(backend, [job("a"), job("b"), job("c")])
    claims = await backend.claim(["q"], "n1", 3, LONG)
    assert [c.id for c in claims] == ["a", "b", "c"]
    a, b, c = claims
    forged = Claim(b.id, "intruder", b.token, b.record)
    done = await backend.finish_many(
        [
            (a, Outcome("succeeded", '"A"')),
            (forged, Outcome("succeeded", '"B"')),
            (c, Outcome("failed", error="boom")),
        ]
    )
    assert done == [True, False, True]
    records = {r.id: r for r in [await backend.get(i) for i in "abc"] if r is not None}
    assert (records["a"].status, records["a"].result_json) == ("succeeded", '"A"')
    assert records["b"].status == "running"
    assert (records["c"].status, records["c"].error) == ("failed", "boom")
    assert await backend.finish_many([]) == []


# -- claimed as it is stored (enqueue's take) ---------------------------------------


async def test_a_taken_record_is_stored_claimed_and_is_not_claimed_again(
    backend: Backend,
) -> None:
    stored = await backend.enqueue(
        [job("mine"), job("free")], take=Take("n1", LONG, frozenset({"mine"}))
    )
    mine, free = stored
    assert mine is not None
    assert free is not None
    assert (mine.status, mine.owner, mine.token, mine.attempts) == ("running", "n1", 1, 1)
    assert free.status == "pending"
    record = await backend.get("mine")
    assert record is not None
    assert record.status == "running"
    assert record.lease_until is not None
    assert record.started_at is not None
    # Only the free one is claimable; the taken one is held: renewed, finished.
    (other,) = await backend.claim(["q"], "n2", 5, LONG)
    assert other.id == "free"
    held = Claim("mine", "n1", 1, mine)
    assert (await backend.renew([held], LONG)).kept == ("mine",)
    assert await backend.finish(held, Outcome("succeeded", "1"))


async def test_a_taken_record_whose_lease_runs_out_is_claimed_again(backend: Backend) -> None:
    await backend.enqueue([job("j", max_attempts=2)], take=Take("n1", LEASE, frozenset({"j"})))

    async def reclaimed() -> bool:
        return bool(await backend.claim(["q"], "n2", 1, LONG))

    await until(reclaimed, "the taken job claimed again after its lease")
    record = await backend.get("j")
    assert record is not None
    assert (record.owner, record.token, record.attempts) == ("n2", 2, 2)


async def test_a_taken_id_answered_by_idempotency_is_not_taken(backend: Backend) -> None:
    await backend.enqueue([job("j")])
    (again,) = await backend.enqueue([job("j")], take=Take("n1", LONG, frozenset({"j"})))
    assert again is not None
    assert again.status == "pending"
    assert again.owner is None

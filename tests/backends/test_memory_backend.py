"""What only the memory backend promises: its URL, and its choices at the exact
edges of time (an injected clock moves time here; the contract suite cannot)."""

from __future__ import annotations

import pytest

from asyncbg.backends import open_backend
from asyncbg.backends.memory import MemoryBackend, from_url
from asyncbg.engine.records import JobRecord, NodeRecord
from asyncbg.errors import BackendUnavailable, ConfigError


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def mem(clock: Clock) -> MemoryBackend:
    return MemoryBackend(clock=clock)


def job(job_id: str, **fields: object) -> JobRecord:
    return JobRecord(id=job_id, queue="q", task="t", **fields)  # type: ignore[arg-type]


# -- URLs ----------------------------------------------------------------------


@pytest.mark.parametrize("url", ["memory://", "MEMORY://"])
def test_from_url_accepts_memory_with_nothing_after_it(url: str) -> None:
    backend = from_url(url, "/instance")
    assert isinstance(backend, MemoryBackend)
    assert (backend.scheme, backend.durable) == ("memory", False)


@pytest.mark.parametrize("url", ["memory://x", "memory:///tmp/db", "memory://?size=1", "memory:"])
def test_from_url_refuses_anything_after_memory(url: str) -> None:
    with pytest.raises(ConfigError, match="memory backend takes no location"):
        from_url(url, "/instance")


def test_from_url_redacts_a_password() -> None:
    with pytest.raises(ConfigError) as caught:
        from_url("memory://user:s3cret@host", "/instance")
    assert "s3cret" not in str(caught.value)
    assert "user:***@host" in str(caught.value)


@pytest.mark.parametrize("spec", [None, "memory://"])
def test_open_backend_gives_a_memory_backend(spec: str | None) -> None:
    assert isinstance(open_backend(spec, "/instance"), MemoryBackend)


def test_open_backend_of_an_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(BackendUnavailable, match=r"'nosuch'.*known: .*memory"):
        open_backend("nosuch://x", "/instance")


def test_open_backend_redacts_a_password_of_an_unknown_scheme() -> None:
    with pytest.raises(BackendUnavailable) as caught:
        open_backend("nosuch://admin:hunter2@db:5432/app", "/instance")
    assert "hunter2" not in str(caught.value)
    assert "admin:***@db:5432/app" in str(caught.value)


# -- enqueue -------------------------------------------------------------------


async def test_enqueue_of_a_record_not_pending_stores_nothing(mem: MemoryBackend) -> None:
    with pytest.raises(ValueError, match="pending records"):
        await mem.enqueue([job("a"), job("b", status="running")])
    assert await mem.get("a") is None


async def test_a_record_created_ahead_of_the_clock_is_claimable_at_once(
    mem: MemoryBackend, clock: Clock
) -> None:
    # created_at comes from the submitter's clock, which may be ahead of the store's.
    await mem.enqueue([job("later", run_at=clock.now + 5), job("ahead", created_at=9e9)])
    assert [c.id for c in await mem.claim(["q"], "n1", 5, 30)] == ["ahead"]


async def test_run_at_is_due_when_the_clock_reaches_it(mem: MemoryBackend, clock: Clock) -> None:
    await mem.enqueue([job("a", run_at=1010.0)])
    clock.now = 1009.99
    assert await mem.claim(["q"], "n1", 1, 30) == []
    clock.now = 1010.0
    assert [c.id for c in await mem.claim(["q"], "n1", 1, 30)] == ["a"]


async def test_cancelled_entries_are_skipped_by_claim(mem: MemoryBackend) -> None:
    await mem.enqueue([job(f"j{i:04}") for i in range(1000)])
    for i in range(999):
        await mem.cancel(f"j{i:04}")
    assert [c.id for c in await mem.claim(["q"], "n1", 5, 30)] == ["j0999"]


# -- leases of claims ------------------------------------------------------------


async def test_a_lease_runs_out_when_the_clock_reaches_its_deadline(
    mem: MemoryBackend, clock: Clock
) -> None:
    await mem.enqueue([job("a", max_attempts=2)])
    [first] = await mem.claim(["q"], "n1", 1, 10)
    clock.now = 1009.99
    assert await mem.claim(["q"], "n2", 1, 10) == []
    clock.now = 1010.0
    [second] = await mem.claim(["q"], "n2", 1, 10)
    assert (second.token, second.record.attempts) == (first.token + 1, 2)


async def test_an_expired_claim_nobody_took_is_kept_by_its_renewal(
    mem: MemoryBackend, clock: Clock
) -> None:
    await mem.enqueue([job("a", max_attempts=2)])
    [claim] = await mem.claim(["q"], "n1", 1, 10)
    clock.now = 1100.0
    result = await mem.renew([claim], 10)
    assert result.kept == ("a",)
    assert await mem.claim(["q"], "n2", 1, 10) == []
    record = await mem.get("a")
    assert record is not None
    assert record.lease_until == 1110.0


async def test_a_lost_job_out_of_attempts_fails_without_using_the_claim_limit(
    mem: MemoryBackend, clock: Clock
) -> None:
    await mem.enqueue([job("spent")])
    await mem.claim(["q"], "n1", 1, 10)  # its lease runs out at 1010
    await mem.enqueue([job("fresh", run_at=1012.0)])
    clock.now = 1020.0
    assert [c.id for c in await mem.claim(["q"], "n2", 1, 10)] == ["fresh"]
    record = await mem.get("spent")
    assert record is not None
    assert (record.status, record.finished_at, record.owner) == ("failed", 1020.0, "n1")
    assert record.error is not None
    assert "stopped renewing" in record.error


async def test_lost_claims_and_due_records_are_taken_by_due_time(
    mem: MemoryBackend, clock: Clock
) -> None:
    await mem.enqueue([job("lost", max_attempts=2)])
    await mem.claim(["q"], "n1", 1, 10)  # its lease runs out at 1010
    await mem.enqueue([job("early", run_at=1005.0), job("late", run_at=1015.0)])
    clock.now = 1020.0
    assert [c.id for c in await mem.claim(["q"], "n2", 3, 10)] == ["early", "lost", "late"]


# -- periodic leadership --------------------------------------------------------


async def test_an_expired_lease_cannot_be_renewed_even_if_nobody_took_it(
    mem: MemoryBackend, clock: Clock
) -> None:
    lease = await mem.acquire("s", "n1", 10)
    assert lease is not None
    clock.now = 1010.0
    assert await mem.renew_lease(lease, 10) is None
    assert not await mem.claim_slot(lease, 1)
    again = await mem.acquire("s", "n1", 10)
    assert again is not None
    assert again.epoch == lease.epoch + 1


async def test_old_slots_stay_claimed_once_they_fold_into_the_floor(
    mem: MemoryBackend,
) -> None:
    lease = await mem.acquire("s", "n1", 30)
    assert lease is not None
    for slot in range(5000):
        assert await mem.claim_slot(lease, slot)
    assert not await mem.claim_slot(lease, 0)
    assert not await mem.claim_slot(lease, 4999)
    assert await mem.claim_slot(lease, 5000)
    assert len(mem._slots["s"].recent) <= 2 * 1024


# -- nodes ------------------------------------------------------------------------


async def test_nodes_seen_at_the_same_time_list_the_latest_heartbeat_first(
    mem: MemoryBackend,
) -> None:
    for node_id in ("a", "b", "a"):
        await mem.heartbeat(NodeRecord(node_id, host="h", pid=1, started_at=0.0))
    assert [(n.id, n.last_seen) for n in await mem.nodes()] == [("a", 1000.0), ("b", 1000.0)]

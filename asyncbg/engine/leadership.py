"""Leadership of a periodic schedule through a store's lease (a durable backend).

One process at a time holds the lease of a schedule; the store gives every new
holder a higher epoch, and a tick runs only once its slot is claimed under the
current epoch, so even two processes that both believe they lead (one paused
past its lease, say) run a slot at most once. :class:`StoreLeader` is the
lease as one process sees it: it takes or renews it (:meth:`StoreLeader.ensure`,
at each tick), renews it in between every ttl/3 while held, claims slots and
lets it go at stop. :mod:`asyncbg.engine.periodic` decides when to ask.

The store is anything with the five lease coroutines of the backend seam
(:class:`LeaseStore`); this module imports no backend.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Protocol

from .records import Lease

__all__ = ["LEASE_TTL_MAX", "LEASE_TTL_MIN", "LeaseStore", "StoreLeader", "lease_ttl"]

#: A lease is never shorter: a busy store or loop must not lose it between ticks.
LEASE_TTL_MIN = 3.0
#: Nor longer: a dead leader is replaced within about this long.
LEASE_TTL_MAX = 30.0


def lease_ttl(interval: float) -> float:
    """The lease time for a schedule whose ticks are ``interval`` seconds apart:
    the interval, clamped to [:data:`LEASE_TTL_MIN`, :data:`LEASE_TTL_MAX`]."""
    return min(max(interval, LEASE_TTL_MIN), LEASE_TTL_MAX)


class LeaseStore(Protocol):
    """The periodic-leadership part of a backend (``asyncbg.backends.base.Backend``)."""

    async def acquire(self, name: str, owner: str, ttl: float) -> Lease | None: ...

    async def renew_lease(self, lease: Lease, ttl: float) -> Lease | None: ...

    async def release_lease(self, lease: Lease) -> bool: ...

    async def claim_slot(self, lease: Lease, slot: int) -> bool: ...

    async def anchor(self, name: str, proposed: float) -> float: ...


def _ignore(exc: Exception) -> None:
    pass


class StoreLeader:
    """This process's view of the lease of schedule ``name`` in ``store``.

    :param owner: the node id of the app leading (its durable runner's ``owner``).
    :param clock: a monotonic clock in seconds, for the local deadline of the lease.

    ``on_error`` is called with what the store raised while renewing between
    ticks or releasing (the owner of the schedule counts and logs it); errors
    of :meth:`ensure`, :meth:`slot_ok` and :meth:`anchor` are raised to the caller.
    Loop only.
    """

    def __init__(
        self,
        store: LeaseStore,
        name: str,
        owner: str,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.name = name
        self.owner = owner
        self.on_error: Callable[[Exception], None] = _ignore
        self._clock = clock
        self._lease: Lease | None = None
        # Local clock: the store's lease has surely run out by then (it was
        # granted for ttl seconds after the call began).
        self._deadline = -math.inf
        self._ttl = LEASE_TTL_MIN
        self._next_renewal = math.inf
        self._keeper: asyncio.Task[None] | None = None
        self._anchor: float | None = None
        self._busy = asyncio.Lock()
        self._released = False

    def __repr__(self) -> str:
        return f"<StoreLeader {self.name} {'held' if self.held else 'not held'}>"

    @property
    def held(self) -> bool:
        """True while this process holds the lease and it cannot have run out yet."""
        return self._lease is not None and self._clock() < self._deadline

    @property
    def lease(self) -> Lease | None:
        """The lease while :attr:`held`, else None."""
        return self._lease if self.held else None

    async def ensure(self, ttl: float) -> bool:
        """Renew the lease for ``ttl`` seconds if held, else try to take it;
        return whether it is held now. A lease found lost (renewal refused) is
        dropped at once, and taken again if nobody else holds it.

        After :meth:`release` it takes nothing and returns False.

        :raises Exception: whatever the store raised; the lease is then kept
            as it was (held until its local deadline).
        """
        async with self._busy:
            if self._released:
                return False
            self._ttl = ttl
            if self._lease is not None and await self._renew(ttl):
                return True
            began = self._clock()
            lease = await self.store.acquire(self.name, self.owner, ttl)
            if lease is None:
                return False
            if self._released:  # released while the store answered: give it back
                await self.store.release_lease(lease)
                return False
            self._hold(lease, began, ttl)
            return True

    async def slot_ok(self, slot: int) -> bool:
        """Claim tick ``slot``: True at most once per slot across every process,
        and only while this process holds the lease's current epoch.

        An answer that comes back after the lease can have run out (the store
        took the claim, but the reply was held up, by a network cut say, until
        another process may lead) is False too: the slot is then claimed and
        never run, rather than run late next to the new leader's ticks.
        """
        lease = self.lease
        if lease is None:
            return False
        return await self.store.claim_slot(lease, slot) and self.held

    async def anchor(self, proposed: float) -> float:
        """The schedule's stored anchor (wall-clock time of slot 0), storing
        ``proposed`` if there is none; asked of the store once."""
        if self._anchor is None:
            self._anchor = await self.store.anchor(self.name, proposed)
        return self._anchor

    async def release(self) -> None:
        """Stop renewing and give the lease up, so another process takes it at
        its next tick instead of waiting for it to run out. For good: a
        schedule started again gets a new leader."""
        self._released = True
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
        lease, self._lease = self._lease, None
        self._deadline = -math.inf
        if lease is None:
            return
        try:
            await self.store.release_lease(lease)
        except Exception as exc:
            self.on_error(exc)

    # -- internals -----------------------------------------------------------------

    async def _renew(self, ttl: float) -> bool:
        # Under self._busy, with a lease.
        lease = self._lease
        assert lease is not None
        began = self._clock()
        renewed = await self.store.renew_lease(lease, ttl)
        if self._released:
            return False  # release() gave it up meanwhile
        if renewed is None:
            self._lease = None  # lost: a follower from now on
            self._deadline = -math.inf
            return False
        self._hold(renewed, began, ttl)
        return True

    def _hold(self, lease: Lease, began: float, ttl: float) -> None:
        self._lease = lease
        self._deadline = began + ttl
        self._next_renewal = self._clock() + ttl / 3
        if self._keeper is None or self._keeper.done():
            # Not a tracked task: it has no work of its own to drain. It goes on
            # through a drain (a run still going keeps its lease) until release().
            self._keeper = asyncio.get_running_loop().create_task(
                self._keep(), name=f"asyncbg:lease:{self.name}"
            )

    async def _keep(self) -> None:
        # Renew every ttl/3 after the last renewal (a tick's included) while held.
        while self._lease is not None:
            delay = self._next_renewal - self._clock()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            async with self._busy:
                if self._lease is None or self._next_renewal > self._clock():
                    continue  # released, or a tick renewed it meanwhile
                # After an error too: try again a third of the lease later.
                self._next_renewal = self._clock() + self._ttl / 3
                try:
                    await self._renew(self._ttl)
                except Exception as exc:
                    self.on_error(exc)

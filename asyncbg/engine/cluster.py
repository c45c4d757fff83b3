"""The whole cluster as the surfaces show it: the nodes sharing a durable store,
which of them are dead, and who leads each store-leased periodic schedule.

Pure functions of what a backend returns (:meth:`Backend.nodes`,
:meth:`Backend.leases`) and the time; no Flask import, no I/O.

Two bounds, both derived from the lease (``ASYNCBG_LEASE``, the same for
every process of an app), since a durable runner heartbeats once per renewal,
every lease/3:

- a node is **dead** once its last heartbeat is more than
  :func:`dead_after` = lease + lease/3 old: four heartbeat intervals, three
  missed beats and some slack for a slow store. It is also the bound within
  which another process claims again what a dead node held (BACKENDS.md), so
  a node shown dead is one whose work is, or is about to be, taken over: a
  process killed, stuck, paused or cut off. A node that stops gracefully is
  not shown dead: it deletes its own row at stop
  (:meth:`Backend.forget_node`), after its last heartbeat.
- a dead node is **forgotten** (its row deleted by the next heartbeat of any
  other node) once it has been silent for :func:`forget_after`: an hour, or
  ten times the dead bound for a very long lease. So a crash stays visible
  for an hour, and the list stays bounded through any number of crashes.

Times come from the store's clock (``last_seen``, ``expires_at``) and are
compared with this host's: fine on one host (SQLite), and within the bounds
above for hosts whose clocks agree to a second or so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .records import LeaseState, NodeRecord

__all__ = [
    "NODE_FORGET_AFTER",
    "dead_after",
    "forget_after",
    "lease_dict",
    "node_dicts",
]

#: Seconds of silence after which a node is forgotten, at the least.
NODE_FORGET_AFTER = 3600.0


def dead_after(lease: float) -> float:
    """Seconds without a heartbeat after which a node counts as dead: lease + lease/3."""
    return lease + lease / 3


def forget_after(lease: float) -> float:
    """Seconds without a heartbeat after which a node is forgotten: an hour, or
    ten times :func:`dead_after` when that is longer."""
    return max(NODE_FORGET_AFTER, 10 * dead_after(lease))


def node_dicts(
    nodes: Sequence[NodeRecord], *, now: float, lease: float, here: str | None
) -> list[dict[str, Any]]:
    """Return each node as the JSON the surfaces answer with, in the given
    order (newest heartbeat first): ``id``, ``host``, ``pid``, ``started_at``,
    ``last_seen``, ``age`` (seconds since ``last_seen``), ``running``, ``lag``
    (seconds, None when unmonitored), ``alive`` (False once :func:`dead_after`
    passed) and ``here`` (True for the node ``here`` names)."""
    bound = dead_after(lease)
    return [
        {
            "id": node.id,
            "host": node.host,
            "pid": node.pid,
            "started_at": node.started_at,
            "last_seen": node.last_seen,
            "age": max(0.0, now - node.last_seen),
            "running": node.running,
            "lag": node.lag,
            "alive": now - node.last_seen <= bound,
            "here": node.id == here,
        }
        for node in nodes
    ]


def lease_dict(lease: LeaseState | None, *, now: float, here: str | None) -> dict[str, Any]:
    """Return the leadership of one schedule as JSON: ``owner`` (as stored:
    None once released, the last holder's id after it ran out), ``epoch``,
    ``expires_at``, ``held`` (someone holds it now) and ``here`` (the node
    ``here`` names holds it now). ``lease`` None (never acquired) gives nulls
    and False."""
    if lease is None:
        return {"owner": None, "epoch": None, "expires_at": None, "held": False, "here": False}
    held = lease.live(now)
    return {
        "owner": lease.owner,
        "epoch": lease.epoch,
        "expires_at": lease.expires_at,
        "held": held,
        "here": held and here is not None and lease.owner == here,
    }

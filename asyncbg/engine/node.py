"""Node ids: host + pid + a random incarnation.

A restarted process (or a forked child) gets a new id, so it never inherits
the claims or leases of the process it replaced. Each app's durable runner
makes its own node (:func:`new_node`): two apps of one process sharing a store
are two nodes, each with its own claims, leases and heartbeat (as two workers
would be). No Flask import.
"""

from __future__ import annotations

import os
import secrets
import socket
import time

from .records import NodeRecord

__all__ = ["current_node", "new_node", "node_id"]

_node: NodeRecord | None = None


def new_node() -> NodeRecord:
    """Return a new :class:`~asyncbg.engine.records.NodeRecord` of this process:
    this host and pid, a fresh random incarnation, started now."""
    host = socket.gethostname()
    pid = os.getpid()
    return NodeRecord(
        id=f"{host}:{pid}:{secrets.token_hex(4)}", host=host, pid=pid, started_at=time.time()
    )


def current_node() -> NodeRecord:
    """Return this process's :class:`~asyncbg.engine.records.NodeRecord` (made
    once per process: a forked child makes its own)."""
    global _node
    node = _node
    pid = os.getpid()
    if node is None or node.pid != pid:
        node = _node = new_node()
    return node


def node_id() -> str:
    """Return this process's node id, ``host:pid:incarnation``."""
    return current_node().id

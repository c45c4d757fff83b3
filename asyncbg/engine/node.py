"""This process's node id: host + pid + a random incarnation.

A restarted process (or a forked child) gets a new id, so it never inherits
the claims or leases of the process it replaced. No Flask import.
"""

from __future__ import annotations

import os
import secrets
import socket
import time

from .records import NodeRecord

__all__ = ["current_node", "node_id"]

_node: NodeRecord | None = None


def current_node() -> NodeRecord:
    """Return this process's :class:`~asyncbg.engine.records.NodeRecord` (made
    once per process: a forked child makes its own)."""
    global _node
    node = _node
    pid = os.getpid()
    if node is None or node.pid != pid:
        host = socket.gethostname()
        node = _node = NodeRecord(
            id=f"{host}:{pid}:{secrets.token_hex(4)}", host=host, pid=pid, started_at=time.time()
        )
    return node


def node_id() -> str:
    """Return this process's node id, ``host:pid:incarnation``."""
    return current_node().id

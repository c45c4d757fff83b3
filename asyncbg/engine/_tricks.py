"""What the loop's private-asyncio tricks share: the test switch and the one warning.

Each trick (:mod:`asyncbg._wakeup`, :mod:`asyncbg._eager`,
:mod:`asyncbg._daemon_executor`) checks, once per loop start, that the asyncio
internals it leans on are still there and still behave; when they are not, the
loop runs with asyncio's stock behaviour instead and says so once per process.

``ASYNCBG_DISABLE_LOOP_TRICKS`` is for testing only: ``1`` (or ``all``) makes
every check fail, a comma-separated list of trick names (``wakeup``,
``eager``, ``executor``) only those, so that the fallbacks can be exercised on
a Python where the tricks work.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("asyncbg")

ENV_SWITCH = "ASYNCBG_DISABLE_LOOP_TRICKS"
TRICKS = ("wakeup", "eager", "executor")

_warned: set[str] = set()
_warned_lock = threading.Lock()


def forced_off(trick: str) -> bool:
    """Return True when the test switch turns ``trick`` off (read at each loop start)."""
    value = os.environ.get(ENV_SWITCH, "").strip().lower()
    if not value or value in {"0", "false", "no"}:
        return False
    if value in {"1", "true", "yes", "all"}:
        return True
    return trick in {part.strip() for part in value.split(",")}


def warn_fallback(trick: str, reason: str) -> None:
    """Log, once per process for each trick, that it is off and why."""
    with _warned_lock:
        if trick in _warned:
            return
        _warned.add(trick)
    log.warning(
        "loop trick %r is off (%s); using asyncio's stock behaviour instead",
        trick,
        reason,
    )

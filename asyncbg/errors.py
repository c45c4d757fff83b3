"""Exceptions raised by asyncbg, all importable from :mod:`asyncbg`."""

from __future__ import annotations

import concurrent.futures

__all__ = [
    "AsyncBGError",
    "JobCancelled",
    "JobTimedOut",
    "NotRunning",
    "QueueFull",
    "UnknownQueue",
]


class AsyncBGError(Exception):
    """Base class of every error asyncbg raises on purpose."""


class NotRunning(AsyncBGError, RuntimeError):
    """Work was handed to a loop that is not running or is shutting down."""


class QueueFull(AsyncBGError):
    """A bounded queue stayed full for the whole enqueue timeout."""


class UnknownQueue(AsyncBGError, LookupError):
    """No consumer is registered for the queue name given."""


class JobCancelled(AsyncBGError, concurrent.futures.CancelledError):
    """The job was cancelled (by ``Job.cancel()`` or by shutdown)."""


class JobTimedOut(AsyncBGError, TimeoutError):
    """The job ran past its own ``timeout`` and was cancelled."""

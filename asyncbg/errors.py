"""Exceptions raised by asyncbg, all importable from :mod:`asyncbg`."""

from __future__ import annotations

import concurrent.futures

__all__ = [
    "AsyncBGError",
    "BackendError",
    "BackendUnavailable",
    "ConfigError",
    "ConfigTypeError",
    "JobCancelled",
    "JobFailed",
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


class JobFailed(AsyncBGError):
    """A job stored by a durable backend failed; it ran in another process, so
    its exception is known only as text. ``error`` is that text, ``"Type: message"``."""

    def __init__(self, error: str | None) -> None:
        self.error = error or "unknown error"
        super().__init__(self.error)


class JobTimedOut(AsyncBGError, TimeoutError):
    """The job ran past its own ``timeout`` and was cancelled."""


class ConfigError(AsyncBGError, ValueError):
    """An ``ASYNCBG_*`` setting (or an ``AsyncBG`` argument) is not usable; the
    message names the key, the value and what would be accepted."""


class ConfigTypeError(ConfigError, TypeError):
    """An ``ASYNCBG_*`` setting is of the wrong kind (a string where a number goes)."""


class BackendError(AsyncBGError):
    """The backend refused or failed an operation (the engine down, the file
    read-only, a preflight check that failed); the message says which."""


class BackendUnavailable(ConfigError):
    """``ASYNCBG_BACKEND`` names a backend this installation cannot open: an
    unknown scheme, or a backend whose optional driver is not installed (the
    message names the extra to install)."""

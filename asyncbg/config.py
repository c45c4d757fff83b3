"""The config table: every ``ASYNCBG_*`` key, its default, and its check.

:func:`load_settings` reads an app's config once, at ``init_app``, checks
every key and returns :class:`Settings`; a bad value is a
:class:`~asyncbg.errors.ConfigError` naming the key, the value and what would
be accepted, raised then and not on the first request. Keys the web surface
reads per request (``ASYNCBG_CONTROL``, ``ASYNCBG_SHOW_RESULTS``, ...) are
checked here too. The README's table documents each key.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, ConfigTypeError

__all__ = ["DEFAULT_CONFIG", "Settings", "load_settings"]

#: Every config key asyncbg reads, with its default (see the README's table).
DEFAULT_CONFIG: dict[str, Any] = {
    "ASYNCBG_AUTOSTART": True,
    "ASYNCBG_BACKEND": None,
    "ASYNCBG_LEASE": 30.0,
    "ASYNCBG_WORKER_CONCURRENCY": 32,
    "ASYNCBG_POLL_INTERVAL": 1.0,
    "ASYNCBG_POOL_SIZE": 4,
    "ASYNCBG_STATEMENT_TIMEOUT": 10.0,
    "ASYNCBG_CONNECT_TIMEOUT": 5.0,
    "ASYNCBG_SHUTDOWN_TIMEOUT": 10.0,
    "ASYNCBG_QUEUE_MAXSIZE": 1000,
    "ASYNCBG_JOB_HISTORY_SIZE": 1000,
    "ASYNCBG_JOB_HISTORY_AGE": 3600.0,
    "ASYNCBG_HANDLE_SIGNALS": True,
    "ASYNCBG_UVLOOP": False,
    "ASYNCBG_ASYNC_VIEWS": True,
    "ASYNCBG_EAGER": False,
    "ASYNCBG_LOCK_DIR": None,
    "ASYNCBG_MAX_WORKERS": None,
    "ASYNCBG_ASGI_THREADS": None,
    "ASYNCBG_LOG_HANDLER": True,
    # observability (docs/observability.md)
    "ASYNCBG_MOUNT": True,
    "ASYNCBG_DASHBOARD_PREFIX": "/_asyncbg",
    "ASYNCBG_DASHBOARD": False,
    "ASYNCBG_DASHBOARD_REFRESH": 1.0,
    "ASYNCBG_CONTROL": False,
    "ASYNCBG_AUTH": None,
    "ASYNCBG_SHOW_RESULTS": False,
    "ASYNCBG_HEALTH_PUBLIC": True,
    "ASYNCBG_HEALTH_MAX_LAG": 1.0,
    "ASYNCBG_MONITOR": True,
    "ASYNCBG_MONITOR_INTERVAL": 0.1,
    "ASYNCBG_BLOCKED_THRESHOLD": 0.25,
    "ASYNCBG_METRICS": True,
    "ASYNCBG_METRICS_REGISTRY": None,
}

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def _flag(key: str, value: object) -> bool:
    # Environment-loaded config (from_prefixed_env, from_envvar) brings strings
    # and ints: "false" must not turn a feature on.
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigTypeError(f"{key} must be True or False, not {value!r}")


def _number(key: str, value: object, *, low: float, strict: bool = False) -> float:
    try:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigTypeError(f"{key} must be a number of seconds, not {value!r}") from None
    if not math.isfinite(number) or number < low or (strict and number == low):
        bound = f"above {low:g}" if strict else f"at least {low:g}"
        raise ConfigError(f"{key} must be a finite number {bound}, not {value!r}")
    return number


def _count(key: str, value: object, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigTypeError(f"{key} must be a whole number, not {value!r}")
    try:
        count = int(value)
    except ValueError:
        raise ConfigTypeError(f"{key} must be a whole number, not {value!r}") from None
    if count < low:
        raise ConfigError(f"{key} must be at least {low}, not {value!r}")
    return count


def _optional(check: Callable[[str, object], Any]) -> Callable[[str, object], Any]:
    def optional(key: str, value: object) -> Any:
        return None if value is None else check(key, value)

    return optional


def _path(key: str, value: object) -> str:
    if not isinstance(value, str | os.PathLike):
        raise ConfigTypeError(f"{key} must be a folder path, not {value!r}")
    return os.fspath(value)


def _prefix(key: str, value: object) -> str:
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or not value.startswith("/") or value.endswith("/"):
        raise ConfigError(f"{key} must be a URL path such as '/_asyncbg' (or '' for none)")
    return value


def _callable(key: str, value: object) -> object:
    if not callable(value):
        raise ConfigTypeError(f"{key} must be a callable taking the request, or None")
    return value


def _anything(key: str, value: object) -> object:
    return value


_CHECKS: dict[str, Callable[[str, object], Any]] = {
    "ASYNCBG_AUTOSTART": _flag,
    "ASYNCBG_BACKEND": _anything,  # open_backend checks it, naming the extra to install
    "ASYNCBG_LEASE": lambda k, v: _number(k, v, low=1),
    "ASYNCBG_WORKER_CONCURRENCY": lambda k, v: _count(k, v, low=0),
    "ASYNCBG_POLL_INTERVAL": lambda k, v: _number(k, v, low=0.01),
    "ASYNCBG_POOL_SIZE": lambda k, v: _count(k, v, low=1),
    "ASYNCBG_STATEMENT_TIMEOUT": lambda k, v: _number(k, v, low=0.1),
    "ASYNCBG_CONNECT_TIMEOUT": lambda k, v: _number(k, v, low=0.1),
    "ASYNCBG_SHUTDOWN_TIMEOUT": lambda k, v: _number(k, v, low=0),
    "ASYNCBG_QUEUE_MAXSIZE": lambda k, v: _count(k, v, low=1),
    "ASYNCBG_JOB_HISTORY_SIZE": lambda k, v: _count(k, v, low=0),
    "ASYNCBG_JOB_HISTORY_AGE": lambda k, v: _number(k, v, low=0),
    "ASYNCBG_HANDLE_SIGNALS": _flag,
    "ASYNCBG_UVLOOP": _flag,
    "ASYNCBG_ASYNC_VIEWS": _flag,
    "ASYNCBG_EAGER": _flag,
    "ASYNCBG_LOCK_DIR": _optional(_path),
    "ASYNCBG_MAX_WORKERS": _optional(lambda k, v: _count(k, v, low=1)),
    "ASYNCBG_ASGI_THREADS": _optional(lambda k, v: _count(k, v, low=1)),
    "ASYNCBG_LOG_HANDLER": _flag,
    "ASYNCBG_MOUNT": _flag,
    "ASYNCBG_DASHBOARD_PREFIX": _prefix,
    "ASYNCBG_DASHBOARD": _flag,
    "ASYNCBG_DASHBOARD_REFRESH": lambda k, v: _number(k, v, low=0, strict=True),
    "ASYNCBG_CONTROL": _flag,
    "ASYNCBG_AUTH": _optional(_callable),
    "ASYNCBG_SHOW_RESULTS": _flag,
    "ASYNCBG_HEALTH_PUBLIC": _flag,
    "ASYNCBG_HEALTH_MAX_LAG": _optional(lambda k, v: _number(k, v, low=0, strict=True)),
    "ASYNCBG_MONITOR": _flag,
    "ASYNCBG_MONITOR_INTERVAL": lambda k, v: _number(k, v, low=0, strict=True),
    "ASYNCBG_BLOCKED_THRESHOLD": lambda k, v: _number(k, v, low=0, strict=True),
    "ASYNCBG_METRICS": _flag,
    "ASYNCBG_METRICS_REGISTRY": _anything,
}


@dataclass(frozen=True)
class Settings:
    """One app's ``ASYNCBG_*`` config, checked (see :data:`DEFAULT_CONFIG`)."""

    autostart: bool
    backend: object
    lease: float
    worker_concurrency: int
    poll_interval: float
    pool_size: int
    statement_timeout: float
    connect_timeout: float
    shutdown_timeout: float
    queue_maxsize: int
    job_history_size: int
    job_history_age: float
    handle_signals: bool
    uvloop: bool
    async_views: bool
    eager: bool
    lock_dir: str | None
    max_workers: int | None
    asgi_threads: int | None
    log_handler: bool
    mount: bool
    dashboard_prefix: str
    dashboard: bool
    dashboard_refresh: float
    control: bool
    auth: object
    show_results: bool
    health_public: bool
    health_max_lag: float | None
    monitor: bool
    monitor_interval: float
    blocked_threshold: float
    metrics: bool
    metrics_registry: object


def load_settings(config: Mapping[str, Any]) -> Settings:
    """Check every ``ASYNCBG_*`` key of ``config`` (missing keys take their
    defaults) and return them as :class:`Settings`.

    :raises ConfigError: for a value of the wrong kind or out of range (a
        :class:`~asyncbg.errors.ConfigTypeError`, also a ``TypeError``, for the
        wrong kind), naming the key.
    """
    values = {
        key.removeprefix("ASYNCBG_").lower(): check(key, config.get(key, DEFAULT_CONFIG[key]))
        for key, check in _CHECKS.items()
    }
    return Settings(**values)

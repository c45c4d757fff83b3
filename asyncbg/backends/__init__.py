"""Where job state is kept: the :class:`~asyncbg.backends.base.Backend` seam
and one module per engine, named after its URL scheme.

:func:`open_backend` turns ``ASYNCBG_BACKEND`` into a backend object: ``None``
(or ``"memory://"``) is the in-memory backend; ``scheme://…`` imports
``asyncbg.backends.<scheme>`` and calls its ``from_url``. A backend module
whose driver is missing raises :class:`~asyncbg.errors.BackendUnavailable`
itself, naming the extra to install.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from ..errors import BackendUnavailable
from .base import Backend, BackendOptions

__all__ = ["Backend", "BackendOptions", "known_schemes", "open_backend"]

# Other spellings of a scheme, as URLs are written elsewhere (SQLAlchemy, redis-py).
_ALIASES = {"postgres": "postgresql", "rediss": "redis"}
_NOT_BACKENDS = frozenset({"base"})


def known_schemes() -> list[str]:
    """Return the URL schemes of the backend modules in this installation."""
    names = (m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    return sorted(n for n in names if n not in _NOT_BACKENDS)


def open_backend(
    spec: object, instance_path: str, options: BackendOptions | None = None
) -> Backend:
    """Return the backend ``spec`` names: None, a URL string, or a backend object.

    A relative path in a file URL resolves against ``instance_path`` (the app's
    instance folder); ``options`` (pool size, timeouts) go to the backends that
    take them. Nothing is connected yet: the loop calls ``open`` at start.

    :raises BackendUnavailable: for an unknown scheme, or a backend whose
        optional driver is not installed.
    :raises ConfigError: for a URL the backend cannot use (it says why).
    """
    if spec is None:
        spec = "memory://"
    if isinstance(spec, Backend):
        return spec
    if not isinstance(spec, str) or "://" not in spec:
        raise BackendUnavailable(
            f"ASYNCBG_BACKEND must be None, a backend object or a URL such as "
            f"'sqlite:///asyncbg.db', not {spec!r}"
        )
    scheme = spec.partition("://")[0].partition("+")[0].lower()
    scheme = _ALIASES.get(scheme, scheme)
    if scheme not in known_schemes():
        raise BackendUnavailable(
            f"ASYNCBG_BACKEND {_redact(spec)!r}: no backend for the scheme {scheme!r} "
            f"(known: {', '.join(known_schemes())})"
        )
    module: Any = importlib.import_module(f"{__name__}.{scheme}")
    backend = module.from_url(spec, instance_path, options or BackendOptions())
    if not isinstance(backend, Backend):  # pragma: no cover - a broken backend module
        raise TypeError(f"{module.__name__}.from_url returned {backend!r}, not a Backend")
    return backend


def _redact(url: str) -> str:
    # Never echo a password from a URL into an error message or a log.
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}{sep}{credentials.partition(':')[0]}:***@{host}"

"""Checks of constructor arguments, said the same way everywhere."""

from __future__ import annotations

__all__ = ["at_least"]


def at_least(name: str, value: int, low: int) -> int:
    """Return ``value``.

    :raises ValueError: naming ``name`` when ``value`` is below ``low``.
    """
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value!r}")
    return value

"""Values made JSON-safe: what the HTTP surface, the CLI and job records serve.

Results, arguments and progress come from user code and may hold anything
(NumPy numbers, NaN, dates, objects with huge or failing reprs). Everything
asyncbg serves as JSON goes through :func:`json_safe` first, so that every
answer parses, with ``allow_nan=False`` semantics.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import math
import numbers
import uuid
from collections.abc import Mapping
from typing import Any, SupportsFloat, cast

from .logthrottle import short_repr

__all__ = ["json_safe"]

_MAX_JSON_DEPTH = 32


def json_safe(value: Any, depth: int = 0) -> Any:
    """``value`` made of what JSON holds: dicts with string keys, lists, strings,
    finite numbers, booleans and None. Never raises.

    NaN and infinities become None; numbers of other types (``numpy.int64``,
    ``Decimal``...) become ints or floats; dates become ISO strings, enums their
    value, dataclasses dicts; anything else, and anything nested deeper than
    32 levels, becomes a repr of at most 200 characters.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)  # IntEnum and friends: a plain int serialises as a number
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if depth >= _MAX_JSON_DEPTH:
        return short_repr(value)
    if isinstance(value, Mapping):
        return {_json_key(k): json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v, depth + 1) for v in value]
    return _json_safe_other(value, depth)


def _json_safe_other(value: Any, depth: int) -> Any:
    # Neither a JSON value nor a container: the types user code returns most,
    # by what they mean; a repr for the rest.
    if isinstance(value, enum.Enum):
        return json_safe(value.value, depth + 1)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        try:
            return json_safe(dataclasses.asdict(value), depth + 1)
        except Exception:
            return short_repr(value)
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        try:  # a numpy scalar (numpy.bool_, numpy.str_...): its Python value
            return json_safe(value.item(), depth + 1)
        except Exception:
            return short_repr(value)
    if isinstance(value, numbers.Number):
        return _json_number(value)
    return short_repr(value)


def _json_number(value: numbers.Number) -> Any:
    # Decimal, Fraction, numpy numbers...: an int or a finite float, else None;
    # a repr if the conversion itself fails.
    try:
        if isinstance(value, numbers.Integral):
            return int(value)
        number = float(cast("SupportsFloat", value))  # Real, or a float-able Number
    except Exception:
        return short_repr(value)
    return number if math.isfinite(number) else None


def _json_key(key: object) -> str:
    if isinstance(key, str):
        return key
    safe = json_safe(key, _MAX_JSON_DEPTH)  # scalars only: containers are not keys
    return safe if isinstance(safe, str) else json.dumps(safe)

"""Argument checking at submit: what a callable accepts (:class:`Arguments`,
:func:`arguments_of`) and whether a call's arguments bind (:func:`check_arguments`).

A call that cannot bind fails in the submitting thread, once, instead of in
every attempt on the loop. The checks are cheap enough for every submit: a few
comparisons, and ``inspect.Signature.bind`` only to word a refusal.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from collections.abc import Callable
from typing import Any

__all__ = ["Arguments", "arguments_of", "check_arguments"]

_EMPTY = inspect.Parameter.empty
_NO_LIMIT = sys.maxsize


class Arguments:
    """What a callable accepts, so that a call's arguments can be checked at submit.

    :meth:`check` first runs a handful of comparisons that are sure to accept
    only what ``inspect.Signature.bind`` accepts, and calls ``bind`` (several
    microseconds) only for what they cannot vouch for, to raise its error.
    """

    __slots__ = (
        "by_keyword",
        "max_positional",
        "min_positional",
        "positional_names",
        "positional_only",
        "required_keywords",
        "required_positional_only",
        "signature",
        "var_keyword",
    )

    def __init__(self, signature: inspect.Signature) -> None:
        self.signature = signature
        kinds = inspect.Parameter
        positional = [
            p
            for p in signature.parameters.values()
            if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)
        ]
        kinds_present = {p.kind for p in signature.parameters.values()}
        self.positional_names = tuple(p.name for p in positional)
        self.positional_only = sum(p.kind is kinds.POSITIONAL_ONLY for p in positional)
        self.required_positional_only = frozenset(
            p.name for p in positional if p.kind is kinds.POSITIONAL_ONLY and p.default is _EMPTY
        )
        self.min_positional = max(
            (i + 1 for i, p in enumerate(positional) if p.default is _EMPTY), default=0
        )
        self.max_positional = (
            _NO_LIMIT if kinds.VAR_POSITIONAL in kinds_present else len(positional)
        )
        # Keyword name -> position; keyword-only names sort after every position.
        self.by_keyword = {
            p.name: i for i, p in enumerate(positional) if p.kind is kinds.POSITIONAL_OR_KEYWORD
        }
        keyword_only = [p for p in signature.parameters.values() if p.kind is kinds.KEYWORD_ONLY]
        self.by_keyword.update((p.name, _NO_LIMIT) for p in keyword_only)
        self.required_keywords = frozenset(p.name for p in keyword_only if p.default is _EMPTY)
        self.var_keyword = kinds.VAR_KEYWORD in kinds_present

    @property
    def accepts_anything(self) -> bool:
        """True for ``(*args, **kwargs)``: no call can fail to bind."""
        return (
            not self.positional_names
            and self.max_positional == _NO_LIMIT
            and self.var_keyword
            and not self.required_keywords
        )

    def fits(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """True if ``fn(*args, **kwargs)`` certainly binds; False if it may not."""
        n = len(args)
        if n > self.max_positional:
            return False
        if not kwargs:
            return n >= self.min_positional and not self.required_keywords
        get = self.by_keyword.get
        for key in kwargs:
            position = get(key)
            if position is None:
                if not self.var_keyword:
                    return False
            elif position < n:  # given twice
                return False
        if n < self.min_positional and not self._keywords_fill_positions(n, kwargs):
            return False
        return kwargs.keys() >= self.required_keywords

    def _keywords_fill_positions(self, n: int, kwargs: dict[str, Any]) -> bool:
        # Fewer positional arguments than required: the keywords must name
        # every required position past the n given, and none of those may be
        # positional-only.
        if n < self.positional_only:
            return False
        return all(name in kwargs for name in self.positional_names[n : self.min_positional])

    def check(self, args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> None:
        """Return if ``fn(*args, **kwargs)`` binds.

        :raises TypeError: naming ``name`` and the signature, if it does not.
        """
        if self.fits(args, kwargs):
            return
        # Positional-only parameters first, in our own words: Signature.bind
        # words them differently across Pythons, and 3.13's binds a
        # positional-only name given as a keyword into **kwargs, which the
        # call itself refuses.
        given_only = self.positional_names[: self.positional_only]
        if not self.var_keyword:
            for key in kwargs:
                if key in given_only:
                    raise self._error(name, f"{key!r} is positional-only, given as a keyword")
        for i, param in enumerate(given_only):
            if i >= len(args) and param in self.required_positional_only:
                raise self._error(name, f"missing a required positional argument: {param!r}")
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise self._error(name, str(exc)) from None

    def _error(self, name: str, why: str) -> TypeError:
        # Annotations left out: under `from __future__ import annotations`
        # they are quoted strings, noise in a one-line error.
        sig = self.signature
        bare = sig.replace(
            parameters=[p.replace(annotation=_EMPTY) for p in sig.parameters.values()],
            return_annotation=_EMPTY,
        )
        return TypeError(f"wrong arguments for {name}{bare}: {why}")


#: Arguments per code object: a closure or lambda made anew for every call
#: shares its code, so it is looked up, not inspected, each time. Bounded by
#: the program's code objects; cleared if code made at run time floods it.
_arguments_cache: dict[types.CodeType, tuple[int, Arguments | None]] = {}
_ARGUMENTS_CACHE_SIZE = 1024


def arguments_of(fn: Callable[..., Any]) -> Arguments | None:
    """What ``fn`` accepts, or None if any call binds or it cannot be told.

    Uses ``fn``'s own signature, not that of a function it wraps
    (``functools.wraps``): a wrapper may pass its callee more than it takes.
    Cached per code object for plain functions.
    """
    if type(fn) is not types.FunctionType:
        return _inspect_arguments(fn)
    code = fn.__code__
    defaults = fn.__defaults__
    n_defaults = len(defaults) if defaults else 0
    cached = _arguments_cache.get(code)
    if cached is not None and cached[0] == n_defaults:  # same code, same defaults
        return cached[1]
    arguments = _inspect_arguments(fn)
    if len(_arguments_cache) >= _ARGUMENTS_CACHE_SIZE:
        _arguments_cache.clear()
    _arguments_cache[code] = (n_defaults, arguments)
    return arguments


def _inspect_arguments(fn: Callable[..., Any]) -> Arguments | None:
    try:
        signature = inspect.signature(fn, follow_wrapped=False)
    except (TypeError, ValueError):  # builtins without a signature, odd callables
        return None
    arguments = Arguments(signature)
    return None if arguments.accepts_anything else arguments


def check_arguments(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], name: str
) -> None:
    """Raise if ``fn(*args, **kwargs)`` would fail to bind (for ad hoc jobs).

    Bound methods and ``functools.partial`` objects are checked through the
    function they call, so that a new one per call costs no inspection.

    :raises TypeError: naming ``name``, if the arguments do not fit.
    """
    if type(fn) is not types.FunctionType:
        while isinstance(fn, functools.partial):
            args = (*fn.args, *args)
            kwargs = {**fn.keywords, **kwargs}
            fn = fn.func
        if type(fn) is types.MethodType and type(fn.__func__) is types.FunctionType:
            args = (fn.__self__, *args)
            fn = fn.__func__
    arguments = arguments_of(fn)
    if arguments is not None:
        arguments.check(args, kwargs, name)

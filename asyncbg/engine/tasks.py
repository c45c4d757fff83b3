"""Tasks: named functions with job options, as ``@bg.task`` makes them.

:class:`TaskOptions` (timeout, retries, backoff), :class:`Task` and the typing
protocols the extension's decorators are declared with (:class:`TaskDecorator`,
:class:`CoroutineFunction`, the :func:`deprecated` shim), plus
:func:`is_async_callable`, which must see through a :class:`Task`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypedDict, TypeVar, overload

from ..errors import ConfigError
from .arguments import arguments_of
from .jobs import Job, TaskOptions  # TaskOptions: also named here, next to Task

__all__ = [
    "CoroutineFunction",
    "Task",
    "TaskDecorator",
    "TaskOptions",
    "TaskSettings",
    "deprecated",
    "is_async_callable",
]

T = TypeVar("T")
P = ParamSpec("P")


class TaskSettings(TypedDict, total=False):
    """The keyword options of ``@bg.task(...)``: those of :class:`TaskOptions`."""

    timeout: float | None
    retries: int
    retry_backoff: float
    retry_backoff_max: float
    durable: bool | None


def require_findable(fn: Callable[..., Any], what: str) -> None:
    """Check that another process can find ``fn`` by its registered name.

    Durable work is stored as a name and JSON arguments, never as code: the
    process that runs it looks the name up in its own registry.

    :raises ConfigError: for a lambda or a function defined inside another one.
    """
    qualname = getattr(fn, "__qualname__", None) or repr(fn)
    if "<locals>" in qualname or "<lambda>" in qualname:
        raise ConfigError(
            f"{what} is durable, so every process must find {qualname!r} by name: define "
            "it at module level (or pass durable=False to keep it in this process)"
        )


def is_async_callable(fn: object) -> bool:
    """True if calling ``fn`` returns an awaitable (sees through ``functools.partial``
    and :class:`Task`)."""
    while True:
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif isinstance(fn, Task):
            # Task.__call__ is a plain method that returns the coroutine.
            return fn.is_async
        else:
            break
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - async callable objects
    )


class Task(Generic[P, T]):
    """A named async or sync function with job options, made by ``@bg.task``.

    ``task.submit(*args, **kwargs)`` runs it in the background and returns a
    :class:`Job`; ``await task.run(*args, **kwargs)`` runs it as a job and
    returns its result; calling ``task(*args)`` calls the function itself,
    unchanged. ``T`` is the function's result: for an ``async def`` function,
    what its coroutine returns.
    """

    def __init__(
        self,
        fn: Callable[P, Awaitable[T]] | Callable[P, T],
        name: str,
        options: TaskOptions,
        submit: Callable[[Task[P, T], tuple[Any, ...], dict[str, Any]], Job[T]],
    ) -> None:
        self.fn = fn
        self.name = name
        self.options = options
        self.is_async = is_async_callable(fn)
        self._submit = submit
        # Once per task: submit then checks its arguments in a few comparisons.
        self._arguments = arguments_of(fn)
        functools.update_wrapper(self, fn)

    def __repr__(self) -> str:
        return f"<asyncbg Task {self.name} {self.options}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Call the function itself: a coroutine for an async task, the value otherwise.

        Typed ``Any``: ``Task[P, T]`` does not record which of the two it wraps
        (``await task.run(...)`` and ``task.submit(...)`` are precisely typed).
        """
        return self.fn(*args, **kwargs)

    def check_arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Return if the function can be called with ``*args, **kwargs``.

        :raises TypeError: naming the task and its signature, if it cannot.
        """
        arguments = self._arguments
        if arguments is not None:
            arguments.check(args, kwargs, self.name)

    def submit(self, *args: P.args, **kwargs: P.kwargs) -> Job[T]:
        """Run the task in the background; return its :class:`Job` at once.

        :raises TypeError: if the arguments do not fit the function's signature
            (checked here, so such a job is never created, run or retried).
        :raises NotRunning: if asyncbg has been stopped.
        """
        return self._submit(self, args, kwargs)

    async def run(self, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run the task as a job and await its result, from any event loop.

        :raises TypeError: if the arguments do not fit the function's signature.
        :raises NotRunning: if asyncbg has been stopped.
        :raises Exception: whatever the job raised; :class:`~asyncbg.JobTimedOut`,
            :class:`~asyncbg.JobCancelled`.
        """
        return await self.submit(*args, **kwargs)


class TaskDecorator(Protocol):
    """What ``bg.task(name=..., ...)`` returns: a decorator making a :class:`Task`.

    Overloaded like ``bg.task`` itself, so that ``Task[P, T]`` gets the result
    an ``async def`` function's coroutine returns, not the coroutine.
    """

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, T]], /) -> Task[P, T]: ...

    @overload
    def __call__(self, fn: Callable[P, T], /) -> Task[P, T]: ...


class CoroutineFunction(Protocol):
    """Any callable returning a coroutine: the overload ``bg.call`` flags.

    A protocol, not ``Callable[..., Coroutine]``: mypy explains a failed call
    through the first overload whose parameters are shaped like the arguments,
    and a bare Callable is shaped like every function, sync ones too.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, Any]: ...


if TYPE_CHECKING:
    from typing_extensions import deprecated as deprecated
else:

    def deprecated(message: str, /, **_options: object) -> Callable[[T], T]:
        """Mark an overload for type checkers (PEP 702); a no-op at run time."""
        return lambda fn: fn

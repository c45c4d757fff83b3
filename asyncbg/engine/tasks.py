"""Tasks: named functions with job options, as ``@bg.task`` makes them.

:class:`TaskOptions` (timeout, retries, backoff), :class:`Task` and the typing
protocols the extension's decorators are declared with (:class:`TaskDecorator`,
:class:`CoroutineFunction`, the :func:`deprecated` shim), plus
:func:`is_async_callable`, which must see through a :class:`Task`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypedDict, TypeVar, overload

from ..errors import ConfigError
from .arguments import arguments_of
from .jobs import Job, TaskOptions  # TaskOptions: also named here, next to Task

__all__ = [
    "CoroutineFunction",
    "SubmitSettings",
    "Submitter",
    "Task",
    "TaskCall",
    "TaskDecorator",
    "TaskOptions",
    "TaskSettings",
    "check_key",
    "deprecated",
    "is_async_callable",
    "is_key",
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
        submitter: Submitter,
    ) -> None:
        self.fn = fn
        self.name = name
        self.options = options
        self.is_async = is_async_callable(fn)
        self._submitter = submitter
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
        return self._submitter._submit_task(self, args, kwargs, SubmitSettings())

    def submit_many(self, calls: Iterable[Sequence[Any]]) -> list[Job[T]]:
        """Submit one job per element of ``calls`` (each the positional
        arguments of one call); return their jobs in order.

        For a durable task every job is stored in one commit before this
        returns: a burst pays one disk sync, not one per job.

        :raises TypeError: if some call's arguments do not fit (nothing is submitted).
        :raises NotRunning: if asyncbg has been stopped.
        :raises BackendError: if the store failed (nothing is stored).
        """
        return self._submitter._submit_many(self, [tuple(c) for c in calls])

    async def submit_async(self, *args: P.args, **kwargs: P.kwargs) -> Job[T]:
        """As :meth:`submit`, awaited from any event loop: for a durable task,
        it returns once the job is stored (an ``async def`` view or job must
        use this one: :meth:`submit` would block the loop to wait for the store).

        :raises TypeError: if the arguments do not fit (or are not JSON, durable).
        :raises NotRunning: if asyncbg has been stopped.
        :raises BackendError: if the store failed.
        """
        return await self._submitter._submit_task_async(self, args, kwargs, SubmitSettings())

    def using(
        self,
        *,
        key: str | None = None,
        job_id: str | None = None,
        connection: object | None = None,
    ) -> TaskCall[P, T]:
        """Return a submitter of this task with per-job settings:
        ``task.using(key="report-42").submit(...)``.

        ``key``: while a job with this key is queued or running, a submit returns
        that job instead of making another (durable tasks). ``job_id``: the id
        the job gets (letters, digits and ``._:-``, at most 128), so that a
        client retrying a submit whose answer it never got does not make two.
        ``connection``: write the job in the caller's open transaction on that
        connection (PostgreSQL: a psycopg connection, or a SQLAlchemy session
        or connection), so that it exists if and only if that transaction
        commits; the submit returns at once, and the job runs after the commit.

        :raises ValueError: for a key or id that is empty, too long or has other characters.
        """
        how = SubmitSettings(check_key(key, "key"), check_key(job_id, "job_id"), connection)
        return TaskCall(self, how)

    async def run(self, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run the task as a job and await its result, from any event loop.

        :raises TypeError: if the arguments do not fit the function's signature.
        :raises NotRunning: if asyncbg has been stopped.
        :raises Exception: whatever the job raised; :class:`~asyncbg.JobTimedOut`,
            :class:`~asyncbg.JobCancelled`.
        """
        return await (await self.submit_async(*args, **kwargs))


_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-")


def is_key(value: str) -> bool:
    """True if ``value`` can be an idempotency key or a job id (generated ids,
    32 hex digits, are too): 1 to 128 letters, digits and ``._:-``."""
    return 0 < len(value) <= 128 and _KEY_CHARS.issuperset(value)


def check_key(value: str | None, what: str) -> str | None:
    """Return an idempotency key or a client-made job id, checked.

    :raises ValueError: if it is empty, longer than 128 or has other characters
        than letters, digits and ``._:-``.
    :raises TypeError: if it is not a string.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, not {type(value).__name__}")
    if not is_key(value):
        raise ValueError(f"{what} must be 1 to 128 letters, digits or '._:-', not {value[:140]!r}")
    return value


@dataclass(frozen=True, slots=True)
class SubmitSettings:
    """Per-job settings of one submit (see :meth:`Task.using`)."""

    key: str | None = None
    job_id: str | None = None
    #: The caller's connection, whose transaction the job is written in.
    connection: object | None = None


class Submitter(Protocol):
    """What a :class:`Task` hands its submits to (the extension)."""

    def _submit_task(
        self, task: Task[Any, T], args: tuple[Any, ...], kwargs: dict[str, Any], how: SubmitSettings
    ) -> Job[T]: ...

    def _submit_many(self, task: Task[Any, T], calls: list[tuple[Any, ...]]) -> list[Job[T]]: ...

    async def _submit_task_async(
        self, task: Task[Any, T], args: tuple[Any, ...], kwargs: dict[str, Any], how: SubmitSettings
    ) -> Job[T]: ...


class TaskCall(Generic[P, T]):
    """A task with per-job settings, from :meth:`Task.using`."""

    __slots__ = ("_how", "_task")

    def __init__(self, task: Task[P, T], how: SubmitSettings) -> None:
        self._task = task
        self._how = how

    def __repr__(self) -> str:
        return f"<TaskCall {self._task.name} {self._how}>"

    def submit(self, *args: P.args, **kwargs: P.kwargs) -> Job[T]:
        """As :meth:`Task.submit`, with these settings."""
        return self._task._submitter._submit_task(self._task, args, kwargs, self._how)

    async def submit_async(self, *args: P.args, **kwargs: P.kwargs) -> Job[T]:
        """As :meth:`Task.submit_async`, with these settings."""
        return await self._task._submitter._submit_task_async(self._task, args, kwargs, self._how)


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

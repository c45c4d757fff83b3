"""Trick 2: eager task start on Python 3.11, as 3.12's ``asyncio.eager_task_factory`` does.

A new task's first step normally waits one loop iteration, and each iteration
costs a ``select()`` call that releases the GIL: with another thread busy,
getting it back costs a whole switch interval (5 ms). 3.12+ has
``asyncio.eager_task_factory`` and needs none of this.

Private asyncio behaviour relied on: ``Task.__init__`` schedules its first step
through ``self._loop.call_soon`` (an instance attribute shadowing that method
catches the step's handle), and ``asyncio.Handle._run`` runs a handle.
:func:`check` tries both on each new loop before the trick is used.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ._tricks import ENV_SWITCH, forced_off

NAME = "eager"

T = TypeVar("T")

#: Python 3.12+ runs a new task's first step at once with this (public) factory;
#: when it exists, the trick below is not needed.
eager_task_factory: Any = getattr(asyncio, "eager_task_factory", None)


class EagerStartLoop(asyncio.SelectorEventLoop):
    """A selector loop that can start a task's first step inside the calling callback."""

    def create_eager_task(
        self,
        coro: Coroutine[Any, Any, T],
        *,
        name: str | None = None,
        context: contextvars.Context | None = None,
    ) -> asyncio.Task[T]:
        """Create a task and run its first step now, as 3.12's eager tasks do (3.11).

        ``Task.__init__`` schedules its first step with ``self.call_soon``: an
        instance attribute shadowing that method for the duration of the call
        catches the step's handle instead of queueing it, and the step runs
        here. Other threads are not affected: ``call_soon_threadsafe`` goes
        through ``_call_soon``. Loop thread only, outside any running task
        (``Task.__step`` refuses to nest).
        """
        captured: list[asyncio.Handle] = []

        def catch_step(
            callback: Callable[..., object],
            *args: Any,
            context: contextvars.Context | None = None,
        ) -> asyncio.Handle:
            handle = asyncio.Handle(callback, args, self, context)
            captured.append(handle)
            return handle

        self.call_soon = catch_step  # type: ignore[method-assign, assignment]
        try:
            task = self.create_task(coro, name=name, context=context)
        finally:
            del self.call_soon
        for handle in captured:
            handle._run()
        return task


def check(loop: asyncio.AbstractEventLoop) -> str | None:
    """Try the trick once on ``loop``; None when it works, else why it is not used.

    Must run on the loop's thread, in a callback outside any task (where
    ``spawn()`` uses it). Not to be called on 3.12+ (the stock factory is used).
    """
    why_not = _unsupported(loop)
    if why_not is not None:
        return why_not
    assert isinstance(loop, EagerStartLoop)
    return _probe(loop)


def _unsupported(loop: asyncio.AbstractEventLoop) -> str | None:
    # What rules the trick out before it is even tried.
    if forced_off(NAME):
        return f"turned off by the {ENV_SWITCH} test switch"
    if not isinstance(loop, EagerStartLoop):
        return "not an asyncbg selector loop"
    if not callable(getattr(asyncio.Handle, "_run", None)):
        return "asyncio.Handle has no _run()"
    if asyncio.current_task(loop) is not None:
        return "checked from inside a running task"
    return None


def _probe(loop: EagerStartLoop) -> str | None:
    # Start one task eagerly and check that its first step ran here, as its
    # own task, and left the loop as it was.
    seen: list[asyncio.Task[Any] | None] = []

    async def probe() -> int:
        seen.append(asyncio.current_task(loop))
        return 42

    try:
        # The method of this module, not an override in a subclass: this checks
        # asyncio, whatever the subclass does with it.
        task = EagerStartLoop.create_eager_task(loop, probe(), name="asyncbg-eager-check")
    except Exception as exc:
        return f"the probe failed: {exc!r}"
    if "call_soon" in vars(loop):
        return "loop.call_soon was left shadowed"
    if not seen or not task.done():
        # The step went to the real call_soon: let it run (harmlessly) later.
        return "Task.__init__ no longer schedules its first step through loop.call_soon"
    if seen[0] is not task or task.cancelled() or task.exception() is not None:
        return "the eagerly run step did not run as its own task"
    if task.result() != 42:
        return "the eager task did not keep its result"
    return None

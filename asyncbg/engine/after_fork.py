"""What a forked child resets: :class:`ResetAfterFork`, the live instances of one
class, each reset by a given function in the child.

A child (a multiprocessing pool, a job that forks) inherits the parent's
objects but not its threads: locks another thread held stay taken, and loops,
jobs and queue items are the parent's to finish. Each class that holds such
state keeps one registry here instead of its own WeakSet and fork hook.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["ResetAfterFork"]

T = TypeVar("T")


class ResetAfterFork(Generic[T]):
    """Calls ``reset(instance)`` in a forked child for every instance still alive
    that was :meth:`add`-ed (held weakly: the registry keeps nothing alive)."""

    __slots__ = ("_instances", "_reset")

    def __init__(self, reset: Callable[[T], object]) -> None:
        self._instances: weakref.WeakSet[T] = weakref.WeakSet()
        self._reset = reset
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset_all)

    def add(self, instance: T) -> None:
        """Reset ``instance`` in every child forked from now on, while it lives."""
        self._instances.add(instance)

    def _reset_all(self) -> None:
        for instance in list(self._instances):
            self._reset(instance)

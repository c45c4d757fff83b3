"""SIGINT/SIGTERM: stop gracefully, then hand the signal on; never die mid-drain.

Outside a server (a script, ``flask run``, a plain WSGI app) the first signal
stops asyncbg in the handler and then goes on to the handler installed before
(Python's default raises ``KeyboardInterrupt`` or ends the process). Under a
server that drives asyncbg's life through ASGI lifespan (``bg.asgi_app()``)
the handler never blocks and never ends the process: the server stops first
and asyncbg drains on lifespan shutdown. In both cases a Ctrl-C during a drain
(or a second one under a server) exits at once and says what it abandons.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from types import FrameType

    from .loop import LoopThread

__all__ = ["ShutdownSignals"]

log = logging.getLogger("asyncbg")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class ShutdownSignals:
    """The SIGINT/SIGTERM handlers of one asyncbg instance.

    :param stop: the graceful stop to run on the first signal (outside a server).
    :param loop_thread: whose drain state decides what a signal means.
    :param still_queued: how many queued items a forced exit abandons.
    """

    def __init__(
        self, stop: Callable[[], object], loop_thread: LoopThread, still_queued: Callable[[], int]
    ) -> None:
        self._stop = stop
        self._loop_thread = loop_thread
        self._still_queued = still_queued
        #: Set once a server drives start and stop through ASGI lifespan.
        self.server_managed = False
        self._handlers: list[tuple[int, _Handler]] = []
        self.reset()

    def reset(self) -> None:
        """Forget signals already seen (a new start)."""
        self._stop_started = False
        self._sigint_seen = False
        self._stopping_in_handler = False

    def reset_after_fork(self) -> None:
        """In a forked child: no server runs it (a job's multiprocessing pool),
        so it must die on SIGTERM again (``Pool.terminate()`` sends it)."""
        self.server_managed = False
        self.reset()

    def install(self) -> None:
        """Put the handlers in front of the current ones (main thread only; else a no-op).

        Each handler hands the signal on to the one it replaced. It holds only
        a weak reference to this object, so an instance dropped without
        :meth:`uninstall` is not kept alive by it; its handler then hands
        every signal straight on. Dead or retired asyncbg handlers found in
        the way are skipped, so restarting instances never grows a chain.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            current = signal.getsignal(sig)
            if isinstance(current, _Handler) and current.owner() is self:
                continue
            handler = _Handler(self, _skip_dead(current))
            signal.signal(sig, handler)
            self._handlers.append((sig, handler))

    def uninstall(self) -> None:
        """Take the handlers out again, once the stop is over.

        Where a handler is still the installed one, the one it replaced comes
        back (this works in the main thread only; elsewhere, and where another
        handler was installed on top, the handler stays but hands signals
        straight on from now on, and the main thread takes it out when a
        signal next comes). Idempotent; never raises.
        """
        handlers, self._handlers = self._handlers, []
        for _sig, handler in handlers:
            handler.retired = True
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in reversed(handlers):
            _take_out(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None, previous: Any) -> None:
        # Under a server it never blocks: the server's loop runs in this same
        # main thread and must go on finishing in-flight requests.
        name = signal.Signals(signum).name
        draining = self._loop_thread.stopping
        if signum == signal.SIGINT and (draining or self._sigint_seen):
            # Ctrl-C while a drain is under way (whoever started it), or a
            # second one under a server: the user will not wait. Exit now.
            self._force_exit(signum)
            return
        if self.server_managed:
            # The server shuts down (and sends lifespan shutdown, which stops
            # us) on its own signal or its supervisor's word. Hand the signal
            # on to a Python handler only (the server's), never to SIG_DFL:
            # Hypercorn's supervisor SIGTERMs every worker still running once
            # the first has exited, and that must not kill one mid-drain.
            if signum == signal.SIGINT:
                self._sigint_seen = True
            if draining:
                log.info("%s received while draining; the drain goes on", name)
            else:
                log.info("%s received; draining once the server stops", name)
            if callable(previous):
                previous(signum, frame)
            return
        if not self._stop_started:
            self._stop_started = True
            log.info("%s received, stopping gracefully", name)
            self._stopping_in_handler = True
            try:
                self._stop()
            finally:
                self._stopping_in_handler = False
        # A second SIGTERM while the first is still draining skips the wait
        # and goes straight on to the previous handler: a forced, fast exit.
        _chain(previous, signum, frame)

    def _force_exit(self, signum: int) -> None:
        # The handler interrupted the main thread anywhere; under a server that
        # may be inside a lock shared with other processes (Hypercorn's workers
        # poll a multiprocessing Event), which dying here would leave taken
        # forever and hang the supervisor. On the server's loop, exit between
        # callbacks.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or self._stopping_in_handler:
            # No loop, or the first signal's handler blocks it in stop(): now.
            self._exit_now(signum)
        else:
            loop.call_soon_threadsafe(self._exit_now, signum)

    def _exit_now(self, signum: int) -> None:
        # Say what is abandoned, then leave without running anything else (exit
        # handlers would wait for the drain again).
        log.warning(
            "%s while shutting down, exiting now: %d running task(s) abandoned, "
            "%d item(s) still queued",
            signal.Signals(signum).name,
            self._loop_thread.task_count,
            self._still_queued(),
        )
        for h in logging.getLogger().handlers + log.handlers:
            with contextlib.suppress(Exception):
                h.flush()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(128 + signum)


class _Handler:
    """One installed handler: its owner's while the owner is in service, else a pass-through.

    An owner is out of service once it is gone (garbage collected) or has
    uninstalled (retired) and is not draining; a Ctrl-C during a drain started
    from another thread must still exit at once.
    """

    __slots__ = ("_owner", "previous", "retired")

    def __init__(self, owner: ShutdownSignals, previous: Any) -> None:
        self._owner = weakref.ref(owner)
        self.previous = previous
        self.retired = False

    def owner(self) -> ShutdownSignals | None:
        owner = self._owner()
        if owner is None or (self.retired and not owner._loop_thread.stopping):
            return None
        return owner

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        previous = _skip_dead(self.previous)
        owner = self.owner()
        if owner is not None:
            owner._handle(signum, frame, previous)
            return
        # Signal handlers run in the main thread: the one place this handler
        # can take itself out of the chain.
        _take_out(signum, self)
        _chain(previous, signum, frame)


def _skip_dead(handler: Any) -> Any:
    """The first handler from ``handler`` down the chain that is not one of ours out of service."""
    while isinstance(handler, _Handler) and handler.owner() is None:
        handler = handler.previous
    return handler


def _take_out(signum: int, handler: _Handler) -> None:
    # Only if nobody installed another handler on top, and the one it replaced
    # can be put back (None: installed outside Python, which signal() cannot).
    previous = _skip_dead(handler.previous)
    if previous is None or signal.getsignal(signum) is not handler:
        return
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signum, previous)


def _chain(previous: Any, signum: int, frame: FrameType | None) -> None:
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    # SIG_IGN or a handler installed outside Python (None): nothing to hand on

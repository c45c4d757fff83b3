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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from types import FrameType

    from .loop_thread import LoopThread

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
        """Put the handlers in front of the current ones (main thread only; else a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            previous = signal.getsignal(sig)
            if getattr(previous, "__asyncbg__", None) is self:
                continue
            signal.signal(sig, self._make_handler(previous))

    def _make_handler(self, previous: Any) -> Callable[[int, FrameType | None], None]:
        # Under a server it never blocks: the server's loop runs in this same
        # main thread and must go on finishing in-flight requests.
        def handler(signum: int, frame: FrameType | None) -> None:
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
                    log.info("asyncbg: %s received while draining; the drain goes on", name)
                else:
                    log.info("asyncbg: %s received; draining once the server stops", name)
                if callable(previous):
                    previous(signum, frame)
                return
            if not self._stop_started:
                self._stop_started = True
                log.info("asyncbg: %s received, stopping gracefully", name)
                self._stopping_in_handler = True
                try:
                    self._stop()
                finally:
                    self._stopping_in_handler = False
            # A second SIGTERM while the first is still draining skips the wait
            # and goes straight on to the previous handler: a forced, fast exit.
            _chain(previous, signum, frame)

        handler.__asyncbg__ = self  # type: ignore[attr-defined]
        return handler

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
            "asyncbg: %s while shutting down, exiting now: %d running task(s) abandoned, "
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


def _chain(previous: Any, signum: int, frame: FrameType | None) -> None:
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    # SIG_IGN or a handler installed outside Python (None): nothing to hand on

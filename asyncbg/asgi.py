"""Serving a Flask app under an ASGI server, with asyncbg started and stopped by it.

Hypercorn serves a plain WSGI app (a Flask app) through its ``WSGIWrapper``,
which ignores the ASGI ``lifespan`` scope: the app never hears that the server
starts or stops. :class:`AsyncBGASGI` answers ``lifespan`` itself and hands
every other scope to Hypercorn's ``AsyncioWSGIMiddleware``, so views still run
on the server's thread pool while asyncbg's loop lives exactly as long as the
server serves. Made by :meth:`AsyncBG.asgi_app <asyncbg.AsyncBG.asgi_app>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from flask import Flask

    from .api import AsyncBG

__all__ = ["DEFAULT_MAX_BODY_SIZE", "AsyncBGASGI"]

log = logging.getLogger("asyncbg")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Hypercorn's own default for WSGI apps (its ``wsgi_max_body_size``): 16 MiB.
DEFAULT_MAX_BODY_SIZE = 16 * 1024 * 1024


class AsyncBGASGI:
    """An ASGI 3 app: lifespan drives ``bg``; HTTP goes to ``flask_app`` via WSGI.

    On ``lifespan.startup`` it starts asyncbg (in a worker thread: the server's
    loop is never blocked) and from then on leaves shutdown to the server:
    SIGTERM and the first SIGINT no longer stop asyncbg by themselves. On
    ``lifespan.shutdown`` (sent once the server has finished its in-flight
    requests) it drains and stops asyncbg, again in a worker thread, and logs
    the shutdown report. Needs an asyncio-based worker (``asyncio`` or
    ``uvloop``), not trio.

    :param max_body_size: larger request bodies get a 400 without reaching Flask.
    """

    def __init__(
        self, bg: AsyncBG, flask_app: Flask, *, max_body_size: int = DEFAULT_MAX_BODY_SIZE
    ) -> None:
        from hypercorn.middleware import AsyncioWSGIMiddleware

        self.bg = bg
        self.flask_app = flask_app
        self.wsgi = AsyncioWSGIMiddleware(flask_app, max_body_size)

    def __repr__(self) -> str:
        return f"<AsyncBGASGI {self.flask_app.name}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection (``http``, ``websocket``) or the server's lifespan."""
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        else:
            await self.wsgi(cast(Any, scope), cast(Any, receive), cast(Any, send))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        wakeup = _SignalWakeup(asyncio.get_running_loop())
        try:
            await self._lifespan_events(receive, send, wakeup)
        finally:
            wakeup.remove()

    async def _lifespan_events(self, receive: Receive, send: Send, wakeup: _SignalWakeup) -> None:
        bg = self.bg
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await asyncio.to_thread(bg.start)
                except Exception as exc:
                    log.exception("asyncbg: could not start under the server")
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    return
                bg._serve_under_server()
                wakeup.install()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # stop() blocks up to the shutdown timeout: off the server's loop.
                log.info("asyncbg: lifespan shutdown, draining for up to %gs", bg.shutdown_timeout)
                try:
                    await asyncio.to_thread(bg.stop)
                except Exception as exc:
                    log.exception("asyncbg: error while stopping under the server")
                    await send({"type": "lifespan.shutdown.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.shutdown.complete"})
                return


class _SignalWakeup:
    """Wake the server's loop (in the main thread) whenever a signal arrives.

    Python runs signal handlers in the main thread only, between bytecodes, but
    the kernel may deliver a signal to any thread. A loop asleep in its selector
    then runs the handler only once something else wakes it; during a drain
    nothing does, so a second Ctrl-C would wait for the drain it should cut
    short. asyncio's ``add_signal_handler`` avoids this with a wake-up fd, which
    Hypercorn installs with ``workers = 0`` only: this supplies one otherwise.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._socks: tuple[socket.socket, socket.socket] | None = None

    def install(self) -> None:
        """Set a wake-up fd read by the loop, unless one is set already. Main thread only."""
        if threading.current_thread() is not threading.main_thread() or self._socks:
            return
        rsock, wsock = socket.socketpair()
        rsock.setblocking(False)
        wsock.setblocking(False)
        previous = signal.set_wakeup_fd(wsock.fileno(), warn_on_full_buffer=False)
        if previous != -1:  # the server's own (asyncio's add_signal_handler): keep it
            signal.set_wakeup_fd(previous)
            rsock.close()
            wsock.close()
            return
        self._socks = (rsock, wsock)
        self._loop.add_reader(rsock.fileno(), self._drain)

    def _drain(self) -> None:
        # The bytes only wake the selector; the handlers run off a flag.
        assert self._socks is not None
        with contextlib.suppress(OSError):
            while self._socks[0].recv(4096):
                pass

    def remove(self) -> None:
        """Undo :meth:`install`."""
        if self._socks is None:
            return
        rsock, wsock = self._socks
        self._socks = None
        with contextlib.suppress(ValueError):  # not the main thread: leave it
            current = signal.set_wakeup_fd(-1)
            if current != wsock.fileno():  # somebody else's by now: put it back
                signal.set_wakeup_fd(current)
        self._loop.remove_reader(rsock.fileno())
        rsock.close()
        wsock.close()

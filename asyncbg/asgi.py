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
import logging
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
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # stop() blocks up to the shutdown timeout: off the server's loop.
                try:
                    await asyncio.to_thread(bg.stop)
                except Exception as exc:
                    log.exception("asyncbg: error while stopping under the server")
                    await send({"type": "lifespan.shutdown.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.shutdown.complete"})
                return

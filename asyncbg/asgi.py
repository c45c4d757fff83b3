"""Serving a Flask app under an ASGI server, with asyncbg started and stopped by it.

Hypercorn serves a plain WSGI app (a Flask app) through its ``WSGIWrapper``,
which ignores the ASGI ``lifespan`` scope (the app never hears that the server
starts or stops) and, in Hypercorn 0.18, answers every empty-bodied response
(HEAD, 204, 304, most OPTIONS) with a 500 because it sends the end of the body
before the response has started (pgjones/hypercorn#331).

:class:`AsyncBGASGI` answers ``lifespan`` itself and serves HTTP through
:class:`WSGIBridge`, asyncbg's own WSGI-to-ASGI bridge: views run on a thread
pool of the bridge's own (``ASYNCBG_ASGI_THREADS`` threads), the health probe
on a small lane of its own, and asyncbg's loop lives exactly as long as the
server serves. Made by :meth:`AsyncBG.asgi_app <asyncbg.AsyncBG.asgi_app>`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import json
import logging
import os
import signal
import socket
import sys
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote_to_bytes

from .engine.checks import at_least

if TYPE_CHECKING:
    from flask import Flask

__all__ = [
    "DEFAULT_MAX_BODY_SIZE",
    "DEFAULT_PROBE_THREADS",
    "DEFAULT_THREADS",
    "THREADS_CONFIG_KEY",
    "AsyncBGASGI",
    "Lifespan",
    "WSGIBridge",
]

log = logging.getLogger("asyncbg")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
StartResponse = Callable[..., Callable[[bytes], None]]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

#: Hypercorn's own default for WSGI apps (its ``wsgi_max_body_size``): 16 MiB.
DEFAULT_MAX_BODY_SIZE = 16 * 1024 * 1024

#: Threads serving views, unless ``ASYNCBG_ASGI_THREADS`` or ``threads=`` says
#: otherwise. Views mostly wait (on ``bg.call``, on an ``async def`` view's
#: coroutine running on asyncbg's loop, on a database), so the count is not tied
#: to the CPUs: Hypercorn's default executor has ``min(32, cpus + 4)`` threads,
#: six on two cores, which eight slow requests fill.
DEFAULT_THREADS = 32

#: Threads reserved for ``GET``/``HEAD <prefix>/health``, so a probe is answered
#: even while slow views hold every view thread.
DEFAULT_PROBE_THREADS = 2

#: The Flask config key read for the number of view threads.
THREADS_CONFIG_KEY = "ASYNCBG_ASGI_THREADS"

# A sender in a view thread waits this long at a time for the server to take a
# message, then checks whether the client is gone.
_SEND_POLL = 0.5

_bridges: weakref.WeakSet[WSGIBridge] = weakref.WeakSet()


def _forget_pools_after_fork() -> None:
    # A forked child has none of the parent's threads; its pools must start afresh.
    for bridge in list(_bridges):
        bridge._pools = {}
        bridge._pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_after_fork)


class Lifespan(Protocol):
    """What the ASGI entry drives: an :class:`~asyncbg.AsyncBG` (or anything
    that starts, stops and can hand its signals over to a server)."""

    @property
    def shutdown_timeout(self) -> float:
        """Seconds ``stop()`` drains for."""
        ...

    def start(self) -> None:
        """Start (blocking until running)."""
        ...

    def serve_under_server(self) -> None:
        """From now on the server decides when to stop."""
        ...

    def stop(self) -> object:
        """Drain and stop (blocking); return the shutdown report."""
        ...


class AsyncBGASGI:
    """An ASGI 3 app: lifespan drives ``bg``; HTTP goes to ``flask_app`` via :class:`WSGIBridge`.

    On ``lifespan.startup`` it starts asyncbg (in a worker thread: the server's
    loop is never blocked) and from then on leaves shutdown to the server:
    SIGTERM and the first SIGINT no longer stop asyncbg by themselves. On
    ``lifespan.shutdown`` (sent once the server has finished its in-flight
    requests) it drains and stops asyncbg, again in a worker thread, and logs
    the shutdown report. Needs an asyncio-based worker (``asyncio`` or
    ``uvloop``), not trio.

    :param max_body_size: larger request bodies get a 400 JSON answer without
        reaching Flask.
    :param threads: threads running views; None reads ``ASYNCBG_ASGI_THREADS``
        from the app's config, and without it uses :data:`DEFAULT_THREADS`.
    :raises ValueError: if ``threads`` is below 1 or ``max_body_size`` below 0.
    """

    def __init__(
        self,
        bg: Lifespan,
        flask_app: Flask,
        *,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        threads: int | None = None,
    ) -> None:
        self.bg = bg
        self.flask_app = flask_app
        if threads is None:
            threads = int(flask_app.config.get(THREADS_CONFIG_KEY) or DEFAULT_THREADS)
        self.bridge = WSGIBridge(
            flask_app,
            max_body_size=max_body_size,
            threads=threads,
            is_probe=self._is_probe,
        )

    def __repr__(self) -> str:
        return f"<AsyncBGASGI {self.flask_app.name}>"

    def _is_probe(self, method: str, path: str) -> bool:
        prefix = self.flask_app.config.get("ASYNCBG_DASHBOARD_PREFIX")
        return bool(prefix) and method in ("GET", "HEAD") and path == f"{prefix}/health"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection (``http``, ``websocket``) or the server's lifespan."""
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        else:
            await self.bridge(scope, receive, send)

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
                if not await _in_a_thread(bg.start, "startup", "could not start", send):
                    return
                bg.serve_under_server()
                wakeup.install()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                log.info("lifespan shutdown, draining for up to %gs", bg.shutdown_timeout)
                try:
                    stopped = await _in_a_thread(bg.stop, "shutdown", "error while stopping", send)
                finally:
                    self.bridge.close()
                if stopped:
                    await send({"type": "lifespan.shutdown.complete"})
                return


async def _in_a_thread(step: Callable[[], object], event: str, failure: str, send: Send) -> bool:
    # start() and stop() block (stop for up to the shutdown timeout): never on
    # the server's loop. A failure is logged and told to the server.
    try:
        await asyncio.to_thread(step)
    except Exception as exc:
        log.exception("%s under the server", failure)
        await send({"type": f"lifespan.{event}.failed", "message": repr(exc)})
        return False
    return True


class _NotUnderRoot(ValueError):
    """The request path is outside the server's ``root_path``."""


class _ClientGone(Exception):
    """The client disconnected (or the server dropped the request) mid-answer."""


class WSGIBridge:
    """An ASGI 3 app serving a WSGI app, with each request on a thread of its own pool.

    Per request: the body is read (up to ``max_body_size`` bytes, else a 400
    JSON answer, at once when ``Content-Length`` says so), the WSGI app runs on
    a pool thread, and its answer goes to the server as it is produced:
    ``http.response.start`` before any body (also when there is none: HEAD,
    204, 304), then the body chunks, and ``more_body: False`` exactly once, with
    the last chunk when ``Content-Length`` is known. The iterable is always
    closed. When the client disconnects the app's iterable is no longer read.
    An app that fails before answering gets a 500 JSON answer (logged); one that
    fails mid-body leaves the response unfinished, which makes the server drop
    the connection rather than pass a truncated body off as complete.

    Header names with an underscore are dropped (``X_Forwarded_For`` would
    otherwise read as ``X-Forwarded-For``). WebSocket connections are refused.

    :param threads: pool threads running the app (views).
    :param is_probe: ``(method, PATH_INFO) -> bool``; true requests run on a
        separate pool of ``probe_threads`` threads.
    :raises ValueError: if a thread count is below 1 or ``max_body_size`` below 0.
    """

    def __init__(
        self,
        wsgi_app: WSGIApp,
        *,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        threads: int = DEFAULT_THREADS,
        is_probe: Callable[[str, str], bool] | None = None,
        probe_threads: int = DEFAULT_PROBE_THREADS,
    ) -> None:
        self.threads = at_least("threads", threads, 1)
        self.probe_threads = at_least("probe_threads", probe_threads, 1)
        self.max_body_size = at_least("max_body_size", max_body_size, 0)
        self.app = wsgi_app
        self._is_probe = is_probe
        self._pools: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
        self._pools_lock = threading.Lock()
        _bridges.add(self)

    def _pool(self, lane: str) -> concurrent.futures.ThreadPoolExecutor:
        # Made on first use: a server that forks workers after importing the app
        # must not have started threads in the parent.
        with self._pools_lock:
            pool = self._pools.get(lane)
            if pool is None:
                size = self.probe_threads if lane == "probe" else self.threads
                pool = concurrent.futures.ThreadPoolExecutor(size, f"asyncbg-{lane}")
                self._pools[lane] = pool
            return pool

    def close(self) -> None:
        """Let the pool threads end once their current request is done; queued ones are dropped.

        A later request makes a new pool.
        """
        with self._pools_lock:
            pools, self._pools = self._pools, {}
        for pool in pools.values():
            pool.shutdown(wait=False, cancel_futures=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ``http`` request, or refuse a ``websocket`` connection.

        :raises ValueError: for any other scope type (``lifespan`` included:
            :class:`AsyncBGASGI` answers that one).
        """
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1000})  # before accept: a 403
        else:
            raise ValueError(f"the WSGI bridge serves http only, not {scope['type']!r}")

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.max_body_size
        too_large = f"the request body must be at most {limit} bytes"
        declared = _content_length(scope.get("headers", ()))
        if declared is not None and declared > limit:
            await _send_json(send, 400, too_large, close=True)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > limit:
                await _send_json(send, 400, too_large, close=True)
                return
            if not message.get("more_body", False):
                break
        try:
            environ = _environ(scope, bytes(body))
        except _NotUnderRoot:
            await _send_json(send, 404, f"nothing at {scope.get('path')!r}")
            return
        method = environ["REQUEST_METHOD"]
        probe = self._is_probe is not None and self._is_probe(method, environ["PATH_INFO"])
        lane = "probe" if probe else "views"
        loop = asyncio.get_running_loop()
        exchange = _Exchange(loop, send, method)
        watcher = asyncio.ensure_future(_watch_disconnect(receive, exchange.gone))
        try:
            await loop.run_in_executor(self._pool(lane), exchange.run, self.app, environ)
        finally:
            # Also when the server cancels us: the view thread stops at its next chunk.
            exchange.gone.set()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


async def _watch_disconnect(receive: Receive, gone: threading.Event) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            return


class _Exchange:
    """One request's answer, produced in a view thread and sent on the server's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, send: Send, method: str) -> None:
        self.gone = threading.Event()
        self._loop = loop
        self._send_async = send
        self._head = method == "HEAD"
        self._status: int | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._length: int | None = None
        self._started = False
        self._finished = False
        self._sent = 0

    # -- the WSGI side -----------------------------------------------------------

    def start_response(
        self,
        status: str,
        headers: list[tuple[str, str]],
        exc_info: ExcInfo | None = None,
    ) -> Callable[[bytes], None]:
        """PEP 3333's ``start_response``: record the status and headers.

        :raises: ``exc_info``'s exception if the headers were sent already.
        :raises RuntimeError: if called a second time without ``exc_info``.
        :raises ValueError: on a status that does not start with a 3-digit code.
        """
        if exc_info is not None:
            if self._started:
                raise exc_info[1].with_traceback(exc_info[2])
        elif self._status is not None:
            raise RuntimeError("start_response called twice without exc_info")
        code = status.split(" ", 1)[0]
        if not (len(code) == 3 and code.isdigit() and code[0] != "0"):
            raise ValueError(f"bad WSGI status {status!r}")
        self._status = int(code)
        self._headers = [
            (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers
        ]
        self._length = _content_length(self._headers)
        return self._chunk

    def run(self, app: WSGIApp, environ: dict[str, Any]) -> None:
        """Run ``app`` for ``environ`` and send its answer (in a pool thread)."""
        if self.gone.is_set():
            # The client left while the request waited for a thread: nobody reads the answer.
            log.debug("client gone before %s started", _describe(environ))
            return
        try:
            iterable = app(environ, self.start_response)
        except Exception:
            log.exception("the WSGI app failed on %s", _describe(environ))
            self._fail()
            return
        try:
            for chunk in iterable:
                self._chunk(chunk)
            self._finish()
        except _ClientGone:
            log.debug("client gone during %s", _describe(environ))
        except Exception:
            log.exception("the WSGI app failed answering %s", _describe(environ))
            self._fail()
        finally:
            close = getattr(iterable, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("closing the answer to %s failed", _describe(environ))

    # -- towards the server ----------------------------------------------------------

    def _chunk(self, data: bytes) -> None:
        if not data:
            return  # PEP 3333: headers wait for the first non-empty chunk
        self._start()
        if self._finished:
            raise RuntimeError(f"the body is longer than its Content-Length ({self._length})")
        if self._no_body():
            return
        self._sent += len(data)
        last = self._length is not None and self._sent >= self._length
        self._send({"type": "http.response.body", "body": bytes(data), "more_body": not last})
        self._finished = last

    def _finish(self) -> None:
        self._start()
        if not self._finished:
            self._finished = True
            self._send({"type": "http.response.body", "body": b"", "more_body": False})

    def _start(self) -> None:
        if self._started:
            return
        if self._status is None:
            raise RuntimeError("the WSGI app sent its answer before calling start_response")
        self._started = True
        self._send(
            {"type": "http.response.start", "status": self._status, "headers": self._headers}
        )

    def _no_body(self) -> bool:
        status = self._status or 0
        return self._head or 100 <= status < 200 or status in (204, 304)

    def _fail(self) -> None:
        if self._started or self.gone.is_set():
            return  # unfinished: the server drops the connection
        self._status, self._length = 500, None
        payload = _json_body(500, "internal server error")
        self._headers = _json_headers(payload, close=False)
        with contextlib.suppress(Exception):
            self._chunk(payload)
            self._finish()

    def _send(self, message: Message) -> None:
        if self.gone.is_set():
            raise _ClientGone
        try:
            future = asyncio.run_coroutine_threadsafe(self._deliver(message), self._loop)
        except RuntimeError:  # the server's loop is closed
            raise _ClientGone from None
        while True:
            try:
                future.result(_SEND_POLL)
                return
            except concurrent.futures.TimeoutError:
                # A slow reader is backpressure; a disconnected one is not coming back.
                if self.gone.is_set():
                    future.cancel()
                    raise _ClientGone from None
            except concurrent.futures.CancelledError:
                raise _ClientGone from None

    async def _deliver(self, message: Message) -> None:
        await self._send_async(message)


def _describe(environ: dict[str, Any]) -> str:
    return f"{environ.get('REQUEST_METHOD')} {environ.get('PATH_INFO')!r}"


def _content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return None
            return length if length >= 0 else None
    return None


def _json_body(status: int, message: str) -> bytes:
    return json.dumps({"error": message, "status": status}).encode()


def _json_headers(payload: bytes, *, close: bool) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"cache-control", b"no-store"),
    ]
    if close:
        headers.append((b"connection", b"close"))
    return headers


async def _send_json(send: Send, status: int, message: str, *, close: bool = False) -> None:
    payload = _json_body(status, message)
    headers = _json_headers(payload, close=close)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


def _environ(scope: Scope, body: bytes) -> dict[str, Any]:
    """The PEP 3333 environ of an ASGI ``http`` scope whose body has been read.

    :raises _NotUnderRoot: if the path is outside the scope's ``root_path``.
    """
    root = (scope.get("root_path") or "").encode("utf-8")
    path = _path_under_root(scope, root)
    server = scope.get("server") or ("localhost", None)
    scheme = scope.get("scheme", "http")
    port = server[1] if server[1] is not None else (443 if scheme == "https" else 80)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": root.decode("latin-1"),
        "PATH_INFO": path.decode("latin-1"),
        "QUERY_STRING": bytes(scope.get("query_string", b"")).decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(port),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scheme,
        "wsgi.input": io.BytesIO(body),
        "wsgi.input_terminated": True,  # the whole body is buffered: reading to EOF is safe
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    client = scope.get("client")
    if client:
        environ["REMOTE_ADDR"] = str(client[0])
        environ["REMOTE_PORT"] = str(client[1])
    _add_headers(environ, scope.get("headers", ()))
    if body and "CONTENT_LENGTH" not in environ:
        environ["CONTENT_LENGTH"] = str(len(body))
    return environ


def _path_under_root(scope: Scope, root: bytes) -> bytes:
    raw_path = scope.get("raw_path")
    if raw_path:
        # raw_path keeps bytes that are not UTF-8, which the decoded path has lost.
        path = unquote_to_bytes(bytes(raw_path).partition(b"?")[0])
    else:
        path = scope["path"].encode("utf-8")
    if root:
        if not (path.startswith(root) and path[len(root) : len(root) + 1] in (b"", b"/")):
            raise _NotUnderRoot(path)
        path = path[len(root) :]
    return path


def _add_headers(environ: dict[str, Any], headers: Iterable[tuple[bytes, bytes]]) -> None:
    authority = None
    for raw_name, raw_value in headers:
        name = bytes(raw_name).decode("latin-1").lower()
        value = bytes(raw_value).decode("latin-1")
        if name == ":authority":
            authority = value
        if name.startswith(":") or "_" in name:
            continue
        key = _HEADER_KEYS.get(name) or "HTTP_" + name.upper().replace("-", "_")
        if key in environ:
            value = environ[key] + ("; " if key == "HTTP_COOKIE" else ", ") + value
        environ[key] = value
    if authority is not None and "HTTP_HOST" not in environ:
        environ["HTTP_HOST"] = authority  # HTTP/2 sends the host as a pseudo-header


_HEADER_KEYS = {"content-type": "CONTENT_TYPE", "content-length": "CONTENT_LENGTH"}


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

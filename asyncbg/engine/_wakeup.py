"""Trick 1: wake-up socket calls that keep the GIL.

``socket.send``/``recv`` release the GIL around the system call; when another
thread is busy, getting it back costs the caller a whole switch interval
(5 ms). The loop's own wake-up socket pair is non-blocking, so holding the GIL
through one-byte sends and draining reads is safe (``ctypes.PyDLL`` calls keep
it).

Private asyncio names relied on: ``loop._csock`` and ``loop._ssock`` (the
socket pair), ``loop._process_self_data`` (what the stock read does with the
bytes) and ``_write_to_self``/``_read_from_self`` (the methods overridden).
:func:`enable` checks them on each new loop before turning the trick on.
"""

from __future__ import annotations

import asyncio
import ctypes
import socket
import sys

from ._tricks import ENV_SWITCH, forced_off

NAME = "wakeup"


class GilHoldingSocketCalls:
    """One-byte ``send`` and a draining ``recv`` on the wake-up sockets that keep the GIL."""

    def __init__(self) -> None:
        libc = ctypes.PyDLL(None)
        self._send = libc.send
        self._send.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]
        self._send.restype = ctypes.c_ssize_t
        self._recv = libc.recv
        self._recv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self._recv.restype = ctypes.c_ssize_t
        self._flags = getattr(socket, "MSG_DONTWAIT", 0)

    def send_byte(self, fd: int) -> None:
        """Send one byte; -1 (EAGAIN, a full buffer) means a wake-up is already pending."""
        self._send(fd, b"\0", 1, self._flags)

    def recv_all(self, fd: int, buf: ctypes.Array[ctypes.c_char]) -> bytes:
        """Return everything pending, read until EAGAIN (-1) or a closed socket (0).

        An interrupted call leaves the socket readable, so the selector returns again.
        """
        chunks: list[bytes] = []
        size = len(buf)
        while True:
            n = self._recv(fd, buf, size, self._flags)
            if n <= 0:
                return b"".join(chunks)
            chunks.append(buf.raw[:n])
            if n < size:
                return b"".join(chunks)


def _gil_holding_socket_calls() -> GilHoldingSocketCalls | None:
    if sys.platform == "win32" or not hasattr(socket, "MSG_DONTWAIT"):
        return None
    try:
        return GilHoldingSocketCalls()
    except (OSError, AttributeError):
        return None


fast_calls = _gil_holding_socket_calls()


class FastWakeupLoop(asyncio.SelectorEventLoop):
    """The stock selector loop whose wake-up socket calls, once enabled, keep the GIL.

    Both ends matter under contention: the submitting thread's write (a view
    would stall 5 ms in ``submit``), and the loop's read after every wake-up
    (asyncio's ``_read_from_self`` makes two ``recv`` calls, each one a chance
    to lose the GIL for 5 ms before the loop gets back to its next ``select``).
    Until :func:`enable` has checked this loop, ``_fast`` is None and both
    calls are asyncio's own.
    """

    _fast: GilHoldingSocketCalls | None = None
    _wake_buf: ctypes.Array[ctypes.c_char] | None = None

    def _write_to_self(self) -> None:
        fast = self._fast
        # _csock is None once the loop is closed: asyncio's own call copes.
        csock = getattr(self, "_csock", None)
        if fast is None or csock is None:
            super()._write_to_self()  # type: ignore[misc]
            return
        fast.send_byte(csock.fileno())

    def _read_from_self(self) -> None:
        fast = self._fast
        ssock = getattr(self, "_ssock", None)
        if fast is None or ssock is None:
            super()._read_from_self()  # type: ignore[misc]
            return
        if self._wake_buf is None:
            self._wake_buf = ctypes.create_string_buffer(4096)
        data = fast.recv_all(ssock.fileno(), self._wake_buf)
        if data:
            self._process_self_data(data)  # type: ignore[attr-defined]


def enable(loop: FastWakeupLoop) -> str | None:
    """Check what the trick relies on for ``loop`` and turn it on; None when it is on.

    Returns why it stays off otherwise. Call before the loop's selector can see
    the socket pair (at loop start, on the loop thread, in its first callback)
    so that the probe byte is read back here and not by the selector.
    """
    loop._fast = None
    if forced_off(NAME):
        return f"turned off by the {ENV_SWITCH} test switch"
    if fast_calls is None:
        return "no GIL-holding send/recv on this platform"
    for base_name in ("_write_to_self", "_read_from_self", "_process_self_data"):
        if not callable(getattr(asyncio.SelectorEventLoop, base_name, None)):
            return f"asyncio's selector loop has no {base_name}()"
    csock = getattr(loop, "_csock", None)
    ssock = getattr(loop, "_ssock", None)
    if not isinstance(csock, socket.socket) or not isinstance(ssock, socket.socket):
        return "the loop has no _csock/_ssock socket pair"
    process = getattr(loop, "_process_self_data", None)
    if not callable(process):
        return "the loop has no _process_self_data()"
    try:
        buf = ctypes.create_string_buffer(4096)
        # Bytes already pending (a signal number, say) go where asyncio's own
        # read would send them, so the probe below reads only its own byte;
        # this also checks _process_self_data takes the bytes as they come.
        pending = fast_calls.recv_all(ssock.fileno(), buf)
        process(pending)
        fast_calls.send_byte(csock.fileno())
        got = fast_calls.recv_all(ssock.fileno(), buf)
    except Exception as exc:
        return f"the probe failed: {exc!r}"
    if got != b"\0":
        return f"a wake-up byte did not round-trip on the socket pair (read {got!r})"
    loop._wake_buf = buf
    loop._fast = fast_calls
    return None

"""Wake-ups between the processes of one host that share a database file: a
folder of Unix datagram sockets per database, one socket per backend object.

The folder is ``<tempfile.gettempdir()>/asyncbg-wake-<h>``, where ``h`` is the
first 16 hex digits of the SHA-256 of the database's real path, so every
process that opens the file (by whatever path) finds the same folder. It is
made with mode 0700 and used only when it is a directory of this user that
nobody else may enter; each socket in it is named ``<pid>-<random>.sock``.

A datagram carries no data: it only says "look at the store, there may be
work". So a lost one costs a poll interval and a spurious one a query, never
correctness; the engine polls anyway. Sending never blocks: a peer whose
queue is full (it has not read yet) is already due to wake, and a socket file
nobody is bound to (``ECONNREFUSED``: its process died) is removed.

A forked child inherits the parent's socket but must not use it: it opens its
own backend, and with it its own socket (``close`` in a child removes nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import socket
import stat
import tempfile
from collections.abc import Callable

__all__ = ["WakeChannel", "wake_folder", "wake_root"]

log = logging.getLogger("asyncbg")

# sun_path holds 108 bytes on Linux and 104 on macOS: stay under both.
_MAX_PATH = 100
# Datagrams read per readable event at most; more wake the next loop turn.
_DRAIN = 256
_SUFFIX = ".sock"
_PING = b"w"


def wake_root() -> str:
    """The folder the per-database folders go in (the system's temporary folder)."""
    return tempfile.gettempdir()


def wake_folder(database: str) -> str:
    """The folder of the wake-up sockets of the database file ``database``."""
    digest = hashlib.sha256(os.fsencode(os.path.realpath(database))).hexdigest()[:16]
    return os.path.join(wake_root(), f"asyncbg-wake-{digest}")


class WakeChannel:
    """This backend object's socket in its database's folder.

    :meth:`open` (on any thread) binds it; :meth:`listen` (on the loop) calls
    ``on_wake`` once per burst of datagrams; :meth:`notify` (on any one thread
    at a time) tells every other socket of the folder; :meth:`close` (on the
    loop) undoes it all.
    """

    def __init__(self, folder: str, name: str, receiver: socket.socket) -> None:
        self.folder = folder
        self.name = name
        self.path = os.path.join(folder, name)
        self._receiver = receiver
        # Unbound: it only sends, from the writer thread, while the loop reads.
        self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sender.setblocking(False)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid = os.getpid()

    @classmethod
    def open(cls, database: str) -> WakeChannel | None:
        """Bind a new socket in the folder of ``database``; None (and a warning
        logged) when that cannot be done: the backend then works without."""
        if not hasattr(socket, "AF_UNIX"):  # pragma: no cover - not on Windows
            return None
        folder = wake_folder(database)
        name = f"{os.getpid()}-{secrets.token_hex(4)}{_SUFFIX}"
        path = os.path.join(folder, name)
        if len(os.fsencode(path)) > _MAX_PATH:
            _give_up(folder, f"the socket path would be over {_MAX_PATH} bytes ({path})")
            return None
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            receiver.setblocking(False)
            # Another process may remove the folder when it empties it at close.
            for attempt in range(3):
                problem = _make_folder(folder)
                if problem is not None:
                    _give_up(folder, problem)
                    receiver.close()
                    return None
                try:
                    receiver.bind(path)
                    break
                except FileNotFoundError:
                    if attempt == 2:
                        raise
            return cls(folder, name, receiver)
        except OSError as exc:
            receiver.close()
            _give_up(folder, f"cannot bind a socket there: {exc}")
            return None

    def listen(self, loop: asyncio.AbstractEventLoop, on_wake: Callable[[], None]) -> None:
        """Call ``on_wake()`` on ``loop`` whenever datagrams arrived, once for
        all of those read together.

        :raises NotImplementedError: for a loop that cannot watch a socket.
        """
        loop.add_reader(self._receiver.fileno(), self._readable, on_wake)
        self._loop = loop

    def _readable(self, on_wake: Callable[[], None]) -> None:
        got = 0
        while got < _DRAIN:
            try:
                self._receiver.recv(16)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # pragma: no cover - nothing else is expected
                log.debug("the wake-up socket %s: %s", self.path, exc)
                break
            got += 1
        if got:
            on_wake()

    def notify(self) -> int:
        """Send one datagram to every other socket of the folder, never
        blocking; return how many were sent. Stale sockets are removed."""
        try:
            names = os.listdir(self.folder)
        except OSError as exc:
            log.debug("cannot list the wake-up folder %s: %s", self.folder, exc)
            return 0
        sent = 0
        for name in names:
            if name == self.name or not name.endswith(_SUFFIX):
                continue
            path = os.path.join(self.folder, name)
            try:
                self._sender.sendto(_PING, path)
                sent += 1
            except ConnectionRefusedError:
                # Nobody is bound to it: its process died without removing it.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            except (FileNotFoundError, BlockingIOError):
                pass  # gone meanwhile; or a full queue, which wakes its reader anyway
            except OSError as exc:
                log.debug("cannot wake %s: %s", path, exc)
        return sent

    def fileno(self) -> int:
        """The receiving socket's descriptor (-1 once closed)."""
        return self._receiver.fileno()

    def close(self) -> None:
        """Stop listening, close both sockets and, in the process that opened
        it, remove the socket file (and the folder, when it is left empty).

        In a forked child only the child's copies of the descriptors are
        closed: the loop's selector (an epoll set shared with the parent) and
        the socket file are the parent's.
        """
        forked = os.getpid() != self._pid
        if self._loop is not None and not forked and self._receiver.fileno() != -1:
            self._loop.remove_reader(self._receiver.fileno())
        self._loop = None
        self._receiver.close()
        self._sender.close()
        if forked:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(self.folder)  # only when empty; another process may be in it


def _make_folder(folder: str) -> str | None:
    # Make the folder or check the one there; the reason it cannot be used, or None.
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        return f"cannot create it: {exc}"
    try:
        info = os.lstat(folder)
    except OSError as exc:
        return f"cannot read it: {exc}"
    if not stat.S_ISDIR(info.st_mode):
        return "it is not a directory"
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        return (
            f"it belongs to another user or others may enter it "
            f"(owner {info.st_uid}, mode {stat.S_IMODE(info.st_mode):o})"
        )
    return None


def _give_up(folder: str, reason: str) -> None:
    log.warning(
        "no wake-ups between processes for this database, which will only "
        "be polled: the wake-up folder %s: %s",
        folder,
        reason,
    )

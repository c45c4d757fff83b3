"""A per-host lock held by one process at a time: a ``flock`` on a file.

The kernel releases it when the holder dies, even by SIGKILL, so another
process can take over without any extra service.
"""

from __future__ import annotations

import contextlib
import os
import re
import weakref

__all__ = ["HostLock"]

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


_instances: weakref.WeakSet[HostLock] = weakref.WeakSet()


def _forget_all_after_fork() -> None:
    for lock in list(_instances):
        lock._forget_if_forked()


if hasattr(os, "register_at_fork"):
    # A forked child (a multiprocessing pool, a job that forks) inherits the
    # holder's descriptor and with it the flock: if the holder then died, the
    # child would keep the lock, without running the job, for as long as it
    # lives. Drop the child's copy at once instead of on its next use.
    os.register_at_fork(after_in_child=_forget_all_after_fork)


class HostLock:
    """An exclusive, non-blocking lock on ``<directory>/<name>.lock``.

    :raises RuntimeError: on platforms without ``fcntl.flock``.
    """

    def __init__(self, directory: str, name: str) -> None:
        if fcntl is None:  # pragma: no cover
            raise RuntimeError("host-scoped periodic jobs need fcntl.flock (POSIX)")
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        self.path = os.path.join(directory, f"{safe}.lock")
        self._fd: int | None = None
        self._pid = 0
        _instances.add(self)

    @property
    def held(self) -> bool:
        """True while this object (in this process) holds the lock."""
        self._forget_if_forked()
        return self._fd is not None

    def _forget_if_forked(self) -> None:
        # A forked child shares the parent's open file and so its flock; the
        # child must not believe it holds the lock. Closing its copy of the fd
        # leaves the parent's lock in place.
        if self._fd is not None and self._pid != os.getpid():
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; return whether it is held now. Never blocks."""
        self._forget_if_forked()
        if self._fd is not None:
            return True
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        self._pid = os.getpid()
        return True

    def release(self) -> None:
        """Let the lock go (closing the file releases the flock)."""
        self._forget_if_forked()
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

"""A per-host lock held by one process at a time: a ``flock`` on a file.

The kernel releases it when the holder dies, even by SIGKILL, so another
process can take over without any extra service.

Lock files have predictable names, so they live by default in a directory of
their own per user (:func:`default_lock_dir`, mode 0700), never loose in the
shared temp dir where anyone could plant a file or a symlink under that name.
Wherever they live, a lock file is opened without following symlinks, and the
process writes its PID into it only when it owns the file and holds the lock.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile

from .after_fork import ResetAfterFork

__all__ = ["HostLock", "HostLockError", "default_lock_dir"]

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


# A forked child (a multiprocessing pool, a job that forks) inherits the
# holder's descriptor and with it the flock: if the holder then died, the
# child would keep the lock, without running the job, for as long as it
# lives. Drop the child's copy at once instead of on its next use.
_after_fork: ResetAfterFork[HostLock] = ResetAfterFork(lambda lock: lock._forget_if_forked())

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# Never block in open() on a FIFO planted under a lock file's name.
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


class HostLockError(OSError):
    """A lock directory or lock file that is unsafe to use (see :class:`HostLock`)."""


def default_lock_dir() -> str:
    """The per-user lock directory: ``<system temp dir>/asyncbg-<uid>``.

    The same for every process of one user on a host (so they share locks),
    different for each user. :class:`HostLock` creates it with mode 0700 and
    refuses it if it is not a private directory of this user. Only computes
    the path; never raises.
    """
    uid = os.geteuid() if hasattr(os, "geteuid") else os.getpid()
    return os.path.join(tempfile.gettempdir(), f"asyncbg-{uid}")


def _open_private_dir(path: str) -> int:
    """Create ``path`` 0700 if missing and open it; refuse it unless it is private.

    :raises HostLockError: if it is a symlink, not a directory, not owned by
        this user, or writable by group or others.
    :raises OSError: if it cannot be created or opened.
    """
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    try:
        fd = os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(path):
            raise HostLockError(f"lock directory {path} is a symlink; refusing it") from exc
        raise
    try:
        st = os.fstat(fd)
        problem = None
        if not stat.S_ISDIR(st.st_mode):
            problem = "is not a directory"
        elif st.st_uid != os.geteuid():
            problem = f"is owned by uid {st.st_uid}, not by this user ({os.geteuid()})"
        elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            problem = f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
        if problem is not None:
            raise HostLockError(
                f"lock directory {path} {problem}; refusing it (remove it, or set "
                "ASYNCBG_LOCK_DIR to a directory only this user can write)"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


class HostLock:
    """An exclusive, non-blocking lock on ``<directory>/<name>.lock``.

    ``directory`` defaults to :func:`default_lock_dir`; that one (given
    explicitly or not) is created with mode 0700 and must be a real directory
    owned by this user and not writable by group or others. Any other
    directory is used as given (created if missing). In both, the lock file is
    opened with ``O_NOFOLLOW``, and this process truncates it and writes its
    PID into it only while it holds the lock and owns the file.

    :raises RuntimeError: on platforms without ``fcntl.flock``.
    """

    def __init__(self, directory: str | None, name: str) -> None:
        if fcntl is None:  # pragma: no cover
            raise RuntimeError("host-scoped periodic jobs need fcntl.flock (POSIX)")
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        self.directory = default_lock_dir() if directory is None else directory
        self.private = os.path.abspath(self.directory) == os.path.abspath(default_lock_dir())
        self.filename = f"{safe}.lock"
        self.path = os.path.join(self.directory, self.filename)
        self._fd: int | None = None
        self._pid = 0
        _after_fork.add(self)

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
        """Take the lock if it is free; return whether it is held now. Never blocks.

        :raises HostLockError: if the default directory is not private (see the
            class), or the lock file is not a regular file.
        :raises OSError: if the directory cannot be created or the file opened
            (a symlink in its place gives ``ELOOP``; too many open files,
            ``EMFILE``; permissions, ``EACCES``).
        """
        self._forget_if_forked()
        if self._fd is not None:
            return True
        fd = self._open()
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise HostLockError(f"lock file {self.path} is not a regular file; refusing it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        # Another user's file (a shared ASYNCBG_LOCK_DIR), or one with other
        # names linked to it, still serves as a lock but is not ours to rewrite.
        if st.st_uid == os.geteuid() and st.st_nlink == 1:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        self._pid = os.getpid()
        return True

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC | _O_NONBLOCK
        if not self.private:
            os.makedirs(self.directory, exist_ok=True)
            return os.open(self.path, flags, 0o644)
        # Through the directory's descriptor: the directory checked is the one
        # the file is created in, whatever is renamed meanwhile.
        dir_fd = _open_private_dir(self.directory)
        try:
            return os.open(self.filename, flags, 0o644, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)

    def release(self) -> None:
        """Let the lock go (closing the file releases the flock)."""
        self._forget_if_forked()
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

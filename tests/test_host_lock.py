"""HostLock against planted files: symlinks, hard links, FIFOs, other users' files and dirs."""

from __future__ import annotations

import fcntl
import os
import stat
import tempfile
import threading
from pathlib import Path

import pytest

from asyncbg.engine.host_lock import HostLock, HostLockError, default_lock_dir

WAIT = 10.0
OTHER_UID = 54321  # a user that owns nothing on the machine
root_only = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="making a file owned by another user needs root",
)


@pytest.fixture
def tmpdir_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The system temp dir, as asyncbg sees it, is this test's own directory."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def private_dir(tmp: Path) -> Path:
    return tmp / f"asyncbg-{os.geteuid()}"


# -- the default directory ------------------------------------------------------------


def test_default_lock_dir_is_per_user_under_the_temp_dir(tmpdir_is: Path) -> None:
    assert default_lock_dir() == str(private_dir(tmpdir_is))


def test_asyncbg_uses_the_private_dir_unless_told_otherwise(make_app, tmpdir_is: Path) -> None:
    _app, bg = make_app()
    assert bg.lock_dir == str(private_dir(tmpdir_is))
    _app2, configured = make_app(ASYNCBG_LOCK_DIR=str(tmpdir_is / "mine"))
    assert configured.lock_dir == str(tmpdir_is / "mine")


def test_a_host_scoped_job_keeps_its_lock_file_out_of_the_shared_temp_dir(
    make_app, tmpdir_is: Path
) -> None:
    _app, bg = make_app(import_name="shared_tmp")
    ran = threading.Event()

    @bg.periodic(every=0.02, scope="host", name="chore")
    async def chore() -> None:
        ran.set()

    bg.start()
    assert ran.wait(WAIT)
    assert not list(tmpdir_is.glob("*.lock")), "a lock file was created in the shared temp dir"
    directory = private_dir(tmpdir_is)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    lock_file = directory / "asyncbg-shared_tmp-chore.lock"
    assert lock_file.read_text() == f"{os.getpid()}\n"


def test_the_default_dir_is_created_0700_even_with_a_lax_umask(tmpdir_is: Path) -> None:
    lock = HostLock(None, "x")
    old = os.umask(0)
    try:
        assert lock.try_acquire()
    finally:
        os.umask(old)
        lock.release()
    assert stat.S_IMODE(private_dir(tmpdir_is).stat().st_mode) == 0o700


def test_two_processes_of_one_user_share_the_default_dir(tmpdir_is: Path) -> None:
    # Two locks in one process stand for two processes: flock is per open file.
    first, second = HostLock(None, "shared"), HostLock(None, "shared")
    assert first.try_acquire()
    assert not second.try_acquire()
    first.release()
    assert second.try_acquire()
    second.release()


def test_a_symlink_planted_as_the_default_dir_is_refused(tmpdir_is: Path) -> None:
    elsewhere = tmpdir_is / "attacker"
    elsewhere.mkdir(mode=0o700)
    private_dir(tmpdir_is).symlink_to(elsewhere)
    with pytest.raises(HostLockError, match="symlink"):
        HostLock(None, "x").try_acquire()
    assert list(elsewhere.iterdir()) == []


def test_a_group_or_world_writable_default_dir_is_refused(tmpdir_is: Path) -> None:
    directory = private_dir(tmpdir_is)
    directory.mkdir()
    directory.chmod(0o777)
    with pytest.raises(HostLockError, match="writable by group or others"):
        HostLock(None, "x").try_acquire()
    assert list(directory.iterdir()) == []


def test_a_plain_file_in_place_of_the_default_dir_is_refused(tmpdir_is: Path) -> None:
    private_dir(tmpdir_is).write_text("")
    with pytest.raises(OSError, match="Not a directory"):
        HostLock(None, "x").try_acquire()


@root_only
def test_a_default_dir_owned_by_another_user_is_refused(tmpdir_is: Path) -> None:
    directory = private_dir(tmpdir_is)
    directory.mkdir(mode=0o700)
    os.chown(directory, OTHER_UID, OTHER_UID)
    with pytest.raises(HostLockError, match=f"owned by uid {OTHER_UID}"):
        HostLock(None, "x").try_acquire()
    assert list(directory.iterdir()) == []


# -- the lock file, in any directory --------------------------------------------------


def test_a_symlink_planted_as_the_lock_file_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    locks = tmp_path / "locks"
    locks.mkdir()
    (locks / "x.lock").symlink_to(victim)
    with pytest.raises(OSError, match="symbolic links"):
        HostLock(str(locks), "x").try_acquire()
    assert victim.read_text() == "precious\n"


def test_a_lock_file_hard_linked_to_another_file_is_locked_but_not_rewritten(
    tmp_path: Path,
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    locks = tmp_path / "locks"
    locks.mkdir()
    os.link(victim, locks / "x.lock")
    lock = HostLock(str(locks), "x")
    assert lock.try_acquire()
    lock.release()
    assert victim.read_text() == "precious\n"


def test_a_fifo_planted_as_the_lock_file_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "x.lock")
    with pytest.raises(HostLockError, match="not a regular file"):
        HostLock(str(tmp_path), "x").try_acquire()


@root_only
def test_a_lock_file_owned_by_another_user_is_locked_but_not_rewritten(tmp_path: Path) -> None:
    theirs = tmp_path / "x.lock"
    theirs.write_text("theirs\n")
    os.chown(theirs, OTHER_UID, OTHER_UID)
    lock = HostLock(str(tmp_path), "x")
    assert lock.try_acquire()
    lock.release()
    assert theirs.read_text() == "theirs\n"


def test_the_pid_is_written_only_by_the_holder(tmp_path: Path) -> None:
    holder, other = HostLock(str(tmp_path), "x"), HostLock(str(tmp_path), "x")
    assert holder.try_acquire()
    path = Path(holder.path)
    path.write_text("holder's\n")  # stands for another process's PID
    assert not other.try_acquire()
    assert path.read_text() == "holder's\n"
    holder.release()


def test_the_lock_descriptor_is_not_inherited_by_exec(tmp_path: Path) -> None:
    lock = HostLock(str(tmp_path), "x")
    assert lock.try_acquire()
    try:
        assert lock._fd is not None
        assert fcntl.fcntl(lock._fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        lock.release()


def test_a_configured_dir_is_used_as_given_and_created_if_missing(tmp_path: Path) -> None:
    target = tmp_path / "real"
    target.mkdir(mode=0o755)
    link = tmp_path / "configured"
    link.symlink_to(target)  # an admin's symlinked lock dir is theirs to choose
    lock = HostLock(str(link), "x")
    assert lock.try_acquire()
    lock.release()
    assert (target / "x.lock").is_file()
    fresh = HostLock(str(tmp_path / "a" / "b"), "y")
    assert fresh.try_acquire()
    fresh.release()

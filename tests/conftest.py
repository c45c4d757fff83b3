"""Shared fixtures: Flask apps with an AsyncBG bound, stopped at teardown."""

from __future__ import annotations

import glob
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask

from asyncbg import AsyncBG, LoopThread
from asyncbg.backends._wake import wake_root
from tests.servers import PostgresServer, RedisServer

MakeApp = Callable[..., tuple[Flask, AsyncBG]]


@pytest.fixture
def make_app() -> Iterator[MakeApp]:
    """Factory: ``app, bg = make_app(**config)``.

    Signal handling is off and autostart is off unless a test asks for them, so
    a test registers its jobs and consumers first and then calls ``bg.start()``.
    ``bind=False`` returns an unbound ``AsyncBG()`` for ``init_app`` tests.
    Every AsyncBG made is stopped at teardown.
    """
    made: list[AsyncBG] = []
    # The apps are kept, as module-level apps are: asyncbg holds an app
    # strongly only while its loop runs.
    apps: list[Flask] = []

    def make(
        *, import_name: str = "asyncbg_test_app", bind: bool = True, **config: Any
    ) -> tuple[Flask, AsyncBG]:
        app = Flask(import_name)
        app.config.update({"ASYNCBG_HANDLE_SIGNALS": False, "ASYNCBG_AUTOSTART": False, **config})
        bg = AsyncBG(app) if bind else AsyncBG()
        made.append(bg)
        apps.append(app)
        return app, bg

    yield make
    for bg, app in zip(made, apps, strict=True):
        with app.app_context():  # the one it was made for, even if it serves several
            bg.stop(timeout=1.0)


@pytest.fixture
def make_lt() -> Iterator[Callable[..., LoopThread]]:
    """Factory for LoopThreads (not started); every one is stopped at teardown."""
    made: list[LoopThread] = []

    def make(**kwargs: Any) -> LoopThread:
        kwargs.setdefault("name", f"lt-test-{len(made)}")
        lt = LoopThread(**kwargs)
        made.append(lt)
        return lt

    yield make
    for lt in made:
        lt.stop(timeout=1.0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(autouse=True, scope="session")
def _no_wake_folders_left_behind() -> Iterator[None]:
    """Remove the SQLite wake-up folders this session made whose every socket
    belongs to a dead process: the failure tests kill servers with ``kill -9``,
    which cannot clean up, and their databases (in tmp_path) are gone."""
    pattern = os.path.join(wake_root(), "asyncbg-wake-*")
    before = set(glob.glob(pattern))
    yield
    for folder in set(glob.glob(pattern)) - before:
        names = os.listdir(folder) if os.path.isdir(folder) else []
        pids = [int(n.split("-", 1)[0]) for n in names if n.split("-", 1)[0].isdigit()]
        if len(pids) == len(names) and not any(_alive(pid) for pid in pids):
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throw-away PostgreSQL for the session (``tests/servers.py``): started
    on a free loopback port as the first test asks for it, stopped by PID at
    the end. Tests keep apart by schema (:func:`pg_schema`) or database."""
    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One throw-away ``redis-server`` for the session (``tests/servers.py``),
    with AOF on: started on a free loopback port as the first test asks for
    it, killed by PID at the end. Tests keep apart by key prefix
    (:func:`redis_prefix`)."""
    server = RedisServer()
    try:
        yield server.start()
    finally:
        server.cleanup()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix no other test uses."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def pg_schema() -> str:
    """A schema name no other test uses (the backend creates it)."""
    return f"t_{uuid.uuid4().hex[:12]}"

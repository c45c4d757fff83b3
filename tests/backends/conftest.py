"""The backends the contract suite runs against.

A factory takes the test's ``tmp_path`` and is an async context manager that
yields a new, empty backend (not yet opened) and cleans up after it: it may
start a server, make a database or a file there. The ``backend`` fixture opens
and migrates what it yields, and closes it at teardown. Adding a backend to the
suite is one more line in :data:`BACKENDS` (``marks=`` can skip it when its
server or driver is missing).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest

from asyncbg.backends.base import Backend
from asyncbg.backends.memory import MemoryBackend
from asyncbg.backends.sqlite import SQLiteBackend
from tests.servers import PostgresServer, RedisServer

BackendFactory = Callable[[Path], AbstractAsyncContextManager[Backend]]


@asynccontextmanager
async def memory_backend(tmp_path: Path) -> AsyncIterator[Backend]:
    yield MemoryBackend()


@asynccontextmanager
async def sqlite_backend(tmp_path: Path) -> AsyncIterator[Backend]:
    yield SQLiteBackend(str(tmp_path / "asyncbg.db"))


def postgres_backend(server: PostgresServer) -> BackendFactory:
    @asynccontextmanager
    async def make(tmp_path: Path) -> AsyncIterator[Backend]:
        # The session's server; a schema of its own per test.
        from asyncbg.backends.postgresql import PostgresBackend

        schema = f"t_{uuid.uuid4().hex[:12]}"
        yield PostgresBackend(server.url(), schema=schema)
        server.psql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    return make


def redis_backend(server: RedisServer) -> BackendFactory:
    @asynccontextmanager
    async def make(tmp_path: Path) -> AsyncIterator[Backend]:
        # The session's server; a key prefix of its own per test.
        from asyncbg.backends.redis import RedisBackend

        backend = RedisBackend(server.url(), prefix=f"t{uuid.uuid4().hex[:12]}")
        yield backend
        await drop_keys(server.url(), backend.prefix)

    return make


async def drop_keys(url: str, prefix: str) -> None:
    """Delete every key of a Redis backend's prefix."""
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(url)
    try:
        async for key in client.scan_iter(match="{" + prefix + "}:*", count=1000):
            await client.delete(key)
    finally:
        await client.aclose()


BACKENDS = [
    pytest.param(memory_backend, id="memory"),
    pytest.param(sqlite_backend, id="sqlite"),
    pytest.param("postgresql", id="postgresql"),
    pytest.param("redis", id="redis"),
]


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """An opened, migrated, empty backend of each kind in :data:`BACKENDS`
    (PostgreSQL: the session's server, ``postgres_server``; Redis: ``redis_server``)."""
    factory: BackendFactory = request.param
    if request.param == "postgresql":
        factory = postgres_backend(request.getfixturevalue("postgres_server"))
    elif request.param == "redis":
        factory = redis_backend(request.getfixturevalue("redis_server"))
    async with factory(tmp_path) as made:
        await made.open()
        try:
            await made.migrate()
            yield made
        finally:
            await made.close()

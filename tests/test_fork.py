"""After os.fork() the child drops the parent's loop and starts its own on first use."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, current_app
from helpers_core import WAIT, in_child

from asyncbg import AsyncBG, LoopThread


@pytest.fixture
def lt() -> Iterator[LoopThread]:
    loop_thread = LoopThread(name="fork-test")
    loop_thread.start()
    yield loop_thread
    loop_thread.stop(timeout=1.0)


async def _thread_ident() -> int:
    return threading.get_native_id()


async def _where() -> dict[str, int]:
    return {"pid": os.getpid(), "loop": id(asyncio.get_running_loop())}


def test_child_does_not_inherit_a_running_loop_thread(lt: LoopThread) -> None:
    parent_thread: int = lt.call(threading.get_native_id)

    def child() -> dict[str, Any]:
        inherited = lt.running
        # The first use starts the child's own loop, as the parent had one.
        ident = lt.submit(_thread_ident()).result(WAIT)
        return {"inherited": inherited, "running": lt.running, "same": ident == parent_thread}

    assert in_child(child) == {"inherited": False, "running": True, "same": False}


def test_child_starts_its_own_loop_on_a_new_thread(lt: LoopThread) -> None:
    parent_loop = lt.loop
    parent_thread = lt.call(threading.current_thread)

    def child() -> dict[str, Any]:
        lt.start()
        where = lt.submit(_where()).result(WAIT)
        child_thread = lt.call(threading.current_thread)
        return {
            "pid": where["pid"],
            "new_loop": lt.loop is not parent_loop and where["loop"] != id(parent_loop),
            "new_thread": child_thread is not parent_thread and child_thread.is_alive(),
        }

    result = in_child(child)
    assert result["pid"] != os.getpid()
    assert result["new_loop"] is True
    assert result["new_thread"] is True


def test_child_can_stop_its_own_loop(lt: LoopThread) -> None:
    def child() -> dict[str, Any]:
        lt.start()
        lt.submit(_where()).result(WAIT)
        report = lt.stop(timeout=2.0)
        return {"finished": report.finished, "running": lt.running}

    assert in_child(child) == {"finished": True, "running": False}


def test_child_leaves_the_parents_loop_open(lt: LoopThread) -> None:
    parent_loop = lt.loop

    def child() -> dict[str, Any]:
        lt.start()
        lt.stop(timeout=2.0)
        # The inherited loop object (and its file descriptors) is never closed here.
        return {"parent_loop_closed": parent_loop.is_closed()}

    assert in_child(child) == {"parent_loop_closed": False}


def test_parent_loop_still_works_after_a_fork(lt: LoopThread) -> None:
    loop = lt.loop

    def child() -> dict[str, Any]:
        lt.start()
        lt.submit(_where()).result(WAIT)
        lt.stop(timeout=2.0)
        return {}

    in_child(child)
    assert lt.running
    assert lt.loop is loop
    assert lt.submit(_where()).result(WAIT) == {"pid": os.getpid(), "loop": id(loop)}


def test_asyncbg_in_a_child_runs_jobs_on_its_own_loop() -> None:
    app = Flask("fork_app")
    app.config.update(ASYNCBG_HANDLE_SIGNALS=False)
    bg = AsyncBG(app)
    try:
        parent_loop = bg.loop_thread.loop

        async def job() -> dict[str, Any]:
            return {"pid": os.getpid(), "app": current_app.name}

        def child() -> dict[str, Any]:
            out = bg.submit(job).result(WAIT)  # starts the child's loop lazily
            out["new_loop"] = bg.loop_thread.loop is not parent_loop
            with contextlib.suppress(Exception):
                bg.stop(timeout=2.0)
            return out

        result = in_child(child)
        assert result["pid"] != os.getpid()
        assert result["app"] == "fork_app"
        assert result["new_loop"] is True
        assert bg.submit(job).result(WAIT)["pid"] == os.getpid()
    finally:
        bg.stop(timeout=1.0)

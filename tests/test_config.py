"""Config keys that change how the loop runs: each one has the effect it documents."""

from __future__ import annotations

import asyncio
import threading

from helpers_core import WAIT


def test_uvloop_switch_runs_jobs_and_async_views_on_a_uvloop_loop(make_app):
    app, bg = make_app(ASYNCBG_UVLOOP=True)

    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    @app.get("/loop")
    async def view():
        return {"loop": await loop_module(), "job": await bg.run(loop_module)}

    bg.start()
    assert bg.submit(loop_module).result(WAIT).startswith("uvloop")
    body = app.test_client().get("/loop").get_json()
    assert body["loop"].startswith("uvloop"), body
    assert body["job"].startswith("uvloop"), body


def test_default_loop_is_asyncio(make_app):
    _app, bg = make_app()

    async def is_selector_loop() -> bool:
        return isinstance(asyncio.get_running_loop(), asyncio.SelectorEventLoop)

    bg.start()
    assert bg.submit(is_selector_loop).result(WAIT) is True


def test_max_workers_bounds_the_threads_that_run_sync_jobs(make_app):
    _app, bg = make_app(ASYNCBG_MAX_WORKERS=2)
    # Pairs meet at the barrier: with two threads the jobs pass two by two, with
    # more threads (a broken bound) all six run at once on six threads.
    barrier = threading.Barrier(2, timeout=WAIT)
    names: set[str] = set()

    def sync_job() -> None:
        names.add(threading.current_thread().name)
        barrier.wait()

    bg.start()
    jobs = [bg.submit(sync_job) for _ in range(6)]
    for job in jobs:
        job.result(WAIT)
    assert len(names) == 2, names


def test_queue_maxsize_is_the_default_capacity_of_consumers(make_app):
    _app, bg = make_app(ASYNCBG_QUEUE_MAXSIZE=3)

    @bg.consumer("small")
    async def small(item: object) -> None: ...

    @bg.consumer("big", maxsize=50)
    async def big(item: object) -> None: ...

    assert bg.get_queue("small").maxsize == 3
    assert bg.get_queue("big").maxsize == 50

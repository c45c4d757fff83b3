"""The things being compared: the baselines users would pick instead, and asyncbg.

Every subject runs work given as a plain callable ``body`` (called where the
job starts) so that all of them do exactly the same work.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

Body = Callable[[], object]


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def have_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


class RawLoop:
    """A bare event loop in a thread: the floor for this design."""

    def __init__(self, kind: str = "asyncio") -> None:
        self.kind = kind
        self.loop = new_loop(kind)
        ready = threading.Event()
        self.thread = threading.Thread(target=self._main, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _main(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(ready.set)
        self.loop.run_forever()

    def rcts(self, body: Body) -> concurrent.futures.Future[None]:
        return asyncio.run_coroutine_threadsafe(_call(body), self.loop)

    def cst(self, body: Body) -> None:
        self.loop.call_soon_threadsafe(body)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def _call(body: Body) -> None:
    body()


class SeedPoller:
    """The seed pattern: a thread polling a queue.Queue, sleeping 1 s when empty."""

    def __init__(self) -> None:
        self.q: queue.Queue[Body | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                body = self.q.get_nowait()
            except queue.Empty:
                time.sleep(1)
                continue
            if body is None:
                return
            body()

    def submit(self, body: Body) -> None:
        self.q.put(body)

    def close(self) -> None:
        self.q.put(None)
        self.thread.join(5)


class Pool:
    """concurrent.futures.ThreadPoolExecutor, what Flask-Executor wraps."""

    def __init__(self, workers: int | None = None) -> None:
        self.ex = concurrent.futures.ThreadPoolExecutor(workers)
        # start its threads now so that no sample pays for thread creation
        for f in [self.ex.submit(time.sleep, 0.001) for _ in range(self.ex._max_workers)]:
            f.result()

    def submit(self, body: Body) -> concurrent.futures.Future[object]:
        return self.ex.submit(body)

    def close(self) -> None:
        self.ex.shutdown(wait=True)


def make_bg(kind: str = "asyncio", **config: Any) -> tuple[Any, Any]:
    """A Flask app with asyncbg, a task and a queue consumer that call their item."""
    from flask import Flask

    from asyncbg import AsyncBG

    app = Flask(f"bench_{kind}")
    app.config.update(
        ASYNCBG_UVLOOP=kind == "uvloop",
        ASYNCBG_HANDLE_SIGNALS=False,
        ASYNCBG_AUTOSTART=False,
        ASYNCBG_QUEUE_MAXSIZE=1_000_000,
        **config,
    )
    bg = AsyncBG(app)

    @bg.task
    async def call_body(body: Body) -> None:
        body()

    @bg.consumer("bench", concurrency=1)
    async def consume(body: Body) -> None:
        body()

    bg.start()
    return app, bg


class AsyncBGSubject:
    """asyncbg's entry points on one loop type."""

    def __init__(self, kind: str = "asyncio") -> None:
        self.app, self.bg = make_bg(kind)
        self.task = self.bg.tasks["call_body"]
        self.lt = self.bg.loop_thread

    def lt_submit(self, body: Body) -> object:
        return self.lt.submit(_call(body))

    def bg_submit(self, body: Body) -> object:
        return self.bg.submit(_call, body)

    def task_submit(self, body: Body) -> object:
        return self.task.submit(body)

    def enqueue(self, body: Body) -> None:
        self.bg.enqueue("bench", body, timeout=None)

    def close(self) -> None:
        self.bg.stop(5)


def ablated_loop_thread(without: str) -> Any:
    """A started LoopThread with one of asyncbg's loop changes undone, to show
    what each one buys in the same run: ``"eager"`` (the first step of a task
    waits for the next loop iteration, as in stock asyncio on 3.11) or
    ``"wakeup"`` (asyncio's own wake-up socket calls, which release the GIL)."""
    import asyncbg.engine.loop as lt_mod
    from asyncbg.engine._daemon_executor import DaemonExecutor

    base = lt_mod._SelectorLoop

    class NoEager(base):  # type: ignore[misc, valid-type]
        def create_eager_task(self, coro: Any, *, name: Any = None, context: Any = None) -> Any:
            return self.create_task(coro, name=name, context=context)

    class StockWakeup(base):  # type: ignore[misc, valid-type]
        _write_to_self = asyncio.SelectorEventLoop._write_to_self  # type: ignore[attr-defined]
        _read_from_self = asyncio.SelectorEventLoop._read_from_self  # type: ignore[attr-defined]

    loop_cls = {"eager": NoEager, "wakeup": StockWakeup}[without]

    class Ablated(lt_mod.LoopThread):
        def _new_loop(self) -> asyncio.AbstractEventLoop:
            loop = loop_cls()
            loop.set_default_executor(DaemonExecutor(self.max_workers, f"{self.name}-worker"))
            return loop  # type: ignore[no-any-return]

    lt = Ablated(f"ablated-{without}")
    lt.start()
    return lt

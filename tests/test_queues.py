"""Queue consumers: bounded queues, concurrency, producers in any thread or loop."""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import Any

import pytest
from flask import current_app, g

from asyncbg import QueueFull, UnknownQueue

WAIT = 15.0


class Gate:
    """An asyncio.Event on the bg loop that the test thread opens."""

    def __init__(self, bg: Any) -> None:
        self.bg = bg
        self.event = asyncio.Event()

    async def wait(self) -> None:
        await self.event.wait()

    def open(self) -> None:
        self.bg.call(self.event.set)


def settle(bg: Any) -> None:
    """Return once the loop has run everything posted before (two loop turns)."""
    bg.call(lambda: None)
    bg.call(lambda: None)


def test_consumer_handles_every_item(make_app):
    _app, bg = make_app()
    got: list[int] = []

    @bg.consumer("numbers")
    async def handle(item: int) -> None:
        got.append(item)

    bg.start()
    for i in range(20):
        bg.enqueue("numbers", i)
    bg.wait_idle(WAIT)
    assert got == list(range(20))


def test_consumer_runs_at_most_concurrency_items_at_once(make_app):
    _app, bg = make_app()
    active = 0
    max_active = 0
    handled = 0
    bg.start()
    gate = Gate(bg)

    @bg.consumer("work", concurrency=3, maxsize=100)
    async def handle(item: int) -> None:
        nonlocal active, max_active, handled
        active += 1
        max_active = max(max_active, active)
        try:
            await gate.wait()
        finally:
            active -= 1
            handled += 1

    for i in range(10):
        bg.enqueue("work", i)
    settle(bg)
    assert bg.call(lambda: active) == 3
    gate.open()
    bg.wait_idle(WAIT)
    assert handled == 10
    assert max_active == 3


def test_enqueue_from_many_threads_delivers_each_item_once(make_app):
    _app, bg = make_app()
    seen: collections.Counter[tuple[int, int]] = collections.Counter()

    @bg.consumer("many", concurrency=4, maxsize=10_000)
    async def handle(item: tuple[int, int]) -> None:
        seen[item] += 1

    bg.start()
    go = threading.Barrier(8)

    def produce(t: int) -> None:
        go.wait()
        for i in range(200):
            bg.enqueue("many", (t, i))

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(WAIT)
    bg.wait_idle(WAIT)
    assert len(seen) == 8 * 200
    assert set(seen.values()) == {1}


def _fill(bg: Any, gate: Gate, name: str = "small") -> list[Any]:
    """Register a concurrency-1, maxsize-2 consumer; fill it: one item in hand, two queued."""
    got: list[Any] = []
    in_hand = threading.Event()

    @bg.consumer(name, concurrency=1, maxsize=2)
    async def handle(item: Any) -> None:
        in_hand.set()
        await gate.wait()
        got.append(item)

    bg.enqueue(name, "first")
    assert in_hand.wait(WAIT)
    bg.enqueue(name, "second")
    bg.enqueue(name, "third")
    assert bg.get_queue(name).depth == 2
    return got


def test_enqueue_on_a_full_queue_raises_queue_full_after_the_timeout(make_app):
    _app, bg = make_app()
    bg.start()
    gate = Gate(bg)
    got = _fill(bg, gate)
    t0 = time.monotonic()
    with pytest.raises(QueueFull, match="small"):
        bg.enqueue("small", "refused", timeout=0.2)
    elapsed = time.monotonic() - t0
    assert 0.19 <= elapsed < 1.0
    assert bg.get_queue("small").depth == 2
    gate.open()
    bg.wait_idle(WAIT)
    assert got == ["first", "second", "third"]


def test_enqueue_without_timeout_on_a_full_queue_raises_at_once(make_app):
    _app, bg = make_app()
    bg.start()
    gate = Gate(bg)
    _fill(bg, gate)
    t0 = time.monotonic()
    with pytest.raises(QueueFull):
        bg.enqueue("small", "refused")
    assert time.monotonic() - t0 < 0.19
    gate.open()


def _open_gate_later(gate: Gate) -> threading.Timer:
    # Room appears while enqueue waits. If the machine stalls and the timer fires
    # before enqueue starts waiting, the test still passes: it never flakes.
    timer = threading.Timer(0.2, gate.open)
    timer.start()
    return timer


def test_enqueue_waits_for_room_and_succeeds_within_the_timeout(make_app):
    _app, bg = make_app()
    bg.start()
    gate = Gate(bg)
    got = _fill(bg, gate)
    timer = _open_gate_later(gate)
    t0 = time.monotonic()
    bg.enqueue("small", "late", timeout=WAIT)
    elapsed = time.monotonic() - t0
    timer.join()
    assert elapsed < WAIT / 2, "enqueue only got in at its deadline: was it woken?"
    bg.wait_idle(WAIT)
    assert got == ["first", "second", "third", "late"]


def test_enqueue_with_timeout_none_waits_for_room(make_app):
    # The docstring: "None: no limit".
    _app, bg = make_app()
    bg.start()
    gate = Gate(bg)
    got = _fill(bg, gate)
    timer = _open_gate_later(gate)
    try:
        bg.enqueue("small", "late", timeout=None)
    finally:
        timer.join()
    bg.wait_idle(WAIT)
    assert got == ["first", "second", "third", "late"]


def _in_thread_loop(coro_fn: Any) -> Any:
    """Run ``asyncio.run(coro_fn())`` in a new thread; return its result or raise."""
    out: dict[str, Any] = {}

    def main() -> None:
        try:
            out["value"] = asyncio.run(coro_fn())
        except BaseException as exc:
            out["error"] = exc

    th = threading.Thread(target=main)
    th.start()
    th.join(WAIT)
    assert not th.is_alive()
    if "error" in out:
        raise out["error"]
    return out.get("value")


def test_enqueue_async_from_another_event_loop(make_app):
    _app, bg = make_app()
    got: list[Any] = []

    @bg.consumer("events")
    async def handle(item: Any) -> None:
        got.append(item)

    bg.start()

    async def produce() -> None:
        for i in range(5):
            await bg.enqueue_async("events", i)

    _in_thread_loop(produce)
    bg.wait_idle(WAIT)
    assert got == [0, 1, 2, 3, 4]


def test_enqueue_async_waits_for_room_from_another_event_loop(make_app):
    _app, bg = make_app()
    bg.start()
    gate = Gate(bg)
    got = _fill(bg, gate)

    async def produce() -> float:
        timer = _open_gate_later(gate)
        t0 = time.monotonic()
        try:
            await bg.enqueue_async("small", "late", timeout=WAIT)
        finally:
            await asyncio.to_thread(timer.join)
        return time.monotonic() - t0

    elapsed = _in_thread_loop(produce)
    assert elapsed < WAIT / 2, "enqueue_async only got in at its deadline: was it woken?"
    bg.wait_idle(WAIT)
    assert got == ["first", "second", "third", "late"]


def test_enqueue_async_raises_queue_full_after_the_timeout(make_app):
    _app, bg = make_app()
    bg.start()
    gate = Gate(bg)
    _fill(bg, gate)

    async def produce() -> float:
        t0 = time.monotonic()
        with pytest.raises(QueueFull):
            await bg.enqueue_async("small", "refused", timeout=0.2)
        return time.monotonic() - t0

    elapsed = _in_thread_loop(produce)
    assert 0.19 <= elapsed < 1.0
    assert bg.get_queue("small").depth == 2
    gate.open()


@pytest.mark.parametrize("async_views", [True, False], ids=["on-loop", "cross-loop"])
def test_enqueue_async_from_a_flask_async_view(make_app, async_views):
    app, bg = make_app(ASYNCBG_ASYNC_VIEWS=async_views)
    got: list[Any] = []

    @bg.consumer("from-view")
    async def handle(item: Any) -> None:
        got.append(item)

    @app.post("/enqueue")
    async def enqueue_view() -> str:
        from flask import request

        await bg.enqueue_async("from-view", request.get_json())
        return "queued"

    bg.start()
    resp = app.test_client().post("/enqueue", json={"to": "a"})
    assert resp.status_code == 200
    bg.wait_idle(WAIT)
    assert got == [{"to": "a"}]


def test_enqueue_to_an_unknown_queue_raises_unknown_queue_naming_it(make_app):
    _app, bg = make_app()

    @bg.consumer("known")
    async def handle(item: Any) -> None:
        pass

    bg.start()
    with pytest.raises(UnknownQueue, match=r"'nope'.*known") as info:
        bg.enqueue("nope", 1)
    assert isinstance(info.value, LookupError)


def test_enqueue_async_to_an_unknown_queue_raises_unknown_queue(make_app):
    _app, bg = make_app()
    bg.start()

    async def produce() -> None:
        await bg.enqueue_async("nope", 1)

    with pytest.raises(UnknownQueue, match="'nope'"):
        _in_thread_loop(produce)


def test_consumer_error_is_logged_and_the_next_item_is_handled(make_app, caplog):
    caplog.set_level(logging.ERROR, logger="asyncbg")
    _app, bg = make_app()
    got: list[int] = []

    @bg.consumer("fragile")
    async def handle(item: int) -> None:
        if item == 1:
            raise ValueError("bad item")
        got.append(item)

    bg.start()
    for i in range(3):
        bg.enqueue("fragile", i)
    bg.wait_idle(WAIT)
    assert got == [0, 2]
    errors = [r for r in caplog.records if "consumer 'fragile' failed on item 1" in r.getMessage()]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert bg.get_queue("fragile").snapshot()["failed"] == 1


def test_consumer_runs_inside_the_app_context(make_app):
    app, bg = make_app()
    seen: dict[str, Any] = {}

    @bg.consumer("ctx")
    async def handle(item: Any) -> None:
        g.item = item
        seen["app"] = current_app._get_current_object()
        seen["g"] = g.item

    bg.start()
    bg.enqueue("ctx", "x")
    bg.wait_idle(WAIT)
    assert seen == {"app": app, "g": "x"}


def test_wait_idle_returns_only_once_queued_items_are_done(make_app):
    _app, bg = make_app()
    got: list[int] = []

    @bg.consumer("slowish", concurrency=2)
    async def handle(item: int) -> None:
        await asyncio.sleep(0.02)
        got.append(item)

    bg.start()
    for i in range(10):
        bg.enqueue("slowish", i)
    bg.wait_idle(WAIT)
    assert sorted(got) == list(range(10))


def test_wait_idle_raises_timeout_error_while_an_item_is_stuck(make_app):
    _app, bg = make_app()
    bg.start()
    gate = Gate(bg)
    _fill(bg, gate)
    with pytest.raises(TimeoutError, match="small"):
        bg.wait_idle(0.1)
    gate.open()
    bg.wait_idle(WAIT)


def test_eager_enqueue_runs_the_consumer_before_returning(make_app):
    app, bg = make_app(ASYNCBG_EAGER=True)
    got: list[Any] = []

    @bg.consumer("eager")
    async def handle(item: Any) -> None:
        await asyncio.sleep(0.01)
        got.append((item, current_app.name))

    bg.start()
    bg.enqueue("eager", "now")
    assert got == [("now", app.name)]

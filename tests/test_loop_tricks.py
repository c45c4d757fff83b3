"""The loop's three private-asyncio tricks: each checked at loop start, each with a fallback.

``_wakeup`` (wake-up socket calls that keep the GIL), ``_eager`` (eager task
start on 3.11) and ``_daemon_executor`` (daemon worker threads) must pass their
self-check on the Pythons we support; when a check fails (forced here with
``ASYNCBG_DISABLE_LOOP_TRICKS``, or by breaking what the check looks at), the
loop must still do everything with asyncio's stock behaviour and say so once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from helpers_core import WAIT

from asyncbg import LoopThread
from asyncbg.engine import _daemon_executor, _eager, _tricks, _wakeup
from asyncbg.engine.loop import _SelectorLoop

ROOT = Path(__file__).resolve().parent.parent
EAGER_TRICK_USED = _eager.eager_task_factory is None  # 3.11: 3.12+ has asyncio's own

#: What a loop with every trick forced off warns about on this Python.
EXPECTED_FALLBACKS = {"wakeup", "executor"} | ({"eager"} if EAGER_TRICK_USED else set())


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget which fallbacks this process has warned about, for the test's duration."""
    monkeypatch.setattr(_tricks, "_warned", set())


@pytest.fixture
def forced_off(monkeypatch: pytest.MonkeyPatch, fresh_warnings: None) -> None:
    """Every trick forced off by the test switch."""
    monkeypatch.setenv(_tricks.ENV_SWITCH, "1")


def _fallback_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "asyncbg" and r.levelno == logging.WARNING and "loop trick" in r.getMessage()
    ]


def _warned_tricks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return sorted(m.split("'")[1] for m in _fallback_warnings(caplog))


def _first_step_ran_eagerly(lt: LoopThread) -> bool:
    """Spawn a task from a plain callback on the loop: did its first step run inside it?"""
    ran: list[bool] = []

    async def body() -> None:
        ran.append(True)

    def spawn_and_look() -> bool:
        lt.spawn(body())
        return bool(ran)

    return lt.call(spawn_and_look, timeout=WAIT)


def _exercise(lt: LoopThread) -> None:
    """Jobs run, and submit/call/post/run_in_executor/spawn/stop/restart work."""

    async def add(a: int, b: int) -> int:
        await asyncio.sleep(0)
        return a + b

    assert lt.submit(add(2, 3)).result(WAIT) == 5
    assert lt.call(lambda: threading.current_thread().name, timeout=WAIT) == lt.name
    posted = threading.Event()
    lt.post(posted.set)
    assert posted.wait(WAIT)

    async def in_worker() -> bool:
        return await asyncio.get_running_loop().run_in_executor(None, lt.in_worker_thread)

    assert lt.submit(in_worker()).result(WAIT) is True
    assert lt.submit(asyncio.to_thread(sum, [1, 2, 3])).result(WAIT) == 6
    # Many submissions from several threads: every wake-up reaches the loop.
    coros: list[Coroutine[Any, Any, int]] = [add(i, 1) for i in range(200)]
    results: list[int] = []
    lock = threading.Lock()

    def submit_some(part: list[Coroutine[Any, Any, int]]) -> None:
        futs = [lt.submit(c) for c in part]
        got = [f.result(WAIT) for f in futs]
        with lock:
            results.extend(got)

    threads = [threading.Thread(target=submit_some, args=(coros[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert sorted(results) == [i + 1 for i in range(200)]
    spawned = lt.call(lambda: lt.spawn(add(1, 1)), timeout=WAIT)
    assert lt.submit(asyncio.wait_for(asyncio.shield(spawned), WAIT)).result(WAIT) == 2

    pending = lt.submit(asyncio.sleep(30))
    report = lt.stop(timeout=0.2)
    assert report.finished
    assert report.cancelled == 1
    assert pending.cancelled()
    assert not lt.running
    lt.start()
    assert lt.submit(add(4, 4)).result(WAIT) == 8
    assert lt.stop(timeout=WAIT).finished


# -- (i) every self-check passes on this Python ---------------------------------------


def test_no_fallback_warning_on_a_normal_start(
    make_lt: Callable[..., LoopThread],
    fresh_warnings: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.delenv(_tricks.ENV_SWITCH, raising=False)
    caplog.set_level(logging.WARNING, logger="asyncbg")
    lt = make_lt()
    lt.start()
    assert _fallback_warnings(caplog) == []


@pytest.mark.skipif(sys.platform == "win32", reason="the wake-up trick is POSIX only")
def test_wakeup_check_passes_and_the_fast_calls_are_in_use(
    make_lt: Callable[..., LoopThread],
) -> None:
    lt = make_lt()
    lt.start()
    loop = lt.loop
    assert isinstance(loop, _SelectorLoop)
    assert _wakeup.fast_calls is not None
    assert loop._fast is _wakeup.fast_calls
    # And the check itself, on a loop of its own, says yes.
    other = _SelectorLoop()
    try:
        assert _wakeup.enable(other) is None
    finally:
        other.close()


@pytest.mark.skipif(not EAGER_TRICK_USED, reason="3.12+ uses asyncio.eager_task_factory")
def test_eager_check_passes_on_311(make_lt: Callable[..., LoopThread]) -> None:
    lt = make_lt()
    lt.start()
    assert lt._eager_start is not None
    assert lt.call(lambda: _eager.check(lt.loop), timeout=WAIT) is None
    assert _first_step_ran_eagerly(lt)


@pytest.mark.skipif(EAGER_TRICK_USED, reason="3.11 needs the eager trick")
def test_on_312_and_later_asyncio_eager_factory_is_used_and_no_trick(
    make_lt: Callable[..., LoopThread],
) -> None:
    lt = make_lt()
    lt.start()
    assert _eager.eager_task_factory is not None
    assert _eager.eager_task_factory is getattr(asyncio, "eager_task_factory", None)
    assert lt._eager_start is None
    assert _first_step_ran_eagerly(lt)


def test_executor_check_passes_and_workers_are_daemons(
    make_lt: Callable[..., LoopThread],
) -> None:
    lt = make_lt()
    lt.start()
    assert isinstance(lt._executor, _daemon_executor.DaemonExecutor)

    async def worker_thread() -> threading.Thread:
        return await asyncio.get_running_loop().run_in_executor(None, threading.current_thread)

    t = lt.submit(worker_thread()).result(WAIT)
    assert t.daemon
    assert t in lt._executor.threads


def test_every_trick_passes_its_check_and_the_loop_works(
    make_lt: Callable[..., LoopThread],
) -> None:
    lt = make_lt()
    lt.start()
    _exercise(lt)


def test_switch_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, off in [
        ("", set()),
        ("0", set()),
        ("1", set(_tricks.TRICKS)),
        ("all", set(_tricks.TRICKS)),
        ("eager, wakeup", {"eager", "wakeup"}),
        ("executor", {"executor"}),
    ]:
        monkeypatch.setenv(_tricks.ENV_SWITCH, value)
        assert {t for t in _tricks.TRICKS if _tricks.forced_off(t)} == off, value


# -- (ii) with the fallbacks: everything still works, one warning each ------------------


def test_forced_fallback_uses_stock_behaviour_and_everything_works(
    make_lt: Callable[..., LoopThread], forced_off: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncbg")
    lt = make_lt()
    lt.start()
    loop = lt.loop
    assert isinstance(loop, _SelectorLoop)
    assert loop._fast is None
    assert lt._eager_start is None
    assert isinstance(lt._executor, _daemon_executor.StockExecutor)
    assert _first_step_ran_eagerly(lt) is (not EAGER_TRICK_USED)
    _exercise(lt)
    # A second LoopThread in the same process: no second warning.
    other = make_lt()
    other.start()
    assert other.submit(asyncio.sleep(0, "ok")).result(WAIT) == "ok"
    assert _warned_tricks(caplog) == sorted(EXPECTED_FALLBACKS)
    for message in _fallback_warnings(caplog):
        assert _tricks.ENV_SWITCH in message


def test_switch_can_turn_off_one_trick_only(
    make_lt: Callable[..., LoopThread],
    fresh_warnings: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv(_tricks.ENV_SWITCH, "executor")
    caplog.set_level(logging.WARNING, logger="asyncbg")
    lt = make_lt()
    lt.start()
    assert isinstance(lt._executor, _daemon_executor.StockExecutor)
    assert isinstance(lt.loop, _SelectorLoop)
    assert lt.loop._fast is _wakeup.fast_calls
    assert _warned_tricks(caplog) == ["executor"]


class _LostByte:
    """GIL-holding calls whose probe byte never comes back: what a changed socket pair
    would look like to the check."""

    def send_byte(self, fd: int) -> None:
        pass

    def recv_all(self, fd: int, buf: Any) -> bytes:
        return b""


def test_wakeup_falls_back_when_the_byte_does_not_round_trip(
    make_lt: Callable[..., LoopThread],
    fresh_warnings: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(_wakeup, "fast_calls", _LostByte())
    caplog.set_level(logging.WARNING, logger="asyncbg")
    lt = make_lt()
    lt.start()
    assert isinstance(lt.loop, _SelectorLoop)
    assert lt.loop._fast is None
    _exercise(lt)
    assert _warned_tricks(caplog) == ["wakeup"]
    assert "did not round-trip" in _fallback_warnings(caplog)[0]


def test_wakeup_falls_back_without_the_socket_pair(fresh_warnings: None) -> None:
    loop = _SelectorLoop()
    try:
        csock = loop._csock  # type: ignore[attr-defined]
        loop._csock = None  # type: ignore[attr-defined]
        try:
            reason = _wakeup.enable(loop)
        finally:
            loop._csock = csock  # type: ignore[attr-defined]
        assert reason is not None
        assert "socket pair" in reason
        assert loop._fast is None
    finally:
        loop.close()


class _TaskIgnoresShadowLoop(_SelectorLoop):
    """A loop whose tasks schedule their first step past the shadowed ``call_soon``,
    as a ``Task.__init__`` that stopped using ``self._loop.call_soon`` would."""

    def create_task(self, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        shadow = vars(self).pop("call_soon", None)
        try:
            return super().create_task(coro, **kwargs)
        finally:
            if shadow is not None:
                self.call_soon = shadow  # type: ignore[method-assign]


class _EagerBrokenLoopThread(LoopThread):
    def _new_loop(self) -> asyncio.AbstractEventLoop:
        loop = _TaskIgnoresShadowLoop()
        self._executor = _daemon_executor.install(loop, self.max_workers, f"{self.name}-worker")
        return loop


@pytest.mark.skipif(not EAGER_TRICK_USED, reason="3.12+ uses asyncio.eager_task_factory")
def test_eager_falls_back_when_task_init_stops_using_call_soon(
    fresh_warnings: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncbg")
    lt = _EagerBrokenLoopThread("tricks-eager-broken")
    try:
        lt.start()
        assert lt._eager_start is None
        assert not _first_step_ran_eagerly(lt)
        _exercise(lt)
        assert _warned_tricks(caplog) == ["eager"]
        assert "call_soon" in _fallback_warnings(caplog)[0]
    finally:
        lt.stop(timeout=1.0)


def test_executor_falls_back_when_asyncio_refuses_it(
    make_lt: Callable[..., LoopThread],
    fresh_warnings: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real = asyncio.BaseEventLoop.set_default_executor

    def picky(self: asyncio.BaseEventLoop, executor: Any) -> None:
        if isinstance(executor, _daemon_executor.DaemonExecutor):
            raise TypeError("executor must be ThreadPoolExecutor")
        real(self, executor)

    monkeypatch.setattr(asyncio.BaseEventLoop, "set_default_executor", picky)
    caplog.set_level(logging.WARNING, logger="asyncbg")
    lt = make_lt()
    lt.start()
    assert isinstance(lt._executor, _daemon_executor.StockExecutor)
    _exercise(lt)
    assert _warned_tricks(caplog) == ["executor"]
    assert "refused" in _fallback_warnings(caplog)[0]


def _env_forced() -> dict[str, str]:
    env = dict(os.environ)
    env[_tricks.ENV_SWITCH] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    return env


def test_forced_fallback_warns_once_per_process_in_a_fresh_interpreter() -> None:
    script = textwrap.dedent(
        """
        import asyncio, logging, sys
        logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(message)s")
        from asyncbg import LoopThread

        async def double(x):
            await asyncio.sleep(0)
            return 2 * x

        for i in range(3):
            lt = LoopThread(f"sub-{i}")
            lt.start()
            assert lt.submit(double(i)).result(10) == 2 * i
            assert lt.call(lambda: 7, timeout=10) == 7
            assert lt.submit(asyncio.to_thread(lambda: "worker")).result(10) == "worker"
            assert lt.stop(timeout=5).finished
        print("ok")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=_env_forced(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    lines = [line for line in proc.stderr.splitlines() if "loop trick" in line]
    assert sorted(line.split("'")[1] for line in lines) == sorted(EXPECTED_FALLBACKS), lines


# -- (iii) a slice of the LoopThread suite with every fallback forced -------------------


def test_loop_thread_suite_slice_passes_with_every_fallback_forced() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(ROOT / "tests" / "test_loop_thread.py"),
            "-k",
            "submit or call or post or stop_report or restart or run_from",
        ],
        env=_env_forced(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
    assert " failed" not in proc.stdout

"""LoopThread: an asyncio loop in a daemon thread, and the safe ways into it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import inspect
import logging
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers_core import WAIT, Gate

from asyncbg import LoopFuture, LoopThread, NotRunning, ShutdownReport


@pytest.fixture
def lt(make_lt: Callable[..., LoopThread]) -> LoopThread:
    """A started LoopThread."""
    loop_thread = make_lt()
    loop_thread.start()
    return loop_thread


async def _value(v: Any) -> Any:
    return v


def _block_loop(lt: LoopThread, gate: Gate) -> None:
    """Hold the loop thread (on purpose) until ``gate`` is set: work posted meanwhile waits."""
    entered = threading.Event()

    def hold() -> None:
        entered.set()
        gate.wait(WAIT)

    lt.post(hold)
    assert entered.wait(WAIT)


def _stop_in_thread(
    lt: LoopThread, timeout: float
) -> tuple[threading.Thread, list[ShutdownReport]]:
    reports: list[ShutdownReport] = []
    t = threading.Thread(target=lambda: reports.append(lt.stop(timeout=timeout)))
    t.start()
    return t, reports


# -- start -----------------------------------------------------------------------------


def test_start_returns_with_the_loop_running(make_lt: Callable[..., LoopThread]) -> None:
    lt = make_lt()
    lt.start()
    assert lt.running
    assert lt.loop.is_running()


def test_start_twice_keeps_the_same_loop_and_thread(lt: LoopThread) -> None:
    loop = lt.loop
    ident = lt.call(threading.get_ident)
    lt.start()
    assert lt.loop is loop
    assert lt.call(threading.get_ident) == ident


def test_loop_runs_in_a_daemon_thread_named_after_the_loop_thread(
    make_lt: Callable[..., LoopThread],
) -> None:
    lt = make_lt(name="my-loop")
    lt.start()
    thread = lt.call(threading.current_thread)
    assert thread is not threading.current_thread()
    assert thread.daemon
    assert thread.name == "my-loop"


def test_default_loop_is_an_asyncio_loop(lt: LoopThread) -> None:
    assert isinstance(lt.loop, asyncio.BaseEventLoop)
    assert not type(lt.loop).__module__.startswith("uvloop")


def test_use_uvloop_runs_a_uvloop_loop(make_lt: Callable[..., LoopThread]) -> None:
    lt = make_lt(use_uvloop=True)
    lt.start()
    assert type(lt.loop).__module__.startswith("uvloop")
    assert lt.submit(_value(7)).result(WAIT) == 7


def test_use_uvloop_without_uvloop_installed_raises_runtime_error(
    make_lt: Callable[..., LoopThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # makes "import uvloop" fail
    lt = make_lt(use_uvloop=True)
    with pytest.raises(RuntimeError, match="uvloop"):
        lt.start()
    assert not lt.running


# -- stop ------------------------------------------------------------------------------


def test_stop_before_start_returns_an_empty_report(make_lt: Callable[..., LoopThread]) -> None:
    report = make_lt().stop(timeout=1.0)
    assert isinstance(report, ShutdownReport)
    assert (report.completed, report.cancelled) == (0, 0)


def test_stop_stops_the_loop_and_joins_the_thread(lt: LoopThread) -> None:
    loop = lt.loop
    thread = lt.call(threading.current_thread)
    report = lt.stop(timeout=1.0)
    assert report.finished
    assert not lt.running
    assert loop.is_closed()
    assert not thread.is_alive()


def test_stop_twice_returns_the_same_report(lt: LoopThread) -> None:
    first = lt.stop(timeout=1.0)
    second = lt.stop(timeout=1.0)
    assert second is first


def test_stop_from_another_thread(lt: LoopThread) -> None:
    stopper, reports = _stop_in_thread(lt, timeout=1.0)
    stopper.join(WAIT)
    assert not stopper.is_alive()
    assert reports[0].finished
    assert not lt.running


def test_stop_from_a_job_on_the_loop_does_not_deadlock(lt: LoopThread) -> None:
    shutdown_began = asyncio.Event()  # set on the loop by the stop hook
    lt.add_stop_hook(shutdown_began.set)

    async def stop_own_loop() -> tuple[ShutdownReport, bool]:
        report = lt.stop(timeout=WAIT)
        finished = report.finished
        await shutdown_began.wait()  # still running when the shutdown takes stock
        return report, finished

    report, finished_when_returned = lt.submit(stop_own_loop()).result(WAIT)
    # From the loop thread stop() cannot wait: it returns an unfinished report...
    assert finished_when_returned is False
    # ... which is filled in once the loop has stopped (stop() here waits for that).
    assert lt.stop(timeout=WAIT) is report
    assert report.finished
    assert report.completed == 1  # the job that called stop() was let finish
    assert not lt.running


def test_stop_from_a_signal_handler_in_the_main_thread(lt: LoopThread) -> None:
    assert threading.current_thread() is threading.main_thread()
    started, release = Gate(), Gate()

    async def job() -> str:
        started.set()
        await release.wait_async()
        return "done"

    fut = lt.submit(job())
    assert started.wait()
    lt.add_stop_hook(release.set)  # the job finishes within the grace
    reports: list[ShutdownReport] = []

    def handler(signum: int, frame: object) -> None:
        reports.append(lt.stop(timeout=WAIT))

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        signal.raise_signal(signal.SIGUSR1)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert len(reports) == 1
    assert reports[0].finished
    assert reports[0].completed == 1
    assert fut.result(0) == "done"
    assert not lt.running


def test_stop_from_a_signal_handler_that_interrupts_a_submission_does_not_deadlock(
    tmp_path: Path,
) -> None:
    # A signal is handled in the main thread between two bytecodes, possibly
    # while that thread is inside post(). The child makes that moment
    # deterministic by raising the signal from the loop's wake-up call, which
    # post() makes while holding the LoopThread's lock.
    script = textwrap.dedent(
        """
        import signal
        from asyncbg import LoopThread

        lt = LoopThread()
        lt.start()
        loop = lt.loop
        real_wake = loop.call_soon_threadsafe

        def wake_interrupted_by_a_signal(*args, **kwargs):
            signal.raise_signal(signal.SIGUSR1)
            return real_wake(*args, **kwargs)

        reports = []
        signal.signal(signal.SIGUSR1, lambda s, f: reports.append(lt.stop(timeout=1.0)))
        loop.call_soon_threadsafe = wake_interrupted_by_a_signal
        try:
            lt.post(print, "posted")
        except Exception as exc:
            print("post raised", type(exc).__name__)
        print("stopped", reports[0].finished, lt.running, flush=True)
        """
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=20,
            cwd=tmp_path,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("stop() from a signal handler deadlocked on the LoopThread's lock")
    assert proc.returncode == 0, proc.stderr
    assert "stopped True False" in proc.stdout.splitlines()


def test_stop_runs_stop_hooks_on_the_loop_thread(lt: LoopThread) -> None:
    loop_ident = lt.call(threading.get_ident)
    hook_idents: list[int] = []
    lt.add_stop_hook(lambda: hook_idents.append(threading.get_ident()))
    lt.stop(timeout=1.0)
    assert hook_idents == [loop_ident]


def test_stop_report_counts_completed_and_cancelled_tasks(lt: LoopThread) -> None:
    finishes, hangs = Gate(), Gate()
    finish_allowed = asyncio.Event()  # set on the loop by the stop hook

    async def finishes_in_grace() -> None:
        finishes.set()
        await finish_allowed.wait()

    async def never_finishes() -> None:
        hangs.set()
        await asyncio.Event().wait()

    lt.submit(finishes_in_grace())
    lt.submit(never_finishes())
    assert finishes.wait()
    assert hangs.wait()
    lt.add_stop_hook(finish_allowed.set)
    report = lt.stop(timeout=0.5)
    assert (report.completed, report.cancelled) == (1, 1)


def test_stop_runs_the_finally_of_cancelled_tasks(lt: LoopThread) -> None:
    started, finally_ran = Gate(), Gate()

    async def never_finishes() -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        finally:
            finally_ran.set()

    lt.submit(never_finishes())
    assert started.wait()
    report = lt.stop(timeout=0.2)
    assert report.cancelled == 1
    assert finally_ran.is_set()  # before stop() returned, not some time later


def test_stop_gives_running_tasks_the_timeout_and_no_more(lt: LoopThread) -> None:
    started = Gate()

    async def never_finishes() -> None:
        started.set()
        await asyncio.Event().wait()

    lt.submit(never_finishes())
    assert started.wait()
    timeout = 0.5
    t0 = time.monotonic()
    lt.stop(timeout=timeout)
    elapsed = time.monotonic() - t0
    assert elapsed >= timeout * 0.9  # the task got its grace
    assert elapsed < timeout + 2.0  # and stop did not wait much longer


def test_stop_returns_when_a_task_ignores_cancellation(lt: LoopThread) -> None:
    started, release = Gate(), Gate()

    async def stubborn() -> None:
        started.set()
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait_async()

    lt.submit(stubborn())
    assert started.wait()
    t0 = time.monotonic()
    try:
        report = lt.stop(timeout=0.3)
        elapsed = time.monotonic() - t0
    finally:
        release.set()
    # It ignored cancellation: abandoned, not counted as cancelled.
    assert (report.cancelled, report.abandoned) == (0, 1)
    assert elapsed < 0.3 + 2.0


def test_stop_gives_up_waiting_when_the_loop_is_blocked(lt: LoopThread) -> None:
    blocked, release = Gate(), Gate()

    async def blocks_the_loop() -> None:
        blocked.set()
        release.wait(WAIT)  # a blocking call inside a coroutine: the loop stalls

    lt.submit(blocks_the_loop())
    assert blocked.wait()
    timeout = 0.2
    t0 = time.monotonic()
    try:
        report = lt.stop(timeout=timeout)
        elapsed = time.monotonic() - t0
        assert not report.finished
        assert elapsed < timeout + lt.cancel_grace + 4.0
    finally:
        release.set()
    assert lt.stop(timeout=1.0).finished  # once unblocked, the shutdown completes


# -- submit ----------------------------------------------------------------------------


def test_submit_returns_a_concurrent_future_with_the_result(lt: LoopThread) -> None:
    fut = lt.submit(_value(42))
    assert isinstance(fut, concurrent.futures.Future)
    assert isinstance(fut, LoopFuture)
    assert fut.result(WAIT) == 42


def test_submit_runs_the_coroutine_on_the_loop_thread(lt: LoopThread) -> None:
    async def where() -> int:
        return threading.get_ident()

    assert lt.submit(where()).result(WAIT) == lt.call(threading.get_ident)


def test_submit_future_reraises_the_coroutine_exception(lt: LoopThread) -> None:
    async def fails() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        lt.submit(fails()).result(WAIT)


def test_cancelling_the_submit_future_cancels_the_task_on_the_loop(lt: LoopThread) -> None:
    started, saw_cancel = Gate(), Gate()

    async def victim() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            saw_cancel.set()
            raise

    fut = lt.submit(victim())
    assert started.wait()
    assert fut.cancel()
    assert saw_cancel.wait()
    assert fut.cancelled()


def test_cancelling_the_submit_future_before_it_starts_closes_the_coroutine(
    lt: LoopThread,
) -> None:
    ran = Gate()

    async def never_run() -> None:
        ran.set()

    gate = Gate()
    _block_loop(lt, gate)
    coro = never_run()
    try:
        fut = lt.submit(coro)
        assert fut.cancel()
    finally:
        gate.set()
    lt.call(lambda: None)  # the loop has handled the submission by now
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
    assert not ran.is_set()


def test_submit_burst_larger_than_one_drain_batch_all_complete(lt: LoopThread) -> None:
    futs = [lt.submit(_value(i)) for i in range(5000)]
    assert [f.result(WAIT) for f in futs] == list(range(5000))


# -- post ------------------------------------------------------------------------------


def test_post_runs_callbacks_on_the_loop_in_order(lt: LoopThread) -> None:
    seen: list[int] = []
    for i in range(100):
        lt.post(seen.append, i)
    assert lt.call(lambda: list(seen)) == list(range(100))


def test_post_callback_exception_is_logged_and_the_loop_goes_on(
    lt: LoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    def fails() -> None:
        raise ValueError("callback failed")

    with caplog.at_level(logging.ERROR, logger="asyncbg"):
        lt.post(fails)
        assert lt.call(lambda: "still here") == "still here"
    errors = [r for r in caplog.records if r.exc_info and r.exc_info[0] is ValueError]
    assert errors


# -- call ------------------------------------------------------------------------------


def test_call_runs_on_the_loop_thread_and_returns_the_value(lt: LoopThread) -> None:
    loop_thread = lt.call(threading.current_thread)
    assert loop_thread is not threading.current_thread()
    assert lt.call(lambda a, b: a + b, 2, 3) == 5


def test_call_reraises_the_callable_exception(lt: LoopThread) -> None:
    def fails() -> None:
        raise LookupError("nope")

    with pytest.raises(LookupError, match="nope"):
        lt.call(fails)


def test_call_times_out_when_the_loop_does_not_get_to_it(lt: LoopThread) -> None:
    gate = Gate()
    _block_loop(lt, gate)
    try:
        with pytest.raises(TimeoutError):
            lt.call(lambda: None, timeout=0.1)
    finally:
        gate.set()


def test_call_that_timed_out_never_runs_later(lt: LoopThread) -> None:
    ran: list[bool] = []
    gate = Gate()
    _block_loop(lt, gate)
    try:
        with pytest.raises(TimeoutError):
            lt.call(ran.append, True, timeout=0.1)
    finally:
        gate.set()
    lt.call(lambda: None)  # everything posted before has been handled now
    assert ran == []  # the caller was told it timed out: no late side effect


def test_call_from_the_loop_thread_calls_directly(lt: LoopThread) -> None:
    async def nested() -> int:
        return lt.call(lambda: 5)

    assert lt.submit(nested()).result(WAIT) == 5


# -- await run() -----------------------------------------------------------------------


def test_run_from_another_event_loop(lt: LoopThread) -> None:
    async def where() -> int:
        return threading.get_ident()

    async def caller() -> tuple[int, int]:
        return await lt.run(where()), threading.get_ident()

    loop_ident, caller_ident = asyncio.run(caller())
    assert loop_ident == lt.call(threading.get_ident)
    assert caller_ident != loop_ident


def test_run_from_the_loop_itself_just_awaits(lt: LoopThread) -> None:
    async def current() -> asyncio.Task[Any] | None:
        return asyncio.current_task()

    async def outer() -> bool:
        return await lt.run(current()) is asyncio.current_task()

    assert lt.submit(outer()).result(WAIT) is True


def test_cancelling_await_run_cancels_the_work_on_the_loop(lt: LoopThread) -> None:
    started, saw_cancel = Gate(), Gate()

    async def victim() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            saw_cancel.set()
            raise

    async def caller() -> None:
        task = asyncio.ensure_future(lt.run(victim()))
        await started.wait_async()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(caller())
    assert saw_cancel.wait()


# -- the deadlock guard ----------------------------------------------------------------


def _from_loop_thread(lt: LoopThread, blocking: Callable[[], object]) -> BaseException | None:
    """Call ``blocking()`` inside a job on the loop; return what it raised."""

    async def job() -> BaseException | None:
        try:
            blocking()
        except Exception as exc:
            return exc
        return None

    return lt.submit(job()).result(WAIT)


def test_future_result_from_the_loop_thread_raises_runtime_error(lt: LoopThread) -> None:
    inner: list[LoopFuture[None]] = []

    async def prepare() -> None:
        inner.append(lt.submit(asyncio.sleep(0.5)))

    lt.submit(prepare()).result(WAIT)
    exc = _from_loop_thread(lt, lambda: inner[0].result(timeout=2.0))
    assert isinstance(exc, RuntimeError)
    assert "deadlock" in str(exc)


def test_future_exception_from_the_loop_thread_raises_runtime_error(lt: LoopThread) -> None:
    inner: list[LoopFuture[None]] = []

    async def prepare() -> None:
        inner.append(lt.submit(asyncio.sleep(0.5)))

    lt.submit(prepare()).result(WAIT)
    exc = _from_loop_thread(lt, lambda: inner[0].exception(timeout=2.0))
    assert isinstance(exc, RuntimeError)
    assert "deadlock" in str(exc)


def test_future_of_another_thread_result_from_the_loop_thread_when_done_is_allowed(
    lt: LoopThread,
) -> None:
    done = lt.submit(_value("ready"))
    assert done.result(WAIT) == "ready"
    assert _from_loop_thread(lt, lambda: done.result()) is None


def test_run_sync_from_the_loop_thread_raises_and_closes_the_coroutine(lt: LoopThread) -> None:
    coro = _value(1)
    exc = _from_loop_thread(lt, lambda: lt.run_sync(coro, context=None))
    assert isinstance(exc, RuntimeError)
    assert "deadlock" in str(exc)
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED


# -- refusing work ---------------------------------------------------------------------


def test_submit_to_a_never_started_loop_raises_not_running(
    make_lt: Callable[..., LoopThread],
) -> None:
    with pytest.raises(NotRunning, match="not running"):
        make_lt().submit(_value(1))


def test_submit_refused_closes_the_coroutine(make_lt: Callable[..., LoopThread]) -> None:
    coro = _value(1)
    with pytest.raises(NotRunning):
        make_lt().submit(coro)
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED


def test_submit_refused_leaves_no_never_awaited_warning(
    make_lt: Callable[..., LoopThread],
) -> None:
    lt = make_lt()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(NotRunning):
            lt.submit(_value(1))
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]


def test_post_to_a_never_started_loop_raises_not_running(
    make_lt: Callable[..., LoopThread],
) -> None:
    with pytest.raises(NotRunning):
        make_lt().post(print, "never")


def test_call_to_a_never_started_loop_raises_not_running(
    make_lt: Callable[..., LoopThread],
) -> None:
    with pytest.raises(NotRunning):
        make_lt().call(lambda: None)


def test_submit_to_a_stopped_loop_raises_not_running(lt: LoopThread) -> None:
    lt.stop(timeout=1.0)
    coro = _value(1)
    with pytest.raises(NotRunning):
        lt.submit(coro)
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED


def _while_stopping(lt: LoopThread, check: Callable[[], None]) -> None:
    """Run ``check()`` in this thread while ``lt`` is draining a running job at stop."""
    started, release, stopping = Gate(), Gate(), Gate()

    async def in_flight() -> None:
        started.set()
        await release.wait_async()

    lt.submit(in_flight())
    assert started.wait()
    lt.add_stop_hook(stopping.set)
    stopper, reports = _stop_in_thread(lt, timeout=WAIT)
    try:
        assert stopping.wait()
        check()
    finally:
        release.set()
        stopper.join(WAIT)
    assert reports[0].completed == 1


def test_submit_to_a_stopping_loop_raises_not_running_at_once(lt: LoopThread) -> None:
    coro = _value(1)

    def check() -> None:
        t0 = time.monotonic()
        with pytest.raises(NotRunning, match="shutting down"):
            lt.submit(coro)
        assert time.monotonic() - t0 < 1.0

    _while_stopping(lt, check)
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED


def test_post_to_a_stopping_loop_raises_not_running(lt: LoopThread) -> None:
    def check() -> None:
        with pytest.raises(NotRunning, match="shutting down"):
            lt.post(print, "never")

    _while_stopping(lt, check)


def test_start_while_stopping_raises_not_running(lt: LoopThread) -> None:
    def check() -> None:
        with pytest.raises(NotRunning):
            lt.start()

    _while_stopping(lt, check)


# -- restart ---------------------------------------------------------------------------


def test_restart_after_stop_runs_a_new_loop(lt: LoopThread) -> None:
    old_loop = lt.loop
    lt.stop(timeout=1.0)
    lt.start()
    assert lt.running
    assert lt.loop is not old_loop
    assert lt.submit(_value("again")).result(WAIT) == "again"


def test_restarted_loop_thread_stops_again_with_a_fresh_report(lt: LoopThread) -> None:
    first = lt.stop(timeout=1.0)
    lt.start()
    started = Gate()

    async def never_finishes() -> None:
        started.set()
        await asyncio.Event().wait()

    lt.submit(never_finishes())
    assert started.wait()
    second = lt.stop(timeout=0.1)
    assert second is not first
    assert second.cancelled == 1


def test_tasks_made_in_a_protected_scope_and_by_them_later_outlive_the_stops_cancellation(
    make_lt: Callable[..., LoopThread],
) -> None:
    # As a driver's pool does: a scheduler task started at open makes a new
    # task each time it wakes (asyncio.wait_for's inner task on 3.11). Neither
    # may be cancelled by the stop before the backend's close (an async
    # shutdown hook) ends them; a task made outside the scope is cancelled.
    lt = make_lt()
    lt.start()
    seen: dict[str, bool] = {}
    wake = asyncio.Event()
    made = asyncio.Event()
    made_later: list[asyncio.Task[None]] = []

    async def scheduler() -> None:
        while True:
            await wake.wait()
            wake.clear()
            made_later.append(asyncio.get_running_loop().create_task(asyncio.sleep(3600)))
            made.set()

    async def open_scope() -> tuple[asyncio.Task[None], asyncio.Task[None]]:
        with lt.protected_scope():
            inside = asyncio.get_running_loop().create_task(scheduler())
        outside = asyncio.get_running_loop().create_task(asyncio.sleep(3600))
        return inside, outside

    inside, outside = lt.submit(open_scope()).result(WAIT)

    async def wake_up() -> None:
        wake.set()
        await made.wait()

    lt.submit(wake_up()).result(WAIT)

    async def close() -> None:  # what the backend's close does, after the drain
        seen["inside"] = not inside.cancelled() and not inside.done()
        seen["later"] = not made_later[0].done()
        seen["outside"] = outside.cancelled()
        inside.cancel()
        made_later[0].cancel()

    lt.add_async_shutdown_hook(close)
    report = lt.stop(timeout=WAIT)
    assert report.finished
    assert seen == {"inside": True, "later": True, "outside": True}


def test_a_protected_scope_that_makes_no_task_leaves_the_task_factory_alone(
    make_lt: Callable[..., LoopThread],
) -> None:
    lt = make_lt()
    lt.start()

    async def scope() -> object:
        with lt.protected_scope():
            pass
        return asyncio.get_running_loop().get_task_factory()

    assert lt.submit(scope()).result(WAIT) is None

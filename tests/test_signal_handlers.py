"""SIGINT/SIGTERM handlers come out again at stop and never keep an instance alive.

The in-process tests call the installed handler object directly (never raise a
real signal in the test runner); the subprocess test sends real signals after
1,000 apps have come and gone.
"""

from __future__ import annotations

import gc
import json
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from asyncbg import AsyncBG

WAIT = 30.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)
LIGHT = {
    # What this file tests does not need the HTTP surface or the watchdog, and
    # registering the blueprint's routes is most of the cost of an instance.
    "ASYNCBG_MONITOR": False,
    "ASYNCBG_DASHBOARD_PREFIX": None,
    "ASYNCBG_METRICS": False,
    "ASYNCBG_AUTOSTART": False,
    "ASYNCBG_HANDLE_SIGNALS": True,
}


@pytest.fixture
def python_handlers() -> Iterator[None]:
    """Python's own handlers in place for the test; whatever was there comes back after."""
    saved = {sig: signal.getsignal(sig) for sig in SIGNALS}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


_KEPT: list[Flask] = []


def new_bg(name: str = "signal_handlers_app") -> AsyncBG:
    """An AsyncBG on a new app, the app kept as a module-level app is kept
    (asyncbg itself holds an app strongly only while its loop runs)."""
    app = Flask(name)
    app.config.update(LIGHT)
    _KEPT.append(app)
    return AsyncBG(app)


def collected(ref: weakref.ref[Any]) -> bool:
    gc.collect()
    return ref() is None


def test_stop_puts_back_the_handlers_it_replaced(python_handlers: None) -> None:
    def custom(signum: int, frame: object) -> None:
        pass

    signal.signal(signal.SIGTERM, custom)
    bg = new_bg()
    bg.start()
    assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is not custom
    bg.stop(1.0)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is custom


def test_restarting_an_instance_does_not_grow_a_chain(python_handlers: None) -> None:
    bg = new_bg()
    for _ in range(20):
        bg.start()
        bg.stop(1.0)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_handlers_hold_no_strong_reference_to_the_instance(python_handlers: None) -> None:
    app = Flask("no_strong_ref")
    app.config.update(LIGHT)
    bg = AsyncBG(app)
    bg.signals.install()  # as start() does, without a loop thread referring to bg
    handler = signal.getsignal(signal.SIGINT)
    ref = weakref.ref(bg)
    del bg, app
    assert collected(ref), "the installed signal handler keeps the AsyncBG alive"
    # Its owner gone, it hands the signal on and takes itself out.
    with pytest.raises(KeyboardInterrupt):
        handler(signal.SIGINT, None)  # type: ignore[operator, misc]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_handler_installed_on_top_is_left_but_does_not_keep_the_instance_alive(
    python_handlers: None,
) -> None:
    app = Flask("on_top")
    app.config.update(LIGHT)
    bg = AsyncBG(app)
    bg.start()
    below = signal.getsignal(signal.SIGINT)
    calls: list[int] = []

    def on_top(signum: int, frame: Any) -> None:
        calls.append(signum)
        below(signum, frame)  # type: ignore[operator, misc]

    signal.signal(signal.SIGINT, on_top)
    bg.stop(1.0)
    assert signal.getsignal(signal.SIGINT) is on_top  # not ours to remove
    ref = weakref.ref(bg)
    del bg, app
    assert collected(ref), "the chained handler keeps the stopped AsyncBG alive"
    with pytest.raises(KeyboardInterrupt):  # straight through to Python's handler
        on_top(signal.SIGINT, None)
    assert calls == [signal.SIGINT]


def test_stopped_from_another_thread_the_handler_hands_signals_straight_on(
    python_handlers: None,
) -> None:
    bg = new_bg()
    bg.start()
    handler = signal.getsignal(signal.SIGINT)
    stopper = threading.Thread(target=bg.stop, args=(1.0,))
    stopper.start()
    stopper.join(WAIT)
    assert not stopper.is_alive()
    stops: list[object] = []
    bg.signals._stop = lambda: stops.append("stop")  # a second stop would show here
    with pytest.raises(KeyboardInterrupt):
        handler(signal.SIGINT, None)  # type: ignore[operator, misc]
    assert stops == []
    # The signal ran it in the main thread, where it could take itself out.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_instance_started_on_top_of_a_dropped_one_skips_it(python_handlers: None) -> None:
    app = Flask("first")
    app.config.update(LIGHT)
    first = AsyncBG(app)
    first.signals.install()
    ref = weakref.ref(first)
    del first, app
    assert collected(ref)
    second = new_bg("second")
    second.start()
    second.stop(1.0)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


MANY_SCRIPT = textwrap.dedent(
    """
    import gc, json, os, signal, sys, threading, time, weakref

    from flask import Flask

    from asyncbg import AsyncBG

    count = int(sys.argv[1])
    config = json.loads(sys.argv[2])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


    def state():
        gc.collect()
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
        return {
            "threads": threading.active_count(),
            "fds": len(os.listdir("/proc/self/fd")),
            "rss_kb": rss,
            "alive": sum(r() is not None for r in refs),
        }


    refs = []
    before = state()
    t0 = time.monotonic()
    for i in range(count):
        app = Flask(f"many_{i}")
        app.config.update(config)
        bg = AsyncBG(app)
        bg.start()  # in the main thread: installs the handlers
        bg.stop(1.0)
        refs.append(weakref.ref(bg))
        del app, bg
    seconds = time.monotonic() - t0
    after = state()
    handlers_back = (
        signal.getsignal(signal.SIGINT) is signal.default_int_handler
        and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    )
    print(json.dumps({"before": before, "after": after, "seconds": seconds,
                      "handlers_back": handlers_back}), flush=True)
    try:
        print("ready for SIGINT", flush=True)
        threading.Event().wait()  # a lock wait: signal handlers run during it
    except KeyboardInterrupt:
        print("KeyboardInterrupt", flush=True)
    except BaseException as exc:
        print(f"wrong exception: {type(exc).__name__}", flush=True)
    print("ready for SIGTERM", flush=True)
    threading.Event().wait(60)
    print("SIGTERM did not end the process", flush=True)
    """
)


class Lines:
    """The lines a subprocess prints, read by a thread, waited for with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._proc = proc
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, prefix: str, timeout: float = WAIT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            assert line is not None, f"ended before {prefix!r}:\n" + "\n".join(self.seen)
            self.seen.append(line)
            if line.startswith(prefix):
                return line


@pytest.mark.timeout(120)
def test_1000_apps_started_and_stopped_leave_nothing_behind_and_signals_still_work(
    tmp_path: Path,
) -> None:
    count = 1000
    script = tmp_path / "many_apps.py"
    script.write_text(MANY_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(count), json.dumps(LIGHT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    try:
        lines = Lines(proc)
        figures = json.loads(lines.wait_for("{", timeout=90.0))
        print(json.dumps(figures))  # shown with -s: the figures of the run
        before, after = figures["before"], figures["after"]
        assert after["alive"] == 0, figures
        assert after["threads"] == before["threads"], figures
        assert after["fds"] <= before["fds"] + 2, figures
        # ~165 KB an instance when they leaked: 1,000 would be over 150 MB.
        assert after["rss_kb"] - before["rss_kb"] < 30_000, figures
        assert figures["handlers_back"], figures
        lines.wait_for("ready for SIGINT")
        proc.send_signal(signal.SIGINT)
        lines.wait_for("ready for SIGTERM")
        assert "KeyboardInterrupt" in lines.seen, lines.seen
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert returncode == -signal.SIGTERM, lines.seen

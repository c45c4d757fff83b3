"""Loop lag and blocked-loop detection for a :class:`~asyncbg.LoopThread`.

A heartbeat callback on the loop asks to run every ``interval`` seconds and
records how late it actually ran: that lateness is the loop's lag, the delay any
callback, timer or cross-thread hand-off suffers at that moment. A watchdog
thread looks at the heartbeat from outside: when it is overdue by more than
``blocked_threshold`` the loop is stuck in one callback, and the watchdog names
the task (or plain callback) running on the loop thread right then, logs it
once per offender per minute, and counts it.

Nothing here calls into the loop to read state, so a stuck loop can still be
reported on. Knows nothing of Flask.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .loop import LoopThread

__all__ = ["BlockedLoop", "LoopMonitor", "describe_task_name"]

log = logging.getLogger("asyncbg")

_UNNAMED_TASK = re.compile(r"Task-\d+")
_ASYNCIO_DIR = os.path.dirname(asyncio.__file__)
_THREADING_FILE = threading.__file__
_LOOP_THREAD_FILE = os.path.join(os.path.dirname(__file__), "loop.py")
_LOG_EVERY = 60.0
_NO_CALLBACK = "(no callback)"


def describe_task_name(name: str) -> str:
    """Say in words what an asyncbg task name stands for.

    ``asyncbg:job:send`` -> ``job 'send'``, ``asyncbg:periodic:tick`` ->
    ``periodic job 'tick'``, ``asyncbg:consumer:mail`` -> ``consumer of queue
    'mail'``, ``asyncbg:view:users.show (GET /users/<int:id>)`` -> ``async view
    'users.show' (GET /users/<int:id>)`` (with `` in 'load_user'`` when an
    async hook of that request runs, see :func:`asyncbg.async_views.view_task_name`),
    ``asyncbg:async:fetch`` -> ``async function 'fetch'``; any other name ->
    ``task 'name'``.
    """
    kind, _, rest = name.removeprefix("asyncbg:").partition(":")
    if name.startswith("asyncbg:") and rest:
        if kind == "job":
            return f"job {rest!r}"
        if kind == "periodic":
            return f"periodic job {rest!r}"
        if kind == "consumer":
            return f"consumer of queue {rest!r}"
        if kind == "view":
            return _describe_view(rest)
        if kind == "async":
            return f"async function {rest!r}"
    return f"task {name!r}"


def _describe_view(rest: str) -> str:
    # "<endpoint> (<METHOD> <rule>)", maybe followed by " in <qualname>". A rule
    # can hold parentheses (a regex converter), a qualified name cannot.
    route, sep, inner = rest.rpartition(") in ")
    if sep:
        route += ")"
    else:
        route, inner = rest, ""
    endpoint, sep, method_rule = route.partition(" (")
    if not sep or not method_rule.endswith(")"):
        return f"async view {rest!r}"
    words = f"async view {endpoint!r} ({method_rule}"
    return f"{words} in {inner!r}" if inner else words


@dataclass
class BlockedLoop:
    """One time the loop was found stuck for longer than the threshold.

    ``offender`` is the asyncio task name (``asyncbg:job:<name>``, ...) or the
    plain callback's qualified name; ``where`` the innermost frame of the loop
    thread when the watchdog looked; ``duration`` how long it was stuck (at
    least; updated when the loop comes back).
    """

    offender: str
    description: str
    where: str | None
    at: float
    duration: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of this event."""
        return {
            "offender": self.offender,
            "description": self.description,
            "where": self.where,
            "at": self.at,
            "duration": self.duration,
        }


class LoopMonitor:
    """Measure a loop's lag continuously and report callbacks that block it.

    :param interval: the heartbeat period in seconds.
    :param blocked_threshold: a loop stuck longer than this (seconds) is reported.
    :param window: lag percentiles cover this many seconds of heartbeats.
    :raises ValueError: on a non-positive ``interval``, ``blocked_threshold`` or ``window``.
    """

    def __init__(
        self,
        loop_thread: LoopThread,
        *,
        interval: float = 0.1,
        blocked_threshold: float = 0.25,
        window: float = 60.0,
    ) -> None:
        self.loop_thread = loop_thread
        self.configure(interval=interval, blocked_threshold=blocked_threshold, window=window)
        self._lock = threading.Lock()
        self._samples: collections.deque[tuple[float, float]] = collections.deque()
        self._last_lag: float | None = None
        self._due = math.inf  # monotonic time the next heartbeat should run at
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_ident: int | None = None
        self._watchdog: threading.Thread | None = None
        self._stop_watchdog = threading.Event()
        # The watchdog's view of the current stall (watchdog thread only, but
        # _stall and _stall_since, which the heartbeat closes under the lock).
        self._stall_due: float | None = None  # the heartbeat the current stall delays
        self._stall: BlockedLoop | None = None  # its latest event
        self._stall_since = 0.0  # monotonic time that event's offender took over
        self._culprit: object = None  # the task or frame blocking the loop
        self._candidate: tuple[object, float] | None = None  # a new one, since when
        self._last_logged: dict[str, float] = {}
        #: Times the loop was found blocked, in all and by offender.
        self.blocked_total = 0
        self.blocked_by_offender: collections.Counter[str] = collections.Counter()
        self.last_blocked: BlockedLoop | None = None
        loop_thread.add_stop_hook(self._stop_heartbeat)

    def configure(
        self,
        *,
        interval: float | None = None,
        blocked_threshold: float | None = None,
        window: float | None = None,
    ) -> None:
        """Change the heartbeat period, the blocked threshold or the lag window.

        Takes effect at the next heartbeat.

        :raises ValueError: if a value is not a positive number.
        """
        for what, value in (
            ("interval", interval),
            ("blocked_threshold", blocked_threshold),
            ("window", window),
        ):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{what} must be a positive number of seconds, got {value!r}")
        if interval is not None:
            self.interval = float(interval)
        if blocked_threshold is not None:
            self.blocked_threshold = float(blocked_threshold)
        if window is not None:
            self.window = float(window)

    @property
    def active(self) -> bool:
        """True while the heartbeat is scheduled on a running loop."""
        return self._handle is not None and self.loop_thread.running

    # -- lifecycle (any thread) ---------------------------------------------------------

    def start(self) -> None:
        """Begin the heartbeat on the (running) loop and start the watchdog thread.

        Idempotent.

        :raises NotRunning: if the loop is not running.
        """
        watchdog = self._watchdog
        if watchdog is None or not watchdog.is_alive():
            # A fresh watchdog (first start, restart, or in a forked child) must
            # not judge the loop by a heartbeat due time left from before.
            self._due = math.inf
            self._stop_watchdog = threading.Event()
            watchdog = threading.Thread(
                target=self._watch,
                args=(self._stop_watchdog,),
                name=f"{self.loop_thread.name}-watchdog",
                daemon=True,
            )
            self._watchdog = watchdog
            watchdog.start()
        self.loop_thread.post(self._start_heartbeat)

    def stop(self) -> None:
        """Stop the watchdog thread (the heartbeat stops with the loop). Idempotent."""
        self._stop_watchdog.set()
        self._due = math.inf
        watchdog = self._watchdog
        if watchdog is not None and watchdog is not threading.current_thread():
            watchdog.join(timeout=5.0)

    # -- the heartbeat (loop thread) -------------------------------------------------

    def _start_heartbeat(self) -> None:
        loop = asyncio.get_running_loop()
        # A handle on another loop is left over from before a restart or a fork.
        if self._handle is not None and self._loop is loop:
            return
        self._loop = loop
        self._loop_ident = threading.get_ident()
        self._schedule()

    def _stop_heartbeat(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._due = math.inf

    def _schedule(self) -> None:
        assert self._loop is not None
        self._due = time.monotonic() + self.interval
        self._handle = self._loop.call_later(self.interval, self._beat)

    def _beat(self) -> None:
        now = time.monotonic()
        # asyncio may run a timer up to its clock resolution early.
        lag = max(0.0, now - self._due)
        horizon = now - self.window
        with self._lock:
            samples = self._samples
            samples.append((now, lag))
            while samples[0][0] < horizon:
                samples.popleft()
            self._last_lag = lag
            stall = self._stall
            if stall is not None:
                stall.duration = max(stall.duration, now - self._stall_since)
                self._stall = None
        self._schedule()

    # -- reading (any thread) ---------------------------------------------------------

    def current_lag(self) -> float | None:
        """The loop's lag now: the last heartbeat's lateness, or longer if one is overdue.

        None before the first heartbeat or while the monitor is not running.
        """
        if not self.active:
            return None
        overdue = time.monotonic() - self._due
        last = self._last_lag
        if last is None:
            return max(0.0, overdue)
        return max(last, overdue)

    def lag_stats(self) -> dict[str, Any]:
        """Lag now and over the window: ``current``, ``p50``, ``p99``, ``max`` and the
        number of ``samples`` (seconds; None where there are no samples yet)."""
        horizon = time.monotonic() - self.window
        with self._lock:
            lags = sorted(lag for t, lag in self._samples if t >= horizon)
        return {
            "current": self.current_lag(),
            "p50": _percentile(lags, 0.50),
            "p99": _percentile(lags, 0.99),
            "max": lags[-1] if lags else None,
            "samples": len(lags),
            "window": self.window,
            "interval": self.interval,
        }

    def blocked_stats(self) -> dict[str, Any]:
        """How often the loop was found blocked: ``count``, ``threshold``,
        ``by_offender`` and the ``last`` event (or None)."""
        last = self.last_blocked
        return {
            "count": self.blocked_total,
            "threshold": self.blocked_threshold,
            "by_offender": dict(self.blocked_by_offender),
            "last": None if last is None else last.to_dict(),
        }

    # -- the watchdog thread -------------------------------------------------------------

    def _watch(self, stop: threading.Event) -> None:
        # Looks often enough to catch a stall within a quarter of the threshold.
        while not stop.wait(max(0.005, min(self.blocked_threshold / 4, self.interval))):
            try:
                self._look()
            except Exception:  # pragma: no cover - never let the watchdog die
                log.exception("loop watchdog failed")

    def _look(self) -> None:
        due = self._due
        now = time.monotonic()
        overdue = now - due
        threshold = self.blocked_threshold
        if overdue < threshold:
            self._culprit = self._candidate = None
            return
        identity, offender, description, where = self._identify()
        if self._stall_due != due:
            # A new stall: the heartbeat due at `due` has been held up too long.
            self._stall_due = due
            self._culprit, self._candidate = identity, None
            self._report_stall(offender, description, where, overdue, since=due)
            return
        # The same stall goes on. Several callbacks can block one after the
        # other before the heartbeat gets its turn (two jobs started in the
        # same loop iteration): a new culprit is a new stall once it has held
        # the loop for the threshold by itself.
        if identity is self._culprit:
            return
        candidate = self._candidate
        if candidate is None or candidate[0] is not identity:
            self._candidate = (identity, now)
        elif now - candidate[1] >= threshold:
            self._culprit, self._candidate = identity, None
            self._report_stall(offender, description, where, now - candidate[1], candidate[1])

    def _report_stall(
        self, offender: str, description: str, where: str | None, duration: float, since: float
    ) -> None:
        event = BlockedLoop(offender, description, where, time.time(), duration)
        with self._lock:
            previous = self._stall
            if previous is not None:  # superseded within the same stall
                previous.duration = max(previous.duration, since - self._stall_since)
            self._stall, self._stall_since = event, since
        self.blocked_total += 1
        self.blocked_by_offender[offender] += 1
        self.last_blocked = event
        now = time.monotonic()
        if now - self._last_logged.get(offender, -math.inf) < _LOG_EVERY:
            return
        self._last_logged[offender] = now
        log.warning(
            "the event loop has been blocked for %.3fs so far (threshold %.3gs) by %s%s; "
            "nothing else on the loop runs meanwhile (no other async view, job or consumer): "
            "await instead of blocking, or move the blocking call to a thread "
            "(await asyncio.to_thread(...), asgiref's sync_to_async, a sync @bg.task). "
            "Logged at most once a minute per offender (%d time(s) so far).",
            duration,
            self.blocked_threshold,
            description,
            f" at {where}" if where else "",
            self.blocked_by_offender[offender],
        )

    def describe_blocker(self) -> str:
        """Say what runs on the loop right now (the job, the view or the callback
        that blocks it, and where), for a log line. Safe from any thread."""
        lt = self.loop_thread
        try:
            _identity, _offender, description, where = self._identify(lt._loop, lt._ident)
        except Exception:  # pragma: no cover - the loop went away meanwhile
            return "something unknown"
        return f"{description} at {where}" if where else description

    def _identify(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        loop_ident: int | None = None,
    ) -> tuple[object, str, str, str | None]:
        """(identity, offender, description, innermost frame) of what runs on the loop now.

        The identity (the task, or the callback's frame) tells two runs of the
        same job apart.
        """
        loop = loop or self._loop
        loop_ident = loop_ident or self._loop_ident
        frame = None
        if loop_ident is not None:
            frame = sys._current_frames().get(loop_ident)
        stack = _stack(frame)
        where = _frame_where(stack[-1]) if stack else None
        task = None
        if loop is not None:
            try:
                task = asyncio.current_task(loop)
            except RuntimeError:  # pragma: no cover - the loop went away meanwhile
                task = None
        if task is not None:
            name = task.get_name()
            if _UNNAMED_TASK.fullmatch(name):
                coro = task.get_coro()
                name = getattr(coro, "__qualname__", None) or repr(coro)
            return task, name, describe_task_name(name), where
        user = [f for f in stack if not _is_plumbing(f)]
        if not user:
            # Nothing but the loop's own machinery: it is not stuck in a
            # callback, it cannot get the CPU or the GIL.
            return (
                _NO_CALLBACK,
                _NO_CALLBACK,
                "no callback (the loop thread is starved of CPU or of the GIL by other threads)",
                where,
            )
        code = user[0].f_code
        name = getattr(code, "co_qualname", code.co_name)
        module = user[0].f_globals.get("__name__", "?")
        qualified = f"{module}.{name}"
        return user[0], qualified, f"callback {qualified!r}", where


def _stack(frame: FrameType | None) -> list[FrameType]:
    """Frames from outermost to innermost."""
    frames = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    frames.reverse()
    return frames


def _is_plumbing(frame: FrameType) -> bool:
    filename = frame.f_code.co_filename
    return (
        filename.startswith(_ASYNCIO_DIR)
        or filename in (_THREADING_FILE, _LOOP_THREAD_FILE)
        or "selectors" in os.path.basename(filename)
        or "uvloop" in filename
    )


def _frame_where(frame: FrameType) -> str:
    code = frame.f_code
    return f"{code.co_filename}:{frame.f_lineno} in {getattr(code, 'co_qualname', code.co_name)}"


def _percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]

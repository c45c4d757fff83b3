"""Bounded log output for failures that repeat: short reprs and a per-source throttle.

A consumer fed a 5 MB item that always raises, or a periodic job failing every
10 ms, must not turn the log into a copy of its inputs or a wall of identical
tracebacks. Two tools:

- :func:`short_repr` (and :func:`describe_exception`): a repr cut to a length,
  which never raises.
- :class:`LogThrottle`: the first failure of a source, keyed by ``(kind, name)``,
  is logged in full with its traceback; further ones within ``interval``
  seconds are only counted, and one summary line reports them when the
  interval is over (on :meth:`LogThrottle.flush`, or with the next failure
  after it)::

      throttle = LogThrottle(interval=60.0)
      try:
          ...
      except Exception as exc:
          stats.failures += 1  # counts never depend on the throttle
          throttle.failure(log, "consumer", queue_name, exc,
                           "consumer %s failed on %s", queue_name, short_repr(item))

The throttle only decides what is written to the log: callers keep counting
every failure in their statistics and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import reprlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["FlushTimer", "LogThrottle", "describe_exception", "short_repr"]

#: Sources idle for a whole interval are forgotten once there are more than this
#: many, so a stream of distinct names cannot grow the throttle without bound.
MAX_TRACKED = 1024


class _Repr(reprlib.Repr):
    def __init__(self, limit: int) -> None:
        super().__init__()
        # reprlib caps the size of containers and strings, but an object with a
        # long custom __repr__ is only cut by maxother.
        self.maxstring = max(limit, 8)
        self.maxother = max(limit, 8)
        self.maxlong = max(limit, 8)

    # Without these, bytes go through the generic path, which builds the
    # whole repr (four times the size of the data) before cutting it.
    def repr_bytes(self, x: bytes, level: int) -> str:
        return self._repr_binary(x)

    def repr_bytearray(self, x: bytearray, level: int) -> str:
        return self._repr_binary(x)

    def _repr_binary(self, x: bytes | bytearray) -> str:
        if len(x) <= self.maxother // 4:
            return repr(x)
        head = repr(x[: self.maxother])[: max(self.maxother - 30, 8)]
        return f"{head}...<{len(x)} bytes>"

    def repr_instance(self, x: object, level: int) -> str:
        # reprlib's own fallback names the address, not the fact that it failed.
        try:
            text = repr(x)
        except Exception:
            return f"<unreprable {_type_name(x)}>"
        return _cut(text, self.maxother)


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    marker = f"...<{len(text) - limit + 3} more chars>"
    keep = max(limit - len(marker), 0)
    return text[:keep] + marker


def short_repr(obj: object, limit: int = 200) -> str:
    """Return a repr of ``obj`` of at most about ``limit`` characters; never raises.

    Containers and strings are abbreviated by :mod:`reprlib` (it never builds
    the full repr of a large list or string); anything longer is cut and says
    how much was left out. If ``repr(obj)`` raises, the result is
    ``<unreprable TypeName>``.

    :param limit: the length to aim for; values under 20 are treated as 20.
    """
    limit = max(int(limit), 20)
    try:
        text = _Repr(limit).repr(obj)
    except Exception:
        return f"<unreprable {_type_name(obj)}>"
    return _cut(text, limit)


def describe_exception(exc: BaseException, limit: int = 200) -> str:
    """Return ``"TypeName: message"`` for ``exc``, at most about ``limit`` characters.

    Never raises: an exception whose ``str()`` raises is described as
    ``TypeName: <unprintable message>``. An empty message gives ``TypeName``.
    """
    name = _type_name(exc)
    try:
        message = str(exc)
    except Exception:
        message = "<unprintable message>"
    text = f"{name}: {message}" if message else name
    return _cut(text, max(int(limit), 20))


def _type_name(obj: object) -> str:
    try:
        return type(obj).__name__
    except Exception:  # pragma: no cover - a metaclass with a broken __name__
        return "object"


@dataclass
class _Source:
    logger: logging.Logger
    level: int
    window_start: float  # clock time of the last failure logged in full
    suppressed: int = 0
    last: str = ""


class LogThrottle:
    """Log the first failure of each ``(kind, name)`` in full, then summarize.

    Within ``interval`` seconds of a failure logged in full, further failures
    of the same source are counted, not logged. Once the interval is over, one
    line ``"N more failures of KIND NAME in the last Ts (last: Type: msg)"``
    is logged, by :meth:`flush` (call it when :meth:`next_flush_at` comes) or
    by the next :meth:`failure` of that source, whichever comes first; that
    next failure is then logged in full again. So each source writes at most
    two log records per interval.

    Thread-safe: a lock guards the bookkeeping; logging happens outside it, so
    a log handler that itself reports failures here cannot deadlock.

    :param interval: seconds of suppression after a failure logged in full.
    :param clock: a monotonic clock in seconds (inject a fake one in tests).
    :raises ValueError: if ``interval`` is negative.
    """

    def __init__(
        self, interval: float = 60.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not interval >= 0:
            raise ValueError(f"interval must be >= 0, got {interval!r}")
        self.interval = float(interval)
        self.clock = clock
        self._lock = threading.Lock()
        self._sources: dict[tuple[str, str], _Source] = {}

    def failure(
        self,
        logger: logging.Logger,
        kind: str,
        name: str,
        exc: BaseException,
        msg: str,
        *args: object,
        level: int = logging.ERROR,
    ) -> bool:
        """Record one failure of ``(kind, name)`` and log it unless throttled.

        Logs ``logger.log(level, msg, *args, exc_info=exc)`` if no failure of
        this source was logged in full within the interval; otherwise counts
        it. A summary of failures counted in an interval that is over is
        logged first. Returns True if this failure was logged in full.
        Never raises because of ``exc`` (its message is read through
        :func:`describe_exception`).
        """
        described = describe_exception(exc)
        key = (kind, name)
        with self._lock:
            now = self.clock()
            src = self._sources.get(key)
            summary = None
            if src is not None and now - src.window_start < self.interval:
                src.suppressed += 1
                src.last = described
                return False
            if src is not None and src.suppressed:
                summary = self._take_summary(key, src, now)
            if src is None:
                self._prune(now)
                src = self._sources[key] = _Source(logger, level, now)
            src.logger, src.level, src.window_start = logger, level, now
        if summary is not None:
            self._emit(*summary)
        logger.log(level, msg, *args, exc_info=exc)
        return True

    def flush(self, *, force: bool = False) -> int:
        """Log the summary line of every source whose interval is over.

        With ``force=True``, of every source with failures counted, interval
        over or not (e.g. at shutdown, so no count is left unsaid). Returns
        the number of summary lines logged.
        """
        with self._lock:
            now = self.clock()
            due = [
                self._take_summary(key, src, now)
                for key, src in self._sources.items()
                if src.suppressed and (force or now - src.window_start >= self.interval)
            ]
        for summary in due:
            self._emit(*summary)
        return len(due)

    def next_flush_at(self) -> float | None:
        """The clock time at which :meth:`flush` next has a summary to log, or None."""
        with self._lock:
            pending = [s.window_start for s in self._sources.values() if s.suppressed]
        return min(pending) + self.interval if pending else None

    def suppressed(self, kind: str, name: str) -> int:
        """How many failures of ``(kind, name)`` are counted but not yet summarized."""
        with self._lock:
            src = self._sources.get((kind, name))
            return src.suppressed if src is not None else 0

    def _take_summary(
        self, key: tuple[str, str], src: _Source, now: float
    ) -> tuple[logging.Logger, int, str, tuple[object, ...]]:
        count, src.suppressed = src.suppressed, 0
        kind, name = key
        return (
            src.logger,
            src.level,
            "%d more failure%s of %s %s in the last %.0fs (last: %s)",
            (count, "" if count == 1 else "s", kind, name, now - src.window_start, src.last),
        )

    @staticmethod
    def _emit(logger: logging.Logger, level: int, msg: str, args: tuple[object, ...]) -> None:
        logger.log(level, msg, *args)

    def _prune(self, now: float) -> None:
        if len(self._sources) < MAX_TRACKED:
            return
        idle = [
            key
            for key, src in self._sources.items()
            if not src.suppressed and now - src.window_start >= self.interval
        ]
        for key in idle:
            del self._sources[key]


class FlushTimer:
    """Logs a :class:`LogThrottle`'s summaries on an event loop when their
    interval ends, so a count is said even if the failures stop.

    Loop thread only. :meth:`arm` after a failure the throttle suppressed;
    :meth:`close` at stop (then ``throttle.flush(force=True)`` says the rest).
    """

    def __init__(self, throttle: LogThrottle) -> None:
        self.throttle = throttle
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def arm(self, loop: asyncio.AbstractEventLoop) -> None:
        """Schedule the next summary on ``loop`` unless one is scheduled there."""
        if self._handle is not None and self._loop is loop:
            return  # one left on a previous, closed loop is forgotten below
        at = self.throttle.next_flush_at()
        if at is None:
            self._handle = None
            return
        delay = max(at - self.throttle.clock(), 0.0)
        self._loop = loop
        self._handle = loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self.throttle.flush()
        if self._loop is not None and not self._loop.is_closed():
            self.arm(self._loop)

    def close(self) -> None:
        """Cancel the scheduled summary (the caller flushes what is left)."""
        if self._handle is not None:
            self._handle.cancel()
        self._handle = None

    def close_and_flush(self, throttle: LogThrottle) -> None:
        """Cancel the scheduled summary and log every count ``throttle`` holds (at stop)."""
        self.close()
        throttle.flush(force=True)

    def after_failure(self, throttle: LogThrottle, logged: bool, *, arm: bool = True) -> None:
        """After ``throttle.failure(...)`` returned ``logged``: if the line was held
        back, arm on the running loop so that its count is said on time.

        ``throttle`` is the owner's current one (owners let it be replaced);
        ``arm=False`` once the owner has stopped (its counts are said at stop).
        """
        self.throttle = throttle
        if logged or not arm:
            return
        with contextlib.suppress(RuntimeError):  # no running loop: a coroutine closed late
            self.arm(asyncio.get_running_loop())

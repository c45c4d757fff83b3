"""Periodic jobs on the loop: the timers that start their runs, the overlap
policy, the statistics of their runs and, for host- and cluster-scoped ones,
who runs them: the host lock (memory backend) or the store's lease.

When a run is due is :mod:`asyncbg.engine.triggers`' arithmetic; this module
reads the clocks and arms ``loop.call_at``. A run still going when the next is
due is not overlapped: that tick is skipped and counted.

With a store lease (:mod:`asyncbg.engine.leadership`) whether this process runs
a tick is the store's answer, so it is asked in the tick's task, before the
body: take or renew the lease, then claim the tick's slot. A slot number is
the tick's time on the schedule's shared grid in whole milliseconds since the
epoch (fixed rate: the stored anchor + k periods; cron: the occurrence), so
every process numbers a tick alike, and the numbers only grow, even when the
period changes between deploys. A tick this process does not lead is neither
a run nor a skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal, TypedDict, Unpack

from .host_lock import HostLock
from .leadership import StoreLeader, lease_ttl
from .logthrottle import FlushTimer, LogThrottle, describe_exception
from .runner import FAILURE_LOG_INTERVAL
from .tasks import is_async_callable
from .triggers import CronTrigger, DelayTrigger, RateTrigger, Trigger

if TYPE_CHECKING:
    from .loop import LoopThread

__all__ = ["PeriodicJob", "Schedule", "Scope"]

log = logging.getLogger("asyncbg")

Scope = Literal["process", "host", "cluster"]

_SKIP_LOG_INTERVAL = 60.0

#: A schedule this close to the shared grid is left as it is armed.
_ALIGNED = 0.001

#: Longest ``last_error`` / ``lock_error`` kept: they go into health reports.
_ERROR_TEXT_LIMIT = 500


def _seconds(value: float | dt.timedelta | None, what: str) -> float | None:
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, dt.timedelta) else float(value)
    if not seconds > 0 or not math.isfinite(seconds):
        raise ValueError(f"{what} must be a positive number of seconds, got {value!r}")
    return seconds


class Schedule(TypedDict, total=False):
    """The keyword options of ``@bg.periodic(...)`` and :class:`PeriodicJob`
    (see there): ``every``, ``delay`` or ``cron``, and how runs start."""

    every: float | dt.timedelta | None
    delay: float | dt.timedelta | None
    cron: str | None
    jitter: float | dt.timedelta
    run_at_start: bool
    timeout: float | dt.timedelta | None
    scope: Scope
    tz: dt.tzinfo | None


class PeriodicJob:
    """A coroutine function run on a schedule, with the statistics of its runs.

    Exactly one of ``every`` (fixed rate), ``delay`` (fixed delay: the next run
    starts ``delay`` after the previous one ended) or ``cron`` is given.

    :param jitter: up to this many seconds added at random to each start.
    :param run_at_start: run once as soon as the schedule starts.
    :param timeout: cancel a run that takes longer (counted as a failure).
    :param scope: ``"process"`` (every process runs it), ``"host"`` (one
        process per host at a time: through the backend's lease when it is
        durable, else a :class:`~asyncbg.engine.host_lock.HostLock`) or
        ``"cluster"`` (one process among all that share the durable backend,
        through its lease; the memory backend refuses it at start).
    :param tz: time zone of a cron expression (default: the machine's local one).
    :raises ValueError: on a missing, doubled or malformed schedule.
    :raises TypeError: on an option it does not know, or a function that is not async.
    """

    def __init__(
        self, fn: Callable[[], Awaitable[Any]], *, name: str, **schedule: Unpack[Schedule]
    ) -> None:
        unknown = sorted(set(schedule) - set(Schedule.__annotations__))
        if unknown:
            raise TypeError(f"unknown periodic option(s): {', '.join(unknown)}")
        every, delay, cron = schedule.get("every"), schedule.get("delay"), schedule.get("cron")
        jitter = schedule.get("jitter", 0.0)
        scope = schedule.get("scope", "process")
        if sum(x is not None for x in (every, delay, cron)) != 1:
            raise ValueError("give exactly one of every=, delay= or cron=")
        cron_trigger = None if cron is None else CronTrigger(cron)
        if scope not in ("process", "host", "cluster"):
            raise ValueError(f"scope must be 'process', 'host' or 'cluster', got {scope!r}")
        if not is_async_callable(fn):
            raise TypeError(f"a periodic job must be an async function, got {fn!r}")
        self.fn = fn
        self.name = name
        self.every = _seconds(every, "every")
        self.delay = _seconds(delay, "delay")
        self.cron = cron
        jitter_s = jitter.total_seconds() if isinstance(jitter, dt.timedelta) else float(jitter)
        if jitter_s < 0:
            raise ValueError(f"jitter must be >= 0, got {jitter!r}")
        self.jitter = jitter_s
        self.run_at_start = bool(schedule.get("run_at_start", False))
        self.timeout = _seconds(schedule.get("timeout"), "timeout")
        self.scope: Scope = scope
        self.tz = schedule.get("tz")
        self._trigger: Trigger
        if cron_trigger is not None:
            self._trigger = cron_trigger
        elif self.every is not None:
            self._trigger = RateTrigger(self.every)
        else:
            assert self.delay is not None
            self._trigger = DelayTrigger(self.delay)
        # statistics
        self.runs = 0
        self.failures = 0
        self.skips = 0
        self.last_start: float | None = None
        self.last_duration: float | None = None
        self.last_error: str | None = None
        #: Why the last attempt to take the host lock (or the store lease)
        #: failed; None once one works.
        self.lock_error: str | None = None
        self.last_start_lateness: float | None = None
        self.next_due: float | None = None
        self._lt: LoopThread | None = None
        self._context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
        self._lock: HostLock | None = None
        self._leader: StoreLeader | None = None
        # The tick task while it asks the store whether this process runs it.
        self._lease_task: asyncio.Task[Any] | None = None
        self._aligned = False  # on the shared anchor's grid (fixed rate, store lease)
        # The timer armed: its due time (before jitter), in loop and wall time.
        self._armed_due = 0.0
        self._armed_wall = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._active = False
        self._last_skip_log = -math.inf
        #: Decides which failures are logged in full; replace it to change the interval.
        self.log_throttle = LogThrottle(FAILURE_LOG_INTERVAL)
        self._flush_timer = FlushTimer(self.log_throttle)

    def __repr__(self) -> str:
        return f"<PeriodicJob {self.name} {self.schedule}>"

    @property
    def schedule(self) -> str:
        """The schedule in words, e.g. ``every 5s``, ``delay 1s``, ``cron */5 * * * *``."""
        return str(self._trigger)

    @property
    def running(self) -> bool:
        """True while a run is in progress."""
        return self._run_task is not None

    @property
    def _anchor(self) -> float:
        # The loop time a fixed-rate schedule counts its periods from (read by
        # benchmarks/periodic.py to tell which slot a run was due in).
        return self._trigger.anchor if isinstance(self._trigger, RateTrigger) else 0.0

    @property
    def holds_lock(self) -> bool | None:
        """For host- and cluster-scoped jobs: whether this process holds the
        host lock or the store lease (None for process scope)."""
        if self._leader is not None:
            return self._leader.held
        return None if self._lock is None else self._lock.held

    # -- loop thread --------------------------------------------------------------

    def start(
        self,
        loop_thread: LoopThread,
        *,
        context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
        lock: HostLock | None = None,
        leader: StoreLeader | None = None,
    ) -> None:
        """Begin the schedule. Loop thread only.

        ``lock`` or ``leader`` decide which process runs it (host or cluster
        scope); the caller releases ``leader`` after the drain
        (:meth:`StoreLeader.release`), before its store closes.

        :raises ValueError: for ``scope="cluster"`` without a ``leader`` (the
            memory backend: nothing is shared between processes).
        """
        if self.scope == "cluster" and leader is None:
            raise ValueError(
                f"periodic job {self.name!r} has scope='cluster', which needs a shared "
                "durable backend: set ASYNCBG_BACKEND (e.g. 'sqlite:///asyncbg.db'); "
                "with the memory backend use scope='host' or 'process'"
            )
        assert lock is None or leader is None, "a host lock or a store lease, not both"
        self._lt = loop_thread
        self._context = context
        self._lock = lock
        self._leader = leader
        self._lease_task = None
        self._aligned = False
        if leader is not None:
            leader.on_error = self._lease_failed
        self._active = True
        loop = loop_thread.loop
        now = loop.time()
        trigger = self._trigger
        if isinstance(trigger, CronTrigger):
            tz = self.tz or dt.datetime.now().astimezone().tzinfo
            trigger.start(dt.datetime.now(tz))
            due = self._next_cron_due(trigger) if not self.run_at_start else now
        else:
            due = trigger.first_due(now, self.run_at_start)
        self._arm(due)
        if leader is not None and isinstance(trigger, RateTrigger):
            # Onto the shared grid before the first tick, when the store answers in time.
            loop_thread.spawn(self._learn_anchor(), name=f"asyncbg:periodic:{self.name}:anchor")

    def stop(self) -> None:
        """Stop scheduling new runs (a run in progress goes on). Loop thread only."""
        self._active = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._flush_timer.close()  # release() logs what is left
        self.next_due = None

    def release(self) -> None:
        """Release the host lock, if held (once no run can be in progress; a
        store lease is released by its owner, on the loop).

        Also logs the summary of failures counted but not logged yet, so none
        goes unsaid at shutdown.
        """
        if self._lock is not None:
            self._lock.release()
        self._flush_timer.close_and_flush(self.log_throttle)

    def run_now(self) -> bool:
        """Start one run now, outside the schedule, unless one is running. Loop thread only."""
        if self._run_task is not None or self._lt is None or not self._active:
            return False
        task = self._lt.spawn(self._run(None), name=f"asyncbg:periodic:{self.name}")
        # Started eagerly, a run that never suspends is already over.
        self._run_task = None if task.done() else task
        return True

    def _arm(self, due: float) -> None:
        assert self._lt is not None
        loop = self._lt.loop
        when = due + (random.uniform(0.0, self.jitter) if self.jitter else 0.0)
        now, wall = loop.time(), time.time()
        self._armed_due, self._armed_wall = due, wall + (due - now)
        self._handle = loop.call_at(when, self._fire, when, self._armed_wall)
        self.next_due = wall + (when - now)

    def _next_cron_due(self, trigger: CronTrigger) -> float:
        # Cron counts in wall-clock time, timers in loop time: convert at "now".
        assert self._lt is not None
        now_wall = time.time()
        nxt, missed = trigger.next_due(now_wall)
        for _ in range(missed):  # occurrences missed while the loop was busy
            self._count_skip("the loop was busy")
        return self._lt.loop.time() + (nxt - now_wall)

    def _next_rate_due(self, trigger: RateTrigger) -> float:
        assert self._lt is not None
        due, missed = trigger.next_due(self._lt.loop.time())
        for _ in range(missed):  # whole periods missed while the loop was busy
            self._count_skip("the loop was busy")
        return due

    def _count_skip(self, why: str) -> None:
        self.skips += 1
        now = time.monotonic()
        if now - self._last_skip_log >= _SKIP_LOG_INTERVAL:
            self._last_skip_log = now
            log.warning(
                "periodic job %s skipped a tick because %s (%d skipped so far; "
                "logged at most once a minute)",
                self.name,
                why,
                self.skips,
            )

    def _fire(self, due: float, wall_due: float) -> None:
        self._handle = None
        if not self._active:
            return
        if self._leader is not None:
            self._fire_on_lease(due, wall_due, self._leader)
            return
        lt = self._lt
        assert lt is not None
        started = False
        if self._lock is not None and not self._try_lock():
            pass  # another process on this host runs it; stay ready to take over
        elif self._run_task is not None:
            self._count_skip("the previous run was still going")
        else:
            started = True
            task = lt.spawn(self._run(due), name=f"asyncbg:periodic:{self.name}")
            # Started eagerly, a run that never suspends is already over.
            self._run_task = None if task.done() else task
        trigger = self._trigger
        if isinstance(trigger, RateTrigger):
            self._arm(self._next_rate_due(trigger))
        elif isinstance(trigger, CronTrigger):
            self._arm(self._next_cron_due(trigger))
        elif (not started or self._run_task is None) and self._handle is None and self._active:
            # fixed delay: the run re-arms when it ends; if none started (or it
            # finished at once, eagerly, and did not re-arm), arm from now.
            self._arm(trigger.due_after(lt.loop.time()))

    def _try_lock(self) -> bool:
        assert self._lock is not None
        try:
            held = self._lock.try_acquire()
        except Exception as exc:
            # Raised out of this timer callback it would end the schedule for
            # good (the next tick is armed after this): count it, retry next tick.
            self._leadership_failed(
                "host lock",
                exc,
                "periodic job %s could not take its host lock %s; "
                "it will try again on its next tick",
                self._lock.path,
            )
            return False
        self.lock_error = None
        return held

    def _leadership_failed(self, what: str, exc: Exception, msg: str, *args: object) -> None:
        self.lock_error = describe_exception(exc, _ERROR_TEXT_LIMIT)
        self.failures += 1
        self.last_error = f"{what}: {self.lock_error}"
        self._log_failure(f"{what} of periodic job", exc, msg, self.name, *args)

    def _lease_failed(self, exc: Exception) -> None:
        # A store error while taking, renewing or releasing the lease, or
        # claiming a slot: counted and logged, never the end of the schedule.
        assert self._leader is not None
        self._leadership_failed(
            "lease",
            exc,
            "periodic job %s could not take or renew its lease %r in the store; "
            "it will try again on its next tick",
            self._leader.name,
        )

    # -- ticks led through a store lease ------------------------------------------

    def _fire_on_lease(self, due: float, wall_due: float, leader: StoreLeader) -> None:
        # Rate and cron arm the next tick first: how far off it is sets the ttl.
        trigger = self._trigger
        if isinstance(trigger, RateTrigger):
            self._arm(self._next_rate_due(trigger))
            interval = trigger.period
        elif isinstance(trigger, CronTrigger):
            self._arm(self._next_cron_due(trigger))
            interval = self._armed_wall - wall_due
        else:
            interval = trigger.delay
        if self._lease_task is not None or self._run_task is not None:
            # A tick still asking the store, or a run still going: skipped only
            # if this process leads (a follower's tick is nobody's to skip).
            if leader.held:
                self._count_skip(
                    "the previous run was still going"
                    if self._run_task is not None
                    else "the store had not answered for the previous tick yet"
                )
            self._rearm_delay()
            return
        assert self._lt is not None
        self._lt.spawn(
            self._tick_on_lease(due, wall_due, lease_ttl(interval)),
            name=f"asyncbg:periodic:{self.name}",
        )

    async def _tick_on_lease(self, due: float, wall_due: float, ttl: float) -> None:
        me = asyncio.current_task()
        self._lease_task = me
        try:
            ours = await self._claim_tick(wall_due, ttl)
        finally:
            self._lease_task = None
        if ours:
            # Claimed, so no other process will run it: it runs, even if stop()
            # came while the store answered (the drain waits for it).
            if self._run_task is None:
                self._run_task = me
                await self._run(due)  # re-arms a fixed delay when it ends
                return
            # run_now() started one while the store answered
            self._count_skip("the previous run was still going")
        self._rearm_delay()

    async def _claim_tick(self, wall_due: float, ttl: float) -> bool:
        # True when this process leads and the tick's slot is its to run.
        leader = self._leader
        assert leader is not None
        try:
            anchor = await self._shared_anchor()
            if not await leader.ensure(ttl):
                ours = False  # another process leads
            elif not self._active:
                ours = False  # stopped meanwhile: no new slot
            else:
                ours = await leader.slot_ok(self._slot(wall_due, anchor))
        except Exception as exc:
            self._lease_failed(exc)
            return False
        self.lock_error = None
        return ours

    async def _learn_anchor(self) -> None:
        try:
            await self._shared_anchor()
        except Exception as exc:
            self._lease_failed(exc)  # the first tick asks again

    async def _shared_anchor(self) -> float:
        # Slot 0's wall-clock time, the same for every process (cron needs none).
        # A fixed-rate schedule moves its ticks onto that grid the first time.
        leader, lt, trigger = self._leader, self._lt, self._trigger
        assert leader is not None
        assert lt is not None
        if isinstance(trigger, CronTrigger):
            return 0.0
        loop = lt.loop
        local = trigger.anchor if isinstance(trigger, RateTrigger) else loop.time()
        anchor = await leader.anchor(time.time() - (loop.time() - local))
        if isinstance(trigger, RateTrigger) and not self._aligned and self._handle is not None:
            self._aligned = True
            in_loop_time = anchor - time.time() + loop.time()
            due = trigger.realign(in_loop_time, self._armed_due)
            if abs(due - self._armed_due) > _ALIGNED:
                self._handle.cancel()
                self._arm(due)
        return anchor

    def _slot(self, wall_due: float, anchor: float) -> int:
        # The tick's time on the shared grid, in whole milliseconds since the epoch.
        trigger = self._trigger
        if isinstance(trigger, CronTrigger):
            return round(wall_due) * 1000  # occurrences fall on whole seconds
        period = trigger.period if isinstance(trigger, RateTrigger) else trigger.delay
        k = math.floor((wall_due - anchor) / period + 0.5)
        return round((anchor + k * period) * 1000)

    def _rearm_delay(self) -> None:
        # A fixed delay re-arms when a run ends; when none ran, it counts from now.
        trigger = self._trigger
        if isinstance(trigger, DelayTrigger) and self._active and self._handle is None:
            assert self._lt is not None
            self._arm(trigger.due_after(self._lt.loop.time()))

    def _log_failure(self, kind: str, exc: BaseException, msg: str, *args: object) -> None:
        logged = self.log_throttle.failure(log, kind, self.name, exc, msg, *args)
        # Called on the loop only (a tick or a run): the running loop is its loop.
        self._flush_timer.after_failure(self.log_throttle, logged, arm=self._active)

    async def _run(self, due: float | None) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        if due is not None:
            self.last_start_lateness = t0 - due
        self.last_start = time.time()
        try:
            with self._context():
                if self.timeout is None:
                    await self.fn()
                else:
                    async with asyncio.timeout(self.timeout):
                        await self.fn()
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            # SystemExit and KeyboardInterrupt escaping a task end the loop
            # thread with it (asyncio re-raises them); here they only end this
            # run. Real signals never reach this thread, so they come from the
            # job. CancelledError (stop, a timeout) is not caught.
            self.failures += 1
            self.last_error = describe_exception(exc, _ERROR_TEXT_LIMIT)
            self._log_failure("periodic job", exc, "periodic job %s failed", self.name)
        else:
            self.last_error = None
        finally:
            self.runs += 1
            self.last_duration = loop.time() - t0
            self._run_task = None
            trigger = self._trigger
            if isinstance(trigger, DelayTrigger) and self._active and due is not None:
                self._arm(trigger.due_after(loop.time()))

    def snapshot(self) -> dict[str, Any]:
        """A JSON-safe summary: schedule, counts, last start/duration/error, next due,
        and for host- and cluster-scoped jobs whether the lock (or lease) is held
        and why taking it failed."""
        return {
            "name": self.name,
            "schedule": self.schedule,
            "scope": self.scope,
            "running": self.running,
            "runs": self.runs,
            "failures": self.failures,
            "skips": self.skips,
            "last_start": self.last_start,
            "last_duration": self.last_duration,
            "last_error": self.last_error,
            "next_due": self.next_due,
            "holds_lock": self.holds_lock,
            "lock_error": self.lock_error,
        }

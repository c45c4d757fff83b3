"""short_repr, describe_exception and LogThrottle, on a fake clock."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import pytest

from asyncbg.engine.logthrottle import MAX_TRACKED, LogThrottle, describe_exception, short_repr

log = logging.getLogger("asyncbg.test_logthrottle")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    handler = ListHandler()
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        yield handler.records
    finally:
        log.removeHandler(handler)


def fail(throttle: LogThrottle, n: int = 1, name: str = "job", msg: str = "boom") -> list[bool]:
    return [
        throttle.failure(log, "periodic job", name, ValueError(f"{msg} {i}"), "%s failed", name)
        for i in range(n)
    ]


# -- short_repr ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "obj",
    [
        "x" * 5_000_000,
        b"\x00" * 5_000_000,
        bytearray(1_000_000),
        list(range(1_000_000)),
        {i: "v" * 10_000 for i in range(1000)},
        [[["deep" * 1000] * 100] * 100],
    ],
    ids=["str", "bytes", "bytearray", "list", "dict", "nested"],
)
def test_short_repr_is_bounded_for_huge_objects(obj: object) -> None:
    text = short_repr(obj, limit=200)
    assert len(text) <= 200, len(text)
    assert text[:3] in {repr(obj)[:3], "[[["}


def test_short_repr_of_a_small_object_is_its_repr() -> None:
    assert short_repr({"to": "ann"}) == repr({"to": "ann"})
    assert short_repr(b"ab") == "b'ab'"


def test_short_repr_of_an_object_with_a_long_custom_repr_says_what_it_left_out() -> None:
    class Long:
        def __repr__(self) -> str:
            return "L" * 10_000

    text = short_repr(Long(), limit=100)
    assert len(text) <= 100
    assert text.startswith("LLLL")
    assert "more chars>" in text


def test_short_repr_of_an_object_whose_repr_raises_never_raises() -> None:
    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError("no repr for you")

    assert short_repr(Broken()) == "<unreprable Broken>"
    assert short_repr([Broken()]) == "[<unreprable Broken>]"


def test_describe_exception_is_bounded_and_never_raises() -> None:
    class BadStr(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no str")

    assert describe_exception(ValueError("boom")) == "ValueError: boom"
    assert describe_exception(KeyboardInterrupt()) == "KeyboardInterrupt"
    assert describe_exception(BadStr()) == "BadStr: <unprintable message>"
    assert len(describe_exception(ValueError("m" * 1_000_000), limit=200)) <= 200


# -- LogThrottle -----------------------------------------------------------------------


def test_first_failure_is_logged_in_full_then_suppressed_for_the_interval(records) -> None:
    clock = FakeClock()
    throttle = LogThrottle(interval=60.0, clock=clock)
    assert fail(throttle, 300) == [True] + [False] * 299
    assert len(records) == 1
    assert records[0].getMessage() == "job failed"
    assert records[0].exc_info is not None
    assert isinstance(records[0].exc_info[1], ValueError)
    assert throttle.suppressed("periodic job", "job") == 299


def test_flush_at_the_end_of_the_interval_logs_one_summary_line(records) -> None:
    clock = FakeClock()
    throttle = LogThrottle(interval=60.0, clock=clock)
    fail(throttle, 300)
    assert throttle.next_flush_at() == clock.now + 60.0
    clock.now += 59.0
    assert throttle.flush() == 0
    clock.now += 1.0
    assert throttle.flush() == 1
    summary = records[-1]
    assert summary.getMessage() == (
        "299 more failures of periodic job job in the last 60s (last: ValueError: boom 299)"
    )
    assert summary.levelno == logging.ERROR
    assert summary.exc_info is None
    assert throttle.next_flush_at() is None
    assert throttle.flush() == 0  # nothing left to say
    assert len(records) == 2


def test_next_failure_after_the_interval_logs_the_summary_then_itself_in_full(records) -> None:
    clock = FakeClock()
    throttle = LogThrottle(interval=10.0, clock=clock)
    fail(throttle, 3)
    clock.now += 10.0
    assert fail(throttle, 1) == [True]
    messages = [r.getMessage() for r in records]
    assert messages == [
        "job failed",
        "2 more failures of periodic job job in the last 10s (last: ValueError: boom 2)",
        "job failed",
    ]
    assert records[2].exc_info is not None
    assert fail(throttle, 1) == [False]  # a new interval began with that one


def test_one_failure_only_gives_no_summary(records) -> None:
    clock = FakeClock()
    throttle = LogThrottle(interval=10.0, clock=clock)
    fail(throttle, 1)
    clock.now += 100.0
    assert throttle.flush() == 0
    assert fail(throttle, 1) == [True]
    assert len(records) == 2


def test_summary_of_a_single_suppressed_failure_is_singular(records) -> None:
    clock = FakeClock()
    throttle = LogThrottle(interval=10.0, clock=clock)
    fail(throttle, 2)
    clock.now += 10.0
    throttle.flush()
    assert "1 more failure of periodic job job" in records[-1].getMessage()


def test_force_flush_reports_counts_before_the_interval_ends(records) -> None:
    clock = FakeClock()
    throttle = LogThrottle(interval=60.0, clock=clock)
    fail(throttle, 5)
    clock.now += 1.0
    assert throttle.flush(force=True) == 1
    assert "4 more failures" in records[-1].getMessage()
    assert throttle.suppressed("periodic job", "job") == 0


def test_sources_are_throttled_independently(records) -> None:
    clock = FakeClock()
    throttle = LogThrottle(interval=60.0, clock=clock)
    assert fail(throttle, 2, name="a") == [True, False]
    assert fail(throttle, 2, name="b") == [True, False]
    assert throttle.failure(log, "consumer", "a", ValueError(), "consumer a failed") is True
    assert len(records) == 3


def test_interval_zero_logs_every_failure(records) -> None:
    throttle = LogThrottle(interval=0.0, clock=FakeClock())
    assert fail(throttle, 3) == [True, True, True]


def test_negative_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="interval"):
        LogThrottle(interval=-1.0)


def test_idle_sources_are_forgotten_so_distinct_names_cannot_grow_it(records) -> None:
    clock = FakeClock()
    throttle = LogThrottle(interval=1.0, clock=clock)
    for i in range(3 * MAX_TRACKED):
        fail(throttle, 1, name=f"n{i}")
        clock.now += 1.0
    assert len(throttle._sources) <= MAX_TRACKED


def test_concurrent_failures_are_all_counted_and_one_is_logged(records) -> None:
    throttle = LogThrottle(interval=3600.0)
    threads, per_thread = 8, 500
    barrier = threading.Barrier(threads)

    def hammer() -> None:
        barrier.wait(10)
        fail(throttle, per_thread)

    workers = [threading.Thread(target=hammer) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(10)
    assert len(records) == 1
    assert throttle.suppressed("periodic job", "job") == threads * per_thread - 1
    throttle.flush(force=True)
    assert f"{threads * per_thread - 1} more failures" in records[-1].getMessage()


def test_a_log_handler_that_reports_into_the_throttle_does_not_deadlock() -> None:
    throttle = LogThrottle(interval=60.0, clock=FakeClock())
    inner = logging.getLogger("asyncbg.test_logthrottle.reentrant")
    inner.propagate = False
    seen: list[str] = []

    class Reporting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())
            if len(seen) < 3:
                throttle.failure(inner, "handler", str(len(seen)), ValueError(), "again")

    handler = Reporting()
    inner.addHandler(handler)
    try:
        throttle.failure(inner, "handler", "0", ValueError(), "first")
    finally:
        inner.removeHandler(handler)
    assert seen == ["first", "again", "again"]

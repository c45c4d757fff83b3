"""Arguments are checked when work is handed over, not when it runs.

A task submitted with arguments its function cannot take fails at submit
with a TypeError naming the task, and no job is created, run or retried;
``bg.call`` refuses async work (tasks of async functions, coroutine objects)
with a clear TypeError instead of handing back an un-awaited coroutine.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import time
import warnings
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from asyncbg import AsyncBG, JobStatus
from asyncbg.engine.tasks import is_async_callable

WAIT = 10.0

MakeApp = Callable[..., tuple[Flask, AsyncBG]]


@pytest.fixture
def bg(make_app: MakeApp) -> AsyncBG:
    _, bg = make_app(import_name="asyncbg_arguments_test")
    bg.start()
    return bg


# -- task.submit / bg.submit ---------------------------------------------------------------


def test_task_submit_with_missing_arguments_fails_at_submit(bg: AsyncBG) -> None:
    calls: list[tuple[str, str]] = []

    @bg.task(retries=3, retry_backoff=0.01)
    async def send_email(to: str, subject: str) -> str:
        calls.append((to, subject))
        return "sent"

    before = len(bg.history)
    t0 = time.monotonic()
    with pytest.raises(TypeError, match=r"send_email\(to, subject\)") as info:
        send_email.submit("a@b.c")
    assert "missing a required argument: 'subject'" in str(info.value)
    assert time.monotonic() - t0 < 0.5  # no attempts, no backoff
    assert len(bg.history) == before  # no job was recorded
    bg.wait_idle(WAIT)
    assert calls == []
    assert send_email.submit("a@b.c", "hi").result(WAIT) == "sent"


def test_wrong_arguments_of_every_kind_name_the_task(bg: AsyncBG) -> None:
    @bg.task(name="mailer")
    def send(to: str, /, subject: str = "", *, urgent: bool = False) -> str:
        return to

    cases: list[tuple[tuple[Any, ...], dict[str, Any], str]] = [
        ((), {}, "missing a required positional argument: 'to'"),
        (("a", "b", "c"), {}, "too many positional arguments"),
        (("a",), {"cc": "x"}, "got an unexpected keyword argument 'cc'"),
        (("a", "b"), {"subject": "c"}, "multiple values for argument 'subject'"),
        ((), {"to": "a"}, "'to' is positional-only, given as a keyword"),
    ]
    for args, kwargs, why in cases:
        with pytest.raises(TypeError) as info:
            send.submit(*args, **kwargs)
        message = str(info.value)
        assert message.startswith("wrong arguments for mailer(to, /, subject='', *, urgent=False)")
        assert why in message, message
    assert send.submit("a", subject="b", urgent=True).result(WAIT) == "a"


def test_bg_submit_of_a_task_checks_its_arguments(bg: AsyncBG) -> None:
    @bg.task(retries=2, retry_backoff=0.01)
    async def add(a: int, b: int) -> int:
        return a + b

    with pytest.raises(TypeError, match=r"wrong arguments for add\(a, b\)"):
        bg.submit(add, 1)
    assert bg.submit(add, 1, 2).result(WAIT) == 3


def test_bg_submit_of_a_plain_function_checks_its_arguments(bg: AsyncBG) -> None:
    async def fetch(url: str, *, retries: int = 0) -> str:
        return url

    def resize(path: str, width: int) -> int:
        return width

    with pytest.raises(TypeError, match=r"fetch\(url, \*, retries=0\): .*'url'"):
        bg.submit(fetch)
    with pytest.raises(TypeError, match="unexpected keyword argument 'tries'"):
        bg.submit(fetch, "u", tries=2)
    with pytest.raises(TypeError, match=r"resize\(path, width\): too many positional"):
        bg.submit(resize, "a.png", 1, 2)
    with pytest.raises(TypeError, match=r"resize\(path, width\)"):
        asyncio.run(bg.run(resize, "a.png"))
    assert len(bg.history) == 0
    assert bg.submit(fetch, "u", retries=1).result(WAIT) == "u"
    assert bg.submit(resize, "a.png", width=3).result(WAIT) == 3


def test_methods_partials_and_wrappers_are_checked_as_called(bg: AsyncBG) -> None:
    class Mailer:
        def send(self, to: str) -> str:
            return to

    mailer = Mailer()
    with pytest.raises(TypeError, match="too many positional arguments"):
        bg.submit(mailer.send, "a", "b")
    assert bg.submit(mailer.send, "a").result(WAIT) == "a"

    def add(a: int, b: int) -> int:
        return a + b

    with pytest.raises(TypeError, match="missing a required argument: 'b'"):
        bg.submit(functools.partial(add, 1))
    assert bg.submit(functools.partial(add, 1), 2).result(WAIT) == 3
    assert bg.submit(functools.partial(add, b=2), 1).result(WAIT) == 3

    # A decorator that supplies an argument itself: its wrapper's signature
    # counts, not the one functools.wraps copies from the wrapped function.
    def with_db(fn: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> int:
            return fn(40, *args, **kwargs)

        return wrapper

    @bg.task
    @with_db
    def query(db: int, n: int) -> int:
        return db + n

    assert query.submit(2).result(WAIT) == 42
    assert bg.submit(with_db(add), 2).result(WAIT) == 42


def test_callables_without_a_signature_are_not_refused(bg: AsyncBG) -> None:
    # Builtins whose signature cannot be read run as before: a wrong call fails in the job.
    with pytest.raises(ValueError, match="no signature found"):
        inspect.signature(max)
    assert bg.submit(max, 1, 2).result(WAIT) == 2
    assert bg.submit(sorted, [2, 1]).result(WAIT) == [1, 2]


def test_wrong_arguments_are_never_retried(bg: AsyncBG) -> None:
    attempts: list[int] = []

    @bg.task(retries=3, retry_backoff=0.01)
    def resize(path: str) -> None:
        attempts.append(1)

    for _ in range(3):
        with pytest.raises(TypeError):
            resize.submit()
    bg.wait_idle(WAIT)
    assert attempts == []
    assert not [job for job in bg.history.jobs() if job.status is JobStatus.FAILED]


# -- the check agrees with Python's own calls ----------------------------------------------


def _f0() -> None: ...
def _f1(a: Any) -> None: ...
def _f2(a: Any, b: Any = 1) -> None: ...
def _f3(a: Any, /, b: Any, *, c: Any) -> None: ...
def _f4(a: Any, /, b: Any = 1, *args: Any, c: Any = 2, **kwargs: Any) -> None: ...
def _f5(*args: Any, d: Any) -> None: ...
def _f6(a: Any, /, **kwargs: Any) -> None: ...
def _f7(*, a: Any, b: Any = 1) -> None: ...
def _f8(a: Any, b: Any, /) -> None: ...


CALLS: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
    ((), {}),
    ((1,), {}),
    ((1, 2), {}),
    ((1, 2, 3), {}),
    ((1, 2, 3, 4), {}),
    ((), {"a": 1}),
    ((1,), {"a": 1}),
    ((1,), {"b": 2}),
    ((1,), {"b": 2, "c": 3}),
    ((1,), {"c": 3}),
    ((1, 2), {"b": 2}),
    ((1, 2), {"c": 3}),
    ((1, 2), {"d": 4}),
    ((), {"d": 4}),
    ((1, 2), {"c": 3, "d": 4}),
    ((), {"a": 1, "b": 2}),
    ((), {"a": 1, "b": 2, "c": 3}),
    ((), {"b": 2}),
    ((1,), {"a": 1, "z": 0}),
]


@pytest.mark.parametrize("fn", [_f0, _f1, _f2, _f3, _f4, _f5, _f6, _f7, _f8])
def test_the_check_refuses_exactly_what_python_refuses(fn: Callable[..., None]) -> None:
    # here: absent before the checks
    from asyncbg.engine.arguments import arguments_of, check_arguments

    for args, kwargs in CALLS:
        try:
            fn(*args, **kwargs)
        except TypeError:
            python_says = False
        else:
            python_says = True
        try:
            check_arguments(fn, args, kwargs, fn.__name__)
        except TypeError:
            we_say = False
        else:
            we_say = True
        assert we_say == python_says, (fn.__name__, args, kwargs)
        arguments = arguments_of(fn)
        if arguments is not None and arguments.fits(args, kwargs):
            assert python_says, ("the fast path accepted a bad call", fn.__name__, args, kwargs)


def test_a_closure_made_per_call_is_inspected_once() -> None:
    from asyncbg.engine.arguments import arguments_of

    def make(n: int) -> Callable[[int], int]:
        return lambda x: x + n

    first = arguments_of(make(1))
    assert first is not None
    assert arguments_of(make(2)) is first


# -- bg.call refuses async work -----------------------------------------------------------


def test_bg_call_refuses_a_task_of_an_async_function(bg: AsyncBG) -> None:
    @bg.task
    async def refresh(key: str) -> str:
        return key

    assert is_async_callable(refresh)
    assert is_async_callable(functools.partial(refresh, "k"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "coroutine ... was never awaited" would fail here
        with pytest.raises(TypeError, match=r"await bg.run\(refresh\) instead"):
            bg.call(refresh, "k")
        gc.collect()


def test_bg_call_still_runs_a_task_of_a_plain_function(bg: AsyncBG) -> None:
    @bg.task
    def read(key: str) -> str:
        return key.upper()

    assert not is_async_callable(read)
    assert bg.call(read, "k") == "K"


def test_bg_call_refuses_a_coroutine_object(bg: AsyncBG) -> None:
    async def refresh() -> None:
        pass

    coro = refresh()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TypeError, match=r"not coroutines; await bg.run\(coro\)"):
            bg.call(coro)
        gc.collect()
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED


# -- flask asyncbg run NAME ------------------------------------------------------------------


def test_cli_run_with_wrong_arguments_is_one_line_and_no_attempt(make_app: MakeApp) -> None:
    app, bg = make_app(import_name="asyncbg_arguments_cli")
    calls: list[str] = []

    @bg.task(retries=3, retry_backoff=0.01)
    async def send_email(to: str, subject: str) -> str:
        calls.append(to)
        return "sent"

    runner = app.test_cli_runner()
    t0 = time.monotonic()
    result = runner.invoke(args=["asyncbg", "run", "send_email"])
    took = time.monotonic() - t0
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines == [
        "Error: wrong arguments for send_email(to, subject): missing a required argument: "
        "'to' (ARGS are positional, -k KEY=VALUE keywords)"
    ], result.output
    assert "Traceback" not in result.output
    assert took < 1.0
    assert calls == []
    assert not bg.loop_thread.running  # nothing was started for it

    result = runner.invoke(args=["asyncbg", "run", "send_email", "a", "b", "-k", "cc=c"])
    assert result.exit_code == 1
    assert "unexpected keyword argument 'cc'" in result.output
    result = runner.invoke(args=["asyncbg", "run", "send_email", "a", "-k", "subject=hi"])
    assert result.exit_code == 0, result.output
    assert calls == ["a"]

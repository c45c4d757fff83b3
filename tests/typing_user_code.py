"""User-style code that ``tests/test_typing.py`` checks with ``mypy --strict``.

Each ``assert_type`` is a type asyncbg promises its users; mypy fails on any
that does not hold. The functions are never called (the test only imports the
module, which runs the decorators): they exist to be type-checked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, assert_type

from asyncbg import AsyncBG, Job, Task

if TYPE_CHECKING:
    # mypy's spelling of named parameters inside a ParamSpec, used only in
    # assert_type's type arguments, which are never evaluated here.
    from mypy_extensions import Arg, DefaultNamedArg

bg = AsyncBG()


@bg.task
async def send_email(to: str, subject: str, *, urgent: bool = False) -> str:
    return f"{to}: {subject}{'!' if urgent else ''}"


@bg.task(timeout=30, retries=3)
async def fetch(url: str, /) -> bytes:
    return url.encode()


@bg.task
def resize(path: str, /) -> int:
    return len(path)


@bg.task(name="render_page", retries=1)
def render(template: str, /) -> str:
    return template


async def plain_async(count: int, label: str = "") -> list[str]:
    return [label] * count


def plain_sync(count: int) -> float:
    return count / 2


world: dict[str, int] = {"tick": 0}


def read_world() -> dict[str, int]:
    return dict(world)


def tasks_have_their_results_types() -> None:
    # The function's result, not its coroutine, for async and sync tasks, bare
    # decorator or decorator factory.
    assert_type(fetch, Task[[str], bytes])
    assert_type(resize, Task[[str], int])
    assert_type(render, Task[[str], str])
    assert_type(
        send_email,
        Task[[Arg(str, "to"), Arg(str, "subject"), DefaultNamedArg(bool, "urgent")], str],
    )


def jobs_from_a_sync_view() -> None:
    job = send_email.submit("a@b.c", "hi", urgent=True)
    assert_type(job, Job[str])
    assert_type(job.result(), str)
    assert_type(job.result(timeout=5), str)
    assert_type(fetch.submit("https://example.com").result(), bytes)
    assert_type(resize.submit("a.png"), Job[int])
    assert_type(resize.submit("a.png").result(), int)

    # bg.submit: tasks, async and sync functions, coroutine objects.
    assert_type(bg.submit(send_email, "a@b.c", "hi"), Job[str])
    assert_type(bg.submit(fetch, "https://example.com"), Job[bytes])
    assert_type(bg.submit(resize, "a.png"), Job[int])
    assert_type(bg.submit(plain_async, 3, label="x"), Job[list[str]])
    assert_type(bg.submit(plain_async, 3).result(), list[str])
    assert_type(bg.submit(plain_sync, 3), Job[float])
    assert_type(bg.submit(plain_sync, 3).result(), float)
    assert_type(bg.submit(plain_async(2)), Job[list[str]])
    assert_type(bg.submit(lambda: None), Job[None])

    # bg.call: plain callables on the loop thread, the callable's own result.
    assert_type(bg.call(read_world), dict[str, int])
    assert_type(bg.call(plain_sync, 3), float)
    assert_type(bg.call(plain_sync, 3, timeout=1.0), float)
    assert_type(bg.call(lambda: dict(world)), dict[str, int])
    assert_type(bg.call(resize, "a.png"), int)

    # Looked up by id: the result type is not known.
    assert_type(bg.get_job("0" * 32), Job[Any] | None)

    # Durable-work calls keep the types too.
    assert_type(send_email.using(key="welcome-42").submit("a@b.c", "hi"), Job[str])
    assert_type(resize.using(job_id="img-7").submit("a.png").result(), int)
    assert_type(resize.submit_many([("a.png",), ("b.png",)]), list[Job[int]])
    bg.enqueue("mail", {"to": "a@b.c"}, job_id="mail-1", key="welcome")


async def jobs_from_an_async_view() -> None:
    job = send_email.submit("a@b.c", "hi")
    assert_type(await job, str)
    assert_type(await job.wait_async(), str)
    assert_type(await send_email.run("a@b.c", "now"), str)
    assert_type(await send_email.run(to="a@b.c", subject="now", urgent=False), str)
    assert_type(await resize.run("a.png"), int)
    assert_type(await bg.run(send_email, "a@b.c", "now"), str)
    assert_type(await bg.run(fetch, "https://example.com"), bytes)
    assert_type(await bg.run(resize, "a.png"), int)
    assert_type(await bg.run(plain_async, 3), list[str])
    assert_type(await bg.run(plain_async, count=3, label="x"), list[str])
    assert_type(await bg.run(plain_sync, 3), float)
    assert_type(await bg.run(plain_async(1)), list[str])
    assert_type(await send_email.submit_async("a@b.c", "hi"), Job[str])
    assert_type(await resize.using(key="k").submit_async("a.png"), Job[int])
    assert_type(await bg.get_job_async("0" * 32), Job[Any] | None)


def decorators_keep_the_function() -> None:
    # Calling a task calls the function itself; typed Any (see Task.__call__).
    assert_type(resize("a.png"), Any)
    assert_type(send_email.name, str)

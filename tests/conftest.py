"""Shared fixtures: Flask apps with an AsyncBG bound, stopped at teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask

from asyncbg import AsyncBG

MakeApp = Callable[..., tuple[Flask, AsyncBG]]


@pytest.fixture
def make_app() -> Iterator[MakeApp]:
    """Factory: ``app, bg = make_app(**config)``.

    Signal handling is off and autostart is off unless a test asks for them, so
    a test registers its jobs and consumers first and then calls ``bg.start()``.
    ``bind=False`` returns an unbound ``AsyncBG()`` for ``init_app`` tests.
    Every AsyncBG made is stopped at teardown.
    """
    made: list[AsyncBG] = []

    def make(
        *, import_name: str = "asyncbg_test_app", bind: bool = True, **config: Any
    ) -> tuple[Flask, AsyncBG]:
        app = Flask(import_name)
        app.config.update({"ASYNCBG_HANDLE_SIGNALS": False, "ASYNCBG_AUTOSTART": False, **config})
        bg = AsyncBG(app) if bind else AsyncBG()
        made.append(bg)
        return app, bg

    yield make
    for bg in made:
        bg.stop(timeout=1.0)

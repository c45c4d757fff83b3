"""The config table is checked once at init_app; the backend is chosen there
and lives on the lifecycle's exit stack (opened before the startup hooks,
closed after the shutdown hooks)."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
from flask import Flask
from helpers_core import WAIT, Gate

from asyncbg import AsyncBG
from asyncbg.backends import known_schemes, open_backend
from asyncbg.backends.base import require_driver
from asyncbg.backends.memory import MemoryBackend
from asyncbg.config import DEFAULT_CONFIG, load_settings
from asyncbg.errors import BackendError, BackendUnavailable, ConfigError, ConfigTypeError


def _bind(bg: AsyncBG | None = None, **config: Any) -> tuple[Flask, AsyncBG]:
    app = Flask("asyncbg_settings_test")
    app.config.update({"ASYNCBG_HANDLE_SIGNALS": False, "ASYNCBG_AUTOSTART": False, **config})
    bg = bg or AsyncBG()
    bg.init_app(app)
    return app, bg


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("ASYNCBG_SHUTDOWN_TIMEOUT", "soon", "number of seconds"),
        ("ASYNCBG_SHUTDOWN_TIMEOUT", -1, "at least 0"),
        ("ASYNCBG_SHUTDOWN_TIMEOUT", float("nan"), "finite"),
        ("ASYNCBG_QUEUE_MAXSIZE", 0, "at least 1"),
        ("ASYNCBG_QUEUE_MAXSIZE", 2.5, "whole number"),
        ("ASYNCBG_HEALTH_MAX_LAG", 0, "above 0"),
        ("ASYNCBG_DASHBOARD_PREFIX", "_asyncbg", "URL path"),
        ("ASYNCBG_AUTOSTART", "maybe", "True or False"),
        ("ASYNCBG_MAX_WORKERS", 0, "at least 1"),
        ("ASYNCBG_LOCK_DIR", 42, "folder path"),
    ],
)
def test_a_bad_value_fails_init_app_naming_the_key(key: str, value: object, says: str) -> None:
    app = Flask("asyncbg_settings_test")
    app.config[key] = value
    with pytest.raises(ConfigError, match=key) as caught:
        AsyncBG().init_app(app)
    assert says in str(caught.value)
    assert "asyncbg" not in app.extensions  # nothing half-bound


def test_a_value_of_the_wrong_kind_is_a_type_error_too() -> None:
    with pytest.raises(TypeError, match="ASYNCBG_AUTH"):
        load_settings({"ASYNCBG_AUTH": "admin"})
    assert issubclass(ConfigTypeError, ConfigError)


def test_flags_from_the_environment_mean_what_they_say() -> None:
    settings = load_settings({"ASYNCBG_DASHBOARD": "false", "ASYNCBG_CONTROL": "1"})
    assert settings.dashboard is False
    assert settings.control is True
    assert load_settings({"ASYNCBG_SHUTDOWN_TIMEOUT": "2.5"}).shutdown_timeout == 2.5


def test_every_default_passes_its_own_check() -> None:
    settings = load_settings(DEFAULT_CONFIG)
    assert settings.shutdown_timeout == DEFAULT_CONFIG["ASYNCBG_SHUTDOWN_TIMEOUT"]
    assert settings.backend is None


def test_the_default_backend_is_memory() -> None:
    assert "memory" in known_schemes()
    assert isinstance(open_backend(None, "/tmp"), MemoryBackend)
    assert isinstance(open_backend("memory://", "/tmp"), MemoryBackend)
    assert not open_backend(None, "/tmp").durable


def test_an_unknown_scheme_fails_init_app_listing_the_known_ones() -> None:
    with pytest.raises(BackendUnavailable, match=r"'nosuch'.*known: .*memory"):
        _bind(ASYNCBG_BACKEND="nosuch://somewhere")


def test_a_password_in_the_url_stays_out_of_the_error() -> None:
    with pytest.raises(BackendUnavailable) as caught:
        _bind(ASYNCBG_BACKEND="nosuch://admin:hunter2@localhost/db")
    assert "hunter2" not in str(caught.value)
    assert "admin:***@localhost" in str(caught.value)


def test_something_that_is_not_a_url_is_refused() -> None:
    with pytest.raises(BackendUnavailable, match="URL"):
        _bind(ASYNCBG_BACKEND="asyncbg.db")


def test_a_missing_driver_names_the_extra_to_install() -> None:
    with pytest.raises(BackendUnavailable, match=r"pip install 'asyncbg\[imaginary\]'"):
        require_driver("asyncbg_no_such_driver_module", "imaginary")
    assert require_driver("json", "none").dumps([]) == "[]"


def test_the_constructor_backend_serves_every_app_unless_config_names_one() -> None:
    shared = MemoryBackend()
    bg = AsyncBG(backend=shared)
    first, _ = _bind(bg)
    second, _ = _bind(bg, ASYNCBG_BACKEND="memory://")
    assert bg.state_for(first).backend is shared
    assert bg.state_for(second).backend is not shared


class RecordingBackend(MemoryBackend):
    """A memory backend that writes down its lifecycle calls and where they ran."""

    def __init__(self, events: list[str], *, fail_open: bool = False) -> None:
        super().__init__()
        self.events = events
        self.fail_open = fail_open
        self.threads: set[str] = set()

    async def open(self) -> None:
        self.threads.add(threading.current_thread().name)
        if self.fail_open:
            raise BackendError("the engine is down")
        self.events.append("open")

    async def migrate(self) -> None:
        self.events.append("migrate")

    async def preflight(self) -> list[str]:
        self.events.append("preflight")
        return ["the engine is a test double"]

    async def close(self) -> None:
        self.threads.add(threading.current_thread().name)
        self.events.append("close")


def test_the_backend_opens_before_the_startup_hooks_and_closes_after_the_drain(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events: list[str] = []
    backend = RecordingBackend(events)
    app, bg = _bind(AsyncBG(backend=backend))
    gate = Gate()

    @bg.on_startup
    async def first_hook() -> None:
        events.append("startup")

    @bg.on_shutdown
    async def last_hook() -> None:
        events.append("shutdown hook")

    @bg.task
    async def slow() -> None:
        await gate.wait_async()
        events.append("job done")

    with caplog.at_level(logging.WARNING, logger="asyncbg"):
        bg.start()
    assert events == ["open", "migrate", "preflight", "startup"]
    assert "backend memory: the engine is a test double" in caplog.text
    with app.app_context():
        job = slow.submit()
    stopper = threading.Thread(target=bg.stop, kwargs={"timeout": WAIT})
    stopper.start()
    gate.set()
    stopper.join(WAIT)
    assert job.done()
    assert events[4:] == ["job done", "shutdown hook", "close"]
    assert backend.threads == {bg.loop_thread.name}


def test_a_backend_that_cannot_open_fails_start_and_leaves_nothing_running() -> None:
    events: list[str] = []
    _, bg = _bind(AsyncBG(backend=RecordingBackend(events, fail_open=True)))

    @bg.on_startup
    async def never() -> None:
        events.append("startup")

    with pytest.raises(BackendError, match="the engine is down"):
        bg.start()
    assert not bg.loop_thread.running
    assert events == []  # no hook ran, and nothing that never opened was closed

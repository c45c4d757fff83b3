"""Fitting Flask like a native extension (issue 9): one AsyncBG for many apps,
config read when it matters, every background callable in the app context,
on_startup/on_shutdown hooks, visible logs, the reloader.

Each test failed before the change it names.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, appcontext_pushed, current_app, g
from helpers_core import WAIT, Gate, run_python, wait_for

from asyncbg import AsyncBG, JobStatus

pytestmark = pytest.mark.timeout(60)

# -- 1. one AsyncBG, any number of apps (the app-factory pattern) ---------------------

factory_bg = AsyncBG()  # module level, as in Flask's docs


@factory_bg.task
async def which_app() -> str:
    return str(current_app.name)


@factory_bg.consumer("factory-q")
async def factory_consumer(item: str) -> None:
    g.seen = item  # runs in the app context
    current_app.config.setdefault("SEEN", []).append(item)


def create_app(name: str, **config: Any) -> Flask:
    app = Flask(name)
    app.config.update(ASYNCBG_HANDLE_SIGNALS=False, ASYNCBG_AUTOSTART=False, **config)
    factory_bg.init_app(app)
    return app


@pytest.fixture
def factory_app(request: pytest.FixtureRequest) -> Iterator[Flask]:
    app = create_app(f"factory_{request.node.name}")
    yield app
    with app.app_context():
        factory_bg.stop(timeout=1.0)


@pytest.mark.parametrize("round_", range(3))
def test_a_fresh_app_per_test_with_a_module_level_asyncbg(factory_app: Flask, round_: int) -> None:
    with factory_app.app_context():
        assert which_app.submit().result(WAIT) == factory_app.name
        factory_bg.enqueue("factory-q", f"item-{round_}")
        factory_bg.wait_idle(WAIT)
    assert factory_app.config["SEEN"] == [f"item-{round_}"]


def test_two_live_apps_each_run_jobs_on_their_own_loop() -> None:
    bg = AsyncBG()

    @bg.task
    async def where() -> tuple[str, int]:
        return str(current_app.name), threading.get_ident()

    apps = [Flask(f"app{i}") for i in range(2)]
    for app in apps:
        app.config.update(ASYNCBG_HANDLE_SIGNALS=False, ASYNCBG_AUTOSTART=False)
        bg.init_app(app)
    try:
        answers = []
        for app in apps:
            with app.app_context():
                answers.append(where.submit().result(WAIT))
        assert [name for name, _ in answers] == ["app0", "app1"]
        assert answers[0][1] != answers[1][1]  # two loop threads
        # Outside any app context it cannot know which app is meant: it says so.
        with pytest.raises(RuntimeError, match="serves 2 apps"):
            where.submit()
    finally:
        report = bg.stop(timeout=1.0)  # outside a context: stops both
        assert report.finished
    for app in apps:
        with app.app_context():
            assert not bg.loop_thread.running


def test_with_one_app_bound_work_needs_no_app_context(make_app: Any) -> None:
    _app, bg = make_app()

    async def name() -> str:
        return str(current_app.name)

    assert bg.submit(name).result(WAIT) == "asyncbg_test_app"


def test_an_app_dropped_and_stopped_is_freed(make_app: Any) -> None:
    bg = AsyncBG()

    @bg.periodic(every=60)
    async def tick() -> None:
        pass

    app = Flask("freed")
    app.config.update(ASYNCBG_HANDLE_SIGNALS=False)
    bg.init_app(app)  # autostarts
    with app.app_context():
        assert bg.submit(asyncio.sleep, 0, 1).result(WAIT) == 1
        bg.stop(timeout=1.0)
    ref = weakref.ref(app)
    del app
    gc.collect()
    assert ref() is None


def test_flask_frees_an_app_with_asyncbg_attached_on_refcount_alone() -> None:
    # Flask's own test_app_freed_on_zero_refcount, with asyncbg attached.
    gc.disable()
    try:
        app = Flask("refcount")
        app.config.update(ASYNCBG_AUTOSTART=False, ASYNCBG_HANDLE_SIGNALS=False)
        AsyncBG(app)
        ref = weakref.ref(app)
        del app
        assert ref() is None
    finally:
        gc.enable()


# -- 2. config set before init_app applies; ASYNCBG_EAGER set later takes effect -----


def test_queue_maxsize_from_config_applies_to_consumers_declared_before_init_app() -> None:
    bg = AsyncBG()

    @bg.consumer("small")
    async def small(item: Any) -> None:
        pass

    app = Flask("maxsize")
    app.config.update(ASYNCBG_QUEUE_MAXSIZE=5, ASYNCBG_AUTOSTART=False)
    app.config["ASYNCBG_HANDLE_SIGNALS"] = False
    bg.init_app(app)
    try:
        assert bg.get_queue("small").maxsize == 5
    finally:
        bg.stop(timeout=1.0)


def test_eager_set_in_a_test_after_init_app_takes_effect(make_app: Any) -> None:
    app, bg = make_app()
    app.config["ASYNCBG_EAGER"] = True  # after AsyncBG(app), as a test would
    ran = threading.Event()

    async def job() -> str:
        ran.set()
        return "done"

    job_ = bg.submit(job)
    # Eager: done by the time submit returns.
    assert job_.status is JobStatus.SUCCEEDED
    assert ran.is_set()


# -- 3. every background callable runs in the app context ----------------------------


def test_a_plain_consumer_runs_in_the_app_context(make_app: Any) -> None:
    app, bg = make_app()
    seen: list[str] = []

    @bg.consumer("plain")
    def plain(item: str) -> None:
        seen.append(f"{current_app.name}:{item}")

    bg.start()
    bg.enqueue("plain", "x")
    bg.wait_idle(WAIT)
    assert seen == [f"{app.name}:x"]
    assert bg.get_queue("plain").failed == 0


def test_async_teardown_appcontext_runs_for_jobs(make_app: Any) -> None:
    app, bg = make_app()
    torn_down = Gate()
    seen: list[str] = []

    @app.teardown_appcontext
    async def close_things(exc: BaseException | None) -> None:
        await asyncio.sleep(0)
        seen.append(current_app.name)
        torn_down.set()

    async def job() -> str:
        return "ok"

    bg.start()
    job_ = bg.submit(job)
    assert job_.result(WAIT) == "ok"
    assert torn_down.wait()
    assert seen == [app.name]


def test_an_async_appcontext_pushed_receiver_does_not_break_jobs(make_app: Any) -> None:
    app, bg = make_app()
    received: list[str] = []

    async def on_pushed(sender: Flask, **extra: Any) -> None:
        await asyncio.sleep(0)
        received.append(sender.name)

    appcontext_pushed.connect(on_pushed, app)
    try:

        async def job() -> str:
            return str(current_app.name)

        bg.start()
        assert bg.submit(job).result(WAIT) == app.name
        assert app.name in received
    finally:
        appcontext_pushed.disconnect(on_pushed, app)


# -- 8. on_startup / on_shutdown hooks on the loop ------------------------------------


def test_startup_hooks_run_before_periodic_jobs_and_shutdown_hooks_after_the_drain(
    make_app: Any,
) -> None:
    _app, bg = make_app()
    events: list[str] = []
    ticked = Gate()
    job_started = Gate()

    @bg.on_startup
    async def open_client() -> None:
        events.append(f"startup on loop={threading.current_thread().name}")

    @bg.on_shutdown
    async def close_client() -> None:
        events.append("shutdown")

    @bg.periodic(every=60, run_at_start=True)
    async def tick() -> None:
        events.append("tick")
        ticked.set()

    async def job() -> None:
        job_started.set()
        try:
            await asyncio.sleep(0.1)
        finally:
            events.append("job ended")

    bg.start()
    assert ticked.wait()
    bg.submit(job)
    assert job_started.wait()
    bg.stop(timeout=5.0)
    assert events == ["startup on loop=asyncbg", "tick", "job ended", "shutdown"]


def test_a_failing_startup_hook_fails_start_and_says_so(
    make_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    _app, bg = make_app()

    @bg.on_startup
    async def broken() -> None:
        raise ConnectionError("database down")

    with pytest.raises(ConnectionError, match="database down"):
        bg.start()
    assert "on_startup hook" in caplog.text
    assert not bg.loop_thread.running


def test_a_failing_shutdown_hook_is_logged_and_the_stop_completes(
    make_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    _app, bg = make_app()

    @bg.on_shutdown
    async def broken() -> None:
        raise RuntimeError("close failed")

    bg.start()
    report = bg.stop(timeout=1.0)
    assert report.finished
    assert "close failed" in caplog.text


def test_on_startup_needs_an_async_function(make_app: Any) -> None:
    _app, bg = make_app()
    with pytest.raises(TypeError, match="async function"):
        bg.on_startup(lambda: None)  # type: ignore[arg-type, return-value]


# -- 12. the shutdown report is visible without configuring logging ---------------------

_PLAIN_APP = """
import asyncio, sys
from flask import Flask
from asyncbg import AsyncBG

app = Flask("visible")
app.config.update(ASYNCBG_HANDLE_SIGNALS=False, ASYNCBG_LOG_HANDLER={handler})
bg = AsyncBG(app)
bg.submit(asyncio.sleep, 0).result(5)
bg.stop(timeout=1)
"""


@pytest.mark.parametrize("handler", [True, False])
def test_the_shutdown_report_reaches_stderr_with_no_logging_setup(
    tmp_path: Path, handler: bool
) -> None:
    proc = run_python(_PLAIN_APP.format(handler=handler), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert ("asyncbg shutdown:" in proc.stderr) is handler, proc.stderr


def test_the_log_handler_steps_aside_when_the_app_configures_logging(tmp_path: Path) -> None:
    script = "import logging, sys\nlogging.basicConfig(stream=sys.stdout, level=logging.INFO)\n"
    script += _PLAIN_APP.format(handler=True)
    proc = run_python(script, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "asyncbg shutdown:" in proc.stdout
    assert "asyncbg shutdown:" not in proc.stderr  # said once, by the app's own handler


# -- 13. `flask run --debug`: Ctrl-C lets the reloaded child drain ----------------------

_RELOAD_APP = textwrap.dedent(
    """
    import asyncio, os
    from flask import Flask
    from asyncbg import AsyncBG

    MARK = os.environ["ASYNCBG_TEST_MARK"]
    app = Flask(__name__)
    app.config.update(ASYNCBG_SHUTDOWN_TIMEOUT=10.0)
    bg = AsyncBG(app)

    @bg.task
    async def slow():
        with open(MARK, "a") as f:
            f.write("started\\n")
        await asyncio.sleep(2.5)
        with open(MARK, "a") as f:
            f.write("finished\\n")

    @app.get("/start")
    def start():
        slow.submit()
        return "ok"
    """
)


def test_ctrl_c_under_the_reloader_lets_the_child_finish_its_jobs(tmp_path: Path) -> None:
    import socket
    import urllib.request

    (tmp_path / "reload_app.py").write_text(_RELOAD_APP)
    mark = tmp_path / "mark.txt"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "ASYNCBG_TEST_MARK": str(mark),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("WERKZEUG_RUN_MAIN", None)
    cmd = [sys.executable, "-m", "flask", "--app", "reload_app", "run", "--debug"]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:

        def started() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/start", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(started, timeout=WAIT, what="the reloaded child to answer", poll=0.1)
        wait_for(lambda: mark.exists() and "started" in mark.read_text(), what="the job")
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as a terminal sends it
        out, _ = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # Before: the parent killed the child about a second into its drain.
    assert mark.read_text().split() == ["started", "finished"], out
    assert "asyncbg shutdown: 1 completed" in out, out
    # The one line at start that says what SIGTERM to the reloader does.
    assert "SIGTERM to this reloader process ends the app process at once" in out, out


def test_startup_and_shutdown_hooks_run_in_the_app_context_and_pop_it(make_app: Any) -> None:
    app, bg = make_app()
    seen: list[str] = []

    @app.teardown_appcontext
    def torn_down(exc: BaseException | None) -> None:
        seen.append("teardown")

    @bg.on_startup
    async def opened() -> None:
        seen.append(f"startup {current_app.name}")

    @bg.on_shutdown
    async def closed() -> None:
        seen.append(f"shutdown {current_app.name}")

    bg.start()
    bg.stop(timeout=1.0)
    assert seen == [f"startup {app.name}", "teardown", f"shutdown {app.name}", "teardown"]

"""The dashboard in a real headless Chromium (Debian's package) driven by Playwright.

The app runs under a real HTTP server (werkzeug, threaded) on a free loopback
port. Set ``ASYNCBG_DASHBOARD_SCREENSHOT=docs/dashboard.png`` to also write the
screenshot there (that is how the README's picture is made).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from helpers_core import wait_for
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright
from werkzeug.serving import BaseWSGIServer, make_server

from asyncbg import AsyncBG, current_job

WAIT = 15.0
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def _have_chromium() -> bool:
    return os.path.exists(CHROMIUM)


def _ensure_chromium() -> None:
    """Install Debian's chromium when it is missing and we may (root, apt-get).

    So that the README's test command works on a fresh machine too, not only
    through .ci/run (which installs it up front).
    """
    if _have_chromium() or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        subprocess.run(cmd, env=env, capture_output=True, timeout=600, check=False)


# Generous only when the first test has to install the browser.
pytestmark = pytest.mark.timeout(120 if _have_chromium() else 900)


class Demo:
    """A small app with something in every section of the dashboard."""

    def __init__(self) -> None:
        app = Flask("shop")
        app.config.update(
            ASYNCBG_HANDLE_SIGNALS=False,
            ASYNCBG_AUTOSTART=False,
            ASYNCBG_DASHBOARD=True,
            ASYNCBG_CONTROL=True,
            # The app's own check; this test's browser is the only client.
            ASYNCBG_AUTH=lambda request: request.remote_addr == "127.0.0.1",
            ASYNCBG_DASHBOARD_REFRESH=0.25,
        )
        self.app = app
        self.bg = bg = AsyncBG(app)
        self.steps: dict[str, asyncio.Event] = {}
        self.mail_gate = asyncio.Event()

        @bg.periodic(every=0.5)
        async def refresh_prices() -> None:
            pass

        @bg.periodic(cron="0 3 * * *", scope="host")
        async def nightly_report() -> None:
            pass

        @bg.consumer("emails", concurrency=2, maxsize=40)
        async def emails(item: object) -> None:
            await self.mail_gate.wait()

        @bg.task
        async def import_catalog(key: str, steps: int) -> str:
            """Advances one step each time the test says so."""
            job = current_job()
            for done in range(1, steps + 1):
                await self.steps[key].wait()
                self.steps[key].clear()
                job.set_progress(done, steps, f"batch {done} of {steps}")
            return "imported"

        @bg.task
        async def charge_card(card: str) -> None:
            raise ValueError(f"card ending {card[-4:]} was declined")

        @bg.task
        async def thumbnail(n: int) -> int:
            return n

        self.import_catalog = import_catalog
        self.charge_card = charge_card
        self.thumbnail = thumbnail

    def start_import(self, key: str, steps: int) -> Any:
        self.steps[key] = asyncio.Event()
        return self.import_catalog.submit(key, steps)

    def step(self, key: str) -> None:
        self.bg.call(self.steps[key].set)


@pytest.fixture
def demo() -> Iterator[Demo]:
    d = Demo()
    d.bg.start()
    yield d
    d.bg.call(d.mail_gate.set)
    d.bg.stop(timeout=2.0)


@pytest.fixture
def server(demo: Demo) -> Iterator[str]:
    srv: BaseWSGIServer = make_server("127.0.0.1", 0, demo.app, threaded=True)
    thread = threading.Thread(target=srv.serve_forever, name="dashboard-test-server", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    thread.join(WAIT)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    _ensure_chromium()
    assert _have_chromium(), (
        "Chromium is missing and could not be installed: apt-get install chromium"
    )
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))

    def on_console(msg: Any) -> None:
        # HTTP errors the page handles itself (403, 503) are logged as
        # "Failed to load resource"; anything else (a CSP violation, a script
        # error) is a bug.
        if msg.type == "error" and not msg.text.startswith("Failed to load resource"):
            errors.append(msg.text)

    pg.on("console", on_console)
    yield pg
    context.close()
    assert errors == [], errors


def progress_of(page: Page, job_id: str) -> float:
    value = page.get_attribute(f'#running tr[data-job="{job_id}"] progress', "value")
    return float(value or 0)


def test_dashboard_shows_next_runs_progress_and_cancels_a_job(
    demo: Demo, server: str, page: Page, tmp_path: Path
) -> None:
    bg = demo.bg
    # Something in every section: queued mail, a failure, finished jobs.
    for i in range(25):
        bg.enqueue("emails", {"to": f"user{i}@example.com"})
    demo.charge_card.submit("4111111111111111").wait(WAIT)
    for n in range(3):
        demo.thumbnail.submit(n).result(WAIT)
    keep = demo.start_import("keep", 5)
    victim = demo.start_import("victim", 10)

    page.goto(f"{server}/_asyncbg/")
    expect(page.locator("#status")).to_have_text("ok", timeout=WAIT * 1000)

    # A periodic job's next run changes as it runs.
    next_due = page.locator('tr[data-periodic="refresh_prices"] [data-field="next_due"]')
    expect(next_due).not_to_have_attribute("data-value", "", timeout=WAIT * 1000)
    first = next_due.get_attribute("data-value")
    expect(next_due).not_to_have_attribute("data-value", first or "", timeout=WAIT * 1000)
    assert float(next_due.get_attribute("data-value") or 0) > float(first or 0)

    # A running job's progress bar advances.
    expect(page.locator(f'#running tr[data-job="{victim.id}"]')).to_be_visible()
    for step in (1, 2, 3):
        demo.step("victim")
        wait_for(lambda s=step: progress_of(page, victim.id) >= s / 10, what=f"progress {step}")
    assert progress_of(page, victim.id) == pytest.approx(0.3)
    expect(
        page.locator(f'#running tr[data-job="{victim.id}"] [data-field="progress_text"]')
    ).to_have_text("3 / 10 · batch 3 of 10")
    demo.step("keep")
    demo.step("keep")
    wait_for(lambda: progress_of(page, keep.id) >= 0.4, what="the other job's progress")

    # The queue's fill bar, the failure with its error.
    fill = page.locator('tr[data-queue="emails"] .bar')
    wait_for(lambda: float(fill.get_attribute("data-fraction") or 0) > 0.5, what="queue fill")
    expect(page.locator("#failures")).to_contain_text("card ending 1111 was declined")
    expect(page.locator("#read-only")).to_have_count(0)

    # Press cancel: the job becomes cancelled, on the server and on the page.
    page.locator(f'#running tr[data-job="{victim.id}"] button').click()
    assert victim.wait(WAIT)
    assert victim.status.value == "cancelled"
    expect(page.locator(f'#recent tr[data-job="{victim.id}"] [data-field="status"]')).to_have_text(
        "cancelled", timeout=WAIT * 1000
    )
    expect(page.locator(f'#running tr[data-job="{victim.id}"]')).to_have_count(0)
    expect(page.locator("#action-result")).to_contain_text(
        f"cancel import_catalog {victim.id[:8]}: cancelled"
    )
    expect(page.locator(f'#running tr[data-job="{keep.id}"]')).to_have_count(1)
    assert keep.status.value == "running"

    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    target = os.environ.get("ASYNCBG_DASHBOARD_SCREENSHOT")
    if target:
        shutil.copyfile(shot, target)


def test_run_now_button_starts_a_run(demo: Demo, server: str, page: Page) -> None:
    pj = demo.bg.periodic_jobs["nightly_report"]
    page.goto(f"{server}/_asyncbg/")
    row = page.locator('tr[data-periodic="nightly_report"]')
    expect(row.locator('[data-field="runs"]')).to_have_text("0", timeout=WAIT * 1000)
    row.locator("button").click()
    wait_for(lambda: pj.runs == 1, what="the run")
    expect(row.locator('[data-field="runs"]')).to_have_text("1", timeout=WAIT * 1000)
    expect(page.locator("#action-result")).to_contain_text("run nightly_report: started")


def test_read_only_dashboard_has_no_buttons(demo: Demo, server: str, page: Page) -> None:
    demo.app.config["ASYNCBG_AUTH"] = None  # loopback-only and read-only
    job = demo.start_import("ro", 3)
    page.goto(f"{server}/_asyncbg/")
    expect(page.locator(f'#running tr[data-job="{job.id}"]')).to_be_visible(timeout=WAIT * 1000)
    expect(page.locator("#read-only")).to_be_visible()
    expect(page.locator("button")).to_have_count(0)
    job.cancel()


def test_the_page_says_when_it_cannot_reach_the_app(demo: Demo, server: str, page: Page) -> None:
    page.goto(f"{server}/_asyncbg/")
    expect(page.locator("#status")).to_have_text("ok", timeout=WAIT * 1000)
    demo.app.config["ASYNCBG_AUTH"] = lambda request: False
    expect(page.locator("#conn-error")).to_be_visible(timeout=WAIT * 1000)
    expect(page.locator("#conn-error")).to_contain_text("refused by the auth hook")


def test_periodic_last_run_shows_its_time_and_took_its_duration(
    demo: Demo, server: str, page: Page
) -> None:
    pj = demo.bg.periodic_jobs["refresh_prices"]
    wait_for(lambda: pj.runs >= 1 and pj.last_duration is not None, what="a first run")
    page.goto(f"{server}/_asyncbg/")
    headers = page.locator("#periodic-section thead th").all_inner_texts()
    assert headers[3:6] == ["leader", "last run", "took"]
    row = page.locator('tr[data-periodic="refresh_prices"]')
    last = row.locator('[data-field="last_start"]')
    expect(last).not_to_have_attribute("data-value", "", timeout=WAIT * 1000)
    expect(last).to_have_text(re.compile(r"^\d\d:\d\d:\d\d\.\d$"))
    shown = float(last.get_attribute("data-value") or 0)
    assert abs(shown - time.time()) < 60  # a wall-clock time, not a duration
    expect(row.locator('[data-field="last_ago"]')).to_have_text(re.compile(r"^\(.* ago\)$"))
    expect(row.locator('[data-field="last_duration"]')).to_have_text(
        re.compile(r"^(<1 ms|[\d.]+ ms|running)$")
    )


def test_the_page_says_loading_until_its_first_answer(demo: Demo, server: str, page: Page) -> None:
    held: list[Route] = []

    def hold(route: Route) -> None:  # answered once the placeholders are checked
        held.append(route)

    page.route("**/_asyncbg/health", hold)
    page.goto(f"{server}/_asyncbg/")
    deadline = time.monotonic() + WAIT
    while not held and time.monotonic() < deadline:
        page.wait_for_timeout(50)  # Playwright calls the handler only inside its own calls
    assert held, "the page never polled"
    for section in ("periodic", "queues", "running", "failures", "recent"):
        placeholder = page.locator(f'[data-empty-for="{section}"]')
        expect(placeholder).to_be_visible()
        expect(placeholder).to_have_text("Loading…")
    expect(page.get_by_text("No periodic jobs.")).to_have_count(0)

    for route in held:
        route.continue_()
    page.unroute("**/_asyncbg/health", hold)  # lets through what it holds by then
    expect(page.locator("#status")).to_have_text("ok", timeout=WAIT * 1000)
    # The demo has periodic jobs and queues; nothing has failed yet.
    expect(page.locator('[data-empty-for="periodic"]')).to_be_hidden()
    expect(page.locator('[data-empty-for="queues"]')).to_be_hidden()
    expect(page.locator('[data-empty-for="failures"]')).to_have_text("No failures.")
    expect(page.locator('[data-empty-for="failures"]')).to_be_visible()
    # The memory backend shares nothing: no nodes section.
    expect(page.locator("#nodes-section")).to_be_hidden()
    expect(page.locator('tr[data-periodic="refresh_prices"] [data-field="leader"]')).to_have_text(
        "every process"
    )
    expect(page.locator('tr[data-periodic="nightly_report"] [data-field="leader"]')).to_have_text(
        "host lock, not held here"  # taken at its tick, at 3 in the morning
    )


# -- the cluster: two apps on one SQLite file are two nodes ---------------------------------


class ClusterDemo:
    """Two apps sharing one SQLite file; the browser looks at the first."""

    def __init__(self, db: str) -> None:
        self.apps: list[Flask] = []
        self.bgs: list[AsyncBG] = []
        for _ in range(2):
            app = Flask("cluster_shop")  # one app name: one lease per schedule for both
            app.config.update(
                ASYNCBG_HANDLE_SIGNALS=False,
                ASYNCBG_AUTOSTART=False,
                ASYNCBG_DASHBOARD=True,
                ASYNCBG_DASHBOARD_REFRESH=0.25,
                ASYNCBG_BACKEND=db,
                ASYNCBG_LEASE=1.0,  # heartbeats every 1/3 s, dead after 4/3 s
                ASYNCBG_POLL_INTERVAL=0.05,
            )
            bg = AsyncBG(app)

            @bg.periodic(every=0.2, scope="cluster", name="rebuild_index")
            async def rebuild_index() -> None:
                pass

            self.apps.append(app)
            self.bgs.append(bg)

    def node(self, i: int) -> str:
        durable = self.bgs[i]._state().durable
        assert durable is not None
        return durable.owner


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ClusterDemo]:
    demo = ClusterDemo(f"sqlite:///{tmp_path / 'jobs.db'}")
    for bg in demo.bgs:
        bg.start()
    yield demo
    for bg in demo.bgs:
        bg.stop(timeout=2.0)


@pytest.fixture
def cluster_server(cluster: ClusterDemo) -> Iterator[str]:
    srv: BaseWSGIServer = make_server("127.0.0.1", 0, cluster.apps[0], threaded=True)
    thread = threading.Thread(target=srv.serve_forever, name="dashboard-test-server", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    thread.join(WAIT)


def test_the_dashboard_shows_every_node_the_dead_one_marked_and_the_leader(
    cluster: ClusterDemo, cluster_server: str, page: Page
) -> None:
    here, other = cluster.node(0), cluster.node(1)
    page.goto(f"{cluster_server}/_asyncbg/")
    expect(page.locator("#nodes-section")).to_be_visible(timeout=WAIT * 1000)
    mine = page.locator(f'#nodes tr[data-node="{here}"]')
    theirs = page.locator(f'#nodes tr[data-node="{other}"]')
    expect(mine.locator('[data-field="state"]')).to_have_text("alive", timeout=WAIT * 1000)
    expect(theirs.locator('[data-field="state"]')).to_have_text("alive", timeout=WAIT * 1000)
    expect(mine.locator('[data-field="here"]')).to_have_text("this node")
    expect(theirs.locator('[data-field="here"]')).to_be_hidden()
    expect(page.locator("#nodes-summary")).to_have_text("2 alive")
    expect(mine.locator('[data-field="last_seen"]')).to_have_text(re.compile(r" ago$"))

    # The leader of the cluster-wide schedule: one of the two, with its epoch and expiry.
    leader = page.locator('tr[data-periodic="rebuild_index"] [data-field="leader"]')
    expect(leader).not_to_have_attribute("data-owner", "", timeout=WAIT * 1000)
    owner = leader.get_attribute("data-owner")
    assert owner in (here, other)
    expect(leader).to_have_text("this node" if owner == here else owner)
    expect(leader).to_have_attribute("data-here", "true" if owner == here else "false")
    row = page.locator('tr[data-periodic="rebuild_index"]')
    expect(row.locator('[data-field="leader_epoch"]')).to_have_text(re.compile(r"^epoch \d+$"))
    expect(row.locator('[data-field="leader_expires"]')).to_have_text(
        re.compile(r"^until \d\d:\d\d:\d\d\.\d \(in .*\)$")
    )

    # The other node's loop is stuck: its heartbeats stop, it is marked dead, and
    # the lease (if it held it) runs out and comes here.
    release, blocked = threading.Event(), threading.Event()

    def block() -> None:
        blocked.set()
        release.wait(WAIT)

    cluster.bgs[1].loop_thread.loop.call_soon_threadsafe(block)
    try:
        assert blocked.wait(WAIT)
        expect(theirs.locator('[data-field="state"]')).to_have_text("dead", timeout=WAIT * 1000)
        expect(theirs).to_have_attribute("data-alive", "false")
        expect(mine.locator('[data-field="state"]')).to_have_text("alive")
        expect(page.locator("#nodes-summary")).to_contain_text("1 alive, 1 dead")
        expect(leader).to_have_text("this node", timeout=WAIT * 1000)
        expect(leader).to_have_attribute("data-owner", here)
    finally:
        release.set()
    # A graceful stop: the node leaves the list.
    cluster.bgs[1].stop(timeout=WAIT)
    expect(theirs).to_have_count(0, timeout=WAIT * 1000)
    expect(page.locator("#nodes-summary")).to_have_text("1 alive")

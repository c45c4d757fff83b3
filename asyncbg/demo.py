"""The demo app: both blog patterns rebuilt with asyncbg, a slow job, an async view.

Serve it under Hypercorn (the recommended way: the server starts and stops asyncbg)::

    hypercorn --config hypercorn.toml asyncbg.demo:asgi_app

``asyncbg.demo:app`` (the plain Flask app) is not supported under Hypercorn:
asyncbg then only starts at import and drains at exit, and Hypercorn 0.18's WSGI
wrapper answers every HEAD, 204 and 304 with a 500 (docs/deploy.md).
``flask --app asyncbg.demo run --debug`` works.

Endpoints (all answer JSON)::

    POST /task         {"to": "ann", "delay": 0.1}  -> a "notifications" consumer
    GET  /notifications                             -> what the consumer delivered
    GET  /world                                     -> state of the periodic world tick
    POST /jobs         {"steps": 10, "step_seconds": 0.5}  -> a slow job with progress
    GET  /jobs/<id>                                 -> its status, progress and result
    GET  /compute?n=30                              -> an async view awaiting bg.run()

``/compute?delay=`` holds a view thread for up to 60 s: views run on
``ASYNCBG_ASGI_THREADS`` threads (32), the health probe on two of its own.

Every ``DEMO_*`` and ``ASYNCBG_*`` setting below can be set from the
environment with a ``FLASK_`` prefix (``FLASK_DEMO_TICK_SECONDS=0.2``), as
Flask's ``config.from_prefixed_env`` does. With several Hypercorn workers each
worker has its own loop, queue and job history: ``GET /jobs/<id>`` answers from
the worker that took the request.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import os
import re
import time
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from . import AsyncBG, NotRunning, QueueFull, current_job

__all__ = ["app", "asgi_app", "bg"]

log = logging.getLogger("asyncbg.demo")

app = Flask(__name__)
app.config.from_mapping(
    DEMO_TICK_SECONDS=1.0,  # period of the world tick (every worker)
    DEMO_HOST_TICK_SECONDS=5.0,  # period of the host-wide chore (one worker per host)
    DEMO_QUEUE_MAXSIZE=100,  # capacity of the notifications queue
    DEMO_NOTIFY_CONCURRENCY=4,  # notifications delivered at once
    DEMO_NOTIFY_SECONDS=0.05,  # simulated delivery time when the item gives no "delay"
    DEMO_ENQUEUE_TIMEOUT=0.5,  # how long POST /task waits for room before a 503
    DEMO_JOB_STEPS=10,  # default steps of POST /jobs
    DEMO_JOB_STEP_SECONDS=0.5,  # default seconds per step
    DEMO_RUN_LOG=None,  # a file each periodic run appends "<kind> <pid> <time>" to
)
app.config.from_prefixed_env()
cfg = app.config

bg = AsyncBG()  # bound below, once the jobs and consumers are declared


def _configure_logging() -> None:
    # A demo is an application: show asyncbg's log (the shutdown report is INFO)
    # unless the user configured logging already.
    if logging.getLogger().handlers or logging.getLogger("asyncbg").handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s")
    )
    asyncbg_log = logging.getLogger("asyncbg")
    asyncbg_log.addHandler(handler)
    asyncbg_log.setLevel(logging.INFO)


_configure_logging()


def _record_run(kind: str) -> None:
    path = cfg["DEMO_RUN_LOG"]
    if path:
        # One small O_APPEND write per line: lines from several processes never mix.
        fd = os.open(str(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{kind} {os.getpid()} {time.time():.6f}\n".encode())
        finally:
            os.close(fd)


class BadInput(ValueError):
    """A request whose body or arguments do not make sense; answered with a 400."""


def _number(
    data: dict[str, Any], key: str, default: float, low: float, high: float, *, integer: bool
) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadInput(f"{key!r} must be a number")
    if not (math.isfinite(value) and low <= value <= high):
        raise BadInput(f"{key!r} must be between {low:g} and {high:g}")
    if integer and value != int(value):
        raise BadInput(f"{key!r} must be a whole number")
    return int(value) if integer else float(value)


def _query_number(key: str, default: float, low: float, high: float, *, integer: bool) -> float:
    raw = request.args.get(key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadInput(f"{key!r} must be a number") from None
    return _number({key: value}, key, default, low, high, integer=integer)


def _json_object(*, required: bool) -> dict[str, Any]:
    """The request's JSON object body (``{}`` when optional and empty).

    :raises BadInput: on a missing, non-JSON, malformed or non-object body.
    """
    if not request.get_data(cache=True):
        if required:
            raise BadInput("expected a JSON object body")
        return {}
    if not request.is_json:
        raise BadInput("expected Content-Type: application/json")
    try:
        data = json.loads(request.get_data(cache=True))
    except (ValueError, RecursionError):  # RecursionError: a few KiB of [[[[...]]]]
        raise BadInput("malformed JSON body") from None
    if not isinstance(data, dict):
        raise BadInput("the JSON body must be an object")
    if _nested_deeper_than(data, _MAX_JSON_DEPTH):
        # What is stored comes back out through jsonify, which recurses too.
        raise BadInput(f"the JSON body is nested deeper than {_MAX_JSON_DEPTH} levels")
    return data


_MAX_JSON_DEPTH = 32


def _nested_deeper_than(value: Any, limit: int) -> bool:
    """True if ``value`` has containers nested more than ``limit`` deep (no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _error(status: int, message: str, **headers: str) -> Response:
    response = jsonify(error=message)
    response.status_code = status
    response.headers.update(headers)
    return response


@app.errorhandler(BadInput)
def _bad_input(exc: BadInput) -> Response:
    return _error(400, str(exc))


@app.errorhandler(NotRunning)
def _shutting_down(exc: NotRunning) -> Response:
    return _error(503, "shutting down, retry on another instance", **{"Retry-After": "1"})


@app.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> Response:
    return _error(exc.code or 500, exc.description or exc.name)


@app.get("/")
def index() -> Response:
    return jsonify(
        pid=os.getpid(),
        asyncbg_running=bg.loop_thread.running,
        endpoints=[
            "POST /task",
            "GET /notifications",
            "GET /world",
            "POST /jobs",
            "GET /jobs/<id>",
            "GET /compute?n=30",
        ],
    )


# -- 1. a notification queue (was: a Thread polling queue.Queue with sleep(1)) ---------

# Owned by the loop thread: only touched there (by the consumer, and by bg.call).
delivered: collections.deque[dict[str, Any]] = collections.deque(maxlen=20)
delivery_count = 0


@bg.consumer(
    "notifications",
    concurrency=int(cfg["DEMO_NOTIFY_CONCURRENCY"]),
    maxsize=int(cfg["DEMO_QUEUE_MAXSIZE"]),
)
async def notify(item: dict[str, Any]) -> None:
    """Deliver one notification (simulated: it takes ``delay`` seconds)."""
    global delivery_count
    await asyncio.sleep(item["delay"])
    delivery_count += 1
    delivered.append({"to": item.get("to"), "at": time.time()})


@app.post("/task")
def submit_task() -> tuple[Response, int]:
    data = _json_object(required=True)
    data["delay"] = _number(
        data, "delay", float(cfg["DEMO_NOTIFY_SECONDS"]), 0.0, 60.0, integer=False
    )
    try:
        bg.enqueue("notifications", data, timeout=float(cfg["DEMO_ENQUEUE_TIMEOUT"]))
    except QueueFull:
        return _error(503, "busy, retry later", **{"Retry-After": "1"}), 503
    return jsonify(queued=True, pid=os.getpid()), 202


@app.get("/notifications")
def notifications() -> Response:
    state = bg.call(lambda: {"delivered": delivery_count, "last": list(delivered)})
    return jsonify({**state, "pid": os.getpid()})


# -- 2. a periodic world tick (was: a threading.Timer re-arming itself + a lock) ------

# Owned by the loop thread: the tick changes it, views read it through bg.call.
world: dict[str, Any] = {"tick": 0, "started": None, "last_tick": None}


@bg.periodic(every=float(cfg["DEMO_TICK_SECONDS"]), name="world_tick")
async def world_tick() -> None:
    """Advance the world one tick (fixed rate: no drift, no lock)."""
    now = time.time()
    world["tick"] += 1
    world["started"] = world["started"] or now
    world["last_tick"] = now
    _record_run("world")


@app.get("/world")
def read_world() -> Response:
    # bg.call runs the lambda on the loop thread: a consistent copy, no lock.
    return jsonify({**bg.call(lambda: dict(world)), "pid": os.getpid()})


@bg.periodic(every=float(cfg["DEMO_HOST_TICK_SECONDS"]), scope="host", name="host_chore")
async def host_chore() -> None:
    """A once-per-host chore (say, pruning a disk cache): one worker at a time runs it."""
    _record_run("host")


# -- 3. a slow job that reports progress -------------------------------------------------


@bg.task
async def slow_job(steps: int, step_seconds: float) -> dict[str, Any]:
    """Work through ``steps`` steps of ``step_seconds`` each, reporting progress."""
    job = current_job()
    try:
        for i in range(steps):
            await asyncio.sleep(step_seconds)
            job.set_progress(i + 1, steps, f"step {i + 1} of {steps}")
    except asyncio.CancelledError:
        log.info("demo job %s cancelled at step %s", job.id, job.progress)
        raise
    log.info("demo job %s completed", job.id)
    return {"steps": steps, "pid": os.getpid()}


@app.post("/jobs")
def start_job() -> tuple[Response, int]:
    data = _json_object(required=False)
    steps = int(_number(data, "steps", cfg["DEMO_JOB_STEPS"], 1, 1000, integer=True))
    step_seconds = _number(data, "step_seconds", cfg["DEMO_JOB_STEP_SECONDS"], 0, 60, integer=False)
    job = slow_job.submit(steps, step_seconds)
    log.info("demo job %s accepted", job.id)
    return jsonify(id=job.id, url=f"/jobs/{job.id}", pid=os.getpid()), 202


_JOB_ID = re.compile(r"[0-9a-f]{32}")


@app.get("/jobs/<job_id>")
def job_status(job_id: str) -> Response | tuple[Response, int]:
    job = bg.get_job(job_id) if _JOB_ID.fullmatch(job_id) else None
    if job is None:
        return _error(404, f"no such job in worker {os.getpid()}"), 404
    return jsonify({**job.to_dict(), "pid": os.getpid()})


# -- 4. an async view awaiting work on the loop ----------------------------------------------


async def crunch(n: int, delay: float) -> int:
    """Sum of the first ``n`` squares, after ``delay`` seconds of simulated I/O."""
    if delay:
        await asyncio.sleep(delay)
    return sum(i * i for i in range(n))


@app.get("/compute")
async def compute() -> Response:
    n = int(_query_number("n", 30, 0, 1_000_000, integer=True))
    delay = _query_number("delay", 0.0, 0.0, 60.0, integer=False)
    log.info("demo compute started: n=%d delay=%g", n, delay)
    result = await bg.run(crunch, n, delay)
    return jsonify(n=n, result=result, pid=os.getpid())


bg.init_app(app)

#: The recommended entry point: ``hypercorn --config hypercorn.toml asyncbg.demo:asgi_app``.
asgi_app = bg.asgi_app()

"""A Flask app for the durable multi-process tests, served by a real Hypercorn.

Every worker shares one SQLite store (``ASYNCBG_BACKEND``, from the environment
as ``FLASK_ASYNCBG_BACKEND``, like every other setting). The test drives it
over HTTP and reads the store file and the audit file afterwards:

- ``POST /submit {"ids": [...], "kind": "trivial"|"sleep", "seconds": s}``
  submits one durable job per id, with the id as the client-made job id (a
  retried request makes no second job), and answers with the ids acknowledged:
  each one only after its submit returned, i.e. once the store has it;
- ``POST /enqueue {"ids": [...], "seconds": s}`` stores one durable item per id
  for the ``items`` consumer (the item carries its id; the id is the job id);
- ``GET /whoami`` answers with the worker's pid; ``GET /job/<id>`` with what
  ``bg.get_job`` says of a job in this worker (404 if it finds none);
- every answer, ``/_asyncbg/...`` included, carries ``X-Worker-Pid``.

Each run of a job or item appends a ``start`` line and, if it gets to its end,
an ``end`` line to ``AUDIT_FILE``: JSON ``{"id", "attempt", "pid", "start"[,
"end"]}``, one ``write`` on an ``O_APPEND`` descriptor each (a kill -9 of the
process cannot lose a line already written: it is in the page cache). Tasks
return ``{"pid", "attempt"}`` of the run that ended them, so the store's result
says which run's outcome was recorded.

Two more records, each only when its variable is set (the SQLite tests set
neither, and their audit reader knows only the two lines above):

- ``AUDIT_CANCELLED=1``: a run cancelled (by a cancel request, a lost claim,
  a stop) appends ``{"id", "attempt", "pid", "start", "cancelled": time}``
  in its ``except CancelledError``;
- ``CLUSTER_EVERY=s``: a ``scope="cluster"`` periodic job ``cluster-tick``
  runs every ``s`` seconds and appends ``{"tick": due, "pid", "start"}`` per
  run, ``due`` the wall-clock time of the tick it ran (its slot on the
  schedule's grid: start minus lateness).

``POST /cancel/<id>`` asks ``bg.get_job(id)`` to cancel (from whichever worker
answers) and says when it asked (``asked``, ``time.time()``); ``GET /leader``
says whether this worker holds the lease of ``cluster-tick``.
"""

from __future__ import annotations

import asyncio
import faulthandler
import json
import logging
import os
import signal
import time
from typing import Any

from flask import Flask, Response, jsonify, request

from asyncbg import AsyncBG, BackendError, NotRunning, QueueFull, current_job

_handler = logging.StreamHandler()
_handler.setFormatter(logging.Formatter("[%(process)d] [%(levelname)s] %(name)s: %(message)s"))
logging.getLogger("asyncbg").addHandler(_handler)
logging.getLogger("asyncbg").setLevel(logging.INFO)

# SIGUSR1 prints every thread's stack (for a look at a stuck worker).
faulthandler.register(signal.SIGUSR1, all_threads=True)

app = Flask(__name__)
app.config.from_prefixed_env()
bg = AsyncBG(app)
asgi_app = bg.asgi_app()

_AUDIT = os.open(os.environ["AUDIT_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
_ITEM_CONCURRENCY = int(os.environ.get("ITEM_CONCURRENCY", "4"))
_RETRIES = int(os.environ.get("JOB_RETRIES", "3"))
_AUDIT_CANCELLED = os.environ.get("AUDIT_CANCELLED") == "1"
_CLUSTER_EVERY = float(os.environ.get("CLUSTER_EVERY", "0"))


def _audit(line: dict[str, Any]) -> None:
    os.write(_AUDIT, (json.dumps(line, separators=(",", ":")) + "\n").encode())


async def _run(uid: str, seconds: float) -> dict[str, Any]:
    run = {"id": uid, "attempt": current_job().attempts, "pid": os.getpid(), "start": time.time()}
    _audit(run)
    if seconds > 0:
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            if _AUDIT_CANCELLED:
                _audit({**run, "cancelled": time.time()})
            raise
    _audit({**run, "end": time.time()})
    return {"pid": run["pid"], "attempt": run["attempt"]}


@bg.task(name="trivial", retries=_RETRIES, retry_backoff=0)
async def trivial(uid: str) -> dict[str, Any]:
    return await _run(uid, 0.0)


@bg.task(name="sleep", retries=_RETRIES, retry_backoff=0)
async def sleep(uid: str, seconds: float) -> dict[str, Any]:
    return await _run(uid, seconds)


@bg.consumer("items", concurrency=_ITEM_CONCURRENCY, maxsize=1_000_000, durable=True)
async def items(item: dict[str, Any]) -> None:
    await _run(str(item["id"]), float(item.get("seconds", 0.0)))


if _CLUSTER_EVERY > 0:

    @bg.periodic(name="cluster-tick", every=_CLUSTER_EVERY, scope="cluster")
    async def cluster_tick() -> None:
        started = cluster_tick.last_start
        lateness = cluster_tick.last_start_lateness
        assert started is not None
        assert lateness is not None
        _audit({"tick": started - lateness, "pid": os.getpid(), "start": started})


@app.after_request
def _worker_pid(response: Response) -> Response:
    response.headers["X-Worker-Pid"] = str(os.getpid())
    return response


@app.get("/")
def index() -> Any:
    return jsonify(pid=os.getpid())


@app.get("/whoami")
def whoami() -> Any:
    return jsonify(pid=os.getpid())


@app.post("/submit")
def submit() -> Any:
    body = request.get_json(force=True)
    kind = body.get("kind", "trivial")
    seconds = float(body.get("seconds", 0.0))
    acknowledged: list[str] = []
    for uid in body["ids"]:
        try:
            if kind == "sleep":
                sleep.using(job_id=uid).submit(uid, seconds)
            else:
                trivial.using(job_id=uid).submit(uid)
        except (NotRunning, BackendError):
            break
        acknowledged.append(uid)
    return jsonify(pid=os.getpid(), acknowledged=acknowledged), 200 if acknowledged else 503


@app.post("/enqueue")
def enqueue() -> Any:
    body = request.get_json(force=True)
    seconds = float(body.get("seconds", 0.0))
    acknowledged: list[str] = []
    for uid in body["ids"]:
        try:
            bg.enqueue("items", {"id": uid, "seconds": seconds}, job_id=uid)
        except (NotRunning, BackendError, QueueFull):
            break
        acknowledged.append(uid)
    return jsonify(pid=os.getpid(), acknowledged=acknowledged), 200 if acknowledged else 503


@app.get("/job/<job_id>")
def job(job_id: str) -> Any:
    found = bg.get_job(job_id)
    if found is None:
        return jsonify(pid=os.getpid(), error="not found"), 404
    return jsonify(pid=os.getpid(), status=found.status.value, attempts=found.attempts)


@app.post("/cancel/<job_id>")
def cancel(job_id: str) -> Any:
    asked = time.time()
    found = bg.get_job(job_id)
    if found is None:
        return jsonify(pid=os.getpid(), error="not found"), 404
    return jsonify(pid=os.getpid(), asked=asked, requested=found.cancel())


@app.get("/leader")
def leader() -> Any:
    if _CLUSTER_EVERY <= 0:
        return jsonify(pid=os.getpid(), error="no cluster-tick"), 404
    return jsonify(pid=os.getpid(), holds_lock=cluster_tick.snapshot()["holds_lock"])

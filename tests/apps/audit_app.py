"""A Flask app for the reconciliation tests, served by a real Hypercorn.

``POST /submit {"prefix": P, "count": N, "kind": K}`` submits N jobs with the
ids ``P-0`` .. ``P-(N-1)`` and answers with the ids it accepted. Every job that
runs appends its id to the audit file (``AUDIT_FILE``), outside asyncbg, with
one ``write`` on an ``O_APPEND`` descriptor: the test reads that file after the
server has exited and reconciles it with what was accepted and what the
shutdown report counted.

Kinds: ``trivial`` (returns at once), ``sleep`` (``JOB_SECONDS`` on the loop).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from flask import Flask, jsonify, request

from asyncbg import AsyncBG, NotRunning

_handler = logging.StreamHandler()
_handler.setFormatter(logging.Formatter("[%(process)d] [%(levelname)s] %(name)s: %(message)s"))
logging.getLogger("asyncbg").addHandler(_handler)
logging.getLogger("asyncbg").setLevel(logging.INFO)

app = Flask(__name__)
app.config.from_prefixed_env()
bg = AsyncBG(app)
asgi_app = bg.asgi_app()

_AUDIT = os.open(os.environ["AUDIT_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
_JOB_SECONDS = float(os.environ.get("JOB_SECONDS", "0.5"))


@bg.task(name="trivial")
async def trivial(uid: str) -> None:
    os.write(_AUDIT, f"{uid}\n".encode())


@bg.task(name="sleep")
async def sleep(uid: str) -> None:
    await asyncio.sleep(_JOB_SECONDS)
    os.write(_AUDIT, f"{uid}\n".encode())


_KINDS: dict[str, Any] = {"trivial": trivial, "sleep": sleep}


@app.get("/")
def index() -> Any:
    return jsonify(pid=os.getpid())


@app.post("/submit")
def submit() -> Any:
    body = request.get_json(force=True)
    task = _KINDS[body.get("kind", "trivial")]
    prefix, count = str(body["prefix"]), int(body["count"])
    accepted: list[str] = []
    for i in range(count):
        uid = f"{prefix}-{i}"
        try:
            task.submit(uid)
        except NotRunning:
            break
        accepted.append(uid)
    return jsonify(pid=os.getpid(), accepted=accepted), 202 if accepted else 503

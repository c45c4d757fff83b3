"""One ``httpx.AsyncClient`` shared by async views and jobs, opened and closed on
asyncbg's loop by ``on_startup``/``on_shutdown`` (served by a real Hypercorn).

``GET /fetch`` awaits the client in an async view; ``GET /job`` has a job await
it and waits for the job. Both call ``GET /pong`` on this same server.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
from flask import Flask, jsonify, request

from asyncbg import AsyncBG

logging.getLogger("asyncbg").setLevel(logging.INFO)

app = Flask(__name__)
app.config.from_prefixed_env()
bg = AsyncBG(app)
asgi_app = bg.asgi_app()
clients: dict[str, httpx.AsyncClient] = {}


@bg.on_startup
async def open_client() -> None:
    clients["http"] = httpx.AsyncClient(timeout=10)
    logging.getLogger("asyncbg").info("shared client opened")


@bg.on_shutdown
async def close_client() -> None:
    await clients.pop("http").aclose()
    logging.getLogger("asyncbg").info("shared client closed")


@bg.task
async def fetch_in_a_job(url: str) -> str:
    reply = await clients["http"].get(url)
    return reply.text


@app.get("/")
def index() -> Any:
    return jsonify(ok=True)


@app.get("/pong")
def pong() -> str:
    return "pong"


@app.get("/fetch")
async def fetch() -> Any:
    reply = await clients["http"].get(request.host_url + "pong")
    return jsonify(view=reply.text)


@app.get("/job")
async def job() -> Any:
    return jsonify(job=await fetch_in_a_job.submit(request.host_url + "pong"))

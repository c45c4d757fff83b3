"""The Flask app the HTTP benchmark serves under Hypercorn.

``BENCH_ASYNCBG=1`` serves it with asyncbg (async views on the shared loop),
otherwise stock Flask (asgiref: a new event loop per async request).
"""

from __future__ import annotations

import os

from flask import Flask


async def noop_job() -> None:
    return None


def create_app(with_asyncbg: bool) -> Flask:
    app = Flask("bench_http")

    @app.get("/noop")
    def noop() -> str:
        return "ok"

    @app.get("/async")
    async def async_noop() -> str:
        return "ok"

    if with_asyncbg:
        from asyncbg import AsyncBG

        app.config.update(ASYNCBG_HANDLE_SIGNALS=False)
        bg = AsyncBG(app)

        @app.get("/submit")
        def submit() -> str:
            bg.submit(noop_job)
            return "ok"

    return app


app = create_app(os.environ.get("BENCH_ASYNCBG") == "1")

"""The HTTP surface: health, jobs, nodes, cancel, run-now, metrics and the live dashboard page.

:func:`create_blueprint` builds a Flask blueprint for one app's
:class:`~asyncbg.engine.view.StateView`; the extension mounts it at
``ASYNCBG_DASHBOARD_PREFIX``. Safe by default (the rules are in
:mod:`asyncbg.web.access`):

- ``health`` answers anyone (load balancers, probes) with its status and a short
  body; the details go to trusted clients only.
- ``jobs``, ``jobs/<id>``, ``nodes`` and ``metrics`` are read-only and answer
  trusted clients.
- the dashboard page answers trusted clients once ``ASYNCBG_DASHBOARD`` is on.
- ``cancel`` and ``run`` need ``ASYNCBG_CONTROL`` on *and* an auth hook, and the
  header ``X-Requested-With: asyncbg`` (which a cross-site form cannot send).

Every refusal and every bad input is a 4xx JSON answer; wrong methods get 405
JSON with an ``Allow`` header. Every JSON answer parses: values JSON cannot hold
(NaN, numpy scalars, arbitrary objects) are turned into ones it can.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Response, current_app, request, url_for
from jinja2 import Environment, PackageLoader, select_autoescape
from werkzeug.exceptions import BadRequest, HTTPException, NotFound, RequestEntityTooLarge

from ..engine.jobs import JobStatus
from ..engine.records import CancelResult, JobQuery, JobRecord
from ..engine.tasks import is_key
from ..engine.view import StateView
from ..errors import BackendError, NotRunning
from .access import (
    CONTROL,
    CSRF_HEADER,
    CSRF_VALUE,
    PAGE,
    PUBLIC,
    READ,
    auth_hook,
    guard,
    trusted,
)
from .access import error as _error
from .access import json_response as _json
from .health import health_report
from .metrics import MetricsExporter, MetricsUnavailable

if TYPE_CHECKING:
    from flask.typing import ResponseReturnValue

__all__ = ["CSRF_HEADER", "CSRF_VALUE", "create_blueprint"]

log = logging.getLogger("asyncbg")

View = Callable[..., "ResponseReturnValue"]

_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
_MAX_BODY = 64 * 1024
_MAX_LIMIT = 500
_CANCEL_WAIT = 1.0
_CALL_TIMEOUT = 2.0

_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


# The page's own template environment: rendering through the app's Jinja loader
# would need the blueprint's template_folder, which adds asyncbg's template to
# every app's template list (and lets an app template of the same name replace it).
_PAGES = Environment(
    loader=PackageLoader("asyncbg.web", "templates"),
    autoescape=select_autoescape(default=True),
    auto_reload=False,
)


# -- request parsing ------------------------------------------------------------------


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}, got {value}")
    return value


def _status_filter() -> frozenset[str] | None:
    raw = [s for arg in request.args.getlist("status") for s in arg.split(",") if s]
    if not raw:
        return None
    known = [s.value for s in JobStatus]
    unknown = [s for s in raw if s not in known]
    if unknown:
        raise BadRequest(
            f"unknown status {', '.join(map(repr, unknown))}; use one of: {', '.join(known)}"
        )
    return frozenset(raw)


def _check_empty_body() -> None:
    """Control endpoints take no parameters: the body must be empty or ``{}``.

    :raises RequestEntityTooLarge: over 64 KiB.
    :raises BadRequest: if the body is not JSON, not an object, or has fields.
    """
    length = request.content_length
    if length is not None and length > _MAX_BODY:
        raise RequestEntityTooLarge(f"the body must be at most {_MAX_BODY} bytes")
    data = request.stream.read(_MAX_BODY + 1)
    if len(data) > _MAX_BODY:
        raise RequestEntityTooLarge(f"the body must be at most {_MAX_BODY} bytes")
    if not data.strip():
        return
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):  # [[[[...]]]] of a few KiB exhausts the stack
        raise BadRequest("the body must be empty or a JSON object") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be empty or a JSON object")
    if body:
        raise BadRequest(f"unexpected field(s): {', '.join(sorted(map(str, body)))}")


def _job_json(record: JobRecord) -> dict[str, Any]:
    show = bool(current_app.config["ASYNCBG_SHOW_RESULTS"])
    return record.to_dict(include_result=show, include_error=True, include_args=show)


def _find_job(view: StateView, job_id: str) -> JobRecord:
    record = view.get_job(job_id) if is_key(job_id) else None
    if record is None:
        raise NotFound(f"no job with id {job_id!r} (unknown, malformed or forgotten)")
    return record


def _already_final(record: JobRecord) -> Response:
    return _error(409, f"job already {record.status}", job=_job_json(record))


def _find_periodic(view: StateView, name: str) -> None:
    names = [pj["name"] for pj in view.periodic_snapshots()]
    if name not in names:
        raise NotFound(f"no periodic job named {name!r} (known: {', '.join(names) or 'none'})")


# -- the blueprint's plumbing -------------------------------------------------------------


class _Routes:
    """Registers views with their access level and a JSON 405 for the other methods."""

    def __init__(self, bp: Blueprint) -> None:
        self.bp = bp
        self.access: dict[str, str] = {"static": PAGE}

    def add(self, rule: str, endpoint: str, methods: list[str], level: str, view: View) -> None:
        """Serve ``view`` at ``rule`` for ``methods``, to clients ``level`` lets in."""
        self.bp.add_url_rule(rule, endpoint, view, methods=methods)
        allow = ", ".join([*methods, "HEAD", "OPTIONS"] if "GET" in methods else methods)

        def wrong_method(**_: Any) -> ResponseReturnValue:
            response = _error(405, f"{request.method} is not allowed here; use {allow}")
            response.headers["Allow"] = allow
            return response

        others = [m for m in _METHODS if m not in methods]
        self.bp.add_url_rule(rule, f"{endpoint}__wrong_method", wrong_method, methods=others)
        self.access[endpoint] = level

    def guard(self) -> ResponseReturnValue | None:
        """The ``before_request`` check of the endpoint's access level."""
        endpoint = (request.endpoint or "").rpartition(".")[2]
        return guard(self.access.get(endpoint))


def _no_store(response: Response) -> Response:
    response.headers.setdefault("Cache-Control", "no-store")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    return response


def _http_error(exc: HTTPException) -> ResponseReturnValue:
    if exc.response is not None:
        return exc.response  # the auth hook answered itself (abort(response))
    response = _error(exc.code or 500, exc.description or exc.name)
    for key, value in exc.get_headers():
        if key.lower() != "content-type":
            response.headers[key] = value
    return response


def _unexpected_error(exc: Exception) -> ResponseReturnValue:
    log.exception("error in %s %s", request.method, request.path)
    return _error(500, f"internal error: {type(exc).__name__}")


def _store_error(exc: BackendError) -> ResponseReturnValue:
    # The store is down or refused: the server's trouble, not the client's, and
    # one that passes; a 503 says so (a 500 would say the code is broken).
    log.warning("store unavailable in %s %s: %s", request.method, request.path, exc)
    return _error(503, f"the job store is unavailable: {exc}")


def _not_found(rest: str) -> ResponseReturnValue:
    return _error(404, f"nothing at {request.path!r}")


# -- the endpoints --------------------------------------------------------------------------


class _Endpoints:
    """The views of one app's surface, reading through its :class:`StateView`."""

    def __init__(self, view: StateView, metrics: MetricsExporter) -> None:
        self.view = view
        self.metrics_exporter = metrics

    def register(self, routes: _Routes) -> None:
        """Add every endpoint to ``routes``."""
        routes.add("/health", "health", ["GET"], PUBLIC, self.health)
        routes.add("/jobs", "jobs", ["GET"], READ, self.jobs)
        routes.add("/jobs/<job_id>", "job", ["GET"], READ, self.job)
        routes.add("/nodes", "nodes", ["GET"], READ, self.nodes)
        routes.add("/metrics", "metrics", ["GET"], READ, self.metrics)
        routes.add("/jobs/<job_id>/cancel", "cancel", ["POST"], CONTROL, self.cancel)
        routes.add("/periodic/<name>/run", "run_periodic", ["POST"], CONTROL, self.run_periodic)
        routes.add("/", "dashboard", ["GET"], PAGE, self.dashboard)

    # -- read-only -----------------------------------------------------------------

    def health(self) -> ResponseReturnValue:
        cfg = current_app.config
        try:
            detailed = trusted()
        except HTTPException:
            detailed = False  # the hook said no its own way; probes still get a status
        if not detailed and not cfg["ASYNCBG_HEALTH_PUBLIC"]:
            return _error(403, "health details are for trusted clients only")
        max_lag = cfg["ASYNCBG_HEALTH_MAX_LAG"]
        healthy, report = health_report(
            self.view, max_lag=None if max_lag is None else float(max_lag), detailed=detailed
        )
        return _json(report, 200 if healthy else 503)

    def jobs(self) -> ResponseReturnValue:
        query = JobQuery(
            statuses=_status_filter(),
            task=request.args.get("task"),
            limit=_int_arg("limit", 50, 1, _MAX_LIMIT),
            offset=_int_arg("offset", 0, 0, 10**9),
        )
        page = self.view.query_jobs(query)
        end = query.offset + query.limit
        return _json(
            {
                "jobs": [_job_json(record) for record in page.records],
                "total": page.total,
                "limit": query.limit,
                "offset": query.offset,
                "next_offset": end if end < page.total else None,
            }
        )

    def job(self, job_id: str) -> ResponseReturnValue:
        return _json(_job_json(_find_job(self.view, job_id)))

    def nodes(self) -> ResponseReturnValue:
        try:
            cluster = self.view.cluster()
        except NotRunning:
            return _error(503, "the event loop is not running")
        return _json(cluster)

    def metrics(self) -> ResponseReturnValue:
        if not current_app.config["ASYNCBG_METRICS"]:
            return _error(404, "metrics are off (ASYNCBG_METRICS = False)")
        try:
            body, content_type = self.metrics_exporter.render()
        except MetricsUnavailable as exc:
            return _error(404, str(exc))
        return Response(body, content_type=content_type)

    # -- control ---------------------------------------------------------------------

    def cancel(self, job_id: str) -> ResponseReturnValue:
        record = _find_job(self.view, job_id)
        _check_empty_body()
        if record.final:
            return _already_final(record)
        try:
            # Usually a moment: answer with the final state when it comes quickly.
            outcome, found = self.view.cancel_job(job_id, wait=_CANCEL_WAIT)
        except NotRunning:
            return _error(503, "the event loop is not running")
        # None: it ended and was forgotten meanwhile (its 404).
        record = found if found is not None else _find_job(self.view, job_id)
        if outcome == CancelResult.FINAL:
            return _already_final(record)
        return _json(
            {"cancel_requested": True, "job": _job_json(record)}, 200 if record.final else 202
        )

    def run_periodic(self, name: str) -> ResponseReturnValue:
        _find_periodic(self.view, name)
        _check_empty_body()
        try:
            started, snapshot = self.view.run_periodic_now(name, timeout=_CALL_TIMEOUT)
        except KeyError:
            _find_periodic(self.view, name)  # gone meanwhile: its 404
            raise
        except NotRunning:
            return _error(503, "the event loop is not running")
        except TimeoutError:
            return _error(
                503,
                f"the event loop did not answer within {_CALL_TIMEOUT:g}s (blocked?); "
                "the run starts when it does",
            )
        if not started:
            why = (
                "a run is already in progress"
                if snapshot["running"]
                else "its schedule is not started"
            )
            return _error(409, f"periodic job {name!r} not started: {why}", periodic=snapshot)
        return _json({"started": True, "periodic": snapshot}, 202)

    # -- the page ----------------------------------------------------------------------

    def dashboard(self) -> ResponseReturnValue:
        cfg = current_app.config
        can_control = bool(cfg["ASYNCBG_CONTROL"]) and auth_hook() is not None
        html = _PAGES.get_template("asyncbg/dashboard.html").render(
            base=url_for(".dashboard"),
            css_url=url_for(".static", filename="dashboard.css"),
            js_url=url_for(".static", filename="dashboard.js"),
            name=self.view.name,
            app_name=current_app.name,
            can_control=can_control,
            refresh_ms=max(200, int(float(cfg["ASYNCBG_DASHBOARD_REFRESH"]) * 1000)),
            csrf_header=CSRF_HEADER,
            csrf_value=CSRF_VALUE,
        )
        response = Response(html, content_type="text/html; charset=utf-8")
        response.headers["Content-Security-Policy"] = _CSP
        return response


def create_blueprint(view: StateView, metrics: MetricsExporter | None = None) -> Blueprint:
    """Build the blueprint serving the health, jobs, control, metrics and dashboard
    of the app ``view`` shows.

    ``metrics`` is the app's exporter (by default one of its own, with a
    private registry). The extension registers the blueprint under
    ``ASYNCBG_DASHBOARD_PREFIX``; its name is ``asyncbg`` (one per app).
    """
    bp = Blueprint("asyncbg", __name__, static_folder="static", static_url_path="/static")
    routes = _Routes(bp)
    _Endpoints(view, metrics if metrics is not None else MetricsExporter(view)).register(routes)
    bp.before_request(routes.guard)
    bp.after_request(_no_store)
    bp.register_error_handler(HTTPException, _http_error)
    bp.register_error_handler(BackendError, _store_error)
    bp.register_error_handler(Exception, _unexpected_error)
    bp.add_url_rule("/<path:rest>", "not_found", _not_found, methods=list(_METHODS))
    return bp

"""The HTTP surface: health, jobs, cancel, run-now, metrics and the live dashboard page.

:func:`create_blueprint` builds a Flask blueprint for one :class:`~asyncbg.AsyncBG`;
the extension mounts it at ``ASYNCBG_DASHBOARD_PREFIX``. Safe by default:

- ``health`` answers anyone (load balancers, probes) with its status and a short
  body; the details go to trusted clients only.
- ``jobs``, ``jobs/<id>`` and ``metrics`` are read-only and answer trusted clients.
- the dashboard page answers trusted clients once ``ASYNCBG_DASHBOARD`` is on.
- ``cancel`` and ``run`` need ``ASYNCBG_CONTROL`` on *and* an auth hook, and the
  header ``X-Requested-With: asyncbg`` (which a cross-site form cannot send).

A client is trusted when the auth hook (``ASYNCBG_AUTH``, a callable taking the
request) returns true; without a hook, when it connects from a loopback address
with no proxy forwarding headers. Every refusal and every bad input is a 4xx
JSON answer; wrong methods get 405 JSON with an ``Allow`` header.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Response, current_app, jsonify, render_template, request, url_for
from werkzeug.exceptions import BadRequest, HTTPException, NotFound, RequestEntityTooLarge

from .errors import NotRunning
from .health import health_report
from .jobs import Job, JobStatus
from .metrics import MetricsUnavailable

if TYPE_CHECKING:
    from flask.typing import ResponseReturnValue

    from .api import AsyncBG

__all__ = ["CSRF_HEADER", "CSRF_VALUE", "create_blueprint"]

log = logging.getLogger("asyncbg")

#: Control requests (POST) must carry this header with this value.
CSRF_HEADER = "X-Requested-With"
CSRF_VALUE = "asyncbg"

_JOB_ID = re.compile(r"[0-9a-f]{32}")
_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
_FORWARDING_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-Ip")
_MAX_BODY = 64 * 1024
_MAX_LIMIT = 500
_CANCEL_WAIT = 1.0
_CALL_TIMEOUT = 2.0

_PUBLIC, _READ, _CONTROL, _PAGE = "public", "read", "control", "page"

_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _error(status: int, message: str, **extra: Any) -> Response:
    response = jsonify({"error": message, "status": status, **extra})
    response.status_code = status
    return response


def _is_loopback() -> bool:
    """True if the client connects from a loopback address and not through a proxy.

    A reverse proxy on the same host makes every client look local; its
    forwarding headers give it away, and then the client is not trusted.
    """
    if any(h in request.headers for h in _FORWARDING_HEADERS):
        return False
    try:
        ip = ipaddress.ip_address(request.remote_addr or "")
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def _auth_hook() -> Callable[[Any], Any] | None:
    hook = current_app.config["ASYNCBG_AUTH"]
    if hook is not None and not callable(hook):
        raise TypeError("ASYNCBG_AUTH must be a callable taking the request, or None")
    return hook  # type: ignore[no-any-return]


def _trusted() -> bool:
    """Ask the auth hook about this request; without one, trust loopback clients.

    :raises HTTPException: whatever the hook raises to answer itself (e.g. 401).
    """
    hook = _auth_hook()
    if hook is None:
        return _is_loopback()
    try:
        return bool(hook(request))
    except HTTPException:
        raise
    except Exception:
        log.exception("asyncbg: the ASYNCBG_AUTH hook failed; refusing the request")
        return False


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


def _status_filter() -> set[JobStatus] | None:
    raw = [s for arg in request.args.getlist("status") for s in arg.split(",") if s]
    if not raw:
        return None
    known = {s.value: s for s in JobStatus}
    unknown = [s for s in raw if s not in known]
    if unknown:
        raise BadRequest(
            f"unknown status {', '.join(map(repr, unknown))}; use one of: {', '.join(known)}"
        )
    return {known[s] for s in raw}


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
    except ValueError:
        raise BadRequest("the body must be empty or a JSON object") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be empty or a JSON object")
    if body:
        raise BadRequest(f"unexpected field(s): {', '.join(sorted(map(str, body)))}")


def create_blueprint(bg: AsyncBG) -> Blueprint:
    """Build the blueprint serving ``bg``'s health, jobs, control, metrics and dashboard.

    The extension registers it under ``ASYNCBG_DASHBOARD_PREFIX``; its name is
    ``asyncbg`` (one per app).
    """
    bp = Blueprint(
        "asyncbg",
        __name__,
        template_folder="templates",
        static_folder="static",
        static_url_path="/static",
    )
    access: dict[str, str] = {"static": _PAGE}

    def route(
        rule: str, endpoint: str, methods: list[str], level: str
    ) -> Callable[[Callable[..., ResponseReturnValue]], Callable[..., ResponseReturnValue]]:
        def register(
            view: Callable[..., ResponseReturnValue],
        ) -> Callable[..., ResponseReturnValue]:
            bp.add_url_rule(rule, endpoint, view, methods=methods)
            allow = ", ".join([*methods, "HEAD", "OPTIONS"] if "GET" in methods else methods)

            def wrong_method(**_: Any) -> ResponseReturnValue:
                response = _error(405, f"{request.method} is not allowed here; use {allow}")
                response.headers["Allow"] = allow
                return response

            others = [m for m in _METHODS if m not in methods]
            bp.add_url_rule(rule, f"{endpoint}__wrong_method", wrong_method, methods=others)
            access[endpoint] = level
            return view

        return register

    def job_json(job: Job[Any]) -> dict[str, Any]:
        show = bool(current_app.config["ASYNCBG_SHOW_RESULTS"])
        return job.to_dict(include_result=show, include_error=True, include_args=show)

    def find_job(job_id: str) -> Job[Any]:
        job = bg.get_job(job_id) if _JOB_ID.fullmatch(job_id) else None
        if job is None:
            raise NotFound(f"no job with id {job_id!r} (unknown, malformed or forgotten)")
        return job

    @bp.before_request
    def guard() -> ResponseReturnValue | None:
        endpoint = (request.endpoint or "").rpartition(".")[2]
        level = access.get(endpoint)
        if level is None or level == _PUBLIC:
            return None  # 404/405 answers, and health (which checks for itself)
        cfg = current_app.config
        if level == _PAGE and not cfg["ASYNCBG_DASHBOARD"]:
            return _error(404, "the dashboard is off; set ASYNCBG_DASHBOARD = True to serve it")
        if level == _CONTROL:
            if not cfg["ASYNCBG_CONTROL"]:
                return _error(
                    404, "control endpoints are off; set ASYNCBG_CONTROL = True and ASYNCBG_AUTH"
                )
            if _auth_hook() is None:
                return _error(
                    403,
                    "control endpoints need an auth hook (ASYNCBG_AUTH); without one "
                    "the HTTP surface is read-only",
                )
            if request.headers.get(CSRF_HEADER) != CSRF_VALUE:
                return _error(403, f"control requests must send the header {CSRF_HEADER}: asyncbg")
        if not _trusted():
            if _auth_hook() is None:
                return _error(
                    403, "only loopback clients are allowed without an auth hook (ASYNCBG_AUTH)"
                )
            return _error(403, "refused by the auth hook")
        return None

    @bp.after_request
    def no_store(response: Response) -> Response:
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    @bp.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> ResponseReturnValue:
        if exc.response is not None:
            return exc.response  # the auth hook answered itself (abort(response))
        response = _error(exc.code or 500, exc.description or exc.name)
        for key, value in exc.get_headers():
            if key.lower() != "content-type":
                response.headers[key] = value
        return response

    @bp.errorhandler(Exception)
    def unexpected_error(exc: Exception) -> ResponseReturnValue:
        log.exception("asyncbg: error in %s %s", request.method, request.path)
        return _error(500, f"internal error: {type(exc).__name__}")

    # -- read-only -----------------------------------------------------------------

    @route("/health", "health", ["GET"], _PUBLIC)
    def health() -> ResponseReturnValue:
        cfg = current_app.config
        try:
            detailed = _trusted()
        except HTTPException:
            detailed = False  # the hook said no its own way; probes still get a status
        if not detailed and not cfg["ASYNCBG_HEALTH_PUBLIC"]:
            return _error(403, "health details are for trusted clients only")
        max_lag = cfg["ASYNCBG_HEALTH_MAX_LAG"]
        healthy, report = health_report(
            bg, max_lag=None if max_lag is None else float(max_lag), detailed=detailed
        )
        return jsonify(report), 200 if healthy else 503

    @route("/jobs", "jobs", ["GET"], _READ)
    def jobs() -> ResponseReturnValue:
        statuses = _status_filter()
        task = request.args.get("task")
        limit = _int_arg("limit", 50, 1, _MAX_LIMIT)
        offset = _int_arg("offset", 0, 0, 10**9)
        selected = [
            job
            for job in reversed(bg.history.jobs())
            if (statuses is None or job.status in statuses) and (task is None or job.name == task)
        ]
        page = selected[offset : offset + limit]
        more = offset + limit < len(selected)
        return jsonify(
            {
                "jobs": [job_json(job) for job in page],
                "total": len(selected),
                "limit": limit,
                "offset": offset,
                "next_offset": offset + limit if more else None,
            }
        )

    @route("/jobs/<job_id>", "job", ["GET"], _READ)
    def job(job_id: str) -> ResponseReturnValue:
        return jsonify(job_json(find_job(job_id)))

    @route("/metrics", "metrics", ["GET"], _READ)
    def metrics() -> ResponseReturnValue:
        if not current_app.config["ASYNCBG_METRICS"]:
            return _error(404, "metrics are off (ASYNCBG_METRICS = False)")
        try:
            body, content_type = bg.metrics.render()
        except MetricsUnavailable as exc:
            return _error(404, str(exc))
        return Response(body, content_type=content_type)

    # -- control ---------------------------------------------------------------------

    @route("/jobs/<job_id>/cancel", "cancel", ["POST"], _CONTROL)
    def cancel(job_id: str) -> ResponseReturnValue:
        job = find_job(job_id)
        _check_empty_body()
        if job.done():
            return _error(409, f"job already {job.status.value}", job=job_json(job))
        if not job.cancel():
            if job.done():
                return _error(409, f"job already {job.status.value}", job=job_json(job))
            return _error(503, "the event loop is not running")
        # Usually a moment: answer with the final state when it comes quickly.
        done = job.wait(_CANCEL_WAIT)
        return jsonify({"cancel_requested": True, "job": job_json(job)}), 200 if done else 202

    @route("/periodic/<name>/run", "run_periodic", ["POST"], _CONTROL)
    def run_periodic(name: str) -> ResponseReturnValue:
        pj = bg.periodic_jobs.get(name)
        if pj is None:
            known = ", ".join(sorted(bg.periodic_jobs)) or "none"
            raise NotFound(f"no periodic job named {name!r} (known: {known})")
        _check_empty_body()
        try:
            started = bg.loop_thread.call(pj.run_now, timeout=_CALL_TIMEOUT)
        except NotRunning:
            return _error(503, "the event loop is not running")
        except TimeoutError:
            return _error(
                503,
                f"the event loop did not answer within {_CALL_TIMEOUT:g}s (blocked?); "
                "the run starts when it does",
            )
        if not started:
            why = "a run is already in progress" if pj.running else "its schedule is not started"
            return _error(409, f"periodic job {name!r} not started: {why}", periodic=pj.snapshot())
        return jsonify({"started": True, "periodic": pj.snapshot()}), 202

    # -- the page ----------------------------------------------------------------------

    @route("/", "dashboard", ["GET"], _PAGE)
    def dashboard() -> ResponseReturnValue:
        cfg = current_app.config
        can_control = bool(cfg["ASYNCBG_CONTROL"]) and _auth_hook() is not None
        html = render_template(
            "asyncbg/dashboard.html",
            base=url_for(".dashboard"),
            name=bg.name,
            app_name=current_app.name,
            can_control=can_control,
            refresh_ms=max(200, int(float(cfg["ASYNCBG_DASHBOARD_REFRESH"]) * 1000)),
            csrf_header=CSRF_HEADER,
            csrf_value=CSRF_VALUE,
        )
        response = Response(html, content_type="text/html; charset=utf-8")
        response.headers["Content-Security-Policy"] = _CSP
        return response

    @bp.route("/<path:rest>", endpoint="not_found", methods=list(_METHODS))
    def not_found(rest: str) -> ResponseReturnValue:
        return _error(404, f"nothing at {request.path!r}")

    return bp

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
request) returns ``True`` (a response object it returns is sent as the answer;
anything else refuses); without a hook, when it connects from a loopback
address, names a loopback host (``Host: localhost``, ``127.0.0.1`` or ``[::1]``:
a DNS-rebinding page sends its own name) and sends no proxy forwarding header.
Every refusal and every bad input is a 4xx JSON answer; wrong methods get 405
JSON with an ``Allow`` header. Every JSON answer parses: values JSON cannot hold
(NaN, numpy scalars, arbitrary objects) are turned into ones it can.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Response, current_app, request, url_for
from jinja2 import Environment, PackageLoader, select_autoescape
from werkzeug.exceptions import BadRequest, HTTPException, NotFound, RequestEntityTooLarge
from werkzeug.wrappers import Response as WerkzeugResponse

from ..engine.jobs import Job, JobStatus
from ..engine.jsonsafe import json_safe
from ..engine.logthrottle import short_repr
from ..errors import NotRunning
from .health import health_report
from .metrics import MetricsUnavailable

if TYPE_CHECKING:
    from flask.typing import ResponseReturnValue

    from ..extension import AsyncBG

__all__ = ["CSRF_HEADER", "CSRF_VALUE", "create_blueprint"]

log = logging.getLogger("asyncbg")

#: Control requests (POST) must carry this header with this value.
CSRF_HEADER = "X-Requested-With"
CSRF_VALUE = "asyncbg"

_JOB_ID = re.compile(r"[0-9a-f]{32}")
_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
# Headers a proxy adds to say who the client really is: a request with any of
# them came through a proxy, and its loopback peer address means nothing.
_FORWARDING_HEADERS = (
    "Forwarded",
    "X-Forwarded-For",
    "X-Forwarded-Host",
    "X-Forwarded-Proto",
    "X-Forwarded-Port",
    "X-Forwarded-Server",
    "X-Forwarded-Prefix",
    "X-Original-Forwarded-For",
    "X-Real-Ip",
    "X-Client-Ip",
    "X-Cluster-Client-Ip",
    "Client-Ip",
    "True-Client-Ip",
    "Cf-Connecting-Ip",
    "Fastly-Client-Ip",
    "Via",
)
_LOOPBACK_HOST = re.compile(r"(?:localhost|127\.0\.0\.1|\[::1\])(?::[0-9]{1,5})?", re.IGNORECASE)
#: Nesting deeper than this in a JSON answer is cut (a job result may be cyclic).
_MAX_BODY = 64 * 1024
_MAX_LIMIT = 500
_CANCEL_WAIT = 1.0
_CALL_TIMEOUT = 2.0

_PUBLIC, _READ, _CONTROL, _PAGE = "public", "read", "control", "page"

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


def _json(payload: Any, status: int = 200) -> Response:
    """A JSON answer that always parses (``allow_nan=False`` holds after :func:`json_safe`)."""
    body = json.dumps(json_safe(payload), allow_nan=False, sort_keys=True)
    return Response(body + "\n", status=status, mimetype="application/json")


def _error(status: int, message: str, **extra: Any) -> Response:
    return _json({"error": message, "status": status, **extra}, status)


def _loopback_host() -> bool:
    # request.host falls back to SERVER_NAME when the header is absent: read the header.
    host = request.headers.get("Host")
    return host is not None and _LOOPBACK_HOST.fullmatch(host.strip()) is not None


def _is_loopback() -> bool:
    """True if the client connects from a loopback address, to a loopback host, not via a proxy.

    A reverse proxy on the same host makes every client look local; its
    forwarding headers give it away, and then the client is not trusted (a
    plain nginx ``proxy_pass`` adds none: behind a proxy, use an auth hook). A
    page on another site that a DNS-rebinding attack points at 127.0.0.1 still
    sends its own name as ``Host``, so only loopback names are trusted.
    """
    if any(h in request.headers for h in _FORWARDING_HEADERS):
        return False
    if not _loopback_host():
        return False
    try:
        ip = ipaddress.ip_address(request.remote_addr or "")
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def _auth_hook() -> Callable[[Any], Any] | None:
    hook: object = current_app.config["ASYNCBG_AUTH"]
    if hook is None:
        return None
    if not callable(hook):
        raise TypeError("ASYNCBG_AUTH must be a callable taking the request, or None")
    return hook


def _trust() -> bool | WerkzeugResponse:
    """Ask the auth hook about this request; without one, trust loopback clients.

    Only ``True`` grants. A response object the hook returns (say Flask-Login's
    redirect to the login page) is the answer to send. Anything else refuses:
    ``False`` and ``None`` quietly, other values (1, "yes", a dict) with a
    warning logged once per type, since they are most likely a mistake. A hook
    that raises refuses too, with the traceback logged: a client sending
    malformed credentials must not get a 500, and a broken hook fails closed.

    :raises HTTPException: whatever the hook raises to answer itself (e.g. 401).
    """
    hook = _auth_hook()
    if hook is None:
        return _is_loopback()
    try:
        answer = hook(request)
    except HTTPException:
        raise
    except Exception:
        log.exception("the ASYNCBG_AUTH hook failed; refusing the request")
        return False
    if answer is True:
        return True
    if isinstance(answer, WerkzeugResponse):
        return answer
    if answer is not False and answer is not None:
        kind = type(answer).__name__
        warned: set[str] = current_app.extensions.setdefault("asyncbg.odd_hook_answers", set())
        if kind not in warned:  # once per type and app: not a log line per request
            warned.add(kind)
            log.warning(
                "the ASYNCBG_AUTH hook returned %s, not True, False or a response: "
                "refusing (only True allows)",
                short_repr(answer),
            )
    return False


def _trusted() -> bool:
    """:func:`_trust` as a yes or no (a response from the hook is a no)."""
    return _trust() is True


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
    except (ValueError, RecursionError):  # [[[[...]]]] of a few KiB exhausts the stack
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
        verdict = _trust()
        if isinstance(verdict, WerkzeugResponse):
            return verdict
        if not verdict:
            if _auth_hook() is None:
                return _error(
                    403,
                    "without an auth hook (ASYNCBG_AUTH) only direct loopback clients are "
                    "allowed: a loopback address, Host localhost, 127.0.0.1 or [::1], "
                    "and no proxy forwarding header",
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
        log.exception("error in %s %s", request.method, request.path)
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
        return _json(report, 200 if healthy else 503)

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
        return _json(
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
        return _json(job_json(find_job(job_id)))

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
        return _json({"cancel_requested": True, "job": job_json(job)}, 200 if done else 202)

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
        return _json({"started": True, "periodic": pj.snapshot()}, 202)

    # -- the page ----------------------------------------------------------------------

    @route("/", "dashboard", ["GET"], _PAGE)
    def dashboard() -> ResponseReturnValue:
        cfg = current_app.config
        can_control = bool(cfg["ASYNCBG_CONTROL"]) and _auth_hook() is not None
        html = _PAGES.get_template("asyncbg/dashboard.html").render(
            base=url_for(".dashboard"),
            css_url=url_for(".static", filename="dashboard.css"),
            js_url=url_for(".static", filename="dashboard.js"),
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

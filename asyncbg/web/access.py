"""Who may use the HTTP surface: loopback trust, the auth hook, the CSRF header, the guard.

A client is trusted when the auth hook (``ASYNCBG_AUTH``, a callable taking the
request) returns ``True`` (a response object it returns is sent as the answer;
anything else refuses); without a hook, when it connects from a loopback
address, names a loopback host (``Host: localhost``, ``127.0.0.1`` or ``[::1]``:
a DNS-rebinding page sends its own name) and sends no proxy forwarding header.
Control requests also need ``ASYNCBG_CONTROL``, a hook, and the header
``X-Requested-With: asyncbg`` (which a cross-site form cannot send).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from collections.abc import Callable
from typing import Any

from flask import Response, current_app, request
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as WerkzeugResponse

from ..engine.jsonsafe import json_safe
from ..engine.logthrottle import short_repr

__all__ = [
    "CONTROL",
    "CSRF_HEADER",
    "CSRF_VALUE",
    "PAGE",
    "PUBLIC",
    "READ",
    "auth_hook",
    "error",
    "guard",
    "json_response",
    "trusted",
]

log = logging.getLogger("asyncbg")

#: Control requests (POST) must carry this header with this value.
CSRF_HEADER = "X-Requested-With"
CSRF_VALUE = "asyncbg"

#: Access levels of the endpoints: anyone (health checks for itself), trusted
#: clients, trusted clients with control on, trusted clients with the page on.
PUBLIC, READ, CONTROL, PAGE = "public", "read", "control", "page"

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


def json_response(payload: Any, status: int = 200) -> Response:
    """A JSON answer that always parses (``allow_nan=False`` holds after :func:`json_safe`)."""
    body = json.dumps(json_safe(payload), allow_nan=False, sort_keys=True)
    return Response(body + "\n", status=status, mimetype="application/json")


def error(status: int, message: str, **extra: Any) -> Response:
    """A JSON error answer: ``{"error": message, "status": status, ...extra}``."""
    return json_response({"error": message, "status": status, **extra}, status)


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


def auth_hook() -> Callable[[Any], Any] | None:
    """The app's ``ASYNCBG_AUTH`` hook, or None.

    :raises TypeError: if it is set to something not callable.
    """
    hook: object = current_app.config["ASYNCBG_AUTH"]
    if hook is None:
        return None
    if not callable(hook):
        raise TypeError("ASYNCBG_AUTH must be a callable taking the request, or None")
    return hook


def _warn_odd_answer(answer: object) -> None:
    kind = type(answer).__name__
    warned: set[str] = current_app.extensions.setdefault("asyncbg.odd_hook_answers", set())
    if kind not in warned:  # once per type and app: not a log line per request
        warned.add(kind)
        log.warning(
            "the ASYNCBG_AUTH hook returned %s, not True, False or a response: "
            "refusing (only True allows)",
            short_repr(answer),
        )


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
    hook = auth_hook()
    if hook is None:
        return _is_loopback()
    try:
        answer = hook(request)
    except HTTPException:
        raise
    except Exception:
        log.exception("the ASYNCBG_AUTH hook failed; refusing the request")
        return False
    if answer is True or isinstance(answer, WerkzeugResponse):
        return answer
    if answer is not False and answer is not None:
        _warn_odd_answer(answer)
    return False


def trusted() -> bool:
    """:func:`_trust` as a yes or no (a response from the hook is a no).

    :raises HTTPException: whatever the hook raises to answer itself.
    """
    return _trust() is True


def _switched_off(level: str) -> Response | None:
    # The answer for a page or control endpoint that the config leaves off.
    cfg = current_app.config
    if level == PAGE and not cfg["ASYNCBG_DASHBOARD"]:
        return error(404, "the dashboard is off; set ASYNCBG_DASHBOARD = True to serve it")
    if level != CONTROL:
        return None
    if not cfg["ASYNCBG_CONTROL"]:
        return error(404, "control endpoints are off; set ASYNCBG_CONTROL = True and ASYNCBG_AUTH")
    if auth_hook() is None:
        return error(
            403,
            "control endpoints need an auth hook (ASYNCBG_AUTH); without one "
            "the HTTP surface is read-only",
        )
    if request.headers.get(CSRF_HEADER) != CSRF_VALUE:
        return error(403, f"control requests must send the header {CSRF_HEADER}: asyncbg")
    return None


def guard(level: str | None) -> WerkzeugResponse | None:
    """The answer refusing this request to an endpoint of access ``level``, or None to go on.

    None (not an endpoint of ours: a 404 or 405 answer) and :data:`PUBLIC`
    always go on.

    :raises HTTPException: whatever the auth hook raises to answer itself.
    """
    if level is None or level == PUBLIC:
        return None  # 404/405 answers, and health (which checks for itself)
    refusal = _switched_off(level)
    if refusal is not None:
        return refusal
    verdict = _trust()
    if isinstance(verdict, WerkzeugResponse):
        return verdict
    if verdict:
        return None
    if auth_hook() is None:
        return error(
            403,
            "without an auth hook (ASYNCBG_AUTH) only direct loopback clients are "
            "allowed: a loopback address, Host localhost, 127.0.0.1 or [::1], "
            "and no proxy forwarding header",
        )
    return error(403, "refused by the auth hook")

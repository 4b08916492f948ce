"""The one place where errors become responses: a readable page for browsers, JSON for everything else."""

from __future__ import annotations

import logging

import aiohttp_jinja2
from aiohttp import web

from gateway.accesslog import TARGET, log_text
from gateway.edge.cors import reloads_by_itself
from gateway.edge.plan import wants_page
from gateway.edge.routing import Kind
from gateway.errors import GatewayError, Redirect
from gateway.lifecycle import Phase
from gateway.server.context import GATEWAY

log = logging.getLogger(__name__)
JSON_ONLY = web.RequestKey("codehub_json_only", bool)  # this route answers in JSON only (the management API)


PHASE_WORDS: dict[Phase, str] = {
    Phase.RUNNING: "Running",
    Phase.WARM: "Sleeping (wakes in seconds)",
    Phase.COLD: "Archived (wakes in about a minute)",
    Phase.STARTING: "Starting",
    Phase.STOPPING: "Going to sleep",
    Phase.ARCHIVING: "Archiving",
    Phase.RESTORING: "Restoring from its archive",
    Phase.FAILED: "Failed to start",
}
"""What people read for a phase: WARM and COLD are the gateway's words, not a newcomer's."""


def phase_words(phase: Phase | str) -> str:
    return PHASE_WORDS[Phase(phase)]


def wants_html(request: web.BaseRequest) -> bool:
    """An error is a page for whom the plan shows pages (``wants_page``), unless the route answers only JSON."""
    return not request.get(JSON_ONLY) and wants_page(request.method, request.headers)


def error_response(request: web.Request, error: GatewayError) -> web.StreamResponse:
    headers = {"Cache-Control": "no-store", **error.headers}
    if isinstance(error, Redirect):
        response = web.Response(status=error.status, headers=headers)
    elif wants_html(request):
        # Trying again is a reload, a GET: the same request only for a GET or HEAD (a form sent is not sent again).
        retry = error.retry and request.method in ("GET", "HEAD")
        response = web.Response(text=error_page(request.app, error, retry=retry,
                                                refresh=retry and _tries_by_itself(request)),
                                status=error.status, content_type="text/html", headers=headers)
    else:
        response = web.json_response(error.document(), status=error.status, headers=headers)
    for cookie in error.cookies:
        response.headers.add("Set-Cookie", cookie)
    return response


def _tries_by_itself(request: web.Request) -> bool:
    """Whether a page that tries again may do so by itself (``<meta http-equiv="refresh">``): on the hub, always; on a
    workspace's host as ``cors.reloads_by_itself`` says, as for the 431 page (``refusals.Relief``). Else it gets the
    button, which is the visitor's to click."""
    target = request.get(TARGET)
    if target is None or target.kind is Kind.HUB:
        return True
    return reloads_by_itself(request.headers, request.app[GATEWAY].hosts.origin(request.headers["Host"]))


def error_page(app: web.Application, error: GatewayError, *, retry: bool, refresh: bool) -> str:
    """``error``'s page; with ``retry`` a button that tries again, with ``refresh`` it tries by itself every few
    seconds too (a navigation from its own origin: one that may wake a sleeping workspace)."""
    return aiohttp_jinja2.get_env(app).get_template(error.template).render(error=error, retry=retry,
                                                                           refresh=refresh)


def internal_error(request: web.Request, exc: BaseException) -> web.StreamResponse:
    log.exception("unhandled error for %s %s", log_text(request.method), log_text(request.path), exc_info=exc)
    return error_response(request, GatewayError("The gateway hit an unexpected error; it has been logged."))

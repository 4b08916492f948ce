"""The one place where errors become responses: a readable page for browsers, JSON for everything else."""

from __future__ import annotations

import logging

import aiohttp_jinja2
from aiohttp import web

from gateway.errors import GatewayError

log = logging.getLogger(__name__)


def wants_html(request: web.BaseRequest) -> bool:
    """Browsers navigating get pages; scripts, fetch/XHR and API clients get JSON."""
    mode = request.headers.get("Sec-Fetch-Mode")
    if mode is not None:
        return mode == "navigate"
    if request.method not in ("GET", "HEAD") or "Authorization" in request.headers:
        return False
    if request.headers.get("X-Requested-With"):
        return False
    return "text/html" in request.headers.get("Accept", "")


def error_response(request: web.Request, error: GatewayError) -> web.StreamResponse:
    headers = {"Cache-Control": "no-store", **error.headers}
    if wants_html(request):
        response = aiohttp_jinja2.render_template(
            error.template, request, {"error": error}, status=error.status
        )
        response.headers.update(headers)
        return response
    body = {"error": {"code": error.code, "message": error.message, "status": error.status}}
    return web.json_response(body, status=error.status, headers=headers)


def internal_error(request: web.Request, exc: BaseException) -> web.StreamResponse:
    log.exception("unhandled error for %s %s", request.method, request.path, exc_info=exc)
    return error_response(request, GatewayError("The gateway hit an unexpected error; it has been logged."))

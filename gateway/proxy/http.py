"""HTTP proxying with bodies streamed both ways, never held whole in memory."""

from __future__ import annotations

import asyncio
import errno
import logging

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.errors import BadGateway, GatewayTimeout
from gateway.metrics import Metrics
from gateway.proxy.headers import ResponseRules, downstream_response_headers
from gateway.proxy.upstream import ConnectGrace, Upstream

log = logging.getLogger(__name__)
_NO_BODY_STATUSES = frozenset({204, 304})
NO_RULES = ResponseRules()
SMALL_BODY = 16 << 10
"""An answer with a Content-Length up to this size is read whole and sent in one write, head and body together
(a streamed answer costs a write for the head and one per chunk)."""


class UpstreamRefused(BadGateway):
    """Nothing accepted the connection; the wake module uses this to tell a sleeping port from a broken one."""


def connect_failure(exc: aiohttp.ClientConnectorError) -> str:
    """The ``reason`` label of ``codehub_upstream_connect_errors_total`` for a failed connect."""
    return "refused" if exc.os_error.errno == errno.ECONNREFUSED else "unreachable"


def refused(upstream: Upstream, exc: aiohttp.ClientConnectorError, metrics: Metrics) -> UpstreamRefused:
    metrics.upstream_errors.labels(connect_failure(exc)).inc()
    return UpstreamRefused(
        f"Nothing is listening on port {upstream.port} in workspace {upstream.workspace}. "
        "Start your dev server there; this page retries by itself.",
        code="port-not-listening",
        headers={"Retry-After": "2"},
        retry=True,
    )


async def proxy_http(
    request: web.Request, session: aiohttp.ClientSession, upstream: Upstream, path: str,
    headers: CIMultiDict[str], *, metrics: Metrics, connect_grace: float = 0.0, rules: ResponseRules = NO_RULES,
) -> web.StreamResponse:
    """Send the request upstream and stream the answer back; errors before the answer starts are raised.

    ``connect_grace``: how long refused connects are retried (see ``ConnectGrace``); ``rules``: what policy
    changes on the response (framing, CORS)."""
    grace = ConnectGrace(connect_grace)
    while True:
        try:
            return await _exchange(request, session, upstream, path, headers, metrics, rules)
        except _Refused as refusal:
            if not await grace.again(refusal.exc):
                raise refused(upstream, refusal.exc, metrics) from refusal.exc


class _Refused(Exception):
    def __init__(self, exc: aiohttp.ClientConnectorError) -> None:
        self.exc = exc


async def _exchange(
    request: web.Request, session: aiohttp.ClientSession, upstream: Upstream, path: str,
    headers: CIMultiDict[str], metrics: Metrics, rules: ResponseRules,
) -> web.StreamResponse:
    body = request.content if request.body_exists else None
    url = URL(upstream.origin + path, encoded=True)
    response: web.StreamResponse | None = None
    try:
        async with session.request(
            request.method, url, headers=headers, data=body, allow_redirects=False, compress=False, chunked=None,
        ) as answer:
            out_headers = downstream_response_headers(
                answer.headers, public_host=request.headers.get("Host", ""),
                public_origin=upstream.public_origin, upstream_origins=upstream.origins,
                prefix=upstream.prefix, replace=rules.replace, drop_cors=rules.drop_cors,
                drop_frame_options=rules.drop_frame_options,
            )
            length = answer.content_length if "Transfer-Encoding" not in answer.headers else None
            if (length is not None and length <= SMALL_BODY and request.method != "HEAD"
                    and answer.status not in _NO_BODY_STATUSES):
                try:
                    whole = await answer.content.readexactly(length)
                except asyncio.IncompleteReadError as exc:
                    raise _broken_off(upstream, exc) from exc
                response = web.Response(status=answer.status, reason=answer.reason, body=whole, headers=out_headers)
                await response.prepare(request)
                await response.write_eof()
                return response
            response = web.StreamResponse(status=answer.status, reason=answer.reason)
            response.headers.extend(out_headers)
            if length is not None:
                response.content_length = length
            await response.prepare(request)
            if request.method == "HEAD" or answer.status in _NO_BODY_STATUSES or await _pump(answer, response):
                await response.write_eof()
            elif request.transport is not None:
                request.transport.close()
            return response
    except ConnectionResetError as exc:
        if response is not None and response.prepared:
            raise  # the client went away mid-body (aiohttp's reset error is also a ClientError): not a 502
        raise _broken_off(upstream, exc) from exc
    except aiohttp.ClientConnectorError as exc:
        raise _Refused(exc) from exc
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            metrics.upstream_errors.labels("timeout").inc()
        raise GatewayTimeout(
            f"Port {upstream.port} in workspace {upstream.workspace} accepted the request but did not answer in time."
        ) from exc
    except aiohttp.ClientError as exc:
        raise _broken_off(upstream, exc) from exc


def _broken_off(upstream: Upstream, exc: Exception) -> BadGateway:
    return BadGateway(
        f"Port {upstream.port} in workspace {upstream.workspace} broke off the connection: {type(exc).__name__}.",
        code="upstream-error",
    )


async def _pump(answer: aiohttp.ClientResponse, response: web.StreamResponse) -> bool:
    """Copy the body chunk by chunk as it arrives, so SSE and long polls flow event by event.

    Returns False when the upstream broke off mid-body: the status line has gone out, so instead of an
    error page the caller closes the client connection, which tells the client the body is incomplete.
    """
    try:
        async for chunk in answer.content.iter_any():
            await response.write(chunk)
    except (aiohttp.ClientPayloadError, aiohttp.ServerTimeoutError, aiohttp.ClientConnectionError) as exc:
        if isinstance(exc, ConnectionResetError):
            raise
        log.info("upstream body broke off after the response started: %s", exc)
        return False
    return True

"""HTTP proxying with bodies streamed both ways, never held whole in memory."""

from __future__ import annotations

import asyncio
import errno
import logging
import ssl
from collections.abc import Callable
from email.utils import formatdate
from typing import NamedTuple

from aiohttp import web
from multidict import CIMultiDict

from gateway.accesslog import SENT
from gateway.errors import BadGateway, GatewayError, GatewayTimeout, ServiceUnavailable, UnsafeHeader
from gateway.metrics import Metrics
from gateway.proxy.headers import ResponseRules, downstream_response_headers
from gateway.proxy.pool import (
    REPLAYABLE_METHODS,
    Body,
    ClientBodyFailed,
    ClosedUnanswered,
    ConnectFailed,
    ConnectTimeout,
    Exchange,
    QueueTimeout,
    ReadTimeout,
    Response,
    UpstreamError,
    UpstreamPool,
)
from gateway.proxy.upstream import ConnectGrace, Upstream
from gateway.server.expect import CONTINUE, ContinuedBody

log = logging.getLogger(__name__)
_NO_BODY_STATUSES = frozenset({204, 304})
NO_RULES = ResponseRules()
SMALL_BODY = 16 << 10
"""An answer with a Content-Length up to this size is read whole and sent in one write, head and body together
(a streamed answer costs a write for the head and one per chunk)."""


class GrantEnded(Exception):
    """What let a streamed answer through no longer does (``lane.granted``): its connection is aborted mid-body,
    which tells the client the body is incomplete, and nothing buffered for it is sent on."""


class UpstreamRefused(BadGateway):
    """Nothing accepted the connection; the wake module uses this to tell a sleeping port from a broken one."""


def connect_failure(exc: OSError) -> str:
    """The ``reason`` label of ``codehub_upstream_connect_errors_total`` for a failed connect."""
    if isinstance(exc, ssl.SSLError):
        return "tls"
    return "refused" if exc.errno == errno.ECONNREFUSED else "unreachable"


def refused(upstream: Upstream, exc: OSError, metrics: Metrics) -> BadGateway:
    """A connect that failed, counted: a TLS handshake that failed (a port marked HTTPS that does not speak it),
    else nothing listening there."""
    metrics.upstream_errors.labels(connect_failure(exc)).inc()
    if isinstance(exc, ssl.SSLError):
        return BadGateway(f"Port {upstream.port} in workspace {upstream.workspace} is marked HTTPS, but the TLS "
                          "handshake with it failed: is it serving plain HTTP?", code="upstream-tls")
    return UpstreamRefused(
        f"Nothing is listening on port {upstream.port} in workspace {upstream.workspace}. "
        "Start your dev server there; this page retries by itself.",
        code="port-not-listening",
        headers={"Retry-After": "2"},
        retry=True,
    )


async def send(pool: UpstreamPool, upstream: Upstream, method: str, path: str, headers: CIMultiDict[str],
               body: Body | None, *, metrics: Metrics, connect_grace: float = 0.0) -> tuple[Response, Exchange]:
    """Send a request upstream and return the answer's head: both lanes send through here, so a failure before
    the answer is the same error in either, and is never followed by the request being sent a second time.

    ``connect_grace``: how long refused connects are retried (see ``ConnectGrace``)."""
    grace: ConnectGrace | None = None  # made on the first failure: most requests never need it
    while True:
        try:
            return await pool.request(upstream.host, upstream.port, method, path, headers, body, tls=upstream.tls)
        except ConnectFailed as exc:
            grace = grace or ConnectGrace(connect_grace)
            if not await grace.again(exc.os_error):
                raise refused(upstream, exc.os_error, metrics) from exc
        except ClosedUnanswered as exc:
            grace = grace or ConnectGrace(connect_grace)
            if not (body is None and method in REPLAYABLE_METHODS and await grace.wait()):
                raise broken_off(upstream, exc) from exc
        except ConnectTimeout as exc:
            raise connect_timed_out(upstream, metrics) from exc
        except QueueTimeout as exc:
            raise ServiceUnavailable(
                f"Port {upstream.port} in workspace {upstream.workspace} is busy: this request waited too long "
                "for a connection to it. Try again shortly.", code="upstream-busy", headers={"Retry-After": "5"},
            ) from exc
        except ReadTimeout as exc:
            raise timed_out(upstream) from exc
        except ClientBodyFailed as exc:
            if isinstance(exc.error, GatewayError):  # refused as it arrived (a malformed chunk): the client's 400
                raise exc.error from None
            raise broken_off(upstream, exc) from exc
        except UpstreamError as exc:
            raise broken_off(upstream, exc) from exc


async def proxy_http(
    request: web.Request, pool: UpstreamPool, upstream: Upstream, path: str,
    headers: CIMultiDict[str], *, metrics: Metrics, still: Callable[[], bool], connect_grace: float = 0.0,
    rules: ResponseRules = NO_RULES, send_timeout: float | None = None,
) -> web.StreamResponse:
    """Send the request upstream and stream the answer back; errors before the answer starts are raised.

    ``still``: whether what let the request through still does, asked on each piece of a streamed answer;
    ``rules``: what policy changes on the response (framing, CORS); ``send_timeout``: the longest the client may
    take nothing of a streamed answer (then its connection is closed)."""
    body: Body | None = None
    if request.body_exists:
        body = ContinuedBody(request) if request.get(CONTINUE) else request.content
    answer, exchange = await send(pool, upstream, request.method, path, headers, body, metrics=metrics,
                                  connect_grace=connect_grace)
    try:
        return await _answer(request, upstream, answer, rules, send_timeout, still)
    finally:
        exchange.close()


class Shaped(NamedTuple):
    """An upstream answer as the client gets it, whichever lane writes it."""

    headers: CIMultiDict[str]
    length: int | None  # the body's Content-Length, when the upstream gave one (else chunked or to EOF)
    bodiless: bool


def shape_answer(answer: Response, method: str, public_host: str, upstream: Upstream,
                 rules: ResponseRules) -> Shaped:
    """The framing is decided here, once for both lanes: ``Content-Length`` is written from ``length``, the
    length the lane sends the body with (the app's own header never passes: ``downstream_response_headers``), and
    without one each lane chunks the body or ends the connection after it."""
    headers = downstream_response_headers(
        answer.headers, public_host=public_host, public_origin=upstream.public_origin,
        upstream_origins=upstream.origins, replace=rules.replace, drop_cors=rules.drop_cors,
        drop_frame_options=rules.drop_frame_options, add_cookies=rules.cookies,
    )
    if "Date" not in headers:  # RFC 9110 §6.6.1: a proxy that forwards an answer without one adds when it came
        headers["Date"] = formatdate(usegmt=True)
    length = answer.content_length if "Transfer-Encoding" not in answer.headers else None
    if length is not None and answer.status != 204:  # a 204 never has one (RFC 9110 §8.6): a client that believed
        headers.add("Content-Length", str(length))  # it would read the next answer as this one's body
    bodiless = method == "HEAD" or answer.status in _NO_BODY_STATUSES  # no 1xx comes: ``Connection`` sees to it
    return Shaped(headers, length, bodiless)


async def read_small(answer: Response, length: int, upstream: Upstream) -> bytes:
    """A small body read whole before anything is written, so that a failure is still an error answer."""
    try:
        return await answer.read_exactly(length)
    except ReadTimeout as exc:
        raise timed_out(upstream) from exc
    except UpstreamError as exc:
        raise broken_off(upstream, exc) from exc


async def _answer(request: web.Request, upstream: Upstream, answer: Response,
                  rules: ResponseRules, send_timeout: float | None, still: Callable[[], bool]) -> web.StreamResponse:
    out_headers, length, bodiless = shape_answer(answer, request.method, request.headers.get("Host", ""),
                                                 upstream, rules)
    unsent = tuple(name for name in _AIOHTTP_ADDS if name not in out_headers)
    if length is not None and length <= SMALL_BODY and not bodiless:
        whole = await read_small(answer, length, upstream)
        small = web.Response(status=answer.status, reason=answer.reason, body=whole, headers=out_headers)
        small[UNSENT] = unsent
        await _prepare(small, request)
        request[SENT] = length
        try:
            async with asyncio.timeout(send_timeout):  # written whole, then waited for until the client took it
                await small.write_eof()
        except TimeoutError:
            _stalled(request)
        return small
    response = web.StreamResponse(status=answer.status, reason=answer.reason)
    response.headers.extend(out_headers)
    response[UNSENT] = unsent
    await _prepare(response, request)
    request[SENT] = 0
    try:
        complete = bodiless or await _pump(answer, request, response, send_timeout, still)
        if complete:
            async with asyncio.timeout(send_timeout):
                await response.write_eof()
    except (TimeoutError, GrantEnded):
        _stalled(request)
        return response
    if not complete and request.transport is not None:
        request.transport.close()
    return response


_AIOHTTP_ADDS = ("Content-Type", "Server")
UNSENT = web.ResponseKey("codehub_unsent", tuple[str, ...])
"""What aiohttp's head writer would add to this forwarded answer that its app did not send."""


async def as_the_app_sent_it(_request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``, which runs between aiohttp's additions and the head's write: a forwarded answer goes
    out as its app sent it, as the fast lane writes it. aiohttp adds ``Content-Type: application/octet-stream`` to a
    body without a type, which a browser would then download rather than look at, and a ``Server`` naming itself
    and its version (the app's own passes)."""
    for name in response.get(UNSENT, ()):
        response.headers.popall(name, None)


def _stalled(request: web.Request) -> None:
    """The client took nothing of its answer for ``send_timeout`` (its buffers may never drain), or may no longer
    have it (``GrantEnded``): the connection is aborted rather than closed (a close waits for the buffers), and the
    upstream exchange ends with it."""
    if request.transport is not None:
        request.transport.abort()


async def _prepare(response: web.StreamResponse, request: web.Request) -> None:
    """aiohttp's head writer refuses CR, LF and NUL with a ValueError; as in the fast lane, that is a 502."""
    try:
        await response.prepare(request)
    except ValueError as exc:
        raise UnsafeHeader from exc


def connect_timed_out(upstream: Upstream, metrics: Metrics) -> GatewayTimeout:
    metrics.upstream_errors.labels("timeout").inc()
    return GatewayTimeout(
        f"Port {upstream.port} in workspace {upstream.workspace} did not take the connection in time."
    )


def timed_out(upstream: Upstream) -> GatewayTimeout:
    return GatewayTimeout(
        f"Port {upstream.port} in workspace {upstream.workspace} accepted the request but did not answer in time."
    )


def broken_off(upstream: Upstream, exc: Exception) -> BadGateway:
    return BadGateway(
        f"Port {upstream.port} in workspace {upstream.workspace} broke off the connection: {type(exc).__name__}.",
        code="upstream-error",
    )


async def _pump(answer: Response, request: web.Request, response: web.StreamResponse, send_timeout: float | None,
                still: Callable[[], bool]) -> bool:
    """Copy the body chunk by chunk as it arrives, so SSE and long polls flow event by event.

    Returns False when the upstream broke off mid-body: the status line has gone out, so instead of an
    error page the caller closes the client connection, which tells the client the body is incomplete. Raises
    ``TimeoutError`` when the client took nothing of it for ``send_timeout``, ``GrantEnded`` when ``still`` says
    the client may no longer have it.
    """
    while True:
        try:
            chunk = await answer.read_chunk()
        except UpstreamError as exc:
            log.info("upstream body broke off after the response started: %s", exc)
            return False
        if not chunk:
            return True
        if not still():
            raise GrantEnded
        request[SENT] += len(chunk)  # handed to the connection, as the fast lane counts it
        async with asyncio.timeout(send_timeout):
            await response.write(chunk)

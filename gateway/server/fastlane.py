"""The fast lane: every connection starts here, and the plain case never touches aiohttp's request machinery.

The plain case is most of a preview's traffic: an HTTP/1.1 GET or HEAD without a body, for a RUNNING workspace,
from someone the policy lets in by session cookie, share cookie or anonymously. For those this lane reads the
request with llhttp, takes the same decisions as ``pipeline`` (``authorize``, ``forward``, ``response_rules``),
sends it through the same upstream pool and writes the answer back itself: no request, response or task
objects from aiohttp, one write for a small answer. Measured on the benchmark's path this halves the CPU a
proxied request costs.

Everything else — the hub, WebSockets, bodies, bearer tokens and share links in the URL (they count uses),
refusals and sign-in, sleeping workspaces, gateway pages, malformed or oversized requests, pipelined requests —
is handed to aiohttp before anything was sent: the connection's protocol becomes aiohttp's ``RequestHandler``
and it gets the request's bytes exactly as they arrived, so it sees what it would have seen without this lane.
An upstream that fails before answering is handed over the same way (only GET and HEAD come here, and those may
be sent again): the error page is aiohttp's to render.

The lane also keeps the client's side of the limits (``server.refusals``): a head must be whole within
``limits.head_timeout`` (else 408, here or after the hand-over), an idle connection closes after
``limits.keepalive``, and past ``limits.connections`` a new connection is answered 503 and closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, cast

import httptools
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.accesslog import AccessLog
from gateway.auth.authenticate import SHARE_PARAM, Credentials
from gateway.edge.policy import Decision
from gateway.edge.routing import Kind, Target, route
from gateway.errors import GatewayError
from gateway.lifecycle import Phase, WorkspaceState
from gateway.proxy.headers import ResponseRules
from gateway.proxy.pool import Response, UpstreamError, WriteFlow, encode_head
from gateway.proxy.upstream import Upstream
from gateway.server.context import GATEWAY, Gateway
from gateway.server.forward import SMALL_BODY, shape_answer
from gateway.server.lane import (
    asks_consent,
    authorize,
    client_facts,
    forward,
    in_use,
    peer_address,
    record,
    response_rules,
    upstream_port,
)
from gateway.server.listener import connection_limit
from gateway.server.refusals import GatewayHandler, Overloaded, Reason, Refusals, handler_settings

log = logging.getLogger(__name__)
MAX_HEAD = 16 << 10
"""A request head longer than this goes to aiohttp, whose limits (``limits.header_size`` and so on) decide."""
MAX_PARKED = 64 << 10
"""Bytes of a pipelined next request kept while one is in flight; past this, reading pauses."""
_FAST_METHODS = frozenset({b"GET", b"HEAD"})


class FrontDoor(web.Server):
    """aiohttp's server with connections that start in the fast lane; ``inner`` serves what is handed over."""

    def __init__(self, inner: web.Server, gateway: Gateway) -> None:
        super().__init__(inner.request_handler, request_factory=inner.request_factory,
                         handler_cancellation=inner.handler_cancellation)
        self.inner = inner
        self.gateway = gateway
        self.limits = gateway.config.limits
        self.access = AccessLog(logging.getLogger("codehub.access"))
        self.refusals = Refusals(gateway.metrics, self.access)
        self.lanes: set[FastLane] = set()
        self.open = 0
        """Client connections of this worker, either lane (counted when accepted: one ``accept`` burst can take
        thousands before any of them is set up)."""
        self.most = connection_limit(self.limits.connections)
        self._lingering: set[Overloaded] = set()

    def __call__(self) -> FastLane | Overloaded:  # type: ignore[override]
        if self.open >= self.most:
            return Overloaded(self.refusals, self._lingering)
        self.open += 1
        return FastLane(self)

    def release(self) -> None:
        """A client connection ended."""
        self.open -= 1

    def handler(self) -> GatewayHandler:
        """aiohttp's side of a connection handed over, with the settings aiohttp gave its own handlers."""
        return GatewayHandler(self.inner, self.refusals, self.release, loop=self._loop,
                              head_timeout=self.limits.head_timeout, **self.inner._kwargs)

    def pre_shutdown(self) -> None:
        for lane in list(self.lanes):
            lane.close_if_idle()
        self.inner.pre_shutdown()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (aiohttp's signature)
        await asyncio.gather(*(lane.finish(timeout) for lane in list(self.lanes)), self.inner.shutdown(timeout))


class GatewayRunner(web.AppRunner):
    """``AppRunner`` whose server is the ``FrontDoor``: ``serve`` and the tests both run the gateway with it, with
    aiohttp's limits and access log set from the gateway's settings."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        super().__init__(app, **(handler_settings(app[GATEWAY].config.limits) | kwargs))

    async def _make_server(self) -> web.Server:
        inner = await super()._make_server()
        return FrontDoor(inner, self.app[GATEWAY])


@dataclass(slots=True)
class _Request:
    """What one request in the fast lane carries from its head to its answer."""

    method: str
    raw_path: str
    headers: CIMultiDictProxy[str]
    target: Target
    state: WorkspaceState
    credentials: Credentials
    decision: Decision


class FastLane(WriteFlow):
    """One client connection, until it is handed to aiohttp or closed."""

    def __init__(self, front: FrontDoor) -> None:
        self._front = front
        self._gateway = front.gateway
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._raw = bytearray()  # the bytes of the request being read, for a hand-over
        self._url = bytearray()
        self._headers: list[tuple[str, str]] = []
        self._begun = 0
        self._complete = 0
        self._unfit = False  # the request being read is not for this lane
        self._task: asyncio.Task[None] | None = None
        self._parked = bytearray()  # what arrived while a request was in flight (a pipelined next request)
        self._reading = True
        self._wrote = False
        self._keep_alive = True
        self._idle_since = self._loop.time()
        self._head_since = 0.0  # when the first bytes of the request being read arrived
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._peer = "0.0.0.0"

    # --- asyncio.Protocol ---------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._peer = peer_address(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._front.lanes.add(self)
        self._arm(self._idle_since + self._front.limits.keepalive)  # a connection that never sends: as if idle

    def connection_lost(self, exc: Exception | None) -> None:
        self._front.lanes.discard(self)
        self._front.release()
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client went away: stop the upstream exchange too
        self._release_drain()
        self._transport = None

    def data_received(self, data: bytes) -> None:
        if self._task is not None:
            self._parked += data
            if len(self._parked) > MAX_PARKED and self._transport is not None:
                self._transport.pause_reading()
                self._reading = False
            return
        if not self._raw:
            self._head_since = self._loop.time()
        self._raw += data
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):  # upgrades (WebSockets) are aiohttp's
            self._hand_over()
            return
        if self._unfit or self._begun > 1 or (self._complete == 0 and len(self._raw) > MAX_HEAD):
            self._hand_over()
        elif self._complete == 1:
            self._start()
        else:  # a head arriving in pieces: it has until head_timeout
            self._arm(self._head_since + self._front.limits.head_timeout)

    def eof_received(self) -> bool:
        return False

    # --- llhttp callbacks ---------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._begun += 1

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._front.limits.request_line:
            self._unfit = True  # aiohttp refuses it (414)

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self._front.limits
        if len(name) + len(value) > limits.header_size or len(self._headers) >= limits.header_count:
            self._unfit = True  # aiohttp refuses it (431)
            return
        self._headers.append((name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        self._keep_alive = parser.should_keep_alive()  # llhttp forgets it once the message is complete
        if (parser.get_method() not in _FAST_METHODS or parser.get_http_version() != "1.1"
                or parser.should_upgrade()):
            self._unfit = True

    def on_body(self, body: bytes) -> None:
        self._unfit = True

    def on_message_complete(self) -> None:
        self._complete += 1

    # --- the lane -----------------------------------------------------------------------------------------
    def _start(self) -> None:
        """A whole request is in: serve it here, or hand it over."""
        try:
            request = self._admit()
        except Exception:  # a bug here must not cost the request: aiohttp takes it from the start
            log.exception("fast lane: admitting a request failed; handing it to aiohttp")
            request = None
        if request is None:
            self._hand_over()
            return
        self._task = self._loop.create_task(self._serve(request))

    def _admit(self) -> _Request | None:
        """The request as this lane serves it, or None when aiohttp must (see the module's docstring)."""
        headers = CIMultiDictProxy(CIMultiDict(self._headers))
        if headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in headers:
            return None
        if "Expect" in headers or headers.get("Authorization", "")[:7].lower() == "bearer ":
            return None
        raw_path = self._url.decode("utf-8", "surrogateescape")
        if SHARE_PARAM in raw_path:
            return None
        gateway = self._gateway
        if len(headers.getall("Host", ())) != 1:
            return None  # aiohttp answers 400
        try:
            target = route(headers["Host"], raw_path, gateway.hosts)
        except GatewayError:
            return None
        if target.kind not in (Kind.PREVIEW, Kind.IDE) or target.workspace is None:
            return None
        state = gateway.runtime.get(target.workspace)
        if state is None or state.phase is not Phase.RUNNING or state.address is None:
            return None
        if gateway.waker.busy(state.id, upstream_port(target, state)):
            return None
        method = self._parser.get_method().decode()
        if target.kind is Kind.PREVIEW and "Origin" in headers and "Access-Control-Request-Method" in headers:
            return None  # a CORS preflight: answered (or passed on) by pipeline
        try:
            credentials, decision = authorize(gateway, target, state, method, headers)
        except GatewayError:
            return None
        if not decision.allow or asks_consent(gateway, target, state, credentials.identity):
            return None  # a refusal, a sign-in, or a consent page to show: aiohttp's lane
        return _Request(method, raw_path, headers, target, state, credentials, decision)

    async def _serve(self, request: _Request) -> None:
        gateway = self._gateway
        target, state, credentials = request.target, request.state, request.credentials
        started = time.perf_counter()
        keep_alive = self._keep_alive
        self._wrote = False
        try:
            upstream, headers = forward(gateway, target, state, upstream_port(target, state), credentials,
                                        request.headers, client_facts(self._peer, request.headers, gateway))
            with in_use(gateway, state, credentials.identity):
                try:
                    answer, exchange = await gateway.pool.request(upstream.host, upstream.port, request.method,
                                                                  credentials.path, headers, None, tls=upstream.tls)
                except UpstreamError:
                    self._hand_over_request()  # nothing answered: aiohttp sends it again and renders what failed
                    return
                record(gateway, target, credentials.identity, request.decision)
                try:
                    sent = await self._answer(request, upstream, answer,
                                              response_rules(request.headers, gateway, target, state), keep_alive)
                except UpstreamError:
                    if not self._wrote:
                        self._hand_over_request()
                        return
                    log.info("upstream body broke off after the response started")
                    sent, keep_alive = 0, False  # closing tells the client the body is incomplete
                finally:
                    exchange.close()
        except asyncio.CancelledError:
            gateway.metrics.observe_request(target.kind.value, 499, time.perf_counter() - started)
            raise
        except Exception as exc:
            if not isinstance(exc, GatewayError):  # a refusal (a head that may not be written) is no bug of ours
                log.exception("fast lane: serving %s %s failed", request.method, request.raw_path.partition("?")[0])
            if not self._wrote:  # nothing went out: aiohttp serves it (and renders the error if it fails too)
                self._hand_over_request()
            elif self._transport is not None:
                self._transport.close()
            return
        seconds = time.perf_counter() - started
        gateway.metrics.observe_request(target.kind.value, answer.status, seconds)
        identity = credentials.identity
        self._front.access.write(remote=self._peer, method=request.method, host=request.headers.get("Host", ""),
                                 raw_path=request.raw_path, status=answer.status, length=sent, seconds=seconds,
                                 target=target, user=identity.subject if identity else None)
        self._done(keep_alive)

    async def _answer(self, request: _Request, upstream: Upstream, answer: Response, rules: ResponseRules,
                      keep_alive: bool) -> int:
        """Write the answer; returns the body bytes sent. Raises ``UpstreamError`` before the first write when
        the upstream breaks off while a small answer is being read whole."""
        out, length, bodiless = shape_answer(answer, request.method, request.headers.get("Host", ""), upstream,
                                             rules)
        chunked = not bodiless and length is None
        if chunked:
            out["Transfer-Encoding"] = "chunked"
        if not keep_alive:
            out["Connection"] = "close"
        head = encode_head(f"HTTP/1.1 {answer.status} {answer.reason}", out)
        if bodiless:
            self._write(head)
            return 0
        if length is not None and length <= SMALL_BODY:
            self._write(head + await answer.read_exactly(length))
            return length
        self._write(head)
        sent = 0
        while chunk := await answer.read_chunk():
            self._write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            sent += len(chunk)
            await self.drained(self._transport)
        if chunked:
            self._write(b"0\r\n\r\n")
        return sent

    def _write(self, data: bytes) -> None:
        self._wrote = True
        if self._transport is not None:
            self._transport.write(data)

    def _done(self, keep_alive: bool) -> None:
        """The answer is out: ready for the next request, or closed."""
        self._task = None
        if self._transport is None:
            return
        if not keep_alive:
            self._transport.close()
            return
        self._raw.clear()
        self._url.clear()
        self._headers = []
        self._begun = self._complete = 0
        self._idle_since = self._loop.time()
        if self._parked:  # pipelined: aiohttp serves the rest of this connection
            self._hand_over()

    def _hand_over_request(self) -> None:
        self._task = None
        self._hand_over()

    def _hand_over(self) -> None:
        """From here on aiohttp serves this connection, starting with the bytes of the request being read."""
        transport = self._transport
        if transport is None:
            return
        self._front.lanes.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None
        handler = self._front.handler()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if not self._reading:
            transport.resume_reading()
        if self._complete == 0:  # the head is not whole yet: its deadline goes along
            handler.expect_head(self._head_since + self._front.limits.head_timeout)
        pending = bytes(self._raw + self._parked)
        if pending:
            handler.data_received(pending)

    def _arm(self, at: float) -> None:
        """Check the connection's deadlines at ``at`` (loop time), unless a check comes sooner already: one timer
        per connection, moved only when a head arrives in pieces, not once per request."""
        if self._timer is not None:
            if self._timer_at <= at:
                return
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._check)

    def _check(self) -> None:
        """The head being read must be whole within ``head_timeout``, an idle connection closes after
        ``keepalive``; a request in flight is checked again a keep-alive period later."""
        self._timer = None
        transport = self._transport
        if transport is None:
            return
        limits = self._front.limits
        now = self._loop.time()
        if self._task is not None:
            self._arm(now + limits.keepalive)
        elif self._raw:
            if now >= self._head_since + limits.head_timeout:
                self._front.refusals.answer(transport, Reason.HEAD_TIMEOUT, seconds=now - self._head_since)
                transport.close()
            else:
                self._arm(self._head_since + limits.head_timeout)
        elif now >= self._idle_since + limits.keepalive:
            transport.close()
        else:
            self._arm(self._idle_since + limits.keepalive)

    # --- shutdown -----------------------------------------------------------------------------------------
    def close_if_idle(self) -> None:
        if self._task is None and self._transport is not None:
            self._transport.close()

    async def finish(self, within: float | None) -> None:
        """Let the request in flight finish (``within`` seconds at most), then close."""
        if self._task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(self._task), within)
            if self._task is not None:
                self._task.cancel()
        if self._transport is not None:
            self._transport.close()

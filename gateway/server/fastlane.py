"""The fast lane: every connection starts here, and the plain case never touches aiohttp's request machinery.

The plain case is most of a preview's traffic: an HTTP/1.1 GET or HEAD without a body whose plan
(``gateway.edge.plan``) is ``Forward``. For those this lane reads the request (``gateway.proxy.h1``), carries out
the plan through the upstream pool and writes the answer back itself: no request, response or task objects from
aiohttp, one write for a small answer. Measured on the benchmark's path this halves the CPU a proxied request
costs. A WebSocket upgrade whose plan is a ``Forward`` is relayed here too (``server.websocket`` has the
handshake): an idle one costs ~6 KB here, ~19 KB through aiohttp.

Every other request is handed to aiohttp before anything was sent: the connection's protocol becomes aiohttp's
``RequestHandler`` and it gets the request's bytes exactly as they arrived. When this lane made a plan, the plan
goes along (``Gateway.handed``), so nothing is decided twice — including an upstream that failed before
answering: aiohttp renders the error the plan now carries, and never sends the request again.

The lane also keeps the client's side of the limits (``server.refusals``): a head must be whole within
``limits.head_timeout`` of its first byte (else 408, here or after the hand-over: the deadline goes along), an
idle connection closes after ``limits.keepalive``, and past ``limits.connections`` a new connection is answered
503 and closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Mapping
from typing import Any, cast

from aiohttp import web
from multidict import CIMultiDictProxy

from gateway.accesslog import AccessLog, log_text
from gateway.edge.plan import Facts, Forward, Plan, Refuse, plan
from gateway.edge.routing import KIND_LABELS, Target, host_kind
from gateway.errors import GatewayError
from gateway.proxy import h1
from gateway.proxy.pool import Response, UpstreamError, WriteFlow, encode_head
from gateway.proxy.upstream import Upstream
from gateway.proxy.wshandshake import client_offer
from gateway.proxy.wsrelay import GOING_AWAY, Relay
from gateway.server.app import own_frame_headers
from gateway.server.context import GATEWAY
from gateway.server.expect import RequestFactory
from gateway.server.forward import SMALL_BODY, GrantEnded, read_small, send, shape_answer
from gateway.server.lane import (
    AnswerGrant,
    carry_out,
    connect_grace,
    granted,
    in_use,
    peer_address,
    upstream_of,
)
from gateway.server.listener import connection_limit
from gateway.server.refusals import GatewayHandler, Overloaded, Reason, Refusals, Relief, handler_settings
from gateway.server.websocket import upstream_handshake
from gateway.web.pages import error_page

log = logging.getLogger(__name__)
MAX_PARKED = 64 << 10
"""Bytes of a pipelined next request kept while one is in flight; past this, reading pauses."""


class ClientStalled(Exception):
    """The client took nothing of an answer for ``limits.send_timeout``."""


def _log_failure(method: str, target: str) -> None:
    """A bug of the gateway's while serving a request, with its traceback; the client's path escaped, as in the
    access log (it is the client's to choose)."""
    log.exception("fast lane: serving %s %s failed", log_text(method), log_text(target.partition("?")[0]))


class FastLaneServer(web.Server):
    """aiohttp's server with connections that start in the fast lane; ``inner`` serves what is handed over."""

    def __init__(self, inner: web.Server, app: web.Application) -> None:
        gateway = app[GATEWAY]
        super().__init__(inner.request_handler, request_factory=inner.request_factory,
                         handler_cancellation=inner.handler_cancellation)
        self.inner = inner
        self.gateway = gateway
        self.limits = gateway.config.limits
        self.access = AccessLog(logging.getLogger("codehub.access"))

        def framing(host: str) -> Mapping[str, str]:
            return own_frame_headers(host_kind(host, gateway.hosts), gateway)

        relief = Relief(self.limits, gateway.hosts, framing)
        self.refusals = Refusals(gateway.metrics, self.access, relief,
                                 lambda error, retry, refresh: error_page(app, error, retry=retry, refresh=refresh))
        self.lanes: set[FastLane] = set()
        self.open = 0
        """Client connections of this worker, either lane (counted when accepted: one ``accept`` burst can take
        many before any of them is set up)."""
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
    """``AppRunner`` whose server is the ``FastLaneServer``: ``serve`` and the tests both run the gateway with it,
    with aiohttp's limits and access log set from the gateway's settings."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        super().__init__(app, **(handler_settings(app[GATEWAY].config.limits) | kwargs))

    async def _make_server(self) -> web.Server:
        inner = await super()._make_server()
        inner.request_factory = RequestFactory(inner)
        return FastLaneServer(inner, self.app)


class FastLane(WriteFlow):
    """One client connection's I/O, until it is handed to aiohttp or closed; ``h1.Connection`` says what to do."""

    def __init__(self, front: FastLaneServer) -> None:
        self._front = front
        self._gateway = front.gateway
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        limits = front.limits
        self._connection = h1.Connection(max_line=limits.request_line, max_field=limits.header_size,
                                         max_headers=limits.header_count)
        self._task: asyncio.Task[None] | None = None
        self._relaying: Relay | None = None
        self._reading = True
        self._wrote = False
        self._sent = 0  # body bytes of the answer being written: its access line says how many went out
        self._idle_since = time.monotonic()
        self._head_since = self._idle_since  # when the first bytes of the head being read arrived
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
        if self._task is not None and not self._task.done() and self._relaying is None:
            self._task.cancel()  # the client went away: stop the upstream exchange too (a relay ends by itself)
        self._release_drain()
        self._transport = None

    def data_received(self, data: bytes) -> None:
        connection = self._connection
        if not connection.reading_head:
            self._head_since = time.monotonic()
        event = connection.receive(data)
        if event is not h1.NEED_DATA:
            self._act(event)
            return
        # only bytes that ask nothing yet: parked behind the request being served, or part of a head
        if connection.parked > MAX_PARKED and self._transport is not None and self._reading:
            self._transport.pause_reading()
            self._reading = False
        if connection.reading_head:  # a head arriving in pieces: it has until head_timeout
            self._arm(self._head_since + self._front.limits.head_timeout)

    def eof_received(self) -> bool:
        return False

    def _act(self, event: h1.Event) -> None:
        if isinstance(event, h1.Request):
            self._start(event)
        elif isinstance(event, h1.HandOver):
            self._hand_over(event.data, None)
        elif event is h1.CLOSE and self._transport is not None:
            self._transport.close()

    # --- the lane -----------------------------------------------------------------------------------------
    def _start(self, request: h1.Request) -> None:
        """A whole plain request is in: serve its plan here when it is a ``Forward``, else hand it over."""
        headers = request.headers
        facts = Facts(request.method, request.target, headers, self._peer, time.time())
        try:
            made = plan(facts, self._gateway)
        except Exception:  # a bug here must not cost the request: aiohttp takes it from the start
            log.exception("fast lane: planning a request failed; handing it to aiohttp")
            self._hand_over(self._connection.hand_over().data, None)
            return
        if not isinstance(made, Forward) or made.websocket != request.upgrade:
            self._hand_over(self._connection.hand_over().data, made)
            return
        serve = self._relay(facts, made) if request.upgrade else self._serve(request, headers, made)
        self._task = self._loop.create_task(serve)

    async def _serve(self, request: h1.Request, headers: CIMultiDictProxy[str], forward: Forward) -> None:
        gateway = self._gateway
        kind = KIND_LABELS[forward.target.kind] if forward.target is not None else "preview"
        started = time.perf_counter()
        keep_alive = request.keep_alive
        self._wrote, self._sent = False, 0
        carry_out(forward.effects, gateway)
        upstream = upstream_of(forward)
        try:
            with in_use(gateway, forward):
                answer, exchange = await send(gateway.pool, upstream, request.method, forward.path,
                                              forward.headers, None, metrics=gateway.metrics,
                                              connect_grace=connect_grace(gateway, forward))
                try:
                    await self._answer(request, headers, upstream, answer, forward, keep_alive)
                except UpstreamError:
                    log.info("upstream body broke off after the response started")
                    keep_alive = False  # closing tells the client the body is incomplete
                except (ClientStalled, GrantEnded):
                    keep_alive = False
                    if self._transport is not None:
                        self._transport.abort()  # closing would wait for its buffers, and send them on
                finally:
                    exchange.close()
        except asyncio.CancelledError:  # the client left (or the worker stops): mid-answer, or before it (499)
            self._account(request, headers, forward, kind, answer.status if self._wrote else 499, started)
            raise
        except Exception as exc:
            if not self._wrote:
                self._refuse_unanswered(exc, request.method, request.target, forward.target, forward.user,
                                        forward.on_error)
                return
            if not isinstance(exc, GatewayError):
                _log_failure(request.method, request.target)
            self._account(request, headers, forward, kind, answer.status, started)
            if self._transport is not None:
                self._transport.close()
            return
        self._account(request, headers, forward, kind, answer.status, started)
        # No next request before the client took this answer: one that reads none would have the worker buffer
        # every small answer (each written at once, unlooked at) for as long as it sends requests.
        if keep_alive and self._write_paused and not await self.drained(self._transport,
                                                                        self._front.limits.send_timeout):
            keep_alive = False
            if self._transport is not None:
                self._transport.abort()
        self._task = None
        self._idle_since = self._head_since = time.monotonic()
        if self._transport is not None and (event := self._connection.done(keep_alive)) is not h1.NEED_DATA:
            self._act(event)

    def _account(self, request: h1.Request, headers: CIMultiDictProxy[str], forward: Forward, kind: str, status: int,
                 started: float) -> None:
        """The request's count and access line, as it ended: answered, cut short, or left by its client."""
        seconds = time.perf_counter() - started
        self._gateway.metrics.observe_request(kind, status, seconds)
        self._front.access.write(remote=self._peer, method=request.method, host=headers.get("Host", ""),
                                 raw_path=request.target, status=status, length=self._sent, seconds=seconds,
                                 target=forward.target, user=forward.user)

    async def _relay(self, facts: Facts, forward: Forward) -> None:
        """A WebSocket: both handshakes, then the relay (``wsrelay``) has the connection; this task waits for its
        end, so the workspace is in use that long and a shutdown can wait for it (``finish``; the drain has told both
        ends 1001). Nothing of aiohttp's is kept per WebSocket: an idle one costs a few objects, and what of the
        request its grant is asked again with (``lane.granted``)."""
        gateway = self._gateway
        started = time.perf_counter()
        carry_out(forward.effects, gateway)
        method, target, headers = facts.method, facts.target, facts.headers
        host, where, user, on_error = headers.get("Host", ""), forward.target, forward.user, forward.on_error
        still = granted(gateway, facts, forward)
        with in_use(gateway, forward):
            try:
                upstream, tail, accepted = await upstream_handshake(
                    upstream_of(forward), forward.path, forward.headers, client_offer(headers),
                    gateway.config.timeouts, gateway.metrics, connect_grace(gateway, forward))
            except Exception as exc:
                self._refuse_unanswered(exc, method, target, where, user, on_error)
                return
            del forward, facts, headers  # what the grant is asked again with is kept by ``still``, cut down
            client = self._transport
            if client is None:  # the client left during the upstream's handshake
                upstream.abort()
                return
            client.write(encode_head("HTTP/1.1 101 Switching Protocols", accepted))
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            relay = self._relaying = Relay(client, upstream, max_message=gateway.config.max_ws_message,
                                           heartbeat=gateway.heartbeat, client_protocol=self, granted=still)
            relay.start(self._connection.switch(), tail)
            del tail
            if not self._reading:  # early bytes past MAX_PARKED paused it during the upstream's handshake
                client.resume_reading()
            gateway.metrics.websockets.inc()
            try:
                await relay.done
            finally:
                gateway.metrics.websockets.dec()
                if not relay.done.done():  # cancelled: the gateway shuts down
                    relay.end(GOING_AWAY)
                self._front.access.write(remote=self._peer, method=method, host=host, raw_path=target, status=101,
                                         length=0, seconds=time.perf_counter() - started, target=where, user=user)

    def _refuse_unanswered(self, exc: Exception, method: str, target: str, where: Target | None,
                           user: str | None, on_error: dict[str, str]) -> None:
        """Nothing went out: aiohttp renders the error as this request's plan (its effects were carried out).
        The request itself may have reached the upstream, so it is not sent again, bug or not."""
        if not isinstance(exc, GatewayError):
            _log_failure(method, target)
        error = exc if isinstance(exc, GatewayError) else GatewayError(
            "The gateway hit an unexpected error; it has been logged.")
        error.headers.update(on_error)
        self._task = None
        self._hand_over(self._connection.hand_over().data, Refuse(error=error, target=where, user=user))

    async def _answer(self, request: h1.Request, headers: CIMultiDictProxy[str], upstream: Upstream,
                      answer: Response, forward: Forward, keep_alive: bool) -> None:
        """Write the answer, counting its body bytes in ``_sent`` as they go out. Raises a ``GatewayError`` before
        the first write when the upstream breaks off while a small answer is being read whole."""
        out, length, bodiless = shape_answer(answer, request.method, headers.get("Host", ""), upstream,
                                             forward.rules)
        chunked = not bodiless and length is None
        if chunked:
            out["Transfer-Encoding"] = "chunked"
        if not keep_alive:
            out["Connection"] = "close"
        head = encode_head(f"HTTP/1.1 {answer.status} {answer.reason}", out)
        if bodiless:
            self._write(head)
            return
        if length is not None and length <= SMALL_BODY:
            self._write(head + await read_small(answer, length, upstream))
            self._sent = length
            return
        self._write(head)
        within = self._front.limits.send_timeout
        still = AnswerGrant(self._gateway, Facts(request.method, request.target, headers, self._peer, 0.0), forward)
        while chunk := await answer.read_chunk():
            if not still():
                raise GrantEnded
            self._write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            self._sent += len(chunk)
            if not await self.drained(self._transport, within):  # the client takes nothing: let it all go
                raise ClientStalled
        if chunked:
            self._write(b"0\r\n\r\n")

    def _write(self, data: bytes) -> None:
        self._wrote = True
        if self._transport is not None:
            self._transport.write(data)

    def _hand_over(self, data: bytes, made: Plan | None) -> None:
        """From here on aiohttp serves this connection, starting with ``data``; ``made``, the plan of its first
        request, goes along."""
        transport = self._transport
        if transport is None:
            return
        self._front.lanes.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None
        if made is not None:
            self._gateway.handed[transport] = made
        handler = self._front.handler()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if not self._reading:
            transport.resume_reading()
        # The head's deadline goes along; aiohttp's side drops it as soon as it has read a whole head.
        handler.expect_head(self._head_since + self._front.limits.head_timeout)
        if data:
            handler.data_received(data)

    def _arm(self, at: float) -> None:
        """Check the connection's deadlines at ``at`` (``time.monotonic``, a call less per request than the loop's
        clock: uvloop's reads the same monotonic clock, to the millisecond, once per loop turn), unless a check
        comes sooner already: one timer per connection, moved only when a head arrives in pieces, not once per
        request. A check a millisecond early finds the deadline not yet passed and looks again."""
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
        now = time.monotonic()
        if self._task is not None:
            self._arm(now + limits.keepalive)
        elif self._connection.reading_head:
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

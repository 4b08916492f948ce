"""WebSocket proxying: the upstream handshake first (so failures still get a proper HTTP error), then the
client's, then the relay of raw frames (``wsrelay``) for as long as the WebSocket lives.

``upstream_handshake`` is both lanes'. A WebSocket that starts a connection, as a browser's does, is the fast
lane's (``server.fastlane``): it writes the 101 itself and keeps nothing of the request, ~6 KB per idle
WebSocket. ``relay_websocket`` is aiohttp's lane, for an upgrade held through a wake or arriving on a connection
aiohttp already serves. How the client's connection leaves aiohttp (3.14's ``web_protocol``):

- The 101 goes out as an ordinary prepared ``StreamResponse``, so ``on_response_prepare`` hooks run.
- Then the transport is switched to the relay's protocol (``transport.set_protocol``). aiohttp's
  ``RequestHandler`` stays registered with its server for the WebSocket's life; that is what makes a shutdown
  reach the relay: the server waits for the handler, then cancels it, and the cancellation closes both ends
  with 1001. The relay passes ``connection_lost`` on to the ``RequestHandler``, so aiohttp forgets the
  connection when it ends and cancels the handler if the client vanished. A cancelled handler gets no access
  line from aiohttp, so the relay's end writes it (``accesslog.WRITTEN``).
- ``set_parser``, the hook aiohttp's own ``WebSocketResponse`` uses, hands over the bytes aiohttp had already
  read past the request. Keep-alive is switched off, so once the handler returns aiohttp only closes the
  transport: it never parses on this connection again, and its llhttp parser and pipelining queue are dropped
  right away (aiohttp itself drops them only in ``connection_lost``) instead of being kept for the WebSocket's
  life.

The handler coroutine waits until the relay is over, since the caller counts the workspace as in use for
exactly that long. Its frames keep the parsed request: ~19 KB per idle WebSocket in this lane.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict

from gateway.accesslog import WRITTEN, AccessLog
from gateway.config import Timeouts
from gateway.errors import GatewayTimeout
from gateway.metrics import Metrics
from gateway.proxy.connection import BrokenOff, ConnectTimeout, HeadTimeout
from gateway.proxy.heartbeat import Heartbeat
from gateway.proxy.upstream import ConnectGrace, Upstream
from gateway.proxy.wshandshake import (
    Answer,
    Offer,
    accept_value,
    ask_upstream,
    chosen_protocol,
    client_offer,
    new_key,
    upgrade_request,
)
from gateway.proxy.wsrelay import GOING_AWAY, Relay
from gateway.server.forward import broken_off, connect_timed_out, refused


async def _connect(upstream: Upstream, request: bytes, timeouts: Timeouts, metrics: Metrics,
                   connect_grace: float) -> tuple[asyncio.Transport, Answer]:
    """The upstream's answer to the upgrade request; a refused connect is retried within ``connect_grace``."""
    grace = ConnectGrace(connect_grace)
    while True:
        try:
            return await ask_upstream(upstream.host, upstream.port, request, connect_timeout=timeouts.connect,
                                      read_timeout=timeouts.first_byte, tls=upstream.tls)
        except ConnectTimeout as exc:
            raise connect_timed_out(upstream, metrics) from exc
        except HeadTimeout as exc:
            metrics.upstream_fault(exc.fault)
            raise GatewayTimeout(
                f"Port {upstream.port} in workspace {upstream.workspace} did not answer the WebSocket in time."
            ) from exc
        except BrokenOff as exc:  # connected, then it broke off or did not speak HTTP
            if exc.fault is not None:
                metrics.upstream_fault(exc.fault)
            raise broken_off(upstream, exc) from exc
        except OSError as exc:  # the connect failed: nothing was sent
            if not await grace.again(exc):
                raise refused(upstream, exc, metrics) from exc


async def upstream_handshake(upstream: Upstream, path: str, headers: CIMultiDict[str], offer: Offer,
                             timeouts: Timeouts, metrics: Metrics, connect_grace: float
                             ) -> tuple[asyncio.Transport, bytes, dict[str, str]]:
    """The upstream's side, first (so a failure is still an HTTP error): its transport (reading paused), what it
    sent past its 101, and the headers of the 101 the client is to get. Either lane answers the client."""
    key = new_key()
    transport, answer = await _connect(upstream, upgrade_request(path, headers, key, offer.protocols), timeouts,
                                       metrics, connect_grace)
    try:
        protocol = chosen_protocol(answer, key, offer.protocols, upstream)
    except BaseException:
        transport.abort()
        raise
    return transport, answer.tail, {
        "Upgrade": "websocket", "Connection": "upgrade", "Sec-WebSocket-Accept": accept_value(offer.key),
        **({"Sec-WebSocket-Protocol": protocol} if protocol else {}),
    }


async def _handshakes(request: web.Request, upstream: Upstream, path: str, headers: CIMultiDict[str],
                      timeouts: Timeouts, metrics: Metrics, connect_grace: float
                      ) -> tuple[asyncio.Transport, bytes, web.StreamResponse]:
    """Both handshakes; returns the upstream's transport (reading paused), what it sent past its answer, and the
    101 the client got."""
    transport, tail, accepted = await upstream_handshake(upstream, path, headers, client_offer(request.headers),
                                                         timeouts, metrics, connect_grace)
    try:
        response = web.StreamResponse(status=101, headers=accepted)
        await response.prepare(request)
        if request.transport is None or request.transport.is_closing():
            raise ConnectionResetError("the client left during the handshake")
    except BaseException:
        transport.abort()
        raise
    return transport, tail, response


class _Leftover:
    """Takes, through ``RequestHandler.set_parser``, the bytes aiohttp read past the upgrade request."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data = b""

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.data += data
        return False, b""

    def feed_eof(self) -> None:
        """aiohttp calls this from ``connection_lost``; the relay has seen the end by then."""


def _retire(handler: RequestHandler) -> bytes:
    """Leave aiohttp's protocol registered but idle (see the module docstring); returns what it had read on."""
    handler.keep_alive(False)  # also cancels its keep-alive timer
    leftover = _Leftover()
    handler.set_parser(leftover)  # type: ignore[arg-type]  # any object with feed_data and feed_eof
    handler._parser = None
    handler._messages = ()  # type: ignore[assignment]  # only ever tested for emptiness from here on
    return leftover.data


async def relay_websocket(
    request: web.Request, upstream: Upstream, path: str, headers: CIMultiDict[str], *, max_message: int,
    heartbeat: Heartbeat, timeouts: Timeouts, metrics: Metrics, granted: Callable[[], bool],
    connect_grace: float = 0.0,
) -> web.StreamResponse:
    """Relay the WebSocket ``request`` asks for to ``upstream``; returns (the 101) once it is closed.

    ``granted``: whether what let it in still does (``Relay.granted``); ``connect_grace``: how long refused connects
    are retried (see ``ConnectGrace``)."""
    started = time.perf_counter()
    transport, upstream_tail, response = await _handshakes(request, upstream, path, headers, timeouts, metrics,
                                                           connect_grace)
    client, handler = request.transport, request.protocol
    assert client is not None
    relay = Relay(client, transport, max_message=max_message, heartbeat=heartbeat,
                  client_protocol=handler, granted=granted)
    relay.start(_retire(handler), upstream_tail)
    del upstream_tail
    response.headers.clear()  # they went out with the 101; aiohttp's access log reads only the status
    metrics.websockets.inc()
    try:
        await relay.done
    finally:
        metrics.websockets.dec()
        if not relay.done.done():  # cancelled: the gateway shuts down, or the client's connection dropped
            relay.end(GOING_AWAY)
        request[WRITTEN] = True
        AccessLog(logging.getLogger("codehub.access")).write_request(
            request, status=101, length=0, seconds=time.perf_counter() - started)
    return response

"""WebSocket relay: upstream handshake first (so failures still get a proper HTTP error), then frames both
ways with backpressure, subprotocol negotiation passed through and close codes carried across."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from gateway.errors import BadGateway
from gateway.metrics import Metrics
from gateway.proxy.http import refused
from gateway.proxy.upstream import ConnectGrace, Upstream

_UNSENDABLE_CODES = frozenset({1005, 1006, 1015})
AnyWebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


def offered_protocols(request: web.BaseRequest) -> tuple[str, ...]:
    header = ",".join(request.headers.getall("Sec-WebSocket-Protocol", ()))
    return tuple(token.strip() for token in header.split(",") if token.strip())


def _close_code(code: int | None) -> int:
    if code is None or code == 1005:
        return WSCloseCode.OK
    if code in _UNSENDABLE_CODES:
        return WSCloseCode.INTERNAL_ERROR
    return code


async def _forward(source: AnyWebSocket, sink: AnyWebSocket) -> None:
    """Copy messages until ``source`` closes; each send waits for the sink to drain (backpressure)."""
    async for message in source:
        if message.type is WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif message.type is WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        elif message.type is WSMsgType.ERROR:
            break


async def _pipe(source: AnyWebSocket, sink: AnyWebSocket) -> None:
    """Forward, then close the sink with the code the source closed with (close() breaks a pending receive)."""
    await _forward(source, sink)
    await sink.close(code=_close_code(source.close_code))


async def _connect(
    session: aiohttp.ClientSession, url: URL, headers: CIMultiDict[str], protocols: tuple[str, ...],
    max_message: int, upstream: Upstream,
) -> aiohttp.ClientWebSocketResponse:
    """The upstream handshake; a refused connect is raised as is (the caller may retry it)."""
    try:
        return await session.ws_connect(
            url, headers=headers, protocols=protocols, autoping=True, compress=0, max_msg_size=max_message,
        )
    except aiohttp.ClientConnectorError:
        raise
    except aiohttp.WSServerHandshakeError as exc:
        raise BadGateway(
            f"Port {upstream.port} in workspace {upstream.workspace} refused the WebSocket ({exc.status}).",
            code="websocket-refused",
        ) from exc
    except aiohttp.ClientError as exc:
        raise BadGateway(f"The WebSocket to port {upstream.port} failed: {type(exc).__name__}.") from exc


async def relay_websocket(
    request: web.Request, session: aiohttp.ClientSession, upstream: Upstream, path: str,
    headers: CIMultiDict[str], *, max_message: int, heartbeat: float, metrics: Metrics, connect_grace: float = 0.0,
) -> web.WebSocketResponse:
    url = URL(upstream.origin.replace("http://", "ws://", 1) + path, encoded=True)
    grace = ConnectGrace(connect_grace)
    while True:
        try:
            remote = await _connect(session, url, headers, offered_protocols(request), max_message, upstream)
            break
        except aiohttp.ClientConnectorError as exc:
            if not await grace.again(exc.os_error):
                raise refused(upstream, exc.os_error, metrics) from exc
    local = web.WebSocketResponse(
        protocols=(remote.protocol,) if remote.protocol else (), autoping=True, compress=False,
        max_msg_size=max_message, heartbeat=heartbeat,
    )
    metrics.websockets.inc()
    upward: asyncio.Future[None] | None = None
    try:
        await local.prepare(request)
        upward = asyncio.ensure_future(_pipe(local, remote))
        await _pipe(remote, local)
        await upward
    finally:
        metrics.websockets.dec()
        if upward is not None and not upward.done():
            upward.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await upward
        # The handler is cancelled as soon as the client's connection drops, which can be in the middle of
        # passing its close on: the upstream still gets the client's code (or "going away"), never a bare 1000.
        code = _close_code(local.close_code) if local.close_code is not None else WSCloseCode.GOING_AWAY
        with contextlib.suppress(Exception):
            await remote.close(code=code)
    return local

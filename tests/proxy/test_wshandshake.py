"""The upstream side of a WebSocket upgrade, against a real socket on loopback."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from multidict import CIMultiDict

from gateway.errors import BadRequest
from gateway.proxy.connection import HeadTimeout
from gateway.proxy.wshandshake import Offer, ask_upstream, client_offer

pytestmark = pytest.mark.timeout(30)

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3's example
OFFER = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": KEY}


@pytest.mark.parametrize(
    ("changed", "expected"),
    [
        ({}, Offer(KEY, ())),
        ({"Upgrade": " WebSocket "}, Offer(KEY, ())),
        ({"Sec-WebSocket-Protocol": "chat.v1, , chat.v2"}, Offer(KEY, ("chat.v1", "chat.v2"))),
        ({"Upgrade": "h2c"}, "This address only upgrades to WebSocket."),
        ({"Upgrade": None}, "This address only upgrades to WebSocket."),
        ({"Upgrade": "websocket, h2c"}, "This address only upgrades to WebSocket."),
        ({"Connection": "keep-alive"}, "A WebSocket upgrade needs 'Connection: Upgrade'."),
        ({"Sec-WebSocket-Version": "14"}, "Unsupported WebSocket version; 13 is spoken here."),
        ({"Sec-WebSocket-Key": "c2hvcnQ="}, "The WebSocket key is not 16 bytes in base64."),
        ({"Content-Length": "0"}, Offer(KEY, ())),
        ({"Content-Length": "000"}, Offer(KEY, ())),
        ({"Content-Length": "5"}, "A WebSocket handshake has no body."),
        ({"Content-Length": "010"}, "A WebSocket handshake has no body."),
        ({"Transfer-Encoding": "chunked"}, "A WebSocket handshake has no body."),
    ],
)
def test_a_clients_offer_is_read_or_refused_as_a_400(changed: dict[str, str | None], expected: Offer | str) -> None:
    """``client_offer`` is the whole check of a client's handshake, whoever calls it: an upgrade to anything but
    WebSocket is refused here too, not only by the plan that routes upgrades."""
    fields = {**OFFER, **changed}
    headers = CIMultiDict((name, value) for name, value in fields.items() if value is not None)
    if isinstance(expected, Offer):
        assert client_offer(headers) == expected
        return
    with pytest.raises(BadRequest) as refused:
        client_offer(headers)
    assert (refused.value.code, refused.value.message) == ("websocket-handshake", expected)


async def test_an_upgrade_that_gets_no_answer_in_time_closes_its_connection() -> None:
    """An app that accepts the upgrade's connection and never answers holds a socket of the gateway's for as long
    as the connection lives: the gateway gives up after ``read_timeout`` and closes it, so the app sees it end."""
    seen: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    ended = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.set_result(await reader.readuntil(b"\r\n\r\n"))
        with contextlib.suppress(ConnectionError):
            await reader.read()  # until the gateway's end closes
        ended.set()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(HeadTimeout):
            await ask_upstream("127.0.0.1", port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", connect_timeout=5,
                               read_timeout=0.2)
        assert (await seen).startswith(b"GET / HTTP/1.1")
        await asyncio.wait_for(ended.wait(), 5)
    finally:
        server.close()
        await server.wait_closed()


class _Collector(asyncio.Protocol):
    """What the relay would read once it has the connection."""

    def __init__(self) -> None:
        self.data = b""
        self.ended = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> None:
        self.ended.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended.done():
            self.ended.set_result(None)


async def test_what_the_upstream_sends_after_its_101_waits_for_the_relay() -> None:
    """The answer comes back with reading paused: a frame the app sends right after its 101, before the relay
    has taken the connection over, is read by the relay, not by the handshake's reader (which would drop it)."""
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    sent, closed = asyncio.Event(), asyncio.Event()

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        assert request.startswith(b"GET /ws HTTP/1.1")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")
        await writer.drain()
        await sent.wait()  # the gateway has its answer: now the first frame, and the end
        writer.write(b"\x81\x05hello")
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        closed.set()

    server = await asyncio.start_server(app, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        transport, answer = await ask_upstream(
            "127.0.0.1", port, f"GET /ws HTTP/1.1\r\nHost: x\r\nSec-WebSocket-Key: {key}\r\n\r\n".encode(),
            connect_timeout=5, read_timeout=5)
        try:
            assert (answer.status, answer.tail) == (101, b"")
            sent.set()
            await asyncio.wait_for(closed.wait(), 5)  # the app has sent its frame and closed
            relay = _Collector()
            transport.set_protocol(relay)
            transport.resume_reading()
            await asyncio.wait_for(relay.ended, 5)
            assert relay.data == b"\x81\x05hello"
        finally:
            transport.abort()
    finally:
        server.close()
        await server.wait_closed()

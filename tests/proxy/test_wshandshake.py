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

"""The upstream side of a WebSocket upgrade, against a real socket on loopback."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from gateway.proxy.connection import HeadTimeout
from gateway.proxy.wshandshake import ask_upstream

pytestmark = pytest.mark.timeout(30)


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

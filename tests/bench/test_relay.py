"""The benchmark's bare relay (``bench.relay``), the floor the page-load part measures proxies against: it must
copy both ways, and close the client when the upstream cannot be reached (a page load would hang otherwise)."""

from __future__ import annotations

import asyncio
import socket

from aiohttp import web

from bench.relay import _Client
from tests.conftest import MakeUpstream, next_address


async def _relay(upstream: tuple[str, int]) -> tuple[asyncio.Server, int]:
    server = await asyncio.get_running_loop().create_server(lambda: _Client(upstream), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_requests_and_answers_pass_through(make_upstream: MakeUpstream) -> None:
    async def echo(request: web.Request) -> web.Response:
        return web.Response(text=f"{request.path} {request.headers['X-Probe']}")

    app = web.Application()
    app.router.add_get("/{name}", echo)
    address = next_address()
    upstream = await make_upstream(app, address, 0)
    assert upstream.port is not None
    server, port = await _relay((address, upstream.port))
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for name in ("first", "second"):  # one kept-alive connection, sent at once (before the upstream is up)
                writer.write(f"GET /{name} HTTP/1.1\r\nHost: x\r\nX-Probe: {name}!\r\n\r\n".encode())
            body = b""
            while b"/second second!" not in body:
                body += await reader.read(4096)
            assert b"/first first!" in body
            writer.close()
    finally:
        server.close()


async def test_a_client_is_closed_when_the_upstream_refuses() -> None:
    address = next_address()
    with socket.socket() as unused:
        unused.bind((address, 0))
        refused = unused.getsockname()[1]  # nobody listens there once the socket is closed
    server, port = await _relay((address, refused))
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await reader.read() == b""  # closed, not left hanging
            writer.close()
    finally:
        server.close()

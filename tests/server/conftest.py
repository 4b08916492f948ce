"""Fixtures for the core proxy tests: a real upstream on a workspace's loopback address behind a real gateway.

The workspace is kept by a ``MemoryRuntime`` (no process: these tests are about proxying) and woken before the
test starts, so every request goes the whole way: plan → lane → upstream pool → the upstream the test defined.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from aiohttp.client import _RequestContextManager
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict

from gateway.auth.identity import Identity
from gateway.server.context import GATEWAY, Gateway
from tests.conftest import MakeGateway, MakeUpstream, next_address, scrape, workspace

PREVIEW_DOMAIN = "localhost:8080"
HUB = "localhost:8080"
WORKSPACE = "ws1"
IDE = f"ide-{WORKSPACE}.{PREVIEW_DOMAIN}"
OWNER = "alice"
NO_TRACES = ("Traceback", 'File "', "Error:", "site-packages")


def free_port(address: str) -> int:
    """A port on ``address`` that nothing listens on (bound once by the kernel, then released)."""
    with socket.socket() as sock:
        sock.bind((address, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Proxied:
    """A gateway in front of one workspace port, and how a client addresses it."""

    client: TestClient[web.Request, web.Application]
    address: str
    port: int
    workspace: str = WORKSPACE
    upstream: TestServer | None = None

    @property
    def host(self) -> str:
        return f"{self.port}-{self.workspace}.{PREVIEW_DOMAIN}"

    @property
    def share_origin(self) -> str:
        return f"http://{self.host}"

    @property
    def upstream_origin(self) -> str:
        return f"http://{self.address}:{self.port}"

    @property
    def gateway(self) -> Gateway:
        return self.client.app[GATEWAY]

    def request(self, method: str, path: str, *, host: str | None = None, **kwargs: Any
                ) -> _RequestContextManager:
        """A request to the share URL (the Host header picks the workspace port, as a browser's would).

        Requests to the IDE carry the owner's session cookie unless the test sets its own cookies: these tests
        are about proxying, the sign-in tests live in tests/auth.
        """
        headers = CIMultiDict(kwargs.pop("headers", {}))
        headers["Host"] = host or self.host
        if headers["Host"] == IDE and "Cookie" not in headers:
            token = self.gateway.auth.sessions.issue(Identity(OWNER), IDE)
            headers["Cookie"] = f"codehub_session={token}"
        return self.client.request(method, path, headers=headers, allow_redirects=False, **kwargs)

    async def metrics(self) -> str:
        """A scrape of the metrics listener (``metrics.port``) in front of this gateway's registry."""
        return await scrape(self.client.app)


MakeProxied = Callable[..., Awaitable[Proxied]]


@pytest.fixture
async def proxied(make_gateway: MakeGateway, make_upstream: MakeUpstream) -> MakeProxied:
    """``await proxied(app)``: start ``app`` on a fresh workspace address, a gateway in front, workspace awake.

    ``app=None`` leaves the port empty (connection refused); ``ide=True`` makes the port the workspace's IDE,
    ``visibility`` sets the port's (public); other keyword arguments are gateway settings.
    """

    async def make(app: web.Application | None, *, ide: bool = False, visibility: str = "public",
                   **config: Any) -> Proxied:
        address = next_address()
        upstream = await make_upstream(app, address, 0) if app is not None else None
        port = upstream.port if upstream is not None else free_port(address)
        assert port is not None
        extra: dict[str, Any] = {"ide_port": port} if ide else {"ports": {port: visibility}}
        client = await make_gateway(workspaces={WORKSPACE: workspace(address, **extra)}, in_memory=True, **config)
        await client.app[GATEWAY].runtime.wake(WORKSPACE)
        return Proxied(client, address, port, upstream=upstream)

    return make


def listening_later(p: Proxied, make_upstream: MakeUpstream, app: web.Application,
                    after: float = 0.3) -> asyncio.Task[None]:
    """``app`` starts listening on the proxied port ``after`` seconds from now, while the gateway already believes
    the workspace woke (what a dev server behind a throwaway listener looks like)."""
    async def later() -> None:
        await asyncio.sleep(after)
        await make_upstream(app, p.address, p.port)

    return asyncio.create_task(later())


@contextlib.asynccontextmanager
async def raw_upstream(p: Proxied, serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
                       ) -> AsyncIterator[None]:
    """A raw upstream, ``serve`` for each connection, on the workspace's port while the block runs."""
    server = await asyncio.start_server(serve, p.address, p.port)
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


async def sent_raw(p: Proxied, data: bytes) -> bytes:
    """What the gateway sends back for ``data`` written as it is on a connection of its own, read until the gateway
    closes it (bounded in time)."""
    reader, writer = await asyncio.open_connection(p.client.host, p.client.port)
    try:
        writer.write(data)
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


async def read_until(response: ClientResponse, marker: bytes, limit: float = 10.0) -> bytes:
    """Read a streamed body until ``marker`` has arrived (bounded in time), returning what was read."""
    seen = b""
    async with asyncio.timeout(limit):
        while marker not in seen:
            chunk = await response.content.readany()
            assert chunk, f"body ended before {marker!r}; got {seen!r}"
            seen += chunk
    return seen


async def three_chunks(request: web.Request) -> web.StreamResponse:
    """An answer in three chunks, ``alpha beta gamma``: one the gateway must frame again as it streams it."""
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    for piece in (b"alpha ", b"beta ", b"gamma"):
        await response.write(piece)
    await response.write_eof()
    return response


async def access_line(caplog: pytest.LogCaptureFixture, path: str) -> dict[str, Any]:
    """The access line of the request to ``path`` (written once the answer is out: a bounded wait)."""
    lines: list[dict[str, Any]] = []
    async with asyncio.timeout(10):
        while not (lines := [json.loads(r.getMessage()) for r in caplog.records  # noqa: ASYNC110 - log records
                             if r.name == "codehub.access" and f'"path":"{path}"' in r.getMessage()]):
            await asyncio.sleep(0.01)
    [line] = lines
    return line

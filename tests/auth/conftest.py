"""Fixtures for the sign-in and access-control tests: a gateway on a real loopback port, echo upstreams inside
its workspaces, scripted browsers, and (for the OIDC tests) a real IdP from ``tests/peers/idp``.

The gateway listens on a port chosen up front, so its ``hub_url`` (``http://localhost:PORT``) is the address the
IdP's redirect really reaches. Workspaces are woken before each test so browser navigations see the app, not the
waiting page.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config import Config
from gateway.server.app import build_app
from gateway.server.context import GATEWAY, Gateway
from tests.auth.browser import Browser
from tests.conftest import GatewayTestServer, MakeUpstream, next_address, settings, workspace
from tests.peers.idp import fixture as idp_fixture
from tests.peers.idp.fixture import IdP, free_loopback_port

idp = idp_fixture.idp  # the real IdP (pytest fixture), only for tests in this directory
TIMEOUT = aiohttp.ClientTimeout(total=20)


def echo_app() -> web.Application:
    """An upstream that answers with what it received; ``?set_cookie=...`` makes it send Set-Cookie headers;
    ``/events`` is an event stream that never ends (an event every 50 ms)."""

    async def events(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for count in itertools.count():
            await response.write(f"data: {count}\n\n".encode())
            await asyncio.sleep(0.05)
        return response  # never: the client, or the gateway, leaves first

    async def echo(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            socket = web.WebSocketResponse()
            await socket.prepare(request)
            async for message in socket:
                await socket.send_str(f"echo:{message.data}")
            return socket
        body = {"method": request.method, "path": request.raw_path,
                "headers": [[name, value] for name, value in request.headers.items()]}
        response = web.json_response(body)
        for value in request.query.getall("set_cookie", ()):
            response.headers.add("Set-Cookie", value)
        return response

    app = web.Application()
    app.router.add_route("*", "/events", events)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def seen_headers(page_json: dict[str, Any]) -> dict[str, list[str]]:
    """Header name (lower case) → values, as the echo upstream received them."""
    out: dict[str, list[str]] = {}
    for name, value in page_json["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


@dataclass
class Served:
    """A running gateway: its state, its test server and its public names."""

    gateway: Gateway
    server: TestServer
    config: Config

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def hub(self) -> str:
        return self.gateway.hosts.hub_url("")

    @property
    def domains(self) -> tuple[str, ...]:
        return (self.gateway.hosts.hub.removesuffix(":80").removesuffix(":443"),
                self.gateway.config.preview_domain)

    def preview(self, ws: str, port: int, path: str = "/") -> str:
        return self.gateway.hosts.share_url(ws, port, path)

    def ide(self, ws: str, path: str = "/") -> str:
        return self.gateway.hosts.ide_url(ws, path)


Serve = Callable[..., Awaitable[Served]]
MakeBrowser = Callable[..., Awaitable[Browser]]


@pytest.fixture
def gateway_port() -> int:
    return free_loopback_port()


@pytest.fixture
def idp_redirect_uris(gateway_port: int) -> list[str]:
    """Read by the ``idp`` fixture: the gateway's callback, at the name and port it really listens on."""
    return [f"http://localhost:{gateway_port}/auth/callback"]


@pytest.fixture
async def serve(make_upstream: MakeUpstream, tmp_path: Path) -> AsyncIterator[Serve]:
    """Start a gateway for ``workspaces`` ({id: {"owner", "ports": {port: visibility}, ...}}) with echo upstreams
    on every listed port (plus ``listen``), woken up; extra keyword arguments are settings.

    It runs behind the ``FastLaneServer`` as ``serve`` does, so plain GETs take the fast lane and everything else
    aiohttp's: a test that sends both exercises both lanes."""
    servers: list[TestServer] = []

    async def start(workspaces: dict[str, dict[str, Any]], *, port: int | None = None,
                    listen: dict[str, list[int]] | None = None, **extra: Any) -> Served:
        spec = {}
        upstream_ports: dict[str, set[int]] = {}
        for ws, options in workspaces.items():
            options = dict(options)
            address = options.pop("address", None) or next_address()
            spec[ws] = workspace(address, **options)
            upstream_ports[ws] = set(options.get("ports", {})) | set((listen or {}).get(ws, ()))
        config = settings(tmp_path, spec, **extra)
        app = build_app(config)
        server = GatewayTestServer(app, host="127.0.0.1", port=port or 0)
        await server.start_server()
        servers.append(server)
        gateway = app[GATEWAY]
        for ws, ports in upstream_ports.items():
            address = spec[ws]["address"]
            for upstream_port in sorted(ports):
                await make_upstream(echo_app(), address, upstream_port)
            await gateway.runtime.wake(ws)
        return Served(gateway, server, config)

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def make_browser() -> AsyncIterator[MakeBrowser]:
    sessions: list[aiohttp.ClientSession] = []

    async def make(served: Served, *, login: str = "alice", idp: IdP | None = None) -> Browser:
        http = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), timeout=TIMEOUT, auto_decompress=True)
        sessions.append(http)
        idp_http = None
        if idp is not None:
            idp_http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), timeout=TIMEOUT)
            sessions.append(idp_http)
        return Browser(http, served.base, served.domains, idp_http=idp_http,
                       idp_issuer=idp.issuer if idp else None, login=login)

    yield make
    for session in sessions:
        await session.close()


def oidc_settings(idp: IdP, port: int) -> dict[str, Any]:
    return {
        "hub_url": f"http://localhost:{port}",
        "preview_domain": f"localhost:{port}",
        "auth": {"mode": "oidc", "oidc": {"issuer": idp.issuer, "client_id": idp.client_id,
                                          "client_secret": idp.client_secret}},
    }

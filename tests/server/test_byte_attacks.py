"""Byte-level attacks on both sides of the proxy (a client on the internet, a hostile workspace app on its raw
socket) that earlier passes (``test_parse_attacks``, ``test_request_attacks``, ``test_upstream_faults``) left:
each test shows the harm on a real gateway in front of real sockets on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from aiohttp import web
from multidict import CIMultiDict

from gateway.auth.identity import Identity
from gateway.proxy.pool import MOST_QUIET_UPSTREAMS, ConnectFailed, UpstreamPool
from gateway.server.context import GATEWAY
from tests.conftest import MakeGateway, MakeUpstream, next_address, workspace
from tests.server.conftest import OWNER, PREVIEW_DOMAIN, WORKSPACE, MakeProxied
from tests.server.test_hostile_input import read_answer


async def test_an_owner_cannot_grow_the_pool_with_a_request_per_port_number(make_gateway: MakeGateway) -> None:
    """The pool knows each upstream it was asked for (address, port) by its line and window of connects, ~2 KB
    each, and knew it for good: a workspace's owner, who may reach every port of their own workspace, sent one
    request to each of its 65,535 port numbers (nothing need listen: a refused connect is remembered too) and
    the gateway's worker kept 128 MB it never gave back — again at each wake on Kubernetes, where a workspace
    wakes on a new address — until the worker, every visitor's, ran out of memory. Upstreams with nothing in
    flight, kept alive or waiting are forgotten past a bound."""
    address = next_address()
    client = await make_gateway(workspaces={WORKSPACE: workspace(address)}, in_memory=True)
    gateway = client.app[GATEWAY]
    await gateway.runtime.wake(WORKSPACE)
    ports = range(20000, 20000 + 2 * MOST_QUIET_UPSTREAMS)  # nothing listens on the workspace's own address
    statuses = []
    for port in ports:
        host = f"{port}-{WORKSPACE}.{PREVIEW_DOMAIN}"
        cookie = f"codehub_session={gateway.auth.sessions.issue(Identity(OWNER), host)}"
        async with client.get("/", headers={"Host": host, "Cookie": cookie, "Accept": "application/json"},
                              allow_redirects=False) as response:
            statuses.append(response.status)
    assert set(statuses) == {502}  # nothing listens on them: the owner's requests went all the way to the pool
    assert len(gateway.pool._upstreams) <= MOST_QUIET_UPSTREAMS


async def test_upstreams_in_use_are_never_forgotten(make_upstream: MakeUpstream) -> None:
    """What is forgotten is quiet: a request in flight while thousands of other upstreams come and go still gives
    its kept-alive connection back, and the next request takes it."""
    arrived, release = asyncio.Event(), asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", held)
    address = next_address()
    server = await make_upstream(app, address, 0)
    assert server.port is not None
    pool = UpstreamPool(connect_timeout=5, first_byte_timeout=10, read_timeout=10, queue_timeout=10)
    try:
        in_flight = asyncio.ensure_future(pool.request(address, server.port, "GET", "/", CIMultiDict(Host="x"), None))
        async with asyncio.timeout(10):
            await arrived.wait()
        nowhere = next_address()
        for port in range(20000, 20000 + 2 * MOST_QUIET_UPSTREAMS):
            with pytest.raises(ConnectFailed):
                await pool.request(nowhere, port, "GET", "/", CIMultiDict(Host="x"), None)
        release.set()
        answer, exchange = await in_flight
        assert await answer.read_exactly(2) == b"ok"
        exchange.close()
        assert pool.connections() == (1, 0)  # kept alive, with the upstream it belongs to
        answer, exchange = await pool.request(address, server.port, "GET", "/", CIMultiDict(Host="x"), None)
        assert await answer.read_exactly(2) == b"ok"
        exchange.close()
        assert pool.connections() == (1, 0)
        assert len(pool._upstreams) <= MOST_QUIET_UPSTREAMS
    finally:
        pool.close()


async def test_an_upstream_with_a_kept_alive_or_streaming_connection_is_not_forgotten(
        make_upstream: MakeUpstream) -> None:
    """Quiet means no connection either: one kept alive (idle) stays with its upstream, to be taken again and
    closed by the sweep or ``close`` (forgotten with its upstream, the socket stayed open, out of every count), and an
    event stream's connection (which holds no place in flight) comes back to the upstream it belongs to when the
    stream ends, as does one a request holds in flight (forgotten, that upstream's counts were gone: ``KeyError`` as
    the exchange closed; the held one's connect was proven long before, so only its place in flight shows it)."""
    release, arrived, held = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def page(request: web.Request) -> web.Response:
        if request.query.get("held"):
            arrived.set()
            await held.wait()
        return web.Response(text="ok")

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: a\n\n")
        await release.wait()
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/events", events)
    address = next_address()
    server = await make_upstream(app, address, 0)
    assert server.port is not None
    pool = UpstreamPool(connect_timeout=5, first_byte_timeout=10, read_timeout=10, queue_timeout=10)

    async def others(first: int) -> None:
        nowhere = next_address()
        for port in range(first, first + 2 * MOST_QUIET_UPSTREAMS):
            with pytest.raises(ConnectFailed):
                await pool.request(nowhere, port, "GET", "/", CIMultiDict(Host="x"), None)

    try:
        answer, exchange = await pool.request(address, server.port, "GET", "/", CIMultiDict(Host="x"), None)
        assert await answer.read_exactly(2) == b"ok"
        exchange.close()
        assert pool.connections() == (1, 0)
        await others(20000)
        assert pool.connections() == (1, 0)  # still known, with the upstream it belongs to
        answer, exchange = await pool.request(address, server.port, "GET", "/events", CIMultiDict(Host="x"), None)
        assert pool.connections() == (0, 1)
        await others(30000)
        assert pool.connections() == (0, 1)
        release.set()
        async with asyncio.timeout(10):
            while await answer.read_chunk():
                pass
        exchange.close()
        assert pool.connections() == (1, 0)
        # In flight on that kept-alive connection (its connect long proven): its place is what holds it.
        in_flight = asyncio.ensure_future(pool.request(address, server.port, "GET", "/?held=1", CIMultiDict(Host="x"),
                                                       None))
        async with asyncio.timeout(10):
            await arrived.wait()
        await others(40000)
        held.set()
        answer, exchange = await in_flight
        assert await answer.read_exactly(2) == b"ok"
        exchange.close()
        assert pool.connections() == (1, 0)
    finally:
        pool.close()


class _Comments(BaseHTTPRequestHandler):
    """An app on the standard library's HTTP server, kept alive (``python3 -m http.server --protocol HTTP/1.1``
    reads requests the same way): ``GET`` answers the path, ``POST /comments`` keeps its body, ``GET /comments``
    lists them. Like ``SimpleHTTPRequestHandler``, its ``GET`` never reads a body: a body sent with one is read as
    the next request on the connection."""

    protocol_version = "HTTP/1.1"
    comments: list[bytes]

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(b"\n".join(self.comments) if self.path == "/comments" else f"page {self.path}".encode())

    def do_POST(self) -> None:
        self.comments.append(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        self._answer(b"stored")

    def log_message(self, format: str, *args: object) -> None:
        pass


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        """A connection the gateway closed under a request (a broken pipe): nothing to print."""


@contextlib.contextmanager
def _comments_app(address: str, port: int) -> Iterator[list[bytes]]:
    comments: list[bytes] = []
    handler = type("Handler", (_Comments,), {"comments": comments})
    server = _QuietServer((address, port), handler)
    server.block_on_close = False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield comments
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


async def test_a_body_sent_with_a_get_cannot_take_the_next_visitors_request(proxied: MakeProxied) -> None:
    """A ``GET`` may carry a body (``Content-Length``), and the gateway sends it on; a server that reads no body for
    a ``GET`` — the standard library's, Python's ``http.server`` kept alive — reads it as the next request. The
    connection then went back to the pool looking clean: the app was not answering, it was waiting for the rest of
    the attacker's ``POST /comments``, whose body was the next request sent on that connection: another visitor's
    head, their cookies for the app included, stored where the attacker reads it; that visitor got the answer to
    the attacker's ``POST``. A connection that carried a body on a method without one (GET, HEAD, DELETE, OPTIONS,
    TRACE) is not used again."""
    p = await proxied(None)
    victim_head = b"GET /profile HTTP/1.1\r\nCookie: app_session=victim-secret\r\n"  # as the gateway writes it
    smuggled = b"POST /comments HTTP/1.1\r\nHost: app\r\nContent-Length: %d\r\n\r\n" % len(victim_head)
    with _comments_app(p.address, p.port) as comments:
        reader, writer = await asyncio.open_connection(p.client.host, p.client.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: %b\r\nContent-Length: %d\r\n\r\n%b"
                     % (p.host.encode(), len(smuggled), smuggled))
        attacker = await read_answer(reader)
        writer.close()
        assert (attacker.status, attacker.body) == (200, b"page /")

        reader, writer = await asyncio.open_connection(p.client.host, p.client.port)
        writer.write(b"GET /profile HTTP/1.1\r\nHost: %b\r\nCookie: app_session=victim-secret\r\n\r\n"
                     % p.host.encode())
        victim = await read_answer(reader)
        writer.close()
        assert (victim.status, victim.body) == (200, b"page /profile")

        async with p.request("GET", "/comments") as response:
            assert b"victim-secret" not in await response.read()
        assert not any(b"victim-secret" in comment for comment in comments)

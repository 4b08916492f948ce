"""The fast lane: plain requests are served on it; everything else is handed to aiohttp with its bytes intact.

Which side served a connection is visible on the server: handed-over connections are aiohttp's
(``FastLaneServer.inner.connections``), the others stay fast lanes (``FastLaneServer.lanes``)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket

import pytest
from aiohttp import web

from gateway.auth.store import API_PREFIX
from gateway.proxy.connection import Response
from gateway.server import fastlane
from gateway.server.fastlane import MAX_PARKED, FastLaneServer
from tests.conftest import MakeUpstream, held_app
from tests.server.conftest import MakeProxied, Proxied, listening_later, sent_raw, three_chunks
from tests.server.test_proxy_http import echo_app


def fast_lane_server(p: Proxied) -> FastLaneServer:
    runner = p.client.server.runner
    assert runner is not None
    assert isinstance(runner.server, FastLaneServer)
    return runner.server


async def exchange(p: Proxied, raw: bytes, *, answers: int = 1, pieces: int = 1) -> list[tuple[bytes, bytes]]:
    """Send ``raw`` (in ``pieces`` writes) on one connection and read ``answers`` whole responses."""
    reader, writer = await asyncio.open_connection(p.client.host, p.client.port)
    try:
        step = -(-len(raw) // pieces)
        for start in range(0, len(raw), step):
            writer.write(raw[start:start + step])
            await writer.drain()
            await asyncio.sleep(0.01)
        out = []
        async with asyncio.timeout(10):
            for _ in range(answers):
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                out.append((head, await reader.readexactly(length)))
        return out
    finally:
        writer.close()


def get(p: Proxied, path: str = "/x", *extra: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {p.host}", *extra, "", ""]
    return "\r\n".join(lines).encode()


async def test_plain_gets_stay_on_the_lane_across_keep_alive(proxied: MakeProxied) -> None:
    p = await proxied(echo_app())
    reader, writer = await asyncio.open_connection(p.client.host, p.client.port)
    try:
        for path in ("/one", "/two?q=1"):
            writer.write(get(p, path))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(next(line for line in head.split(b"\r\n") if line.startswith(b"Content-Length"))
                         .split(b":")[1])
            assert json.loads(await reader.readexactly(length))["raw_path"] == path
        assert len(fast_lane_server(p).lanes) == 1
        assert fast_lane_server(p).inner.connections == []
    finally:
        writer.close()


async def test_the_lane_writes_without_nagles_delay(proxied: MakeProxied) -> None:
    """A streamed answer's head and first chunk are separate small writes: with Nagle's algorithm on, the second
    waits for the client's (delayed) ACK of the first. The lane turns it off on every connection."""
    p = await proxied(echo_app())
    reader, writer = await asyncio.open_connection(p.client.host, p.client.port)
    try:
        writer.write(get(p))
        async with asyncio.timeout(10):
            await reader.readuntil(b"\r\n\r\n")
        [lane] = fast_lane_server(p).lanes
        assert lane._transport is not None
        sock = lane._transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        writer.close()


async def test_a_client_that_asks_to_close_is_told_so_and_the_connection_ends(proxied: MakeProxied) -> None:
    """``Connection: close`` from the client: the answer says ``Connection: close`` (RFC 9112 §9.6) and the
    connection ends after it."""
    p = await proxied(echo_app())
    raw = await sent_raw(p, get(p, "/x", "Connection: close"))
    head, _, _ = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"\r\nconnection: close" in head.lower()
    assert fast_lane_server(p).lanes == set()


async def test_a_head_split_over_many_writes_is_assembled(proxied: MakeProxied) -> None:
    p = await proxied(echo_app())
    [(head, body)] = await exchange(p, get(p, "/slowly/typed", "X-One: 1"), pieces=7)
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(body)["raw_path"] == "/slowly/typed"
    assert fast_lane_server(p).inner.connections == []


@pytest.mark.parametrize(
    ("request_bytes", "why"),
    [
        (b"POST /x HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\n\r\nhello", "a body"),
        (b"POST /x HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
         "a chunked body"),
        (b"GET /x HTTP/1.0\r\nHost: {host}\r\n\r\n", "HTTP/1.0"),
        (b"GET /x?codehub_share=nope HTTP/1.1\r\nHost: {host}\r\n\r\n", "a share link in the URL"),
        (b"GET /x HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer " + API_PREFIX.encode() + b"nope\r\n\r\n",
         "a bearer token"),
        (b"GET /x HTTP/1.1\r\nHost: localhost:8080\r\n\r\n", "the hub"),
        (b"GET /x HTTP/1.1\r\nHost: {host}\r\n\r\nGET /y HTTP/1.1\r\nHost: {host}\r\n\r\n", "pipelining"),
    ],
)
async def test_other_requests_are_handed_to_aiohttp_intact(proxied: MakeProxied, request_bytes: bytes,
                                                           why: str) -> None:
    p = await proxied(echo_app())
    raw = request_bytes.replace(b"{host}", p.host.encode())
    answers = await exchange(p, raw, answers=2 if why == "pipelining" else 1)
    assert fast_lane_server(p).lanes == set(), why
    head, body = answers[0]
    if why == "the hub":
        assert head.startswith(b"HTTP/1.1 404"), head
        return
    if why in ("a share link in the URL", "a bearer token"):
        assert head.startswith(b"HTTP/1.1 401"), head
        return
    assert head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")), head
    seen = json.loads(body)
    assert seen["body"] == ("hello" if "body" in why else "")
    if why == "pipelining":
        assert json.loads(answers[1][1])["raw_path"] == "/y"


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /x HTTP/1.1\r\nHost: {host}\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: {host}\r\nBad Header: yes\r\n\r\n",
        b"GET /" + b"p" * 9000 + b" HTTP/1.1\r\nHost: {host}\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: {host}\r\nHost: {host}\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: {host}\r\nHost: localhost:8080\r\n\r\n",
    ],
    ids=["long-header", "bad-header-name", "long-url", "two-hosts", "two-different-hosts"],
)
async def test_requests_past_the_limits_get_aiohttps_answer(proxied: MakeProxied, raw: bytes) -> None:
    p = await proxied(echo_app())
    reader, writer = await asyncio.open_connection(p.client.host, p.client.port)
    try:
        writer.write(raw.replace(b"{host}", p.host.encode()))
        status_line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
    assert status_line.split()[1] in (b"400", b"414", b"431"), status_line
    assert fast_lane_server(p).lanes == set()


async def test_a_refused_port_is_handed_over_for_the_error_page(proxied: MakeProxied) -> None:
    p = await proxied(None)
    [(head, body)] = await exchange(p, get(p, "/x", "Accept: application/json"))
    assert head.startswith(b"HTTP/1.1 502"), head
    assert json.loads(body)["error"]["code"] == "port-not-listening"


async def test_right_after_a_wake_a_refused_connect_is_tried_again_here_too(proxied: MakeProxied,
                                                                           make_upstream: MakeUpstream) -> None:
    """The post-wake grace (a dev server may accept on a throwaway listener first) holds in this lane as in
    aiohttp's: the GET waits for the port instead of a 502."""
    p = await proxied(None)
    p.gateway.waker.settling = lambda *_: True  # type: ignore[method-assign]

    starting = listening_later(p, make_upstream, echo_app())
    [(head, _)] = await exchange(p, get(p, "/x", "Accept: application/json"))
    await starting
    assert head.startswith(b"HTTP/1.1 200"), head  # a failure here is handed over as a 502, never sent again


@pytest.mark.parametrize("method", ["GET", "POST"], ids=["fast-lane", "aiohttp-lane"])
async def test_right_after_a_wake_a_port_that_never_listens_is_a_502_once_the_grace_is_spent(
        proxied: MakeProxied, method: str) -> None:
    """The grace is one for the request, however many connects it refuses: a port that never listens is answered
    502 ``port-not-listening`` once ``WAKE_CONNECT_GRACE`` is spent, not retried for as long as the client waits."""
    p = await proxied(None)
    p.gateway.waker.settling = lambda *_: True  # type: ignore[method-assign]
    raw = get(p, "/x", "Accept: application/json") if method == "GET" else (
        f"POST /x HTTP/1.1\r\nHost: {p.host}\r\nAccept: application/json\r\nContent-Length: 0\r\n\r\n".encode())
    [(head, body)] = await exchange(p, raw)
    assert head.startswith(b"HTTP/1.1 502"), head
    assert json.loads(body)["error"]["code"] == "port-not-listening"


async def test_a_bug_while_serving_is_a_500_and_one_logged_traceback_with_the_path_escaped(
        proxied: MakeProxied, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Nothing went out: aiohttp answers the plan's error; the log line names the request, its path (the client's
    to choose) escaped as in the access log."""
    p = await proxied(echo_app())

    def broken(*_: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(fastlane, "shape_answer", broken)
    with caplog.at_level(logging.ERROR, logger="gateway.server.fastlane"):
        [(head, _)] = await exchange(p, get(p, '/a"b', "Accept: application/json"))
    assert head.startswith(b"HTTP/1.1 500"), head
    [record] = [r for r in caplog.records if r.name == "gateway.server.fastlane"]
    assert record.getMessage() == 'fast lane: serving "GET" "/a\\"b" failed'
    assert record.exc_info is not None


async def test_chunked_and_close_delimited_answers_are_rechunked(proxied: MakeProxied) -> None:
    app = web.Application()
    app.router.add_get("/stream", three_chunks)
    p = await proxied(app)
    reader, writer = await asyncio.open_connection(p.client.host, p.client.port)
    try:
        writer.write(get(p, "/stream"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert b"Transfer-Encoding: chunked" in head
        body = b""
        while True:
            size = int((await asyncio.wait_for(reader.readline(), 10)).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
        assert body == b"alpha beta gamma"
        writer.write(get(p, "/stream"))  # still in step for the next request on the connection
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    assert fast_lane_server(p).inner.connections == []


async def test_a_failure_to_plan_in_the_lane_costs_no_request(proxied: MakeProxied,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in planning, before anything was sent: aiohttp takes the request from the start and serves it."""
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    p = await proxied(echo_app())
    monkeypatch.setattr("gateway.server.fastlane.plan", broken)
    [(head, body)] = await exchange(p, get(p, "/still/served"))
    assert head.startswith(b"HTTP/1.1 200"), head
    assert json.loads(body)["raw_path"] == "/still/served"
    assert fast_lane_server(p).lanes == set()


async def test_a_failure_after_sending_is_an_error_not_a_second_request(proxied: MakeProxied,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the request went upstream it is never sent again: a bug in writing its answer is a 500 that aiohttp
    renders (the plan handed over says so), and the upstream saw the request once."""
    seen: list[str] = []

    async def count(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(text="once")

    app = web.Application()
    app.router.add_get("/{tail:.*}", count)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    p = await proxied(app)
    monkeypatch.setattr("gateway.server.fastlane.shape_answer", broken)
    [(head, _body)] = await exchange(p, get(p, "/once"))
    assert head.startswith(b"HTTP/1.1 500"), head
    assert seen == ["/once"]
    assert fast_lane_server(p).lanes == set()


async def test_a_hand_over_carries_the_plan(proxied: MakeProxied, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request the fast lane planned but does not serve (here a refusal) is not planned again by aiohttp: it
    acts on the plan that came with the connection. With aiohttp's own planning broken, the answer is still the
    fast lane's decision — and a request the fast lane never planned (a body) shows the planning is aiohttp's."""
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("planned twice")

    p = await proxied(echo_app())
    monkeypatch.setattr("gateway.server.lane.plan", broken)
    [(head, body)] = await exchange(p, get(p, "/x", f"Authorization: Bearer {API_PREFIX}not-a-token",
                                           "Accept: application/json"))
    assert head.startswith(b"HTTP/1.1 401"), head
    assert json.loads(body)["error"]["code"] == "token-invalid"
    assert fast_lane_server(p).lanes == set()
    post = f"POST /x HTTP/1.1\r\nHost: {p.host}\r\nContent-Length: 2\r\nAccept: application/json\r\n\r\nab".encode()
    [(head, _body)] = await exchange(p, post)
    assert head.startswith(b"HTTP/1.1 500"), head


async def test_bytes_pipelined_behind_a_request_in_flight_stop_being_read(proxied: MakeProxied) -> None:
    """A client that keeps sending while its request is served is not read past ``MAX_PARKED``: its bytes wait in
    the kernel's buffers, not in the gateway's memory."""
    app, release = held_app("/slow")
    p = await proxied(app)
    _reader, writer = await asyncio.open_connection(p.client.host, p.client.port)
    try:
        writer.write(get(p, "/slow"))
        await asyncio.sleep(0.2)
        [lane] = fast_lane_server(p).lanes
        flood = b"x" * (4 * MAX_PARKED)
        for _ in range(8):  # the kernel takes some of it; the gateway reads only until it holds MAX_PARKED
            writer.write(flood)
            await asyncio.sleep(0.05)
        assert 0 < lane._connection.parked <= MAX_PARKED + 256 * 1024  # at most one read past the limit
        assert lane._reading is False
    finally:
        release.set()
        writer.close()


async def test_a_bug_after_the_head_went_out_closes_the_connection_without_a_second_answer(
        proxied: MakeProxied, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Once the lane has written the head, an error page cannot follow it: the connection is closed (the client
    sees a cut body), the bug logged, and aiohttp is not handed the connection to answer again."""
    async def large(request: web.Request) -> web.Response:
        return web.Response(body=b"l" * 100_000)  # streamed: past what is read whole

    async def broken(self: object) -> bytes:
        raise RuntimeError("a bug")

    app = web.Application()
    app.router.add_get("/large", large)
    p = await proxied(app)
    monkeypatch.setattr(Response, "read_chunk", broken)
    with caplog.at_level(logging.ERROR, logger="gateway.server.fastlane"):
        raw = await sent_raw(p, get(p, "/large"))
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
    assert raw.count(b"HTTP/1.1") == 1, raw[:400]
    [record] = [r for r in caplog.records if r.name == "gateway.server.fastlane"]
    assert record.getMessage() == 'fast lane: serving "GET" "/large" failed'


async def test_requests_parked_past_the_limit_are_all_served_once_handed_over(proxied: MakeProxied) -> None:
    """Reading paused behind a request in flight (``MAX_PARKED``) goes on when what was parked is handed to
    aiohttp: every request pipelined behind the one in flight is answered, those still in the kernel's buffers
    when reading paused too."""
    app, release = held_app("/slow")

    async def page(request: web.Request) -> web.Response:
        return web.Response(text="page")

    app.router.add_get("/page", page)
    p = await proxied(app)
    count = 200
    pipelined = get(p, "/page", "X-Pad: " + "p" * 6000) * count  # far more than one read of the lane's
    reader, writer = await asyncio.open_connection(p.client.host, p.client.port)
    try:
        writer.write(get(p, "/slow"))
        await asyncio.sleep(0.2)
        [lane] = fast_lane_server(p).lanes
        writer.write(pipelined)
        for _ in range(100):  # until the lane stops reading (bounded)
            if not lane._reading:
                break
            await asyncio.sleep(0.02)
        assert lane._reading is False
        release.set()
        bodies = []
        async with asyncio.timeout(20):
            for _ in range(count + 1):
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                bodies.append(await reader.readexactly(length))
    finally:
        writer.close()
    assert bodies == [b"ok", *[b"page"] * count]

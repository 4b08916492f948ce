"""Request attacks on the client side of HTTP/1.1: bytes a client sends so that the gateway reads a request one way
and a hop next to it (a proxy in front, or the app behind) another — request smuggling, desync, and the hand-over
from the fast lane to aiohttp's.

The harm a desync does is to someone else: a proxy in front that keeps one connection to the gateway for many
visitors sends the next visitor's request right behind the attacker's, so whatever the gateway takes for the
attacker's body or next request decides what that visitor gets, or which request goes upstream with their cookies.
Each test sends raw bytes over a real socket to a real gateway in front of a real upstream on loopback."""

from __future__ import annotations

import asyncio
import logging
import random
import re

import pytest
from aiohttp import web

from gateway.proxy.pool import Response
from gateway.server.context import GATEWAY
from tests.conftest import MakeGateway, next_address, workspace
from tests.server import test_upstream_faults as faults
from tests.server.conftest import WORKSPACE, MakeProxied, Proxied, sent_raw
from tests.server.test_hostile_input import (
    PRELUDES,
    after,
    assert_refused,
    closed_by_gateway,
    counted,
    quiet_refusal,
    read_answer,
)
from tests.server.test_upstream_faults import Faulty, warm
from tests.server.test_upstream_faults import faulty as faulty  # the fixture


def recording_app(paths: list[str]) -> web.Application:
    """Answers every request "ok", noting the path of each (after reading its body whole)."""

    async def note(request: web.Request) -> web.Response:
        await request.read()
        paths.append(request.raw_path)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", note)
    return app


async def recorded(proxied: MakeProxied, prelude: str) -> tuple[
        Proxied, list[str], asyncio.StreamReader, asyncio.StreamWriter]:
    """A gateway in front of a ``recording_app`` and a client connection at ``prelude``'s place, the paths the
    prelude sent forgotten."""
    paths: list[str] = []
    p = await proxied(recording_app(paths))
    reader, writer = await after(p, prelude)
    paths.clear()
    return p, paths, reader, writer


# --- HTTP/1.0 and Transfer-Encoding -----------------------------------------------------------------------------

CHUNKED_HTTP10 = {
    "keep-alive": b"POST /smuggler HTTP/1.0\r\nHost: {host}\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked"
                  b"\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /next HTTP/1.1\r\nHost: {host}\r\n\r\n",
    "close": b"POST /smuggler HTTP/1.0\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("prelude", list(PRELUDES))
@pytest.mark.parametrize("shape", list(CHUNKED_HTTP10))
async def test_a_chunked_http10_request_is_refused_and_ends_its_connection(
        proxied: MakeProxied, caplog: pytest.LogCaptureFixture, prelude: str, shape: str) -> None:
    """HTTP/1.0 has no chunked coding: a hop in front that speaks it (or a proxy that reads an HTTP/1.0 request by
    HTTP/1.0's rules) takes ``POST … HTTP/1.0`` + ``Transfer-Encoding: chunked`` for a request without a body, and
    the chunks behind it for the next request on its connection, where the gateway took them for this one's body:
    the two then disagree on where every request after it begins (RFC 9112 §6.1: a recipient MUST treat such a
    message as faulty framing and close the connection). aiohttp's parser reads the chunks and kept the
    connection alive for the request behind them: it is a 400 (``bad-framing``) that reaches no app, and the
    connection ends."""
    caplog.set_level(logging.DEBUG)
    p, paths, reader, writer = await recorded(proxied, prelude)
    caplog.clear()
    try:
        writer.write(CHUNKED_HTTP10[shape].replace(b"{host}", p.host.encode()))
        answer = await read_answer(reader)
        assert_refused(answer, 400, "bad-framing")
        assert await closed_by_gateway(reader)  # nothing behind it is read: its framing is unknown
    finally:
        writer.close()
    assert paths == []
    quiet_refusal(caplog, 400, "bad-framing")
    await counted(p, "bad-framing")


# --- a Transfer-Encoding that does not end in chunked ------------------------------------------------------------

SMUGGLED = b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nX: "
UNCHUNKED_CODINGS = {
    "empty-before-a-length": b"POST /smuggler HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: \r\n"
                             b"Content-Length: %d\r\n\r\n%b" % (len(SMUGGLED), SMUGGLED),
    "empty": b"POST /smuggler HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: \r\n\r\n" + SMUGGLED,
}


@pytest.mark.parametrize("prelude", list(PRELUDES))
@pytest.mark.parametrize("shape", list(UNCHUNKED_CODINGS))
async def test_a_transfer_encoding_that_does_not_end_in_chunked_is_refused(
        proxied: MakeProxied, caplog: pytest.LogCaptureFixture, prelude: str, shape: str) -> None:
    """A request whose ``Transfer-Encoding`` is there but does not end in ``chunked`` has no length anyone can rely
    on (RFC 9112 §6.3: 400 and close), and a ``Transfer-Encoding`` beside a ``Content-Length`` overrides it. llhttp
    let an empty one through: before a ``Content-Length`` the request was read by the length (the other order is
    refused), alone as a request without a body. A hop in front that lets the coding it sees win ends the request at
    ``0\\r\\n\\r\\n`` and takes ``GET /smuggled`` for the next one, where the gateway read them as this one's body
    (or the reverse): the two disagree on where the requests behind it begin. It is a 400 (``bad-framing``) that
    reaches no app, and the connection ends."""
    caplog.set_level(logging.DEBUG)
    p, paths, reader, writer = await recorded(proxied, prelude)
    caplog.clear()
    head, _, rest = UNCHUNKED_CODINGS[shape].replace(b"{host}", p.host.encode()).partition(b"\r\n\r\n")
    try:
        # The head on its own: read together with what follows, the garbage that is to the gateway makes aiohttp's
        # parser fail first (still a 400 that ends the connection, for another reason: see the xfail below).
        writer.write(head + b"\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(rest)
        answer = await read_answer(reader)
        assert_refused(answer, 400, "bad-framing")
        assert await closed_by_gateway(reader)
    finally:
        writer.close()
    assert paths == []
    quiet_refusal(caplog, 400, "bad-framing")


# --- a malformed head behind a whole body ------------------------------------------------------------------------

UPLOAD = 4 << 20
"""More than the sockets and buffers between the gateway and a slow app hold: the end of the body is still in the
gateway when what was sent behind it arrives."""


async def test_a_malformed_head_behind_a_whole_upload_does_not_fail_the_upload(proxied: MakeProxied) -> None:
    """A request whose body arrived whole is served whole, whatever comes behind it on the connection: a malformed
    next head is that next request's 400. It failed the upload in flight instead (its body's unread end was
    dropped and the upload answered 400 ``bad-request-line``), so whoever sends a request behind someone else's on
    a connection a proxy in front shares could break their upload, and the app got a body cut short."""
    received: list[int] = []

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)  # the app is busy: the gateway holds the end of the body meanwhile
        received.append(sum([len(piece) async for piece in request.content.iter_any()]))
        return web.Response(text="stored")

    app = web.Application()
    app.router.add_post("/upload", slow)
    p = await proxied(app)
    reader, writer = await asyncio.open_connection(p.client.host, p.client.port)
    try:
        writer.write(f"POST /upload HTTP/1.1\r\nHost: {p.host}\r\nContent-Length: {UPLOAD}\r\n\r\n".encode()
                     + b"u" * UPLOAD + b"GARBAGE\r\n\r\n")
        first = await read_answer(reader)
        second = await read_answer(reader)
        assert await closed_by_gateway(reader)
    finally:
        writer.close()
    assert (first.status, first.body, received) == (200, b"stored", [UPLOAD])
    assert_refused(second, 400, "bad-request-line")


# --- what reaches the app --------------------------------------------------------------------------------------

class RawUpstream:
    """An app on a raw socket that records every byte it receives and answers each request head "ok" (a body it
    does not read: the tests look at the bytes themselves)."""

    def __init__(self) -> None:
        self.received = bytearray()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                self.received += data
                if data.endswith(b"\r\n\r\n"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except ConnectionError:
            pass
        finally:
            writer.close()


CHUNKED_EXTRAS = (b"POST /up HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
                  b"Trailer: X-Forwarded-User\r\n\r\n5;name=\"x\";sig=1\r\nhello\r\n0;last\r\n"
                  b"X-Forwarded-User: admin\r\nX-Codehub-Assertion: forged\r\n\r\n")


async def test_chunk_extensions_and_trailers_never_reach_the_app(make_gateway: MakeGateway) -> None:
    """A chunked body goes upstream chunked again by the gateway, as plain chunks and an empty trailer section:
    the client's chunk extensions (which parsers read in different ways) and trailer fields are not passed on, so a
    trailer cannot carry an identity header (``X-Forwarded-User``) past the hygiene its head went through to an app
    that merges trailers into headers."""
    head, body = await through_raw_upstream(make_gateway, CHUNKED_EXTRAS)
    assert b"transfer-encoding: chunked" in head.lower()
    assert b"Trailer" not in head
    assert body == b"5\r\nhello\r\n0\r\n\r\n"


async def through_raw_upstream(make_gateway: MakeGateway, request: bytes) -> tuple[bytes, bytes]:
    """The head and body a ``RawUpstream`` received for ``request`` (its ``{host}`` the upstream's preview host),
    which it answered 200."""
    address = next_address()
    upstream = RawUpstream()
    server = await asyncio.start_server(upstream.serve, address, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = await make_gateway(workspaces={WORKSPACE: workspace(address, ports={port: "public"})},
                                    in_memory=True)
        await client.app[GATEWAY].runtime.wake(WORKSPACE)
        reader, writer = await asyncio.open_connection(client.host, client.port)
        try:
            writer.write(request.replace(b"{host}", f"{port}-{WORKSPACE}.localhost:8080".encode()))
            answer = await read_answer(reader)
        finally:
            writer.close()
    finally:
        server.close()
    assert (answer.status, answer.body) == (200, b"ok")
    head, _, body = bytes(upstream.received).partition(b"\r\n\r\n")
    return head, body


@pytest.mark.parametrize(("length", "sent"), [(b"005", b"5"), (b"0000", b"0"), (b"12", b"12")])
async def test_a_body_length_reaches_the_app_in_one_spelling(make_gateway: MakeGateway, length: bytes,
                                                             sent: bytes) -> None:
    """``Content-Length: 005`` is 5 to the gateway's parser; an app's parser that reads it otherwise (octal, or a
    refusal that leaves the body on the connection as the next request) would disagree on where the body ends:
    the app is sent the length as the gateway read it."""
    body = (b"x" * int(length) + b"\r\n\r\n")[-int(length):] if int(length) else b""  # ends as RawUpstream answers
    head, received = await through_raw_upstream(
        make_gateway, b"POST /up HTTP/1.1\r\nHost: {host}\r\nContent-Length: " + length + b"\r\n\r\n" + body)
    found = re.search(rb"(?im)^content-length: ([0-9]*)", head)
    assert found is not None, head
    assert found[1] == sent
    assert received == body


# --- an upgrade the gateway does not make -------------------------------------------------------------------------

IGNORED_UPGRADES = {
    "h2c": b"GET /a HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
           b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n",
    "unknown": b"GET /a HTTP/1.1\r\nHost: {host}\r\nConnection: upgrade\r\nUpgrade: foo/1\r\n\r\n",
    "with-a-body": b"POST /a HTTP/1.1\r\nHost: {host}\r\nConnection: upgrade\r\nUpgrade: h2c\r\n"
                   b"Content-Length: 5\r\n\r\nhello",
}
BEHIND = b"GET /b HTTP/1.1\r\nHost: {host}\r\n\r\n"


@pytest.mark.parametrize("prelude", list(PRELUDES))
@pytest.mark.parametrize("shape", list(IGNORED_UPGRADES))
async def test_no_answer_goes_out_of_turn_behind_an_upgrade_the_gateway_does_not_make(
        proxied: MakeProxied, prelude: str, shape: str) -> None:
    """llhttp stops reading at a request that asks to switch protocols, and aiohttp switches only to WebSocket:
    whatever came in the same read behind an ``Upgrade: h2c`` (curl sends one) or any other upgrade was dropped
    unread, and the connection went on with the next read. A proxy in front that sends requests one behind the
    other then waits for an answer to the dropped one, and takes the answer to the request after it for that
    one: someone else's page. Such a request is now the last of its connection (answered with ``Connection:
    close``), so nothing on it is answered out of turn."""
    p, paths, reader, writer = await recorded(proxied, prelude)
    host = p.host.encode()
    try:
        writer.write((IGNORED_UPGRADES[shape] + BEHIND).replace(b"{host}", host))
        first = await read_answer(reader)
        assert first.status == 200
        writer.write(b"GET /c HTTP/1.1\r\nHost: %b\r\n\r\n" % host)  # sent once the first answer is in
        assert await closed_by_gateway(reader)  # no answer to /c that a proxy would take for /b's
    finally:
        writer.close()
    assert first.closed
    assert paths == ["/a"]


# --- a failure after the answer began -----------------------------------------------------------------------------

async def test_a_failure_after_the_answer_began_is_never_followed_by_a_second_answer(
        proxied: MakeProxied, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Once aiohttp's lane has written an answer's head, an error page cannot follow it on the connection: a client,
    or a proxy in front, reads it as more of the first answer's body (``Content-Length: 100000``), and with it the
    answers to the requests behind it, which a proxy that shares the connection sends for other visitors. As in
    the fast lane (``test_a_bug_after_the_head_went_out_closes_the_connection_without_a_second_answer``), the
    connection is closed instead: the client sees a cut body, and nothing behind it is answered. A bug of ours
    stands for the failure, as there."""
    async def large(request: web.Request) -> web.Response:
        return web.Response(body=b"l" * 100_000)  # streamed: past what is read whole

    async def broken(self: object) -> bytes:
        raise RuntimeError("a bug")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", large)
    p = await proxied(app)
    monkeypatch.setattr(Response, "read_chunk", broken)
    host = p.host.encode()
    with caplog.at_level(logging.ERROR):
        raw = await sent_raw(p, b"POST /large HTTP/1.1\r\nHost: %b\r\nContent-Length: 0\r\n\r\n"
                                b"GET /next HTTP/1.1\r\nHost: %b\r\n\r\n" % (host, host))
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
    assert raw.count(b"HTTP/1.1 ") == 1, raw[:600]
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1  # the bug, with its traceback


# --- a malformed request behind valid ones in one read -----------------------------------------------------------

@pytest.mark.parametrize("prelude", list(PRELUDES))
async def test_a_malformed_request_is_not_answered_in_place_of_the_valid_one_before_it(
        proxied: MakeProxied, prelude: str) -> None:
    """Answers go out in the order of their requests (RFC 9112 §9.3.2): a malformed request that arrives in the same
    read as a valid one before it gets its 400 after that one's answer. Behind a proxy that sends visitors'
    requests one behind the other on a shared connection, a visitor's request followed by an attacker's garbage
    got the attacker's 400 instead, and never reached its app: aiohttp's parser raised for the whole read and kept
    the requests before the fault to itself. The fast lane reads the first request again alone
    (``h1.Connection``); aiohttp's lane has its parser stop after each request (``GatewayHandler``). The
    connection then ends: nothing else is answered out of turn."""
    p, paths, reader, writer = await recorded(proxied, prelude)
    try:
        writer.write(b"GET /a HTTP/1.1\r\nHost: %b\r\n\r\nGARBAGE\r\n\r\n" % p.host.encode())
        first = await read_answer(reader)
        second = await read_answer(reader)
        assert await closed_by_gateway(reader)
    finally:
        writer.close()
    assert (first.status, second.status, paths) == (200, 400, ["/a"])


# --- every answer framed and in turn --------------------------------------------------------------------------------

async def read_strictly(reader: asyncio.StreamReader, method: str) -> tuple[int, dict[str, str], bytes]:
    """One final answer read as a strict HTTP/1.1 client reads it, knowing its request's method (interim answers
    skipped): no header twice, a length or chunks but never both, nothing around the chunks but their framing."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        if status != 100:
            break
    headers: dict[str, str] = {}
    for line in filter(None, lines[1:]):
        name, _, value = line.partition(":")
        assert name.lower() not in headers, head
        headers[name.lower()] = value.strip()
    if method == "HEAD" or status in (204, 304):
        return status, headers, b""
    if "content-length" in headers:
        assert "transfer-encoding" not in headers, head
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    assert headers.get("transfer-encoding") == "chunked", head
    body = b""
    while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
        body += await reader.readexactly(size)
        assert await reader.readexactly(2) == b"\r\n"
    assert await reader.readexactly(2) == b"\r\n"
    return status, headers, body


async def test_a_connection_of_mixed_exchanges_gets_every_answer_framed_and_in_turn(proxied: MakeProxied) -> None:
    """The shapes that each change how an answer is framed (HEAD, 204, 304, chunked, small and streamed, a body
    behind ``Expect: 100-continue``, an upgrade to WebSocket asked by a method that gets none), in both lanes, sent
    one at a time and pipelined, on one kept-alive connection: each answer, read strictly, is whole and is its own
    request's. One answer framed wrongly would shift every answer after it onto the wrong request."""
    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        status, body = int(request.query["s"]), (request.path + "|").encode() * int(request.query["n"])
        if status in (204, 304):
            return web.Response(status=status, headers={"X-Path": request.path})
        if request.query["chunked"]:
            streamed = web.StreamResponse(status=status, headers={"X-Path": request.path})
            streamed.enable_chunked_encoding()
            await streamed.prepare(request)
            await streamed.write(body)
            await streamed.write_eof()
            return streamed
        return web.Response(status=status, body=body, headers={"X-Path": request.path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    p = await proxied(app)
    pick = random.Random(7).choice
    requests = []
    for i in range(150):
        method = pick(["GET", "GET", "HEAD", "POST", "PUT", "OPTIONS", "DELETE"])
        body = b"b" * pick([0, 1, 5000]) if method not in ("GET", "HEAD") else b""
        extra = pick(["", "Accept: application/json\r\n", "Expect: 100-continue\r\n" if body else "",
                      "Connection: upgrade\r\nUpgrade: websocket\r\n" if method != "GET" else ""])
        status, times = pick([200, 204, 304, 404, 201]), pick([1, 3000, 20000])  # 20,000 times: streamed
        query = f"s={status}&n={times}&chunked={pick(['', '1'])}"
        whole = b"" if method == "HEAD" or status in (204, 304) else f"/r{i}|".encode() * times
        requests.append((method, f"/r{i}", query, body, extra, whole))
    reader, writer = await asyncio.open_connection(p.client.host, p.client.port)
    wrong = []
    try:
        while requests:
            batch = requests[:pick([1, 1, 2, 3])]
            requests = requests[len(batch):]
            writer.write(b"".join(f"{method} {path}?{query} HTTP/1.1\r\nHost: {p.host}\r\n{extra}"
                                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body
                                  for method, path, query, body, extra, _ in batch))
            for method, path, query, _, _, whole in batch:
                async with asyncio.timeout(10):
                    status, headers, got = await read_strictly(reader, method)
                if (headers.get("x-path"), got) != (path, whole):
                    wrong.append((method, path, query, status, headers.get("x-path")))
    finally:
        writer.close()
    assert wrong == []


# --- an answer that comes late, after one to HEAD ----------------------------------------------------------------

LATE_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Smuggled: yes\r\n\r\npoisoned"


async def late_answer_after_head(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """The answer to a HEAD, then a moment later what an app that serves HEAD as GET writes as the body: here a whole
    answer (an app that puts what a visitor sent at the start of its page writes what they chose)."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(LATE_ANSWER))
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.write(LATE_ANSWER)
    await writer.drain()
    return True


@pytest.mark.parametrize("version", ["1.1", "1.0"], ids=["fast-lane", "aiohttp-lane"])
async def test_a_body_sent_late_after_an_answer_to_head_is_never_the_next_requests_answer(
        faulty: Faulty, monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    """A body the app writes after its answer to a HEAD (which has none) was caught only while its connection sat
    idle (``test_a_body_after_an_answer_to_head_is_not_the_next_answer`` waits for it): a request that took the
    connection from the pool first had it read as its own answer, so a visitor who sends HEAD to such an app puts
    what its body holds in front of the next visitor. A connection that answered a HEAD is not used again."""
    monkeypatch.setitem(faults.FAULTS, "late-answer-after-head", late_answer_after_head)
    await warm(faulty, "GET")
    answer, _, _ = await faulty.send("HEAD", "/fault/late-answer-after-head", version)
    assert answer is not None
    assert answer.status == 200
    answer, body, _ = await faulty.send("GET", "/ok")  # at once: the connection that answered the HEAD is idle
    assert answer is not None
    assert (answer.status, body) == (200, b"ok /ok"), answer.head

"""HTTP through the gateway to a real upstream: methods, paths, streaming both ways, special statuses,
header hygiene, redirects, cookies, keep-alive pooling and client disconnects."""

from __future__ import annotations

import asyncio
import gzip
import json
import sys
import time
from collections.abc import AsyncIterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict

from gateway.lifecycle import WorkspaceState
from tests.conftest import MakeGateway, next_address, workspace
from tests.memory_runtime import MemoryRuntime
from tests.server.conftest import (
    HUB,
    IDE,
    WORKSPACE,
    MakeProxied,
    Proxied,
    free_port,
    raw_upstream,
    read_until,
    sent_raw,
)

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND", "MKCOL", "REPORT"]


def echo_app() -> web.Application:
    """Answers every method on every path with what it received, as JSON."""

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response({
            "method": request.method, "raw_path": request.raw_path, "body": body.decode("latin-1"),
            "headers": [[name, value] for name, value in request.headers.items()],
        }, headers={"X-Upstream": "yes"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def header_values(seen: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in seen["headers"] if key.lower() == name.lower()]


@pytest.mark.parametrize("method", METHODS)
async def test_every_method_passes_with_body_and_query(proxied: MakeProxied, method: str) -> None:
    p = await proxied(echo_app())
    async with p.request(method, "/api/items?b=2&a=1&a=%20x", data=b"payload \x00\xff") as response:
        assert response.status == 200
        assert response.headers["X-Upstream"] == "yes"
        seen = await response.json()
    assert seen["method"] == method
    assert seen["raw_path"] == "/api/items?b=2&a=1&a=%20x"
    assert seen["body"] == "payload \x00\xff"


async def test_head_keeps_content_length_and_sends_no_body(proxied: MakeProxied) -> None:
    async def page(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 1234, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/file", page)
    p = await proxied(app)
    async with p.request("HEAD", "/file") as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == "1234"
        assert await response.read() == b""
    async with p.request("GET", "/file") as response:  # the connection is still usable: no stray body bytes
        assert await response.read() == b"x" * 1234


async def echoed(p: Proxied, request_line: str) -> dict[str, Any]:
    """What the echo app saw of a request sent as raw bytes (``request_line``, then the host and a close), which the
    gateway answered 200."""
    raw = await sent_raw(p, f"{request_line} HTTP/1.1\r\nHost: {p.host}\r\nConnection: close\r\n\r\n".encode())
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    seen: dict[str, Any] = json.loads(body.split(b"\r\n")[1] if b"chunked" in head.lower() else body)
    return seen


@pytest.mark.parametrize(
    "raw_path",
    [
        "/a%2Fb/c",
        "/%7Euser/%e2%82%ac/x%20y",
        "/files/%2e%2e/secret",
        "/semi;colon/=eq/@at/+plus",
        "/q?x=%2F&y=a+b&z=%E2%82%AC&empty=&flag",
        "/trailing//double//slashes/",
    ],
)
async def test_raw_paths_preserved_byte_for_byte(proxied: MakeProxied, raw_path: str) -> None:
    p = await proxied(echo_app())
    assert (await echoed(p, f"GET {raw_path}"))["raw_path"] == raw_path


async def test_chunked_upload_is_streamed_to_the_upstream(proxied: MakeProxied) -> None:
    """The upstream has the first piece before the client produces the second."""
    first_arrived = asyncio.Event()

    async def upload(request: web.Request) -> web.Response:
        first = await request.content.readexactly(5)
        first_arrived.set()
        rest = await request.content.read()
        return web.json_response({"first": first.decode(), "rest": rest.decode(),
                                  "te": request.headers.get("Transfer-Encoding")})

    async def body() -> AsyncIterator[bytes]:
        yield b"hello"
        await asyncio.wait_for(first_arrived.wait(), 10)
        yield b", world"

    app = web.Application()
    app.router.add_post("/upload", upload)
    p = await proxied(app)
    async with p.request("POST", "/upload", data=body()) as response:
        assert response.status == 200
        assert await response.json() == {"first": "hello", "rest": ", world", "te": "chunked"}


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_small_body_whose_last_byte_comes_alone_arrives_whole(proxied: MakeProxied, method: str) -> None:
    """A small answer is read whole before it is written (``read_small``): a body whose pieces come in separate
    reads, down to a last piece of one byte, is passed on complete (either lane)."""
    async def pieces(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 6
        await response.prepare(request)
        for piece in (b"hel", b"lo", b"!"):
            await response.write(piece)
            await asyncio.sleep(0.05)  # each its own read at the gateway
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route(method, "/pieces", pieces)
    p = await proxied(app)
    async with p.request(method, "/pieces") as response:
        assert response.status == 200
        assert await response.read() == b"hello!"


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_an_answer_s_head_reaches_the_client_before_its_body_begins(proxied: MakeProxied, method: str) -> None:
    """The head is passed on as soon as it is in, not with the first piece of body: an upstream that sends its
    head and then waits (for the client to react, say) is not held up by the gateway."""
    head_seen = asyncio.Event()

    async def waits(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        await head_seen.wait()  # set by the client once it has the head
        await response.write(b"after the head")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route(method, "/waits", waits)
    p = await proxied(app)
    async with asyncio.timeout(10), p.request(method, "/waits") as response:
        assert response.status == 200
        head_seen.set()
        assert await response.read() == b"after the head"


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_the_upstream_s_reason_phrase_is_passed_on(proxied: MakeProxied, method: str) -> None:
    async def custom(request: web.Request) -> web.Response:
        return web.Response(status=299, reason="Fine By Me", text="ok")

    app = web.Application()
    app.router.add_route(method, "/custom", custom)
    p = await proxied(app)
    async with p.request(method, "/custom") as response:
        assert (response.status, response.reason) == (299, "Fine By Me")


_FRAMINGS = {  # aiohttp's lane writes a small answer whole, others as they come
    "small": b"Content-Length: 2\r\n\r\nok",
    "chunked": b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "large": b"Content-Length: 20000\r\n\r\n" + b"o" * 20000,
}


async def _answered_with(p: Proxied, method: str, fields: bytes, framing: bytes) -> list[tuple[str, str]]:
    """The head the client gets, as (lower-case name, value) pairs, for an app's answer of ``fields`` (each line
    ending CRLF) and ``framing`` (its framing header, the blank line and the body)."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n" + fields + framing)
        await writer.drain()

    body = "Content-Length: 0\r\n" if method == "POST" else ""
    async with raw_upstream(p, serve):
        got = await sent_raw(p, f"{method} / HTTP/1.1\r\nHost: {p.host}\r\n{body}Connection: close\r\n\r\n".encode())
    head, _, _ = got.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    assert status == "HTTP/1.1 200 OK", got[:300]
    return [(name.lower(), value) for name, _, value in (line.partition(": ") for line in lines)]


@pytest.mark.parametrize("framing", list(_FRAMINGS))
@pytest.mark.parametrize("method", ["GET", "POST"])  # the fast lane, aiohttp's lane
async def test_an_answer_goes_out_with_no_type_or_server_its_app_did_not_send(proxied: MakeProxied, method: str,
                                                                              framing: str) -> None:
    """Whichever lane writes it: aiohttp's would add ``Content-Type: application/octet-stream`` (a browser then
    downloads what it would have looked at) and a ``Server`` of its own name and version. A ``Date`` is added, as
    RFC 9110 §6.6.1 asks of a proxy forwarding an answer without one."""
    p = await proxied(None)
    fields = await _answered_with(p, method, b"X-App: yes\r\n", _FRAMINGS[framing])
    names = [name for name, _value in fields]
    assert "x-app" in names
    assert "content-type" not in names
    assert "server" not in names
    (date,) = [value for name, value in fields if name == "date"]
    assert abs(parsedate_to_datetime(date).timestamp() - time.time()) < 60, date


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_an_answer_s_own_type_server_and_date_pass_as_sent(proxied: MakeProxied, method: str) -> None:
    p = await proxied(None)
    sent = [("content-type", "text/x-mine"), ("server", "vite/7"), ("date", "Thu, 01 Jan 1970 00:00:00 GMT")]
    fields = await _answered_with(p, method, b"".join(f"{n}: {v}\r\n".encode() for n, v in sent), _FRAMINGS["small"])
    assert [(name, value) for name, value in fields if name in dict(sent)] == sent


async def test_download_is_streamed_piece_by_piece(proxied: MakeProxied) -> None:
    """Each piece reaches the client while the upstream is still waiting to send the next one."""
    release = [asyncio.Event() for _ in range(3)]
    finished = asyncio.Event()

    async def pieces(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        for n, gate in enumerate(release):
            await response.write(f"piece-{n};".encode())
            await asyncio.wait_for(gate.wait(), 10)
        finished.set()
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/pieces", pieces)
    p = await proxied(app)
    async with p.request("GET", "/pieces") as response:
        assert response.headers.get("Transfer-Encoding") == "chunked"
        received = b""
        for n, gate in enumerate(release):
            received += await read_until(response, f"piece-{n};".encode())
            assert not finished.is_set()
            gate.set()
        received += await response.read()
    assert received == b"piece-0;piece-1;piece-2;"


async def test_server_sent_events_arrive_one_by_one(proxied: MakeProxied) -> None:
    second = asyncio.Event()

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        await response.write(b"id: 1\ndata: first\n\n")
        await asyncio.wait_for(second.wait(), 10)
        await response.write(b"id: 2\ndata: second\n\n")
        return response

    app = web.Application()
    app.router.add_get("/events", events)
    p = await proxied(app)
    async with p.request("GET", "/events", headers={"Accept": "text/event-stream"}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        assert await read_until(response, b"\n\n") == b"id: 1\ndata: first\n\n"
        second.set()
        assert await read_until(response, b"\n\n") == b"id: 2\ndata: second\n\n"


async def test_a_quiet_event_stream_outlives_the_first_byte_timeout(proxied: MakeProxied) -> None:
    """The first-byte timeout covers the answer's head; a feed quiet for longer is the body's business (no
    read timeout by default)."""
    second = asyncio.Event()

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await asyncio.wait_for(second.wait(), 10)
        await response.write(b"data: late\n\n")
        return response

    app = web.Application()
    app.router.add_get("/events", events)
    p = await proxied(app, timeouts={"first_byte": 0.3})
    async with p.request("GET", "/events", headers={"Accept": "text/event-stream"}) as response:
        assert response.status == 200
        await asyncio.sleep(0.9)
        second.set()
        assert await read_until(response, b"\n\n") == b"data: late\n\n"


async def test_the_first_byte_clock_starts_once_the_body_is_sent(proxied: MakeProxied) -> None:
    async def upload(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    async def slow_body() -> AsyncIterator[bytes]:
        for n in range(4):
            await asyncio.sleep(0.25)
            yield b"piece-%d;" % n

    app = web.Application()
    app.router.add_post("/upload", upload)
    p = await proxied(app, timeouts={"first_byte": 0.3})
    async with p.request("POST", "/upload", data=slow_body()) as response:
        assert response.status == 200
        assert await response.read() == b"piece-0;piece-1;piece-2;piece-3;"


async def test_an_answer_that_starts_before_the_body_is_sent_is_not_timed_as_a_head(proxied: MakeProxied) -> None:
    """The upstream answers at once and reads the body later; the first-byte clock must not start when the body
    is finally out (the head came long before)."""
    head_seen = asyncio.Event()

    async def early(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"start;")
        body = await request.read()
        await asyncio.sleep(0.8)
        await response.write(body + b";end")
        return response

    async def body() -> AsyncIterator[bytes]:
        yield b"a"
        await asyncio.wait_for(head_seen.wait(), 10)
        yield b"b"

    app = web.Application()
    app.router.add_post("/early", early)
    p = await proxied(app, timeouts={"first_byte": 0.3})
    async with p.request("POST", "/early", data=body()) as response:
        assert response.status == 200
        head_seen.set()
        assert await response.read() == b"start;ab;end"


async def test_a_get_broken_off_before_its_first_byte_is_sent_again_on_a_fresh_connection(
        proxied: MakeProxied) -> None:
    peers: list[object] = []

    async def flaky(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername"))
        if len(peers) == 1:
            request.transport.abort()
        return web.Response(text="second time lucky")

    app = web.Application()
    app.router.add_get("/", flaky)
    p = await proxied(app)
    async with p.request("GET", "/") as response:
        assert response.status == 200
        assert await response.text() == "second time lucky"
    assert len(set(peers)) == 2


async def test_an_upload_broken_off_before_its_first_byte_is_not_sent_again(proxied: MakeProxied) -> None:
    """A request with a body is not replayed, even with a method that may be (PUT) and right after a wake (when
    refused connects and unanswered requests are tried again): its body went out once and is gone. The client
    gets the 502, the app saw it once."""
    peers: list[object] = []

    async def flaky(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername"))
        request.transport.abort()
        return web.Response(text="never sent")

    app = web.Application()
    app.router.add_put("/", flaky)
    p = await proxied(app)
    p.gateway.waker.settling = lambda *_: True  # type: ignore[method-assign]
    async with p.request("PUT", "/", data=b"payload", headers={"Accept": "application/json"}) as response:
        assert response.status == 502
        assert (await response.json())["error"]["code"] == "upstream-error"
    assert len(peers) == 1



async def test_a_request_without_a_body_goes_upstream_without_one(proxied: MakeProxied) -> None:
    """A DELETE with no body and no ``Content-Length`` (aiohttp's lane: the fast lane takes only GET and HEAD)
    reaches the app as it was sent: no chunked framing of an empty body, which some apps refuse on such a method."""
    p = await proxied(echo_app())
    seen = await echoed(p, "DELETE /items/1")
    assert seen["method"] == "DELETE"
    assert header_values(seen, "Transfer-Encoding") == []


@pytest.mark.parametrize("status", [204, 304])
async def test_bodiless_statuses(proxied: MakeProxied, status: int) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"ETag": '"v1"', "X-Status": str(status)})

    app = web.Application()
    app.router.add_route("*", "/thing", answer)
    p = await proxied(app)
    for method in ("GET", "DELETE"):
        async with p.request(method, "/thing", headers={"If-None-Match": '"v1"'}) as response:
            assert response.status == status
            assert response.headers["X-Status"] == str(status)
            assert response.headers["ETag"] == '"v1"'
            assert await response.read() == b""


async def test_compressed_bodies_pass_untouched(proxied: MakeProxied) -> None:
    original = b"compress me " * 5000
    packed = gzip.compress(original)

    async def zipped(request: web.Request) -> web.Response:
        assert request.headers.get("Content-Encoding") in (None, "gzip")
        if request.method == "POST":
            received = await request.read()
            assert received == packed
            return web.Response(body=received, headers={"Content-Encoding": "gzip"})
        return web.Response(body=packed, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"})

    app = web.Application(handler_args={"auto_decompress": False})  # the upstream sees the bytes as sent
    app.router.add_route("*", "/z", zipped)
    p = await proxied(app)
    async with p.request("GET", "/z", auto_decompress=False) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        assert response.headers["Content-Length"] == str(len(packed))
        assert await response.read() == packed
    async with p.request("POST", "/z", data=packed, headers={"Content-Encoding": "gzip"},
                         auto_decompress=False) as response:
        assert await response.read() == packed


async def test_hop_by_hop_headers_removed_both_ways(proxied: MakeProxied) -> None:
    seen: dict[str, str] = {}

    async def handler(request: web.Request) -> web.Response:
        seen.update(request.headers)
        return web.Response(text="ok", headers={
            "Connection": "X-Upstream-Private", "X-Upstream-Private": "secret", "Keep-Alive": "timeout=5",
            "Proxy-Authenticate": "Basic", "Trailer": "X-Checksum", "X-Kept": "1",
        })

    app = web.Application()
    app.router.add_get("/", handler)
    p = await proxied(app)
    async with p.request("GET", "/", headers={
        "Connection": "keep-alive, X-Client-Private", "X-Client-Private": "secret", "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic eA==", "Proxy-Connection": "keep-alive", "TE": "trailers",
        "Trailer": "X-Checksum", "X-Kept": "1",
    }) as response:
        assert response.status == 200
        for name in ("X-Upstream-Private", "Keep-Alive", "Proxy-Authenticate", "Trailer"):
            assert name not in response.headers, name
        assert response.headers.get("Connection", "keep-alive").lower() == "keep-alive"
        assert response.headers["X-Kept"] == "1"
    lowered = {name.lower() for name in seen}
    for name in ("x-client-private", "keep-alive", "proxy-authorization", "proxy-connection", "te", "trailer"):
        assert name not in lowered, name
    assert seen.get("Connection", "keep-alive").lower() == "keep-alive"
    assert seen["X-Kept"] == "1"


async def test_forwarding_headers_set_by_gateway_and_client_values_replaced(proxied: MakeProxied) -> None:
    p = await proxied(echo_app())
    async with p.request("GET", "/", headers={
        "X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.test",
        "X-Forwarded-Prefix": "/evil", "X-Real-IP": "6.6.6.6", "Forwarded": "for=6.6.6.6",
        "X-Forwarded-User": "admin", "X-Forwarded-Email": "admin@corp", "X-Forwarded-Groups": "admins",
        "Remote-User": "admin", "X-Auth-Request-User": "admin", "X-Codehub-Assertion": "forged",
    }) as response:
        seen = await response.json()
    assert header_values(seen, "X-Forwarded-For") == ["127.0.0.1"]
    assert header_values(seen, "X-Forwarded-Proto") == ["http"]
    assert header_values(seen, "X-Forwarded-Host") == [p.host]
    assert header_values(seen, "Host") == [f"localhost:{p.port}"]
    for name in ("X-Forwarded-Prefix", "X-Real-IP", "Forwarded", "X-Forwarded-User", "X-Forwarded-Email",
                 "X-Forwarded-Groups", "Remote-User", "X-Auth-Request-User", "X-Codehub-Assertion"):
        assert header_values(seen, name) == [], name


async def test_forwarding_headers_appended_for_a_trusted_proxy(proxied: MakeProxied) -> None:
    p = await proxied(echo_app(), trusted_proxies=["127.0.0.0/8"])
    async with p.request("GET", "/", headers={
        "X-Forwarded-For": "203.0.113.7, 10.0.0.1", "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "3000-ws1.preview.example.com", "X-Forwarded-User": "admin",
    }) as response:
        seen = await response.json()
    assert header_values(seen, "X-Forwarded-For") == ["203.0.113.7, 10.0.0.1, 127.0.0.1"]
    assert header_values(seen, "X-Forwarded-Proto") == ["https"]
    assert header_values(seen, "X-Forwarded-Host") == ["3000-ws1.preview.example.com"]
    assert header_values(seen, "X-Forwarded-User") == []  # identity is never taken from a client, trusted or not
    two_headers = CIMultiDict([("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-For", "10.0.0.1")])
    async with p.request("GET", "/", headers=two_headers) as response:
        seen = await response.json()
    assert header_values(seen, "X-Forwarded-For") == ["203.0.113.7, 10.0.0.1, 127.0.0.1"]


async def test_absolute_location_to_the_upstream_points_at_the_share_url(proxied: MakeProxied) -> None:
    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": request.query["to"]})

    app = web.Application()
    app.router.add_get("/go", redirect)
    p = await proxied(app)
    cases = {
        f"{p.upstream_origin}/next?x=1": f"{p.share_origin}/next?x=1",
        f"http://localhost:{p.port}/a#b": f"{p.share_origin}/a#b",
        f"http://127.0.0.1:{p.port}/": f"{p.share_origin}/",
        "/relative/path": "/relative/path",
        "https://elsewhere.example/x": "https://elsewhere.example/x",
    }
    for location, expected in cases.items():
        async with p.request("GET", "/go", params={"to": location}) as response:
            assert response.status == 302
            assert response.headers["Location"] == expected


async def test_the_ide_is_served_on_its_own_origin_and_never_on_the_hub(proxied: MakeProxied) -> None:
    async def handler(request: web.Request) -> web.Response:
        if request.path == "/login":
            raise web.HTTPFound("/welcome")
        if request.path == "/abs":
            raise web.HTTPFound(f"http://localhost:{request.url.port}/x?y=1")
        return web.json_response({"raw_path": request.raw_path, "prefix": request.headers.get("X-Forwarded-Prefix"),
                                  "host": request.headers["Host"],
                                  "forwarded_host": request.headers["X-Forwarded-Host"]})

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    p = await proxied(app, ide=True)
    async with p.request("GET", "/static/app.js?v=1", host=IDE) as response:
        assert response.status == 200
        assert await response.json() == {"raw_path": "/static/app.js?v=1", "prefix": None,
                                         "host": f"localhost:{p.port}", "forwarded_host": IDE}
        # The IDE frames itself (code-server's webviews) and nobody else may frame it.
        assert "frame-ancestors 'self'" in response.headers.getall("Content-Security-Policy")
        assert response.headers["X-Frame-Options"] == "SAMEORIGIN"
    async with p.request("GET", "/login", host=IDE) as response:
        assert response.status == 302
        assert response.headers["Location"] == "/welcome"
    async with p.request("GET", "/abs", host=IDE) as response:
        assert response.headers["Location"] == f"http://{IDE}/x?y=1"
    # Old links on the hub move to the IDE's origin; nothing of the workspace is served on the hub.
    for path, location in [("/w/ws1?folder=/home", "/?folder=/home"), ("/w/ws1/", "/"),
                           ("/w/ws1/static/app.js?v=1", "/static/app.js?v=1"), ("/w/ws1//evil.test/", "//evil.test/")]:
        async with p.request("GET", path, host=HUB) as response:
            assert response.status == 308
            assert response.headers["Location"] == f"http://{IDE}{location}"
            assert await response.read() == b""
    async with p.request("GET", "/", host=f"{p.port}-ws1.localhost:8080") as response:
        assert response.status == 403  # the IDE port is not a preview


async def test_set_cookie_naming_the_parent_domain_is_dropped(proxied: MakeProxied) -> None:
    async def cookies(request: web.Request) -> web.Response:
        response = web.Response(text="ok")
        for value in ("hostonly=1; Path=/; HttpOnly", "parent=1; Domain=localhost; Path=/",
                      "dotted=1; Domain=.LocalHost", "mine=1; Domain=" + request.headers["X-Forwarded-Host"],
                      "codehub_session=forged; Path=/", "__Host-codehub-s=forged; Path=/; Secure"):
            response.headers.add("Set-Cookie", value.replace(":8080", ""))
        return response

    app = web.Application()
    app.router.add_get("/", cookies)
    p = await proxied(app)
    async with p.request("GET", "/") as response:
        kept = response.headers.getall("Set-Cookie")
    assert kept == ["hostonly=1; Path=/; HttpOnly", f"mine=1; Domain={p.host.removesuffix(':8080')}"]


async def test_keep_alive_connections_to_the_upstream_are_reused(proxied: MakeProxied) -> None:
    async def peer_port(request: web.Request) -> web.Response:
        assert request.transport is not None
        return web.Response(text=str(request.transport.get_extra_info("peername")[1]))

    app = web.Application()
    app.router.add_get("/", peer_port)
    p = await proxied(app)
    ports = set()
    for _ in range(30):
        async with p.request("GET", "/") as response:
            ports.add(await response.text())
    assert len(ports) <= 2, ports


@pytest.mark.parametrize("stage", ["before-headers", "mid-body"])
async def test_client_disconnect_cancels_the_upstream_request(proxied: MakeProxied, stage: str) -> None:
    started, ended = asyncio.Event(), asyncio.Event()
    outcome: list[str] = []

    async def slow(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        try:
            if stage == "mid-body":
                await response.prepare(request)
                await response.write(b"first piece")
            started.set()
            for _ in range(600):
                await asyncio.sleep(0.05)
                if stage == "mid-body":
                    await response.write(b".")
            outcome.append("completed")
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise
        except ConnectionError:
            outcome.append("connection closed")
        finally:
            ended.set()
        return response

    app = web.Application()
    app.router.add_get("/slow", slow)
    p = await proxied(app)
    reader, writer = await asyncio.open_connection(p.client.host, p.client.port)
    writer.write(f"GET /slow HTTP/1.1\r\nHost: {p.host}\r\n\r\n".encode())
    await asyncio.wait_for(started.wait(), 10)
    if stage == "mid-body":
        assert b"first piece" in await asyncio.wait_for(reader.readuntil(b"first piece"), 10)
    writer.transport.abort()
    await asyncio.wait_for(ended.wait(), 10)
    assert outcome in (["cancelled"], ["connection closed"])


@pytest.mark.parametrize("method", ["GET", "POST"])  # the fast lane, aiohttp's lane
async def test_a_client_leaving_an_event_stream_leaves_nothing_held_in_the_pool(proxied: MakeProxied,
                                                                                method: str) -> None:
    """An event stream gives its place in flight back when its head is in (the pool's limit); the client leaving
    mid-stream must then end it without its connection, not leave it counted busy."""
    ended = asyncio.Event()

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        try:
            await asyncio.sleep(30)
        finally:
            ended.set()
        return response

    app = web.Application()
    app.router.add_route(method, "/events", events)
    p = await proxied(app)
    reader, writer = await asyncio.open_connection(p.client.host, p.client.port)
    body = "Content-Length: 2\r\n\r\n{}" if method == "POST" else "\r\n"
    writer.write(f"{method} /events HTTP/1.1\r\nHost: {p.host}\r\n{body}".encode())
    await asyncio.wait_for(reader.readuntil(b"data: first\n\n"), 10)
    assert p.gateway.pool.connections() == (0, 1)
    writer.transport.abort()
    await asyncio.wait_for(ended.wait(), 10)
    for _ in range(100):
        if p.gateway.pool.connections() == (0, 0):
            break
        await asyncio.sleep(0.02)
    assert p.gateway.pool.connections() == (0, 0)


async def test_request_held_for_a_wake_survives_a_port_probing_dev_server(make_gateway: MakeGateway) -> None:
    """Like Vite, the workspace's server answers the wake's readiness probe from a throwaway listener and binds
    the real one a moment later: the held request must still reach it, not get a 502."""
    address = next_address()
    port = free_port(address)
    command = [sys.executable, str(Path(__file__).with_name("port_prober.py")), "{host}", str(port)]
    client = await make_gateway(workspaces={"ws1": workspace(address, command=command, ports={port: "public"})})
    async with asyncio.timeout(30), client.get("/", headers={"Host": f"{port}-ws1.localhost:8080"}) as response:
        assert response.status == 200, await response.text()
        assert await response.text() == "served by the real server"


async def test_a_workspace_deleted_the_moment_it_woke_is_not_found_not_a_500(proxied: MakeProxied,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """On Kubernetes a workspace can be deleted between its wake's end and the held request going on (the
    informer's event comes in between): the request gets the 404 any request for a deleted workspace gets."""
    p = await proxied(echo_app())
    runtime = p.gateway.runtime
    assert isinstance(runtime, MemoryRuntime)
    await runtime.stop(WORKSPACE)
    woken = runtime.wake

    async def woke_then_deleted(name: str) -> WorkspaceState:
        state = await woken(name)
        asyncio.get_running_loop().call_soon(delete, name)
        return state

    def delete(name: str) -> None:
        del runtime._states[name]

    monkeypatch.setattr(runtime, "wake", woke_then_deleted)
    async with p.request("GET", "/") as response:
        assert response.status == 404, await response.text()
        assert (await response.json())["error"]["code"] == "workspace-not-found"

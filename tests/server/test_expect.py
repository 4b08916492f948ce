"""``Expect: 100-continue`` (``server.expect``): told to go on only where the body is wanted, never before a
refusal; raw sockets throughout, as what matters is which bytes come and when. Several cases are a helper's
attacks on the first version: a Latin-1 header byte that left the connection unanswered for good, the next request
read as a refused upload's body, the gateway's own endpoints asking for bodies they then refused; and of a
second: a stream answering a held-back body, a refused POST without ``Expect`` losing its connection, the 408 of a
body that stopped coming neither logged with its reason nor counted."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.auth.identity import Identity
from gateway.server.context import GATEWAY
from tests.conftest import MakeGateway, scrape
from tests.server.conftest import HUB, WORKSPACE, MakeProxied, raw_upstream, sent_raw
from tests.server.test_proxy_http import echo_app
from tests.server.test_proxy_websocket import echo_app as ws_echo_app

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


async def _expecting(client: TestClient[web.Request, web.Application], head: str | bytes, expect: str = "100-continue"
                     ) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    """Send ``head`` (with ``Expect: 100-continue``, or ``expect``) and no body, as curl does with an upload: the
    first answer, and the connection."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write((head if isinstance(head, bytes) else head.encode()) + f"Expect: {expect}\r\n\r\n".encode())
    async with asyncio.timeout(10):
        return await reader.readuntil(b"\r\n\r\n"), reader, writer


async def _uploaded(client: TestClient[web.Request, web.Application], head: str | bytes, body: bytes) -> bytes:
    """``head`` (which closes the connection after its answer) expecting ``100-continue``; once told to go on,
    ``body``: the answer."""
    first, reader, writer = await _expecting(client, head)
    try:
        assert first == _CONTINUE
        writer.write(body)
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


@pytest.mark.parametrize("port", ["private", "not listening"])
async def test_an_upload_refused_on_its_head_is_never_told_to_go_on(proxied: MakeProxied, port: str) -> None:
    """A client that expects ``100-continue`` holds its body back until told to go on: a request the gateway refuses
    on its head (no credentials for a private port; nothing listening on a public one) gets its final answer first,
    so a 1 GB upload costs nothing. aiohttp's router said ``100 Continue`` before the plan was made."""
    seen: list[str] = []

    async def upload(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(text="taken")

    app = web.Application()
    app.router.add_put("/upload", upload)
    p = await (proxied(app, visibility="private") if port == "private" else proxied(None))
    first, _reader, writer = await _expecting(
        p.client, f"PUT /upload HTTP/1.1\r\nHost: {p.host}\r\nAccept: application/json\r\n"
        "Content-Length: 1000000000\r\n")
    writer.close()
    assert first.startswith(b"HTTP/1.1 401 " if port == "private" else b"HTTP/1.1 502 "), first
    assert b"\r\nConnection: close\r\n" in first  # the body it held back is not read as its next request
    assert seen == []


_FRAMED = {
    "length": ("Content-Length: 5", b"12345"),
    "chunked": ("Transfer-Encoding: chunked", b"5\r\n12345\r\n0\r\n\r\n"),
}


@pytest.mark.parametrize("framing", list(_FRAMED))
@pytest.mark.parametrize("state", ["running", "asleep"])
async def test_an_upload_is_told_to_go_on_once_its_upstream_took_the_head(proxied: MakeProxied, state: str,
                                                                          framing: str) -> None:
    """Through a wake too: the held upload is told to go on once the workspace is up and its port took the head."""
    async def upload(request: web.Request) -> web.Response:
        return web.Response(text=f"{len(await request.read())} bytes")

    app = web.Application()
    app.router.add_put("/upload", upload)
    p = await proxied(app)
    if state == "asleep":
        await p.gateway.runtime.stop(WORKSPACE)
    field, body = _FRAMED[framing]
    answer = await _uploaded(p.client, f"PUT /upload HTTP/1.1\r\nHost: {p.host}\r\n{field}\r\nConnection: close\r\n",
                             body)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert answer.endswith(b"5 bytes")


async def test_the_app_gets_the_body_without_the_expectation(proxied: MakeProxied) -> None:
    """The gateway answered ``Expect``; the app gets the whole body and no ``Expect`` (nothing would answer it)."""
    async def upload(request: web.Request) -> web.Response:
        return web.Response(text=f"{len(await request.read())} bytes; expect={request.headers.get('Expect')}")

    app = web.Application()
    app.router.add_put("/upload", upload)
    p = await proxied(app)
    body = b"z" * 100_000
    answer = await _uploaded(p.client, f"PUT /upload HTTP/1.1\r\nHost: {p.host}\r\nContent-Length: {len(body)}\r\n"
                             "Connection: close\r\n", body)
    head, _, text = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert text.endswith(b"100000 bytes; expect=None")


async def test_an_http_1_0_client_is_never_told_to_go_on(proxied: MakeProxied) -> None:
    """HTTP/1.0 has no interim answers (RFC 9110 §15.2): its body comes with its head, its answer is the only one."""
    p = await proxied(echo_app())
    raw = await sent_raw(p, f"PUT /upload HTTP/1.0\r\nHost: {p.host}\r\nExpect: 100-continue\r\n"
                            "Content-Length: 5\r\n\r\n12345".encode())
    assert raw.startswith(b"HTTP/1.0 200 "), raw  # the one answer, as HTTP/1.0
    assert b"100 Continue" not in raw


async def test_an_upload_told_to_go_on_still_gets_its_error_page(proxied: MakeProxied) -> None:
    """The ``100`` is no part of the answer: an upstream that breaks off after the body is a 502, not a closed
    connection (aiohttp's lane closes one whose answer had begun)."""
    p = await proxied(None)

    async def breaks_off(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(5)
        writer.close()

    async with raw_upstream(p, breaks_off):
        answer = await _uploaded(p.client, f"PUT /upload HTTP/1.1\r\nHost: {p.host}\r\nContent-Length: 5\r\n"
                                 "Accept: application/json\r\nConnection: close\r\n", b"12345")
    assert answer.startswith(b"HTTP/1.1 502 "), answer
    assert b'"code": "upstream-error"' in answer


async def test_the_gateways_own_form_is_told_to_go_on(make_gateway: MakeGateway) -> None:
    """A body the gateway reads itself (the sign-in form here) is asked for once the plan serves it."""
    client = await make_gateway(workspaces={})
    form = b"user=alice&groups=&next=%2F"
    answer = await _uploaded(client, f"POST /auth/dev HTTP/1.1\r\nHost: {HUB}\r\nOrigin: http://{HUB}\r\n"
                             "Content-Type: application/x-www-form-urlencoded\r\n"
                             f"Content-Length: {len(form)}\r\nConnection: close\r\n", form)
    assert answer.startswith(b"HTTP/1.1 303 "), answer
    assert b"codehub_session" in answer


async def test_an_upload_with_a_latin1_header_byte_is_told_to_go_on(proxied: MakeProxied) -> None:
    """A header value of Latin-1 bytes (allowed: RFC 9110 §5.5) made taking ``Expect`` off the request fail, outside
    aiohttp's ``try``: no answer, no log line, and the connection held for good (neither the head nor the keep-alive
    timer runs then), so a few such heads took every connection slot."""
    p = await proxied(echo_app())
    answer = await _uploaded(p.client, b"PUT /u HTTP/1.1\r\nHost: " + p.host.encode() + b"\r\n"
                             b"X-File-Name: caf\xe9.txt\r\nContent-Length: 5\r\nConnection: close\r\n", b"12345")
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert b'"body": "12345"' in answer
    assert b'["X-File-Name", "caf\\udce9.txt"]' in answer  # the byte went on as it came (the echo app's escape)


async def test_a_request_after_a_refused_upload_is_not_read_as_its_body(proxied: MakeProxied) -> None:
    """A client never told to go on sends no body, and may reuse the connection (Ruby's Net::HTTP does): its next
    request was read as the refused upload's body, the rest of it as a malformed request (400). The refusal now
    ends the connection and says so."""
    p = await proxied(None)
    first, reader, writer = await _expecting(
        p.client, f"PUT /u HTTP/1.1\r\nHost: {p.host}\r\nAccept: application/json\r\nContent-Length: 5\r\n")
    try:
        assert first.startswith(b"HTTP/1.1 502 "), first
        assert b"\r\nConnection: close\r\n" in first
        writer.write(f"GET /next HTTP/1.1\r\nHost: {p.host}\r\n\r\n".encode())
        async with asyncio.timeout(20):
            rest = await reader.read()
    finally:
        writer.close()
    assert b"HTTP/1.1" not in rest, rest


@pytest.mark.parametrize(("path", "status"), [
    ("/auth/dev", b"413"),  # its length over limits.body
    ("/api/v1/tokens", b"401"),  # no credentials
    ("/nowhere", b"404"),
])
async def test_the_gateways_own_endpoints_refuse_on_the_head_before_asking(make_gateway: MakeGateway, path: str,
                                                                           status: bytes) -> None:
    client = await make_gateway(workspaces={}, limits={"body": 4096})
    first, _reader, writer = await _expecting(
        client, f"POST {path} HTTP/1.1\r\nHost: {HUB}\r\nOrigin: http://{HUB}\r\nAccept: application/json\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100000000\r\n")
    writer.close()
    assert first.startswith(b"HTTP/1.1 " + status + b" "), first
    assert b"\r\nConnection: close\r\n" in first


@pytest.mark.parametrize(("length", "first"), [(4096, _CONTINUE[:12]), (4097, b"HTTP/1.1 413")])
async def test_the_gateways_own_endpoint_takes_a_body_of_exactly_its_limit(make_gateway: MakeGateway, length: int,
                                                                          first: bytes) -> None:
    client = await make_gateway(workspaces={}, limits={"body": 4096})
    answer, _reader, writer = await _expecting(
        client, f"POST /auth/dev HTTP/1.1\r\nHost: {HUB}\r\nOrigin: http://{HUB}\r\n"
        f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {length}\r\n")
    writer.close()
    assert answer.startswith(first), answer


@pytest.mark.parametrize("lane", ["preview", "own API"])
async def test_an_expectation_other_than_100_continue_is_a_417(proxied: MakeProxied, lane: str) -> None:
    """RFC 9110 §10.1.1: an expectation the server does not know fails the request; only ``100-continue`` (in any
    case) is the gateway's to answer."""
    p = await proxied(echo_app())
    host, path = (p.host, "/upload") if lane == "preview" else (HUB, "/api/v1/tokens")
    first, _reader, writer = await _expecting(
        p.client, f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\nContent-Length: 5\r\n",
        expect="200-ok")
    writer.close()
    assert first.startswith(b"HTTP/1.1 417 "), first


@pytest.mark.parametrize("chunked", [False, True])
async def test_an_api_call_is_told_to_go_on_once_it_may(make_gateway: MakeGateway, chunked: bool) -> None:
    """A script's JSON (curl sends ``Expect`` with a large one), once its caller is known; ``chunked``: its length
    is not known before it came, so it is read (within ``limits.body``), not refused on its head."""
    client = await make_gateway(workspaces={})
    session = client.app[GATEWAY].auth.sessions.issue(Identity("alice"), HUB)
    body = b'{"name": "from a script"}'
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"
    answer = await _uploaded(
        client, f"POST /api/v1/tokens HTTP/1.1\r\nHost: {HUB}\r\nOrigin: http://{HUB}\r\nAccept: application/json\r\n"
        f"Cookie: codehub_session={session}\r\nContent-Type: application/json\r\n{framing}\r\n"
        "Connection: close\r\n", b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if chunked else body)
    assert answer.startswith(b"HTTP/1.1 201 "), answer
    assert b'"name": "from a script"' in answer


async def _read_for(reader: asyncio.StreamReader, seconds: float) -> tuple[bytes, bool]:
    """What arrives within ``seconds``, and whether the gateway closed the connection meanwhile."""
    out = b""
    try:
        async with asyncio.timeout(seconds):
            while chunk := await reader.read(65536):
                out += chunk
    except TimeoutError:
        return out, False
    return out, True


@pytest.mark.parametrize("where", ["private preview port", "own API"])
async def test_a_post_refused_while_its_body_still_arrives_keeps_its_connection(
        make_gateway: MakeGateway, proxied: MakeProxied, where: str) -> None:
    """A browser's form POST (no ``Expect``) whose body comes a moment after its head (a second segment, as any body
    over one TCP segment does on a real network), refused on its head (401: signed out), keeps its connection: the
    client sends its body whatever the answer, aiohttp's linger reads it, and the next request is served (a second
    pass's finding: a first version ended every connection whose body was not all in)."""
    if where == "own API":
        client = await make_gateway(workspaces={})
        host, path, ctype, body = HUB, "/api/v1/tokens", "application/json", b'{"name":"x"}'
        nxt = f"GET /healthz HTTP/1.1\r\nHost: {HUB}\r\n\r\n"
    else:
        p = await proxied(echo_app(), visibility="private")
        client, host = p.client, p.host
        path, ctype, body = "/form", "application/x-www-form-urlencoded", b"a=b"
        nxt = f"GET /two HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\n\r\n"
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\n"
                     f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        await asyncio.sleep(0.2)
        writer.write(body)  # the body, as a second segment
        await asyncio.sleep(0.2)
        writer.write(nxt.encode())
        out, _closed = await _read_for(reader, 3)
    finally:
        writer.close()
    assert out.startswith(b"HTTP/1.1 401 "), out
    first_head = out.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nConnection: close" not in first_head, first_head
    assert out.count(b"HTTP/1.1 ") == 2, out  # the next request was answered too


@pytest.mark.parametrize("method", ["POST", "HEAD"])
async def test_an_expecting_request_answered_by_a_stream_is_not_followed_by_its_body(proxied: MakeProxied,
                                                                                     method: str) -> None:
    """The wake-events stream (a gateway page for any method) answers an ``Expect: 100-continue`` request without
    asking for its body, so the client sends none (RFC 9110 §10.1.1) and may reuse the connection: the stream too
    ends it, or the next request would be read as that body (400 ``bad-request-line``; a second pass's finding: a
    first version looked only at answers not yet prepared)."""
    p = await proxied(echo_app())
    reader, writer = await asyncio.open_connection(p.client.host, p.client.port)
    try:
        writer.write(f"{method} /_codehub/wake/events HTTP/1.1\r\nHost: {p.host}\r\nContent-Length: 5\r\n"
                     "Expect: 100-continue\r\n\r\n".encode())
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 "), head  # no 100 first: the final answer
            if method == "POST":
                await reader.readuntil(b"0\r\n\r\n")  # the stream ends (the port is up: "ready")
        writer.write(f"GET /next HTTP/1.1\r\nHost: {p.host}\r\nAccept: application/json\r\n\r\n".encode())
        rest, closed = await _read_for(reader, 12)
    finally:
        writer.close()
    assert b"bad-request-line" not in rest, rest
    # either the connection ended (best said in the head), or the next request was served as one
    assert (closed and rest == b"") or rest.startswith(b"HTTP/1.1 200 "), (head, rest)


@pytest.mark.parametrize("where", ["own form", "own form, told to go on", "preview upload"])
async def test_a_body_that_stops_coming_is_a_408_logged_and_counted_with_its_reason(
        proxied: MakeProxied, caplog: pytest.LogCaptureFixture, where: str) -> None:
    """A form's head whose body never came held its connection for good (``body_timeout`` bounded only bodies
    streamed to previews); now the whole body must come within it. A refusal of the client's, as its 413
    (``body-too-large``) and the head's 408 (``head-timeout``) are: one access-log line with its reason, one count
    (a helper's finding: neither was there); and the connection ends with it."""
    p = await proxied(echo_app(), limits={"body_timeout": 0.3})
    client = p.client
    if where.startswith("own form"):
        head = (f"POST /auth/dev HTTP/1.1\r\nHost: {HUB}\r\nOrigin: http://{HUB}\r\n"
                "Content-Type: application/x-www-form-urlencoded\r\n")
    else:
        head = f"PUT /upload HTTP/1.1\r\nHost: {p.host}\r\n"
    head += "Accept: application/json\r\nContent-Length: 5\r\n"
    with caplog.at_level(logging.INFO, logger="codehub.access"):
        if where.endswith("told to go on"):
            first, reader, writer = await _expecting(client, head)
            assert first == _CONTINUE
        else:
            reader, writer = await asyncio.open_connection(client.host, client.port)
            writer.write(f"{head}\r\n".encode())
        try:
            async with asyncio.timeout(10):
                answer = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"\r\nContent-Length: (\d+)\r\n", answer)
                assert length is not None, answer
                body = await reader.readexactly(int(length.group(1)))
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"\r\nConnection: close\r\n" in answer
        if where.startswith("own form"):  # the gateway's own handler waited for it: it says how long
            assert json.loads(body)["error"]["message"] == "The request's body did not arrive within 0.3 s."
        for _ in range(50):
            if [r for r in caplog.records if r.name == "codehub.access"]:
                break
            await asyncio.sleep(0.05)
    assert "Traceback" not in caplog.text
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "codehub.access"]
    assert [(line["status"], line.get("reason")) for line in lines] == [(408, "body-timeout")]
    assert 'codehub_bad_requests_total{reason="body-timeout"} 1.0' in await scrape(client.app)


async def test_a_websocket_upgrade_that_expects_100_continue_is_still_an_upgrade(proxied: MakeProxied) -> None:
    """A scripted client may send ``Expect`` on an upgrade: it holds no body back, so its 101 must not say
    ``Connection: close`` (RFC 6455 §4.1: the client fails such a handshake; a third pass's finding)."""
    p = await proxied(ws_echo_app())
    key = base64.b64encode(os.urandom(16)).decode()
    reader, writer = await asyncio.open_connection(p.client.host, p.client.port)
    try:
        writer.write(f"GET /ws HTTP/1.1\r\nHost: {p.host}\r\nOrigin: {p.share_origin}\r\nUpgrade: websocket\r\n"
                     f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                     "Expect: 100-continue\r\n\r\n".encode())
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert b"\r\nConnection: upgrade\r\n" in head, head
    async with p.client.ws_connect("/ws", headers={"Host": p.host, "Origin": p.share_origin,  # a client's check
                                                  "Expect": "100-continue"}) as ws:
        await ws.send_str("hi")
        assert (await ws.receive(timeout=10)).data == "hi"


@pytest.mark.parametrize(("method", "length"), [("POST", None), ("POST", "0"), ("GET", None)])
async def test_an_expectation_without_a_body_keeps_its_connection(proxied: MakeProxied, method: str,
                                                                  length: str | None) -> None:
    """Some clients send ``Expect`` on every POST, body or not (.NET Framework's ``HttpWebRequest``): without a body
    nothing is held back, so the answer keeps the connection and a request pipelined behind it is served (a third
    pass's finding: it was taken for a refusal of a held body)."""
    p = await proxied(echo_app())
    framing = f"Content-Length: {length}\r\n" if length is not None else ""
    reader, writer = await asyncio.open_connection(p.client.host, p.client.port)
    try:
        writer.write(f"{method} /a HTTP/1.1\r\nHost: {p.host}\r\n{framing}Expect: 100-continue\r\n\r\n"
                     f"GET /b HTTP/1.1\r\nHost: {p.host}\r\n\r\n".encode())
        out, _closed = await _read_for(reader, 3)
    finally:
        writer.close()
    assert out.startswith(b"HTTP/1.1 200 "), out
    assert b"100 Continue" not in out  # nothing to go on with: no 100 is right
    assert b"\r\nConnection: close" not in out.split(b"\r\n\r\n", 1)[0], out
    assert out.count(b"HTTP/1.1 200 ") == 2, out  # the pipelined GET answered too

"""Quiet under hostile input: whatever bytes a client sends, a malformed or refused request is one clean answer
(its status, a JSON error naming the reason, nothing of what was sent), one access-log line with that reason and
one count in ``codehub_bad_requests_total{reason}`` — and no other log record, no ERROR, no traceback — in either
lane. Each limit is a setting, and each has its test here.

Raw bytes go over a real socket to a real gateway; logs are captured from every logger (``aiohttp.*``,
``gateway.*``, ``codehub.access``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from gateway.auth.identity import Identity
from gateway.server import refusals
from gateway.server.fastlane import FastLaneServer
from gateway.server.refusals import Reason, refusal
from tests.conftest import next_address
from tests.server.conftest import MakeProxied, Proxied, free_port
from tests.server.test_proxy_http import echo_app

REPO = Path(__file__).resolve().parents[2]
HUB = "localhost:8080"


@dataclass
class Answer:
    status: int
    head: bytes
    body: bytes
    closed: bool  # the gateway closed the connection after this answer


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        lengths = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(
            b"content-length:")]
        body = await reader.readexactly(lengths[0]) if lengths else b""
    closed = b"connection: close" in head.lower()
    return Answer(int(head.split(b" ")[1]), head, body, closed)


async def closed_by_gateway(reader: asyncio.StreamReader) -> bool:
    """Whether the gateway ends the connection (bounded wait: the settings under test are well below it)."""
    try:
        async with asyncio.timeout(10):
            return await reader.read() == b""
    except (TimeoutError, ConnectionResetError):
        return False


PRELUDES = {
    "fresh": b"",  # the first request of a connection: read by the fast lane, refused by aiohttp's
    "after-fast-lane": b"GET /first HTTP/1.1\r\nHost: {host}\r\n\r\n",
    "after-aiohttp-lane": b"POST /first HTTP/1.1\r\nHost: {host}\r\nContent-Length: 2\r\n\r\nhi",
}
"""Where on a connection the hostile request comes: first, after a request the fast lane served, or after one that
aiohttp's lane served (the connection is aiohttp's from then on)."""


async def after(p: Proxied, prelude: str, host: str | None = None,
                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the gateway that went through the prelude (its answer read), to ``host`` (``p.host``)."""
    reader, writer = await asyncio.open_connection(p.client.host, p.client.port)
    first = PRELUDES[prelude].replace(b"{host}", (host or p.host).encode())
    if first:
        writer.write(first)
        assert (await read_answer(reader)).status == 200
    return reader, writer


async def exchange(p: Proxied, raw: bytes, prelude: str, caplog: pytest.LogCaptureFixture, host: str | None = None,
                   ) -> tuple[Answer, asyncio.StreamReader, asyncio.StreamWriter]:
    """Send the prelude (and read its answer), then ``raw``; the answer to ``raw``, with logs captured only for it.
    ``{host}`` in either is ``host`` (``p.host``)."""
    reader, writer = await after(p, prelude, host)
    caplog.clear()
    writer.write(raw.replace(b"{host}", (host or p.host).encode()))
    return await read_answer(reader), reader, writer


def quiet_refusal(caplog: pytest.LogCaptureFixture, status: int, reason: str, *, method: str | None = None,
                  ) -> dict[str, Any]:
    """Exactly one access line, with the status and the reason; no other record at WARNING or above, none with a
    traceback, none from aiohttp. The access line, parsed."""
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info or r.name.startswith("aiohttp")]
    assert loud == [], [(r.name, r.levelname, r.getMessage()) for r in loud]
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "codehub.access"]
    assert len(lines) == 1, lines
    line: dict[str, Any] = lines[0]
    assert (line["status"], line["reason"], line["method"]) == (status, reason, method), line
    return line


def assert_refused(answer: Answer, status: int, reason: str) -> None:
    """The refusal's JSON, word for word: nothing of the request is echoed."""
    assert answer.status == status, answer.head
    assert json.loads(answer.body) == refusal(Reason(reason)).document()
    assert b"no-store" in answer.head


async def counted(p: Proxied, reason: str, times: int = 1) -> None:
    assert f'codehub_bad_requests_total{{reason="{reason}"}} {times:.1f}' in await p.metrics()


HOSTILE = [
    ("two-hosts", b"GET /x HTTP/1.1\r\nHost: {host}\r\nHost: {host}\r\n\r\n", 400, "duplicate-header"),
    ("content-length-and-chunked", b"POST /x HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 400, "bad-framing"),
    ("two-content-lengths", b"POST /x HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"
     b"hello!", 400, "bad-framing"),
    ("negative-content-length", b"POST /x HTTP/1.1\r\nHost: {host}\r\nContent-Length: -5\r\n\r\nhello", 400,
     "bad-framing"),
    ("unknown-transfer-coding", b"POST /x HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: gzip\r\n\r\n", 400,
     "bad-framing"),
    ("bad-chunk-size", b"POST /x HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n"
     b"0\r\n\r\n", 400, "bad-chunk"),
    ("chunk-without-crlf", b"POST /x HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX"
     b"0\r\n\r\n", 400, "bad-chunk"),
    ("garbage-request-line", b"GARBAGE\r\n\r\n", 400, "bad-request-line"),
    ("bad-method", b"G(T /x HTTP/1.1\r\nHost: {host}\r\n\r\n", 400, "bad-request-line"),
    ("bad-version", b"GET /x HTTP/9.9\r\nHost: {host}\r\n\r\n", 400, "bad-request-line"),
    ("control-char-in-url", b"GET /a\x01b HTTP/1.1\r\nHost: {host}\r\n\r\n", 400, "bad-request-line"),
    ("tls-on-plain-http", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, "bad-request-line"),
    ("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "bad-request-line"),
    ("bare-lf", b"GET /x HTTP/1.1\nHost: {host}\n\n", 400, "bad-request-line"),
    ("bare-cr", b"GET /x HTTP/1.1\rHost: {host}\r\n\r\n", 400, "malformed"),  # none of the parser's words fit
    ("control-char-in-header", b"GET /x HTTP/1.1\r\nHost: {host}\r\nX-A: a\x01b\r\n\r\n", 400, "bad-header"),
    ("nul-in-header", b"GET /x HTTP/1.1\r\nHost: {host}\r\nX-A: a\x00b\r\n\r\n", 400, "bad-header"),
    ("space-in-header-name", b"GET /x HTTP/1.1\r\nHost: {host}\r\nBad Header: yes\r\n\r\n", 400, "bad-header"),
    ("folded-header", b"GET /x HTTP/1.1\r\nHost: {host}\r\nX-A: a\r\n b\r\n\r\n", 400, "bad-header"),
    ("no-host", b"GET /x HTTP/1.1\r\nX-A: a\r\n\r\n", 400, "bad-header"),
    ("long-url", b"GET /" + b"p" * 9000 + b" HTTP/1.1\r\nHost: {host}\r\n\r\n", 414, "url-too-long"),
    ("long-header", b"GET /x HTTP/1.1\r\nHost: {host}\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431,
     "headers-too-large"),
    ("long-header-name", b"GET /x HTTP/1.1\r\nHost: {host}\r\nX-" + b"a" * 9000 + b": 1\r\n\r\n", 431,
     "headers-too-large"),
    ("many-headers", b"GET /x HTTP/1.1\r\nHost: {host}\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101))
     + b"\r\n", 431, "headers-too-large"),
]


@pytest.mark.parametrize("prelude", list(PRELUDES))
@pytest.mark.parametrize(("raw", "status", "reason"), [case[1:] for case in HOSTILE], ids=[c[0] for c in HOSTILE])
async def test_a_malformed_request_is_one_quiet_refusal(proxied: MakeProxied, caplog: pytest.LogCaptureFixture,
                                                        prelude: str, raw: bytes, status: int, reason: str) -> None:
    caplog.set_level(logging.DEBUG)
    p = await proxied(echo_app())
    answer, reader, writer = await exchange(p, raw, prelude, caplog)
    try:
        assert_refused(answer, status, reason)
        assert await closed_by_gateway(reader)  # what follows a malformed head has no known framing
    finally:
        writer.close()
    quiet_refusal(caplog, status, reason)
    await counted(p, reason)


@pytest.mark.parametrize("where", ["preview", "hub"])
async def test_a_malformed_chunk_mid_body_ends_that_request_with_a_400(
        proxied: MakeProxied, caplog: pytest.LogCaptureFixture, where: str) -> None:
    """The head was fine and the request was on its way (to the app, or to a hub handler) when its body broke:
    that request gets the 400, not a 502 or a hang, and the app never sees a body that looks whole."""
    caplog.set_level(logging.DEBUG)
    bodies: list[str] = []

    async def upload(request: web.Request) -> web.Response:
        try:
            bodies.append((await request.read()).decode())
        except Exception as exc:
            bodies.append(type(exc).__name__)
            raise
        return web.Response(text="whole")

    app = web.Application()
    app.router.add_post("/up", upload)
    p = await proxied(app)
    host, path = (p.host, "/up") if where == "preview" else (HUB, "/auth/dev")
    reader, writer = await asyncio.open_connection(p.client.host, p.client.port)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nOrigin: http://{HUB}\r\n"
                     "Content-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n"
                     "6\r\nuser=a\r\n".encode())
        await writer.drain()
        await asyncio.sleep(0.2)  # the request is being served, its body half read
        caplog.clear()
        writer.write(b"zz\r\n")
        answer = await read_answer(reader)
        assert_refused(answer, 400, "bad-chunk")
        assert await closed_by_gateway(reader)
    finally:
        writer.close()
    line = quiet_refusal(caplog, 400, "bad-chunk", method="POST")
    assert line["path"] == path
    await counted(p, "bad-chunk")
    assert "whole" not in bodies


async def test_the_gateways_own_bug_is_logged_once_with_its_traceback(
        proxied: MakeProxied, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a refusal: a 500, and one ERROR with the traceback, so the bug gets fixed."""
    caplog.set_level(logging.DEBUG)
    p = await proxied(echo_app())

    async def broken(*args: object) -> web.StreamResponse:
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr("gateway.server.app.execute", broken)
    answer, _, writer = await exchange(p, b"POST /x HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n", "fresh",
                                       caplog)
    writer.close()
    assert answer.status == 500
    assert b"a bug of ours" not in answer.body
    assert json.loads(answer.body)["error"]["message"] == "The gateway hit an unexpected error; it has been logged."
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert errors[0].getMessage() == 'unhandled error for "POST" "/x"'  # which request, quoted as log_text does
    assert errors[0].exc_info is not None
    assert "a bug of ours" in str(errors[0].exc_info[1])
    assert "codehub_bad_requests_total{" not in await p.metrics()


# --- limits -------------------------------------------------------------------------------------------------

LIMITS = {"request_line": 512, "header_size": 1024, "header_count": 20}


def head(path: str = "/x", headers: int = 0, header_bytes: int = 0) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: {host}"]
    lines += [f"X-N{i}: 1" for i in range(headers)]
    if header_bytes:
        lines.append("X-Big: " + "b" * header_bytes)
    return "\r\n".join([*lines, "", ""]).encode()


@pytest.mark.parametrize("prelude", list(PRELUDES))
@pytest.mark.parametrize(
    ("raw", "status", "reason"),
    [
        (head("/" + "u" * 400), 200, None),
        (head("/" + "u" * 600), 414, "url-too-long"),
        (head(header_bytes=900), 200, None),
        (head(header_bytes=1100), 431, "headers-too-large"),
        (head(headers=15), 200, None),
        (head(headers=25), 431, "headers-too-large"),
    ],
    ids=["url-under", "url-over", "header-under", "header-over", "count-under", "count-over"],
)
async def test_head_limits_are_settings(proxied: MakeProxied, caplog: pytest.LogCaptureFixture, prelude: str,
                                        raw: bytes, status: int, reason: str | None) -> None:
    caplog.set_level(logging.DEBUG)
    p = await proxied(echo_app(), limits=LIMITS)
    answer, _, writer = await exchange(p, raw, prelude, caplog)
    writer.close()
    if reason is None:
        assert answer.status == 200, answer.head
        return
    assert_refused(answer, status, reason)
    quiet_refusal(caplog, status, reason)
    await counted(p, reason)


def session_cookie(p: Proxied) -> str:
    return "codehub_session=" + p.gateway.auth.sessions.issue(Identity("alice"), p.gateway.hosts.hub)


@pytest.mark.parametrize("where", ["api", "sign-in-form"])
async def test_bodies_the_gateway_reads_are_bounded(proxied: MakeProxied, caplog: pytest.LogCaptureFixture,
                                                    where: str) -> None:
    caplog.set_level(logging.DEBUG)
    p = await proxied(echo_app(), limits={"body": 4096})
    if where == "api":
        path, kind, small = "/api/v1/tokens", "application/json", json.dumps({"name": "ci"}).encode()
        big = json.dumps({"name": "x" * 8000}).encode()
    else:
        path, kind, small = "/auth/dev", "application/x-www-form-urlencoded", b"user=alice"
        big = b"user=alice&junk=" + b"x" * 8000
    for body, status in ((small, (201, 303)), (big, (413,))):
        raw = (f"POST {path} HTTP/1.1\r\nHost: {HUB}\r\nOrigin: http://{HUB}\r\nCookie: {session_cookie(p)}\r\n"
               f"Accept: application/json\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        answer, _, writer = await exchange(p, raw + body, "fresh", caplog)
        writer.close()
        assert answer.status in status, answer.head + answer.body
    assert json.loads(answer.body)["error"]["code"] == "body-too-large"
    assert b"xxxx" not in answer.body
    line = quiet_refusal(caplog, 413, "body-too-large", method="POST")
    assert line["path"] == path
    await counted(p, "body-too-large")


async def test_previews_stream_bodies_past_the_limit(proxied: MakeProxied) -> None:
    async def size(request: web.Request) -> web.Response:
        total = 0
        while chunk := await request.content.readany():
            total += len(chunk)
        return web.Response(text=str(total))

    app = web.Application()
    app.router.add_post("/up", size)
    p = await proxied(app, limits={"body": 4096})
    async with p.request("POST", "/up", data=b"x" * (3 << 20)) as response:
        assert response.status == 200
        assert await response.text() == str(3 << 20)


async def test_connections_past_the_limit_are_answered_503_and_closed(
        proxied: MakeProxied, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    p = await proxied(echo_app(), limits={"connections": 3})
    server = p.client.server.runner.server if p.client.server.runner is not None else None
    assert isinstance(server, FastLaneServer)

    async def room() -> None:
        """Until the gateway has seen a closed connection go (bounded)."""
        for _ in range(1000):
            if server.open < 3:
                return
            await asyncio.sleep(0.01)

    held = [await asyncio.open_connection(p.client.host, p.client.port) for _ in range(3)]
    try:
        last_reader, last_writer = held[-1]  # one of them is aiohttp's (handed over); it is closed to make room
        last_writer.write(PRELUDES["after-aiohttp-lane"].replace(b"{host}", p.host.encode()))
        assert (await read_answer(last_reader)).status == 200
        caplog.clear()
        reader, writer = await asyncio.open_connection(p.client.host, p.client.port)
        writer.write(head().replace(b"{host}", p.host.encode()))
        answer = await read_answer(reader)
        assert_refused(answer, 503, "too-many-connections")
        assert b"Retry-After: 1" in answer.head
        assert await closed_by_gateway(reader)
        writer.close()
        line = quiet_refusal(caplog, 503, "too-many-connections")
        assert (line["remote"], line["ms"]) == ("127.0.0.1", 0.0)  # who was refused; no request was read
        held.pop()[1].close()
        await room()
        for reader, writer in held[:1]:  # the held ones are served, and room was made for one more
            writer.write(head().replace(b"{host}", p.host.encode()))
            assert (await read_answer(reader)).status == 200
        for _ in range(2):  # the fast lane's connections make room too when they close
            reader, writer = await asyncio.open_connection(p.client.host, p.client.port)
            writer.write(head().replace(b"{host}", p.host.encode()))
            assert (await read_answer(reader)).status == 200
            writer.close()
            await room()
    finally:
        for _, writer in held:
            writer.close()
    await counted(p, "too-many-connections")


async def test_refused_connections_linger_only_up_to_a_bound(proxied: MakeProxied,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused connection stays open after its 503 until its client closes (at most ``LINGER``), but only
    ``MOST_LINGERING`` of them at once: past that they are closed right after their answer, so a flood cannot hold
    file descriptors that way. Those whose clients closed make room again."""
    from tests.server.test_upstream_faults import sockets  # here: that module imports this one

    monkeypatch.setattr(refusals, "MOST_LINGERING", 2)
    monkeypatch.setattr(refusals, "LINGER", 60.0)  # far longer than the test: only the clients end the linger
    p = await proxied(echo_app(), limits={"connections": 1})
    assert p.client.port is not None
    gateway = (p.client.host, p.client.port)
    held = await asyncio.open_connection(*gateway)
    try:
        for _ in range(2):
            refused = [await asyncio.open_connection(*gateway) for _ in range(4)]
            for reader, _ in refused:
                assert (await read_answer(reader)).status == 503
                assert await reader.read() == b""
            assert sockets(local=gateway) == 1 + 2  # the held connection and two lingering
            for _, writer in refused:
                writer.close()
            for _ in range(100):  # until the gateway has closed its ends too (bounded)
                if sockets(local=gateway) == 1:
                    break
                await asyncio.sleep(0.05)
            assert sockets(local=gateway) == 1
    finally:
        held[1].close()


@pytest.mark.parametrize("prelude", ["after-fast-lane", "after-aiohttp-lane"])
async def test_idle_connections_close_after_the_keepalive_setting(proxied: MakeProxied, prelude: str) -> None:
    p = await proxied(echo_app(), limits={"keepalive": 0.5})
    reader, writer = await asyncio.open_connection(p.client.host, p.client.port)
    try:
        writer.write(PRELUDES[prelude].replace(b"{host}", p.host.encode()))
        assert (await read_answer(reader)).status == 200
        assert await closed_by_gateway(reader)
    finally:
        writer.close()


@pytest.mark.parametrize("prelude", list(PRELUDES))
async def test_a_dribbled_head_gets_408_within_the_head_timeout(
        proxied: MakeProxied, caplog: pytest.LogCaptureFixture, prelude: str) -> None:
    """A slowloris sends a byte now and then, for ever: the head's deadline runs from its first byte, so the
    dribble does not push it back."""
    caplog.set_level(logging.DEBUG)
    p = await proxied(echo_app(), limits={"head_timeout": 0.5})
    reader, writer = await after(p, prelude)
    try:
        caplog.clear()
        answer_soon = asyncio.ensure_future(read_answer(reader))
        dribble = f"GET /x HTTP/1.1\r\nHost: {p.host}\r\n" + "X-Slow: " + "s" * 200
        for byte in dribble:
            if answer_soon.done():
                break
            writer.write(byte.encode())
            await asyncio.sleep(0.05)
        answer = await answer_soon
        assert_refused(answer, 408, "head-timeout")
        assert await closed_by_gateway(reader)
    finally:
        writer.close()
    quiet_refusal(caplog, 408, "head-timeout")
    await counted(p, "head-timeout")


@pytest.mark.parametrize("prelude", list(PRELUDES))
async def test_the_head_deadline_runs_from_the_first_byte_not_from_the_idle_start(proxied: MakeProxied,
                                                                                  prelude: str) -> None:
    """A connection idle for longer than ``head_timeout`` (well within ``keepalive``) that then sends a head in
    pieces is served: the head's time starts with its first byte, not when the connection fell idle."""
    p = await proxied(echo_app(), limits={"head_timeout": 0.5, "keepalive": 60})
    reader, writer = await after(p, prelude)
    try:
        await asyncio.sleep(1.0)  # idle for twice the head timeout
        whole = head().replace(b"{host}", p.host.encode())
        writer.write(whole[:10])
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(whole[10:])
        assert (await read_answer(reader)).status == 200
    finally:
        writer.close()


async def test_a_partial_head_handed_to_aiohttps_lane_keeps_its_deadline(
        proxied: MakeProxied, caplog: pytest.LogCaptureFixture) -> None:
    """A head too big for the fast lane goes to aiohttp's lane unfinished: the deadline that began with its first
    byte goes along (the keep-alive timeout, far longer, would otherwise be all that ends it)."""
    caplog.set_level(logging.DEBUG)
    p = await proxied(echo_app(), limits={"head_timeout": 0.5})
    reader, writer = await asyncio.open_connection(p.client.host, p.client.port)
    try:
        partial = f"GET /x HTTP/1.1\r\nHost: {p.host}\r\n" + "".join(f"X-{i}: {'v' * 1000}\r\n" for i in range(20))
        writer.write(partial.encode())
        answer = await read_answer(reader)
    finally:
        writer.close()
    assert_refused(answer, 408, "head-timeout")
    quiet_refusal(caplog, 408, "head-timeout")


async def test_the_bytes_of_a_body_start_no_head_deadline(proxied: MakeProxied) -> None:
    """The deadline runs from the first byte of a head, not of a body: after an upload that came in pieces, the
    kept-alive connection is idle, not a head that is late, and the next request on it is served whenever it
    comes within ``keepalive`` (it was answered 408 once ``head_timeout`` had passed since the last piece)."""
    p = await proxied(echo_app(), limits={"head_timeout": 0.5, "keepalive": 60})
    reader, writer = await asyncio.open_connection(p.client.host, p.client.port)
    try:
        writer.write(f"POST /up HTTP/1.1\r\nHost: {p.host}\r\nContent-Length: 4\r\n\r\nab".encode())
        await writer.drain()
        await asyncio.sleep(0.1)  # the request is being served, its body half read
        writer.write(b"cd")
        answer = await read_answer(reader)
        assert (answer.status, json.loads(answer.body)["body"]) == (200, "abcd"), answer.head
        await asyncio.sleep(1.0)  # idle for twice the head timeout
        writer.write(head().replace(b"{host}", p.host.encode()))
        assert (await read_answer(reader)).status == 200
    finally:
        writer.close()
    assert "head-timeout" not in await p.metrics()


async def test_a_request_pipelined_behind_the_last_piece_of_a_body_is_served(proxied: MakeProxied) -> None:
    """What the parser queues behind a body in progress is looked at for a malformed chunk (``bad-chunk``): a whole
    next request there, in the packet that ends the body, is no refusal, and is served after the upload."""
    p = await proxied(echo_app())
    reader, writer = await asyncio.open_connection(p.client.host, p.client.port)
    try:
        writer.write(f"POST /up HTTP/1.1\r\nHost: {p.host}\r\nContent-Length: 4\r\n\r\nab".encode())
        await writer.drain()
        await asyncio.sleep(0.1)  # the request is being served, its body half read
        writer.write(b"cd" + head("/next").replace(b"{host}", p.host.encode()))
        answers = [await read_answer(reader) for _ in range(2)]
    finally:
        writer.close()
    assert [(a.status, json.loads(a.body)["raw_path"]) for a in answers] == [(200, "/up"), (200, "/next")]
    assert "codehub_bad_requests_total{" not in await p.metrics()


# --- out of file descriptors ----------------------------------------------------------------------------------

@pytest.fixture
def low_fd_gateway(tmp_path: Path) -> Iterator[tuple[int, Path, str]]:
    """A ``serve`` process whose open-file limit is 512 (the connection limit follows it: (512 - 192) / 2 = 160),
    with one public workspace port answering on its own address."""
    address = next_address()
    upstream_port = free_port(address)
    port = free_port("127.0.0.1")
    config = {
        "listen": {"host": "127.0.0.1", "port": port},
        "local": {"state_dir": str(tmp_path / "state"), "workspaces": {"ws1": {
            "owner": "alice", "address": address, "ports": {upstream_port: "public"},
            "command": [sys.executable, "-m", "http.server", "--bind", address, str(upstream_port)],
        }}},
    }
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(config))
    log = (tmp_path / "gateway.log").open("wb")
    env = {key: value for key, value in os.environ.items() if not key.startswith("CODEHUB_")}
    env["PYTHONPATH"] = str(REPO)

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512))

    process = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(tmp_path / "gateway.yaml")],
                               env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               preexec_fn=low_limit)
    try:
        yield port, tmp_path / "gateway.log", f"{upstream_port}-ws1.localhost:{port}"
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def get(port: int, host: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return int(sock.makefile("rb").readline().split()[1])


def test_a_flood_of_connections_never_runs_the_worker_out_of_file_descriptors(
        low_fd_gateway: tuple[int, Path, str]) -> None:
    """Twice as many connections as the worker has descriptors: those within the limit are served, the others are
    answered 503 (or, past the refused ones it lets linger, closed), and nothing is logged louder than that."""
    port, log, preview = low_fd_gateway
    deadline = time.monotonic() + 30
    while True:  # up, and its workspace woken
        try:
            if get(port, preview) == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    flood = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(1000)]
    answers = []
    try:
        for sock in flood:
            with contextlib.suppress(OSError):
                sock.sendall(f"GET / HTTP/1.1\r\nHost: {preview}\r\n\r\n".encode())
        for sock in flood:
            try:
                answers.append(int(sock.makefile("rb").readline().split()[1]))
            except (OSError, IndexError, ValueError):
                answers.append(0)  # closed without an answer
    finally:
        for sock in flood:
            sock.close()
    assert set(answers) <= {200, 503, 0}, answers
    assert answers.count(200) >= 150, answers
    assert answers.count(503) >= 64, answers
    time.sleep(0.5)
    assert get(port, preview) == 200  # serving as before
    text = log.read_text()
    for loud in ("Traceback", " ERROR ", " WARNING "):
        assert loud not in text, text
    assert '"reason":"too-many-connections"' in text

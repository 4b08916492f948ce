"""WebSockets through the gateway to a real upstream: echo, subprotocols, ping/pong, close codes both ways,
large and fragmented messages, backpressure and the open-connections gauge."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import hashlib
import json
import logging
import os
import re
import struct
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from gateway.edge.plan import Facts, Granted, World, still_granted
from gateway.proxy.connection import MAX_HEAD
from gateway.proxy.wsrelay import _ClientEnd
from gateway.server.app import build_app
from gateway.server.context import GATEWAY
from gateway.server.fastlane import FastLaneServer, GatewayRunner
from tests.conftest import MakeUpstream, next_address, settings, workspace
from tests.server.conftest import PREVIEW_DOMAIN, WORKSPACE, MakeProxied, Proxied, listening_later, raw_upstream

BIG = 16 << 20


def echo_app(seen: dict[str, str] | None = None, *, protocols: tuple[str, ...] = (),
             closed: asyncio.Event | None = None) -> web.Application:
    async def echo(request: web.Request) -> web.WebSocketResponse:
        if seen is not None:
            seen.update(request.headers)
        ws = web.WebSocketResponse(protocols=protocols, max_msg_size=BIG)
        await ws.prepare(request)
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                if message.data.startswith("close "):
                    await ws.close(code=int(message.data.split()[1]), message=b"bye")
                else:
                    await ws.send_str(message.data)
            elif message.type is WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        if seen is not None:
            seen["close_code"] = str(ws.close_code)
        if closed is not None:
            closed.set()
        return ws

    app = web.Application()
    app.router.add_get("/ws", echo)
    return app


async def test_text_and_binary_echo(proxied: MakeProxied) -> None:
    seen: dict[str, str] = {}
    p = await proxied(echo_app(seen))
    async with p.client.ws_connect("/ws?room=a%2Fb", headers={"Host": p.host, "Origin": p.share_origin}) as ws:
        await ws.send_str("héllo")
        assert (await ws.receive(timeout=10)).data == "héllo"
        await ws.send_bytes(b"\x00\x01\xff")
        message = await ws.receive(timeout=10)
        assert message.type is WSMsgType.BINARY
        assert message.data == b"\x00\x01\xff"
    assert seen["Host"] == f"localhost:{p.port}"
    assert seen["Origin"] == p.share_origin
    assert seen["X-Forwarded-Host"] == p.host


async def test_subprotocol_negotiated_by_the_upstream(proxied: MakeProxied) -> None:
    seen: dict[str, str] = {}
    p = await proxied(echo_app(seen, protocols=("chat.v2",)))
    async with p.client.ws_connect("/ws", headers={"Host": p.host}, protocols=("chat.v1", "chat.v2")) as ws:
        assert ws.protocol == "chat.v2"
        await ws.send_str("x")
        assert (await ws.receive(timeout=10)).data == "x"
    assert [t.strip() for t in seen["Sec-WebSocket-Protocol"].split(",")] == ["chat.v1", "chat.v2"]


async def test_client_ping_gets_pong(proxied: MakeProxied) -> None:
    p = await proxied(echo_app())
    async with p.client.ws_connect("/ws", headers={"Host": p.host}, autoping=False) as ws:
        await ws.ping(b"are you there")
        message = await ws.receive(timeout=10)
        assert message.type is WSMsgType.PONG
        assert message.data == b"are you there"


async def test_close_code_from_the_upstream_reaches_the_client(proxied: MakeProxied) -> None:
    p = await proxied(echo_app())
    async with p.client.ws_connect("/ws", headers={"Host": p.host}) as ws:
        await ws.send_str("close 4001")
        message = await ws.receive(timeout=10)
        assert message.type is WSMsgType.CLOSE
        assert message.data == 4001
    assert ws.close_code == 4001


async def test_close_code_from_the_client_reaches_the_upstream(proxied: MakeProxied) -> None:
    seen: dict[str, str] = {}
    closed = asyncio.Event()
    p = await proxied(echo_app(seen, closed=closed))
    async with p.client.ws_connect("/ws", headers={"Host": p.host}) as ws:
        await ws.send_str("ping")
        await ws.receive(timeout=10)
        await ws.close(code=4002, message=b"leaving")
    await asyncio.wait_for(closed.wait(), 10)
    assert seen["close_code"] == "4002"


async def test_large_message_both_ways(proxied: MakeProxied) -> None:
    p = await proxied(echo_app())
    payload = os.urandom(8 << 20)
    async with p.client.ws_connect("/ws", headers={"Host": p.host}, max_msg_size=BIG) as ws:
        await ws.send_bytes(payload)
        message = await ws.receive(timeout=30)
        assert message.type is WSMsgType.BINARY
        assert message.data == payload


def _frame(opcode: int, payload: bytes, *, fin: bool) -> bytes:
    """One masked client frame (RFC 6455 §5.2)."""
    mask = os.urandom(4)
    head = bytes([(0x80 if fin else 0) | opcode])
    length = len(payload)
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", length)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", length)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
    first, second = await reader.readexactly(2)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    assert not second & 0x80, "servers do not mask"
    return first & 0x0F, bool(first & 0x80), await reader.readexactly(length)


async def test_fragmented_message_from_a_raw_client(proxied: MakeProxied) -> None:
    p = await proxied(echo_app())
    key = base64.b64encode(os.urandom(16)).decode()
    reader, writer = await asyncio.open_connection(p.client.host, p.client.port)
    try:
        async with asyncio.timeout(10):
            writer.write(f"GET /ws HTTP/1.1\r\nHost: {p.host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101"), head
            assert re.search(rb"(?i)upgrade: websocket", head)
            writer.write(_frame(0x1, b"frag", fin=False))
            writer.write(_frame(0x9, b"ping in between", fin=True))  # control frames may interleave
            writer.write(_frame(0x0, b"mented ", fin=False))
            writer.write(_frame(0x0, "méssage".encode(), fin=True))
            await writer.drain()
            frames = [await _read_frame(reader), await _read_frame(reader)]
            assert (0xA, True, b"ping in between") in frames  # the pong
            assert (0x1, True, "fragmented méssage".encode()) in frames
            writer.write(_frame(0x8, struct.pack("!H", 1000), fin=True))
            opcode, _, payload = await _read_frame(reader)
            assert opcode == 0x8
            assert struct.unpack("!H", payload[:2]) == (1000,)
    finally:
        writer.close()


async def test_backpressure_slow_reader_holds_back_the_upstream(proxied: MakeProxied) -> None:
    """The upstream can only run a bounded distance ahead of a client that reads slowly."""
    chunk = 1 << 20
    total = 200
    sent = 0

    async def firehose(request: web.Request) -> web.WebSocketResponse:
        nonlocal sent
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        data = b"x" * chunk
        for _ in range(total):
            await ws.send_bytes(data)  # waits for the gateway to take it
            sent += 1
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/ws", firehose)
    p = await proxied(app)
    largest_lead = 0
    async with p.client.ws_connect("/ws", headers={"Host": p.host}, max_msg_size=BIG) as ws:
        for received in range(1, total + 1):
            message = await ws.receive(timeout=30)
            assert message.type is WSMsgType.BINARY
            largest_lead = max(largest_lead, sent - received)
            await asyncio.sleep(0.005)
    assert largest_lead < 40, f"upstream ran {largest_lead} MiB ahead of the client"


def _gauge(text: str) -> float:
    match = re.search(r"^codehub_websockets_open ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, text
    return float(match[1])


@pytest.mark.parametrize("lane", ["fast", "aiohttp"])
async def test_open_websockets_gauge_goes_up_and_back_down(proxied: MakeProxied, lane: str) -> None:
    p = await proxied(echo_app())
    assert _gauge(await p.metrics()) == 0
    clients = [await _raw_upgrade(p, before=_lane_opener(p, lane)) for _ in range(2)]
    try:
        for reader, writer in clients:
            writer.write(_frame(0x1, b"hi", fin=True))
            assert await asyncio.wait_for(_read_frame(reader), 10) == (0x1, True, b"hi")
        assert _gauge(await p.metrics()) == 2
    finally:
        for _, writer in clients:
            writer.close()
    async with asyncio.timeout(10):  # the relay ends just after the client left
        while True:
            if _gauge(await p.metrics()) == 0:
                break
            await asyncio.sleep(0.01)



async def test_a_websocket_that_ended_is_not_kept_by_the_heartbeat(proxied: MakeProxied) -> None:
    """The heartbeat forgets a relay's client end when the relay ends: ended WebSockets do not pile up in it."""
    p = await proxied(echo_app())

    def client_ends() -> int:
        gc.collect()
        return sum(isinstance(thing, _ClientEnd) for thing in gc.get_objects())

    before = client_ends()
    async with p.client.ws_connect("/ws", headers={"Host": p.host}) as ws:
        await ws.send_str("hi")
        await ws.receive(timeout=10)
        assert client_ends() == before + 1
    async with asyncio.timeout(10):  # the relay ends just after the client sees its close
        while True:
            if _gauge(await p.metrics()) == 0:
                break
            await asyncio.sleep(0.01)
    assert client_ends() == before

async def test_upstream_refusing_the_websocket_is_a_502(proxied: MakeProxied, caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    """A refusal is the app's answer, not a fault of the gateway's: the client gets a 502 and nothing is logged as
    an error (the refused connection is closed quietly)."""
    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=403, text="go away")

    app = web.Application()
    app.router.add_get("/ws", refuse)
    p = await proxied(app)
    with caplog.at_level(logging.ERROR), pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await p.client.ws_connect("/ws", headers={"Host": p.host})
    assert caught.value.status == 502
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []


async def test_a_websocket_to_a_port_nothing_listens_on_is_a_502_at_once_and_counted(proxied: MakeProxied) -> None:
    """As for a request: the connect is not tried again (no wake just happened), the client hears why."""
    p = await proxied(None)
    status, head, body = await _exchange(p, _fields())
    assert status == 502, head
    assert json.loads(body)["error"]["code"] == "port-not-listening"
    assert 'codehub_upstream_connect_errors_total{reason="refused"} 1.0' in await p.metrics()


async def test_upstream_silent_after_the_upgrade_request_is_a_504_naming_the_port(proxied: MakeProxied) -> None:
    """The handshake's answer is the upstream's first byte: it is due within ``timeouts.first_byte``. The client is
    told which port of which workspace did not answer."""
    never = asyncio.Event()

    async def silent(request: web.Request) -> web.Response:
        await never.wait()
        return web.Response()

    app = web.Application()
    app.router.add_get("/ws", silent)
    p = await proxied(app, timeouts={"first_byte": 0.3})
    status, head, body = await _exchange(p, _fields())
    assert status == 504, head
    assert json.loads(body)["error"] == {
        "code": "upstream-timeout", "status": 504,
        "message": f"Port {p.port} in workspace {WORKSPACE} did not answer the WebSocket in time."}
    never.set()


# --- the frame relay: limits, ends vanishing, heartbeat, handover from aiohttp ---------------------------------

async def _raw_upgrade(p: Proxied, extra: bytes = b"", before: bytes = b""
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client that speaks WebSocket by hand (so it can stay silent, vanish, or send early); ``before``: a
    request sent first on the same connection, its answer read."""
    key = base64.b64encode(os.urandom(16)).decode()
    reader, writer = await asyncio.open_connection(p.client.host, p.client.port)
    if before:
        writer.write(before)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        assert length is not None, head
        await reader.readexactly(int(length.group(1)))
    writer.write(f"GET /ws HTTP/1.1\r\nHost: {p.host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode() + extra)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


def _lane_opener(p: Proxied, lane: str) -> bytes:
    """What ``_raw_upgrade`` sends first so that ``lane`` relays the WebSocket: the fast lane has a new connection's,
    aiohttp's lane a connection the fast lane handed it with a request it does not serve (an OPTIONS)."""
    return f"OPTIONS /ws HTTP/1.1\r\nHost: {p.host}\r\n\r\n".encode() if lane == "aiohttp" else b""


@pytest.mark.parametrize("lane", ["fast", "aiohttp"])
async def test_bytes_sent_right_behind_the_upgrade_request_are_relayed(proxied: MakeProxied, lane: str) -> None:
    """In the fast lane, where a browser's WebSocket starts on a new connection, and in aiohttp's, which serves a
    connection once the fast lane handed it a request it does not serve (here an OPTIONS)."""
    p = await proxied(echo_app())
    reader, writer = await _raw_upgrade(p, extra=_frame(0x1, b"early", fin=True), before=_lane_opener(p, lane))
    try:
        assert await asyncio.wait_for(_read_frame(reader), 10) == (0x1, True, b"early")
    finally:
        writer.close()


async def test_more_early_bytes_than_are_parked_still_reach_the_upstream(proxied: MakeProxied) -> None:
    """A client that sends a big frame before the 101 (no browser does): past MAX_PARKED reading pauses while the
    upstream answers slowly, and the relay picks it up again."""
    async def slow_echo(request: web.Request) -> web.WebSocketResponse:
        await asyncio.sleep(0.5)
        ws = web.WebSocketResponse(max_msg_size=BIG)
        await ws.prepare(request)
        async for message in ws:
            await (ws.send_bytes(message.data) if message.type is WSMsgType.BINARY else ws.send_str(message.data))
        return ws

    slow = web.Application()
    slow.router.add_get("/ws", slow_echo)
    p = await proxied(slow)
    key = base64.b64encode(os.urandom(16)).decode()
    reader, writer = await asyncio.open_connection(p.client.host, p.client.port)
    try:
        writer.write(f"GET /ws HTTP/1.1\r\nHost: {p.host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        await asyncio.sleep(0.1)
        big = os.urandom(200_000)
        writer.write(_frame(0x2, big, fin=True) + _frame(0x1, b"after", fin=True))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101"), head
        assert await asyncio.wait_for(_read_frame(reader), 10) == (0x2, True, big)
        assert await asyncio.wait_for(_read_frame(reader), 10) == (0x1, True, b"after")
    finally:
        writer.close()


async def test_a_websocket_keeps_its_workspace_in_use_and_counts_its_decision(proxied: MakeProxied) -> None:
    """The idle reaper must not stop a workspace with an open WebSocket (its activity shows the connection), and
    the policy decision that let it in is counted, as for any request."""
    p = await proxied(echo_app())

    def allowed(scrape: str) -> float:
        return sum(float(m[1]) for m in re.finditer(r'codehub_policy_decisions_total\{allow="true",[^}]*\} (\S+)',
                                                     scrape))

    before = allowed(await p.metrics())
    async with p.client.ws_connect("/ws", headers={"Host": p.host}) as ws:
        await ws.send_str("x")
        await ws.receive(timeout=10)
        assert p.gateway.activity.snapshot()[1].get(WORKSPACE) == 1
        assert allowed(await p.metrics()) == before + 1
    async with asyncio.timeout(10):
        while p.gateway.activity.snapshot()[1].get(WORKSPACE):  # noqa: ASYNC110 - the gateway's own table
            await asyncio.sleep(0.01)


async def test_a_websocket_right_after_a_wake_retries_a_refused_connect(proxied: MakeProxied,
                                                                        make_upstream: MakeUpstream) -> None:
    """Just after a wake (Vite may accept on a throwaway listener first) a refused connect is tried again, for a
    WebSocket as for a request."""
    p = await proxied(None)
    p.gateway.waker.settling = lambda *_: True  # type: ignore[method-assign]

    starting = listening_later(p, make_upstream, echo_app())
    async with p.client.ws_connect("/ws", headers={"Host": p.host}) as ws:
        await ws.send_str("x")
        assert (await ws.receive(timeout=10)).data == "x"
    await starting


async def test_an_upgrade_to_another_protocol_is_proxied_as_before(proxied: MakeProxied) -> None:
    """Only WebSockets are relayed: ``Upgrade: h2c`` goes to the upstream as an ordinary request (the fast lane
    hands it to aiohttp's lane, which always served it)."""
    async def plain(request: web.Request) -> web.Response:
        return web.Response(text="plain")

    app = web.Application()
    app.router.add_get("/", plain)
    p = await proxied(app)
    async with p.request("GET", "/", headers={"Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c",
                                              "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA"}) as answer:
        assert (answer.status, await answer.text()) == (200, "plain")


@pytest.mark.parametrize("lane", ["fast", "aiohttp"])
async def test_a_websocket_is_one_access_line_when_it_ends(proxied: MakeProxied, lane: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The 101, with how long the WebSocket lived and no body bytes (its frames are not an answer's body), the same
    from either lane."""
    p = await proxied(echo_app())
    with caplog.at_level(logging.INFO, logger="codehub.access"):
        opened = time.perf_counter()
        reader, writer = await _raw_upgrade(p, before=_lane_opener(p, lane))
        await asyncio.sleep(0.2)
        assert not [r for r in caplog.records if r.name == "codehub.access" and '"status":101' in r.getMessage()]
        writer.write(_frame(0x8, struct.pack("!H", 1000), fin=True))
        await asyncio.wait_for(_read_frame(reader), 10)  # the upstream's close
        writer.close()
        async with asyncio.timeout(10):
            while not (lines := [json.loads(r.getMessage()) for r in caplog.records  # noqa: ASYNC110 - log records
                                 if r.name == "codehub.access" and '"status":101' in r.getMessage()]):
                await asyncio.sleep(0.01)
        lived = time.perf_counter() - opened
    [line] = lines
    assert (line["method"], line["path"], line["host"], line["kind"], line["workspace"], line["bytes"]) == (
        "GET", "/ws", p.host, "preview", WORKSPACE, 0)
    assert 200 <= line["ms"] <= lived * 1000


@pytest.mark.parametrize("lane", ["fast", "aiohttp"])
async def test_a_websocket_ended_while_its_client_reads_nothing_is_one_access_line(
        proxied: MakeProxied, lane: str, caplog: pytest.LogCaptureFixture) -> None:
    """Its port made private while the app floods a client that stopped reading: the relay ends at the next tick,
    and the client's connection, holding bytes it never took, is dropped only ticks later. So in aiohttp's lane
    the handler is not cancelled but returns the 101 first, which aiohttp would log as a second line."""
    async def floods(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        with contextlib.suppress(ConnectionError):
            await ws.send_bytes(bytes(8 << 20))  # more than the sockets and the relay hold
        return ws

    app = web.Application()
    app.router.add_get("/ws", floods)
    p = await proxied(app, timeouts={"websocket_heartbeat": 1.0})  # gives a silent client up after 2 s
    with caplog.at_level(logging.INFO, logger="codehub.access"):
        reader, writer = await _raw_upgrade(p, before=_lane_opener(p, lane))
        gc.collect()
        [end] = [thing for thing in gc.get_objects() if isinstance(thing, _ClientEnd)]
        async with asyncio.timeout(10):
            while not end.transport.get_write_buffer_size():  # noqa: ASYNC110 - the relay's own transport
                await asyncio.sleep(0.01)
            await p.gateway.runtime.update(WORKSPACE, ports={p.port: "private"})
            while not [r for r in caplog.records  # noqa: ASYNC110 - log records: the relay ended
                       if r.name == "codehub.access" and '"status":101' in r.getMessage()]:
                await asyncio.sleep(0.01)
            with contextlib.suppress(ConnectionResetError):
                while await reader.read(1 << 20):  # to its end: dropped once the relay let it go
                    pass
        writer.close()
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "codehub.access"]
    assert [(line["method"], line["status"]) for line in lines] == [("OPTIONS", 405)] * (lane == "aiohttp") + [
        ("GET", 101)]
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("sender", ["client", "upstream"])
async def test_a_message_over_the_limit_closes_both_ends_with_1009(proxied: MakeProxied, sender: str) -> None:
    seen: dict[str, str] = {}
    closed = asyncio.Event()

    async def upstream(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=BIG)
        await ws.prepare(request)
        async for message in ws:
            if message.data == "send big":
                await ws.send_bytes(b"x" * 2048)
        seen["close_code"] = str(ws.close_code)
        closed.set()
        return ws

    app = web.Application()
    app.router.add_get("/ws", upstream)
    p = await proxied(app, max_ws_message=1024)
    async with p.client.ws_connect("/ws", headers={"Host": p.host}, max_msg_size=BIG) as ws:
        await ws.send_bytes(b"y" * 1000)  # under the limit: passes
        if sender == "client":
            await ws.send_bytes(b"y" * 2048)
        else:
            await ws.send_str("send big")
        message = await ws.receive(timeout=10)
        assert message.type is WSMsgType.CLOSE
        assert message.data == 1009
    await asyncio.wait_for(closed.wait(), 10)
    assert seen["close_code"] == "1009"


async def _switch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A raw upstream's side of the upgrade: read the gateway's request, answer 101 with its key's accept."""
    head = await reader.readuntil(b"\r\n\r\n")
    key = re.search(rb"(?i)sec-websocket-key: *(\S+)", head)
    assert key is not None, head
    writer.write(f"{SWITCH}Sec-WebSocket-Accept: {_accept(key.group(1).decode())}\r\n\r\n".encode())


async def test_a_message_over_the_limit_closes_both_connections_though_neither_end_answers_the_close(
        proxied: MakeProxied) -> None:
    """The gateway's 1009 is not a close handshake it waits on: both connections are closed even when neither end
    answers the close frame (a raw upstream sends too much, then only listens; the raw client ignores the close)."""
    p = await proxied(None, max_ws_message=1024)
    upstream_heard = asyncio.get_running_loop().create_future()

    async def too_much(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _switch(reader, writer)
        writer.write(b"\x82\x7e" + struct.pack("!H", 2048) + b"x" * 2048)  # one unmasked binary frame, too long
        upstream_heard.set_result(await reader.read())  # what the gateway sends, until it closes the connection
        writer.close()

    async with raw_upstream(p, too_much):
        reader, writer = await _raw_upgrade(p)
        try:
            async with asyncio.timeout(10):
                opcode, _, payload = await _read_frame(reader)
                assert (opcode, struct.unpack("!H", payload[:2])) == (0x8, (1009,))
                assert await reader.read() == b""  # closed by the gateway, no close frame of the client's awaited
                heard = await upstream_heard
        finally:
            writer.close()
        assert heard[0] == 0x88, heard  # a close frame, then the end
        assert heard[1] & 0x80, heard  # masked, as a client's
        unmasked = bytes(b ^ heard[2 + i % 4] for i, b in enumerate(heard[6:8]))
        assert struct.unpack("!H", unmasked) == (1009,)


async def test_an_upstream_that_closes_and_hangs_up_at_once_has_the_clients_connection_closed(
        proxied: MakeProxied) -> None:
    """Its close frame passes to the client, which is told nothing more, and the gateway closes the client's
    connection without waiting for the client to answer the close."""
    p = await proxied(None)

    async def close_and_leave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _switch(reader, writer)
        writer.write(b"\x88\x02" + struct.pack("!H", 1000))  # a close frame, and the connection closed behind it
        writer.close()

    async with raw_upstream(p, close_and_leave):
        reader, writer = await _raw_upgrade(p)
        try:
            async with asyncio.timeout(10):
                assert await _read_frame(reader) == (0x8, True, struct.pack("!H", 1000))  # the upstream's, not a 1011
                assert await reader.read() == b""
        finally:
            writer.close()

async def test_a_client_that_vanishes_is_going_away_for_the_upstream(proxied: MakeProxied) -> None:
    seen: dict[str, str] = {}
    closed = asyncio.Event()
    p = await proxied(echo_app(seen, closed=closed))
    reader, writer = await _raw_upgrade(p)
    writer.write(_frame(0x1, b"hi", fin=True))
    assert await asyncio.wait_for(_read_frame(reader), 10) == (0x1, True, b"hi")
    writer.transport.abort()  # no close frame, just gone
    await asyncio.wait_for(closed.wait(), 10)
    assert seen["close_code"] == "1001"


async def test_an_upstream_that_vanishes_closes_the_client_with_1011(proxied: MakeProxied) -> None:
    async def vanishing(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()
        assert request.transport is not None
        request.transport.abort()
        return ws

    app = web.Application()
    app.router.add_get("/ws", vanishing)
    p = await proxied(app)
    async with p.client.ws_connect("/ws", headers={"Host": p.host}) as ws:
        await ws.send_str("bye")
        message = await ws.receive(timeout=10)
        assert message.type is WSMsgType.CLOSE
        assert message.data == 1011


async def test_pings_pass_end_to_end(proxied: MakeProxied) -> None:
    async def pinging(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        await ws.ping(b"from upstream")
        message = await ws.receive()
        await ws.send_str(f"{message.type.name} {message.data.decode()}")
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/ws", pinging)
    p = await proxied(app)
    async with p.client.ws_connect("/ws", headers={"Host": p.host}, autoping=False) as ws:
        ping = await ws.receive(timeout=10)
        assert (ping.type, ping.data) == (WSMsgType.PING, b"from upstream")
        await ws.pong(ping.data)
        assert (await ws.receive(timeout=10)).data == "PONG from upstream"


async def test_heartbeat_drops_a_client_that_does_not_answer(proxied: MakeProxied) -> None:
    seen: dict[str, str] = {}
    closed = asyncio.Event()
    p = await proxied(echo_app(seen, closed=closed), timeouts={"websocket_heartbeat": 0.2})
    reader, writer = await _raw_upgrade(p)
    try:
        opcode, _, _ = await asyncio.wait_for(_read_frame(reader), 10)
        assert opcode == 0x9  # the gateway's ping, left unanswered
        assert await asyncio.wait_for(reader.read(), 10) == b""  # and then the connection is dropped
    finally:
        writer.close()
    await asyncio.wait_for(closed.wait(), 10)
    assert seen["close_code"] == "1001"


async def test_heartbeat_keeps_a_client_that_answers(proxied: MakeProxied) -> None:
    p = await proxied(echo_app(), timeouts={"websocket_heartbeat": 0.2})
    async with p.client.ws_connect("/ws", headers={"Host": p.host}) as ws:
        echo = asyncio.ensure_future(ws.receive())  # answers the gateway's pings while it waits
        await asyncio.sleep(1.0)  # several heartbeats go by
        await ws.send_str("still here")
        message = await asyncio.wait_for(echo, 10)
        assert (message.type, message.data) == (WSMsgType.TEXT, "still here")



async def test_a_bug_asking_a_websockets_grant_again_ends_that_websocket_not_the_heartbeat(
        proxied: MakeProxied, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Fails closed, each WebSocket with its traceback logged once, and the heartbeat's tick goes on to the next."""
    p = await proxied(echo_app(), timeouts={"websocket_heartbeat": 0.2})
    async with contextlib.AsyncExitStack() as stack:
        sockets = [await stack.enter_async_context(p.client.ws_connect("/ws", headers={"Host": p.host}))
                   for _ in range(2)]
        for ws in sockets:
            await ws.send_str("x")
            assert (await ws.receive(timeout=10)).data == "x"

        def broken(*_: object) -> bool:
            raise RuntimeError("a bug")

        monkeypatch.setattr("gateway.server.lane.still_granted", broken)
        with caplog.at_level(logging.ERROR, "codehub.policy"):
            for ws in sockets:
                message = await ws.receive(timeout=10)
                assert (message.type, message.data) == (WSMsgType.CLOSE, 1008)
    assert [r.exc_info is not None for r in caplog.records if "grant failed" in r.message] == [True, True]


@pytest.mark.parametrize("cookies", [1, 40], ids=["fast-lane", "aiohttp-lane"])
async def test_a_websockets_grant_is_asked_again_with_only_what_decides_it(
        proxied: MakeProxied, monkeypatch: pytest.MonkeyPatch, cookies: int) -> None:
    """A client chooses its head (up to 100 headers of 8 KB in aiohttp's lane): planning all of it again on every
    heartbeat tick, for as long as the WebSocket lives, cost ~60 ms a tick for one head of ``;``s sent once. What
    is asked again is the few headers a plan decides by, and the gateway's own cookies."""
    p = await proxied(echo_app(), timeouts={"websocket_heartbeat": 0.2})
    asked: list[int] = []

    def measured(facts: Facts, was: Granted, world: World, now: float) -> bool:
        asked.append(sum(len(name) + len(value) for name, value in facts.headers.items()))
        return still_granted(facts, was, world, now)

    monkeypatch.setattr("gateway.server.lane.still_granted", measured)
    head = [("Host", p.host), *[("Cookie", "codehub_session" + ";" * 8000)] * cookies]
    async with p.client.ws_connect("/ws", headers=head) as ws:
        for _ in range(3):
            await asyncio.sleep(0.15)
            await ws.send_str("x")
            assert (await ws.receive(timeout=10)).data == "x"
    assert asked
    assert max(asked) < 512


async def test_the_answers_to_the_heartbeats_pings_do_not_reach_the_upstream(proxied: MakeProxied) -> None:
    heard: list[tuple[WSMsgType, object]] = []

    async def listening(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=False)  # pongs are messages here
        await ws.prepare(request)
        async for message in ws:
            heard.append((message.type, message.data))
            if message.type is WSMsgType.TEXT:
                await ws.send_str("heard")
        return ws

    app = web.Application()
    app.router.add_get("/ws", listening)
    p = await proxied(app, timeouts={"websocket_heartbeat": 0.2})
    async with p.client.ws_connect("/ws", headers={"Host": p.host}) as ws:
        answer = asyncio.ensure_future(ws.receive())  # answers the gateway's pings while it waits
        await asyncio.sleep(1.0)  # several heartbeats go by
        await ws.send_str("done")
        assert (await asyncio.wait_for(answer, 10)).data == "heard"
    assert heard == [(WSMsgType.TEXT, "done")]

async def test_a_bad_client_handshake_is_a_400_without_asking_the_upstream(proxied: MakeProxied) -> None:
    seen: dict[str, str] = {}
    p = await proxied(echo_app(seen))
    handshake = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                 "Sec-WebSocket-Key": "short"}
    async with p.request("GET", "/ws", headers=handshake) as response:
        assert response.status == 400
    assert not seen


async def test_a_relayed_connection_is_the_fast_lanes_and_forgotten_once_it_ends(proxied: MakeProxied) -> None:
    """The relay has the connection (aiohttp never sees it) and the lane lets go of it when it ends: the worker's
    count of open connections, which the connection limit reads, goes back down."""
    p = await proxied(echo_app())
    front = p.client.server.runner.server if p.client.server.runner is not None else None
    assert isinstance(front, FastLaneServer)
    async with p.client.ws_connect("/ws", headers={"Host": p.host}) as ws:
        await ws.send_str("x")
        await ws.receive(timeout=10)
        assert (len(front.lanes), front.open, len(front.inner.connections)) == (1, 1, 0)
    async with asyncio.timeout(10):  # the lane lets go just after the client saw the close
        while front.lanes or front.open:  # noqa: ASYNC110 - the server's own sets
            await asyncio.sleep(0.01)


async def test_shutdown_ends_relayed_websockets_and_the_upstream_hears_going_away(make_upstream: MakeUpstream,
                                                                                 tmp_path: Path) -> None:
    seen: dict[str, str] = {}
    closed = asyncio.Event()
    address = next_address()
    upstream = await make_upstream(echo_app(seen, closed=closed), address, 0)
    assert upstream.port is not None
    app = build_app(settings(tmp_path, {WORKSPACE: workspace(address, ports={upstream.port: "public"})}))
    runner = GatewayRunner(app, handler_cancellation=True, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        await app[GATEWAY].runtime.wake(WORKSPACE)
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as session, session.ws_connect(
                f"http://127.0.0.1:{port}/ws", headers={"Host": f"{upstream.port}-{WORKSPACE}.{PREVIEW_DOMAIN}"}) as ws:
            await ws.send_str("x")
            await ws.receive(timeout=10)
            await runner.cleanup()
            message = await ws.receive(timeout=10)
            assert (message.type, message.data) == (WSMsgType.CLOSE, 1001)  # going away, before the close
    finally:
        await runner.cleanup()
    await asyncio.wait_for(closed.wait(), 10)
    assert seen["close_code"] == "1001"


async def test_an_endless_upgrade_answer_head_is_a_502_not_a_growing_buffer(proxied: MakeProxied) -> None:
    """An upstream that answers an upgrade with headers that never end: the gateway stops reading at its head
    limit and answers 502, as it does for a plain answer's head."""
    p = await proxied(None)

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\n")
        with contextlib.suppress(ConnectionError):
            while not writer.is_closing():
                writer.write(b"X-More: " + b"a" * 1000 + b"\r\n")
                await writer.drain()
        writer.close()

    async with raw_upstream(p, endless):
        async with asyncio.timeout(30):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await p.client.ws_connect("/ws", headers={"Host": p.host, "Origin": p.share_origin})
        assert refused.value.status == 502


# --- the two handshakes, byte by byte: what the client offers, what the upstream answers ------------------------

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3's example: its accept value is the one below
KEY_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def _accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


async def _exchange(p: Proxied, fields: str) -> tuple[int, bytes, bytes]:
    """A raw ``GET /ws`` with the header lines ``fields``: the status, head and body of the answer (a 101 has none)."""
    reader, writer = await asyncio.open_connection(p.client.host, p.client.port)
    try:
        async with asyncio.timeout(10):
            writer.write(f"GET /ws HTTP/1.1\r\nHost: {p.host}\r\n{fields}\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ")[1])
            if status == 101:
                return status, head, b""
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            assert length, head
            return status, head, await reader.readexactly(int(length[1]))
    finally:
        writer.close()


def _field(head: bytes, name: str) -> str | None:
    found = re.search(rb"(?i)\r\n" + name.encode() + rb": *([^\r]*)\r\n", head)
    return found[1].decode() if found else None


def _fields(**fields: str | None) -> str:
    """A client's handshake, with ``fields`` (``Sec_WebSocket_Key=...``) changed or (``None``) left out."""
    handshake: dict[str, str | None] = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                                        "Sec-WebSocket-Key": KEY}
    handshake.update({name.replace("_", "-"): value for name, value in fields.items()})
    return "".join(f"{name}: {value}\r\n" for name, value in handshake.items() if value is not None)


NO_CONNECTION = "A WebSocket upgrade needs 'Connection: Upgrade'."
BAD_VERSION = "Unsupported WebSocket version; 13 is spoken here."
BAD_KEY = "The WebSocket key is not 16 bytes in base64."
HAS_BODY = "A WebSocket handshake has no body."
CLIENT_HANDSHAKES = [
    # (why, the client's header lines, the message of the 400, or None: a 101)
    ("RFC 6455", _fields(), None),
    ("Upgrade among other connection options", _fields(Connection="keep-alive, upgrade"), None),
    ("version 8 (hybi drafts)", _fields(Sec_WebSocket_Version="8"), None),
    ("version 7 (hybi drafts)", _fields(Sec_WebSocket_Version="7"), None),
    ("no Connection: Upgrade", _fields(Connection="keep-alive"), NO_CONNECTION),
    ("no Connection at all", _fields(Connection=None), NO_CONNECTION),
    ("a version not spoken", _fields(Sec_WebSocket_Version="12"), BAD_VERSION),
    ("no version", _fields(Sec_WebSocket_Version=None), BAD_VERSION),
    ("no key", _fields(Sec_WebSocket_Key=None), BAD_KEY),
    ("a body's length of 0", _fields(Content_Length="0"), None),
    ("a body", _fields(Content_Length="5"), HAS_BODY),
    ("a chunked body", _fields(Transfer_Encoding="chunked"), HAS_BODY),
    ("a key of 15 bytes", _fields(Sec_WebSocket_Key=base64.b64encode(b"x" * 15).decode()), BAD_KEY),
    ("a key of 17 bytes", _fields(Sec_WebSocket_Key=base64.b64encode(b"x" * 17).decode()), BAD_KEY),
    ("a key with a byte outside base64", _fields(Sec_WebSocket_Key=KEY + "!"), BAD_KEY),
    ("a key that is not base64 at all", _fields(Sec_WebSocket_Key="not base64"), BAD_KEY),
]


@pytest.mark.parametrize(("fields", "refused"), [row[1:] for row in CLIENT_HANDSHAKES],
                         ids=[row[0] for row in CLIENT_HANDSHAKES])
async def test_the_clients_handshake_is_checked_before_the_upstream_is_asked(proxied: MakeProxied, fields: str,
                                                                             refused: str | None) -> None:
    """A bad offer is a 400 (naming the version spoken, for a bad version) that the upstream never hears of; a good
    one is switched, with the accept value made of the client's own key, and the upstream is offered no
    subprotocol the client did not offer (not even an empty list)."""
    seen: dict[str, str] = {}
    p = await proxied(echo_app(seen))
    status, head, body = await _exchange(p, fields)
    if refused is None:
        assert status == 101, head
        assert _field(head, "Sec-WebSocket-Accept") == KEY_ACCEPT
        assert seen["Upgrade"] == "websocket"
        assert "Sec-WebSocket-Protocol" not in seen
        return
    assert status == 400, head
    assert json.loads(body)["error"] == {"code": "websocket-handshake", "message": refused, "status": 400}
    assert _field(head, "Sec-WebSocket-Version") == ("13" if refused == BAD_VERSION else None)
    assert not seen


SWITCH = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
PAUSE = "<pause>"  # the upstream sends what comes before, and the rest a moment later (in a read of its own)
UPSTREAM_ANSWERS = [
    # (why, the upstream's answer head up to its accept field, the fields after it, switched?)
    ("RFC 6455", SWITCH, "", True),
    ("Upgrade among other connection options", SWITCH.replace("Connection: Upgrade", "Connection: keep-alive, upgrade"),
     "", True),
    ("an interim answer first", "HTTP/1.1 100 Continue\r\n\r\n" + PAUSE + SWITCH, "", True),
    ("an interim answer's fields are not the switch's",
     "HTTP/1.1 100 Continue\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n" + SWITCH, "", True),
    ("an interim answer of another kind first", "HTTP/1.1 199 Hold On\r\n\r\n" + PAUSE + SWITCH, "", True),
    ("a 200 with all the fields of a switch", SWITCH.replace("101 Switching Protocols", "200 OK"),
     "Content-Length: 0\r\n", False),
    ("a switch to another protocol", SWITCH.replace("Upgrade: websocket", "Upgrade: h2c"), "", False),
    ("a switch that names no protocol", SWITCH.replace("Upgrade: websocket\r\n", ""), "", False),
    ("no Connection: Upgrade", SWITCH.replace("Connection: Upgrade\r\n", ""), "", False),
    ("an extension nobody offered", SWITCH, "Sec-WebSocket-Extensions: permessage-deflate\r\n", False),
]


@pytest.mark.parametrize(("head", "more", "switched"), [row[1:] for row in UPSTREAM_ANSWERS],
                         ids=[row[0] for row in UPSTREAM_ANSWERS])
@pytest.mark.parametrize("accept", ["right", "wrong", "missing"])
async def test_the_upstreams_answer_must_be_a_valid_switch_or_the_client_gets_a_502(
        proxied: MakeProxied, head: str, more: str, switched: bool, accept: str) -> None:
    """The gateway asks with a key of its own: only a 101 that upgrades the connection to a WebSocket, accepts that
    key and agrees to no extension (frames would not mean the same on both hops) switches the client; anything
    else is the app refusing the WebSocket, and the gateway hangs up on it (nothing else would close that
    connection). Frames the app sends right behind its 101 are the client's first."""
    p = await proxied(None)
    hung_up = asyncio.Event()

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        key = _field(request, "Sec-WebSocket-Key")
        assert key is not None
        value = {"right": _accept(key), "wrong": _accept(KEY), "missing": None}[accept]
        field = f"Sec-WebSocket-Accept: {value}\r\n" if value else ""
        *first, last = f"{head}{field}{more}\r\n".split(PAUSE)
        for part in first:
            writer.write(part.encode())
            await writer.drain()
            await asyncio.sleep(0.2)
        writer.write(last.encode() + b"\x81\x05early")
        with contextlib.suppress(ConnectionError):
            await reader.read()
        hung_up.set()
        writer.close()

    async with raw_upstream(p, app):
        if switched and accept == "right":
            reader, writer = await _raw_upgrade(p)
            try:
                assert await asyncio.wait_for(_read_frame(reader), 10) == (0x1, True, b"early")
            finally:
                writer.close()
        else:
            status, answer, body = await _exchange(p, _fields())
            assert status == 502, answer
            assert json.loads(body)["error"]["code"] == "websocket-refused"
            await asyncio.wait_for(hung_up.wait(), 10)


@pytest.mark.parametrize(
    ("offered", "chosen", "told"),
    [
        ("chat.v1, chat.v2", "chat.v2", "chat.v2"),
        ("chat.v1", "chat.v9", None),
        (None, "chat.v1", None),
        ("chat.v1", None, None),
    ],
    ids=["one it was offered", "one nobody offered", "one when none was offered", "none"],
)
async def test_the_client_is_told_only_a_subprotocol_it_offered(proxied: MakeProxied, offered: str | None,
                                                                 chosen: str | None, told: str | None) -> None:
    """The subprotocol in the client's 101 is the upstream's choice when the client offered it, else none: a
    browser fails a WebSocket whose server names a subprotocol it never asked for (RFC 6455 §4.1)."""
    p = await proxied(None)

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        key = _field(request, "Sec-WebSocket-Key")
        assert key is not None
        protocol = f"Sec-WebSocket-Protocol: {chosen}\r\n" if chosen else ""
        writer.write(f"{SWITCH}Sec-WebSocket-Accept: {_accept(key)}\r\n{protocol}\r\n".encode())
        with contextlib.suppress(ConnectionError):
            await reader.read()
        writer.close()

    async with raw_upstream(p, app):
        status, head, _ = await _exchange(p, _fields(Sec_WebSocket_Protocol=offered))
        assert status == 101, head
        assert _field(head, "Sec-WebSocket-Protocol") == told


@pytest.mark.parametrize(("size", "switched"), [(MAX_HEAD, True), (MAX_HEAD + 1, False)],
                         ids=["at the head limit", "a byte over it"])
async def test_an_upgrade_answer_head_may_grow_up_to_the_head_limit(proxied: MakeProxied, size: int,
                                                                    switched: bool) -> None:
    """Bytes of an answer head still incomplete count towards the limit exactly: MAX_HEAD of them are waited on."""
    p = await proxied(None)

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        key = _field(request, "Sec-WebSocket-Key")
        assert key is not None
        head = f"{SWITCH}Sec-WebSocket-Accept: {_accept(key)}\r\nX-Pad: \r\n".encode()
        writer.write(head[:-2] + b"a" * (size - len(head)) + b"\r\n")  # ``size`` bytes, the blank line to come
        await writer.drain()
        await asyncio.sleep(0.3)
        with contextlib.suppress(ConnectionError):
            writer.write(b"\r\n")
            await reader.read()
        writer.close()

    async with raw_upstream(p, app):
        status, answer, _ = await _exchange(p, _fields())
        assert status == (101 if switched else 502), answer

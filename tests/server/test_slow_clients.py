"""Clients (and apps) that go slow or silent, on purpose or not, hold none of the gateway's resources for good: a place
among a port's requests in flight, a worker's memory, a connection. Each test asserts the bound that holds."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.proxy.wshandshake import accept_value
from gateway.server.context import GATEWAY
from gateway.server.fastlane import FastLaneServer
from tests.conftest import MakeGateway, next_address, workspace
from tests.server.conftest import WORKSPACE
from tests.server.test_hostile_input import Answer, read_answer


class ReadsBodies:
    """An upstream that reads a request's whole body (by its Content-Length) before it answers, as apps do."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str) -> int:
        self.server = await asyncio.start_server(self._serve, host, 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                if length:
                    await reader.readexactly(int(length[1]))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.tasks.discard(task)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture
async def reads_bodies() -> AsyncIterator[tuple[ReadsBodies, str]]:
    address = next_address()
    upstream = ReadsBodies()
    await upstream.start(address)
    yield upstream, address
    await upstream.close()


async def in_front(make_gateway: MakeGateway, serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
                   **settings: Any) -> tuple[asyncio.Server, TestClient[web.Request, web.Application], int]:
    """A raw upstream running ``serve`` on a loopback address of its own, and a gateway (``settings``) with its port
    public: the server, the gateway's client and the port. The workspace is not woken yet."""
    address = next_address()
    server = await asyncio.start_server(serve, address, 0)
    port = server.sockets[0].getsockname()[1]
    client = await make_gateway(workspaces={WORKSPACE: workspace(address, ports={port: "public"})}, in_memory=True,
                                **settings)
    return server, client, port


def fast_lane(client: TestClient[web.Request, web.Application]) -> FastLaneServer:
    front = client.server.runner.server  # type: ignore[union-attr]
    assert isinstance(front, FastLaneServer)
    return front


async def test_a_stalled_upload_does_not_hold_a_place_in_flight(make_gateway: MakeGateway,
                                                                reads_bodies: tuple[ReadsBodies, str]) -> None:
    """An anonymous client that starts uploads to a public port and then sends nothing more cannot take every
    place in flight to that port (``LIMIT_PER_UPSTREAM``) for good: without a bound on a silent request body,
    every other visitor of the port waited out ``timeouts.queue`` and got 503 ``upstream-busy`` for as long as the
    attacker kept a few hundred idle connections open. (The limit is lowered to 4 here to keep the test small.)"""
    upstream, address = reads_bodies
    assert upstream.server is not None
    port = upstream.server.sockets[0].getsockname()[1]
    client = await make_gateway(workspaces={WORKSPACE: workspace(address, ports={port: "public"})}, in_memory=True,
                                timeouts={"queue": 1.0}, limits={"body_timeout": 0.5})
    gateway = client.app[GATEWAY]
    await gateway.runtime.wake(WORKSPACE)
    gateway.pool._limit = 4
    host = f"{port}-{WORKSPACE}.localhost:8080"
    stalled = []
    try:
        for _ in range(4):
            reader, writer = await asyncio.open_connection(client.host, client.port)
            writer.write(f"POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1000\r\n\r\nx".encode())
            stalled.append((reader, writer))
        await asyncio.sleep(0.2)  # every upload has its place in flight and its connection to the upstream
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(f"GET /page HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        answer = await read_answer(reader)
        writer.close()
        assert (answer.status, answer.body) == (200, b"ok"), answer.head
        for reader, _ in stalled:  # each stalled upload is told so, not left hanging
            got = await read_answer(reader)
            assert got.status == 408, got.head
            assert json.loads(got.body)["error"]["code"] == "body-timeout"
    finally:
        for _, writer in stalled:
            with contextlib.suppress(Exception):
                writer.close()


BIG_ANSWER = 100 << 20
"""Far more than socket buffers hold: a client that reads none of it keeps the answer in flight."""


Client = TestClient[web.Request, web.Application]


async def never_reading(client: Client, request: bytes, count: int = 4) -> list[asyncio.StreamWriter]:
    """``count`` connections that send ``request`` and read nothing of what comes back (a small receive buffer:
    the gateway's writes to them soon stall)."""
    writers = []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (client.host, client.port))
        _, writer = await asyncio.open_connection(sock=sock)
        writer.write(request)
        writers.append(writer)
    return writers


async def a_visitor_asks(client: Client, host: str) -> Answer:
    """Another visitor's GET of the same port, answered (or refused) in full."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(f"GET /page HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    try:
        return await read_answer(reader)
    finally:
        writer.close()


async def big_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """``/big`` is a 100 MiB answer sent as fast as it is taken; anything else a small one."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.split(b" ")[1] != b"/big":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
                continue
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n"
                         % BIG_ANSWER)
            piece = b"b" * (1 << 16)
            for _ in range(BIG_ANSWER // len(piece)):
                writer.write(piece)
                await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


@pytest.mark.parametrize("method", ["GET", "POST"], ids=["fast-lane", "aiohttp-lane"])
async def test_a_client_that_reads_nothing_does_not_hold_a_place_in_flight(make_gateway: MakeGateway,
                                                                           method: str) -> None:
    """An anonymous client that asks a public port for a large answer and never reads it (a zero TCP window: the
    "slow read" attack) cannot keep the answer, its upstream connection and its place among the port's requests in
    flight for good: a few hundred such connections made every other visitor of the port wait out
    ``timeouts.queue`` and get 503 ``upstream-busy``. (The limit is lowered to 4 here to keep the test small.)"""
    server, client, port = await in_front(make_gateway, big_answers,
                                          timeouts={"queue": 2.0}, limits={"send_timeout": 0.5})
    gateway = client.app[GATEWAY]
    await gateway.runtime.wake(WORKSPACE)
    gateway.pool._limit = 4
    host = f"{port}-{WORKSPACE}.localhost:8080"
    stalled = await never_reading(client, f"{method} /big HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n"
                                  .encode())
    try:
        await asyncio.sleep(0.3)  # every answer has begun, and the clients read none of it
        answer = await a_visitor_asks(client, host)
        assert (answer.status, answer.body) == (200, b"ok"), answer.head
    finally:
        for writer in stalled:
            with contextlib.suppress(Exception):
                writer.close()
        server.close()


def slow_answers(delay: float) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """Every answer takes ``delay`` seconds, so what a client pipelines arrives while its request is in flight."""
    return lambda reader, writer: answer_after(delay, reader, writer)


async def answer_after(delay: float, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            if length:
                await reader.readexactly(int(length[1]))
            await asyncio.sleep(delay)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


@pytest.mark.parametrize("delay", [0.3, 1.0], ids=["answered-within-it", "answered-after-it"])
@pytest.mark.parametrize("method", ["GET", "POST"], ids=["fast-lane", "aiohttp-lane"])
async def test_a_head_begun_while_a_request_is_in_flight_keeps_its_deadline(make_gateway: MakeGateway,
                                                                            method: str, delay: float) -> None:
    """A slowloris that begins its next head while its request is in flight (pipelined, a packet of its own) and
    never finishes it gets 408 within ``head_timeout``, as one that begins it after the answer does; not a
    connection held until ``keepalive``. When the answer takes longer than ``head_timeout``, the 408 follows it."""
    server, client, port = await in_front(make_gateway, slow_answers(delay),
                                          limits={"head_timeout": 0.5, "keepalive": 60})
    await client.app[GATEWAY].runtime.wake(WORKSPACE)
    host = f"{port}-{WORKSPACE}.localhost:8080"
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(f"{method} /first HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n".encode()
                     if method == "POST" else f"GET /first HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await asyncio.sleep(0.1)  # the request is in flight
        writer.write(f"GET /second HTTP/1.1\r\nHost: {host}\r\nX-Slow: s".encode())
        first = await read_answer(reader)
        assert first.status == 200
        async with asyncio.timeout(5):
            second = await read_answer(reader)
        assert second.status == 408, second.head
    finally:
        writer.close()
        server.close()


def upgrade_request(host: str) -> bytes:
    """A client's WebSocket upgrade of ``/ws`` on ``host``, as raw bytes."""
    return (f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()


def stuck_websocket(first: bytes) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A WebSocket upstream that accepts, sends ``first`` and then neither sends nor closes anything again."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            key = re.search(rb"(?i)\r\nsec-websocket-key: *([^\r]+)", head)
            assert key is not None
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: %b\r\n\r\n%b" % (accept_value(key[1].decode()).encode(), first))
            while await reader.read(65536):
                pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return serve


STUCK = {
    "close-sent": b"\x88\x02\x03\xe8",  # a close frame (1000) the client is never made to answer
    "mid-frame": b"\x82\x7e\x10\x00" + b"x" * 100,  # a binary frame of 4096 bytes, stopped after 100
}


@pytest.mark.parametrize("stuck", list(STUCK))
async def test_the_heartbeat_still_drops_a_silent_client_when_it_cannot_ping(make_gateway: MakeGateway,
                                                                             stuck: str) -> None:
    """The heartbeat's ping may not go into the middle of a frame nor after a close frame; a client that then
    says nothing (it vanished: no FIN ever comes, nothing is written to it that could time out) was kept with its
    upstream connection for as long as the upstream kept its end open, a pair of file descriptors per WebSocket,
    for good: an owner whose app stalls so could fill the worker's connection limit with clients that cost them
    nothing. A client silent past the heartbeat's give-up point is dropped whether or not a ping could go."""
    server, client, port = await in_front(make_gateway, stuck_websocket(STUCK[stuck]),
                                          timeouts={"websocket_heartbeat": 0.2})
    await client.app[GATEWAY].runtime.wake(WORKSPACE)
    host = f"{port}-{WORKSPACE}.localhost:8080"
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(upgrade_request(host))
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101"), head
            received = b""
            while chunk := await reader.read(65536):  # the client reads, and says nothing
                received += chunk
        assert received.startswith(STUCK[stuck][:4])
    finally:
        writer.close()
        server.close()


async def test_the_heartbeat_keeps_a_silent_client_while_a_long_message_reaches_it(make_gateway: MakeGateway) -> None:
    """What the heartbeat must not drop: a client that says nothing while a message too long for one read comes
    to it piece by piece, slower than the heartbeat ticks (no ping can go into its middle)."""
    pieces, size = 12, 1000

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            key = re.search(rb"(?i)\r\nsec-websocket-key: *([^\r]+)", head)
            assert key is not None
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: %b\r\n\r\n" % accept_value(key[1].decode()).encode())
            writer.write(b"\x82\x7e" + (pieces * size).to_bytes(2, "big"))
            for _ in range(pieces):
                writer.write(b"m" * size)
                await writer.drain()
                await asyncio.sleep(0.1)
            while await reader.read(65536):
                pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server, client, port = await in_front(make_gateway, serve, timeouts={"websocket_heartbeat": 0.2})
    await client.app[GATEWAY].runtime.wake(WORKSPACE)
    host = f"{port}-{WORKSPACE}.localhost:8080"
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(upgrade_request(host))
        async with asyncio.timeout(10):
            await reader.readuntil(b"\r\n\r\n")
            assert await reader.readexactly(4 + pieces * size) == (
                b"\x82\x7e" + (pieces * size).to_bytes(2, "big") + b"m" * pieces * size)
    finally:
        writer.close()
        server.close()


SMALL_ANSWERED: list[int] = []


async def small_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Every request gets 16,000 bytes, an answer the fast lane reads whole and writes at once."""
    try:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            SMALL_ANSWERED.append(1)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 16000\r\n\r\n" + b"s" * 16000)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def test_a_client_that_reads_no_answers_cannot_make_the_fast_lane_buffer_them(make_gateway: MakeGateway) -> None:
    """A client that sends request after request on one connection (each once the one before is answered, so
    the fast lane serves them all) and reads none of the answers: each answer small enough to be written at once
    went into the connection's write buffer without a look at its size, so ~50 bytes sent made the worker hold
    16 KB, without bound. The fast lane takes no next request until the client has taken the answer before."""
    server, client, port = await in_front(make_gateway, small_answers)
    await client.app[GATEWAY].runtime.wake(WORKSPACE)
    front = fast_lane(client)
    host = f"{port}-{WORKSPACE}.localhost:8080"
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (client.host, client.port))
    _, writer = await asyncio.open_connection(sock=sock)
    most = 0
    try:
        async with asyncio.timeout(30):
            SMALL_ANSWERED.clear()
            for sent in range(1, 301):
                writer.write(f"GET /small HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                await writer.drain()
                for _ in range(100):  # until the fast lane has answered it, or holds it for the client to read
                    await asyncio.sleep(0.002)
                    lanes = list(front.lanes)
                    if not lanes or (len(SMALL_ANSWERED) == sent and lanes[0]._task is None) or (
                            lanes[0]._write_paused):
                        break
                for lane in front.lanes:
                    if lane._transport is not None:
                        most = max(most, lane._transport.get_write_buffer_size())
        assert most < 1 << 20, f"{most} bytes of answers buffered for a client that reads none"
    finally:
        writer.close()
        server.close()


async def test_pipelined_small_answers_nobody_reads_do_not_hold_places_in_flight(make_gateway: MakeGateway) -> None:
    """aiohttp's lane writes a small answer whole and waits until the connection can take it: a client that
    pipelines requests and reads none of the answers had that wait last for ever, with the answer's upstream
    exchange (and its place among the port's requests in flight) still open. (Limit lowered to 4.)"""
    server, client, port = await in_front(make_gateway, small_answers,
                                          timeouts={"queue": 2.0}, limits={"send_timeout": 0.5})
    gateway = client.app[GATEWAY]
    await gateway.runtime.wake(WORKSPACE)
    gateway.pool._limit = 4
    host = f"{port}-{WORKSPACE}.localhost:8080"
    stalled = await never_reading(
        client, f"POST /small HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n".encode() * 300)
    try:
        await asyncio.sleep(0.5)  # the answers fill every buffer there is, and the clients read none of them
        answer = await a_visitor_asks(client, host)
        assert answer.status == 200, answer.head
    finally:
        for writer in stalled:
            with contextlib.suppress(Exception):
                writer.close()
        server.close()


@pytest.mark.parametrize("path", ["/small", "/big"], ids=["written-whole", "streamed"])
async def test_aiohttps_lane_drops_a_client_that_takes_nothing_of_its_answer(make_gateway: MakeGateway,
                                                                              path: str) -> None:
    """Past ``limits.send_timeout`` with nothing taken, aiohttp's lane aborts the client's connection: it does not
    go on to the requests the client pipelined behind (each another answer to buffer and wait for) nor keep the
    connection open with its buffers full."""
    server, client, port = await in_front(make_gateway, small_answers if path == "/small" else big_answers,
                                          limits={"send_timeout": 0.5})
    await client.app[GATEWAY].runtime.wake(WORKSPACE)
    front = fast_lane(client)
    host = f"{port}-{WORKSPACE}.localhost:8080"
    [stalled] = await never_reading(
        client, f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n".encode() * 300, count=1)
    try:
        for _ in range(200):  # 0.5 s of send_timeout, then the abort (10 s at most)
            if not front.open:
                break
            await asyncio.sleep(0.05)
        assert front.open == 0, "the stalled client's connection is still open"
    finally:
        stalled.close()
        server.close()


async def test_the_fast_lane_holds_little_of_an_answer_its_client_does_not_take(make_gateway: MakeGateway) -> None:
    """A streamed answer goes on only as the client takes it: one that takes nothing has the fast lane hold a
    buffer's worth, not the upstream's 100 MiB, and is dropped after ``limits.send_timeout``."""
    server, client, port = await in_front(make_gateway, big_answers, limits={"send_timeout": 0.5})
    await client.app[GATEWAY].runtime.wake(WORKSPACE)
    front = fast_lane(client)
    [stalled] = await never_reading(
        client, f"GET /big HTTP/1.1\r\nHost: {port}-{WORKSPACE}.localhost:8080\r\n\r\n".encode(), count=1)
    most = 0
    try:
        for _ in range(500):  # 0.5 s of send_timeout, then the abort (10 s at most)
            for lane in front.lanes:
                if lane._transport is not None:
                    most = max(most, lane._transport.get_write_buffer_size())
            if not front.open:
                break
            await asyncio.sleep(0.02)
        assert front.open == 0, "the stalled client's connection is still open"
        assert most < 8 << 20, f"{most} bytes held for a client that takes none"
    finally:
        stalled.close()
        server.close()

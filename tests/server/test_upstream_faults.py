"""Upstream faults: an app that resets mid-response, half-closes, answers garbage or an oversized head (or trailer
section), stalls mid-body, accepts and never answers, or answers twice. Each gets a clean 502/504 (or, when the
answer had started, a cut-off stream) for that request only; the pooled connection is never reused poisoned (the
next request through the same pool gets its own answer); no file descriptor is left behind; and
``codehub_upstream_errors_total{fault}`` says which fault it was. In both lanes: a GET takes the fast lane, a POST
aiohttp's.

The upstream is a raw asyncio socket server that misbehaves on cue: the request's path names the fault."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from gateway.server.context import GATEWAY
from tests.conftest import MakeGateway, next_address, scrape, workspace
from tests.server.conftest import WORKSPACE, access_line
from tests.server.test_hostile_input import Answer

BIG = 100_000
"""A body longer than the gateway reads whole (``SMALL_BODY``): it is streamed, so a fault after its first piece
reaches the client as a cut-off stream."""
SENT = 20_000
TRAILERS = 1 << 20
"""Bytes of trailer fields ``endless-trailers`` sends (16 times the most the gateway reads of a head) before it
gives up and closes: a gateway that reads them all sees the close, not a head too large."""


class Misbehaving:
    """An HTTP/1.1 upstream on a raw socket: ``/ok`` is answered properly (kept alive), ``/fault/NAME`` misbehaves
    as ``NAME`` says. Every connection it accepted is closed by the time the gateway closed its end."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.paths: list[str] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str) -> int:
        self.server = await asyncio.start_server(self._connection, host, 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ")[1].decode()
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                if length:
                    await reader.readexactly(int(length[1]))
                self.paths.append(path)
                if not await FAULTS.get(path.removeprefix("/fault/"), answer_ok)(path, reader, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)


Fault = Callable[[str, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]
"""Answers (or does not) one request; whether to read another on the connection."""


def ok_answer(path: str) -> bytes:
    body = f"ok {path}".encode()
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)


async def until_closed(reader: asyncio.StreamReader) -> None:
    """Wait for the gateway to close its end (it gives up on this connection)."""
    while await reader.read(65536):
        pass


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (linger zero)."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def answer_ok(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(ok_answer(path))
    await writer.drain()
    return True


async def started_then(writer: asyncio.StreamWriter, *, chunked: bool = False) -> None:
    """The head of a long answer and its first piece, as a stream the gateway has begun to relay."""
    if chunked:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n" % (SENT, b"s" * SENT))
    else:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (BIG, b"s" * SENT))
    await writer.drain()
    await asyncio.sleep(0.2)


async def reset_before_answer(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    reset(writer)
    return False


async def half_close_before_answer(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write_eof()
    await until_closed(reader)
    return False


async def garbage(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\nnot HTTP at all\r\n")
    await until_closed(reader)
    return False


async def oversized_head(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\n")
    for i in range(4096):  # 16 MiB of headers, and no end to them
        writer.write(b"X-Pad-%d: %b\r\n" % (i, b"p" * 4096))
        await writer.drain()
    await until_closed(reader)
    return False


async def stall_mid_head(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nX-Half: a")
    await until_closed(reader)
    return False


async def unasked_switch(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """A 101 to a plain request: what follows it would be another protocol on the client's connection."""
    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n")
    await until_closed(reader)
    return False


async def never_answer(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    await until_closed(reader)
    return False


async def reset_mid_body(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    await started_then(writer)
    reset(writer)
    return False


async def half_close_mid_body(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    await started_then(writer)
    writer.write_eof()
    await until_closed(reader)
    return False


async def bad_chunk_mid_body(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    await started_then(writer, chunked=True)
    writer.write(b"zz\r\nnot a chunk\r\n")
    await until_closed(reader)
    return False


async def endless_trailers(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """The body's last chunk, then trailer fields with no end: the gateway must stop reading them, not keep them."""
    await started_then(writer, chunked=True)
    writer.write(b"0\r\n")
    field = b"X-Trailer: t\r\n" * 1000
    with contextlib.suppress(ConnectionError):
        for _ in range(TRAILERS // len(field)):
            writer.write(field)
            await writer.drain()
    return False


async def stall_mid_body(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    await started_then(writer)
    await until_closed(reader)
    return False


async def small_answer_begun(writer: asyncio.StreamWriter) -> None:
    """The head of a small answer (read whole before anything goes to the client) and part of its body."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"s" * 10)
    await writer.drain()
    await asyncio.sleep(0.05)


async def stall_mid_small_body(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    await small_answer_begun(writer)
    await until_closed(reader)
    return False


async def reset_mid_small_body(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    await small_answer_begun(writer)
    reset(writer)
    return False


async def two_answers(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """A second answer nobody asked for, right behind the first: on a reused connection it would answer the next
    request, someone else's perhaps."""
    writer.write(ok_answer(path) + b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\npoisoned")
    await writer.drain()
    return True


async def two_answers_chunked(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """The same behind a chunked answer, which the gateway streams instead of reading it whole by its length."""
    body = f"ok {path}".encode()
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
                 + b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\npoisoned")
    await writer.drain()
    return True


async def trailing_bytes(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(ok_answer(path) + b"HTTP/1.1 20")
    await writer.drain()
    return True


async def body_after_head_answer(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """A body sent, a moment later, after the answer to a HEAD (which has none)."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.write(b"poisoned")
    await writer.drain()
    return True


def naming_its_length(size: int) -> Fault:
    """A proper answer of ``size`` bytes, kept alive, whose ``Connection`` header names ``Content-Length``: a
    header field to drop at the next hop, were it not the one that says where the body ends."""
    async def answer(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: Content-Length\r\n\r\n%b"
                     % (size, b"b" * size))
        await writer.drain()
        return True
    return answer


async def body_to_the_close(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """No fault: an answer with neither a length nor chunks, whose body ends where the connection does."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nup to ")
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(b"the close")
    return False


async def interim_answers_first(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """No fault: interim answers (100 Continue, 103 Early Hints) before the real one, in reads of their own."""
    for interim in (b"HTTP/1.1 100 Continue\r\n\r\n",
                    b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"):
        writer.write(interim)
        await writer.drain()
        await asyncio.sleep(0.02)
    return await answer_ok(path, reader, writer)


FAULTS: dict[str, Fault] = {
    "reset-before-answer": reset_before_answer, "half-close-before-answer": half_close_before_answer,
    "garbage": garbage, "oversized-head": oversized_head, "stall-mid-head": stall_mid_head,
    "unasked-switch": unasked_switch, "never-answer": never_answer, "reset-mid-body": reset_mid_body,
    "half-close-mid-body": half_close_mid_body,
    "stall-mid-small-body": stall_mid_small_body, "reset-mid-small-body": reset_mid_small_body,
    "bad-chunk-mid-body": bad_chunk_mid_body, "endless-trailers": endless_trailers, "stall-mid-body": stall_mid_body,
    "two-answers": two_answers, "two-answers-chunked": two_answers_chunked,
    "trailing-bytes": trailing_bytes, "body-after-head-answer": body_after_head_answer,
    "slow-body": stall_mid_body, "names-its-length": naming_its_length(5),
    "names-its-length-big": naming_its_length(BIG),
    "body-to-the-close": body_to_the_close, "interim-answers-first": interim_answers_first,
}


@dataclass
class Faulty:
    host: str
    client_host: str
    client_port: int
    upstream: Misbehaving
    metrics: Callable[[], Awaitable[str]]

    async def send(self, method: str, path: str, version: str = "1.1") -> tuple[Answer | None, bytes, bool]:
        """One request on a connection of its own: its answer (None if none came), the body bytes that did
        come, and whether the body was cut short (the gateway closed the connection before its end)."""
        reader, writer = await asyncio.open_connection(self.client_host, self.client_port)
        body = "hi" if method == "POST" else ""
        writer.write(f"{method} {path} HTTP/{version}\r\nHost: {self.host}\r\nAccept: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        try:
            async with asyncio.timeout(20):
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                if method == "HEAD":
                    received, whole = b"", True
                elif length:
                    received, whole = await read_body(reader, int(length[1]))
                else:
                    received, whole = await read_chunks(reader)
            return Answer(int(head.split(b" ")[1]), head, received, False), received, not whole
        except asyncio.IncompleteReadError:
            return None, b"", True
        finally:
            writer.close()


    async def upgrade(self, path: str) -> tuple[int, bytes]:
        """A WebSocket upgrade to ``path``, on a connection of its own: the status and body of the refusal."""
        reader, writer = await asyncio.open_connection(self.client_host, self.client_port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\nAccept: application/json\r\n"
                     "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode())
        try:
            async with asyncio.timeout(20):
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                assert length, head
                return int(head.split(b" ")[1]), await reader.readexactly(int(length[1]))
        finally:
            writer.close()


async def read_body(reader: asyncio.StreamReader, length: int) -> tuple[bytes, bool]:
    received = b""
    with contextlib.suppress(ConnectionError):
        while len(received) < length and (piece := await reader.read(65536)):
            received += piece
    return received, len(received) == length


async def read_chunks(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """A chunked body: what came, and whether its last chunk did."""
    received = b""
    try:
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            received += (await reader.readexactly(size + 2))[:-2]
        await reader.readexactly(2)
    except (asyncio.IncompleteReadError, ConnectionError):
        return received, False
    return received, True


@pytest.fixture
async def faulty(make_gateway: MakeGateway) -> AsyncIterator[Faulty]:
    address = next_address()
    upstream = Misbehaving()
    port = await upstream.start(address)
    client = await make_gateway(workspaces={WORKSPACE: workspace(address, ports={port: "public"})}, in_memory=True,
                                timeouts={"first_byte": 0.5, "read": 0.5})
    await client.app[GATEWAY].runtime.wake(WORKSPACE)
    assert client.port is not None
    yield Faulty(f"{port}-{WORKSPACE}.localhost:8080", client.host, client.port, upstream,
                 lambda: scrape(client.app))
    await upstream.close()


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


async def settled() -> int:
    """The process's open files once they stop changing (the connections of the last exchange are closed)."""
    count = open_files()
    for _ in range(100):
        await asyncio.sleep(0.05)
        if open_files() == count:
            break
        count = open_files()
    return count


async def back_to(count: int) -> int:
    """The process's open files once every connection of the exchange is closed (bounded wait)."""
    for _ in range(100):
        if open_files() <= count:
            break
        await asyncio.sleep(0.05)
    return open_files()


BEFORE_ANSWER = [("reset-before-answer", 502, "reset"), ("half-close-before-answer", 502, "closed"),
                 ("garbage", 502, "garbage"), ("oversized-head", 502, "head-too-large"),
                 ("stall-mid-head", 504, "no-answer"), ("never-answer", 504, "no-answer")]
# a small body is read whole before the head goes out, so its faults are still error answers
IN_SMALL_BODY = [("stall-mid-small-body", 504, "stalled"), ("reset-mid-small-body", 502, "reset")]
MID_BODY = [("reset-mid-body", "reset"), ("half-close-mid-body", "closed"), ("bad-chunk-mid-body", "garbage"),
            ("endless-trailers", "head-too-large"), ("stall-mid-body", "stalled")]
LANES = {"fast-lane": "GET", "aiohttp-lane": "POST"}


@pytest.mark.parametrize("lane", list(LANES))
async def test_the_access_line_counts_the_body_alone_in_both_lanes(faulty: Faulty, lane: str,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="codehub.access"):
        answer, body, cut = await faulty.send(LANES[lane], "/ok")
        line = await access_line(caplog, "/ok")
    assert answer is not None
    assert not cut
    assert (line["status"], line["bytes"]) == (200, len(body)), line


def faults_counted(metrics: str) -> dict[str, float]:
    return {m[1]: float(m[2]) for m in re.finditer(r'codehub_upstream_errors_total\{fault="([^"]+)"\} (\S+)',
                                                    metrics)}


async def warm(f: Faulty, method: str) -> int:
    """One good exchange, so the pool holds a kept-alive connection; the open files after it."""
    answer, body, _ = await f.send(method, "/ok")
    assert answer is not None
    assert body == b"ok /ok"
    return await settled()


async def assert_pool_healthy(f: Faulty, method: str, files: int) -> None:
    """The next request through the same pool gets its own answer, and nothing is left open."""
    answer, body, _ = await f.send(method, "/ok")
    assert answer is not None
    assert (answer.status, body) == (200, b"ok /ok")
    assert await back_to(files) <= files


@pytest.mark.parametrize("lane", list(LANES))
@pytest.mark.parametrize(("fault", "status", "label"), BEFORE_ANSWER + IN_SMALL_BODY,
                         ids=[c[0] for c in BEFORE_ANSWER + IN_SMALL_BODY])
async def test_a_fault_before_the_answer_is_a_clean_502_or_504(faulty: Faulty, lane: str, fault: str,
                                                                status: int, label: str) -> None:
    method = LANES[lane]
    files = await warm(faulty, method)
    answer, body, _ = await faulty.send(method, f"/fault/{fault}")
    assert answer is not None
    assert answer.status == status, answer.head
    assert b'"code": "upstream-' in body
    await assert_pool_healthy(faulty, method, files)
    counted = faults_counted(await faulty.metrics())
    assert set(counted) == {label}, counted


@pytest.mark.parametrize("lane", list(LANES))
async def test_a_101_nobody_asked_for_is_a_502_not_a_switch(faulty: Faulty, lane: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Only a WebSocket upgrade asks an upstream to switch protocols, and it has a handshake of its own: a 101 to
    any other request is not HTTP any more, and passed on it would let the upstream speak on the client's
    connection past the gateway. llhttp reports it with an exception of its own, no parser error: no traceback."""
    method = LANES[lane]
    files = await warm(faulty, method)
    answer, body, _ = await faulty.send(method, "/fault/unasked-switch")
    assert answer is not None
    assert answer.status == 502, answer.head
    assert b'"code": "upstream-error"' in body
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    await assert_pool_healthy(faulty, method, files)
    assert set(faults_counted(await faulty.metrics())) == {"garbage"}


@pytest.mark.parametrize("lane", list(LANES))
@pytest.mark.parametrize(("path", "size"), [("names-its-length", 5), ("names-its-length-big", BIG)],
                         ids=["small", "streamed"])
async def test_an_answer_whose_connection_header_names_its_length_stays_framed(faulty: Faulty, lane: str,
                                                                                path: str, size: int) -> None:
    """The framing the client gets is the gateway's, written from what it sends: an upstream that names
    ``Content-Length`` in ``Connection`` does not get the length dropped from an answer sent with it, which the
    client of a kept-alive connection could then read only to the connection's end (``limits.keepalive``)."""
    method = LANES[lane]
    reader, writer = await asyncio.open_connection(faulty.client_host, faulty.client_port)
    try:
        for _ in range(2):  # the second answer on the same connection: the first ended where its head said
            writer.write(f"{method} /fault/{path} HTTP/1.1\r\nHost: {faulty.host}\r\nContent-Length: 0\r\n\r\n"
                         .encode())
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
                assert re.search(rb"(?i)\r\ncontent-length: %d\r\n" % size, head), head
                assert await reader.readexactly(size) == b"b" * size
    finally:
        writer.close()
    assert faults_counted(await faulty.metrics()) == {}


@pytest.mark.parametrize("lane", LANES)
async def test_interim_answers_are_skipped_for_the_real_one(faulty: Faulty, lane: str) -> None:
    """A 100 Continue or 103 Early Hints from the upstream is not its answer: the client gets the final one (the
    interim heads are not passed on either, nor their fields, such as Early Hints' ``Link``, folded into the real
    one's), in either lane."""
    answer, received, cut = await faulty.send(LANES[lane], "/fault/interim-answers-first")
    assert answer is not None
    assert (answer.status, received, cut) == (200, b"ok /fault/interim-answers-first", False)
    assert b"link:" not in answer.head.lower(), answer.head
    assert faults_counted(await faulty.metrics()) == {}


@pytest.mark.parametrize("lane", LANES)
async def test_an_answer_whose_body_ends_with_the_connection_is_passed_on_whole(faulty: Faulty, lane: str) -> None:
    """An answer with neither ``Content-Length`` nor chunks is no fault: its body is all the upstream sends until it
    closes, and reaches the client whole (re-framed by the gateway), in either lane."""
    answer, received, cut = await faulty.send(LANES[lane], "/fault/body-to-the-close")
    assert answer is not None
    assert (answer.status, received, cut) == (200, b"up to the close", False)
    assert faults_counted(await faulty.metrics()) == {}


@pytest.mark.parametrize(("fault", "status", "label"), BEFORE_ANSWER, ids=[c[0] for c in BEFORE_ANSWER])
async def test_a_fault_before_the_upgrade_answer_is_the_same_502_or_504(faulty: Faulty, fault: str, status: int,
                                                                        label: str) -> None:
    """An upstream that misbehaves before answering a WebSocket upgrade gets the answer, the error code and the
    count an HTTP request's would (the upgrade has a handshake of its own, not the pool's exchange)."""
    got, body = await faulty.upgrade(f"/fault/{fault}")
    assert got == status, body
    assert b'"code": "upstream-' in body
    assert set(faults_counted(await faulty.metrics())) == {label}


@pytest.mark.parametrize("lane", list(LANES))
@pytest.mark.parametrize(("fault", "label"), MID_BODY, ids=[c[0] for c in MID_BODY])
async def test_a_fault_after_the_answer_started_cuts_the_stream(faulty: Faulty, lane: str, fault: str, label: str,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """The access line says how much of the body went out, as for a whole answer: a cut stream logged as 0 bytes
    (or with its head counted in one lane) hid what a visitor got, say through a share link revoked meanwhile."""
    method = LANES[lane]
    files = await warm(faulty, method)
    with caplog.at_level(logging.INFO, logger="codehub.access"):
        answer, body, cut = await faulty.send(method, f"/fault/{fault}")
        line = await access_line(caplog, f"/fault/{fault}")
    assert answer is not None
    assert answer.status == 200
    assert SENT <= len(body) < BIG
    assert cut  # the connection ended before the body did: the client knows it is incomplete
    assert (line["status"], line["bytes"]) == (200, len(body)), line
    await assert_pool_healthy(faulty, method, files)
    counted = faults_counted(await faulty.metrics())
    assert set(counted) == {label}, counted


@pytest.mark.parametrize("lane", list(LANES))
@pytest.mark.parametrize("fault", ["two-answers", "two-answers-chunked", "trailing-bytes"])
async def test_bytes_after_an_answer_never_reach_the_next_request(faulty: Faulty, lane: str, fault: str) -> None:
    """Response smuggling: whatever an upstream sends past its answer is not read as the answer to the next
    request on that connection; the connection is dropped instead of going back to the pool."""
    method = LANES[lane]
    files = await warm(faulty, method)
    answer, body, _ = await faulty.send(method, f"/fault/{fault}")
    assert answer is not None
    assert (answer.status, body) == (200, f"ok /fault/{fault}".encode())
    for _ in range(3):
        await assert_pool_healthy(faulty, method, files)
    counted = faults_counted(await faulty.metrics())
    assert set(counted) == {"garbage"}, counted


@pytest.mark.parametrize("version", ["1.1", "1.0"], ids=["fast-lane", "aiohttp-lane"])
async def test_a_body_after_an_answer_to_head_is_not_the_next_answer(faulty: Faulty, version: str) -> None:
    files = await warm(faulty, "GET")
    answer, _, _ = await faulty.send("HEAD", "/fault/body-after-head-answer", version)
    assert answer is not None
    assert answer.status == 200
    await asyncio.sleep(0.4)  # the body the upstream should not have sent has come
    for _ in range(3):
        await assert_pool_healthy(faulty, "GET", files)
    # Not read, so not counted: a connection that answered a HEAD is closed at once, as a body written late may come
    # after it went to the next request (test_a_body_sent_late_after_an_answer_to_head_is_never_the_next_requests…)
    assert faults_counted(await faulty.metrics()) == {}


@pytest.mark.parametrize("lane", list(LANES))
async def test_a_client_that_leaves_mid_answer_is_no_fault_of_the_upstream(faulty: Faulty, lane: str) -> None:
    method = LANES[lane]
    files = await warm(faulty, method)
    reader, writer = await asyncio.open_connection(faulty.client_host, faulty.client_port)
    writer.write(f"{method} /fault/slow-body HTTP/1.1\r\nHost: {faulty.host}\r\nContent-Length: 0\r\n\r\n"
                 .encode())
    async with asyncio.timeout(10):
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(SENT)
    writer.close()  # gone, with the answer half read
    await assert_pool_healthy(faulty, method, files)
    assert faults_counted(await faulty.metrics()) == {}


@pytest.mark.parametrize("via", ["websocket", *LANES])
async def test_a_connect_that_takes_too_long_is_a_504_counted_as_a_timeout(make_gateway: MakeGateway,
                                                                           via: str) -> None:
    """A request (in either lane) or a WebSocket upgrade whose connect outlasts ``timeouts.connect`` is answered 504
    and counted as a timeout (here a connect timeout so short that no connect makes it); the connect is not tried
    again for as long as the client waits."""
    address = next_address()
    upstream = Misbehaving()
    port = await upstream.start(address)
    try:
        client = await make_gateway(workspaces={WORKSPACE: workspace(address, ports={port: "public"})},
                                    in_memory=True, timeouts={"connect": 1e-9})
        await client.app[GATEWAY].runtime.wake(WORKSPACE)
        assert client.port is not None
        faulty = Faulty(f"{port}-{WORKSPACE}.localhost:8080", client.host, client.port, upstream,
                        lambda: scrape(client.app))
        if via == "websocket":
            status, body = await faulty.upgrade("/ok")
        else:
            answer, body, _ = await faulty.send(LANES[via], "/ok")
            assert answer is not None
            status = answer.status
        assert status == 504, body
        assert b'"code": "upstream-timeout"' in body
        assert 'codehub_upstream_connect_errors_total{reason="timeout"} 1.0' in await faulty.metrics()
    finally:
        await upstream.close()


def sockets(*, local: tuple[str, int] | None = None, remote: tuple[str, int] | None = None) -> int:
    """Connected TCP sockets with a file open in some process (an aborted socket whose last bytes the kernel still
    tries to deliver has none), by the local or the remote end (loopback addresses are the tests' own)."""
    def hexed(address: tuple[str, int]) -> str:
        return f"{struct.unpack('=I', socket.inet_aton(address[0]))[0]:08X}:{address[1]:04X}"

    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return sum((local is None or row[1] == hexed(local)) and (remote is None or row[2] == hexed(remote))
               and row[3] != "0A" and row[9] != "0" for row in rows)  # 0A: listening


async def no_sockets(**ends: tuple[str, int]) -> int:
    """``sockets`` once they are all closed (bounded wait)."""
    for _ in range(100):
        if not sockets(**ends):
            break
        await asyncio.sleep(0.05)
    return sockets(**ends)


async def test_an_upstream_that_takes_a_body_slowly_is_not_timed_out(make_gateway: MakeGateway) -> None:
    """The first-byte clock bounds a wait in which the app takes nothing of the body, not one in which it takes
    it slowly: the socket becomes writable again only once a third of the kernel's send buffer (megabytes) is
    free, seconds at 640 KB/s, and an app passing an upload on to something slow lost every large one (504)."""
    address = next_address()
    taken = [0]

    async def slow_reader(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            while piece := await reader.read(64_000):  # 640 KB/s, steadily
                taken[0] += len(piece)
                await asyncio.sleep(0.1)
        writer.close()

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind((address, 0))
    server = await asyncio.start_server(slow_reader, sock=sock)
    port = server.sockets[0].getsockname()[1]
    client = await make_gateway(workspaces={WORKSPACE: workspace(address, ports={port: "public"})}, in_memory=True,
                                timeouts={"first_byte": 1.0})
    await client.app[GATEWAY].runtime.wake(WORKSPACE)
    assert client.port is not None
    reader, writer = await asyncio.open_connection(client.host, client.port)
    total = 24 << 20
    writer.write(f"POST / HTTP/1.1\r\nHost: {port}-{WORKSPACE}.localhost:8080\r\nContent-Length: {total}\r\n"
                 "Accept: application/json\r\n\r\n".encode())

    async def upload() -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(total // 65536):
                writer.write(b"x" * 65536)
                await writer.drain()

    uploading = asyncio.create_task(upload())
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(6):  # several first-byte timeouts of steady progress
                head = await reader.readuntil(b"\r\n\r\n")
                pytest.fail(f"answered while the app was still taking the body: {head!r}")
        assert taken[0] > 1 << 20
    finally:
        uploading.cancel()
        writer.close()
        server.close()


async def test_an_upload_held_up_by_the_upstream_goes_on_once_it_reads_again(make_gateway: MakeGateway) -> None:
    """An app that stops reading an upload for a while (less than the first-byte timeout) fills the buffers, and
    the gateway stops writing; once the app reads again, the rest of the body goes out and the app's answer comes
    back: the gateway's wait for the socket to drain ends when it does."""
    address = next_address()
    total = 16 << 20

    async def pausing_reader(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.5)  # the gateway's writes pause meanwhile
        received = 0
        with contextlib.suppress(ConnectionError):
            while received < total and (piece := await reader.read(1 << 20)):
                received += len(piece)
            body = str(received).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
            await writer.drain()
        writer.close()

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind((address, 0))
    server = await asyncio.start_server(pausing_reader, sock=sock)
    port = server.sockets[0].getsockname()[1]
    client = await make_gateway(workspaces={WORKSPACE: workspace(address, ports={port: "public"})}, in_memory=True,
                                timeouts={"first_byte": 3.0})
    await client.app[GATEWAY].runtime.wake(WORKSPACE)
    assert client.port is not None
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(f"POST / HTTP/1.1\r\nHost: {port}-{WORKSPACE}.localhost:8080\r\nContent-Length: {total}\r\n"
                 "Accept: application/json\r\n\r\n".encode())

    async def upload() -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(total // 65536):
                writer.write(b"x" * 65536)
                await writer.drain()

    uploading = asyncio.create_task(upload())
    try:
        async with asyncio.timeout(20):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 "), head
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            assert length is not None
            assert await reader.readexactly(int(length[1])) == str(total).encode()
    finally:
        uploading.cancel()
        writer.close()
        server.close()


async def test_an_upstream_that_stops_taking_a_body_times_out_and_lets_go(make_gateway: MakeGateway) -> None:
    """An app that takes the connection and reads none of a large body: the gateway's writes to it stall, and
    aiohttp stops reading the client, so it would not even see the client leave. The first-byte clock runs
    while the upstream holds the body up (504, as for an answer that does not come); the upstream connection is
    aborted, not closed gracefully (that waits for the unsent bytes for ever), and the client's is let go."""
    address = next_address()
    taken: list[asyncio.StreamWriter] = []
    stop = asyncio.Event()

    async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        taken.append(writer)
        await stop.wait()

    server = await asyncio.start_server(never_reads, address, 0)
    port = server.sockets[0].getsockname()[1]
    client = await make_gateway(workspaces={WORKSPACE: workspace(address, ports={port: "public"})}, in_memory=True,
                                timeouts={"first_byte": 0.5})
    await client.app[GATEWAY].runtime.wake(WORKSPACE)
    assert client.port is not None
    gateway = (client.host, client.port)
    reader, writer = await asyncio.open_connection(*gateway)

    async def upload() -> None:
        writer.write(f"POST / HTTP/1.1\r\nHost: {port}-{WORKSPACE}.localhost:8080\r\nAccept: application/json\r\n"
                     f"Content-Length: {1 << 30}\r\n\r\n".encode())
        with contextlib.suppress(ConnectionError):
            for _ in range(1 << 14):
                writer.write(b"x" * 65536)
                await writer.drain()

    uploading = asyncio.create_task(upload())
    try:
        async with asyncio.timeout(20):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 504"), head
        assert taken, "the upstream never had the request"
        assert await no_sockets(remote=(address, port)) == 0  # while the upstream still reads nothing
        uploading.cancel()
        writer.close()  # the uploader leaves
        assert await no_sockets(local=gateway) == 0
        assert faults_counted(await scrape(client.app)) == {"no-answer": 1.0}
    finally:
        uploading.cancel()
        writer.close()
        for taken_writer in taken:
            taken_writer.transport.abort()
        stop.set()
        server.close()

"""The upstream pool's limit: requests past ``limit`` to one upstream wait in line instead of opening more
connections, and every one of them is answered."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import StreamReader, web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.typedefs import Handler
from multidict import CIMultiDict

from gateway.errors import UnsafeHeader
from gateway.proxy.connection import Connection, HeadClock, HeadTimeout, Response
from gateway.proxy.pacing import INITIAL_WINDOW, MOST_WINDOW, Grant, Outcome, Pacer
from gateway.proxy.pool import (
    ClosedUnanswered,
    ConnectFailed,
    ConnectTimeout,
    QueueTimeout,
    UpstreamError,
    UpstreamPool,
)
from gateway.server.context import GATEWAY
from tests.conftest import MakeGateway, MakeUpstream, held_app, next_address, workspace


async def _upstream(make_upstream: MakeUpstream, routes: dict[str, Handler]) -> tuple[str, int]:
    """An aiohttp upstream answering GETs with ``routes``, on a loopback address of its own: address and port."""
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    address = next_address()
    server = await make_upstream(app, address, 0)
    assert server.port is not None
    return address, server.port


async def test_requests_past_the_limit_wait_for_a_turn(make_upstream: MakeUpstream) -> None:
    in_flight = 0
    most = 0
    peers: set[tuple[str, int]] = set()

    async def slow(request: web.Request) -> web.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        peers.add(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        await asyncio.sleep(0.05)
        in_flight -= 1
        return web.Response(text=request.path)

    address, port = await _upstream(make_upstream, {"/{n}": slow})
    pool = UpstreamPool(connect_timeout=5, first_byte_timeout=10, read_timeout=10, queue_timeout=30, limit=3)

    async def one(n: int) -> str:
        answer, exchange = await pool.request(address, port, "GET", f"/{n}", CIMultiDict(Host="x"), None)
        try:
            length = answer.content_length
            assert length is not None
            return (await answer.read_exactly(length)).decode()
        finally:
            exchange.close()

    try:
        async with asyncio.timeout(20):
            answers = await asyncio.gather(*(one(n) for n in range(20)))
    finally:
        pool.close()
    assert answers == [f"/{n}" for n in range(20)]
    assert most == 3
    assert len(peers) == 3  # connections are reused by the requests that waited


async def test_a_cancelled_wait_gives_its_turn_back(make_upstream: MakeUpstream) -> None:
    app, release = held_app()
    address = next_address()
    server = await make_upstream(app, address, 0)
    assert server.port is not None
    pool = UpstreamPool(connect_timeout=5, first_byte_timeout=10, read_timeout=10, queue_timeout=30, limit=1)
    try:
        first = asyncio.ensure_future(pool.request(address, server.port, "GET", "/", CIMultiDict(Host="x"), None))
        await asyncio.sleep(0.1)
        waiting = asyncio.ensure_future(pool.request(address, server.port, "GET", "/", CIMultiDict(Host="x"), None))
        await asyncio.sleep(0.1)
        waiting.cancel()
        release.set()
        _answer, exchange = await asyncio.wait_for(first, 10)
        exchange.close()
        async with asyncio.timeout(10):  # the cancelled waiter did not keep the only turn
            _answer, again = await pool.request(address, server.port, "GET", "/", CIMultiDict(Host="x"), None)
        again.close()
    finally:
        pool.close()


async def test_the_line_is_first_come_first_served_and_survives_cancellation() -> None:
    pacer: Pacer[str] = Pacer(1)
    assert pacer.try_take() is Grant.OPEN
    order: list[tuple[int, str | Grant]] = []

    async def wait(n: int) -> None:
        order.append((n, await pacer.take()))

    waiters = [asyncio.ensure_future(wait(n)) for n in range(4)]
    await asyncio.sleep(0)
    waiters[1].cancel()  # still in line: skipped
    assert pacer.give("first")  # to waiter 0, with the place
    await asyncio.sleep(0)
    assert pacer.give("second")  # waiter 1 is gone: to waiter 2
    waiters[3].cancel()
    await asyncio.sleep(0)
    assert not pacer.give("third")  # waiter 3 is gone, nobody waits: idle, and the place is free again
    await asyncio.gather(*waiters, return_exceptions=True)
    assert order == [(0, "first"), (2, "second")]
    assert (pacer.taken, pacer.idle) == (0, ["third"])
    assert pacer.try_take() == "third"


async def test_a_request_in_line_waits_once_for_a_connection_or_a_place_to_open_one() -> None:
    """With connections still being opened, a request past the limit used to wait for a turn and then, woken,
    for a connection: each wait ended with what the request needs."""
    pacer: Pacer[str] = Pacer(2, initial=1)
    assert pacer.try_take() is Grant.OPEN  # the window's one place
    first = pacer.attempt()
    second, third = asyncio.ensure_future(pacer.take()), asyncio.ensure_future(pacer.take())
    await asyncio.sleep(0)
    first.end(Outcome.PROVEN)  # the window grows to two: the second opens a connection
    await asyncio.sleep(0)
    assert (second.done(), third.done()) == (True, False)
    assert second.result() is Grant.OPEN
    assert pacer.give("kept")  # the first request's connection, and its place, go to the third
    assert await third == "kept"
    assert (pacer.taken, pacer.waiting) == (2, 0)


async def test_what_a_cancelled_request_in_line_was_given_goes_to_the_next() -> None:
    pacer: Pacer[str] = Pacer(1)
    assert pacer.try_take() is Grant.OPEN
    pacer.attempt().end(Outcome.PROVEN)
    cancelled, next_one = asyncio.ensure_future(pacer.take()), asyncio.ensure_future(pacer.take())
    await asyncio.sleep(0)
    pacer.give("kept")  # to the first in line, which is cancelled before it runs
    cancelled.cancel()
    assert await next_one == "kept"
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    pacer.leave()  # the request that took "kept" ends without it: the place is free, nobody waits
    assert (pacer.taken, pacer.try_take()) == (0, Grant.OPEN)


async def test_a_kept_alive_connection_given_to_the_line_takes_no_place_in_the_window() -> None:
    """Only a connection being opened is unproven: counting one already open would shrink the window for good,
    since no attempt ever ends it."""
    pacer: Pacer[str] = Pacer(1, initial=1)
    assert pacer.try_take() is Grant.OPEN
    pacer.attempt().end(Outcome.PROVEN)
    pacer.stream()  # its place goes to the next request, which opens a connection of its own
    assert pacer.try_take() is Grant.OPEN
    pacer.attempt().end(Outcome.PROVEN)
    waiting = asyncio.ensure_future(pacer.take())
    await asyncio.sleep(0)
    assert not pacer.restore("streamed")  # no place free: kept idle
    pacer.leave()  # the second request ends: the idle connection goes to the one in line
    assert await waiting == "streamed"
    assert (pacer.taken, pacer.unproven) == (1, 0)


async def test_a_retry_waits_only_for_the_window_and_goes_before_the_line() -> None:
    """A request retried after a failure holds its place in flight already: it waits for a place in the window
    only, and gets the next one before the requests in line."""
    pacer: Pacer[str] = Pacer(3, initial=1)
    assert pacer.try_take() is Grant.OPEN  # the window's one place
    in_line = asyncio.ensure_future(pacer.take())
    assert not pacer.try_open()  # a retry: the window is full
    retry = asyncio.ensure_future(pacer.open_fresh())
    await asyncio.sleep(0)
    pacer.attempt().end(Outcome.SETTLED)
    await asyncio.sleep(0)
    assert (retry.done(), in_line.done(), pacer.unproven, pacer.taken) == (True, False, 1, 1)
    pacer.attempt().end(Outcome.PROVEN)  # the retry's connection answered: the window grows to two
    assert await in_line is Grant.OPEN
    assert (pacer.unproven, pacer.taken, pacer.try_open(), pacer.unproven) == (1, 2, True, 2)


async def test_a_retry_gets_no_place_past_the_window_when_a_request_ends() -> None:
    """A request ending frees its place in flight, not a place in the window: a retry waiting for the window
    (full of unproven attempts) goes on waiting, and no more attempts are unproven at once than the window."""
    pacer: Pacer[str] = Pacer(3, initial=1)
    assert pacer.try_take() is Grant.OPEN
    pacer.attempt().end(Outcome.PROVEN)  # the window grows to two
    assert not pacer.give("kept")
    assert pacer.try_take() == "kept"  # one request on the kept-alive connection
    assert pacer.try_take() is Grant.OPEN
    assert pacer.try_take() is Grant.OPEN  # two attempts: the window is full
    assert not pacer.try_open()  # one of them failed and is retried: it waits for the window
    retry = asyncio.ensure_future(pacer.open_fresh())
    await asyncio.sleep(0)
    pacer.leave()  # the request on the kept-alive connection ends without giving it back
    await asyncio.sleep(0)
    assert (retry.done(), pacer.unproven, pacer.window) == (False, 2, 2)
    retry.cancel()
    await asyncio.gather(retry, return_exceptions=True)


async def test_a_connection_passed_on_from_a_cancelled_request_is_checked_again() -> None:
    """Between the hand-over and the cancelled request's turn the upstream may close the connection: the next in
    line gets a place to open a new one instead."""
    closed: set[str] = set()
    pacer: Pacer[str] = Pacer(1, fit=lambda conn: conn not in closed)
    assert pacer.try_take() is Grant.OPEN
    pacer.attempt().end(Outcome.PROVEN)
    cancelled, next_one = asyncio.ensure_future(pacer.take()), asyncio.ensure_future(pacer.take())
    await asyncio.sleep(0)
    pacer.give("kept")
    closed.add("kept")
    cancelled.cancel()
    assert await next_one is Grant.OPEN
    assert (pacer.taken, pacer.idle) == (1, [])


async def test_a_request_cancelled_as_it_was_granted_a_place_to_open_gives_both_back() -> None:
    pacer: Pacer[str] = Pacer(2, initial=1)
    assert pacer.try_take() is Grant.OPEN
    waiting = asyncio.ensure_future(pacer.take())
    await asyncio.sleep(0)
    pacer.attempt().end(Outcome.SETTLED)  # the window's place goes to the one waiting...
    waiting.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert (pacer.taken, pacer.unproven) == (1, 0)


async def test_an_idle_connection_found_for_a_line_that_has_left_stays_idle() -> None:
    """A stream's connection comes back while every place is taken (so it waits idle), then a place frees up as
    the only request in line has left: the connection, taken out for that request, goes back to the idle ones
    instead of being lost (neither kept nor closed: a socket open for nothing)."""
    pacer: Pacer[str] = Pacer(1)
    assert pacer.try_take() is Grant.OPEN
    pacer.attempt().end(Outcome.PROVEN)
    pacer.stream()  # the first answer streams: its place goes to the line
    assert pacer.try_take() is Grant.OPEN  # a second request takes it
    pacer.attempt().end(Outcome.PROVEN)
    in_line = asyncio.ensure_future(pacer.take())  # a third waits
    await asyncio.sleep(0)
    assert not pacer.restore("streamed")  # the stream ends, no place is free: its connection is idle
    in_line.cancel()  # the third leaves the line
    await asyncio.gather(in_line, return_exceptions=True)
    pacer.leave()  # the second ends without a connection
    assert (pacer.idle, pacer.taken, pacer.streaming) == (["streamed"], 0, 0)
    assert pacer.try_take() == "streamed"


async def test_a_streaming_answer_gives_its_place_in_flight_to_the_line(make_upstream: MakeUpstream) -> None:
    """An event stream has been answered: with the port's one place held by it, other requests would wait as long
    as it stays open. Its connection comes back to the pool when the stream ends, and is used again."""
    events = asyncio.Event()
    peers: list[tuple[str, int]] = []

    async def stream(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)  # chunked: no length
        await response.write(b"data: hello\n\n")
        await events.wait()
        await response.write_eof()
        return response

    async def quick(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        await events.wait()  # set by then, except for the last two
        return web.Response(text="ok")

    address, port = await _upstream(make_upstream, {"/stream": stream, "/quick": quick})
    pool = UpstreamPool(connect_timeout=5, first_byte_timeout=10, read_timeout=None, queue_timeout=30, limit=1)
    try:
        async with asyncio.timeout(10):
            answer, exchange = await pool.request(address, port, "GET", "/stream", CIMultiDict(Host="x"), None)
            assert await answer.read_chunk() == b"data: hello\n\n"
            assert pool.connections() == (0, 1)  # busy, without a place
            events.set()
            assert await _get(pool, address, port, "/quick") == b"ok"  # not in line behind the stream
            assert pool.connections() == (1, 1)  # the stream's connection still busy
            assert await answer.read_chunk() == b""
            exchange.close()
            assert pool.connections() == (2, 0)
            assert await _get(pool, address, port, "/quick") == b"ok"
            events.clear()
            both = [asyncio.ensure_future(_get(pool, address, port, "/quick")) for _ in range(2)]
            await asyncio.sleep(0.1)
            assert pool.queued() == 1  # the limit holds as before
            events.set()
            assert await asyncio.gather(*both) == [b"ok", b"ok"]
    finally:
        events.set()  # the stream's handler ends whatever happened
        pool.close()
    assert len(set(peers)) == 2
    assert peers[2] == peers[0]  # the stream's connection, kept alive and taken first


async def test_a_stream_s_connection_comes_back_without_a_place_past_the_limit() -> None:
    """Restored while others hold every place, the connection waits idle, not with the first in line: the limit
    still holds. With a place free it goes to the first in line."""
    pacer: Pacer[str] = Pacer(1)
    assert pacer.try_take() is Grant.OPEN
    pacer.attempt().end(Outcome.PROVEN)
    pacer.stream()
    assert (pacer.taken, pacer.streaming) == (0, 1)
    assert pacer.try_take() is Grant.OPEN  # the place the stream gave up
    pacer.attempt().end(Outcome.PROVEN)
    in_line = asyncio.ensure_future(pacer.take())
    await asyncio.sleep(0)
    assert not pacer.restore("streamed")
    await asyncio.sleep(0)
    assert (in_line.done(), pacer.taken, pacer.streaming, pacer.idle) == (False, 1, 0, ["streamed"])
    pacer.leave()  # the other request ends: its place and the idle connection go to the one in line
    assert (await in_line, pacer.taken, pacer.idle) == ("streamed", 1, [])
    pacer.stream()
    waiting = asyncio.ensure_future(pacer.take())  # in line, as if the window were full
    await asyncio.sleep(0)
    assert pacer.restore("again")  # a place is free, and the connection with it
    assert (await waiting, pacer.taken, pacer.streaming) == ("again", 1, 0)


async def test_chunked_pages_count_against_the_limit_until_they_are_whole(make_upstream: MakeUpstream) -> None:
    """A page sent in chunks (a dev server rendering as it goes), however slowly, is no stream: a burst of
    requests for it stays within the limit, connections and work in the upstream alike."""
    in_flight = most = 0

    async def page(request: web.Request) -> web.StreamResponse:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        response = web.StreamResponse(headers={"Content-Type": "text/html"})
        response.enable_chunked_encoding()
        await response.prepare(request)  # the head goes out at once, the page renders on
        await asyncio.sleep(0.3)
        await response.write(b"<html>")
        await response.write_eof()
        in_flight -= 1
        return response

    address, port = await _upstream(make_upstream, {"/": page})
    pool = UpstreamPool(connect_timeout=5, first_byte_timeout=10, read_timeout=10, queue_timeout=30, limit=2)

    async def one() -> None:
        answer, exchange = await pool.request(address, port, "GET", "/", CIMultiDict(Host="x"), None)
        try:
            await _read_to_end(answer)
        finally:
            exchange.close()

    try:
        async with asyncio.timeout(10):
            await asyncio.gather(*(one() for _ in range(8)))
            assert pool.connections() == (2, 0)
    finally:
        pool.close()
    assert most == 2


async def test_a_stream_that_breaks_off_ends_without_its_connection(make_upstream: MakeUpstream) -> None:
    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: part\n\n")
        assert request.transport is not None
        request.transport.abort()
        return response

    address, port = await _upstream(make_upstream, {"/": stream})
    pool = _pool()
    try:
        async with asyncio.timeout(10):
            answer, exchange = await pool.request(address, port, "GET", "/", CIMultiDict(Host="x"), None)
            with pytest.raises(UpstreamError):
                await _read_to_end(answer)
            exchange.close()
            assert pool.connections() == (0, 0)
    finally:
        pool.close()


async def _read_to_end(answer: Response) -> None:
    while await answer.read_chunk():
        pass


_CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"


@pytest.mark.parametrize(("head", "streams"), [
    (_CHUNKED + b"Content-Type: text/event-stream\r\n\r\n", True),
    (_CHUNKED + b"content-type:  Text/Event-Stream; charset=utf-8\r\n\r\n", True),
    (_CHUNKED + b"Content-Type: multipart/x-mixed-replace; boundary=frame\r\n\r\n", True),  # MJPEG
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: text/event-stream\r\n\r\n", True),  # to the end
    (_CHUNKED + b"Content-Type: text/html\r\n\r\n", False),  # a page sent in chunks ends by itself
    (_CHUNKED + b"\r\n", False),
    (_CHUNKED + b"Content-Type: text/event-streamer\r\n\r\n", False),
    (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 100\r\n\r\n", False),  # its end known
    (b"HTTP/1.1 204 No Content\r\nContent-Type: text/event-stream\r\n\r\n", False),  # a refusal: whole already
    (b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n", False),
])
async def test_which_answers_stream(head: bytes, streams: bool) -> None:
    conn = Connection(asyncio.get_running_loop(), HeadClock(None), None, lambda fault: None)
    conn.begin(head_only=False)
    conn.data_received(head)
    assert await conn.read_head()
    assert conn.streams() is streams



async def test_a_reason_phrase_that_arrives_in_pieces_is_read_whole() -> None:
    """llhttp hands a status line's reason over as it arrives, a piece a read (a multi-byte character may be cut
    in two); the next answer on the connection starts with no reason of the last one's."""
    conn = Connection(asyncio.get_running_loop(), HeadClock(None), None, lambda fault: None)
    conn.begin(head_only=False)
    for piece in (b"HTTP/1.1 299 Fine B", b"y M\xc3", b"\xa9\r\nContent-Len", b"gth: 0\r\n\r\n"):
        conn.data_received(piece)
    assert (await conn.read_head()).reason == "Fine By M\u00e9"
    conn.begin(head_only=False)
    conn.data_received(b"HTTP/1.1 200 O")
    conn.data_received(b"K\r\nContent-Length: 0\r\n\r\n")
    assert (await conn.read_head()).reason == "OK"

async def test_a_kept_alive_connection_taken_again_counts_against_the_limit(make_upstream: MakeUpstream) -> None:
    app, release = held_app()
    address = next_address()
    server = await make_upstream(app, address, 0)
    assert server.port is not None
    pool = UpstreamPool(connect_timeout=5, first_byte_timeout=10, read_timeout=10, queue_timeout=30, limit=1)
    try:
        async with asyncio.timeout(10):
            release.set()
            assert await _get(pool, address, server.port) == b"ok"  # leaves one kept-alive connection
            release.clear()
            first = asyncio.ensure_future(_get(pool, address, server.port))  # takes it, and is held
            await asyncio.sleep(0.1)
            second = asyncio.ensure_future(_get(pool, address, server.port))
            await asyncio.sleep(0.1)
            assert pool.queued() == 1
            release.set()
            assert list(await asyncio.gather(first, second)) == [b"ok", b"ok"]
    finally:
        pool.close()


_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def _answer_every_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A raw upstream's connection: every request head answered "ok", kept alive (a body is not waited for),
    until the other end closes."""
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(_OK)
    writer.close()


async def _raw_upstream(serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
                        ) -> tuple[asyncio.Server, str, int]:
    """A raw upstream on a loopback address of its own: the server, its address and port."""
    address = next_address()
    server = await asyncio.start_server(serve, address, 0)
    return server, address, server.sockets[0].getsockname()[1]


async def test_a_connection_the_upstream_closes_after_each_answer_frees_the_place_for_the_next() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(0.05)
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        writer.close()

    server, address, port = await _raw_upstream(serve)
    pool = UpstreamPool(connect_timeout=5, first_byte_timeout=10, read_timeout=10, queue_timeout=30, limit=1)
    try:
        async with server, asyncio.timeout(10):
            assert await asyncio.gather(*(_get(pool, address, port) for _ in range(3))) == [b"ok"] * 3
            assert pool.connections() == (0, 0)
    finally:
        pool.close()



async def test_a_body_read_in_pieces_leaves_no_read_timeout_behind_on_its_kept_alive_connection() -> None:
    """Each piece of an answer's body is awaited for ``read_timeout``; the clock stops when the piece comes. A
    connection idle in the pool for longer than that is reused, and no upstream fault is heard."""
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\no")
                await asyncio.sleep(0.05)  # the second piece of the body comes later: the gateway waits for it
                writer.write(b"k")
        writer.close()

    faults: list[str] = []
    server, address, port = await _raw_upstream(serve)
    pool = UpstreamPool(connect_timeout=5, first_byte_timeout=10, read_timeout=0.2, queue_timeout=30,
                        on_fault=faults.append)
    try:
        async with server, asyncio.timeout(10):
            assert await _get(pool, address, port) == b"ok"
            await asyncio.sleep(0.4)  # idle past the read timeout
            assert await _get(pool, address, port) == b"ok"
            assert (connections, faults) == (1, [])
    finally:
        pool.close()

async def test_a_kept_alive_connection_the_upstream_closed_is_not_used_for_a_post() -> None:
    """A POST is never sent twice, so it must not go out on a connection known to be closed."""
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(_OK)  # keep-alive, then closed
        writer.close()

    server, address, port = await _raw_upstream(serve)
    pool = _pool()
    try:
        async with server, asyncio.timeout(10):
            assert await _get(pool, address, port) == b"ok"
            await asyncio.sleep(0.2)  # the upstream's FIN has arrived
            assert await _get(pool, address, port, method="POST") == b"ok"
    finally:
        pool.close()
    assert connections == 2


async def test_an_idle_connection_the_upstream_sends_stray_bytes_on_is_closed_not_reused() -> None:
    """Bytes on a kept-alive connection while no request is out (an answer nobody asked for) make it unusable:
    the pool closes it at once, and the next request, a POST that is never sent twice, goes out on a fresh
    connection instead of failing on the spoilt one."""
    stray_closed = asyncio.Event()
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        n = connections
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(_OK)
            if n == 1:
                await asyncio.sleep(0.05)  # the answer was read and the connection went idle
                writer.write(_OK)  # a second answer nobody asked for
                await reader.read()  # until the pool closes its end
                stray_closed.set()
            else:
                await reader.read()
        writer.close()

    server, address, port = await _raw_upstream(serve)
    pool = _pool()
    try:
        async with server, asyncio.timeout(10):
            assert await _get(pool, address, port) == b"ok"
            await stray_closed.wait()
            assert await _get(pool, address, port, method="POST") == b"ok"
    finally:
        pool.close()
    assert connections == 2


async def test_an_idle_connection_closes_after_keepalive() -> None:
    closed = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _answer_every_head(reader, writer)
        closed.set()  # the pool closed its end

    server, address, port = await _raw_upstream(serve)
    pool = UpstreamPool(connect_timeout=5, first_byte_timeout=10, read_timeout=10, queue_timeout=30, keepalive=0.2)
    try:
        async with server, asyncio.timeout(10):
            assert await _get(pool, address, port) == b"ok"
            await closed.wait()
            assert pool.connections() == (0, 0)
    finally:
        pool.close()


async def test_idle_connections_keep_being_closed_after_keepalive_sweep_after_sweep() -> None:
    """The sweep that closes idle connections comes back while any is left, and again for connections that go
    idle later: one made idle half way through a sweep's wait, and one made idle after a sweep found nothing
    left, are closed too (not kept open until some request happens to look at them)."""
    closed = [asyncio.Event() for _ in range(3)]

    def upstream(n: int) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _answer_every_head(reader, writer)
            closed[n].set()  # the pool closed its end
        return serve

    servers = [await _raw_upstream(upstream(n)) for n in range(3)]
    pool = UpstreamPool(connect_timeout=5, first_byte_timeout=10, read_timeout=10, queue_timeout=30, keepalive=0.4)
    try:
        async with servers[0][0], servers[1][0], servers[2][0], asyncio.timeout(10):
            assert await _get(pool, *servers[0][1:]) == b"ok"
            await asyncio.sleep(0.2)  # half way to the sweep
            assert await _get(pool, *servers[1][1:]) == b"ok"
            await closed[0].wait()
            await closed[1].wait()  # by a later sweep, if the first came too soon for it
            assert await _get(pool, *servers[2][1:]) == b"ok"  # idle after the sweeps found nothing left
            await closed[2].wait()
            assert pool.connections() == (0, 0)
    finally:
        pool.close()


@contextlib.asynccontextmanager
async def _client_body(data: bytes, *, whole: bool) -> AsyncIterator[StreamReader]:
    """A request body as aiohttp's server hands it on, read from a client connection of its own: ``data``, then
    its end if ``whole`` (else the rest never comes)."""
    loop = asyncio.get_running_loop()
    client, peer = socket.socketpair()
    transport, protocol = await loop.connect_accepted_socket(lambda: BaseProtocol(loop), client)
    body = StreamReader(protocol, 2**16, loop=loop)
    body.feed_data(data)
    if whole:
        body.feed_eof()
    try:
        yield body
    finally:
        transport.close()
        peer.close()


async def test_a_connection_whose_request_body_was_cut_short_by_the_answer_is_not_reused() -> None:
    """An upstream may answer before it has read the whole body (a 413, a redirect): the rest of the body never
    went out, so the next request on that connection would be read as its continuation."""
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await _answer_every_head(reader, writer)  # not waiting for a body

    server, address, port = await _raw_upstream(serve)
    pool = _pool()
    try:
        # 10 bytes of the 100 announced: the rest never comes
        async with server, _client_body(b"x" * 10, whole=False) as body, asyncio.timeout(10):
            answer, exchange = await pool.request(address, port, "POST", "/", CIMultiDict(Host="x", **{
                "Content-Length": "100"}), body)
            assert await answer.read_exactly(2) == b"ok"
            exchange.close()
            assert await _get(pool, address, port) == b"ok"
    finally:
        pool.close()
    assert connections == 2


async def test_a_connection_whose_request_body_went_out_whole_is_used_again_with_nothing_after_the_body() -> None:
    """The upstream reads exactly the length the head announced; what follows on the connection is the next
    request's head, on the same connection (no connection spent per upload, nor a chunked body's last chunk
    written after a body sent by its length, read as the start of the next request)."""
    heads: list[bytes] = []
    bodies: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                heads.append(await reader.readuntil(b"\r\n\r\n"))
                if heads[-1].startswith(b"POST "):
                    bodies.append(await reader.readexactly(10))
                writer.write(_OK)
        writer.close()

    server, address, port = await _raw_upstream(serve)
    pool = _pool()
    try:
        async with server, _client_body(b"x" * 10, whole=True) as body, asyncio.timeout(10):
            answer, exchange = await pool.request(address, port, "POST", "/", CIMultiDict(Host="x", **{
                "Content-Length": "10"}), body)
            assert await answer.read_exactly(2) == b"ok"
            exchange.close()
            assert pool.connections() == (1, 0)
            assert await _get(pool, address, port) == b"ok"
    finally:
        pool.close()
    assert bodies == [b"x" * 10]
    assert [head.split(b" ", 1)[0] for head in heads] == [b"POST", b"GET"]


async def test_an_app_that_takes_an_upload_and_never_answers_times_out_like_any_other() -> None:
    """The first-byte clock of a request with a body starts once the body is out (before, a slow upload would
    count against the app): an app that reads the whole body and then says nothing is a ``HeadTimeout`` (504
    ``upstream-timeout``) after ``first_byte_timeout``, not a request, and a place in the window, held for ever."""
    took = asyncio.Event()
    never = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(10)
            took.set()
            await never.wait()
        writer.close()

    server, address, port = await _raw_upstream(serve)
    pool = _pool(first_byte=0.3)
    try:
        async with server, _client_body(b"x" * 10, whole=True) as body, asyncio.timeout(10):
            with pytest.raises(HeadTimeout):
                await pool.request(address, port, "POST", "/", CIMultiDict(Host="x", **{"Content-Length": "10"}), body)
            assert took.is_set()
            assert pool.connections() == (0, 0)
            never.set()
    finally:
        pool.close()


@pytest.mark.parametrize("how", ["timed out", "given up"])
async def test_a_request_that_ends_before_its_answer_closes_its_connection(how: str) -> None:
    """A request that timed out waiting for its answer's head (504), or that its client gave up (the task
    cancelled), leaves no connection open to the app: each one a file descriptor here and a connection the app
    keeps serving."""
    heard, closed = asyncio.Event(), asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            heard.set()
            await reader.read()  # nothing more comes: until the connection closes
        closed.set()
        writer.close()

    server, address, port = await _raw_upstream(serve)
    pool = _pool(first_byte=0.3 if how == "timed out" else 10.0)
    try:
        async with server, asyncio.timeout(10):
            request = asyncio.ensure_future(_get(pool, address, port, method="POST"))
            await heard.wait()
            if how == "given up":
                request.cancel()
            with contextlib.suppress(asyncio.CancelledError, HeadTimeout):
                await request
            await closed.wait()
            assert pool.connections() == (0, 0)
    finally:
        pool.close()


async def test_a_connection_that_cannot_be_reused_is_closed_and_its_body_no_longer_sent() -> None:
    """An answer that came before the request's body was all out leaves a connection no request may take: it is
    closed at once, not left open for as long as the upstream keeps it (a file descriptor each), and the task that
    was sending the body ends with the exchange instead of waiting on the client for ever."""
    upstream_saw_the_end = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _answer_every_head(reader, writer)  # until the gateway's end closes
        upstream_saw_the_end.set()

    server, address, port = await _raw_upstream(serve)
    pool = _pool()
    try:
        # 10 bytes of the 100 announced: the rest never comes
        async with server, _client_body(b"x" * 10, whole=False) as body, asyncio.timeout(10):
            answer, exchange = await pool.request(address, port, "POST", "/", CIMultiDict(Host="x", **{
                "Content-Length": "100"}), body)
            assert await answer.read_exactly(2) == b"ok"
            exchange.close()
            await upstream_saw_the_end.wait()
            assert exchange.sender is not None
            assert exchange.sender.done()
            assert pool.connections() == (0, 0)
    finally:
        pool.close()


@pytest.mark.parametrize(("method", "length"), [
    ("POST", b"0"), ("PATCH", b"0"), ("PUT", b"0"),
    ("GET", None), ("HEAD", None), ("OPTIONS", None), ("TRACE", None), ("CONNECT", None), ("DELETE", None),
])
async def test_a_request_without_a_body_says_so_when_its_method_usually_has_one(method: str,
                                                                               length: bytes | None) -> None:
    """A POST without a body goes out with ``Content-Length: 0`` (an upstream may answer 411 Length Required, or
    wait for a body, without it); a GET gets no length it did not have (RFC 9110 §8.6: a length on a method that
    has no content, some servers refuse)."""
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            heads.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(_OK)
            await reader.read()
        writer.close()

    server, address, port = await _raw_upstream(serve)
    pool = _pool()
    try:
        async with server, asyncio.timeout(10):
            answer, exchange = await pool.request(address, port, method, "/", CIMultiDict(Host="x"), None)
            exchange.close()  # the head is what counts (an answer to a HEAD has no body to read)
            assert answer.status == 200
    finally:
        pool.close()
    fields = dict(line.split(b": ", 1) for line in heads[0].split(b"\r\n")[1:] if line)
    assert {name.lower(): value for name, value in fields.items()}.get(b"content-length") == length
    assert b"transfer-encoding" not in {name.lower() for name in fields}


def _ok_app() -> web.Application:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    return app


async def test_requests_refused_for_an_unsafe_header_take_no_place(make_upstream: MakeUpstream) -> None:
    """A head the gateway refuses to write (a forged session's identity with a line break) never takes a place in
    the window or a kept-alive connection: a visitor sending such requests cannot block the port for others."""
    address = next_address()
    server = await make_upstream(_ok_app(), address, 0)
    assert server.port is not None
    pool = UpstreamPool(connect_timeout=5, first_byte_timeout=10, read_timeout=10, queue_timeout=2, limit=100)
    try:
        async with asyncio.timeout(10):
            assert await _get(pool, address, server.port) == b"ok"
            for _ in range(MOST_WINDOW + 1):
                with pytest.raises(UnsafeHeader):
                    await pool.request(address, server.port, "GET", "/", CIMultiDict(Host="x", Bad="a\r\nb"), None)
            assert pool.connections() == (1, 0)
            assert await asyncio.gather(*(_get(pool, address, server.port) for _ in range(MOST_WINDOW + 1))) == \
                [b"ok"] * (MOST_WINDOW + 1)
    finally:
        pool.close()


async def test_refused_connects_give_their_places_back() -> None:
    address = next_address()
    with socket.socket() as sock:
        sock.bind((address, 0))
        port = sock.getsockname()[1]  # nothing listens there
    pool = UpstreamPool(connect_timeout=5, first_byte_timeout=10, read_timeout=10, queue_timeout=1, limit=2)
    try:
        for _ in range(3):
            with pytest.raises(ConnectFailed):
                await pool.request(address, port, "GET", "/", CIMultiDict(Host="x"), None)
        assert pool.connections() == (0, 0)
    finally:
        pool.close()


# --- connection manners ------------------------------------------------------------------------------------

def _pool(first_byte: float = 10.0, workers: int = 1) -> UpstreamPool:
    return UpstreamPool(connect_timeout=5, first_byte_timeout=first_byte, read_timeout=10, queue_timeout=30,
                        workers=workers)


async def _get(pool: UpstreamPool, address: str, port: int, path: str = "/", method: str = "GET") -> bytes:
    answer, exchange = await pool.request(address, port, method, path, CIMultiDict(Host="x"), None)
    try:
        length = answer.content_length
        assert length is not None
        return await answer.read_exactly(length)
    finally:
        exchange.close()


def _listener(backlog: int = 64) -> tuple[socket.socket, str, int]:
    """A listening socket on a loopback address of its own that nobody accepts from (a test does, if it wants):
    the socket, its address and port."""
    listener = socket.socket()
    listener.bind((next_address(), 0))
    listener.listen(backlog)
    address, port = listener.getsockname()
    return listener, address, port


async def _connects_at_once(listener: socket.socket, expected: int, accepted: list[socket.socket]) -> None:
    """Into ``accepted`` (the caller closes them), the connections a pool opens to a non-blocking ``listener`` that
    answers nothing: once ``expected`` came, whatever else comes within 0.3 s (nothing answered, so the window
    neither grows nor settles meanwhile)."""
    async with asyncio.timeout(5):
        while len(accepted) < expected:
            accepted += _accept_all(listener)
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)
    accepted += _accept_all(listener)


def _accept_all(listener: socket.socket) -> list[socket.socket]:
    accepted = []
    while True:
        try:
            accepted.append(listener.accept()[0])
        except BlockingIOError:
            return accepted


@pytest.mark.parametrize(("workers", "window"), [(1, INITIAL_WINDOW), (2, INITIAL_WINDOW // 2), (8, 1)])
async def test_connects_open_a_few_at_a_time_and_more_as_they_answer(workers: int, window: int) -> None:
    """Each of ``serve --workers`` N pools opens its share of the window: together they keep to one. More workers
    than the window has places still open one each, not none (a window of 0 would never open a connection)."""
    listener, address, port = _listener()
    listener.setblocking(False)
    pool = _pool(workers=workers)
    requests = [asyncio.ensure_future(_get(pool, address, port, f"/{n}")) for n in range(20)]
    accepted: list[socket.socket] = []
    try:
        await _connects_at_once(listener, window, accepted)
        assert len(accepted) == window

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    path = head.split(b" ")[1]
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path))

        server = await asyncio.start_server(serve, sock=listener)
        async with server:
            served = [asyncio.ensure_future(serve(*await asyncio.open_connection(sock=sock))) for sock in accepted]
            async with asyncio.timeout(10):
                answers = await asyncio.gather(*requests)
            for task in served:
                task.cancel()
    finally:
        pool.close()
        for sock in accepted:
            sock.close()
    assert answers == [f"/{n}".encode() for n in range(20)]


async def test_a_worker_of_two_opens_half_the_window(make_gateway: MakeGateway) -> None:
    """``serve --workers 2``: each worker's gateway paces its half of the window, so that both together open no
    more connections at once than a dev server's accept queue holds."""
    listener, address, port = _listener()
    listener.setblocking(False)
    client = await make_gateway(workspaces={"ws1": workspace(address, ports={port: "public"})}, in_memory=True,
                                workers=2)
    await client.app[GATEWAY].runtime.wake("ws1")
    requests = [asyncio.ensure_future(client.get(f"/{n}", headers={"Host": f"{port}-ws1.localhost:8080"}))
                for n in range(10)]
    accepted: list[socket.socket] = []
    try:
        await _connects_at_once(listener, INITIAL_WINDOW // 2, accepted)
        assert len(accepted) == INITIAL_WINDOW // 2
    finally:
        for request in requests:
            request.cancel()
        await asyncio.gather(*requests, return_exceptions=True)
        for sock in accepted:
            sock.close()
        listener.close()


class _Upstream:
    """A raw upstream that reads each request head and then does what ``answer`` says for that connection:
    answer it, close without a word, say nothing at all, answer once and then say nothing, or answer once and
    then close without a word."""

    def __init__(self, answer: list[str]) -> None:
        self.plan = answer
        self.connections = 0
        self.never = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        what = self.plan[min(self.connections, len(self.plan) - 1)]
        self.connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                if what == "close":
                    break
                if what == "silent":
                    await self.never.wait()
                writer.write(_OK)
                if what == "once":
                    what = "silent"
                if what == "once-then-close":
                    what = "close"
        writer.close()


@pytest.mark.parametrize(("plan", "method", "connections", "outcome"), [
    (["silent"], "GET", 2, "HeadTimeout"),  # stalled before its first byte: once more on a fresh connection
    (["silent"], "POST", 1, "HeadTimeout"),  # not idempotent: never sent twice
    (["silent", "answer"], "GET", 2, "ok"),
    (["close", "answer"], "GET", 2, "ok"),  # broke off before the first byte (a fresh connection)
    (["close", "answer"], "POST", 1, "ClosedUnanswered"),
    (["close"], "GET", 2, "ClosedUnanswered"),  # and after the retry, the error
])
async def test_a_failure_before_the_first_byte_is_retried_once_when_idempotent(
        plan: list[str], method: str, connections: int, outcome: str) -> None:
    upstream = _Upstream(plan)
    server, address, port = await _raw_upstream(upstream.serve)
    pool = _pool(first_byte=0.3)
    try:
        async with server, asyncio.timeout(10):
            try:
                result = (await _get(pool, address, port, method=method)).decode()
            except UpstreamError as exc:
                result = type(exc).__name__
            upstream.never.set()
        busy = pool.connections()[1]
    finally:
        pool.close()
    assert (result, upstream.connections, busy) == (outcome, connections, 0)  # its place ended once


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"])
async def test_every_idempotent_request_without_a_body_is_sent_again_when_its_connection_broke_off(
        method: str) -> None:
    """RFC 9110 §9.2.2: an idempotent request the upstream closed on unanswered may be sent again (a dev server
    restarting under a save drops a connection or two); a POST or PATCH is not (the table above)."""
    upstream = _Upstream(["close", "answer"])
    server, address, port = await _raw_upstream(upstream.serve)
    pool = _pool()
    try:
        async with server, asyncio.timeout(10):
            answer, exchange = await pool.request(address, port, method, "/", CIMultiDict(Host="x"), None)
            exchange.close()
    finally:
        pool.close()
    assert (answer.status, upstream.connections) == (200, 2)


async def test_a_kept_alive_connection_closed_under_a_request_costs_it_no_retry() -> None:
    """An upstream may close a kept-alive connection as a request goes out on it (its keep-alive timeout): that
    race is normal, and the request sent again on a fresh connection still has its one retry left."""
    upstream = _Upstream(["once-then-close", "close", "answer"])
    server, address, port = await _raw_upstream(upstream.serve)
    pool = _pool()
    try:
        async with server, asyncio.timeout(10):
            assert await _get(pool, address, port) == b"ok"
            assert await _get(pool, address, port) == b"ok"
    finally:
        pool.close()
    assert upstream.connections == 3


async def test_a_kept_alive_connection_closed_under_a_post_counts_once_against_the_upstream() -> None:
    """A POST is never sent twice, so the race a GET gets over for free fails it: that is reported as the
    upstream's fault (``on_fault``, the metric of upstream faults), once, as any connection closed unanswered is."""
    faults: list[str] = []
    upstream = _Upstream(["once-then-close", "close"])
    server, address, port = await _raw_upstream(upstream.serve)
    pool = UpstreamPool(connect_timeout=5, first_byte_timeout=10, read_timeout=10, queue_timeout=30,
                        on_fault=faults.append)
    try:
        async with server, asyncio.timeout(10):
            assert await _get(pool, address, port) == b"ok"
            with pytest.raises(ClosedUnanswered):
                await _get(pool, address, port, method="POST")
            assert faults == ["closed"]
            with pytest.raises(ClosedUnanswered):  # on a fresh connection: no race
                await _get(pool, address, port, method="POST")
            assert faults == ["closed", "closed"]
    finally:
        pool.close()


async def test_the_retry_takes_a_fresh_connection_not_another_kept_alive_one() -> None:
    upstream = _Upstream(["once", "once", "answer"])  # two kept-alive connections that go quiet, then a good one
    server, address, port = await _raw_upstream(upstream.serve)
    pool = _pool(first_byte=0.3)
    try:
        async with server, asyncio.timeout(10):
            assert list(await asyncio.gather(_get(pool, address, port), _get(pool, address, port))) == [b"ok"] * 2
            assert await _get(pool, address, port) == b"ok"
            upstream.never.set()
    finally:
        pool.close()
    assert upstream.connections == 3


async def test_a_long_answer_does_not_hold_a_place_in_the_window(make_upstream: MakeUpstream) -> None:
    """Long polls on every fresh connection must not keep other requests from connecting for long."""
    finished: list[str] = []

    async def poll(request: web.Request) -> web.Response:
        await asyncio.sleep(2.5)
        return web.Response(text="poll")

    async def quick(request: web.Request) -> web.Response:
        return web.Response(text="quick")

    address, port = await _upstream(make_upstream, {"/poll": poll, "/quick": quick})
    pool = _pool()

    async def one(path: str) -> None:
        finished.append((await _get(pool, address, port, path)).decode())

    try:
        async with asyncio.timeout(10):
            polls = [asyncio.ensure_future(one("/poll")) for _ in range(INITIAL_WINDOW)]
            await asyncio.sleep(0.1)
            await asyncio.gather(one("/quick"), *polls)
    finally:
        pool.close()
    assert finished[0] == "quick"


async def test_a_connect_that_fails_gives_its_place_in_the_window_back() -> None:
    """A port nobody listens on yet (an app starting) is tried again and again; each refused connect ends its
    attempt, so once the app listens the next request connects at once, not after ``timeouts.queue`` behind
    attempts that never end."""
    probe = socket.socket()
    probe.bind((next_address(), 0))
    address, port = probe.getsockname()
    probe.close()  # nothing listens there now
    pool = UpstreamPool(connect_timeout=5, first_byte_timeout=10, read_timeout=10, queue_timeout=1)
    try:
        for _ in range(3 * MOST_WINDOW):
            with pytest.raises(ConnectFailed):
                await pool.request(address, port, "GET", "/", CIMultiDict(Host="x"), None)
        server = await asyncio.start_server(_answer_every_head, address, port)
        async with server, asyncio.timeout(10):
            assert await _get(pool, address, port) == b"ok"
    finally:
        pool.close()


async def test_the_wait_for_a_connection_is_bounded(make_upstream: MakeUpstream) -> None:
    app, release = held_app()
    address = next_address()
    server = await make_upstream(app, address, 0)
    assert server.port is not None
    pool = UpstreamPool(connect_timeout=5, first_byte_timeout=10, read_timeout=10, queue_timeout=0.3, limit=1)
    try:
        first = asyncio.ensure_future(_get(pool, address, server.port))
        await asyncio.sleep(0.1)
        async with asyncio.timeout(5):
            second = asyncio.ensure_future(_get(pool, address, server.port))
            await asyncio.sleep(0.1)
            assert pool.queued() == 1
            with pytest.raises(QueueTimeout):
                await second
            assert pool.queued() == 0
            release.set()
            assert await first == b"ok"
            assert pool.connections() == (1, 0)  # the one that timed out took no place, and gave none back
    finally:
        pool.close()


async def test_a_retry_waits_for_the_window_and_that_wait_is_bounded_too() -> None:
    """A request retried after its connection closed unanswered needs a place in the window like any connect: while
    another request's unproven connection holds the only place, the retry opens nothing, and gives up with a queue
    timeout (504) rather than overflowing the upstream's accept queue or waiting on."""
    connections = 0
    held = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        n = connections
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            if n == 1:  # the first request's connection: closed without an answer, so it is retried
                writer.close()
                return
            if n == 2:  # the second's: taken and never answered, so its attempt stays unproven
                held.set()
                await reader.read()
            writer.write(_OK)
        writer.close()

    server, address, port = await _raw_upstream(serve)
    pool = UpstreamPool(connect_timeout=5, first_byte_timeout=10, read_timeout=10, queue_timeout=0.3, workers=4)
    first = asyncio.ensure_future(_get(pool, address, port, "/first"))  # a window of one place (4 workers)
    await asyncio.sleep(0)
    second = asyncio.ensure_future(_get(pool, address, port, "/second"))  # in line for that place
    try:
        async with server, asyncio.timeout(5):
            with pytest.raises(QueueTimeout):
                await first
            assert held.is_set()
            assert connections == 2  # the retry opened no third connection
            assert not second.done()
    finally:
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)
        pool.close()


async def test_the_wait_for_a_place_in_the_window_is_bounded() -> None:
    """An upstream that takes connections but never answers: past the window, requests wait, then give up."""
    listener, address, port = _listener()
    pool = UpstreamPool(connect_timeout=5, first_byte_timeout=10, read_timeout=10, queue_timeout=0.3)
    connecting = [asyncio.ensure_future(_get(pool, address, port)) for _ in range(INITIAL_WINDOW)]
    try:
        await asyncio.sleep(0.1)
        async with asyncio.timeout(5):
            with pytest.raises(QueueTimeout):
                await _get(pool, address, port)
        assert not any(request.done() for request in connecting)
    finally:
        for request in connecting:
            request.cancel()
        await asyncio.gather(*connecting, return_exceptions=True)
        pool.close()
        listener.close()


@pytest.mark.parametrize(("outcomes", "window"), [
    ([], INITIAL_WINDOW),
    ([Outcome.PROVEN], INITIAL_WINDOW + 1),
    ([Outcome.PROVEN] * 20, MOST_WINDOW),
    ([Outcome.SETTLED] * 3, INITIAL_WINDOW),
    ([Outcome.LOST], INITIAL_WINDOW // 2),
    ([Outcome.LOST] * 5, 1),
    ([Outcome.LOST, Outcome.PROVEN], INITIAL_WINDOW // 2 + 1),
])
async def test_the_window_grows_with_answers_and_halves_on_a_dropped_handshake(outcomes: list[Outcome],
                                                                                window: int) -> None:
    pacer: Pacer[object] = Pacer(1)
    for outcome in outcomes:
        assert pacer.try_open()
        pacer.attempt().end(outcome)
    assert pacer.window == window


async def test_a_dropped_handshake_halves_the_window() -> None:
    """A listener whose accept queue (one connection) is full: the pool's handshakes are dropped by the kernel
    and get through only on its retry a second later, once the listener serves with a larger queue. The window
    shrinks instead of growing with the answers that follow."""
    listener, address, port = _listener(0)
    squatter = socket.create_connection((address, port))  # fills the queue

    server = await asyncio.start_server(_answer_every_head, sock=listener, backlog=64, start_serving=False)
    pool = _pool()
    try:
        async with server, asyncio.timeout(10):
            requests = asyncio.gather(*(_get(pool, address, port) for _ in range(INITIAL_WINDOW)))
            await asyncio.sleep(0.5)
            await server.start_serving()  # listen(64): the retried handshakes fit
            assert await requests == [b"ok"] * INITIAL_WINDOW
    finally:
        pool.close()
        squatter.close()
    assert pool._upstreams[(address, port, False)].window < INITIAL_WINDOW  # what the pool learnt


async def test_a_request_cancelled_while_it_connects_gives_its_place_in_the_window_back() -> None:
    """A client that leaves while its request's handshake hangs (dropped by a full accept queue) ends that
    attempt: its place in the window is not kept for ever, so the next request connects once the upstream can
    take it (with a window of one place, a lost place would leave the port unreachable through this gateway)."""
    listener, address, port = _listener(0)
    squatter = socket.create_connection((address, port))  # fills the queue: handshakes are dropped
    server = await asyncio.start_server(_answer_every_head, sock=listener, backlog=64, start_serving=False)
    pool = UpstreamPool(connect_timeout=5, first_byte_timeout=10, read_timeout=10, queue_timeout=3, workers=4)
    try:
        async with server, asyncio.timeout(10):
            leaving = asyncio.ensure_future(_get(pool, address, port))
            await asyncio.sleep(0.1)  # connecting: its handshake waits for the kernel's retry
            leaving.cancel()
            await asyncio.gather(leaving, return_exceptions=True)
            await server.start_serving()  # listen(64): handshakes fit again
            assert await _get(pool, address, port) == b"ok"
    finally:
        pool.close()
        squatter.close()


async def test_a_connect_slowed_by_the_gateways_own_busy_loop_is_no_dropped_handshake() -> None:
    """A wake releases thousands of held requests at once, and the gateway's event loop is busy with them for
    seconds while its first connects complete at once in the kernel. Those connects must count as what they were
    (taken at once, then answered): the window grows, where taking the loop's delay for the kernel's SYN retry
    halved it to one."""
    listener, address, port = _listener()

    server = await asyncio.start_server(_answer_every_head, sock=listener)
    pool = _pool()
    try:
        async with server, asyncio.timeout(10):
            requests = asyncio.gather(*(_get(pool, address, port) for _ in range(INITIAL_WINDOW)))
            await asyncio.sleep(0)  # the connects are under way
            time.sleep(1.5)  # noqa: ASYNC251 (the point: the loop is busy for longer than a first SYN retry)
            assert await requests == [b"ok"] * INITIAL_WINDOW
    finally:
        pool.close()
    assert pool._upstreams[(address, port, False)].window == MOST_WINDOW  # four answers, no drop


async def test_connect_timeouts_halve_the_window_and_are_tried_once_more() -> None:
    listener, address, port = _listener(0)
    squatter = socket.create_connection((address, port))  # the queue is full and stays full
    pool = UpstreamPool(connect_timeout=0.3, first_byte_timeout=10, read_timeout=10, queue_timeout=30)
    try:
        async with asyncio.timeout(10):
            with pytest.raises(ConnectTimeout):
                await _get(pool, address, port)
    finally:
        pool.close()
        squatter.close()
        listener.close()
    assert pool._upstreams[(address, port, False)].window == INITIAL_WINDOW // 4  # two attempts, two halvings


async def test_after_a_retried_connect_timeout_the_window_still_holds_its_connects_to_it() -> None:
    """The retry after a connect timeout takes a place in the window of its own: once the handshakes get through
    again, no more connections are opened at once than the halved window (one) allows."""
    listener, address, port = _listener(0)
    listener.setblocking(False)
    squatter = socket.create_connection((address, port))  # the queue is full
    pool = UpstreamPool(connect_timeout=0.3, first_byte_timeout=10, read_timeout=10, queue_timeout=30)
    requests: list[asyncio.Future[bytes]] = []
    accepted: list[socket.socket] = []
    try:
        async with asyncio.timeout(10):
            with pytest.raises(ConnectTimeout):
                await _get(pool, address, port)
        assert pool._upstreams[(address, port, False)].window == 1
        squatter.close()
        for sock in _accept_all(listener):  # the squatter's: the queue has room again
            sock.close()
        listener.listen(64)
        requests += [asyncio.ensure_future(_get(pool, address, port)) for _ in range(4)]
        await _connects_at_once(listener, 1, accepted)
        assert len(accepted) == 1  # the one connect the window allows
    finally:
        for request in requests:
            request.cancel()
        await asyncio.gather(*requests, return_exceptions=True)
        pool.close()
        squatter.close()
        for sock in accepted:
            sock.close()
        listener.close()



async def test_a_closed_pool_closes_its_idle_connections_not_only_forgets_them() -> None:
    """``close`` ends the kept-alive connections themselves: the upstream sees each one end (no socket is left
    open behind an empty count)."""
    closed = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _answer_every_head(reader, writer)
        closed.set()  # the pool closed its end

    server, address, port = await _raw_upstream(serve)
    pool = _pool()
    try:
        async with server, asyncio.timeout(10):
            assert await _get(pool, address, port) == b"ok"
            assert pool.connections() == (1, 0)
            pool.close()
            await closed.wait()
    finally:
        pool.close()


async def test_a_gateway_that_stops_closes_its_kept_alive_upstream_connections(
        make_gateway: MakeGateway, make_upstream: MakeUpstream) -> None:
    """The app's cleanup closes the pool with everything else it opened: no idle kept-alive connection to a dev
    server outlives the gateway."""
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hi")

    address, port = await _upstream(make_upstream, {"/": hello})
    client = await make_gateway(workspaces={"ws1": workspace(address, ports={port: "public"})}, in_memory=True)
    await client.app[GATEWAY].runtime.wake("ws1")
    answer = await client.get("/", headers={"Host": f"{port}-ws1.localhost:8080"})
    assert await answer.text() == "hi"
    pool = client.app[GATEWAY].pool
    assert pool.connections() == (1, 0)
    await client.close()
    assert pool.connections() == (0, 0)

"""A lean HTTP/1.1 client for proxying: keep-alive connections per upstream, responses parsed by llhttp.

Why not aiohttp's ``ClientSession``: per request it builds request and response objects, URL objects, timers,
trace hooks and a cookie-jar pass, and in profiles that was the largest single cost of a proxied request. A
proxy needs far less: send a head and a streamed body, read a head and a streamed body, and reuse the
connection when both ends allow it. (``ClientSession`` still serves WebSockets and the OIDC calls.)
"""

from __future__ import annotations

import asyncio
import collections
import socket
import time
from collections.abc import Mapping
from typing import cast

import httptools
from aiohttp import StreamReader
from multidict import CIMultiDict

from gateway.proxy.pacing import SETTLE_AFTER, Attempt, Outcome, Pacer, Turns

_BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "CONNECT", "DELETE"})
REPLAYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
LIMIT_PER_UPSTREAM = 512
"""Requests in flight to one upstream at a time; more wait their turn. A dev server is one process: ten thousand
requests released by a wake must not become ten thousand connections (nor exhaust the gateway's file limit)."""
_SYN_RETRY = 0.9
"""A connect that took this long waited for a retransmitted SYN (the first is retried after 1 s): dropped."""
_READ_LIMIT = 1 << 16
"""Body bytes buffered per connection before reading from the upstream pauses (the client is slower)."""


class UpstreamError(Exception):
    """The exchange with the upstream failed; subclasses say how."""


class ConnectFailed(UpstreamError):
    """The connect itself failed (refused, unreachable): nothing was sent, so a retry is safe."""

    def __init__(self, os_error: OSError) -> None:
        super().__init__(str(os_error))
        self.os_error = os_error


class ConnectTimeout(UpstreamError):
    pass


class QueueTimeout(UpstreamError):
    """The request waited its whole allowance for a turn or a connection to its upstream: nothing was sent."""


class ReadTimeout(UpstreamError):
    """The upstream went silent mid-body for longer than the read timeout."""


class HeadTimeout(ReadTimeout):
    """The upstream took the request but sent no answer within the first-byte timeout."""


class BrokenOff(UpstreamError):
    """The connection closed, or the upstream sent something that is not HTTP, before the answer was whole."""


class ClosedUnanswered(BrokenOff):
    """The connection closed before a single byte of the answer: a dev server going from a throwaway listener to
    its real one can do that to a connection its old listener had queued."""


class Response:
    """The head of an upstream answer; the body is read through ``read_exactly`` or ``read_chunk``."""

    __slots__ = ("_conn", "headers", "reason", "status")

    def __init__(self, conn: _Connection, status: int, reason: str, headers: CIMultiDict[str]) -> None:
        self._conn = conn
        self.status = status
        self.reason = reason
        self.headers = headers

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    async def read_chunk(self) -> bytes:
        """The next piece of the body as it arrived; ``b""`` at its end."""
        return await self._conn.read_chunk()

    async def read_exactly(self, size: int) -> bytes:
        parts = []
        while size > 0:
            chunk = await self._conn.read_chunk()
            if not chunk:
                raise BrokenOff("the body ended early")
            parts.append(chunk)
            size -= len(chunk)
        return b"".join(parts)


class WriteFlow(asyncio.Protocol):
    """Write-side backpressure for a protocol: ``drained`` waits while the transport's buffer is over its
    high-water mark. (The fast lane's client connections use it too.)"""

    _loop: asyncio.AbstractEventLoop
    _write_paused = False
    _drain: asyncio.Future[None] | None = None

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._release_drain()

    def _release_drain(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    async def drained(self, transport: asyncio.BaseTransport | None) -> None:
        if self._write_paused and transport is not None and not transport.is_closing():
            self._drain = self._loop.create_future()
            await self._drain


class _Connection(WriteFlow):
    """One upstream connection: llhttp callbacks fill the current answer, the proxy awaits its pieces."""

    def __init__(self, loop: asyncio.AbstractEventLoop, head_timeout: float | None,
                 read_timeout: float | None) -> None:
        self._loop = loop
        self._head_timeout = head_timeout
        self._read_timeout = read_timeout
        self.attempt: Attempt[_Connection] | None = None  # its place in the window until it answers
        self.sending = False  # a request body is still going out: the first-byte clock has not started
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[str, str]] = []
        self._reason = ""
        self._head: Response | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._done = False
        self._head_only = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.keep_alive = True
        self.received = False
        self.idle_since = 0.0

    # --- asyncio.Protocol ---------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.received = True
        if self.attempt is not None:
            self.attempt.end(Outcome.PROVEN)
            self.attempt = None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(BrokenOff(f"invalid HTTP from the upstream: {exc}"))
            self.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.keep_alive = False
        if self.attempt is not None:
            self.attempt.end(Outcome.SETTLED)
            self.attempt = None
        if not self._done and self._head is not None and self._reads_to_eof():
            self._done = True  # a body delimited by the connection's end
        if not self._done:
            self._fail(BrokenOff("the upstream closed the connection") if self.received
                       else ClosedUnanswered("the upstream closed the connection without answering"))
        self._wake()
        self._release_drain()

    # --- llhttp callbacks ---------------------------------------------------------------------------------
    def on_status(self, status: bytes) -> None:
        self._reason = status.decode("utf-8", "surrogateescape")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            return  # an interim answer (100 Continue, 103 Early Hints): the real one follows
        self._head = Response(self, status, self._reason, CIMultiDict(self._headers))
        self.keep_alive = self._parser.should_keep_alive() and status != 101
        if self._head_only or status == 101:
            self._done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _READ_LIMIT and self.transport is not None:
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._head is None:  # the end of an interim answer
            self._headers = []
            self._reason = ""
            return
        self._done = True
        self.keep_alive = self.keep_alive and self._parser.should_keep_alive()
        self._wake()

    # --- used by the pool ---------------------------------------------------------------------------------
    def _reads_to_eof(self) -> bool:
        assert self._head is not None
        headers = self._head.headers
        return "Content-Length" not in headers and "chunked" not in headers.get("Transfer-Encoding", "").lower()

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        self.keep_alive = False
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _timed_out(self, seconds: float) -> None:
        if self._head is None:
            self._fail(HeadTimeout(f"no answer within {seconds:g} s"))
        else:
            self._fail(ReadTimeout(f"silent for {seconds:g} s in the middle of the answer"))

    async def _wait(self) -> None:
        """Until llhttp or the connection has news; a head is awaited for ``head_timeout`` once the request
        is out, each piece of body for ``read_timeout``."""
        self._waiter = self._loop.create_future()
        seconds = self._read_timeout if self._head is not None else None if self.sending else self._head_timeout
        timer = self._loop.call_later(seconds, self._timed_out, seconds) if seconds else None
        try:
            await self._waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def begin(self, head_only: bool) -> None:
        if head_only or self._head_only:
            self._parser = httptools.HttpResponseParser(self)  # llhttp cannot be told a HEAD answer has no body
        self._head_only = head_only
        self._headers = []
        self._reason = ""
        self._head = None
        self._done = False
        self.received = False

    async def read_head(self) -> Response:
        while self._head is None:
            if self._error is not None:
                raise self._error
            await self._wait()
        return self._head

    async def read_chunk(self) -> bytes:
        while not self._chunks:
            if self._done:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait()
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._buffered <= _READ_LIMIT // 2 and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        return chunk

    @property
    def reusable(self) -> bool:
        return (self.keep_alive and self._done and not self._chunks and self._error is None
                and self.transport is not None and not self.transport.is_closing())

    def close(self) -> None:
        self.keep_alive = False
        if self.transport is not None:
            self.transport.close()


def encode_head(start_line: str, headers: Mapping[str, str] | CIMultiDict[str]) -> bytes:
    """A request or response head on the wire (both directions of the proxy write theirs with this)."""
    fields = "\r\n".join(map(": ".join, headers.items()))  # no Python code per header: half the time of a loop
    head = f"{start_line}\r\n{fields}\r\n\r\n" if fields else f"{start_line}\r\n\r\n"
    return head.encode("utf-8", "surrogateescape")


class Exchange:
    """One request on one connection; ``close`` puts the connection back when both messages were whole."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int], conn: _Connection,
                 sender: asyncio.Task[None] | None) -> None:
        self._pool = pool
        self._key = key
        self._conn = conn
        self._sender = sender
        self.turn: Turns | None = None  # held until ``close`` (``LIMIT_PER_UPSTREAM``)

    def close(self) -> None:
        sender = self._sender
        sent = True
        if sender is not None:
            if not sender.done():
                sender.cancel()  # the upstream answered before taking the whole body: the connection is spent
                sent = False
            else:
                sent = not sender.cancelled() and sender.exception() is None
        if sent and self._conn.reusable:
            self._pool.release(self._key, self._conn)
        else:
            self._conn.close()
        if self.turn is not None:  # after the connection went back, so the next in line can take it
            self.turn.give()
            self.turn = None


class _Upstream:
    """What the pool keeps per (host, port): the turns of its requests and the pace of its connections."""

    __slots__ = ("pacer", "turns")

    def __init__(self, limit: int) -> None:
        self.turns = Turns(limit)
        self.pacer: Pacer[_Connection] = Pacer()


class UpstreamPool:
    """Keep-alive connections per (host, port), most recently used first, opened at the pace the upstream
    accepts them (``pacing``); idle ones close after a while.

    Timeouts: ``connect`` per connection attempt, ``first_byte`` from the request being sent to the answer's
    head, ``read`` for silence in the middle of a body (None: SSE and long polls stay open), ``queue`` for the
    wait for a turn and a connection."""

    def __init__(self, *, connect_timeout: float, first_byte_timeout: float | None, read_timeout: float | None,
                 queue_timeout: float, keepalive: float = 30.0, limit: int = LIMIT_PER_UPSTREAM) -> None:
        self._connect_timeout = connect_timeout
        self._first_byte_timeout = first_byte_timeout
        self._read_timeout = read_timeout
        self._queue_timeout = queue_timeout
        self._keepalive = keepalive
        self._limit = limit
        self._upstreams: dict[tuple[str, int], _Upstream] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    def queued(self) -> int:
        """Requests waiting in the gateway for a turn or a connection to their upstream."""
        return sum(up.turns.waiting + up.pacer.waiting for up in self._upstreams.values())

    async def request(self, host: str, port: int, method: str, target: str, headers: CIMultiDict[str],
                      body: StreamReader | None) -> tuple[Response, Exchange]:
        """Send the head (and start streaming the body), return the answer's head once it is in.

        Waits for a turn when ``limit`` requests to this upstream are in flight; the turn is given back by
        ``Exchange.close``. A request that has nothing the upstream answered and that can be sent again goes
        once more on a fresh connection when its connection broke off or stalled before the first byte (a kept-
        alive connection the upstream had closed is not counted: that race is normal)."""
        key = (host, port)
        upstream = self._upstreams.get(key) or self._upstreams.setdefault(key, _Upstream(self._limit))
        try:
            async with asyncio.timeout(self._queue_timeout):
                await upstream.turns.take()
        except TimeoutError as exc:
            raise self._queue_timed_out(key) from exc
        try:
            answer, exchange = await self._exchange(key, upstream.pacer, method, target, headers, body)
        except BaseException:
            upstream.turns.give()
            raise
        exchange.turn = upstream.turns
        return answer, exchange

    async def _exchange(self, key: tuple[str, int], pacer: Pacer[_Connection], method: str, target: str,
                        headers: CIMultiDict[str], body: StreamReader | None) -> tuple[Response, Exchange]:
        if body is None and "Content-Length" not in headers and method not in _BODYLESS_METHODS:
            headers["Content-Length"] = "0"
        chunked = body is not None and "Content-Length" not in headers
        if chunked:
            headers["Transfer-Encoding"] = "chunked"
        head = encode_head(f"{method} {target} HTTP/1.1", headers)
        replayable = body is None and method in REPLAYABLE_METHODS
        retried = fresh = False
        while True:
            try:
                conn, reused = await self._connection(key, pacer, fresh)
            except ConnectTimeout:
                if retried:  # nothing was sent: any method may try once more
                    raise
                retried = fresh = True
                continue
            conn.begin(head_only=method == "HEAD")
            assert conn.transport is not None
            conn.transport.write(head)
            conn.sending = body is not None
            sender = asyncio.ensure_future(_send_body(conn, body, chunked)) if body is not None else None
            exchange = Exchange(self, key, conn, sender)
            try:
                return await conn.read_head(), exchange
            except (BrokenOff, HeadTimeout) as exc:
                exchange.close()
                if not replayable or conn.received:
                    raise
                if not (reused and isinstance(exc, ClosedUnanswered)):  # the kept-alive race is free
                    if retried:
                        raise
                    retried = True
                fresh = True
            except BaseException:
                exchange.close()
                raise

    async def _connection(self, key: tuple[str, int], pacer: Pacer[_Connection],
                          fresh: bool) -> tuple[_Connection, bool]:
        """A kept-alive connection, else one given back while this request waited, else a new one once the
        upstream's window has room; whether it was used before."""
        try:
            async with asyncio.timeout(self._queue_timeout):
                conn = await pacer.connection(None if fresh else self._take(pacer), fresh)
        except TimeoutError as exc:
            raise self._queue_timed_out(key) from exc
        if conn is not None:
            return conn, True
        return await self._connect(key, pacer.attempt()), False

    def _queue_timed_out(self, key: tuple[str, int]) -> QueueTimeout:
        return QueueTimeout(f"no connection to {key[0]}:{key[1]} free within {self._queue_timeout:g} s")

    def _take(self, pacer: Pacer[_Connection]) -> _Connection | None:
        idle = pacer.idle
        deadline = time.monotonic() - self._keepalive
        while idle:
            conn = idle.pop()
            if conn.idle_since > deadline and conn.transport is not None and not conn.transport.is_closing():
                return conn
            conn.close()
        return None

    async def _connect(self, key: tuple[str, int], attempt: Attempt[_Connection]) -> _Connection:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop, self._first_byte_timeout, self._read_timeout), *key)
        except TimeoutError as exc:
            attempt.end(Outcome.LOST)
            raise ConnectTimeout(f"connect to {key[0]}:{key[1]} took over {self._connect_timeout:g} s") from exc
        except OSError as exc:
            attempt.end(Outcome.SETTLED)
            raise ConnectFailed(exc) from exc
        except BaseException:
            attempt.end(Outcome.SETTLED)
            raise
        if time.monotonic() - started >= _SYN_RETRY:
            attempt.end(Outcome.LOST)  # the first handshake was dropped: the accept queue is full
        else:
            conn.attempt = attempt
            attempt.settle_after(SETTLE_AFTER)
        return conn

    def release(self, key: tuple[str, int], conn: _Connection) -> None:
        conn.idle_since = time.monotonic()
        pacer = self._upstreams[key].pacer
        if pacer.offer(conn):
            return
        pacer.idle.append(conn)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self._keepalive, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        deadline = time.monotonic() - self._keepalive
        for upstream in self._upstreams.values():
            idle = upstream.pacer.idle
            kept = [conn for conn in idle if conn.idle_since > deadline and conn.transport is not None
                    and not conn.transport.is_closing()]
            for conn in idle:
                if conn not in kept:
                    conn.close()
            idle[:] = kept
        if any(upstream.pacer.idle for upstream in self._upstreams.values()):
            self._sweeper = asyncio.get_running_loop().call_later(self._keepalive, self._sweep)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for upstream in self._upstreams.values():
            for conn in upstream.pacer.idle:
                conn.close()
            upstream.pacer.idle.clear()


async def _send_body(conn: _Connection, body: StreamReader, chunked: bool) -> None:
    """Stream the client's body as it arrives, waiting for the upstream to take each piece (backpressure)."""
    transport = conn.transport
    assert transport is not None
    try:
        while chunk := await body.readany():
            if transport.is_closing():
                return
            if chunked:
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                transport.write(chunk)
            await conn.drained(transport)
        if chunked and not transport.is_closing():
            transport.write(b"0\r\n\r\n")
    except Exception as exc:
        conn._fail(BrokenOff(f"the client's body broke off: {type(exc).__name__}"))
        conn.close()
        raise
    finally:
        conn.sending = False
        conn._wake()  # a head awaited meanwhile starts its first-byte clock now

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
import ssl
import time
from collections.abc import Callable, Mapping
from typing import TypeVar, cast

import httptools
from aiohttp import StreamReader
from multidict import CIMultiDict

_BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "CONNECT", "DELETE"})
REPLAYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
LIMIT_PER_UPSTREAM = 512
"""Requests in flight to one upstream at a time; more wait their turn. A dev server is one process: ten thousand
requests released by a wake must not become ten thousand connections (nor exhaust the gateway's file limit)."""
_READ_LIMIT = 1 << 16
"""Body bytes buffered per connection before reading from the upstream pauses (the client is slower)."""
Key = tuple[str, int, bool]
"""An upstream: host, port, and whether it speaks TLS."""


def upstream_tls() -> ssl.SSLContext:
    """TLS to a dev server on the workspace's own loopback address: its certificate is self-signed (``vite
    --https``) and nothing else can answer on that address, so it is not verified."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


UPSTREAM_TLS = upstream_tls()
_P = TypeVar("_P", bound=asyncio.BaseProtocol)


async def open_upstream(factory: Callable[[], _P], host: str, port: int, tls: bool) -> _P:
    """Connect to an upstream port, over TLS when it is marked HTTPS."""
    loop = asyncio.get_running_loop()
    if tls:
        _, protocol = await loop.create_connection(factory, host, port, ssl=UPSTREAM_TLS, server_hostname="localhost")
    else:
        _, protocol = await loop.create_connection(factory, host, port)
    return protocol


class UpstreamError(Exception):
    """The exchange with the upstream failed; subclasses say how."""


class ConnectFailed(UpstreamError):
    """The connect itself failed (refused, unreachable): nothing was sent, so a retry is safe."""

    def __init__(self, os_error: OSError) -> None:
        super().__init__(str(os_error))
        self.os_error = os_error


class ConnectTimeout(UpstreamError):
    pass


class ReadTimeout(UpstreamError):
    pass


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

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float | None) -> None:
        self._loop = loop
        self._read_timeout = read_timeout
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
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(BrokenOff(f"invalid HTTP from the upstream: {exc}"))
            self.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.keep_alive = False
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

    def _timed_out(self) -> None:
        self._fail(ReadTimeout(f"no answer within {self._read_timeout:g} s"))

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        timer = self._loop.call_later(self._read_timeout, self._timed_out) if self._read_timeout else None
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


class Turns:
    """A fair limit on requests in flight, first come first served, with O(1) take and give (``asyncio.Semaphore``
    in Python 3.11 walks all its waiters on every acquire: a wake releasing ten thousand requests made that
    quadratic)."""

    __slots__ = ("_free", "_waiters")

    def __init__(self, limit: int) -> None:
        self._free = limit
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def take(self) -> None:
        if self._free and not self._waiters:
            self._free -= 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.give()  # handed a turn just as it was cancelled: pass it on
            raise

    def give(self) -> None:
        """A turn ends: straight to the first one still waiting, else back to the free ones."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


class Exchange:
    """One request on one connection; ``close`` puts the connection back when both messages were whole."""

    def __init__(self, pool: UpstreamPool, key: Key, conn: _Connection,
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


class UpstreamPool:
    """Idle keep-alive connections per (host, port), most recently used first; idle ones close after a while."""

    def __init__(self, *, connect_timeout: float, read_timeout: float | None, keepalive: float = 30.0,
                 limit: int = LIMIT_PER_UPSTREAM) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._keepalive = keepalive
        self._limit = limit
        self._turns: dict[Key, Turns] = {}
        self._idle: dict[Key, list[_Connection]] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    async def request(self, host: str, port: int, method: str, target: str, headers: CIMultiDict[str],
                      body: StreamReader | None, *, tls: bool = False) -> tuple[Response, Exchange]:
        """Send the head (and start streaming the body), return the answer's head once it is in.

        Waits for a turn when ``limit`` requests to this upstream are in flight; the turn is given back by
        ``Exchange.close``. A reused connection the upstream had closed is retried once on a new one when
        nothing was sent that cannot be sent again."""
        key = (host, port, tls)
        turn = self._turns.get(key) or self._turns.setdefault(key, Turns(self._limit))
        await turn.take()
        try:
            answer, exchange = await self._exchange(key, method, target, headers, body)
        except BaseException:
            turn.give()
            raise
        exchange.turn = turn
        return answer, exchange

    async def _exchange(self, key: Key, method: str, target: str, headers: CIMultiDict[str],
                        body: StreamReader | None) -> tuple[Response, Exchange]:
        if body is None and "Content-Length" not in headers and method not in _BODYLESS_METHODS:
            headers["Content-Length"] = "0"
        chunked = body is not None and "Content-Length" not in headers
        if chunked:
            headers["Transfer-Encoding"] = "chunked"
        head = encode_head(f"{method} {target} HTTP/1.1", headers)
        replayable = body is None and method in REPLAYABLE_METHODS
        while True:
            conn, reused = self._take(key)
            if conn is None:
                conn = await self._connect(*key)
            conn.begin(head_only=method == "HEAD")
            assert conn.transport is not None
            conn.transport.write(head)
            sender = asyncio.ensure_future(_send_body(conn, body, chunked)) if body is not None else None
            exchange = Exchange(self, key, conn, sender)
            try:
                return await conn.read_head(), exchange
            except BrokenOff:
                exchange.close()
                if reused and replayable and not conn.received:
                    continue
                raise
            except BaseException:
                exchange.close()
                raise

    def _take(self, key: Key) -> tuple[_Connection | None, bool]:
        idle = self._idle.get(key)
        deadline = time.monotonic() - self._keepalive
        while idle:
            conn = idle.pop()
            if conn.idle_since > deadline and conn.transport is not None and not conn.transport.is_closing():
                return conn, True
            conn.close()
        return None, False

    async def _connect(self, host: str, port: int, tls: bool) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                conn = await open_upstream(lambda: _Connection(loop, self._read_timeout), host, port, tls)
        except TimeoutError as exc:
            raise ConnectTimeout(f"connect to {host}:{port} took over {self._connect_timeout:g} s") from exc
        except OSError as exc:
            raise ConnectFailed(exc) from exc
        return conn

    def release(self, key: Key, conn: _Connection) -> None:
        conn.idle_since = time.monotonic()
        self._idle.setdefault(key, []).append(conn)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self._keepalive, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        deadline = time.monotonic() - self._keepalive
        for key, idle in list(self._idle.items()):
            kept = [conn for conn in idle if conn.idle_since > deadline and conn.transport is not None
                    and not conn.transport.is_closing()]
            for conn in idle:
                if conn not in kept:
                    conn.close()
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]
        if self._idle:
            self._sweeper = asyncio.get_running_loop().call_later(self._keepalive, self._sweep)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


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

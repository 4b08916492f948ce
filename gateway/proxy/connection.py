"""One kept-alive HTTP/1.1 connection to an upstream, as the pool uses it: the request head is written by the
pool, the answer is parsed by llhttp as it arrives and read by the proxy piece by piece (with backpressure).

Timers: the answer's head is awaited for the first-byte timeout once the request (and its body) is out (one
``HeadClock`` per pool), and so is each piece of the request's body the upstream holds up (``taken``); then each
piece of the answer's body for the read timeout. Its first byte back also proves the
connection to the pool's pacing.

What an upstream may do wrong ends the exchange with an ``UpstreamError`` whose ``fault`` names it, reported once
per exchange (``on_fault``): a reset, a close before the answer was whole, something that is not HTTP, a head
or a trailer section past ``MAX_HEAD`` (never buffered further), silence. Bytes after a whole answer (a second
answer nobody asked for, say) are never read as the answer to the next request: the connection is dropped instead
of reused.
"""

from __future__ import annotations

import asyncio
import collections
import re
import socket
import ssl
import struct
from collections.abc import Callable, Mapping
from typing import TypeVar, cast

import httptools
from multidict import CIMultiDict

from gateway.errors import UnsafeHeader
from gateway.proxy.pacing import Attempt, CoarseTimer, Outcome

_READ_LIMIT = 1 << 16
"""Body bytes buffered per connection before reading from the upstream pauses (the client is slower)."""
_BYTES_ACKED = struct.Struct("=Q")
"""``tcpi_bytes_acked`` of Linux's ``struct tcp_info``, at byte 120: what the peer has acknowledged so far."""
MAX_HEAD = 1 << 16
"""Bytes of an answer's head (interim answers' included) the gateway reads before refusing it (502); and, once the
head is in, of reads that carry no body (chunk sizes, trailers) since its last piece: trailers that never end
would otherwise be read for ever, with no clock running (the reader waits for body, which does not come)."""
_STREAM_TYPE = re.compile(r"\s*(?:text/event-stream|multipart/x-mixed-replace)\s*(?:;|$)", re.IGNORECASE)
"""Media types of answers that never end by themselves (``Connection.streams``)."""


class UpstreamError(Exception):
    """The exchange with the upstream failed; subclasses say how. ``fault``: what the upstream did, the label of
    ``codehub_upstream_errors_total`` (None: not the upstream's doing, or counted elsewhere)."""

    fault: str | None = None


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

    fault = "stalled"


class HeadTimeout(ReadTimeout):
    """The upstream took the request but sent no (whole) answer head within the first-byte timeout."""

    fault = "no-answer"


class BrokenOff(UpstreamError):
    """The connection ended, or the upstream sent something that is not HTTP, before the answer was whole."""

    fault: str | None = "closed"


class Reset(BrokenOff):
    fault = "reset"


class Garbage(BrokenOff):
    """Not HTTP, or more than the answer to the request (bytes after it, a second answer)."""

    fault = "garbage"


class HeadTooLarge(BrokenOff):
    fault = "head-too-large"


class Abandoned(BrokenOff):
    """The gateway closed the connection itself (the client left, or the connection cannot be reused)."""

    fault = None


class ClientBodyFailed(UpstreamError):
    """The client's body could not be read to its end (``error``): the exchange is abandoned, no fault of the
    upstream's."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"the client's body broke off: {type(error).__name__}")
        self.error = error


class ClosedUnanswered(BrokenOff):
    """The connection closed before a single byte of the answer: a dev server going from a throwaway listener to
    its real one can do that to a connection its old listener had queued."""


class ResetUnanswered(ClosedUnanswered):
    """Closed with a reset before a single byte of the answer (what a closing listener does to the connections
    still in its queue)."""

    fault = "reset"


class Response:
    """The head of an upstream answer; the body is read through ``read_exactly`` or ``read_chunk``."""

    __slots__ = ("_conn", "headers", "reason", "status")

    def __init__(self, conn: Connection, status: int, reason: str, headers: CIMultiDict[str]) -> None:
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

    async def drained(self, transport: asyncio.BaseTransport | None, within: float | None = None) -> bool:
        """Whether the buffer drained (or the transport is gone); False when it took nothing for ``within``
        seconds."""
        if self._write_paused and transport is not None and not transport.is_closing():
            self._drain = self._loop.create_future()
            try:
                async with asyncio.timeout(within):
                    await self._drain
            except TimeoutError:
                return False
        return True


class HeadClock(CoarseTimer["Connection"]):
    """The first-byte timeout of every connection of a pool (None: none)."""

    def start(self, conn: Connection) -> None:
        """The request (with its body) is out: its answer's head is due within ``seconds``."""
        if self.seconds is None or not conn.awaiting_head:
            return
        loop = conn._loop  # not asyncio.get_running_loop(): on Python 3.11 that is a getpid() system call
        self._watch(conn, loop.time() + self.seconds, loop)

    def _expire(self, key: Connection) -> None:
        if key.took_more():  # sending a body the app is still taking, slowly: its time starts again
            assert self.seconds is not None
            self._watch(key, key._loop.time() + self.seconds, key._loop)
            return
        key.fail(HeadTimeout(f"no answer, nor the request's body taken, within {self.seconds:g} s"))


class Connection(WriteFlow):
    """One upstream connection: llhttp callbacks fill the current answer, the proxy awaits its pieces."""

    def __init__(self, loop: asyncio.AbstractEventLoop, clock: HeadClock, read_timeout: float | None,
                 on_fault: Callable[[str], None]) -> None:
        self._loop = loop
        self.clock = clock
        self._read_timeout = read_timeout
        self._on_fault = on_fault
        self.attempt: Attempt[Connection] | None = None  # its place in the window until it answers
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[str, str]] = []
        self._reason = b""
        self._head: Response | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._done = False
        self._head_only = False
        self._head_bytes = 0
        self._answered = False  # a whole answer came on this connection before (so it is a kept-alive one)
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.keep_alive = True
        self.received = False
        self.idle_since = 0.0
        self._acked: int | None = None  # while ``taken`` waits: how much of the request the upstream acknowledged

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
        if self._done:  # the answer is whole and no request is out: nothing may come now
            self.fail(Garbage("bytes after the answer"))
            self.close()
            return
        had_head, buffered = self._head is not None, self._buffered
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(Garbage(f"invalid HTTP from the upstream: {exc}"))
            self.close()
            return
        # What carries no body counts against MAX_HEAD: the head while it comes, and after it every read without
        # a piece of body (chunk sizes, trailers). llhttp keeps no limit of its own on either.
        if self._head is None or (had_head and self._buffered == buffered and not self._done):
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self.fail(HeadTooLarge(f"an answer head or trailer section of over {MAX_HEAD} bytes"))
                self.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.keep_alive = False
        self.clock.forget(self)
        if self.attempt is not None:
            self.attempt.end(Outcome.SETTLED)
            self.attempt = None
        if not self._done and self._head is not None and self._reads_to_eof():
            self._done = True  # a body delimited by the connection's end
        if not self._done:
            reset = isinstance(exc, ConnectionError)
            if self.received:
                self.fail(Reset(f"the upstream reset the connection: {exc}") if reset
                          else BrokenOff("the upstream closed the connection"))
            else:
                self.fail(ResetUnanswered(f"the upstream reset the connection without answering: {exc}") if reset
                          else ClosedUnanswered("the upstream closed the connection without answering"))
        self.wake()
        self._release_drain()

    # --- llhttp callbacks ---------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._done:  # a second answer behind a whole one, in the same read: stop before any of it is taken
            error = Garbage("a second answer to one request")
            self.fail(error)
            raise error

    def on_status(self, status: bytes) -> None:
        self._reason += status  # a piece a read: llhttp hands over what it has, not the whole reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head is not None:
            return  # a trailer field: neither lane passes trailers on, so none is kept
        self._headers.append((name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status == 101:
            # Only a WebSocket upgrade asks to switch, and it has a handshake of its own (``wshandshake``): what
            # follows this 101 is no HTTP answer, and must not reach the client as one. (Raised here, before
            # llhttp pauses for the new protocol with an exception of its own, no HttpParserError.)
            error = Garbage("a 101 to a request that asked for no upgrade")
            self.fail(error)
            raise error
        if status < 100:
            # llhttp reads any three digits: "000" would go out as "HTTP/1.1 0", a status line no client reads.
            error = Garbage(f"status {status:03d}")
            self.fail(error)
            raise error
        if status < 200:
            return  # an interim answer (100 Continue, 103 Early Hints): the real one follows
        self.clock.forget(self)
        self._head_bytes = 0  # from here on it counts chunk framing and trailers
        reason = self._reason.decode("utf-8", "surrogateescape")
        reason = reason if reason.isprintable() else ""  # llhttp lets NUL through here
        self._head = Response(self, status, reason, CIMultiDict(self._headers))
        self.keep_alive = self._parser.should_keep_alive()
        if self._head_only:
            self._done = True
        self.wake()

    def on_body(self, body: bytes) -> None:
        if self._head is None:
            # A body on an interim answer (llhttp reads one for a 1xx other than 100, 102 and 103 that names a
            # length or chunks): it would be read out ahead of the real answer's, past the length the client is
            # told, and the bytes past that length would be the next answer on the client's connection, someone
            # else's behind a shared proxy. An interim answer has no content (RFC 9110 §15.2).
            error = Garbage("a body on an interim answer")
            self.fail(error)
            raise error
        self._head_bytes = 0
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _READ_LIMIT and self.transport is not None:
            self.transport.pause_reading()
        self.wake()

    def on_message_complete(self) -> None:
        if self._head is None:  # the end of an interim answer
            self._headers = []
            self._reason = b""
            return
        self._done = True
        self._answered = True
        self.keep_alive = self.keep_alive and self._parser.should_keep_alive()
        self.wake()

    # --- used by the pool ---------------------------------------------------------------------------------
    def _reads_to_eof(self) -> bool:
        assert self._head is not None
        headers = self._head.headers
        return "Content-Length" not in headers and "chunked" not in headers.get("Transfer-Encoding", "").lower()

    def fail(self, error: UpstreamError) -> None:
        """The exchange is over with ``error`` (the first one counts, and is reported as the upstream's fault
        unless it is a kept-alive connection the upstream had closed: a race that the pool retries for free, and
        reports itself when it does not); whoever reads next gets it."""
        if self._error is None:
            self._error = error
            if error.fault is not None and not (isinstance(error, ClosedUnanswered) and self._answered):
                self._on_fault(error.fault)
        self.wake()

    def wake(self) -> None:
        """Let the reader waiting on this connection look again (news, or a clock to start)."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _timed_out(self, seconds: float) -> None:
        self.fail(ReadTimeout(f"silent for {seconds:g} s in the middle of the answer"))

    async def _wait(self) -> None:
        """Until llhttp or the connection has news; each piece of body is awaited for ``read_timeout`` (the
        head is the ``clock``'s)."""
        self._waiter = self._loop.create_future()
        seconds = self._read_timeout if self._head is not None else None
        timer = self._loop.call_later(seconds, self._timed_out, seconds) if seconds else None
        try:
            await self._waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    @property
    def awaiting_head(self) -> bool:
        """A request is out and neither its answer's head nor an error came back yet (an upstream may answer
        before it has read the whole body)."""
        return self._head is None and self._error is None and not self._done

    def begin(self, head_only: bool) -> None:
        self._head_only = head_only
        self._headers = []
        self._reason = b""
        self._head = None
        self._head_bytes = 0
        self._done = False
        self.received = False

    async def taken(self) -> None:
        """Until the upstream has taken what was written of the request's body, within the first-byte timeout:
        an upstream that stops reading it holds the request as surely as one that never answers, and a body
        send nothing bounds would keep the client's connection (aiohttp stops reading it meanwhile, so it would
        not even see the client leave) and both sockets for good."""
        if not self._write_paused:
            return
        self._acked = _bytes_acked(self.transport)
        self.clock.start(self)
        try:
            await self.drained(self.transport)
        finally:
            self.clock.forget(self)
            self._acked = None

    def took_more(self) -> bool:
        """While ``taken`` waits: whether the upstream took more of the body since it began or last asked. Not
        whether the socket is writable again: that comes only once a third of the kernel's send buffer
        (megabytes) is free, seconds apart for an app that reads an upload slowly but steadily."""
        if self._acked is None:
            return False
        acked = _bytes_acked(self.transport)
        more, self._acked = acked > self._acked, acked
        return more

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

    def streams(self) -> bool:
        """The answer whose head is in is a stream by its type: an event stream (SSE), or a multipart stream that
        replaces its parts (a camera's MJPEG). Such an answer never ends by itself; a page sent in chunks, however
        slowly, does, and is no stream."""
        assert self._head is not None
        headers = self._head.headers
        return (not self._done and "Content-Length" not in headers
                and _STREAM_TYPE.match(headers.get("Content-Type", "")) is not None)

    @property
    def reusable(self) -> bool:
        """Whether the next request may go on this connection. Not after an answer to a HEAD: llhttp cannot be told
        that it has no body, and an app that writes one anyway (serving HEAD as GET) may write it after the
        connection went to the next request, whose answer it would then be, someone else's perhaps; idle, such
        bytes are caught (``data_received``), in flight they are not."""
        return (self.keep_alive and self._done and not self._chunks and self._error is None and not self._head_only
                and self.transport is not None and not self.transport.is_closing())

    def close(self) -> None:
        """Aborted, not closed: a close first sends what is still buffered, and a request's body an upstream
        stopped reading would keep the socket open for ever. (A connection is closed spent or idle: nothing
        buffered is worth sending.)"""
        self.fail(Abandoned("closed by the gateway"))  # whatever ends the connection now is not the upstream's doing
        if self.transport is not None:
            self.transport.abort()


Key = tuple[str, int, bool]
"""An upstream: host, port, and whether it speaks TLS."""


def tcp_info(transport: asyncio.BaseTransport) -> bytes:
    """The start of Linux's ``struct tcp_info`` for an upstream connection's socket (OSError once it is closed)."""
    return bytes(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 128))


def _bytes_acked(transport: asyncio.BaseTransport | None) -> int:
    if transport is None:
        return 0
    try:
        return int(_BYTES_ACKED.unpack_from(tcp_info(transport), 120)[0])
    except OSError:  # closed meanwhile
        return 0


_P = TypeVar("_P", bound=asyncio.BaseProtocol)


def upstream_tls() -> ssl.SSLContext:
    """TLS to a dev server on the workspace's own loopback address: its certificate is self-signed (``vite
    --https``) and nothing else can answer on that address, so it is not verified."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


UPSTREAM_TLS = upstream_tls()


async def open_upstream(factory: Callable[[], _P], host: str, port: int, tls: bool) -> _P:
    """Connect to an upstream port, over TLS when it is marked HTTPS."""
    loop = asyncio.get_running_loop()
    if tls:
        _, protocol = await loop.create_connection(factory, host, port, ssl=UPSTREAM_TLS, server_hostname="localhost")
    else:
        _, protocol = await loop.create_connection(factory, host, port)
    return protocol


def encode_head(start_line: str, headers: Mapping[str, str] | CIMultiDict[str]) -> bytes:
    """A request or response head on the wire (both directions of the proxy write theirs with this).

    Refuses (``UnsafeHeader``) a CR, LF or NUL anywhere but the line ends it writes itself, whatever put it there:
    counted on the joined text, which costs no Python code per header."""
    fields = "\r\n".join(map(": ".join, headers.items()))  # no Python code per header: half the time of a loop
    head = f"{start_line}\r\n{fields}\r\n\r\n" if fields else f"{start_line}\r\n\r\n"
    lines = len(headers) + 2 if fields else 2
    if head.count("\n") != lines or head.count("\r") != lines or "\x00" in head:
        raise UnsafeHeader
    try:
        return head.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no bytes were decoded to (from JSON claims, say)
        raise UnsafeHeader from None

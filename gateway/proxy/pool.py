"""A lean HTTP/1.1 client for proxying: keep-alive connections per upstream, responses parsed by llhttp.

Why not aiohttp's ``ClientSession``: per request it builds request and response objects, URL objects, timers,
trace hooks and a cookie-jar pass, and in profiles that was the largest single cost of a proxied request. A
proxy needs far less: send a head and a streamed body, read a head and a streamed body, and reuse the
connection when both ends allow it. (``ClientSession`` still serves the OIDC calls.)
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable
from typing import Protocol

from multidict import CIMultiDict

from gateway.errors import RequestTimeout
from gateway.proxy.connection import (
    BrokenOff,
    ClientBodyFailed,
    ClosedUnanswered,
    ConnectFailed,
    Connection,
    ConnectTimeout,
    HeadClock,
    HeadTimeout,
    Key,
    QueueTimeout,
    ReadTimeout,
    Response,
    UpstreamError,
    WriteFlow,
    encode_head,
    open_upstream,
    tcp_info,
)
from gateway.proxy.pacing import INITIAL_WINDOW, MOST_WINDOW, SETTLE_AFTER, Attempt, Deadlines, Grant, Outcome, Pacer

__all__ = [  # the connection's names too: both lanes take what they need of the upstream side from here
    "REPLAYABLE_METHODS", "Body", "BrokenOff", "ClientBodyFailed", "ClosedUnanswered", "ConnectFailed",
    "ConnectTimeout", "Exchange",
    "HeadTimeout", "QueueTimeout", "ReadTimeout", "Response", "UpstreamError", "UpstreamPool", "WriteFlow",
    "encode_head",
]

_BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "CONNECT", "DELETE"})
"""Methods whose requests have no content (RFC 9110 §9.3): many servers read none for them, whatever the head says
(Python's ``http.server`` among them), and read a body sent anyway as the next request on the connection."""
REPLAYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
LIMIT_PER_UPSTREAM = 256
"""Requests in flight to one upstream at a time; more wait in line. A dev server is one process: ten thousand
requests released by a wake must not become ten thousand connections (nor exhaust the gateway's file limit).
And the line is first come, first served where the upstream's own queue is not: at 1,000 client connections, 256
in flight rather than 512 took the slowest answers' time (p99) from 153 to 94 ms, at the same throughput
(``bench.ab``, 6 alternated rounds); at 128 the line's own cost showed at 256 connections (7 % fewer req/s)."""
MOST_QUIET_UPSTREAMS = 1024
"""Upstreams a pool keeps knowing (their line and their window of connects, ~2 KB each) with nothing in flight, kept
alive or waiting: past that, those are forgotten (what they learnt of the window with them). An owner may reach
every port of their own workspace, and a request to each of its 65,535 port numbers (nothing need listen) kept
128 MB of the worker's for good; on Kubernetes again at each wake, on the pod's new address."""
_WAIT = Grant.WAIT  # asked on every request: a global, not an enum's class attribute (a tenth of a microsecond)
_TOTAL_RETRANS = struct.Struct("=I")
"""``tcpi_total_retrans`` of Linux's ``struct tcp_info``, at byte 100: segments this socket sent again, the
SYN included."""


class Body(Protocol):
    """A request's body as it arrives from the client: aiohttp's ``StreamReader``, or one that asks the client for
    it first (``server.expect``)."""

    async def readany(self) -> bytes: ...


class Exchange:
    """One request on one connection; ``close`` puts the connection back when both messages were whole, and ends
    the request's place in flight (``Pacer``) once the caller has it."""

    __slots__ = ("_conn", "_key", "_last", "_pool", "place", "sender", "streaming")  # one per request: no dict

    def __init__(self, pool: UpstreamPool, key: Key, conn: Connection, *, last: bool = False) -> None:
        self._pool = pool
        self._key = key
        self._conn = conn
        self._last = last
        """The connection is not used again: its request had a body its method has none for (``_BODYLESS_METHODS``),
        which the app may not have read: it would read it as the next request, someone else's perhaps: its
        head, cookies and all, taken for that body's rest."""
        self.sender: asyncio.Task[None] | None = None
        """Streams the request's body, if it has one."""
        self.place = False
        """Whether closing ends the request's place: not while the pool may still retry the request."""
        self.streaming = False
        """Whether the answer streams: the place was given back, closing gives the connection back too."""

    def stream(self) -> None:
        """The answer is a stream: the request no longer counts against the limit (``Pacer.stream``)."""
        self.place, self.streaming = False, True
        self._pool.stream(self._key)

    def close(self) -> None:
        sender = self.sender
        sent = True
        if sender is not None:
            if not sender.done():
                sender.cancel()  # the upstream answered before taking the whole body: the connection is spent
                sent = False
            else:
                sent = not sender.cancelled() and sender.exception() is None
        place, streaming = self.place, self.streaming
        if (place or streaming) and sent and self._conn.reusable and not self._last:
            self._pool.release(self._key, self._conn, place=place)  # and the place with it, if it still has one
            return
        self._conn.close()  # an exchange the pool retries has failed: its connection is spent too
        if place:
            self._pool.leave(self._key)
        elif streaming:
            self._pool.end_stream(self._key)


class UpstreamPool:
    """Keep-alive connections per (host, port), most recently used first, opened at the pace the upstream
    accepts them (``pacing``); idle ones close after a while. ``on_fault`` hears what each failed exchange's
    upstream did wrong (``UpstreamError.fault``).

    Timeouts: ``connect`` per connection attempt, ``first_byte`` from the request being sent to the answer's
    head, ``read`` for silence in the middle of a body (None: SSE and long polls stay open), ``queue`` for the
    wait for a turn and a connection, ``body_timeout`` for silence in the middle of a client's request body
    (None: none).

    ``workers``: the pools (one per worker process) that open connections to the same upstreams. Each paces its
    share of the window, so together they keep to one window: two workers with a window each overflowed a backlog
    of 5 (a dropped handshake, and the last of 1,000 held requests answered after the kernel's 1 s retry)."""

    def __init__(self, *, connect_timeout: float, first_byte_timeout: float | None, read_timeout: float | None,
                 queue_timeout: float, keepalive: float = 30.0, limit: int = LIMIT_PER_UPSTREAM, workers: int = 1,
                 on_fault: Callable[[str], None] = lambda fault: None, body_timeout: float | None = None) -> None:
        self._on_fault = on_fault
        self._body_timeout = body_timeout
        self._window = max(1, INITIAL_WINDOW // workers), max(1, MOST_WINDOW // workers)
        self._connect_timeout = connect_timeout
        self._clock = HeadClock(first_byte_timeout)
        self._read_timeout = read_timeout
        self._deadlines = Deadlines(queue_timeout)
        self._keepalive = keepalive
        self._limit = limit
        self._upstreams: dict[Key, Pacer[Connection]] = {}
        self._forget_past = MOST_QUIET_UPSTREAMS  # upstreams known, when the quiet ones are forgotten
        self._sweeper: asyncio.TimerHandle | None = None

    def queued(self) -> int:
        """Requests waiting in the gateway for a connection to their upstream."""
        return sum(pacer.waiting for pacer in self._upstreams.values())

    def connections(self) -> tuple[int, int]:
        """(idle, busy): kept-alive connections waiting for a request, and requests holding a connection (or
        opening one)."""
        idle = sum(len(pacer.idle) for pacer in self._upstreams.values())
        return idle, sum(pacer.taken + pacer.streaming for pacer in self._upstreams.values())

    async def request(self, host: str, port: int, method: str, target: str, headers: CIMultiDict[str],
                      body: Body | None, *, tls: bool = False) -> tuple[Response, Exchange]:
        """Send the head (and start streaming the body), return the answer's head once it is in.

        Waits in line when ``limit`` requests to this upstream are in flight or no connection is free; the place
        is given back by ``Exchange.close``. A request that has nothing the upstream answered and that can be
        sent again goes once more on a fresh connection when its connection broke off or stalled before the
        first byte (a kept-alive connection the upstream had closed is not counted: that race is normal)."""
        if body is None and "Content-Length" not in headers and method not in _BODYLESS_METHODS:
            headers["Content-Length"] = "0"
        chunked = body is not None and "Content-Length" not in headers
        if chunked:
            headers["Transfer-Encoding"] = "chunked"
        head = encode_head(f"{method} {target} HTTP/1.1", headers)  # may refuse: before a place is taken
        key = (host, port, tls)
        pacer = self._upstreams.get(key) or self._know(key)
        grant = pacer.try_take()
        if grant is _WAIT:
            try:
                grant = await pacer.take()
            except TimeoutError as exc:
                raise self._queue_timed_out(key) from exc
        try:
            return await self._exchange(key, pacer, grant, head, method, body, chunked)
        except BaseException:
            pacer.leave()
            raise

    async def _exchange(self, key: Key, pacer: Pacer[Connection], grant: Connection | Grant, head: bytes,
                        method: str, body: Body | None, chunked: bool) -> tuple[Response, Exchange]:
        replayable = body is None and method in REPLAYABLE_METHODS
        last = body is not None and method in _BODYLESS_METHODS
        retried = False
        while True:
            if isinstance(grant, Grant):  # a place in the window: open a connection
                try:
                    conn = await self._connect(key, pacer.attempt())
                except ConnectTimeout:
                    if retried:  # nothing was sent: any method may try once more
                        raise
                    retried = True
                    grant = await self._fresh(key, pacer)
                    continue
                reused = False
            else:
                conn, reused = grant, True
            exchange = Exchange(self, key, conn, last=last)  # from here on it is closed unless it goes back
            try:
                conn.begin(head_only=method == "HEAD")
                assert conn.transport is not None
                conn.transport.write(head)
                if body is None:
                    self._clock.start(conn)
                else:
                    exchange.sender = asyncio.ensure_future(_send_body(conn, body, chunked, self._body_timeout))
                answer = await conn.read_head()
            except (BrokenOff, HeadTimeout) as exc:
                exchange.close()
                race = reused and isinstance(exc, ClosedUnanswered)  # the upstream had closed a kept-alive one
                if not replayable or conn.received:
                    if race:  # not sent again, so the race cost this request: the upstream's fault after all
                        self._on_fault(exc.fault or "closed")
                    raise
                if not race:  # the race is free
                    if retried:
                        raise
                    retried = True
                grant = await self._fresh(key, pacer)
                continue
            except BaseException:
                exchange.close()
                raise
            exchange.place = True
            if conn.streams():
                exchange.stream()
            return answer, exchange

    def _know(self, key: Key) -> Pacer[Connection]:
        """A new upstream's pacer. Past ``MOST_QUIET_UPSTREAMS`` known, the quiet ones are forgotten first, and
        next when twice as many as stay are known (so forgetting costs a request nothing on average)."""
        if len(self._upstreams) >= self._forget_past:
            self._upstreams = {known: pacer for known, pacer in self._upstreams.items() if not pacer.quiet}
            self._forget_past = max(MOST_QUIET_UPSTREAMS, 2 * len(self._upstreams))
        pacer = self._upstreams[key] = Pacer(self._limit, initial=self._window[0], most=self._window[1],
                                             deadlines=self._deadlines, fit=self._fit)
        return pacer

    async def _fresh(self, key: Key, pacer: Pacer[Connection]) -> Grant:
        """A place in the window for a retry, which holds its place in flight already; its wait has an allowance
        of its own."""
        if not pacer.try_open():
            try:
                await pacer.open_fresh()
            except TimeoutError as exc:
                raise self._queue_timed_out(key) from exc
        return Grant.OPEN

    def _queue_timed_out(self, key: Key) -> QueueTimeout:
        return QueueTimeout(f"no connection to {key[0]}:{key[1]} free within {self._deadlines.seconds:g} s")

    def _fit(self, conn: Connection) -> bool:
        """Whether a kept-alive connection may take a request: still open, and idle for less than ``keepalive``
        (else it is closed)."""
        if (conn.idle_since > time.monotonic() - self._keepalive and conn.transport is not None
                and not conn.transport.is_closing()):
            return True
        conn.close()
        return False

    async def _connect(self, key: Key, attempt: Attempt[Connection]) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                conn = await open_upstream(lambda: Connection(loop, self._clock, self._read_timeout, self._on_fault),
                                           *key)
        except TimeoutError as exc:
            attempt.end(Outcome.LOST)
            raise ConnectTimeout(f"connect to {key[0]}:{key[1]} took over {self._connect_timeout:g} s") from exc
        except OSError as exc:
            attempt.end(Outcome.SETTLED)
            raise ConnectFailed(exc) from exc
        except BaseException:
            attempt.end(Outcome.SETTLED)
            raise
        if _handshake_resent(conn):
            attempt.end(Outcome.LOST)  # the first handshake was dropped: the accept queue is full
        else:
            conn.attempt = attempt
            attempt.settle_after(SETTLE_AFTER)
        return conn

    def release(self, key: Key, conn: Connection, *, place: bool = True) -> None:
        """A request's connection may be used again: to the next request in line, else idle. ``place``: the
        request still held its place (its answer did not stream)."""
        conn.idle_since = time.monotonic()
        pacer = self._upstreams[key]
        given = pacer.give(conn) if place else pacer.restore(conn)
        if not given and self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self._keepalive, self._sweep)

    def leave(self, key: Key) -> None:
        """A request ends without a connection to give back."""
        self._upstreams[key].leave()

    def stream(self, key: Key) -> None:
        """A request's answer is a stream: its place goes to the line (``Pacer.stream``)."""
        self._upstreams[key].stream()

    def end_stream(self, key: Key) -> None:
        """A streamed answer ends without a connection to give back."""
        self._upstreams[key].end_stream()

    def _sweep(self) -> None:
        self._sweeper = None
        for pacer in self._upstreams.values():
            pacer.idle[:] = [conn for conn in pacer.idle if self._fit(conn)]  # ``_fit`` closes the others
        if any(pacer.idle for pacer in self._upstreams.values()):
            self._sweeper = asyncio.get_running_loop().call_later(self._keepalive, self._sweep)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._clock.close()
        self._deadlines.close()
        for pacer in self._upstreams.values():
            for conn in pacer.idle:
                conn.close()
            pacer.idle.clear()


def _handshake_resent(conn: Connection) -> bool:
    """Whether the kernel had to send this connection's SYN again: the listener's accept queue was full and
    dropped the first. Asked of the socket, not told by how long the connect took: a gateway whose event loop is
    busy (a wake just released thousands of held requests) sees even an instant connect complete seconds late."""
    assert conn.transport is not None
    return bool(_TOTAL_RETRANS.unpack_from(tcp_info(conn.transport), 100)[0])


async def _send_body(conn: Connection, body: Body, chunked: bool, idle: float | None) -> None:
    """Stream the client's body as it arrives, waiting for the upstream to take each piece (backpressure), for
    the first-byte timeout at most (``Connection.taken``). A slow client is not timed here, a silent one is: each
    piece is awaited for ``idle`` seconds at most (408), as a request in flight holds a place among its upstream's
    (``LIMIT_PER_UPSTREAM``) and uploads that never go on would otherwise keep every other request waiting."""
    transport = conn.transport
    assert transport is not None
    try:
        while chunk := await _next_piece(body, idle):
            if transport.is_closing():
                return
            if chunked:
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                transport.write(chunk)
            await conn.taken()
        if chunked and not transport.is_closing():
            transport.write(b"0\r\n\r\n")
    except Exception as exc:
        conn.fail(ClientBodyFailed(exc))
        conn.close()
        raise
    conn.clock.start(conn)  # the whole request is out: the first-byte clock starts now


async def _next_piece(body: Body, idle: float | None) -> bytes:
    try:
        async with asyncio.timeout(idle):
            return await body.readany()
    except TimeoutError:
        raise RequestTimeout(f"The request's body stopped arriving for {idle:g} s.", code="body-timeout") from None

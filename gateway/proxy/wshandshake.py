"""The two WebSocket handshakes (RFC 6455 §4): checking the client's offer, and asking the upstream ourselves.

The gateway answers the client only after the upstream said yes, so a refusal still gets a proper HTTP error
page, and what the client is told (the subprotocol) is what the upstream chose. Neither hop negotiates an
extension: without permessage-deflate, frames mean the same on both hops and can be relayed as they are.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from typing import cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.errors import BadGateway, BadRequest
from gateway.proxy.connection import (
    MAX_HEAD,
    BrokenOff,
    ConnectTimeout,
    Garbage,
    HeadTimeout,
    HeadTooLarge,
    Reset,
    encode_head,
    open_upstream,
)
from gateway.proxy.upstream import Upstream

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_VERSIONS = ("13", "8", "7")
Headers = CIMultiDict[str] | CIMultiDictProxy[str]


def accept_value(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


def _tokens(headers: Headers, name: str) -> list[str]:
    return [token.strip() for value in headers.getall(name, ()) for token in value.split(",") if token.strip()]


@dataclass(frozen=True, slots=True)
class Offer:
    """What the client asked for: its key (for the accept value) and the subprotocols it speaks."""

    key: str
    protocols: tuple[str, ...]


def client_offer(headers: Headers) -> Offer:
    """The client's upgrade request, checked before anything is asked of the upstream."""
    if headers.get("Upgrade", "").strip().lower() != "websocket":
        raise BadRequest("This address only upgrades to WebSocket.", code="websocket-handshake")
    if "upgrade" not in (token.lower() for token in _tokens(headers, "Connection")):
        raise BadRequest("A WebSocket upgrade needs 'Connection: Upgrade'.", code="websocket-handshake")
    if headers.get("Sec-WebSocket-Version", "") not in _VERSIONS:
        raise BadRequest("Unsupported WebSocket version; 13 is spoken here.", code="websocket-handshake",
                         headers={"Sec-WebSocket-Version": "13"})
    if headers.get("Content-Length", "0").lstrip("0") or "Transfer-Encoding" in headers:
        # forwarded with its length and no body, a strict upstream waited for the body until the gateway gave up
        raise BadRequest("A WebSocket handshake has no body.", code="websocket-handshake")
    key = headers.get("Sec-WebSocket-Key", "")
    try:
        valid = len(base64.b64decode(key, validate=True)) == 16
    except binascii.Error:
        valid = False
    if not valid:
        raise BadRequest("The WebSocket key is not 16 bytes in base64.", code="websocket-handshake")
    return Offer(key, tuple(_tokens(headers, "Sec-WebSocket-Protocol")))


def upgrade_request(path: str, headers: CIMultiDict[str], key: str, protocols: tuple[str, ...]) -> bytes:
    """The head sent upstream: the caller's cleaned headers plus our own handshake (never an extension).

    Written to a copy: iterating a multidict's keys caches a string per entry on it, and the caller's
    ``headers`` live as long as the WebSocket does."""
    sent = CIMultiDict(headers)
    sent.extend((("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", key),
                 ("Sec-WebSocket-Version", "13")))
    if protocols:
        sent["Sec-WebSocket-Protocol"] = ", ".join(protocols)
    return encode_head(f"GET {path} HTTP/1.1", sent)


def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


@dataclass(frozen=True, slots=True)
class Answer:
    """The head of the upstream's answer, and the bytes that came right after it (frames already sent)."""

    status: int
    headers: CIMultiDict[str]
    tail: bytes


def chosen_protocol(answer: Answer, key: str, offered: tuple[str, ...], upstream: Upstream) -> str | None:
    """The subprotocol the upstream picked, once its answer is a valid acceptance; else a 502."""
    headers = answer.headers
    valid = (
        answer.status == 101
        and headers.get("Upgrade", "").strip().lower() == "websocket"
        and "upgrade" in (token.lower() for token in _tokens(headers, "Connection"))
        and headers.get("Sec-WebSocket-Accept", "").strip() == accept_value(key)
        and "Sec-WebSocket-Extensions" not in headers
    )
    if not valid:
        raise BadGateway(
            f"Port {upstream.port} in workspace {upstream.workspace} refused the WebSocket ({answer.status}).",
            code="websocket-refused",
        )
    protocol = headers.get("Sec-WebSocket-Protocol", "").strip()
    return protocol if protocol in offered else None


class _Reader(asyncio.Protocol):
    """Reads the upstream's answer head with llhttp; once it is in, reading pauses until the relay takes over."""

    __slots__ = ("_headers", "_parser", "_read", "_status", "answer", "transport")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.transport: asyncio.Transport | None = None
        self.answer: asyncio.Future[Answer] = loop.create_future()
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[str, str]] = []
        self._status = 0
        self._read = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's; both loops set TCP_NODELAY on TCP transports already.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.answer.done():
            return
        self._read += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._answer(data[upgrade.args[0]:])
        except httptools.HttpParserError as exc:
            if not self._status:
                self.answer.set_exception(Garbage(f"invalid HTTP from the upstream: {exc}"))
        if self._status:
            self._answer(b"")  # a refusal (its body does not matter), or a 101 that is no upgrade
        elif not self.answer.done() and self._read > MAX_HEAD:  # an upstream may not grow the gateway's memory
            self.answer.set_exception(HeadTooLarge(f"an answer head of over {MAX_HEAD} bytes"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(Reset(f"the upstream reset the connection: {exc}")
                                      if isinstance(exc, ConnectionError)
                                      else BrokenOff("the upstream closed the connection"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 100:  # llhttp reads "000" as 0, which is no answer here: the upgrade would wait for one
            raise Garbage(f"status {status:03d}")  # llhttp raises it again as a parser error
        if 100 <= status < 200 and status != 101:
            self._headers = []  # an interim answer: the real one follows
            return
        self._status = status

    def _answer(self, tail: bytes) -> None:
        if self.answer.done():
            return
        assert self.transport is not None
        self.transport.pause_reading()
        self.answer.set_result(Answer(self._status, CIMultiDict(self._headers), tail))


async def ask_upstream(host: str, port: int, request: bytes, *, connect_timeout: float,
                       read_timeout: float | None, tls: bool = False) -> tuple[asyncio.Transport, Answer]:
    """Connect and send the upgrade request; the transport comes back with reading paused.

    A failed connect raises its ``OSError`` (nothing was sent: the caller may retry), one that takes too long
    ``ConnectTimeout``; an answer that does not come in time raises ``HeadTimeout``, and one that breaks off or
    is not HTTP a ``BrokenOff`` naming the fault, as the pool's exchanges do."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_timeout):
            reader = await open_upstream(lambda: _Reader(loop), host, port, tls)
    except TimeoutError as exc:
        raise ConnectTimeout(f"no connection within {connect_timeout} s") from exc
    assert reader.transport is not None
    transport = reader.transport
    try:
        transport.write(request)
        try:
            async with asyncio.timeout(read_timeout):
                return transport, await reader.answer
        except TimeoutError as exc:
            raise HeadTimeout("no answer to the upgrade in time") from exc
    except BaseException:
        transport.abort()
        raise

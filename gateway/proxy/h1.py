"""The fast lane's client connection as a sans-IO state machine: bytes in, events out, no sockets.

Like h11's ``Connection`` (without its generality): ``receive`` takes whatever the socket read and says what
happened. Only the plain case comes out as a ``Request`` — a complete HTTP/1.1 GET or HEAD without a body or an
``Expect``, with a head of sane size — or such a GET asking to switch protocols (``upgrade``: a WebSocket), whose
server either ``switch``es (the bytes past the head are the new protocol's) or hands it over. Everything else,
malformed or merely unusual, is a ``HandOver`` of every byte read so far: aiohttp's server reads it from the
start and answers it (or refuses it) as it would have without this lane — except that a plain request before a
malformed one in the same read is served first, the rest kept behind it (answers go out in turn). While a
request is being served, what arrives is kept (a pipelined next request); once the answer is out, ``done`` hands
those bytes over too, so pipelining is aiohttp's.

The head is read by aiohttp's own parser (llhttp, with aiohttp's checks: one Host, no NUL, no duplicate
``Content-Length``…), the one its lane reads a handed-over request with: both lanes agree on what a request is, and
the fields are collected in C (a Python call per field cost more than judging them did).

Nothing here raises on input: for any bytes the answer is ``NEED_DATA``, a ``Request`` or a ``HandOver``
(``tests/proxy/test_h1.py`` checks this with tables and with hypothesis).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from aiohttp.http import HttpProcessingError, HttpRequestParser, HttpVersion11
from multidict import CIMultiDictProxy

MAX_HEAD = 16 << 10
"""A request head longer than this goes to aiohttp, whose limits (``limits.header_size`` and so on) decide."""
MAX_LINE = 8190
MAX_FIELD = 8190
MAX_HEADERS = 100
_FAST_METHODS = frozenset({"GET", "HEAD"})
_HEAD_END = b"\r\n\r\n"
_CR_LF = frozenset(b"\r\n")


class _NeedData(enum.Enum):
    NEED_DATA = "need-data"


class _Close(enum.Enum):
    CLOSE = "close"


NEED_DATA: Final = _NeedData.NEED_DATA
"""Nothing to do until more bytes arrive (or, while serving, until ``done``)."""
CLOSE: Final = _Close.CLOSE
"""The connection is finished: close it."""


@dataclass(slots=True)
class Request:
    """A whole plain request, ready to be served."""

    method: str
    target: str
    headers: CIMultiDictProxy[str]
    """As sent, in order, duplicates kept (the plan judges them)."""
    keep_alive: bool
    upgrade: bool = False
    """It asks to switch protocols (``Connection: upgrade``): ``switch`` once the upstream agreed, else hand it
    over; never ``done`` as a plain answer."""


@dataclass(frozen=True, slots=True)
class HandOver:
    """aiohttp serves the connection from here, starting with ``data`` (every byte not yet answered)."""

    data: bytes


Event = _NeedData | Request | HandOver | _Close


class State(enum.Enum):
    READING = "reading"
    SERVING = "serving"
    HANDED = "handed"
    CLOSED = "closed"


_READING, _SERVING, _HANDED, _CLOSED = State.READING, State.SERVING, State.HANDED, State.CLOSED
"""Read as globals on every request: Python 3.11 looks enum members up through a slow ``__getattr__`` hook."""


class Connection:
    """One client connection, until it is handed over or closed."""

    def __init__(self, *, max_head: int = MAX_HEAD, max_line: int = MAX_LINE, max_field: int = MAX_FIELD,
                 max_headers: int = MAX_HEADERS):
        """Past ``max_line`` (the target), ``max_field`` (a header) or ``max_headers``, a head is handed over for
        aiohttp to refuse (with the same limits)."""
        self.max_head = max_head
        self.state = _READING
        self._limits = (max_line, max_field, max_headers)
        self._parser = self._new_parser()
        self._raw = bytearray()
        self._parked = bytearray()
        self._head_end = 0  # an upgrade's: where the new protocol's bytes start in ``_raw``

    @property
    def reading_head(self) -> bool:
        """Some of a request head is in, not all of it (its deadline is the caller's to keep)."""
        return self.state is _READING and bool(self._raw)

    @property
    def parked(self) -> int:
        """Bytes kept while a request is served (the caller stops reading past a limit of its own)."""
        return len(self._parked)

    def receive(self, data: bytes) -> Event:
        if self.state is _SERVING:
            self._parked += data
            return NEED_DATA
        if self.state is not _READING:
            return CLOSE
        raw = self._raw
        raw += data
        try:
            messages, _, _ = self._parser.feed_data(data)
        except HttpProcessingError:  # aiohttp's lane reads it again, and refuses it in its own words
            return self._first_of_a_faulty_read()
        if not messages:
            return self.hand_over() if len(raw) > self.max_head else NEED_DATA
        message = messages[0][0] if len(messages) == 1 else None
        end = raw.find(_HEAD_END, _blank_lines(raw)) + 4
        if (message is None or len(raw) > self.max_head
                or message.method not in _FAST_METHODS or message.version != HttpVersion11
                or (message.upgrade and message.method != "GET")
                or (end != len(raw) and not message.upgrade)  # a second request behind it, or a body
                or _promises_a_body(message.headers)):
            return self.hand_over()
        self.state = _SERVING
        self._head_end = end if message.upgrade else 0
        return Request(message.method, message.path, message.headers, not message.should_close,
                       upgrade=message.upgrade)

    def _first_of_a_faulty_read(self) -> Event:
        """The parser failed somewhere in what was read: if a whole head came before the fault, it is read again
        alone, by a new parser, as if it had come by itself, and what follows it waits behind it (for aiohttp, once
        the answer is out, or with the head if it is not this lane's). Answers go out in the order of their
        requests (RFC 9112 §9.3.2): behind a proxy that sends visitors' requests one after the other on a shared
        connection, one visitor's garbage must not be answered in place of another's request, and the parser keeps
        the requests it read before a fault to itself."""
        raw = self._raw
        end = raw.find(_HEAD_END, _blank_lines(raw)) + 4
        if end == 3 or end == len(raw):  # no whole head before the fault, or the fault is in it
            return self.hand_over()
        head = bytes(raw[:end])
        self._parked += raw[end:]
        raw.clear()
        self._parser = self._new_parser()
        event = self.receive(head)  # NEED_DATA: the parser reads on past that head (HTTP/2's preface)
        return self.hand_over() if event is NEED_DATA else event

    def _new_parser(self) -> HttpRequestParser:
        max_line, max_field, max_headers = self._limits
        # No body is ever read here (a request with one is handed over), so the parser is given none to fill.
        return HttpRequestParser(None, None, MAX_HEAD, max_line_size=max_line, max_field_size=max_field,
                                 max_headers=max_headers, response_with_body=False, auto_decompress=False)

    def done(self, keep_alive: bool) -> Event:
        """The answer to the request being served is out."""
        assert self.state is _SERVING, self.state
        if not keep_alive or self._head_end:
            self.state = _CLOSED
            return CLOSE
        self.state = _READING
        self._raw.clear()
        if self._parked:  # pipelined: aiohttp serves the rest of this connection
            return self.hand_over()
        return NEED_DATA

    def switch(self) -> bytes:
        """The upgrade being served switched protocols: the connection is no longer HTTP. Returns the bytes that
        followed its head (the new protocol's first)."""
        assert self.state is _SERVING, self.state
        assert self._head_end, "not an upgrade"
        self.state = _HANDED
        tail = bytes(self._raw[self._head_end:] + self._parked)
        self._raw.clear()
        self._parked.clear()
        del self._parser  # not kept for the new protocol's life
        return tail

    def hand_over(self) -> HandOver:
        """Give up the connection: the bytes of the request being read or served, and any after it."""
        self.state = _HANDED
        data = bytes(self._raw + self._parked)
        self._raw.clear()
        self._parked.clear()
        return HandOver(data)


def _blank_lines(raw: bytearray) -> int:
    """How many bytes of CR and LF come before the request line: the parser skips them (RFC 9112 §2.2), and a
    ``\r\n\r\n`` among them does not end the head."""
    return len(raw) - len(raw.lstrip(b"\r\n")) if raw[0] in _CR_LF else 0


def _promises_a_body(headers: CIMultiDictProxy[str]) -> bool:
    """A body, or the promise of one (the parser refuses a second ``Content-Length``, so there is one at most)."""
    return "transfer-encoding" in headers or "expect" in headers or headers.get("content-length", "0") != "0"

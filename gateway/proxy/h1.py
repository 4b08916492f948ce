"""The fast lane's client connection as a sans-IO state machine: bytes in, events out, no sockets.

Like h11's ``Connection`` (without its generality): ``receive`` takes whatever the socket read and says what
happened. Only the plain case comes out as a ``Request`` — a complete HTTP/1.1 GET or HEAD without a body or an
``Expect``, with a head of sane size — or such a GET asking to switch protocols (``upgrade``: a WebSocket), whose
server either ``switch``es (the bytes past the head are the new protocol's) or hands it over. Everything else,
malformed or merely unusual, is a ``HandOver`` of every byte read so far: aiohttp's server reads it from the
start and answers it (or refuses it) as it would have without this lane. While a request is being served, what
arrives is kept (a pipelined next request); once the answer is out, ``done`` hands those bytes over too, so
pipelining is aiohttp's.

Nothing here raises on input: for any bytes the answer is ``NEED_DATA``, a ``Request`` or a ``HandOver``
(``tests/proxy/test_h1.py`` checks this with tables and with hypothesis).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

MAX_HEAD = 16 << 10
"""A request head longer than this goes to aiohttp, whose limits (``limits.header_size`` and so on) decide."""
MAX_LINE = 8190
MAX_FIELD = 8190
MAX_HEADERS = 100
_FAST_METHODS = frozenset({b"GET", b"HEAD"})


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
        self.max_head, self.max_line, self.max_field, self.max_headers = max_head, max_line, max_field, max_headers
        self.state = _READING
        self._parser = httptools.HttpRequestParser(self)
        self._raw = bytearray()
        self._parked = bytearray()
        self._reset()

    def _reset(self) -> None:
        self._head_end = 0  # an upgrade's: where the new protocol's bytes start in ``_raw``
        self._url = bytearray()
        self._fields: list[tuple[bytes, bytes]] = []  # as llhttp read them: judged once the head is whole
        self._headers: CIMultiDict[str] = CIMultiDict()
        self._begun = 0
        self._complete = 0
        self._unfit = False
        self._keep_alive = True

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
        self._raw += data
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:  # the head is whole; the new protocol's bytes follow it
            self._head_end = len(self._raw) - len(data) + upgrade.args[0]
        except httptools.HttpParserError:
            return self.hand_over()
        if self._unfit or self._begun > 1 or len(self._raw) > self.max_head:  # whole or not, however it came
            return self.hand_over()
        if self._complete == 1:
            self.state = _SERVING
            return Request(self._parser.get_method().decode(), self._url.decode("utf-8", "surrogateescape"),
                           CIMultiDictProxy(self._headers), self._keep_alive, upgrade=self._head_end > 0)
        return NEED_DATA

    def done(self, keep_alive: bool) -> Event:
        """The answer to the request being served is out."""
        assert self.state is _SERVING, self.state
        if not keep_alive or self._head_end:
            self.state = _CLOSED
            return CLOSE
        self.state = _READING
        self._raw.clear()
        self._reset()
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
        self._reset()  # the head's headers and llhttp's parser are not kept for the new protocol's life
        del self._parser
        return tail

    def hand_over(self) -> HandOver:
        """Give up the connection: the bytes of the request being read or served, and any after it."""
        self.state = _HANDED
        data = bytes(self._raw + self._parked)
        self._raw.clear()
        self._parked.clear()
        return HandOver(data)

    # --- llhttp callbacks ---------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._begun += 1

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.max_line:
            self._unfit = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self._fields) <= self.max_headers:  # one past the limit is enough to refuse: no more are kept
            self._fields.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        self._keep_alive = parser.should_keep_alive()  # llhttp forgets it once the message is complete
        method = parser.get_method()
        if (method not in _FAST_METHODS or parser.get_http_version() != "1.1"
                or (parser.should_upgrade() and method != b"GET")):
            self._unfit = True
        # The fields are judged here, all at once: a call per field costs more than the judging.
        fields, max_field = self._fields, self.max_field
        if len(fields) > self.max_headers or (len(self._raw) > max_field  # else no field can be that long
                                              and any(len(name) + len(value) > max_field for name, value in fields)):
            self._unfit = True
        headers = self._headers = CIMultiDict([(name.decode("utf-8", "surrogateescape"),
                                                value.decode("utf-8", "surrogateescape")) for name, value in fields])
        if ("transfer-encoding" in headers or "expect" in headers or ("content-length" in headers and any(
                length != "0" for length in headers.getall("content-length")))):
            self._unfit = True  # a body, or the promise of one

    def on_body(self, body: bytes) -> None:
        self._unfit = True

    def on_message_complete(self) -> None:
        self._complete += 1

"""Requests refused before any handler sees them: malformed, over a limit, too slow, or one connection too many.

Anyone can send these, a few hundred bytes at a time, so each one costs the same small, quiet answer in both
lanes: its status (400, 408, 413, 414, 431 or 503) with a JSON error that names the reason and never echoes what
was sent, one access-log line with that reason, one count in ``codehub_bad_requests_total{reason}``, and no other
log record, let alone a traceback. The answer is JSON for everyone: a head that could not be read cannot be
trusted to say that a browser sent it. Exceptions that are the gateway's own bugs are not refusals: they still
reach aiohttp's ``log_exception``, once, with their traceback.

aiohttp's ``RequestHandler`` logs every parse error as an ERROR with a traceback (``handle_error``): the handler
here answers those itself. It also adds what aiohttp lacks: a deadline for a request head (aiohttp would wait for
a dribbled head until the keep-alive timeout), and a malformed chunk in the middle of a body ends that request
with a 400 (aiohttp would leave it waiting for the rest of a body that can no longer come). Heads its parser reads
whose framing HTTP/1.1 calls faulty are refused too, and a request after which its parser lost what followed in
the same read (an upgrade other than WebSocket) is the last of its connection: ``framing_fault``,
``ends_its_connection``.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any, cast

from aiohttp import web
from aiohttp.http import HttpRequestParser, HttpVersion11
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
)
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo
from multidict import CIMultiDictProxy

from gateway.accesslog import REFUSED, UNREAD, AccessLog, AccessLogger
from gateway.config import Limits
from gateway.edge.cors import reloads_by_itself
from gateway.edge.plan import wants_page
from gateway.edge.routing import Hosts, normalise_host
from gateway.errors import (
    BadRequest,
    GatewayError,
    HeadersTooLarge,
    PayloadTooLarge,
    RequestTimeout,
    ServiceUnavailable,
    URITooLong,
)
from gateway.metrics import Metrics
from gateway.proxy.headers import clearing_cookies
from gateway.proxy.pool import encode_head

LINGER = 2.0
"""Seconds a refused connection stays open, reading and dropping, after its answer: closing a socket with unread
bytes resets it, which can destroy the answer before the client has read it."""
MOST_LINGERING = 64
"""Refused connections lingering at once; past this they are closed right after their answer (a flood must not
turn the linger into a way to hold file descriptors)."""


class Reason(enum.Enum):
    """Why a request was refused: a closed list, the ``reason`` label of ``codehub_bad_requests_total``."""

    REQUEST_LINE = "bad-request-line"  # method, target or version unreadable (TLS or HTTP/2 on this port too)
    HEADER = "bad-header"  # forbidden bytes in a name or value, a folded line, a bare LF, no Host
    DUPLICATE_HEADER = "duplicate-header"  # a header that may appear once, twice (Host…)
    FRAMING = "bad-framing"  # two Content-Lengths, one with Transfer-Encoding, a bad one, a Transfer-Encoding not
    # ending in chunked, chunks in HTTP/1.0: the smuggling shapes
    CHUNK = "bad-chunk"  # a malformed chunk of a chunked body
    URL_TOO_LONG = "url-too-long"
    HEADERS_TOO_LARGE = "headers-too-large"
    COOKIES_TOO_LARGE = "cookies-too-large"  # over the limit by its cookies alone: answered with them cleared
    BODY_TOO_LARGE = "body-too-large"
    BODY_TIMEOUT = "body-timeout"  # a body that stopped coming (``limits.body_timeout``): answered where it stalled
    HEAD_TIMEOUT = "head-timeout"
    TOO_MANY_CONNECTIONS = "too-many-connections"
    MALFORMED = "malformed"  # anything else the parser refused


_ANSWERS: dict[Reason, tuple[type[GatewayError], str]] = {
    Reason.REQUEST_LINE: (BadRequest, "The request line is not valid HTTP/1.1."),
    Reason.HEADER: (BadRequest, "A request header is malformed."),
    Reason.DUPLICATE_HEADER: (BadRequest, "A header that may appear only once was sent more than once."),
    Reason.FRAMING: (BadRequest, "The request's length is ambiguous (Content-Length, Transfer-Encoding)."),
    Reason.CHUNK: (BadRequest, "The chunked request body is malformed."),
    Reason.URL_TOO_LONG: (URITooLong, "The address is longer than this gateway accepts."),
    Reason.HEADERS_TOO_LARGE: (HeadersTooLarge, "The request headers are larger than this gateway accepts: too "
                                                "many, or one too long (large cookies?)."),
    Reason.COOKIES_TOO_LARGE: (HeadersTooLarge, "Your browser sent more cookies than this gateway accepts, most "
                                                "likely set by a page for every host of this site. It has been "
                                                "asked to remove the largest of them (not your sign-in)."),
    Reason.BODY_TOO_LARGE: (PayloadTooLarge, "The request body is larger than this gateway accepts here."),
    Reason.HEAD_TIMEOUT: (RequestTimeout, "The request took too long to arrive."),
    Reason.TOO_MANY_CONNECTIONS: (ServiceUnavailable, "The gateway has too many open connections; try again "
                                                      "shortly."),
    Reason.MALFORMED: (BadRequest, "The request is not valid HTTP/1.1."),
}

_PARSER_SAYS: tuple[tuple[str, Reason], ...] = (
    ("too many headers", Reason.HEADERS_TOO_LARGE),
    ("content-length", Reason.FRAMING),
    ("transfer-encoding", Reason.FRAMING),
    ("chunk", Reason.CHUNK),
    ("duplicate", Reason.DUPLICATE_HEADER),
    ("header", Reason.HEADER),
    ("pri/upgrade", Reason.REQUEST_LINE),  # the HTTP/2 preface
)
"""What aiohttp's parser says (lower case, first match wins) and the reason it means; its exception types tell
only the request line and header bytes apart."""


def classify(exc: HttpProcessingError) -> Reason:
    """The reason for one of aiohttp's parse errors (table-tested with raw bytes against the real parser)."""
    if isinstance(exc, CookiesTooLarge):
        return Reason.COOKIES_TOO_LARGE
    if isinstance(exc, LineTooLong):
        # aiohttp's C parser reports an overlong request target with the bytearray it was assembling it in, and
        # an overlong header name or value with bytes.
        return Reason.URL_TOO_LONG if isinstance(exc.args[0], bytearray) else Reason.HEADERS_TOO_LARGE
    if isinstance(exc, BadStatusLine | InvalidURLError):  # a bad method (BadHttpMethod), target or version
        return Reason.REQUEST_LINE
    if isinstance(exc, InvalidHeader):
        return Reason.HEADER
    said = exc.message.lower()
    return next((reason for words, reason in _PARSER_SAYS if words in said), Reason.MALFORMED)


def framing_fault(version: tuple[int, int], headers: CIMultiDictProxy[str], chunked: bool) -> BadHttpMessage | None:
    """A request head aiohttp's parser reads, but whose framing HTTP/1.1 calls faulty; its error (worded for
    ``classify``). A ``Transfer-Encoding`` that does not end in ``chunked`` (llhttp lets an empty one through, and
    before a ``Content-Length`` reads the request by the length): a request without a length anyone can rely on
    (RFC 9112 §6.3). A ``Transfer-Encoding`` on a request older than HTTP/1.1 (§6.1): a hop in front that reads it
    by HTTP/1.0's rules takes it for a request without a body, and its chunks for the next request."""
    if "Transfer-Encoding" not in headers:
        return None
    if not chunked:
        return BadHttpMessage("Transfer-Encoding that does not end in chunked")
    if version < HttpVersion11:
        return BadHttpMessage("Transfer-Encoding in a request older than HTTP/1.1")
    return None


def ends_its_connection(method: str, headers: CIMultiDictProxy[str], upgrade: bool) -> bool:
    """Whether a request must be the last of its connection: it asks to switch to a protocol aiohttp does not
    switch to. llhttp stops reading at any upgrade request and aiohttp goes on only after one to WebSocket (or a
    CONNECT): what came behind any other in the same read is dropped unread, so the requests after it on the
    connection would be answered out of turn."""
    if not upgrade or method == "CONNECT":
        return False
    asked = headers.get("Upgrade", "")
    return not (asked.isascii() and asked.lower() == "websocket")


class CookiesTooLarge(HttpProcessingError):
    """A request head over ``limits.header_size`` only by its ``Cookie`` header, read whole all the same: its answer
    clears the largest cookies (``cookies``, ``Set-Cookie`` values), and is a page (``page``) when a browser
    navigates, framed as the host's pages are (``frame_headers``). Its button tries again when that is the same request
    (``retry``: a GET's); the page tries by itself only when the visitor's own navigation brought it (``refresh``):
    its reload comes from the host's own origin, which may wake a sleeping workspace (``cors.reloads_by_itself``),
    and a frame, or a navigation a script started, must not get that by way of the cookies a page set."""

    def __init__(self, cookies: list[str], page: bool, retry: bool, refresh: bool,
                 frame_headers: Mapping[str, str]) -> None:
        super().__init__(message="cookies over the limit")
        self.cookies = cookies
        self.page = page
        self.retry = retry
        self.refresh = refresh
        self.frame_headers = frame_headers


class Relief:
    """A head over the limit by its cookies: how far it is read, and what of it may be cleared. A preview's script
    can set cookies for the parent domain it shares with the hub and every other preview, past the limit, and every
    request of its visitor's browser to the site would be refused for as long as they last (a year, if the script
    says so). Such a head is read to its end, or to ``most`` bytes (256 KiB, or twice the limit: 60 cookies of 4 KB,
    a third of what Chromium keeps for one domain): past that, the cookies up to there are cleared (a browser sends
    its ``Cookie`` header last), and the next answer clears more."""

    def __init__(self, limits: Limits, hosts: Hosts, frame_headers: Callable[[str], Mapping[str, str]]) -> None:
        self.limits = limits
        self.hosts = hosts
        self.secure = hosts.scheme == "https"
        self.shared = hosts.preview_suffix.rpartition(":")[0]  # previews can set cookies for it and above
        self.frame_headers = frame_headers  # a host's framing headers, as for the gateway's pages there
        self.most = max(256 << 10, 2 * limits.header_size)

    def over_by_cookie(self, head: bytearray) -> bool:
        """Whether the first field over the limit in ``head`` (some of a head, at least up to that field) is a
        ``Cookie``: only then is the head worth reading to its end."""
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if len(name) > self.limits.header_size or len(value.strip(b" \t")) > self.limits.header_size:
                return name.lower() == b"cookie"
        return False

    def cut(self, head: bytearray) -> bytes | None:
        """A head read to ``most`` bytes, ended after the last whole cookie of its last field when that is the
        ``Cookie`` header (the rest of it, and of the head, unread); ``None`` when it is not."""
        start = head.rfind(b"\r\n") + 2
        last = head.rfind(b";", start)
        if head[start:start + 7].lower() != b"cookie:" or last < 0:
            return None
        return bytes(head[:last]) + b"\r\n\r\n"

    def read(self, head: bytes) -> CookiesTooLarge | None:
        """The relief for a whole ``head`` (its blank line included) that is over the limit by its cookies alone:
        read by aiohttp's parser with only the field limit raised, so it is exactly as strict otherwise."""
        limits = self.limits
        parser = HttpRequestParser(None, None, self.most, max_line_size=limits.request_line,
                                   max_field_size=self.most, max_headers=limits.header_count,
                                   response_with_body=False, auto_decompress=False)
        try:
            messages, _, _ = parser.feed_data(head)
        except HttpProcessingError:
            return None
        if len(messages) != 1:
            return None
        message = messages[0][0]
        headers, host = message.headers, message.headers.get("Host", "")
        over = {name.lower() for name, value in headers.items()  # in bytes, as the parser counts
                if max(len(name), len(value.encode("utf-8", "surrogateescape"))) > limits.header_size}
        if over != {"cookie"}:
            return None
        cookies = clearing_cookies(headers.getall("Cookie"), host, message.path, shared=self.shared,
                                   limit=limits.header_size, secure=self.secure)
        if not cookies:
            return None
        page, retry = wants_page(message.method, headers), message.method in ("GET", "HEAD")
        own = self.hosts.origin(host) if normalise_host(host, self.hosts.scheme) is not None else ""
        refresh = retry and reloads_by_itself(headers, own)
        return CookiesTooLarge(cookies, page, retry, refresh, self.frame_headers(host) if page else {})


class _CheckedParser:
    """aiohttp's request parser with the heads it reads checked: the first whose framing is faulty
    (``framing_fault``) is queued as a parse error (a 400 that closes the connection, as aiohttp queues one) and
    nothing after it is read; one that must end its connection (``ends_its_connection``) is answered with
    ``Connection: close``. A head over the limit by its cookies is read on to its end (``Relief``) and refused
    with them cleared.

    To read such a head whole, the bytes of the head being read are kept (from the read after a whole head, while
    no body is being read): a guess at where it began, which ``Relief`` reads strictly, so a wrong one (behind a
    body, or a pipelined request) is only an ordinary 431."""

    __slots__ = ("_body", "_from", "_head", "_overflow", "_parser", "_refused", "_relief")

    def __init__(self, parser: Any, relief: Relief) -> None:
        self._parser = parser
        self._relief = relief
        self._refused = False
        self._head = bytearray()
        self._body: Any = None  # the payload of the last request read, while its body is still coming
        self._overflow: tuple[bytearray, HttpProcessingError] | None = None
        self._from = 0  # where in the overflowing head to look for its end (what is before was looked at)

    def feed_data(self, data: bytes) -> tuple[Any, bool, bytes]:
        if self._overflow is not None:
            return self._overflowing(data)
        if self._refused:
            return (), False, b""
        if self._body is not None and self._body.is_eof():
            self._body = None
        try:
            messages, upgraded, tail = self._parser.feed_data(data)
        except LineTooLong as exc:
            head = self._head + data
            if not self._relief.over_by_cookie(head):
                raise
            self._overflow = (head, exc)
            self._from = len(head) - len(head.lstrip(b"\r\n"))  # blank lines before a request line (RFC 9112 §2.2)
            self._head = bytearray()
            return self._overflowing(b"")
        if not messages:  # most reads: a piece of a body, or of a head
            if self._body is None and len(self._head) < self._relief.most:
                self._head += data
            return messages, upgraded, tail
        self._head.clear()
        self._body = messages[-1][1]
        checked = []
        for message, payload in messages:
            error = framing_fault(message.version, message.headers, message.chunked)
            if error is not None:
                self._refused = True
                checked.append((_ErrInfo(status=400, exc=error, message=error.message), EMPTY_PAYLOAD))
                return checked, False, b""
            if not message.should_close and ends_its_connection(message.method, message.headers, message.upgrade):
                message = message._replace(should_close=True)
            checked.append((message, payload))
        return checked, upgraded, tail

    def _overflowing(self, data: bytes) -> tuple[Any, bool, bytes]:
        """Read on to the end of a head over the limit (``Relief.most`` at most), then refuse it: with cookies
        cleared when they alone are over, else as the parser did."""
        assert self._overflow is not None
        head, error = self._overflow
        head += data
        end = head.find(b"\r\n\r\n", self._from)
        if end < 0 and len(head) <= self._relief.most:
            self._from = max(self._from, len(head) - 3)  # a dribbled head is looked through once, not per read
            return (), False, b""
        self._overflow = None
        self._refused = True
        most = self._relief.most
        whole = bytes(head[: end + 4]) if 0 <= end <= most - 4 else self._relief.cut(head[:most])
        refused = (self._relief.read(whole) if whole is not None else None) or error
        return [(_ErrInfo(status=431, exc=refused, message=refused.message), EMPTY_PAYLOAD)], False, b""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)


def refusal(reason: Reason) -> GatewayError:
    """The error of the one tree that answers ``reason``; its code is the reason."""
    kind, message = _ANSWERS[reason]
    headers = {"Retry-After": "1"} if reason is Reason.TOO_MANY_CONNECTIONS else None
    return kind(message, code=reason.value, headers=headers)


def counted(metrics: Metrics, reason: Reason) -> GatewayError:
    """Count a refusal; its error, to answer with."""
    metrics.bad_requests.labels(reason.value).inc()
    return refusal(reason)


class Refusals:
    """Counts, logs and writes refusals: the one place both lanes refuse through."""

    def __init__(self, metrics: Metrics, access: AccessLog, relief: Relief,
                 page: Callable[[GatewayError, bool, bool], str]) -> None:
        self._metrics = metrics
        self._access = access
        self.relief = relief
        self._page = page

    def note(self, reason: Reason) -> GatewayError:
        """Count a refusal; its error, for the caller to answer with."""
        return counted(self._metrics, reason)

    def page(self, error: GatewayError, *, retry: bool, refresh: bool) -> str:
        """The error page a browser gets for ``error`` (``pages.error_page``)."""
        return self._page(error, retry, refresh)

    def answer(self, transport: asyncio.Transport, reason: Reason, *, seconds: float = 0.0) -> None:
        """Count, answer and log a refusal on a connection that no request object stands for (the head never
        arrived, or the connection itself is one too many). The caller closes the connection."""
        error = self.note(reason)
        body = json.dumps(error.document()).encode()
        head = encode_head(f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}", {
            "Content-Type": "application/json; charset=utf-8", "Content-Length": str(len(body)),
            "Cache-Control": "no-store", "Connection": "close", **error.headers,
        })
        transport.write(head + body)
        peer = transport.get_extra_info("peername")
        self._access.write(remote=peer[0] if peer else None, method=None, host=None, raw_path=None,
                           status=error.status, length=len(body), seconds=seconds, target=None, user=None,
                           reason=reason.value)


def handler_settings(limits: Limits) -> dict[str, Any]:
    """aiohttp's server settings that follow the gateway's limits, and its JSON access log."""
    return {"keepalive_timeout": limits.keepalive, "max_line_size": limits.request_line,
            "max_field_size": limits.header_size, "max_headers": limits.header_count,
            "access_log_class": AccessLogger, "access_log": logging.getLogger("codehub.access")}


class GatewayHandler(RequestHandler):
    """aiohttp's handler for one connection, quiet about what clients send and strict about how long a head may
    take. ``release`` is called once when the connection ends (the per-worker connection count)."""

    def __init__(self, manager: web.Server, refusals: Refusals, release: Callable[[], None], *,
                 head_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        # One request at a time: aiohttp's parser pauses after each (a queue of one, and the handler pauses reading
        # while one waits), so a fault behind a request in the same read is read only once that request is taken,
        # and answered after it (RFC 9112 §9.3.2); with a longer queue the parser raises for the whole read and
        # keeps the requests before the fault to itself. Its settings are those aiohttp built its own with
        # (``handler_settings``, the app's ``handler_args``).
        parser = HttpRequestParser(self, self._loop, self._read_bufsize, max_line_size=kwargs["max_line_size"],
                                   max_field_size=kwargs["max_field_size"], max_headers=kwargs["max_headers"],
                                   payload_exception=RequestPayloadError, auto_decompress=kwargs["auto_decompress"],
                                   max_msg_queue_size=1)
        self._max_msg_queue_size = 1
        # the parser's methods, checked
        self._parser = _CheckedParser(parser, refusals.relief)  # type: ignore[assignment]
        self._refusals = refusals
        self._release: Callable[[], None] | None = release
        self._head_timeout = head_timeout
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head_timer()
        if self._release is not None:
            self._release()
            self._release = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        idle = self._waiter is not None and not self._waiter.done()  # these bytes begin or continue a head
        in_progress = self._current_request
        # Its body is whole (or it has none): these bytes can only begin or continue the next request's head.
        pipelined = in_progress is not None and in_progress.content.is_eof()
        queued = len(self._messages)
        super().data_received(data)
        if self._messages:
            self._stop_head_timer()
            # A failure queued while its body is unfinished is in that body; one behind a whole body is the next
            # request's, answered in its turn (the body's unread end still goes upstream).
            if in_progress is not None and len(self._messages) > queued and not in_progress.content.is_eof():
                self._refuse_body(in_progress)
        elif (idle or pipelined) and self._head_timer is None and data:
            self.expect_head(self._loop.time() + self._head_timeout)

    def expect_head(self, deadline: float) -> None:
        """A request head has begun: it must be whole by ``deadline`` (loop time), or the client gets 408."""
        self._stop_head_timer()
        self._head_timer = self._loop.call_at(deadline, self._head_late)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        waiting = self._waiter is not None and not self._waiter.done()
        if self.transport is None or self._messages:
            return
        if not waiting:  # begun while the answer before it is under way: 408 as soon as that one is out
            if not self._force_close:
                self._head_timer = self._loop.call_later(min(1.0, self._head_timeout), self._head_late)
            return
        self._refusals.answer(self.transport, Reason.HEAD_TIMEOUT, seconds=self._head_timeout)
        self.force_close()

    def _refuse_body(self, request: web.BaseRequest) -> None:
        """The parser failed in the middle of the body of ``request`` (a malformed chunk): that request fails with
        a 400 where its body is read, and the connection ends after its answer, as the rest of its bytes have no
        known framing. aiohttp queued the failure as a next request; with the connection ending it is never
        served, so it is neither answered nor counted twice."""
        failure = self._messages[-1][0]
        if not isinstance(failure, _ErrInfo) or not isinstance(failure.exc, HttpProcessingError):
            return
        error = self._refusals.note(classify(failure.exc))
        request[REFUSED] = error.code
        self._lingering_time = 0.0  # nothing more of this body can be read: close instead of draining it
        self.close()
        request.content.set_exception(error)

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """A head aiohttp could not parse is a refusal (answered and counted, not logged); anything else is
        aiohttp's, which logs it with its traceback."""
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        error = self._refusals.note(classify(exc))
        request[UNREAD] = error.code
        headers = {"Cache-Control": "no-store", **error.headers}
        response: web.Response
        if isinstance(exc, CookiesTooLarge) and exc.page:  # a head read whole: a browser's navigation
            response = web.Response(text=self._refusals.page(error, retry=exc.retry, refresh=exc.refresh),
                                    status=error.status, content_type="text/html",
                                    headers={**headers, **exc.frame_headers})
        else:
            response = web.json_response(error.document(), status=error.status, headers=headers)
        for cookie in exc.cookies if isinstance(exc, CookiesTooLarge) else ():
            response.headers.add("Set-Cookie", cookie)
        response.force_close()
        return response


class Overloaded(asyncio.Protocol):
    """A connection past the worker's limit: answered 503 at once, then closed. What the client sent before it
    could know is read and dropped for a moment (``LINGER``) so that closing does not reset the answer away."""

    def __init__(self, refusals: Refusals, lingering: set[Overloaded]) -> None:
        self._refusals = refusals
        self._lingering = lingering
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self._refusals.answer(transport, Reason.TOO_MANY_CONNECTIONS)
        if len(self._lingering) >= MOST_LINGERING or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._lingering.add(self)
        self._timer = asyncio.get_running_loop().call_later(LINGER, transport.close)

    def data_received(self, data: bytes) -> None:
        """Dropped: the connection was refused before its request was read."""

    def eof_received(self) -> bool:
        return False  # the client has its answer and is done: close

    def connection_lost(self, exc: Exception | None) -> None:
        self._lingering.discard(self)
        if self._timer is not None:
            self._timer.cancel()

"""A structured access log: one JSON object per request, on the ``codehub.access`` logger.

Paths are logged as sent (still percent-encoded), without the query string: share tokens and hand-off codes
travel there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import time
from json.encoder import encode_basestring_ascii

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from gateway.edge.routing import KIND_LABELS, Target

TARGET = web.RequestKey("codehub_target", Target)
USER = web.RequestKey("codehub_user", str)
REFUSED = web.RequestKey("codehub_refused", str)
"""Why the gateway refused this request before serving it (``refusals.Reason``), written as ``reason``."""
UNREAD = web.RequestKey("codehub_unread", str)
"""Why the head of this request was refused unread: aiohttp's stand-in request knows nothing of it."""
SENT = web.RequestKey("codehub_sent", int)
"""Body bytes of a forwarded answer that went out, counted as they go (a stream cut short says how much did):
aiohttp counts only an answer that ended, and with its head."""
ANSWERED = web.RequestKey("codehub_answered", int)
"""The status of the answer whose head goes out for this request (``note_answer``): a stream's head goes out as it
is prepared (aiohttp holds back only a whole ``Response``'s, written with its body at once)."""
WRITTEN = web.RequestKey("codehub_written", bool)
"""The lane wrote this request's line itself: a WebSocket's, when it ended (aiohttp writes none for one whose
client or upstream closed first, as the close cancels its handler)."""


def log_text(value: str | None) -> str:
    """A JSON string (or null), ASCII only: what a client controls (paths, hosts, user names) cannot write a
    terminal escape or a fake second line into a log. The access line is formatted by hand with this, as a dict
    through ``json.dumps`` costs more than the rest of the line together."""
    return "null" if value is None else encode_basestring_ascii(value)


_MOST_CHOSEN = 100 + 600 + 2000 + 400
"""Characters of an access line, escaped, that its client chose (method, host, path, user): what makes a line long.
Worker processes share one pipe (a container's output), where a write over ``PIPE_BUF`` may be interleaved with
another worker's: a client's 8 KB path would have cut another request's line in two, and a log reader would have lost
both. Past this those four are cut short (the budgets add up to it), and the line says ``"cut":true``; the rest of a
line (time, address, status, workspace, the gateway's reason) takes a few hundred characters at most."""


def _cut(value: str | None, most: int) -> str:
    """``value`` as ``log_text`` writes it, in at most ``most`` characters: cut short, its end marked ``...``
    (escaped, a character takes up to twelve)."""
    escaped = log_text(value)
    for keep in (most - 5, (most - 5) // 12):
        if value is None or len(escaped) <= most:
            break
        escaped = log_text(value[:keep] + "...")
    return escaped


class OneLineFormatter(logging.Formatter):
    """The gateway's other logs, as text lines that quote what others chose (an event's text from the cluster, a
    workspace's last line of output, an IdP's error): a line break in it would make a line that looks like the
    gateway's own, an escape sequence or a bidi override would rewrite what a terminal shows. Such a message is
    written escaped, whatever the call site; a traceback after it keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


class AccessLog:
    """Writes the lines. They go straight to the logger's ``BufferedLineHandler`` when it has one (``serve`` sets
    that up): a ``LogRecord`` and the handler chain per request cost more than the line itself."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._sink = next((handler for handler in logger.handlers if isinstance(handler, BufferedLineHandler)), None)

    def write(self, *, remote: str | None, method: str | None, host: str | None, raw_path: str | None,
              status: int, length: int, seconds: float, target: Target | None, user: str | None,
              reason: str | None = None) -> None:
        """``reason``: why the gateway refused the request (``server.refusals``). Method, host and path are None for a
        request whose head could not be read."""
        if not self._logger.isEnabledFor(logging.INFO):
            return
        text = log_text
        if target is not None:  # a routed request: its kind and workspace are the gateway's own words
            where = (f'"kind":"{KIND_LABELS[target.kind]}","workspace":{text(target.workspace)},'
                     f'"port":{"null" if target.port is None else target.port}')
        else:
            where = '"kind":null,"workspace":null,"port":null'
        path = None if raw_path is None else raw_path.partition("?")[0]
        why = "" if reason is None else f',"reason":{text(reason)}'
        method_t, host_t, path_t, user_t = text(method), text(host), text(path), text(user)
        if len(method_t) + len(host_t) + len(path_t) + len(user_t) > _MOST_CHOSEN:
            method_t, host_t, path_t, user_t = _cut(method, 100), _cut(host, 600), _cut(path, 2000), _cut(user, 400)
            why += ',"cut":true'
        line = (
            f'{{"ts":{time.time():.3f},"remote":{text(remote)},"method":{method_t},'
            f'"host":{host_t},"path":{path_t},"status":{status},'
            f'"bytes":{length},"ms":{seconds * 1000:.2f},{where},"user":{user_t}{why}}}'
        )
        if self._sink is not None:
            self._sink.write_line(line)
        else:  # straight to the handlers: Logger.info would also walk the stack to find the caller
            self._logger.handle(logging.LogRecord(self._logger.name, logging.INFO, __file__, 0, line, None, None))

    def write_request(self, request: web.BaseRequest, *, status: int, length: int, seconds: float) -> None:
        """The line of a request aiohttp read, with what the lane noted on it (target, user, refusal)."""
        self.write(remote=request.remote, method=request.method, host=request.headers.get("Host", ""),
                   raw_path=request.raw_path, status=status, length=length, seconds=seconds,
                   target=request.get(TARGET), user=request.get(USER), reason=request.get(REFUSED))


async def note_answer(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: which answer's head goes out, for the line of a client that leaves during it and
    of an answer cut by a bug (``sent_status``). An error page prepared after part of an answer went out never goes
    out itself (the connection is closed instead), so it does not count; one prepared while nothing had takes the
    place of the answer prepared before it (aiohttp had held that one's head back)."""
    if not request.writer.output_size:
        request[ANSWERED] = response.status


def sent_status(request: web.BaseRequest, response: web.StreamResponse) -> int:
    """The status the client got: ``response``'s, unless another answer's head went out first — one a bug cut
    short."""
    status: int = request.get(ANSWERED, response.status)
    return status


def client_left(request: web.BaseRequest, seconds: float) -> int:
    """Write the line of a request whose client left while it was served, and return its status: aiohttp writes
    none for a handler it cancelled. The answer's status if its head went out (with the body bytes that did), else
    nginx's 499."""
    status: int = request.get(ANSWERED, 499)
    AccessLog(logging.getLogger("codehub.access")).write_request(
        request, status=status, length=request.get(SENT, request.writer.output_size), seconds=seconds)
    return status


class AccessLogger(AbstractAccessLogger):
    """aiohttp's hook (one per connection) onto ``AccessLog``."""

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        self._log = AccessLog(logger)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time_taken: float) -> None:
        if request.get(WRITTEN):
            return
        unread = request.get(UNREAD)
        if unread is not None:
            self._log.write(remote=request.remote, method=None, host=None, raw_path=None, status=response.status,
                            length=response.body_length, seconds=time_taken, target=None, user=None, reason=unread)
            return
        self._log.write_request(request, status=sent_status(request, response),
                                length=request.get(SENT, response.body_length), seconds=time_taken)


class BufferedLineHandler(logging.Handler):
    """Writes records to a file descriptor in batches, like nginx's ``access_log … buffer= flush=``: at most
    ``interval`` seconds late or ``limit`` characters pending, so a busy gateway pays one write per batch, not
    per request. Each write holds whole lines and at most ``PIPE_BUF`` bytes, so lines from several worker
    processes sharing one pipe never interleave."""

    def __init__(self, fd: int, *, interval: float = 0.5, limit: int = 16 << 10) -> None:
        super().__init__()
        self._fd = fd
        self._interval = interval
        self._limit = limit
        self._lines: list[str] = []
        self._pending = 0
        self._due: asyncio.TimerHandle | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.write_line(line)

    def write_line(self, line: str) -> None:
        self._lines.append(line)
        self._pending += len(line) + 1
        if self._pending >= self._limit:
            self.flush()
        elif self._due is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._due = loop.call_later(self._interval, self.flush)

    def flush(self) -> None:
        with self.lock if self.lock is not None else contextlib.nullcontext():
            if self._due is not None:
                self._due.cancel()
                self._due = None
            if not self._lines:
                return
            lines = [line.encode("utf-8", "replace") + b"\n" for line in self._lines]
            self._lines.clear()
            self._pending = 0
        chunk = b""
        for line in lines:
            if chunk and len(chunk) + len(line) > select.PIPE_BUF:
                self._write(chunk)
                chunk = b""
            chunk += line
        self._write(chunk)

    def _write(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            while data:
                data = data[os.write(self._fd, data):]

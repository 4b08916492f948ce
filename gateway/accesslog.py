"""A structured access log: one JSON object per request, on the ``codehub.access`` logger.

Query strings are left out on purpose: share tokens and hand-off codes travel there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import time

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from gateway.routing import Target

TARGET = web.RequestKey("codehub_target", Target)
USER = web.RequestKey("codehub_user", str)
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps with options builds an encoder per call


class AccessLogger(AbstractAccessLogger):
    """One per connection (aiohttp's choice). Lines go straight to the access logger's ``BufferedLineHandler``
    when it has one (``serve`` sets that up): a ``LogRecord`` and the handler chain per request cost more than
    the line itself."""

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        self._sink = next((handler for handler in logger.handlers if isinstance(handler, BufferedLineHandler)), None)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time_taken: float) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        target = request.get(TARGET)
        record = {
            "ts": round(time.time(), 3),
            "remote": request.remote,
            "method": request.method,
            "host": request.headers.get("Host", ""),
            "path": request.path,
            "status": response.status,
            "bytes": response.body_length,
            "ms": round(time_taken * 1000, 2),
            "kind": target.kind.value if target else None,
            "workspace": target.workspace if target else None,
            "port": target.port if target else None,
            "user": request.get(USER),
        }
        line = _ENCODE(record)
        if self._sink is not None:
            self._sink.write_line(line)
        else:  # straight to the handlers: Logger.info would also walk the stack to find the caller
            self.logger.handle(logging.LogRecord(self.logger.name, logging.INFO, __file__, 0, line, None, None))


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

"""The access log: one JSON object per request, without query strings (share tokens travel there)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from gateway.accesslog import (
    REFUSED,
    TARGET,
    UNREAD,
    USER,
    WRITTEN,
    AccessLog,
    AccessLogger,
    BufferedLineHandler,
)
from gateway.edge.routing import Kind, Target
from gateway.proxy.connection import Response
from tests.server.conftest import MakeProxied, access_line, sent_raw, three_chunks
from tests.server.test_metrics import sample


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read, write = os.pipe()
    yield read, write
    os.close(read)
    os.close(write)


def _logger(name: str, handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def _request() -> web.Request:
    request = make_mocked_request("GET", "/app/page?share=shr_secret", headers={"Host": "3000-ws1.localhost:8080"})
    request[TARGET] = Target(Kind.PREVIEW, "ws1", 3000, "/app/page")
    request[USER] = "alice"
    return request


@pytest.mark.parametrize("through_sink", [True, False])
def test_one_json_line_per_request_without_the_query(pipe: tuple[int, int], through_sink: bool) -> None:
    read, write = pipe
    handler: logging.Handler = BufferedLineHandler(write)
    if not through_sink:  # any other handler still gets the same line through logging
        handler = logging.StreamHandler(os.fdopen(os.dup(write), "w"))
    logger = _logger(f"codehub.access.test{through_sink}", handler)
    AccessLogger(logger, "").log(_request(), web.Response(status=201), 0.0123)
    handler.flush()
    line = os.read(read, 65536).decode()
    assert line.endswith("\n")
    assert line.count("\n") == 1
    record = json.loads(line)
    assert record | {"ts": 0, "remote": None} == {
        "ts": 0, "remote": None, "method": "GET", "host": "3000-ws1.localhost:8080", "path": "/app/page",
        "status": 201, "bytes": 0, "ms": 12.3, "kind": "preview", "workspace": "ws1", "port": 3000, "user": "alice",
    }
    assert "shr_secret" not in line


@pytest.mark.parametrize(("method", "host", "path", "user"), [
    ("GET", "h", "/" + "a" * 8000, None),
    ("GET", "h", "/" + "a" * 3900, None),  # the line would be a little over
    ("GET", "h", "/" + "\u00e9" * 4000, "\U0001f600" * 2000),  # six and twelve characters each, escaped
    ("M" * 8000, "h" * 8000, "/" + '"' * 8000, "\\" * 8000),
    ("\U0001f600" * 900, "\U0001f600" * 900, "/" + "\U0001f600" * 900, "\U0001f600" * 900),
], ids=["ascii path", "ascii path a little over", "escaped", "every field", "every field escaped"])
def test_a_line_of_a_clients_long_values_is_cut_to_one_pipe_write(pipe: tuple[int, int], method: str, host: str,
                                                                   path: str, user: str | None) -> None:
    """Worker processes share one pipe, where a write longer than ``PIPE_BUF`` may be interleaved with another
    worker's: a client's 8 KB path would have cut another request's line in two. Its own line is cut short instead,
    and says so; its start is kept."""
    read, write = pipe
    handler = BufferedLineHandler(write)
    AccessLog(_logger("codehub.access.test_cut", handler)).write(
        remote="127.0.0.1", method=method, host=host, raw_path=path, status=404, length=0, seconds=0.001,
        target=Target(Kind.PREVIEW, "ws1", 3000, "/"), user=user, reason="no-route")
    handler.flush()
    line = os.read(read, 65536)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert len(line) <= select.PIPE_BUF
    record = json.loads(line)
    assert record["cut"] is True
    for field, sent in (("method", method), ("host", host), ("path", path), ("user", user)):
        kept = record[field]
        assert kept == sent or (kept.endswith("...") and sent is not None and sent.startswith(kept[:-3])), field
    assert (record["status"], record["workspace"], record["reason"]) == (404, "ws1", "no-route")
    if set(path) <= set("/a"):
        assert len(record["path"]) > 1000  # as much as fits of a path that escapes to itself


def test_a_line_that_fits_is_not_cut(pipe: tuple[int, int]) -> None:
    read, write = pipe
    handler = BufferedLineHandler(write)
    path = "/" + "a" * 3000  # with the method and host, just under what is cut
    AccessLog(_logger("codehub.access.test_fits", handler)).write(
        remote="127.0.0.1", method="GET", host="h", raw_path=path, status=200, length=0, seconds=0.001,
        target=None, user=None)
    handler.flush()
    record = json.loads(os.read(read, 65536))
    assert record["path"] == path
    assert "cut" not in record


async def test_buffered_lines_are_written_whole(pipe: tuple[int, int]) -> None:
    read, write = pipe
    handler = BufferedLineHandler(write, limit=1 << 20)
    logger = _logger("codehub.access.batch", handler)
    access = AccessLogger(logger, "")
    for _ in range(50):
        access.log(_request(), web.Response(body=b""), 0.001)
    os.set_blocking(read, False)
    with pytest.raises(BlockingIOError):  # batched: nothing written before the flush
        os.read(read, 1 << 20)
    handler.flush()
    lines = os.read(read, 1 << 20).decode().splitlines()
    assert len(lines) == 50
    assert all(json.loads(line)["path"] == "/app/page" for line in lines)


def _lines(read: int, handler: logging.Handler) -> list[dict[str, object]]:
    handler.flush()
    os.set_blocking(read, False)
    try:
        return [json.loads(line) for line in os.read(read, 1 << 20).decode().splitlines()]
    except BlockingIOError:
        return []


_NOWHERE = {"kind": None, "workspace": None, "port": None}
_Marks = tuple[tuple[web.RequestKey[Any], Any], ...]


@pytest.mark.parametrize(("marks", "expected"), [
    ((), {"method": "GET", "host": "localhost:8080", "path": "/api/v1/me", "user": None, **_NOWHERE}),
    (((REFUSED, "bad-origin"),), {"method": "GET", "path": "/api/v1/me", "reason": "bad-origin", **_NOWHERE}),
    (((UNREAD, "head-too-large"),), {"method": None, "host": None, "path": None, "user": None,
                                     "reason": "head-too-large", **_NOWHERE}),
    (((WRITTEN, True),), None),  # a WebSocket's line, written by its lane when it ended: not a second one
])
def test_what_the_line_says_of_a_request_that_went_to_no_workspace(pipe: tuple[int, int], marks: _Marks,
                                                                  expected: dict[str, object] | None) -> None:
    """No workspace is ``null``, not a guess; a head refused unread names only its reason (aiohttp's stand-in
    request knows nothing of what was sent); a request whose lane wrote its own line is not written again."""
    read, write = pipe
    handler = BufferedLineHandler(write)
    request = make_mocked_request("GET", "/api/v1/me?q=1", headers={"Host": "localhost:8080"})
    for key, value in marks:
        request[key] = value
    AccessLogger(_logger("codehub.access.nowhere", handler), "").log(request, web.Response(status=400), 0.001)
    lines = _lines(read, handler)
    if expected is None:
        assert lines == []
    else:
        assert len(lines) == 1
        assert lines[0].items() >= expected.items()
        assert ("reason" in lines[0]) is ("reason" in expected)


@pytest.mark.parametrize("through_sink", [True, False])
def test_an_access_log_turned_down_below_info_writes_nothing(pipe: tuple[int, int], through_sink: bool) -> None:
    """Operators switch access lines off by the logger's level, as with any logger."""
    read, write = pipe
    handler: logging.Handler = BufferedLineHandler(write)
    if not through_sink:
        handler = logging.StreamHandler(os.fdopen(os.dup(write), "w"))
    logger = _logger(f"codehub.access.quiet{through_sink}", handler)
    logger.setLevel(logging.WARNING)
    AccessLogger(logger, "").log(_request(), web.Response(status=200), 0.001)
    assert _lines(read, handler) == []


def test_records_logged_the_usual_way_are_written_formatted(pipe: tuple[int, int]) -> None:
    """The handler is a logging handler like any other: a record logged through ``logging`` is written as its
    formatter makes it."""
    read, write = pipe
    handler = BufferedLineHandler(write)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    _logger("codehub.access.usual", handler).warning("one %s", "line")
    handler.flush()
    os.set_blocking(read, False)
    assert os.read(read, 65536) == b"WARNING one line\n"


def test_a_record_that_cannot_be_formatted_is_reported_as_logging_does(pipe: tuple[int, int],
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A bad record (arguments its message cannot take) is logging's usual complaint on stderr, written nowhere
    else, and the caller goes on."""
    read, write = pipe
    handler = BufferedLineHandler(write)
    _logger("codehub.access.bad", handler).warning("%d lines", "not a number")
    handler.flush()
    os.set_blocking(read, False)
    with pytest.raises(BlockingIOError):
        os.read(read, 65536)
    assert "--- Logging error ---" in capsys.readouterr().err


_LINE = '{"path":"/x"}'  # 14 characters with its newline


@pytest.mark.parametrize(("limit", "at_once"), [(14, True), (15, False), (1 << 20, False)])
async def test_a_batch_is_written_when_it_reaches_the_limit(pipe: tuple[int, int], limit: int, at_once: bool) -> None:
    """Lines wait for the interval until ``limit`` characters are pending, and the line that reaches it goes out at
    once with the rest; the count then starts again, so the next line waits for its batch."""
    read, write = pipe
    os.set_blocking(read, False)
    handler = BufferedLineHandler(write, limit=limit, interval=3600)
    handler.write_line(_LINE)
    if not at_once:
        with pytest.raises(BlockingIOError):
            os.read(read, 65536)
        handler.flush()
    assert os.read(read, 65536) == (_LINE + "\n").encode()
    handler = BufferedLineHandler(write, limit=3 * len(_LINE + "\n"), interval=3600)
    for _ in range(4):
        handler.write_line(_LINE)
    assert os.read(read, 65536) == 3 * (_LINE + "\n").encode()
    with pytest.raises(BlockingIOError):
        os.read(read, 65536)
    handler.flush()
    assert os.read(read, 65536) == (_LINE + "\n").encode()


async def test_pending_lines_are_written_within_the_interval_unasked(pipe: tuple[int, int]) -> None:
    """A quiet gateway's lines still go out, one interval late at most, batch after batch."""
    read, write = pipe
    handler = BufferedLineHandler(write, interval=0.01)
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read, "rb",
                                                                                                       closefd=False))
    try:
        async with asyncio.timeout(10):
            for n in range(3):
                handler.write_line(f'{{"n":{n}}}')
                handler.write_line(f'{{"n":{n}, "again":true}}')
                assert json.loads(await reader.readline()) == {"n": n}
                assert json.loads(await reader.readline()) == {"n": n, "again": True}
    finally:
        transport.close()


def test_lines_outside_an_event_loop_are_written_at_once(pipe: tuple[int, int]) -> None:
    """With no event loop to flush later (start-up, shutdown, a thread), nothing waits."""
    read, write = pipe
    os.set_blocking(read, False)
    BufferedLineHandler(write).write_line(_LINE)
    assert os.read(read, 65536) == (_LINE + "\n").encode()


async def test_each_write_holds_whole_lines_and_at_most_pipe_buf_bytes() -> None:
    """Worker processes share one pipe, where only writes of at most ``PIPE_BUF`` bytes are never interleaved with
    another's: a batch goes out in as few such writes as hold whole lines, and only a line longer than that on its
    own. A packet socket keeps each write apart, as the reader sees it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        handler = BufferedLineHandler(ours.fileno(), limit=1 << 20, interval=3600)
        lines = [json.dumps({"path": "/" + "p" * (n * 37 % 700)}) for n in range(40)]
        lines.insert(20, json.dumps({"path": "/" + "long" * select.PIPE_BUF}))
        first = 2000  # with the next, exactly PIPE_BUF bytes: one write
        lines[:0] = [json.dumps({"path": "/" + "p" * n}) for n in (first, select.PIPE_BUF - 28 - first)]
        for line in lines:
            handler.write_line(line)
        handler.flush()
        theirs.setblocking(False)
        writes: list[bytes] = []
        while True:
            try:
                writes.append(theirs.recv(1 << 20))
            except BlockingIOError:
                break
    assert b"".join(writes).decode().splitlines() == lines
    for this, after in zip(writes, [*writes[1:], None], strict=True):
        assert this.endswith(b"\n")
        assert len(this) <= select.PIPE_BUF or this.count(b"\n") == 1
        if after is not None:  # the next write's first line would not have fit in this one
            assert len(this) + after.index(b"\n") + 1 > select.PIPE_BUF


def _sized_answers() -> web.Application:
    """``/small`` and ``/large`` answer with a Content-Length (below and above what is read whole before it is
    written), ``/chunked`` in three chunks."""
    async def sized(request: web.Request) -> web.Response:
        return web.Response(body=b"s" * (5 if request.path == "/small" else 100_000))

    app = web.Application()
    app.router.add_get("/small", sized)
    app.router.add_get("/large", sized)
    app.router.add_get("/chunked", three_chunks)
    return app


@pytest.mark.parametrize(("path", "size"), [("/small", 5), ("/large", 100_000), ("/chunked", 16)])
async def test_the_fast_lane_logs_the_body_bytes_it_sent(proxied: MakeProxied, caplog: pytest.LogCaptureFixture,
                                                         path: str, size: int) -> None:
    p = await proxied(_sized_answers())
    with caplog.at_level(logging.INFO, logger="codehub.access"):
        for _ in range(2):  # on one kept-alive connection: each line counts its own answer
            async with p.request("GET", path) as response:
                assert len(await response.read()) == size
        for _ in range(100):  # the line is written once the answer is out (bounded wait)
            if len([r for r in caplog.records if r.name == "codehub.access"]) == 2:
                break
            await asyncio.sleep(0.02)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "codehub.access"]
    assert len(lines) == 2
    for line in lines:
        assert (line["method"], line["path"], line["status"], line["bytes"]) == ("GET", path, 200, size), line
        assert (line["kind"], line["workspace"], line["port"]) == ("preview", p.workspace, p.port), line


def _endless_and_silent() -> web.Application:
    """``/endless`` streams 16 KB pieces until the client leaves; ``/silent`` never answers."""
    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        while True:
            await response.write(b"e" * 16384)
            await asyncio.sleep(0.01)

    async def silent(request: web.Request) -> web.Response:
        await asyncio.sleep(60)
        raise AssertionError("the gateway gave up first")

    app = web.Application()
    for path, handler in (("/endless", endless), ("/silent", silent)):
        app.router.add_get(path, handler)
        app.router.add_post(path, handler)
    return app


@pytest.mark.parametrize("method", ["GET", "POST"], ids=["fast-lane", "aiohttp-lane"])
@pytest.mark.parametrize(("path", "status"), [("/endless", 200), ("/silent", 499)], ids=["mid-answer", "unanswered"])
async def test_a_client_that_leaves_gets_its_line(proxied: MakeProxied, caplog: pytest.LogCaptureFixture,
                                                  method: str, path: str, status: int) -> None:
    """The client leaves mid-answer (a tab closed on an event stream, a download cancelled) or before any: the
    request was served in part, or not at all, and its access line says so (the answer's status and the body bytes
    that went out, or 499). Leaving cancels the request's handling, which wrote no line: the request was not in
    the log at all."""
    p = await proxied(_endless_and_silent())
    with caplog.at_level(logging.INFO, logger="codehub.access"):
        reader, writer = await asyncio.open_connection(p.client.host, p.client.port)
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: {p.host}\r\nContent-Length: 0\r\n\r\n".encode())
        got = b""
        if status == 200:
            while len(got) < 100_000:
                got += await asyncio.wait_for(reader.read(65536), 10)
        else:
            await asyncio.sleep(0.3)  # the request is with the upstream
        writer.close()
        await access_line(caplog, path)
        await asyncio.sleep(0.2)  # and no second line
    [line] = [json.loads(r.getMessage()) for r in caplog.records if r.name == "codehub.access"]
    assert (line["method"], line["path"], line["status"]) == (method, path, status), line
    body = got.partition(b"\r\n\r\n")[2]
    assert (line["bytes"] >= len(body) - 1024) if status == 200 else line["bytes"] == 0, (line, len(body))
    assert (line["kind"], line["workspace"], line["port"]) == ("preview", p.workspace, p.port), line



@pytest.mark.parametrize("method", ["GET", "POST"], ids=["fast-lane", "aiohttp-lane"])
async def test_a_bug_after_the_answer_began_is_logged_as_what_went_out(
        proxied: MakeProxied, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """A bug once an answer's head went out (the app's body can no longer be read: a bug put in by hand, as no
    peer can make one) cuts the connection; the line and the count say what the client got — the answer's status
    and the body bytes before the cut — not the 500 page it never saw (aiohttp's lane logged 500, the fast lane
    nothing)."""
    async def large(request: web.Request) -> web.Response:
        return web.Response(body=b"l" * 100_000)  # streamed: past what is read whole

    async def broken(self: object) -> bytes:
        raise RuntimeError("a bug")

    app = web.Application()
    app.router.add_route(method, "/large", large)
    p = await proxied(app)
    monkeypatch.setattr(Response, "read_chunk", broken)
    caplog.set_level(logging.INFO)
    raw = await sent_raw(p, f"{method} /large HTTP/1.1\r\nHost: {p.host}\r\nContent-Length: 0\r\n\r\n".encode())
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw[:200]
    assert len(body) < 100_000, raw[:200]
    assert [r.levelno for r in caplog.records if r.exc_info is not None] == [logging.ERROR]  # the bug, once
    line = await access_line(caplog, "/large")
    assert (line["method"], line["status"], line["bytes"]) == (method, 200, len(body)), line
    text = await p.metrics()
    assert sample(text, "codehub_requests_total", kind="preview", code="2xx") == 1, text
    assert sample(text, "codehub_requests_total", kind="preview", code="5xx") == 0, text

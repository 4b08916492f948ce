"""The access log: one JSON object per request, without query strings (share tokens travel there)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from gateway.accesslog import TARGET, USER, AccessLogger, BufferedLineHandler
from gateway.edge.routing import Kind, Target


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

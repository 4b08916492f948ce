"""The listening sockets: a deep kernel queue even while asyncio accepts a batch a turn, and a worker out of file
descriptors says so once in a while, not with a traceback per failed ``accept``."""

from __future__ import annotations

import asyncio
import errno
import logging
import subprocess
from typing import Any

import pytest

from gateway.server.listener import ACCEPT_BATCH, BACKLOG, QuietAccept, deepen, listening_sockets
from tests.server.conftest import free_port


def _backlog(port: int) -> int:
    """The listen backlog of the socket on ``port``, as ``ss`` shows it (Send-Q of a listening socket)."""
    lines = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return int(lines.split()[2])


async def test_the_kernel_queue_stays_deep_while_asyncio_accepts_a_batch() -> None:
    port = free_port("127.0.0.1")
    [sock] = listening_sockets("127.0.0.1", port, reuse_port=False)
    server = await asyncio.get_running_loop().create_server(asyncio.Protocol, sock=sock, backlog=ACCEPT_BATCH)
    try:
        assert _backlog(port) == ACCEPT_BATCH  # what asyncio's serving set
        deepen([sock])
        assert _backlog(port) == BACKLOG
    finally:
        server.close()
        await server.wait_closed()


def test_out_of_file_descriptors_is_one_warning_now_and_then(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.new_event_loop()
    try:
        handler = QuietAccept()
        out_of_files: dict[str, Any] = {"message": "socket.accept() out of system resource",
                                        "exception": OSError(errno.EMFILE, "Too many open files")}
        with caplog.at_level(logging.WARNING):
            for _ in range(50):
                handler(loop, out_of_files)
        said = [record for record in caplog.records if record.name == "gateway.server.listener"]
        assert len(said) == 1
        assert "Too many open files" in said[0].getMessage()
        assert said[0].exc_info is None  # no traceback
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            handler(loop, {"message": "something else went wrong", "exception": RuntimeError("boom")})
        assert [record.getMessage() for record in caplog.records] == ["something else went wrong"]
    finally:
        loop.close()

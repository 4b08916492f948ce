"""Dev servers with small accept queues behind the gateway: a wake's burst of held requests, and a crowd on a
running workspace, reach them at the pace they accept connections.

Two real upstreams: Python's ``http.server`` (backlog 5, one connection per request) and ``slow_accept.py``
(``listen(1)``, a pause before every accept, keep-alive). A gateway that opened a connection per request at once
would overflow their queues; the kernel then drops handshakes and the requests hang for many seconds or fail.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MakeGateway, next_address
from tests.lifecycle.conftest import PORT, Client, gateway_of, metric_samples, preview, sample
from tests.lifecycle.slow_accept import BODY as SLOW_ACCEPT_BODY

pytestmark = pytest.mark.timeout(120)
SLOW_ACCEPT = Path(__file__).with_name("slow_accept.py")
CROWD = 300
FILE_BODY = b"served by http.server\n"


def http_server(address: str, root: Path) -> dict[str, Any]:
    """``python -m http.server``, as people start it: backlog 5, HTTP/1.0, a connection per request."""
    (root / "hello.txt").write_bytes(FILE_BODY)
    command = [sys.executable, "-m", "http.server", "--bind", "{host}", "--directory", str(root), str(PORT)]
    return {"owner": "alice", "command": command, "address": address, "ports": {PORT: "public"}}


def slow_acceptor(address: str) -> dict[str, Any]:
    command = [sys.executable, str(SLOW_ACCEPT), "--host", "{host}", "--port", str(PORT), "--accept-delay", "0.005"]
    return {"owner": "alice", "command": command, "address": address, "ports": {PORT: "public"}}


async def crowd(client: Client, count: int) -> list[tuple[int, bytes]]:
    """``count`` requests in flight through the gateway at once, each on its own client connection.

    Connections to the gateway are opened at most 100 at a time (its test listener has aiohttp's backlog of
    128); each stays open, its request pending, until answered."""
    assert client.server.port is not None
    address = (str(client.server.host), client.server.port)
    raw = (f"GET /hello.txt HTTP/1.1\r\nHost: {preview('ws')}\r\nAccept: application/json\r\n"
           "Connection: close\r\n\r\n").encode()
    gate = asyncio.Semaphore(100)

    async def one() -> tuple[int, bytes]:
        async with gate:
            reader, writer = await asyncio.open_connection(*address)
            writer.write(raw)
        try:
            head, _, body = (await reader.read()).partition(b"\r\n\r\n")
        finally:
            writer.close()
        return int(head.split(b" ", 2)[1]), body

    return await asyncio.gather(*(one() for _ in range(count)))


async def nothing_pending(client: Client) -> None:
    samples = await metric_samples(client)
    assert sample(samples, "codehub_held_requests") == 0
    assert samples[("codehub_upstream_queued_requests", ())] == 0  # exported, and nothing waits any more


@pytest.mark.parametrize("woken", [True, False], ids=["held-through-a-wake", "running"])
@pytest.mark.parametrize("upstream", ["http.server", "listen(1)"])
async def test_a_crowd_reaches_a_small_accept_queue(make_gateway: MakeGateway, tmp_path: Path, upstream: str,
                                                    woken: bool) -> None:
    address = next_address()
    spec = http_server(address, tmp_path) if upstream == "http.server" else slow_acceptor(address)
    expected = FILE_BODY if upstream == "http.server" else SLOW_ACCEPT_BODY
    client = await make_gateway(workspaces={"ws": spec})
    if not woken:
        answers = await crowd(client, 1)  # woken by one request, so the crowd meets a running workspace
        assert answers == [(200, expected)]

    async with asyncio.timeout(90):
        answers = await crowd(client, CROWD)

    statuses = [status for status, _ in answers]
    assert statuses.count(200) == CROWD, {status: statuses.count(status) for status in set(statuses)}
    assert {body for _, body in answers} == {expected}
    await nothing_pending(client)
    assert gateway_of(client).waker.busy("ws", PORT) is False

"""SIGTERM to a real ``serve`` (one process, and a ``--workers 2`` parent) drains: the listener closes at once,
requests in flight in either lane finish, a request still going at ``timeouts.shutdown`` is cut there,
WebSockets are closed with 1001, requests held on a wake get 503 + ``Retry-After`` at once and waiting pages'
progress streams end (the browser's EventSource reconnects by itself), and the process exits cleanly."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSMsgType

from tests.conftest import next_address
from tests.lifecycle.conftest import slow_workspace
from tests.lifecycle.gateway_process import Gateway, gateways

pytestmark = pytest.mark.timeout(180)
__all__ = ["gateways"]  # the fixture, used by name
SHUTDOWN = 6.0


async def _refused(port: int, gateway: Gateway) -> bool:
    """Whether a new connection is refused while the gateway is still running (draining)."""
    for _ in range(500):
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            return gateway.process.poll() is None
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        await asyncio.sleep(0.01)
    return False


async def _first_line(response: aiohttp.ClientResponse) -> bytes:
    async with asyncio.timeout(30):
        return await response.content.readline()


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_drains(gateways: Callable[..., Gateway], tmp_path: Path, workers: int) -> None:
    gateway = gateways({"up": slow_workspace(next_address(), delay=0),
                        "sleepy": slow_workspace(next_address(), delay=3600)},
                       timeouts={"shutdown": SHUTDOWN}, workers=workers)
    base = f"http://127.0.0.1:{gateway.port}"
    up, sleepy = {"Host": gateway.preview_host("up")}, {"Host": gateway.preview_host("sleepy")}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(),
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        async with session.get(f"{base}/", headers=up) as answer:  # woken by a held request
            assert answer.status == 200
        short_get = await session.get(f"{base}/stream?seconds=3", headers=up)  # the fast lane
        short_post = await session.post(f"{base}/stream?seconds=3", headers=up, data=b"x")  # aiohttp's lane
        endless = await session.get(f"{base}/stream?seconds=3600", headers=up)
        for response in (short_get, short_post, endless):
            assert await _first_line(response) == b"tick\n"
        ws = await session.ws_connect(f"{base}/ws", headers=up)
        await ws.send_str("hello")
        assert (await ws.receive(timeout=30)).data == "echo: hello"
        held = asyncio.ensure_future(session.get(f"{base}/", headers={**sleepy, "Accept": "application/json"}))
        run = tmp_path / "state" / "workspaces" / "sleepy" / "run.json"
        async with asyncio.timeout(30):
            while not run.exists():  # noqa: ASYNC110 - the held request began the wake: it is held on it
                await asyncio.sleep(0.02)
        progress = await session.get(f"{base}/_codehub/wake/events", headers=sleepy)
        assert (await _first_line(progress)).startswith(b"event: progress")

        gateway.process.terminate()

        async with asyncio.timeout(30):
            answer = await held
            assert answer.status == 503
            assert answer.headers["Retry-After"] == "1"
            assert (await answer.json())["error"]["code"] == "gateway-draining"
            closing = await ws.receive()
            assert (closing.type, closing.data) == (WSMsgType.CLOSE, 1001)
            rest = await progress.content.read()
            assert b"event: failed" not in rest
            assert b"event: ready" not in rest
            # all three before the drain's end: a request in flight is still being answered
            assert await _first_line(endless) == b"tick\n"
        assert await _refused(gateway.port, gateway)
        async with asyncio.timeout(30):
            for response in (short_get, short_post):
                assert (await response.content.read()).endswith(b"tick\ndone\n")
            with contextlib.suppress(aiohttp.ClientPayloadError):
                assert not (await endless.content.read()).endswith(b"done\n")
        await ws.close()
    assert await asyncio.to_thread(gateway.process.wait, 60) == 0
    log = gateway.log.read_text()
    assert "Traceback" not in log, log
    assert " ERROR " not in log, log

"""WebSocket load: N connections held open at once through a proxy; handshake and echo latency, memory per
idle connection (the proxy's RSS after all are open and idle, minus before, over N)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import statistics
import time
from dataclasses import dataclass

import aiohttp

from bench.procs import rss_bytes
from bench.servers import Target


@dataclass
class WsResult:
    target: str
    connections: int
    opened: int
    failed: int
    handshake_p50_ms: float
    handshake_p99_ms: float
    echo_p50_ms: float
    echo_p99_ms: float
    rss_before_mb: float | None
    rss_after_mb: float | None
    kb_per_connection: float | None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def run_ws(target: Target, count: int, pids: list[int], *, concurrency: int = 50,
                 idle: float = 2.0) -> WsResult:
    url = f"http://{target.ws_address[0]}:{target.ws_address[1]}{target.ws_path}"
    headers = {"Host": target.ws_host, "Origin": f"http://{target.ws_host}"}  # as a page of that host opens it
    if target.ws_cookie:
        headers["Cookie"] = target.ws_cookie
    connector = aiohttp.TCPConnector(limit=0, use_dns_cache=False)
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session:

        async def connect() -> aiohttp.ClientWebSocketResponse:
            return await session.ws_connect(url, headers=headers, autoping=True, compress=0, max_msg_size=1 << 20)

        for _ in range(10):  # warm-up: pools, code paths, first allocations
            ws = await connect()
            await ws.send_str("warm")
            await ws.receive()
            await ws.close()
        await asyncio.sleep(0.5)
        rss_before = rss_bytes(pids) if pids else None
        gate = asyncio.Semaphore(concurrency)
        handshakes: list[float] = []
        sockets: list[aiohttp.ClientWebSocketResponse] = []
        failed = 0

        async def open_one() -> None:
            nonlocal failed
            async with gate:
                started = time.perf_counter()
                try:
                    ws = await asyncio.wait_for(connect(), 30)
                except (aiohttp.ClientError, TimeoutError, OSError):
                    failed += 1
                    return
                handshakes.append(time.perf_counter() - started)
                sockets.append(ws)

        # The load generator's own collector would pause it for a quarter of a second at a time with 10,000
        # sockets open (a full collection walks every one): its pauses are not the proxy's latency.
        gc.disable()
        try:
            await asyncio.gather(*(open_one() for _ in range(count)))
            echoes: list[float] = []
            payload = "x" * 32

            async def echo(ws: aiohttp.ClientWebSocketResponse) -> None:
                nonlocal failed
                async with gate:
                    started = time.perf_counter()
                    await ws.send_str(payload)
                    message = await asyncio.wait_for(ws.receive(), 30)
                    if message.type is not aiohttp.WSMsgType.TEXT or message.data != payload:
                        failed += 1
                        return
                    echoes.append(time.perf_counter() - started)

            await asyncio.gather(*(echo(ws) for ws in sockets))
            gc.collect()
            await asyncio.sleep(idle)
            rss_after = rss_bytes(pids) if pids else None
        finally:
            gc.enable()
            await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.sleep(0.2)
    per_connection = None
    if rss_before is not None and rss_after is not None and sockets:
        per_connection = (rss_after - rss_before) / len(sockets) / 1024
    return WsResult(
        target=target.name, connections=count, opened=len(sockets), failed=failed,
        handshake_p50_ms=1000 * statistics.median(handshakes) if handshakes else float("nan"),
        handshake_p99_ms=1000 * percentile(handshakes, 99),
        echo_p50_ms=1000 * statistics.median(echoes) if echoes else float("nan"),
        echo_p99_ms=1000 * percentile(echoes, 99),
        rss_before_mb=None if rss_before is None else rss_before / 2**20,
        rss_after_mb=None if rss_after is None else rss_after / 2**20,
        kb_per_connection=per_connection,
    )

"""Gateway memory per idle relayed WebSocket, alone and quickly: a fresh ``gateway serve`` per repeat in front
of bench's echo upstream, N connections opened (one echo each) and left idle, RSS after minus before over N.
``--trace`` also prints the allocation sites still alive per connection (tracemalloc in the gateway process).
``--ticks K`` then also measures the gateway's CPU while they idle through K heartbeat ticks (each tick pings the
silent and asks every WebSocket's grant again), per WebSocket per tick.

    PYTHONPATH=. python -m bench.ws_memory --ws 1000 --repeats 3 [--trace] [--ticks 4]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import sys
import tempfile
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from bench.procs import Proc, Procs, cpu_seconds, free_port, rss_bytes, stop_on_sigterm, wait_for_port
from bench.servers import (
    ROOT,
    Layout,
    SignIn,
    gateway_command,
    gateway_config,
    gateway_target,
    start_echo,
    start_upstream_nginx,
)
from gateway.config import Timeouts


async def _start(procs: Procs, layout: Layout, port: int, trace: Path | None) -> Proc:
    config = gateway_config(layout, "gateway", port)
    module = "bench.traced" if trace else "gateway"
    env = {"PYTHONPATH": str(ROOT)} | ({"BENCH_TRACE_DIR": str(trace)} if trace else {})
    proc = procs.start("gateway", gateway_command(config, module), env=env)
    await wait_for_port("127.0.0.1", port, proc)
    return proc


async def _signal(pid: int, path: Path | None = None) -> None:
    os.kill(pid, signal.SIGUSR1)
    for _ in range(600):
        if path is None or await asyncio.to_thread(path.exists):
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)


TICK_SECONDS = Timeouts().websocket_heartbeat / 2
"""The gateway's heartbeat ticks every half period (its default; the bench's configuration keeps it)."""


async def _measure(procs: Procs, layout: Layout, count: int, trace: Path | None, ticks: int = 0
                   ) -> tuple[float, float | None]:
    """KB per idle WebSocket, and (``ticks``) µs of CPU per WebSocket per heartbeat tick."""
    port = free_port("127.0.0.1")
    proc = await _start(procs, layout, port, trace)
    target = await gateway_target("gateway", layout, SignIn(layout, port))
    url = f"http://{target.ws_address[0]}:{target.ws_address[1]}{target.ws_path}"
    headers = {"Host": target.ws_host, "Origin": f"http://{target.ws_host}"} | (
        {"Cookie": target.ws_cookie} if target.ws_cookie else {})
    connector = aiohttp.TCPConnector(limit=0, use_dns_cache=False)
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    try:
        async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session:
            gate = asyncio.Semaphore(50)

            async def open_one() -> aiohttp.ClientWebSocketResponse:
                async with gate:
                    ws = await session.ws_connect(url, headers=headers, compress=0)
                    await ws.send_str("x" * 32)
                    await ws.receive(timeout=30)
                    return ws

            for ws in [await open_one() for _ in range(20)]:  # warm-up: code paths, pools, first allocations
                await ws.close()
            await asyncio.sleep(0.5)
            if trace:
                await _signal(proc.pid)
            before = rss_bytes([proc.pid])
            sockets = list(await asyncio.gather(*(open_one() for _ in range(count))))
            await asyncio.sleep(2)
            after = rss_bytes([proc.pid])
            if trace:
                await _signal(proc.pid, trace / "snapshot.pickle")
            tick_us = None
            if ticks:  # a window of exactly K tick periods holds K ticks, whatever their phase
                used = cpu_seconds([proc.pid])
                await _idle(sockets, ticks * TICK_SECONDS)
                tick_us = (cpu_seconds([proc.pid]) - used) / ticks / count * 1e6
            await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    finally:
        procs.stop(proc)
    return (after - before) / count / 1024, tick_us


async def _idle(sockets: list[aiohttp.ClientWebSocketResponse], seconds: float) -> None:
    """Leave ``sockets`` idle for ``seconds``, answering the heartbeat's pings as a browser does."""
    async def read(ws: aiohttp.ClientWebSocketResponse) -> None:
        with contextlib.suppress(TimeoutError):
            await ws.receive(timeout=seconds)

    await asyncio.gather(*(read(ws) for ws in sockets))


def _report(path: Path, count: int, top: int) -> None:
    snapshot = tracemalloc.Snapshot.load(str(path))
    total = sum(stat.size for stat in snapshot.statistics("filename"))
    print(f"traced, still alive: {total / count / 1024:.1f} KB per connection; by file, then by line:")
    for stat in snapshot.statistics("filename")[:top]:
        print(f"  {stat.size / count:7.0f} B {stat.count / count:5.1f} obj  {stat.traceback[0].filename}")
    for stat in snapshot.statistics("lineno")[:top]:
        frame = stat.traceback[0]
        print(f"  {stat.size / count:7.0f} B {stat.count / count:5.1f} obj  {frame.filename}:{frame.lineno}")


async def run(args: argparse.Namespace) -> list[float]:
    tmp = Path(tempfile.mkdtemp(prefix="codehub-wsmem-"))
    procs = Procs(logs=tmp)
    layout = Layout(tmp, hold_delay=2.0)
    results: list[float] = []
    try:
        upstream, echo = start_upstream_nginx(procs, layout), start_echo(procs, layout)
        await wait_for_port(layout.up_host, layout.http_port, upstream)
        await wait_for_port(layout.up_host, layout.ws_port, echo)
        if args.trace:  # an extra gateway, left out of the results: tracing roughly doubles its RSS
            traced, _ = await _measure(procs, layout, args.ws, tmp)
            print(f"traced gateway: {traced:.1f} KB per idle WebSocket (RSS, inflated by tracemalloc)")
            _report(tmp / "snapshot.pickle", args.ws, args.top)
        for repeat in range(args.repeats):
            kb, tick_us = await _measure(procs, layout, args.ws, None, args.ticks)
            results.append(kb)
            cpu = "" if tick_us is None else f", {tick_us:.1f} µs of CPU each per heartbeat tick"
            print(f"repeat {repeat}: {kb:.1f} KB per idle WebSocket{cpu}", flush=True)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ws_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--ws", type=int, default=1000, help="idle WebSockets to open (default 1000)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh gateways to measure (default 3)")
    parser.add_argument("--trace", action="store_true", help="first list allocation sites (extra gateway)")
    parser.add_argument("--top", type=int, default=25, help="allocation sites to list with --trace")
    parser.add_argument("--ticks", type=int, default=0,
                        help=f"also measure CPU over this many heartbeat ticks ({TICK_SECONDS:g} s each)")
    args = parser.parse_args(argv)
    stop_on_sigterm()
    results = asyncio.run(run(args))
    if results:
        print(f"median {statistics.median(results):.1f} KB per idle WebSocket over {len(results)} gateways")
    return 0


if __name__ == "__main__":
    sys.exit(main())

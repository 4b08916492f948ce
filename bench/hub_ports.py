"""How soon the hub's live feed shows a dev server: from ``listen()`` on the workspace's address to the
``snapshot`` event on ``/api/v1/hub/events`` that lists the port as listening (and, closed, as gone).

    python -m bench.hub_ports [--rounds 20]

A gateway with one local workspace runs in this process on loopback; the "dev server" is a socket this script
binds on the workspace's own address, so the figure is the feed's latency, not a dev server's start-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from gateway.auth.identity import Identity
from gateway.config import Config
from gateway.server.app import build_app
from gateway.server.context import GATEWAY

ADDRESS = "127.0.9.2"
PORT = 4321


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _until(events: aiohttp.StreamReader, listening: bool) -> float:
    """Read snapshot events until one shows PORT listening (or not listed/listening); the time it came."""
    async for raw in events:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        ports = {p["port"]: p["listening"] for ws in json.loads(line[6:])["workspaces"] for p in ws["ports"]}
        if ports.get(PORT, False) is listening:
            return time.perf_counter()
    raise RuntimeError("the feed ended")


async def measure(rounds: int) -> tuple[list[float], list[float]]:
    port = _free_port()
    with tempfile.TemporaryDirectory() as state:
        config = Config.model_validate({
            "listen": {"host": "127.0.0.1", "port": port},
            "local": {"state_dir": str(Path(state)), "workspaces": {
                "ws1": {"owner": "alice", "address": ADDRESS, "command": ["sleep", "3600"]}}},
        })
        app = build_app(config)
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        appear: list[float] = []
        vanish: list[float] = []
        try:
            gateway = app[GATEWAY]
            _, token = await gateway.auth.store.create_api_token(Identity("alice"), name="bench")
            await gateway.runtime.wake("ws1")
            async with aiohttp.ClientSession() as session, session.get(
                f"http://127.0.0.1:{port}/api/v1/hub/events",
                headers={"Host": f"localhost:{port}", "Authorization": f"Bearer {token}"},
                timeout=aiohttp.ClientTimeout(total=rounds * 10 + 30),
            ) as feed:
                for _ in range(rounds):
                    await asyncio.sleep(random.uniform(0, 1))  # not in step with the feed's looks
                    server = socket.socket()
                    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    server.bind((ADDRESS, PORT))
                    started = time.perf_counter()
                    server.listen()
                    appear.append((await _until(feed.content, True)) - started)
                    await asyncio.sleep(random.uniform(0, 1))
                    started = time.perf_counter()
                    server.close()
                    vanish.append((await _until(feed.content, False)) - started)
        finally:
            await runner.cleanup()
    return appear, vanish


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    appear, vanish = asyncio.run(measure(args.rounds))
    for name, values in (("listening -> shown", appear), ("closed -> gone", vanish)):
        ms = sorted(value * 1000 for value in values)
        print(f"{name}: median {statistics.median(ms):.0f} ms, max {ms[-1]:.0f} ms over {len(ms)} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A workspace app that takes its time: ``python slow_server.py --host H --port P --delay S``.

It records every start (one line appended to ``$STARTS_FILE`` when set), waits ``--delay`` seconds before it
binds, then serves: ``GET /`` → a fixed body, ``POST /echo`` → the request body back, ``GET /stream`` (and
``POST``) → a slow stream of lines, ``GET /ws`` → a WebSocket echo. ``--swap S`` first listens for 0.3 s and
closes, S seconds before the real bind (Vite's check that its port is free). ``--child`` also starts a grandchild
(``sleep``) in the same process group, so tests can see that stopping a workspace stops its whole group.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time

from aiohttp import WSMsgType, web

BODY = "hello from the slow server"


async def index(request: web.Request) -> web.Response:
    return web.Response(text=BODY)


async def echo(request: web.Request) -> web.Response:
    return web.Response(body=await request.read(), content_type="application/octet-stream")


async def stream(request: web.Request) -> web.StreamResponse:
    """``GET /stream?seconds=S``: one line every 0.1 s for S seconds, like a long poll or an SSE feed."""
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await response.prepare(request)
    end = time.monotonic() + float(request.query.get("seconds", "1"))
    while time.monotonic() < end:
        await response.write(b"tick\n")
        await asyncio.sleep(0.1)
    await response.write(b"done\n")
    await response.write_eof()
    return response


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        if message.type is WSMsgType.TEXT:
            await ws.send_str(f"echo: {message.data}")
    return ws


async def main(host: str, port: int, delay: float, swap: float = 0.0) -> None:
    await asyncio.sleep(delay)
    if swap:  # as Vite does: listen briefly to see that the port is free, close, and only then bind for real
        probe = await asyncio.start_server(lambda _reader, writer: writer.close(), host, port)
        await asyncio.sleep(0.3)
        probe.close()
        await probe.wait_closed()
        await asyncio.sleep(swap)
    app = web.Application(client_max_size=64 << 20)
    app.router.add_get("/", index)
    app.router.add_post("/echo", echo)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/stream", stream)
    app.router.add_post("/stream", stream)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=2048).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--child", action="store_true", help="also start a grandchild in the process group")
    parser.add_argument("--swap", type=float, default=0.0,
                        help="first listen for 0.3 s and close, then bind for real this many seconds later")
    args = parser.parse_args()
    starts = os.environ.get("STARTS_FILE")
    if starts:
        with open(starts, "a") as handle:
            handle.write(f"{os.getpid()} {time.time()}\n")
    if args.child:
        subprocess.Popen(["sleep", "3600"])  # a grandchild, on purpose
    print(f"slow server starting on {args.host}:{args.port} after {args.delay}s", file=sys.stderr, flush=True)
    asyncio.run(main(args.host, args.port, args.delay, args.swap))

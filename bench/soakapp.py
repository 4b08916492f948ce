"""The soak's workspace app: ``python -m bench.soakapp --host H --port P``.

``GET /`` → a small page, ``GET /sse?seconds=S`` → one Server-Sent Event every 0.2 s for S seconds, ``GET /ws`` →
a WebSocket echo. The gateway starts it as a workspace command, so sleeping and waking stop and start it.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from aiohttp import WSMsgType, web

PAGE = b"<!doctype html><title>soak</title><p>" + b"s" * 160 + b"</p>\n"


async def index(request: web.Request) -> web.Response:
    return web.Response(body=PAGE, content_type="text/html")


async def sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
    await response.prepare(request)
    end = time.monotonic() + float(request.query.get("seconds", "3"))
    n = 0
    while time.monotonic() < end:
        await response.write(b"event: tick\ndata: %d\n\n" % n)
        n += 1
        await asyncio.sleep(0.2)
    await response.write(b"event: end\ndata: done\n\n")
    await response.write_eof()
    return response


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        if message.type is WSMsgType.TEXT:
            await ws.send_str(message.data)
    return ws


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/sse", sse)
    app.router.add_get("/ws", websocket)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, backlog=1024,
                handler_cancellation=True)


if __name__ == "__main__":
    main()

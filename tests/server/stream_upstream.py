"""A small streaming upstream for the memory tests, run as a workspace's command by the local runtime.

POST /upload counts the body as it streams in and answers with the count and a checksum; GET /download?size=N
streams N bytes; /ws sends ``count`` binary messages of ``size`` bytes as fast as the other side takes them.
Nothing is ever held whole in memory.
"""

from __future__ import annotations

import argparse
import hashlib

from aiohttp import web

CHUNK = 1 << 20
PATTERN = bytes(range(256)) * (CHUNK // 256)


async def upload(request: web.Request) -> web.Response:
    total, digest = 0, hashlib.sha256()
    async for chunk in request.content.iter_any():
        total += len(chunk)
        digest.update(chunk)
    return web.json_response({"bytes": total, "sha256": digest.hexdigest()})


async def download(request: web.Request) -> web.StreamResponse:
    size = int(request.query["size"])
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = size
    await response.prepare(request)
    left = size
    while left:
        piece = PATTERN[: min(left, CHUNK)]
        await response.write(piece)
        left -= len(piece)
    await response.write_eof()
    return response


async def websocket(request: web.Request) -> web.WebSocketResponse:
    count, size = int(request.query["count"]), int(request.query["size"])
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    message = PATTERN[:size]
    for _ in range(count):
        await ws.send_bytes(message)
    await ws.close()
    return ws


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application(client_max_size=0, handler_args={"auto_decompress": False})
    app.router.add_post("/upload", upload)
    app.router.add_get("/download", download)
    app.router.add_get("/ws", websocket)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()

"""The WebSocket upstream: echoes every message back, on any path (``python -m bench.echo --host H --port P``)."""

from __future__ import annotations

import argparse
import asyncio
import gc

from aiohttp import WSMsgType, web


class Echo:
    """The handler, counting the WebSockets open: it collects garbage only when none is (see ``main``)."""

    def __init__(self) -> None:
        self.open = 0

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoping=True, compress=False)
        await ws.prepare(request)
        self.open += 1
        try:
            async for message in ws:
                if message.type is WSMsgType.TEXT:
                    await ws.send_str(message.data)
                elif message.type is WSMsgType.BINARY:
                    await ws.send_bytes(message.data)
        finally:
            self.open -= 1
            if not self.open:  # between measurements: what closed connections left in cycles goes now
                gc.collect()
        return ws


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    # With 10,000 sockets open a full collection stops this upstream for a quarter of a second and more here, which
    # every proxy's echo p99 would then carry: it collects only when no WebSocket is open.
    gc.disable()
    app = web.Application()
    app.router.add_get("/{tail:.*}", Echo())
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, backlog=4096)


if __name__ == "__main__":
    main()

"""A dev server that starts the way Vite does: it first listens on the port to see whether it is free, closes
that listener, and only then binds the real server. Here the probe listener lives until it has accepted exactly
one connection (the gateway's readiness probe), and the real server binds half a second after it is closed."""

from __future__ import annotations

import socket
import sys
import time

from aiohttp import web


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    with socket.create_server((host, port)) as probe:
        connection, _ = probe.accept()
        connection.close()
    time.sleep(0.5)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="served by the real server")

    app = web.Application()
    app.router.add_get("/", hello)
    web.run_app(app, host=host, port=port, print=None, access_log=None)


if __name__ == "__main__":
    main()

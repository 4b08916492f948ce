"""The least a proxy can be: bytes copied between a client connection and one upstream connection of its own, on
uvloop, nothing read or decided. In the page-load part it shows what one more hop costs a browser by itself (on
loopback, on cores shared with the browser and the dev server), apart from what a proxy does per request.

    python -m bench.relay PORT UPSTREAM_HOST UPSTREAM_PORT      # listens on 127.0.0.1:PORT
"""

from __future__ import annotations

import asyncio
import socket
import sys

import uvloop


class _End(asyncio.Protocol):
    """One side of a relayed pair: what it reads goes to the other side, and its end closes the other."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _End | None = None
        self.early: list[bytes] = []  # what the client sent before the upstream connection was up

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.write(data)
        else:
            self.early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()


class _Client(_End):
    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__()
        self._upstream = upstream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        upstream = _End()
        upstream.other = self
        try:
            await asyncio.get_running_loop().create_connection(lambda: upstream, *self._upstream)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        if self.transport is None:  # the client left meanwhile
            if upstream.transport is not None:
                upstream.transport.close()
            return
        self.other = upstream
        for data in self.early:
            self.data_received(data)
        self.early.clear()


async def _serve(port: int, upstream: tuple[str, int]) -> None:
    server = await asyncio.get_running_loop().create_server(lambda: _Client(upstream), "127.0.0.1", port)
    await server.serve_forever()


def main() -> None:
    port, host, upstream_port = sys.argv[1:4]
    uvloop.run(_serve(int(port), (host, int(upstream_port))))


if __name__ == "__main__":
    main()

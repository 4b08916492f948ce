"""The listening sockets and what a worker's file descriptors allow: never out of them because of clients.

asyncio accepts as many connections per loop turn as the listen backlog, and the gateway's backlog is deep (4096,
so a thousand clients connecting at once are not dropped): one burst could take thousands of descriptors before
any connection was refused, and when ``accept`` fails with EMFILE asyncio logs an ERROR with a traceback for every
failed call, up to the backlog's count each turn. So the kernel keeps the deep queue (``BACKLOG``) while asyncio
takes ``ACCEPT_BATCH`` a turn; the connection limit (``connection_limit``) leaves room for a batch, for refused
connections lingering over their 503, and for the rest of the process; and should ``accept`` still run out (the
limit set too high, or descriptors used elsewhere), that is one WARNING at most every ``QUIET_FOR`` seconds while
asyncio pauses accepting for a second, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
from typing import Any

from gateway.server.refusals import MOST_LINGERING

log = logging.getLogger(__name__)
BACKLOG = 4096
"""The kernel's queue of connections not yet accepted: aiohttp's default (128) drops SYNs when a thousand clients
connect at once."""
ACCEPT_BATCH = 64
"""Connections asyncio accepts per loop turn (it takes its listen backlog argument for this count)."""
FD_RESERVE = 64
"""File descriptors kept for everything that is not a client connection or its upstream (listeners, logs, the
Kubernetes API, state files)."""
QUIET_FOR = 10.0
_OUT_OF_FILES = "socket.accept() out of system resource"


def connection_limit(configured: int | None) -> int:
    """Client connections one worker takes: as configured, else what the open-file limit leaves after an accept
    batch, the refused connections still lingering and a reserve, halved: a proxied connection may hold a second
    descriptor upstream (a WebSocket always does; a request to a dev server that closes its connections opens a
    fresh one each time)."""
    if configured is not None:
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, (soft - ACCEPT_BATCH - MOST_LINGERING - FD_RESERVE) // 2)


def listening_sockets(host: str, port: int, *, reuse_port: bool) -> list[socket.socket]:
    """Bound, non-blocking sockets for every address ``host`` names (``localhost``: IPv4 and IPv6), as
    ``loop.create_server`` would bind them, listening with ``BACKLOG``."""
    sockets: list[socket.socket] = []
    seen: set[tuple[Any, ...]] = set()
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                  flags=socket.AI_PASSIVE):
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def deepen(sockets: list[socket.socket]) -> None:
    """Back to ``BACKLOG`` after asyncio called ``listen(ACCEPT_BATCH)`` on starting to serve (Linux lets a
    listening socket's backlog be changed; asyncio keeps its batch)."""
    for sock in sockets:
        sock.listen(BACKLOG)


class QuietAccept:
    """The loop's exception handler: EMFILE (and its kin) on ``accept`` is a short WARNING now and then, not a
    traceback per failed call; everything else goes to asyncio's default handler."""

    def __init__(self) -> None:
        self._said_at: float | None = None

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if context.get("message") != _OUT_OF_FILES or not isinstance(error, OSError):
            loop.default_exception_handler(context)
            return
        now = loop.time()
        if self._said_at is None or now - self._said_at >= QUIET_FOR:
            self._said_at = now
            log.warning("accept: %s; new connections wait a second (lower limits.connections or raise the "
                        "open-file limit)", error.strerror)

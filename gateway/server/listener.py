"""The listening sockets, and taking connections off them: never out of file descriptors because of clients, and
a burst of new clients never waiting behind a busy loop.

The kernel keeps a deep queue (``BACKLOG``: a thousand clients connecting at once are not dropped) and the
``Acceptor`` takes ``ACCEPT_BATCH`` of them each time the socket is ready, on any event loop. The loops' own
servers do neither: uvloop's (libuv since 1.45) accepts one connection per loop turn, so with turns of 20 ms under
load a burst of a thousand drained from the kernel's queue at 50 a second and some clients waited over 5 s for
their first byte; asyncio's takes as many per turn as its listen backlog, and logs a traceback for every failed
``accept`` when out of descriptors. The connection limit (``connection_limit``) leaves room for a batch, for
refused connections lingering over their 503, and for the rest of the process; should ``accept`` still fail (the
limit set too high, or descriptors used elsewhere), that is one WARNING at most every ``QUIET_FOR`` seconds while
accepting pauses for ``PAUSE`` seconds, never a traceback.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
from collections.abc import Callable
from typing import Any

from gateway.server.refusals import MOST_LINGERING

log = logging.getLogger(__name__)
BACKLOG = 4096
"""The kernel's queue of connections not yet accepted: aiohttp's default (128) drops SYNs when a thousand clients
connect at once."""
ACCEPT_BATCH = 64
"""Connections accepted each time a listening socket is ready: enough that a burst drains in a few loop turns, few
enough that the connections already open are served between batches."""
FD_RESERVE = 64
"""File descriptors kept for everything that is not a client connection or its upstream (listeners, logs, the
Kubernetes API, state files)."""
QUIET_FOR = 10.0
PAUSE = 1.0
"""Seconds accepting waits after ``accept`` failed: descriptors free up as connections end."""
_ONE_FAILED = frozenset({errno.ENETDOWN, errno.EPROTO, errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET,
                         errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH, errno.EPERM})
"""``accept`` errors that are one pending connection's (a network error, a firewall's refusal: accept(2) on
Linux): the next connection in the queue is taken at once."""


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


class Acceptor:
    """Accepts up to ``ACCEPT_BATCH`` connections each time ``sock`` is ready, and sets each up with ``factory``'s
    protocol through the running loop's ``connect_accepted_socket``."""

    def __init__(self, sock: socket.socket, factory: Callable[[], asyncio.BaseProtocol]) -> None:
        self._sock = sock
        self._factory = factory
        self._loop = asyncio.get_running_loop()
        self._setting_up: set[asyncio.Task[None]] = set()
        self._said_at: float | None = None
        self._resume: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._resume = None
        self._loop.add_reader(self._sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while queued
            except OSError as error:
                if error.errno in _ONE_FAILED:
                    continue
                self._pause(error)  # EMFILE and its kin, or anything unforeseen: never a busy loop of failures
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._set_up(conn))
            self._setting_up.add(task)
            task.add_done_callback(self._setting_up.discard)

    async def _set_up(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)
        except OSError:
            conn.close()  # reset before it was set up

    def _pause(self, error: OSError) -> None:
        now = self._loop.time()
        if self._said_at is None or now - self._said_at >= QUIET_FOR:
            self._said_at = now
            log.warning("accept: %s; new connections wait %g s (lower limits.connections or raise the "
                        "open-file limit)", error.strerror, PAUSE)
        self._loop.remove_reader(self._sock.fileno())
        self._resume = self._loop.call_later(PAUSE, self.start)

    def close(self) -> None:
        """No more connections: the socket closes; those being set up carry on."""
        if self._resume is not None:
            self._resume.cancel()
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

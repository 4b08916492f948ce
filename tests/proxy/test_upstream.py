"""Where an upstream is (``Upstream``), and retrying refused connects (``ConnectGrace``) alone: which failures are
worth another try, and for how long."""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl

import pytest

from gateway.proxy.headers import rewrite_location
from gateway.proxy.upstream import ConnectGrace, Upstream

PUBLIC = "http://3000-ws1.localhost:8080"


@pytest.mark.parametrize(("host", "tls", "location"), [
    ("10.0.0.5", False, "http://10.0.0.5:3000/next"),
    ("fd00::5", False, "http://[fd00::5]:3000/next"),  # a pod's address on an IPv6 cluster
    ("fd00::5", True, "https://[fd00::5]:3000/next"),
    ("127.0.0.2", False, "http://localhost:3000/next"),
])
def test_a_redirect_that_names_the_upstream_is_pointed_at_the_public_host(host: str, tls: bool,
                                                                          location: str) -> None:
    """An app that redirects to the address it was reached at: an IPv6 one is written in brackets, as in any URL."""
    upstream = Upstream("ws1", host, 3000, PUBLIC, tls)
    assert rewrite_location(location, upstream.origins, PUBLIC) == PUBLIC + "/next"


async def test_a_refused_connect_is_tried_again_within_the_grace() -> None:
    grace = ConnectGrace(5)
    assert await grace.again(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
    assert await grace.again(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))


async def test_a_tls_handshake_that_a_probe_listener_dropped_is_tried_again() -> None:
    """A port marked HTTPS behind Vite, just woken: its probe listener accepts the connect and closes it, and over
    TLS that happens inside the connect (a plain connect succeeds, and its request comes back unanswered, which is
    retried too). Seen as a 502 "port-not-listening" on the first, waking request to an HTTPS dev server."""
    loop = asyncio.get_running_loop()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)

    async def drop() -> None:
        accepted, _ = await loop.sock_accept(listener)
        accepted.close()

    dropping = asyncio.create_task(drop())
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with pytest.raises(ConnectionResetError) as failed:
            async with asyncio.timeout(10):
                await asyncio.open_connection(*listener.getsockname(), ssl=context)
        await dropping
    finally:
        listener.close()
    assert await ConnectGrace(5).again(failed.value)


@pytest.mark.parametrize("error", [errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT, errno.EADDRNOTAVAIL, None])
async def test_other_connect_failures_are_not_tried_again(error: int | None) -> None:
    """Only a refused connect is the gap of a dev server that is still binding its port; others are final."""
    assert not await ConnectGrace(5).again(OSError(error, "no") if error is not None else OSError("no errno"))


async def test_a_spent_grace_tries_no_more() -> None:
    grace = ConnectGrace(0)
    assert not await grace.again(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
    assert not await grace.wait()


async def test_the_tries_back_off_so_a_grace_is_a_few_of_them() -> None:
    """Each wait is twice the last (up to a quarter second): half a second of grace is a handful of tries, not
    as many connects as the loop can make."""
    grace = ConnectGrace(0.5)
    tries = 0
    while await grace.wait():
        tries += 1
    assert 1 <= tries <= 10

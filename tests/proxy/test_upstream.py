"""Where an upstream is (``Upstream``), and retrying refused connects (``ConnectGrace``) alone: which failures are
worth another try, and for how long."""

from __future__ import annotations

import errno

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

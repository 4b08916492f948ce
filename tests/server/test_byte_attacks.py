"""Byte-level attacks on both sides of the proxy (a client on the internet, a hostile workspace app on its raw
socket) that earlier passes (``test_parse_attacks``, ``test_request_attacks``, ``test_upstream_faults``) left:
each test shows the harm on a real gateway in front of real sockets on loopback."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from multidict import CIMultiDict

from gateway.auth.identity import Identity
from gateway.proxy.pool import MOST_QUIET_UPSTREAMS, ConnectFailed, UpstreamPool
from gateway.server.context import GATEWAY
from tests.conftest import MakeGateway, MakeUpstream, next_address, workspace
from tests.server.conftest import OWNER, PREVIEW_DOMAIN, WORKSPACE


async def test_an_owner_cannot_grow_the_pool_with_a_request_per_port_number(make_gateway: MakeGateway) -> None:
    """The pool knows each upstream it was asked for (address, port) by its line and window of connects, ~2 KB
    each, and knew it for good: a workspace's owner, who may reach every port of their own workspace, sent one
    request to each of its 65,535 port numbers (nothing need listen: a refused connect is remembered too) and
    the gateway's worker kept 128 MB it never gave back — again at each wake on Kubernetes, where a workspace
    wakes on a new address — until the worker, every visitor's, ran out of memory. Upstreams with nothing in
    flight, kept alive or waiting are forgotten past a bound."""
    address = next_address()
    client = await make_gateway(workspaces={WORKSPACE: workspace(address)}, in_memory=True)
    gateway = client.app[GATEWAY]
    await gateway.runtime.wake(WORKSPACE)
    ports = range(20000, 20000 + 2 * MOST_QUIET_UPSTREAMS)  # nothing listens on the workspace's own address
    statuses = []
    for port in ports:
        host = f"{port}-{WORKSPACE}.{PREVIEW_DOMAIN}"
        cookie = f"codehub_session={gateway.auth.sessions.issue(Identity(OWNER), host)}"
        async with client.get("/", headers={"Host": host, "Cookie": cookie, "Accept": "application/json"},
                              allow_redirects=False) as response:
            statuses.append(response.status)
    assert set(statuses) == {502}  # nothing listens on them: the owner's requests went all the way to the pool
    assert len(gateway.pool._upstreams) <= MOST_QUIET_UPSTREAMS


async def test_upstreams_in_use_are_never_forgotten(make_upstream: MakeUpstream) -> None:
    """What is forgotten is quiet: a request in flight while thousands of other upstreams come and go still gives
    its kept-alive connection back, and the next request takes it."""
    arrived, release = asyncio.Event(), asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", held)
    address = next_address()
    server = await make_upstream(app, address, 0)
    assert server.port is not None
    pool = UpstreamPool(connect_timeout=5, first_byte_timeout=10, read_timeout=10, queue_timeout=10)
    try:
        in_flight = asyncio.ensure_future(pool.request(address, server.port, "GET", "/", CIMultiDict(Host="x"), None))
        async with asyncio.timeout(10):
            await arrived.wait()
        nowhere = next_address()
        for port in range(20000, 20000 + 2 * MOST_QUIET_UPSTREAMS):
            with pytest.raises(ConnectFailed):
                await pool.request(nowhere, port, "GET", "/", CIMultiDict(Host="x"), None)
        release.set()
        answer, exchange = await in_flight
        assert await answer.read_exactly(2) == b"ok"
        exchange.close()
        assert pool.connections() == (1, 0)  # kept alive, with the upstream it belongs to
        answer, exchange = await pool.request(address, server.port, "GET", "/", CIMultiDict(Host="x"), None)
        assert await answer.read_exactly(2) == b"ok"
        exchange.close()
        assert pool.connections() == (1, 0)
        assert len(pool._upstreams) <= MOST_QUIET_UPSTREAMS
    finally:
        pool.close()

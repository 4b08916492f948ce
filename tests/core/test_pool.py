"""The upstream pool's limit: requests past ``limit`` to one upstream wait their turn instead of opening more
connections, and every one of them is answered."""

from __future__ import annotations

import asyncio

from aiohttp import web
from multidict import CIMultiDict

from gateway.proxy.pacing import Turns
from gateway.proxy.pool import UpstreamPool
from tests.conftest import MakeUpstream, next_address


async def test_requests_past_the_limit_wait_for_a_turn(make_upstream: MakeUpstream) -> None:
    in_flight = 0
    most = 0
    peers: set[tuple[str, int]] = set()

    async def slow(request: web.Request) -> web.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        peers.add(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        await asyncio.sleep(0.05)
        in_flight -= 1
        return web.Response(text=request.path)

    app = web.Application()
    app.router.add_get("/{n}", slow)
    address = next_address()
    server = await make_upstream(app, address, 0)
    port = server.port
    assert port is not None
    pool = UpstreamPool(connect_timeout=5, first_byte_timeout=10, read_timeout=10, queue_timeout=30, limit=3)

    async def one(n: int) -> str:
        answer, exchange = await pool.request(address, port, "GET", f"/{n}", CIMultiDict(Host="x"), None)
        try:
            length = answer.content_length
            assert length is not None
            return (await answer.read_exactly(length)).decode()
        finally:
            exchange.close()

    try:
        async with asyncio.timeout(20):
            answers = await asyncio.gather(*(one(n) for n in range(20)))
    finally:
        pool.close()
    assert answers == [f"/{n}" for n in range(20)]
    assert most == 3
    assert len(peers) == 3  # connections are reused by the requests that waited


async def test_a_cancelled_wait_gives_its_turn_back(make_upstream: MakeUpstream) -> None:
    release = asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", held)
    address = next_address()
    server = await make_upstream(app, address, 0)
    assert server.port is not None
    pool = UpstreamPool(connect_timeout=5, first_byte_timeout=10, read_timeout=10, queue_timeout=30, limit=1)
    try:
        first = asyncio.ensure_future(pool.request(address, server.port, "GET", "/", CIMultiDict(Host="x"), None))
        await asyncio.sleep(0.1)
        waiting = asyncio.ensure_future(pool.request(address, server.port, "GET", "/", CIMultiDict(Host="x"), None))
        await asyncio.sleep(0.1)
        waiting.cancel()
        release.set()
        _answer, exchange = await asyncio.wait_for(first, 10)
        exchange.close()
        async with asyncio.timeout(10):  # the cancelled waiter did not keep the only turn
            _answer, again = await pool.request(address, server.port, "GET", "/", CIMultiDict(Host="x"), None)
        again.close()
    finally:
        pool.close()


async def test_turns_are_first_come_first_served_and_survive_cancellation() -> None:
    turns = Turns(1)
    await turns.take()
    order: list[int] = []

    async def wait(n: int) -> None:
        await turns.take()
        order.append(n)

    waiters = [asyncio.ensure_future(wait(n)) for n in range(4)]
    await asyncio.sleep(0)
    waiters[1].cancel()  # still queued: skipped
    turns.give()  # to waiter 0
    await asyncio.sleep(0)
    turns.give()  # waiter 1 is gone: to waiter 2
    waiters[3].cancel()
    await asyncio.sleep(0)
    turns.give()  # waiter 3 is gone, nobody waits: the turn is free again
    await asyncio.gather(*waiters, return_exceptions=True)
    assert order == [0, 2]
    async with asyncio.timeout(1):
        await turns.take()

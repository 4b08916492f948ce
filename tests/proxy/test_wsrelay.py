"""The relay's heartbeat, tick by tick: the test ticks the client's end itself (the shared heartbeat's own timer is an
hour away), on real sockets, so which tick pings and which gives up is exact, with no clock in the test."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from gateway.proxy.heartbeat import Heartbeat
from gateway.proxy.wsframes import CLOSE, PING, PONG, frame
from gateway.proxy.wsrelay import _GIVE_UP_AT, _PING_AT, HEARTBEAT_PAYLOAD, POLICY_VIOLATION, Relay

pytestmark = pytest.mark.timeout(30)


@dataclass
class Ends:
    relay: Relay
    browser: socket.socket
    app: socket.socket
    grant: list[bool]

    async def received(self, sock: socket.socket) -> bytes:
        """The next bytes that reach ``sock`` (b"" once the gateway closed it)."""
        async with asyncio.timeout(10):
            return await asyncio.get_running_loop().sock_recv(sock, 1 << 16)

    async def nothing_came(self, sock: socket.socket) -> bool:
        """Whether nothing reached ``sock`` within a moment (the gateway writes in the tick that decides it)."""
        try:
            async with asyncio.timeout(0.2):
                await asyncio.get_running_loop().sock_recv(sock, 1 << 16)
        except TimeoutError:
            return True
        return False

    async def ticks(self, count: int) -> None:
        for _ in range(count):
            self.relay.client.tick()
            await asyncio.sleep(0)


@pytest.fixture
async def ends() -> AsyncIterator[Ends]:
    loop = asyncio.get_running_loop()
    browser, client_side = socket.socketpair()
    app, upstream_side = socket.socketpair()
    for sock in (browser, app):
        sock.setblocking(False)
    client, previous = await loop.connect_accepted_socket(asyncio.Protocol, client_side)
    upstream, _ = await loop.connect_accepted_socket(asyncio.Protocol, upstream_side)
    grant = [True]
    relay = Relay(client, upstream, max_message=1 << 20, heartbeat=Heartbeat(3600.0), client_protocol=previous,
                  granted=lambda: grant[0])
    relay.start(b"", b"")
    try:
        yield Ends(relay, browser, app, grant)
    finally:
        relay.end(1001)
        browser.close()
        app.close()


def _from_browser(opcode: int, payload: bytes) -> bytes:
    return frame(opcode, payload, mask=os.urandom(4))


async def test_a_silent_client_is_pinged_on_the_ping_tick_and_dropped_on_the_last(ends: Ends) -> None:
    await ends.ticks(_PING_AT - 1)
    assert await ends.nothing_came(ends.browser)
    await ends.ticks(1)
    assert await ends.received(ends.browser) == frame(PING, HEARTBEAT_PAYLOAD)
    await ends.ticks(_GIVE_UP_AT - _PING_AT - 1)
    assert not ends.relay.client.transport.is_closing()
    await ends.ticks(1)
    assert ends.relay.client.transport.is_closing()  # no pong: aborted, its buffers will never drain
    assert ends.relay.done.done()


@pytest.mark.parametrize("after", range(1, _GIVE_UP_AT))
async def test_anything_from_the_client_starts_its_silence_over(ends: Ends, after: int) -> None:
    """Its pong to the gateway's ping, swallowed (the app never asked for it), as any frame would."""
    await ends.ticks(after)
    ends.browser.send(_from_browser(PONG, HEARTBEAT_PAYLOAD))
    async with asyncio.timeout(10):
        while ends.relay.client.idle:  # noqa: ASYNC110 - the relay reads it in a transport callback: nothing to wait on
            await asyncio.sleep(0.005)
    if after >= _PING_AT:  # its tick came before the pong
        assert await ends.received(ends.browser) == frame(PING, HEARTBEAT_PAYLOAD)
    await ends.ticks(_PING_AT - 1)
    assert await ends.nothing_came(ends.browser)
    await ends.ticks(1)
    assert await ends.received(ends.browser) == frame(PING, HEARTBEAT_PAYLOAD)
    assert not ends.relay.client.transport.is_closing()
    assert await ends.nothing_came(ends.app), "the pong to the gateway's ping went upstream"


async def test_a_grant_that_no_longer_holds_closes_both_ends_with_1008_on_the_next_tick(ends: Ends) -> None:
    await ends.ticks(1)
    ends.grant[0] = False
    assert await ends.nothing_came(ends.browser)
    await ends.ticks(1)
    policy = struct.pack("!H", POLICY_VIOLATION)
    assert await ends.received(ends.browser) == frame(CLOSE, policy)
    to_app = await ends.received(ends.app)  # masked, as a client's frames are
    assert (to_app[0], to_app[1]) == (0x80 | CLOSE, 0x80 | len(policy))
    mask = to_app[2:6]
    assert bytes(byte ^ mask[i % 4] for i, byte in enumerate(to_app[6:])) == policy
    assert ends.relay.done.done()

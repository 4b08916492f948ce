"""The relay's heartbeat, tick by tick: the test ticks the client's end itself (the shared heartbeat's own timer is an
hour away), on real sockets, so which tick pings and which gives up is exact, with no clock in the test."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.proxy.heartbeat import Heartbeat
from gateway.proxy.wsframes import CLOSE, PING, PONG, frame
from gateway.proxy.wsrelay import _GIVE_UP_AT, _PING_AT, HEARTBEAT_PAYLOAD, POLICY_VIOLATION, Relay
from tests.server.test_https_upstream import self_signed

pytestmark = pytest.mark.timeout(30)
BINARY = 0x2


@dataclass
class Ends:
    relay: Relay
    browser: socket.socket
    app: socket.socket
    grant: list[bool]
    heartbeat: Heartbeat

    async def received(self, sock: socket.socket) -> bytes:
        """The next bytes that reach ``sock`` (b"" once the gateway closed it)."""
        async with asyncio.timeout(10):
            return await asyncio.get_running_loop().sock_recv(sock, 1 << 16)

    async def received_exactly(self, sock: socket.socket, size: int) -> bytes:
        """The next ``size`` bytes that reach ``sock`` (fewer only if the gateway closed it first)."""
        data = b""
        while len(data) < size and (more := await self.received(sock)):
            data += more
        return data

    async def received_to_the_end(self, sock: socket.socket) -> bytes:
        """All that reaches ``sock`` until the gateway closes it."""
        data = b""
        while more := await self.received(sock):
            data += more
        return data

    async def send(self, sock: socket.socket, data: bytes) -> None:
        async with asyncio.timeout(10):
            await asyncio.get_running_loop().sock_sendall(sock, data)

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
async def unstarted() -> AsyncIterator[Ends]:
    """Both ends' transports (on socket pairs: the browser's and the app's sockets are the test's) and a relay that
    has not taken them over yet."""
    loop = asyncio.get_running_loop()
    browser, client_side = socket.socketpair()
    app, upstream_side = socket.socketpair()
    for sock in (browser, app):
        sock.setblocking(False)
    client, previous = await loop.connect_accepted_socket(asyncio.Protocol, client_side)
    upstream, _ = await loop.connect_accepted_socket(asyncio.Protocol, upstream_side)
    grant = [True]
    heartbeat = Heartbeat(3600.0)
    relay = Relay(client, upstream, max_message=1 << 20, heartbeat=heartbeat, client_protocol=previous,
                  granted=lambda: grant[0])
    try:
        yield Ends(relay, browser, app, grant, heartbeat)
    finally:
        relay.end(1001)
        browser.close()
        app.close()


@pytest.fixture
async def ends(unstarted: Ends) -> Ends:
    unstarted.relay.start(b"", b"")
    return unstarted


def _from_browser(opcode: int, payload: bytes) -> bytes:
    return frame(opcode, payload, mask=os.urandom(4))


async def test_a_silent_client_is_pinged_on_its_third_silent_tick_and_dropped_on_the_fourth(ends: Ends) -> None:
    """Ticks are half a heartbeat period apart: the third after the client's last frame is the first a whole period
    after it (the heartbeat pings after a period of silence), and the pong is due by the next one."""
    await ends.ticks(2)
    assert await ends.nothing_came(ends.browser)
    await ends.ticks(1)
    assert await ends.received(ends.browser) == frame(PING, HEARTBEAT_PAYLOAD)
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


def _frames_to_the_app(data: bytes) -> list[tuple[int, bytes]]:
    """The (opcode, unmasked payload) of each whole masked frame in ``data``, as the app reads them."""
    frames: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        opcode, length, pos = data[pos] & 0x0F, data[pos + 1] & 0x7F, pos + 2
        assert data[pos - 1] & 0x80, "frames to the app are masked"
        if length >= 126:
            size = 2 if length == 126 else 8
            length, pos = int.from_bytes(data[pos:pos + size], "big"), pos + size
        mask, pos = data[pos:pos + 4], pos + 4
        assert pos + length <= len(data), "a frame cut short"
        frames.append((opcode, bytes(byte ^ mask[i % 4] for i, byte in enumerate(data[pos:pos + length]))))
        pos += length
    return frames


LONG = 4096
"""The payload of a binary frame that passes in pieces."""
LONG_HEAD = struct.pack("!BBH", 0x80 | BINARY, 126, LONG)
PIECE = b"m" * 100


async def test_no_ping_goes_into_a_message_half_way_to_the_client(ends: Ends) -> None:
    """A client may say nothing while a long message reaches it piece by piece: as long as a piece comes between
    ticks it is not dropped, and the ping waits for the first tick after the message passed (in its middle it would
    be read as payload)."""
    await ends.send(ends.app, LONG_HEAD + PIECE)
    assert await ends.received_exactly(ends.browser, len(LONG_HEAD + PIECE)) == LONG_HEAD + PIECE
    for _ in range(7):  # more ticks than drop a client that is sent nothing
        await ends.send(ends.app, PIECE)
        assert await ends.received_exactly(ends.browser, len(PIECE)) == PIECE
        await ends.ticks(1)
        assert not ends.relay.client.transport.is_closing()
    rest = b"m" * (LONG - 8 * len(PIECE))
    await ends.send(ends.app, rest)
    assert await ends.received_exactly(ends.browser, len(rest)) == rest
    await ends.ticks(1)
    assert await ends.received(ends.browser) == frame(PING, HEARTBEAT_PAYLOAD)
    assert not ends.relay.client.transport.is_closing()


CLOSE_1000 = struct.pack("!BBH", 0x80 | CLOSE, 2, 1000)


@pytest.mark.parametrize("why", ["a message stalled half way to it", "a close frame went its way"])
async def test_a_silent_client_that_may_not_be_pinged_is_still_dropped_on_the_fourth_tick(ends: Ends,
                                                                                          why: str) -> None:
    """No ping goes into a message that stopped coming, nor after a close frame (the client should answer that):
    a client that says nothing has until the fourth tick all the same, even when the close frame passed just
    before the tick that would have pinged."""
    if why == "a message stalled half way to it":
        await ends.send(ends.app, LONG_HEAD + PIECE)
        assert await ends.received_exactly(ends.browser, len(LONG_HEAD + PIECE)) == LONG_HEAD + PIECE
        await ends.ticks(2)
    else:
        await ends.ticks(2)
        await ends.send(ends.app, CLOSE_1000)
        assert await ends.received_exactly(ends.browser, len(CLOSE_1000)) == CLOSE_1000
    await ends.ticks(1)
    assert await ends.nothing_came(ends.browser)
    assert not ends.relay.client.transport.is_closing()
    await ends.ticks(1)
    assert ends.relay.client.transport.is_closing()
    assert ends.relay.done.done()


@pytest.mark.parametrize("half_way_to", ["browser", "app"])
async def test_the_gateways_close_frame_never_goes_into_a_frame_half_way_to_an_end(ends: Ends,
                                                                                   half_way_to: str) -> None:
    """A grant that no longer holds closes both ends with 1008, but an end a data frame is half way to would read
    the close frame as payload: its connection just ends after the half frame. The other end is told 1008."""
    policy = struct.pack("!H", POLICY_VIOLATION)
    if half_way_to == "browser":
        sent, receiver, other = LONG_HEAD + PIECE, ends.browser, ends.app
        await ends.send(ends.app, sent)
    else:
        mask = os.urandom(4)
        sent = struct.pack("!BBH", 0x80 | BINARY, 0x80 | 126, LONG) + mask + bytes(
            byte ^ mask[i % 4] for i, byte in enumerate(PIECE))
        receiver, other = ends.app, ends.browser
        await ends.send(ends.browser, sent)
    assert await ends.received_exactly(receiver, len(sent)) == sent
    ends.grant[0] = False
    await ends.ticks(1)
    assert await ends.received_to_the_end(receiver) == b""
    told = await ends.received_to_the_end(other)
    if other is ends.browser:
        assert told == frame(CLOSE, policy)
    else:
        assert _frames_to_the_app(told) == [(CLOSE, policy)]


async def test_an_upstream_that_reads_slowly_gets_one_close_frame(ends: Ends) -> None:
    """The gateway's 1008 is still in the write buffer to the app (it reads slowly) when the client's connection
    ends: that end is gone, but the app was told already and is told nothing more (no 1001 behind the 1008: a
    close frame is an endpoint's last)."""
    data = b"d" * 100
    async with asyncio.timeout(10):
        while not ends.relay.upstream.transport.get_write_buffer_size():  # the kernel's buffer to the app is full
            await ends.send(ends.browser, frame(BINARY, data, mask=os.urandom(4)) * 80)
        while ends.relay.client.frames.mid_frame:  # noqa: ASYNC110 - the relay reads in a transport callback
            await asyncio.sleep(0.005)
    ends.grant[0] = False
    await ends.ticks(1)
    assert await ends.received(ends.browser) == frame(CLOSE, struct.pack("!H", POLICY_VIOLATION))
    frames = _frames_to_the_app(await ends.received_to_the_end(ends.app))
    assert len(frames) > 1
    assert frames == [(BINARY, data)] * (len(frames) - 1) + [(CLOSE, struct.pack("!H", POLICY_VIOLATION))]


@pytest.mark.parametrize(("gone", "told"), [("client", 1001), ("upstream", 1011)])
async def test_an_end_closed_before_the_relay_took_over_ends_the_relay(unstarted: Ends, gone: str, told: int) -> None:
    """Its ``connection_lost`` went to the protocol it had before, so the relay learns of it as it starts: the other
    end is told what it is told when that end vanishes later (1001 going away for the client, 1011 for the
    upstream) and closed, and the relay is over."""
    relay = unstarted.relay
    (relay.client if gone == "client" else relay.upstream).transport.close()
    for _ in range(2):
        await asyncio.sleep(0)  # its connection_lost runs, on the protocol it had before
    relay.start(b"", b"")
    code = struct.pack("!H", told)
    if gone == "client":
        assert _frames_to_the_app(await unstarted.received_to_the_end(unstarted.app)) == [(CLOSE, code)]
    else:
        assert await unstarted.received_to_the_end(unstarted.browser) == frame(CLOSE, code)
    assert relay.done.done()


async def test_a_relay_the_gateway_ends_is_over_though_neither_end_takes_its_close(ends: Ends) -> None:
    """Both peers stopped reading, so the gateway's close frames wait behind data in write buffers that may never
    drain: the relay is over all the same (its lane stops counting the WebSocket and its workspace in use, and writes
    its access line), not only once the connections are gone."""
    async with asyncio.timeout(10):
        while not ends.relay.client.transport.get_write_buffer_size():
            await ends.send(ends.app, frame(BINARY, b"u" * 100) * 80)
        while not ends.relay.upstream.transport.get_write_buffer_size():
            await ends.send(ends.browser, frame(BINARY, b"c" * 100, mask=os.urandom(4)) * 80)
    ends.grant[0] = False
    await ends.ticks(1)
    async with asyncio.timeout(10):
        await asyncio.shield(ends.relay.done)


async def test_the_relays_objects_per_websocket_keep_no_instance_dict(ends: Ends) -> None:
    """An idle WebSocket costs the few small objects the module describes (~8 KB per connection in all): each has
    ``__slots__`` only, no per-instance dict."""
    relay = ends.relay
    for thing in (relay, relay.client, relay.upstream, relay.client.frames, relay.upstream.frames):
        assert not hasattr(thing, "__dict__"), type(thing).__name__


async def _stuffed(sender: socket.socket, header: bytes, towards: asyncio.Transport) -> int:
    """Sends the frame ``header`` begins from ``sender`` until the relay holds bytes for ``towards`` that it cannot
    write (the other side reads nothing); the bytes sent."""
    sent = sender.send(header)
    chunk = b"x" * (1 << 16)
    async with asyncio.timeout(10):
        while not towards.get_write_buffer_size():
            try:
                sent += sender.send(chunk)
            except BlockingIOError:
                await asyncio.sleep(0.005)
    return sent


def _huge_head(mask: bytes = b"") -> bytes:
    """The head of a binary frame of almost the relay's limit (1 MiB): masked with ``mask``, as a browser's are."""
    return struct.pack("!BBQ", 0x80 | BINARY, (0x80 if mask else 0) | 127, 1_000_000) + mask


@pytest.mark.parametrize("ticks", [1, 2])
@pytest.mark.parametrize("taker", ["browser", "app"])
async def test_an_end_that_takes_nothing_of_its_close_is_let_go_on_the_second_tick(ends: Ends, taker: str,
                                                                                   ticks: int) -> None:
    """Closing an end waits until its transport wrote what it holds, and one that reads nothing (a client, or an
    app, that stopped reading half way through a message from the other end) would hold its socket and those bytes
    for as long as it stays connected: after the relay ended it has from half a heartbeat period to a whole one
    (the second tick after the end) to take them, then its connection is dropped."""
    if taker == "browser":  # the app sends, stops, and leaves
        sender, receiver, towards = ends.app, ends.browser, ends.relay.client.transport
        sent = await _stuffed(ends.app, _huge_head(), towards)
    else:  # the browser does
        sender, receiver, towards = ends.browser, ends.app, ends.relay.upstream.transport
        sent = await _stuffed(ends.browser, _huge_head(os.urandom(4)), towards)
    sender.close()
    async with asyncio.timeout(10):
        await ends.relay.done
    await ends.ticks(ticks)
    watched = ends.heartbeat._handle is not None  # its only member: the heartbeat stops once it forgot it
    taken = len(await ends.received_to_the_end(receiver))
    if ticks == 1:
        assert watched, "let go of before its time was up"
        assert taken == sent  # still in time: all of it, then the close
    else:
        assert not watched, "its connections dropped, it stays in the heartbeat"
        assert taken < sent


async def test_a_relay_that_ended_with_nothing_left_to_write_leaves_the_heartbeat_at_once(ends: Ends) -> None:
    ends.app.close()
    async with asyncio.timeout(10):
        await ends.relay.done
    assert ends.heartbeat._handle is None  # no timer ticking nobody


async def test_an_upstream_over_tls_is_closed_once(tmp_path: Path) -> None:
    """asyncio's TLS transport, closed a second time, forgets its protocol and can no longer say what it still
    holds: a relay to an HTTPS dev server whose client left, then ended by the gateway shutting down, ends cleanly
    (a second close raised inside ``end``, and inside ``connection_lost`` before the relay was marked done)."""
    loop = asyncio.get_running_loop()
    key, cert = self_signed(tmp_path)
    serving = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    serving.load_cert_chain(cert, key)
    held: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(lambda _, writer: held.append(writer), "127.0.0.1", 0, ssl=serving)
    trusting = ssl.create_default_context()
    trusting.check_hostname, trusting.verify_mode = False, ssl.CERT_NONE
    browser, client_side = socket.socketpair()
    try:
        upstream, _ = await loop.create_connection(asyncio.Protocol, *server.sockets[0].getsockname()[:2],
                                                   ssl=trusting)
        client, previous = await loop.connect_accepted_socket(asyncio.Protocol, client_side)
        relay = Relay(client, upstream, max_message=1 << 20, heartbeat=Heartbeat(3600.0), client_protocol=previous,
                      granted=lambda: True)
        relay.start(b"", b"")
        browser.close()
        async with asyncio.timeout(10):
            await relay.done
        relay.end(1001)
        assert upstream.is_closing()
    finally:
        browser.close()
        server.close()
        await server.wait_closed()

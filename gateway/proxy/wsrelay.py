"""Relaying an accepted WebSocket frame by frame between the client's and the upstream's transports.

Like nginx, the relay copies frames as they arrive instead of decoding messages, so an idle WebSocket costs a
few small objects: one protocol object per end (with __slots__), the frame scanner of each direction and a
membership in the shared heartbeat. No task runs per connection: everything happens in transport callbacks.

- Masked frames from the browser go upstream still masked (the upstream expects a client's masks), the
  upstream's unmasked frames go to the browser as they are; pings and pongs pass end to end.
- Backpressure: when one end's write buffer is full (``pause_writing``), the other end stops being read until
  it drained (``resume_writing``), so a fast sender never makes the gateway buffer more than a transport's
  high-water mark per direction.
- Closing: close frames pass through, so the close handshake is the two endpoints' own. An end that vanishes
  without one makes the gateway close the other end for it: 1001 (going away) to the upstream when the client
  left, 1011 to the client when the upstream broke off. A message over the size limit (1009) or a frame that
  breaks the protocol (1002) closes both ends with that code; so does a grant that no longer holds (1008: the
  relay asks ``granted`` on every heartbeat tick).
- Frames the gateway adds itself (a close, the heartbeat's ping) are only written between two frames of the
  other direction, never into the middle of a payload that is still passing.
- Closing an end waits until what its transport holds is written: an end that reads nothing would keep its socket
  and those bytes as long as it stays connected, so an ended relay stays in the heartbeat while either end holds
  some, and is dropped on the second tick after its end (half a period to a whole one to take them).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from gateway.proxy.heartbeat import Heartbeat
from gateway.proxy.wsframes import INTERNAL_ERROR, PING, Frames, close_frame, frame

GOING_AWAY = 1001
POLICY_VIOLATION = 1008
HEARTBEAT_PAYLOAD = b"codehub-heartbeat"
"""The payload of the gateway's own pings, so their pongs can be told from the answers to the upstream's."""
_PING_AT, _GIVE_UP_AT = 3, 4
"""Heartbeat ticks (``period / 2`` apart) of client silence before a ping, and before giving up on the pong."""
_LET_GO_AT = 2
"""Heartbeat ticks after the relay ended before an end that has not taken what is left for it is dropped."""


class _End(asyncio.Protocol):
    """One end of the relay: frames arriving from it are scanned and written to the other end."""

    __slots__ = ("_mask", "fed", "frames", "gone_code", "peer", "relay", "transport")

    def __init__(self, relay: Relay, transport: asyncio.Transport, frames: Frames, *, gone_code: int,
                 masks: bool) -> None:
        self.relay = relay
        self.transport = transport
        self.frames = frames
        self.gone_code = gone_code
        self._mask = masks
        self.peer: _End = self
        self.fed = False
        """Bytes were written to this end since the heartbeat last looked."""

    def data_received(self, data: bytes) -> None:
        out = self.frames.feed(data)
        if out and not self.peer.transport.is_closing():
            self.peer.transport.write(out)
            self.peer.fed = True
        if self.frames.error:
            self.relay.end(self.frames.error)

    def pause_writing(self) -> None:
        if not self.peer.transport.is_closing():
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.peer.transport.is_closing():
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.lost(self)

    def may_take_a_frame(self) -> bool:
        """Whether a frame of the gateway's own may be written to this end now: not into a payload still passing
        to it, and not after a close frame went its way."""
        towards = self.peer.frames
        return not self.transport.is_closing() and not towards.mid_frame and not towards.closed

    def send_close(self, code: int) -> None:
        """Close this end, telling it ``code`` unless it was told already (the other end's close went through).
        Once: asyncio's TLS transport, closed a second time, forgets its protocol and can no longer say what it
        still holds (``get_write_buffer_size`` raises)."""
        if self.transport.is_closing():
            return
        if self.may_take_a_frame():
            self.transport.write(close_frame(code, mask=os.urandom(4) if self._mask else None))
        self.transport.close()


class _ClientEnd(_End):
    """The browser's end: the one the heartbeat watches, and whose end the protocol that had its transport
    before the relay (the web server's) must still hear of."""

    __slots__ = ("_previous", "ended", "idle")

    def __init__(self, relay: Relay, transport: asyncio.Transport, frames: Frames,
                 previous: asyncio.BaseProtocol) -> None:
        super().__init__(relay, transport, frames, gone_code=GOING_AWAY, masks=False)
        self._previous = previous
        self.idle = 0
        self.ended = 0
        """Ticks since the relay ended, while an end still holds bytes it has not written."""

    def data_received(self, data: bytes) -> None:
        self.idle = 0
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._previous.connection_lost(exc)

    def tick(self) -> None:
        if self.relay.done.done():
            self.ended += 1
            if self.ended >= _LET_GO_AT:
                self.relay.let_go()
            return
        if not self.relay.granted():
            self.relay.end(POLICY_VIOLATION)
            return
        self.idle += 1
        fed, self.fed = self.fed, False
        if self.idle == _PING_AT:
            if not self.may_take_a_frame():
                if fed and self.peer.frames.mid_frame:
                    self.idle -= 1  # a message to the client is half way through, and moving: ping once it passed
                # Else nothing moves towards it (the message stalled, or a close frame went its way, which it
                # should have answered): it has until the give-up tick to say something, ping or no ping.
                return
            self.transport.write(frame(PING, HEARTBEAT_PAYLOAD))
        elif self.idle >= _GIVE_UP_AT:
            self.transport.abort()  # no pong: the client is gone, its buffers will never drain

    def leave(self, code: int) -> None:
        self.relay.end(code)


class Relay:
    """Both ends of one WebSocket; ``done`` resolves once either end is gone (the other is closing)."""

    __slots__ = ("_heartbeat", "client", "done", "granted", "upstream")

    def __init__(self, client: asyncio.Transport, upstream: asyncio.Transport, *, max_message: int,
                 heartbeat: Heartbeat, client_protocol: asyncio.BaseProtocol, granted: Callable[[], bool]) -> None:
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._heartbeat = heartbeat
        self.granted = granted
        """Whether what let the WebSocket in still does: asked on each heartbeat tick, 1008 to both ends once not."""
        self.client = _ClientEnd(self, client, Frames(masked=True, limit=max_message, swallow=HEARTBEAT_PAYLOAD),
                                 client_protocol)
        self.upstream = _End(self, upstream, Frames(masked=False, limit=max_message), gone_code=INTERNAL_ERROR,
                             masks=True)
        self.client.peer, self.upstream.peer = self.upstream, self.client

    def start(self, client_tail: bytes, upstream_tail: bytes) -> None:
        """Take both transports over; the tails are what either end sent right after its handshake."""
        self.upstream.transport.set_protocol(self.upstream)
        self.client.transport.set_protocol(self.client)
        for end, tail in ((self.client, client_tail), (self.upstream, upstream_tail)):
            if tail:
                end.data_received(tail)
        self.upstream.transport.resume_reading()
        self._heartbeat.watch(self.client)
        for end in (self.client, self.upstream):
            if end.transport.is_closing():  # closed before the relay took over: its connection_lost went elsewhere
                self.lost(end)

    def lost(self, end: _End) -> None:
        """``end`` is gone: the other end is told (unless a close frame already went its way) and closed.
        Saying it twice does no harm."""
        end.peer.send_close(end.gone_code)  # which sends no close frame after one that went its way
        self._finish()

    def end(self, code: int) -> None:
        """Close both ends with ``code``: a broken rule, or the gateway shutting down."""
        self.client.send_close(code)
        self.upstream.send_close(code)
        self._finish()

    def let_go(self) -> None:
        """Drop both ends' connections, and whatever they still hold (their ``connection_lost`` forgets it)."""
        self.client.transport.abort()
        self.upstream.transport.abort()

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
        if not (self.client.transport.get_write_buffer_size() or self.upstream.transport.get_write_buffer_size()):
            self._heartbeat.forget(self.client)  # else the heartbeat lets go of what no end takes (``_ClientEnd``)

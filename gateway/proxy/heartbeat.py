"""One timer for every relayed WebSocket's heartbeat, instead of a timer (and its rescheduling) per connection.

Each member is ticked every ``period / 2``; the member counts the ticks since its client last sent anything,
pings after more than ``period`` of silence and gives up when the pong is not back by the next tick (and, once its
relay ended, drops an end that has not taken what was left for it by the second tick after); it also asks
again whether what let it in still does (a plan, ~20 µs), so members are ticked ``TICK_BATCH`` at a time with the
loop running between. Being the one place that knows every live relayed WebSocket, it is also how a draining
gateway closes them all.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from gateway.proxy.wsframes import INTERNAL_ERROR

log = logging.getLogger(__name__)
TICK_BATCH = 256
"""Members ticked in one go: 256 plans are ~5 ms the loop waits, where 10,000 would be 0.2 s."""


class Member(Protocol):
    def tick(self) -> None: ...

    def leave(self, code: int) -> None: ...


class Heartbeat:
    __slots__ = ("_handle", "_loop", "_members", "period")

    def __init__(self, period: float) -> None:
        self.period = period
        self._members: set[Member] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.Handle | None = None

    def watch(self, member: Member) -> None:
        self._members.add(member)
        loop = asyncio.get_running_loop()
        if self._handle is None or self._loop is not loop:  # first member, or a new loop (tests run several)
            self._loop = loop
            self._handle = loop.call_later(self.period / 2, self._tick)

    def forget(self, member: Member) -> None:
        self._members.discard(member)
        if not self._members and self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def end_all(self, code: int) -> None:
        """Close every watched WebSocket with ``code``, both ends (1001 when the gateway shuts down)."""
        for member in tuple(self._members):  # leaving may forget the member
            member.leave(code)

    def _tick(self) -> None:
        self._tick_from(tuple(self._members), 0)

    def _tick_from(self, members: tuple[Member, ...], start: int) -> None:
        """Tick a batch of ``members`` (those still watched: a tick may end a relay, which forgets its member),
        then the next batch, or the next tick's timer once all were ticked."""
        watched = self._members
        for member in members[start:start + TICK_BATCH]:
            if member in watched:
                try:
                    member.tick()
                except Exception:  # a bug in one must not stop every other WebSocket's heartbeat
                    log.exception("a WebSocket's heartbeat tick failed; ending it")
                    member.leave(INTERNAL_ERROR)
        if not watched or self._loop is None:  # the last member's ``forget`` stopped the heartbeat
            return
        if start + TICK_BATCH < len(members):
            self._handle = self._loop.call_soon(self._tick_from, members, start + TICK_BATCH)
        else:
            self._handle = self._loop.call_later(self.period / 2, self._tick)

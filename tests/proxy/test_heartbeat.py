"""The shared heartbeat alone: which members it ticks, in which event loop, and how it ends them all."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway.proxy.heartbeat import TICK_BATCH, Heartbeat

PERIOD = 0.02


class Member:
    """Counts its ticks; may forget itself on a tick, as a relay that a tick ends does."""

    def __init__(self, heartbeat: Heartbeat, *, leaves_on_tick: bool = False) -> None:
        self.heartbeat = heartbeat
        self.leaves_on_tick = leaves_on_tick
        self.ticks = 0
        self.ticked = asyncio.Event()
        self.left: int | None = None
        self.times: list[float] = []

    def tick(self) -> None:
        self.ticks += 1
        self.times.append(asyncio.get_running_loop().time())
        self.ticked.set()
        if self.leaves_on_tick:
            self.heartbeat.forget(self)

    def leave(self, code: int) -> None:
        self.left = code
        self.heartbeat.forget(self)

    async def ticked_again(self) -> None:
        self.ticked.clear()
        await asyncio.wait_for(self.ticked.wait(), 10)


async def test_a_member_watched_after_the_last_one_was_forgotten_is_ticked() -> None:
    heartbeat = Heartbeat(PERIOD)
    first = Member(heartbeat)
    heartbeat.watch(first)
    await first.ticked_again()
    heartbeat.forget(first)  # the timer stops with the last member
    second = Member(heartbeat)
    heartbeat.watch(second)  # and starts again with the next one
    await second.ticked_again()
    await second.ticked_again()
    heartbeat.forget(second)


async def test_forgetting_the_last_member_stops_its_timer_so_a_new_one_is_not_ticked_twice_as_often() -> None:
    """A member watched right after the last one was forgotten is ticked by one timer, not by the old one too
    (two timers would ping a silent client after half its time). Timers never fire early, so the ticks of one
    timer are at least half a period apart."""
    heartbeat = Heartbeat(0.2)
    first = Member(heartbeat)
    heartbeat.watch(first)
    heartbeat.forget(first)
    second = Member(heartbeat)
    heartbeat.watch(second)
    for _ in range(3):
        await second.ticked_again()
    heartbeat.forget(second)
    gaps = [later - earlier for earlier, later in zip(second.times, second.times[1:], strict=False)]
    assert min(gaps) > 0.05, gaps


async def test_forgetting_one_member_keeps_the_others_ticked() -> None:
    heartbeat = Heartbeat(PERIOD)
    gone, staying = Member(heartbeat), Member(heartbeat)
    heartbeat.watch(gone)
    heartbeat.watch(staying)
    heartbeat.forget(gone)
    await staying.ticked_again()
    await staying.ticked_again()
    assert gone.ticks == 0
    heartbeat.forget(staying)


async def test_forgetting_a_member_twice_is_harmless() -> None:
    """A relay ends once per end and once more when the gateway closes it: each forgets its client."""
    heartbeat = Heartbeat(PERIOD)
    member = Member(heartbeat)
    heartbeat.watch(member)
    heartbeat.forget(member)
    heartbeat.forget(member)
    heartbeat.forget(Member(heartbeat))  # never watched


async def test_a_member_watched_after_the_last_one_left_on_a_tick_is_ticked() -> None:
    heartbeat = Heartbeat(PERIOD)
    leaving = Member(heartbeat, leaves_on_tick=True)
    heartbeat.watch(leaving)
    await leaving.ticked_again()
    await asyncio.sleep(0)  # the tick that ended the last member is over
    assert heartbeat._handle is None  # and left no timer ticking nobody
    later = Member(heartbeat)
    heartbeat.watch(later)
    await later.ticked_again()
    heartbeat.forget(later)


async def test_a_member_that_leaves_on_a_tick_does_not_stop_the_others_ticks() -> None:
    heartbeat = Heartbeat(PERIOD)
    leaving, staying = Member(heartbeat, leaves_on_tick=True), Member(heartbeat)
    heartbeat.watch(leaving)
    heartbeat.watch(staying)
    await staying.ticked_again()
    await staying.ticked_again()
    await staying.ticked_again()
    assert leaving.ticks == 1
    heartbeat.forget(staying)


def test_a_heartbeat_used_in_a_later_event_loop_ticks_there() -> None:
    """Tests run one loop after another: a heartbeat whose loop ended with members still watched (its timer
    died with that loop) starts a timer in the new one."""
    heartbeat = Heartbeat(PERIOD)

    async def watch_one() -> int:
        member = Member(heartbeat)
        heartbeat.watch(member)
        await member.ticked_again()
        return member.ticks

    assert asyncio.run(watch_one()) >= 1  # its member is never forgotten
    assert asyncio.run(watch_one()) >= 1


async def test_end_all_tells_every_member_the_code() -> None:
    heartbeat = Heartbeat(60)
    members = [Member(heartbeat) for _ in range(3)]
    for member in members:
        heartbeat.watch(member)
    heartbeat.end_all(1001)
    assert [member.left for member in members] == [1001, 1001, 1001]


async def test_a_tick_of_many_members_lets_the_loop_run_between_batches() -> None:
    """A tick asks every relay's grant again, a plan each (~20 µs): 10,000 WebSockets at once would stop the
    worker for 0.2 s on every tick. Members are ticked ``TICK_BATCH`` at a time, other callbacks run between,
    and a member that ends meanwhile (forgotten) is not ticked."""
    heartbeat = Heartbeat(60)
    members = [Member(heartbeat) for _ in range(2 * TICK_BATCH + 2)]
    for member in members:
        heartbeat.watch(member)
    loop = asyncio.get_running_loop()
    seen: list[int] = []
    loop.call_soon(lambda: seen.append(sum(member.ticks for member in members)))
    heartbeat._tick()  # the timer's callback, at once
    ended = next(member for member in members if not member.ticks)
    heartbeat.forget(ended)  # between two batches
    async with asyncio.timeout(10):
        while sum(member.ticks for member in members) < len(members) - 1:  # noqa: ASYNC110 - 513 counters
            await asyncio.sleep(0)
    assert seen == [TICK_BATCH]
    assert [member.ticks for member in members if member is not ended] == [1] * (len(members) - 1)
    await asyncio.sleep(0)
    assert ended.ticks == 0
    heartbeat.end_all(1001)


async def test_a_member_whose_tick_fails_is_ended_and_the_heartbeat_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    """A bug in one WebSocket's tick (a write that raises, say) must not stop the timer of every other one: that
    member is told 1011 and forgotten, with the traceback logged once, and the others go on being ticked."""

    class Failing(Member):
        def tick(self) -> None:
            super().tick()
            raise RuntimeError("a bug")

    heartbeat = Heartbeat(PERIOD)
    failing, staying = Failing(heartbeat), Member(heartbeat)
    heartbeat.watch(failing)
    heartbeat.watch(staying)
    with caplog.at_level(logging.ERROR, "gateway.proxy.heartbeat"):
        for _ in range(3):
            await staying.ticked_again()
    assert (failing.ticks, failing.left) == (1, 1011)
    assert [record.exc_info is not None for record in caplog.records] == [True]
    heartbeat.forget(staying)

"""Waking and sleeping, seen by an attacker: what visitors (anonymous ones too) can make the wake machinery do.

Each test drives a real gateway (the local runtime, real workspace processes on loopback) the way an attacker
would, and checks that the guarantee of README's "Waking and sleeping" holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from gateway.auth.identity import Identity
from gateway.lifecycle import Phase
from gateway.lifecycle.idle import IdleTimers
from tests.conftest import MakeGateway, next_address
from tests.lifecycle.conftest import (
    API,
    PORT,
    Client,
    gateway_of,
    preview,
    read_sse,
    slow_workspace,
)

pytestmark = pytest.mark.timeout(60)
IDLE = {"to_warm": 60.0, "to_cold": 600.0, "check_every": 3600.0}
TIMERS = IdleTimers(IDLE["to_warm"], IDLE["to_cold"], IDLE["check_every"])
SLACK = 10.0
EMPTY_PORT = PORT + 1
"""A public port of the workspace on which nothing listens."""


class Clock:
    """Wall-clock time that moves only when told to (the gateway measures idleness by it)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def _reap(client: Client, workspace: str = "ws") -> Phase:
    """One pass of the gateway's own reaper, waiting for what it started; the workspace's phase."""
    gateway = gateway_of(client)
    await asyncio.gather(*gateway.reaper.sweep())
    state = gateway.runtime.get(workspace)
    assert state is not None
    return state.phase


async def test_a_visitor_cannot_keep_a_workspace_awake_with_a_progress_stream_for_a_port_nobody_serves(
        make_gateway: MakeGateway) -> None:
    """Under ``visitors_keep_awake: false`` only members keep a workspace awake, and progress streams are no activity
    for anyone. An anonymous visitor of a public port on which nothing listens opened its waiting page's stream: on a
    RUNNING workspace that is a wait for the port, up to ``warm_timeout``, and the reaper took any wait for a port as
    a wake in progress and left the workspace alone; opened again each time it ends, it kept the workspace RUNNING
    for ever. A wait for a port of a workspace that already runs is no wake: it ends when the workspace stops."""
    clock = Clock()
    ws = slow_workspace(next_address(), delay=0)
    ws["ports"][EMPTY_PORT] = "public"
    client = await make_gateway(workspaces={"ws": ws}, idle=IDLE, clock=clock,
                                policy={"wake": {"visitors_keep_awake": False}})
    gateway = gateway_of(client)
    assert (await gateway.runtime.wake("ws")).phase is Phase.RUNNING

    events: list[str] = []

    async def follow() -> None:
        async with client.get("/_codehub/wake/events", headers={"Host": preview("ws", EMPTY_PORT)}) as response:
            assert response.status == 200
            async for name, _data in read_sse(response):
                events.append(name)

    stream = asyncio.ensure_future(follow())
    try:
        async with asyncio.timeout(10):
            while not gateway.waker.busy("ws", EMPTY_PORT):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        clock.now += TIMERS.to_warm + SLACK

        assert await _reap(client) is Phase.WARM
        async with asyncio.timeout(10):
            await stream
        assert events[-1] == "failed"  # its port never answered: the workspace stopped
    finally:
        stream.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stream


async def test_a_request_held_on_a_wake_still_keeps_the_workspace_from_being_reaped(make_gateway: MakeGateway) -> None:
    """The other side of the test above: while a workspace is being woken (here from WARM, its port opening late),
    the wait for its port is part of the wake, and the reaper leaves it alone whatever the clock says."""
    clock = Clock()
    client = await make_gateway(workspaces={"ws": slow_workspace(next_address(), delay=1.5)}, idle=IDLE,
                                clock=clock, policy={"wake": {"visitors_keep_awake": False}})
    gateway = gateway_of(client)

    held = asyncio.ensure_future(client.get("/", headers={"Host": preview("ws"), **API}))
    async with asyncio.timeout(15):
        while (state := gateway.runtime.get("ws")) is None or state.phase is not Phase.RUNNING:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    clock.now += 10 * TIMERS.to_warm
    assert await _reap(client) is Phase.RUNNING
    assert (await held).status == 200


async def test_a_member_held_on_a_wait_a_visitor_began_keeps_the_workspace_awake(make_gateway: MakeGateway) -> None:
    """A wait for a port of a running workspace keeps nothing awake by itself (see above), but requests held on it
    are those of people, and the owner's keep the workspace awake as their proxied requests do: a visitor's stream
    on the port the owner is about to start must not leave the owner's request to be cut off by the reaper."""
    clock = Clock()
    ws = slow_workspace(next_address(), delay=0)
    ws["ports"][EMPTY_PORT] = "public"
    client = await make_gateway(workspaces={"ws": ws}, idle=IDLE, clock=clock,
                                policy={"wake": {"visitors_keep_awake": False}})
    gateway = gateway_of(client)
    assert (await gateway.runtime.wake("ws")).phase is Phase.RUNNING
    _, token = await gateway.auth.store.create_api_token(Identity("alice"), name="test")

    stream = asyncio.ensure_future(client.get("/_codehub/wake/events", headers={"Host": preview("ws", EMPTY_PORT)}))
    held = asyncio.ensure_future(client.get("/", headers={"Host": preview("ws", EMPTY_PORT), **API,
                                                             "Authorization": f"Bearer {token}"}))
    try:
        async with asyncio.timeout(10):
            while not gateway.waker.busy("ws", EMPTY_PORT) or not gateway.activity.snapshot()[1]:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        clock.now += TIMERS.to_warm + SLACK
        assert await _reap(client) is Phase.RUNNING
    finally:
        for request in (stream, held):
            request.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await request

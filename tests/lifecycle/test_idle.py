"""The idle reaper with tiny timers: what keeps a workspace awake (requests, open WebSockets, a response still
streaming) and what must not (health checks, metrics scrapes, waiting pages and their progress streams).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path

import pytest
from aiohttp import WSMsgType

from gateway.lifecycle import Event, Phase, Subscription
from tests.conftest import MakeGateway, next_address
from tests.lifecycle.conftest import (
    API,
    BODY,
    Client,
    browser,
    gateway_of,
    metric_samples,
    preview,
    sample,
    slow_workspace,
    sse_events,
)

pytestmark = pytest.mark.timeout(60)
TINY = {"to_warm": 0.5, "to_cold": 1.0, "check_every": 0.1}
LONGER_THAN_TO_WARM = 4 * TINY["to_warm"]


async def _awake(make_gateway: MakeGateway) -> Client:
    client = await make_gateway(workspaces={"ws": slow_workspace(next_address(), delay=0)}, idle=TINY)
    response = await client.get("/", headers={"Host": preview("ws"), **API})
    assert response.status == 200
    return client


async def _until(events: Subscription, phase: Phase, within: float = 15.0) -> list[Event]:
    """Every event of workspace ``ws`` up to and including the first one in ``phase``."""
    seen = []
    async with asyncio.timeout(within):
        async for event in events:
            if event.workspace == "ws":
                seen.append(event)
                if event.phase is phase:
                    return seen
    raise AssertionError("unreachable")


def _phases(events: Iterable[Event]) -> list[Phase]:
    return [event.phase for event in events]


async def test_unused_workspace_goes_warm_then_cold(make_gateway: MakeGateway, tmp_path: Path) -> None:
    client = await _awake(make_gateway)
    gateway = gateway_of(client)

    with gateway.runtime.events() as events:
        seen = await _until(events, Phase.COLD)

    assert _phases(seen) == [Phase.STOPPING, Phase.WARM, Phase.ARCHIVING, Phase.COLD]
    assert (tmp_path / "state" / "archives" / "ws.tar.gz").is_file()
    assert not (tmp_path / "state" / "workspaces" / "ws" / "home").exists()
    samples = await metric_samples(client)
    assert sample(samples, "codehub_idle_transitions_total", to_phase="WARM") == 1
    assert sample(samples, "codehub_idle_transitions_total", to_phase="COLD") == 1
    assert sample(samples, "codehub_workspaces", phase="COLD") == 1
    assert sample(samples, "codehub_workspaces", phase="RUNNING") == 0


async def test_open_websocket_keeps_the_workspace_running(make_gateway: MakeGateway) -> None:
    client = await _awake(make_gateway)
    gateway = gateway_of(client)

    with gateway.runtime.events() as events:
        async with client.ws_connect("/ws", headers={"Host": preview("ws")}) as ws:
            await asyncio.sleep(LONGER_THAN_TO_WARM)
            assert events.queue.empty()
            await ws.send_str("still here")
            reply = await ws.receive(timeout=5)
            assert (reply.type, reply.data) == (WSMsgType.TEXT, "echo: still here")
        seen = await _until(events, Phase.WARM)  # and once it closes, the reaper is free to act

    assert _phases(seen) == [Phase.STOPPING, Phase.WARM]


async def test_requests_count_as_activity(make_gateway: MakeGateway) -> None:
    client = await _awake(make_gateway)
    gateway = gateway_of(client)

    with gateway.runtime.events() as events:
        for _ in range(int(LONGER_THAN_TO_WARM / 0.1)):
            response = await client.get("/", headers={"Host": preview("ws"), **API})
            assert await response.text() == BODY
            await asyncio.sleep(0.1)
        assert events.queue.empty()
        seen = await _until(events, Phase.WARM)

    assert _phases(seen) == [Phase.STOPPING, Phase.WARM]


async def test_response_still_streaming_keeps_the_workspace_running(make_gateway: MakeGateway) -> None:
    client = await _awake(make_gateway)
    gateway = gateway_of(client)

    with gateway.runtime.events() as events:
        response = await client.get(f"/stream?seconds={LONGER_THAN_TO_WARM}", headers={"Host": preview("ws")})
        body = await response.text()
        assert events.queue.empty()
        seen = await _until(events, Phase.WARM)

    assert response.status == 200
    assert body.endswith("tick\ndone\n")
    assert _phases(seen) == [Phase.STOPPING, Phase.WARM]


async def test_health_metrics_waiting_page_and_progress_stream_are_not_activity(make_gateway: MakeGateway) -> None:
    client = await make_gateway(workspaces={"ws": slow_workspace(next_address(), delay=0.5)}, idle=TINY)
    gateway = gateway_of(client)
    page = await client.get("/", headers=browser("ws"))
    assert page.status == 503
    assert (await sse_events(client, preview("ws")))[-1][0] == "ready"

    with gateway.runtime.events() as events:
        async with asyncio.timeout(15):
            while events.queue.empty():  # keep polling: none of these may keep the workspace up
                assert (await client.get("/healthz", headers={"Host": "localhost:8080"})).status == 200
                await metric_samples(client)
                last = (await sse_events(client, preview("ws")))[-1][0]
                assert last == "ready" or not events.queue.empty()  # a stream racing the stop may see it fail
                await asyncio.sleep(0.05)
        seen = await _until(events, Phase.WARM)

    assert _phases(seen) == [Phase.STOPPING, Phase.WARM]
    assert gateway.activity.last("ws") is None


async def test_wake_metrics(make_gateway: MakeGateway) -> None:
    crash = slow_workspace(next_address(), delay=0)
    crash["command"] = ["sh", "-c", "exit 5"]
    client = await make_gateway(workspaces={"ok": slow_workspace(next_address(), delay=0.2), "bad": crash})

    assert (await client.get("/", headers={"Host": preview("ok"), **API})).status == 200
    assert (await client.get("/", headers={"Host": preview("bad"), **API})).status == 503

    samples = await metric_samples(client)
    assert sample(samples, "codehub_wakes_total", from_phase="WARM", result="ok") == 1
    assert sample(samples, "codehub_wakes_total", from_phase="WARM", result="failed") == 1
    assert sample(samples, "codehub_wake_duration_seconds_count", from_phase="WARM") == 2
    assert sample(samples, "codehub_held_requests") == 0
    assert sample(samples, "codehub_workspaces", phase="RUNNING") == 1
    assert sample(samples, "codehub_workspaces", phase="FAILED") == 1
    assert sample(samples, "codehub_workspaces", phase="COLD") == 0
    assert ("codehub_workspaces", (("phase", "COLD"),)) in samples  # every phase is exported, zeros too


async def test_workspace_being_woken_is_not_reaped_under_its_waiting_requests(make_gateway: MakeGateway) -> None:
    slow = slow_workspace(next_address(), delay=LONGER_THAN_TO_WARM)  # RUNNING long before its port opens
    client = await make_gateway(workspaces={"ws": slow}, idle=TINY)

    with gateway_of(client).runtime.events() as events:
        response = await client.get("/", headers={"Host": preview("ws"), **API})
        seen = [events.queue.get_nowait() for _ in range(events.queue.qsize())]

    assert response.status == 200
    assert await response.text() == BODY
    assert Phase.STOPPING not in _phases(seen)

"""The idle reaper on a clock the test moves: what keeps a workspace awake (requests, open WebSockets, a response
still streaming, a wake in progress) and what must not (health checks, metrics scrapes, waiting pages and their
progress streams). Idleness is measured by the gateway's injected clock and each pass is run by the test
(``reap_once``), so nothing here waits for a timer: the background reaper's own interval is an hour.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from aiohttp import WSMsgType

from gateway.lifecycle import Phase
from tests.conftest import MakeGateway, next_address
from tests.lifecycle.conftest import (
    API,
    BODY,
    IDLE,
    SLACK,
    TIMERS,
    Client,
    browser,
    fill_home,
    gateway_of,
    metric_samples,
    preview,
    sample,
    slow_workspace,
    sse_events,
)

pytestmark = pytest.mark.timeout(60)


class Clock:
    """Wall-clock time that moves only when told to."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def _gateway(make_gateway: MakeGateway, clock: Clock, *, delay: float = 0) -> Client:
    return await make_gateway(workspaces={"ws": slow_workspace(next_address(), delay=delay)}, idle=IDLE,
                              clock=clock)


async def _awake(make_gateway: MakeGateway, clock: Clock) -> Client:
    client = await _gateway(make_gateway, clock)
    response = await client.get("/", headers={"Host": preview("ws"), **API})
    assert response.status == 200
    return client


async def _reap(client: Client) -> Phase:
    """One pass of the gateway's own reaper (as wired), waiting for what it started; the workspace's phase."""
    gateway = gateway_of(client)
    await asyncio.gather(*gateway.reaper.sweep())
    state = gateway.runtime.get("ws")
    assert state is not None
    return state.phase


async def test_unused_workspace_goes_warm_then_cold(make_gateway: MakeGateway, tmp_path: Path) -> None:
    clock = Clock()
    client = await _awake(make_gateway, clock)

    clock.advance(TIMERS.to_warm - SLACK)
    assert await _reap(client) is Phase.RUNNING
    clock.advance(2 * SLACK)
    assert await _reap(client) is Phase.WARM
    clock.advance(TIMERS.to_cold + SLACK)
    assert await _reap(client) is Phase.COLD

    assert (tmp_path / "state" / "archives" / "ws.tar.gz").is_file()
    assert not (tmp_path / "state" / "workspaces" / "ws" / "home").exists()
    samples = await metric_samples(client)
    assert sample(samples, "codehub_idle_transitions_total", to_phase="WARM") == 1
    assert sample(samples, "codehub_idle_transitions_total", to_phase="COLD") == 1
    assert sample(samples, "codehub_workspaces", phase="COLD") == 1
    assert sample(samples, "codehub_workspaces", phase="RUNNING") == 0


async def test_a_workspace_idle_for_exactly_its_timer_goes_to_sleep(make_gateway: MakeGateway) -> None:
    """``idle.to_warm`` (then ``idle.to_cold``) without activity is enough: the timers are not one tick longer."""
    clock = Clock()
    client = await _awake(make_gateway, clock)
    gateway = gateway_of(client)

    for timer, phase in ((TIMERS.to_warm, Phase.WARM), (TIMERS.to_cold, Phase.COLD)):
        state = gateway.runtime.get("ws")
        last = gateway.activity.last("ws")
        assert state is not None
        assert last is not None
        clock.now = max(last, state.since) + timer  # idle since the later of its last use and its phase change
        assert await _reap(client) is phase


async def test_open_websocket_keeps_the_workspace_running(make_gateway: MakeGateway) -> None:
    clock = Clock()
    client = await _awake(make_gateway, clock)

    async with client.ws_connect("/ws", headers={"Host": preview("ws")}) as ws:
        clock.advance(10 * TIMERS.to_warm)
        assert await _reap(client) is Phase.RUNNING
        await ws.send_str("still here")
        reply = await ws.receive(timeout=5)
        assert (reply.type, reply.data) == (WSMsgType.TEXT, "echo: still here")
    async with asyncio.timeout(10):  # the gateway sees the close a moment after the client sent it
        while "ws" in gateway_of(client).activity.snapshot()[1]:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert await _reap(client) is Phase.RUNNING  # it ended just now: that was use
    clock.advance(TIMERS.to_warm + SLACK)
    assert await _reap(client) is Phase.WARM


async def test_requests_count_as_activity(make_gateway: MakeGateway) -> None:
    clock = Clock()
    client = await _awake(make_gateway, clock)

    for _ in range(5):
        clock.advance(TIMERS.to_warm - SLACK)
        response = await client.get("/", headers={"Host": preview("ws"), **API})
        assert await response.text() == BODY
        assert await _reap(client) is Phase.RUNNING
    clock.advance(TIMERS.to_warm + SLACK)
    assert await _reap(client) is Phase.WARM


async def test_response_still_streaming_keeps_the_workspace_running(make_gateway: MakeGateway) -> None:
    clock = Clock()
    client = await _awake(make_gateway, clock)

    async with client.get("/stream?seconds=1", headers={"Host": preview("ws")}) as response:
        first = await response.content.readline()
        clock.advance(10 * TIMERS.to_warm)
        assert await _reap(client) is Phase.RUNNING
        body = first + await response.read()

    assert response.status == 200
    assert body.endswith(b"tick\ndone\n")
    clock.advance(TIMERS.to_warm + SLACK)
    assert await _reap(client) is Phase.WARM


async def test_health_metrics_waiting_page_and_progress_stream_are_not_activity(make_gateway: MakeGateway) -> None:
    clock = Clock()
    client = await _gateway(make_gateway, clock, delay=0.5)
    gateway = gateway_of(client)
    page = await client.get("/", headers=browser("ws"))
    assert page.status == 503
    assert (await sse_events(client, preview("ws")))[-1][0] == "ready"

    assert (await client.get("/healthz", headers={"Host": "localhost:8080"})).status == 200
    await metric_samples(client)
    assert (await sse_events(client, preview("ws")))[-1][0] == "ready"
    clock.advance(TIMERS.to_warm + SLACK)

    assert await _reap(client) is Phase.WARM
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
    """RUNNING long before its port opens, and idle by the clock: the requests waiting for it keep it up."""
    clock = Clock()
    client = await _gateway(make_gateway, clock, delay=1.5)
    gateway = gateway_of(client)

    held = asyncio.ensure_future(client.get("/", headers={"Host": preview("ws"), **API}))
    async with asyncio.timeout(15):
        while (state := gateway.runtime.get("ws")) is None or state.phase is not Phase.RUNNING:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    clock.advance(10 * TIMERS.to_warm)
    assert await _reap(client) is Phase.RUNNING

    response = await held
    assert response.status == 200
    assert await response.text() == BODY


async def test_the_gateway_runs_its_reaper_by_itself(make_gateway: MakeGateway) -> None:
    """Every other test here runs the reaper's passes itself: this one leaves them to the gateway's own loop (every
    ``check_every``), which a broken loop would never run: no workspace would ever sleep."""
    clock = Clock()
    client = await make_gateway(workspaces={"ws": slow_workspace(next_address(), delay=0)},
                                idle={**IDLE, "check_every": 0.05}, clock=clock)
    response = await client.get("/", headers={"Host": preview("ws"), **API})
    assert response.status == 200

    clock.advance(TIMERS.to_warm + SLACK)

    async with asyncio.timeout(30):
        while (state := gateway_of(client).runtime.get("ws")) is None or state.phase is not Phase.WARM:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def test_a_websocket_still_open_keeps_the_workspace_running_when_another_closes(
        make_gateway: MakeGateway) -> None:
    """Open connections are counted per workspace: the first of two to close must not take the other's count."""
    clock = Clock()
    client = await _awake(make_gateway, clock)
    open_now = gateway_of(client).activity.snapshot

    async with client.ws_connect("/ws", headers={"Host": preview("ws")}) as staying:
        async with client.ws_connect("/ws", headers={"Host": preview("ws")}):
            async with asyncio.timeout(10):
                while open_now()[1].get("ws") != 2:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        async with asyncio.timeout(10):  # the gateway sees the close a moment after the client sent it
            while open_now()[1].get("ws", 0) == 2:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        clock.advance(10 * TIMERS.to_warm)
        assert await _reap(client) is Phase.RUNNING
        await staying.send_str("still here")
        reply = await staying.receive(timeout=5)
        assert (reply.type, reply.data) == (WSMsgType.TEXT, "echo: still here")


async def test_a_failed_workspace_is_archived_once_idle_past_to_cold(make_gateway: MakeGateway,
                                                                     tmp_path: Path) -> None:
    """A workspace whose command failed runs nothing, so it never goes WARM; it keeps its home on disk until it has
    been left alone for ``to_cold``, then goes COLD like a WARM one."""
    clock = Clock()
    crash = slow_workspace(next_address(), delay=0)
    crash["command"] = ["sh", "-c", "exit 5"]
    client = await make_gateway(workspaces={"ws": crash}, idle=IDLE, clock=clock)
    assert (await client.get("/", headers={"Host": preview("ws"), **API})).status == 503

    clock.advance(TIMERS.to_cold - SLACK)
    assert await _reap(client) is Phase.FAILED
    clock.advance(2 * SLACK)
    assert await _reap(client) is Phase.COLD
    assert (tmp_path / "state" / "archives" / "ws.tar.gz").is_file()


async def test_closing_the_reaper_returns_once_the_moves_it_cancelled_have_ended(
        make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """On shutdown the runtime is closed after the reaper: a stop still unwinding then would act on a closed one."""
    clock = Clock()
    client = await _awake(make_gateway, clock)
    gateway = gateway_of(client)
    go_on = asyncio.Event()

    async def held_stop(workspace: str) -> None:  # the stop lasts until the test lets it go on
        await go_on.wait()

    monkeypatch.setattr(gateway.runtime, "stop", held_stop)
    clock.advance(TIMERS.to_warm + SLACK)
    [moving] = gateway.reaper.sweep()
    await asyncio.sleep(0)  # the move starts, and waits in the stop
    assert gateway.reaper.tasks

    await gateway.reaper.close()

    assert moving.cancelled()
    assert not gateway.reaper.tasks


async def test_one_workspace_in_use_does_not_keep_a_pass_from_putting_another_to_sleep(
        make_gateway: MakeGateway) -> None:
    clock = Clock()
    client = await make_gateway(workspaces={"busy": slow_workspace(next_address(), delay=0),
                                            "ws": slow_workspace(next_address(), delay=0)}, idle=IDLE, clock=clock)
    for name in ("busy", "ws"):
        assert (await client.get("/", headers={"Host": preview(name), **API})).status == 200
    clock.advance(TIMERS.to_warm + SLACK)
    assert (await client.get("/", headers={"Host": preview("busy"), **API})).status == 200

    assert await _reap(client) is Phase.WARM
    assert gateway_of(client).runtime.get("busy").phase is Phase.RUNNING  # type: ignore[union-attr]


async def test_a_workspace_whose_move_is_under_way_is_not_moved_again_by_the_next_pass(
        make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop or an archive may take minutes (a big home): the passes meanwhile must not start it a second time."""
    clock = Clock()
    client = await _awake(make_gateway, clock)
    gateway = gateway_of(client)
    stops: list[str] = []
    go_on = asyncio.Event()

    async def held_stop(workspace: str) -> None:
        stops.append(workspace)
        await go_on.wait()

    monkeypatch.setattr(gateway.runtime, "stop", held_stop)
    clock.advance(TIMERS.to_warm + SLACK)
    [moving] = gateway.reaper.sweep()
    await asyncio.sleep(0)  # the move starts, and waits in the stop

    assert gateway.reaper.sweep() == []
    go_on.set()
    await moving
    assert stops == ["ws"]


async def test_an_idle_move_that_fails_is_logged_and_not_counted(make_gateway: MakeGateway, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """The operator sees why a workspace stayed up, and the transitions metric counts only the moves made."""
    clock = Clock()
    client = await _gateway(make_gateway, clock)
    fill_home(tmp_path / "state" / "workspaces" / "ws" / "home", big=1 << 10, small_files=3)
    archives = tmp_path / "state" / "archives"
    archives.rmdir()
    archives.write_text("a file where the archives folder should be")
    clock.advance(TIMERS.to_cold + SLACK)

    with caplog.at_level(logging.ERROR, logger="gateway.lifecycle.idle"):
        assert await _reap(client) is Phase.WARM

    logged = [record.getMessage() for record in caplog.records if record.name == "gateway.lifecycle.idle"]
    assert [line.split(":")[0] for line in logged] == ["idle COLD of ws failed"]
    samples = await metric_samples(client)
    assert sample(samples, "codehub_idle_transitions_total", to_phase="COLD") == 0


async def test_shutting_the_gateway_down_ends_the_idle_moves_under_way_first(
        make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reaper's own loop closes it when the gateway shuts down, before the runtime is closed under its moves."""
    clock = Clock()
    client = await _awake(make_gateway, clock)
    gateway = gateway_of(client)
    stop = gateway.runtime.stop

    async def reapers_stop(workspace: str) -> None:  # never ends (the runtime's own, when it closes, does)
        monkeypatch.setattr(gateway.runtime, "stop", stop)
        await asyncio.Event().wait()

    monkeypatch.setattr(gateway.runtime, "stop", reapers_stop)
    clock.advance(TIMERS.to_warm + SLACK)
    [moving] = gateway.reaper.sweep()
    await asyncio.sleep(0)  # the move starts, and waits in the stop

    await client.close()

    assert moving.cancelled()

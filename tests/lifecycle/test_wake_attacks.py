"""Waking and sleeping, seen by an attacker: what visitors (anonymous ones too) can make the wake machinery do.

Each test drives a real gateway (the local runtime, real workspace processes on loopback) the way an attacker
would, and checks that the guarantee of README's "Waking and sleeping" holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Collection
from pathlib import Path

import pytest

from gateway.auth.identity import Identity
from gateway.lifecycle import Phase
from gateway.lifecycle import local as local_runtime
from gateway.lifecycle import wake as wake_module
from gateway.lifecycle.archive import archive_home
from gateway.lifecycle.local import LocalRuntime
from gateway.server.context import Gateway
from tests.conftest import MakeGateway, next_address, settings, workspace
from tests.kube.support import until
from tests.lifecycle.conftest import (
    API,
    IDLE,
    PORT,
    SLACK,
    TIMERS,
    Client,
    browser,
    fill_home,
    gateway_of,
    group_members,
    hold_restores,
    hold_wakes,
    metric_samples,
    owner,
    preview,
    read_sse,
    recorded_pgid,
    sample,
    slow_workspace,
    sse_events,
    starts,
    wait_gone,
)

pytestmark = pytest.mark.timeout(60)
EMPTY_PORT = PORT + 1
"""A public port of the workspace on which nothing listens."""


async def running_for_members(make_gateway: MakeGateway, clock: Clock) -> tuple[Client, Gateway]:
    """A RUNNING workspace with a public ``EMPTY_PORT``, under ``visitors_keep_awake: false``."""
    ws = slow_workspace(next_address(), delay=0)
    ws["ports"][EMPTY_PORT] = "public"
    client = await make_gateway(workspaces={"ws": ws}, idle=IDLE, clock=clock,
                                policy={"wake": {"visitors_keep_awake": False}})
    gateway = gateway_of(client)
    assert (await gateway.runtime.wake("ws")).phase is Phase.RUNNING
    return client, gateway


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
    client, gateway = await running_for_members(make_gateway, clock)

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
    client, gateway = await running_for_members(make_gateway, clock)
    _, token = await gateway.auth.store.create_api_token(Identity("alice"), name="test")

    stream = asyncio.ensure_future(client.get("/_codehub/wake/events", headers={"Host": preview("ws", EMPTY_PORT)}))
    held: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    try:
        async with asyncio.timeout(10):
            while not gateway.waker.busy("ws", EMPTY_PORT):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        held = asyncio.ensure_future(client.get("/", headers={"Host": preview("ws", EMPTY_PORT), **API,
                                                                 "Authorization": f"Bearer {token}"}))
        async with asyncio.timeout(10):
            while not gateway.activity.snapshot()[1]:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        clock.now += TIMERS.to_warm + SLACK
        assert await _reap(client) is Phase.RUNNING
    finally:
        for request in (stream, held):
            request.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await request


async def test_a_visitor_waking_one_workspace_keeps_no_other_awake(make_gateway: MakeGateway,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The reaper leaves a workspace alone while it is being woken: that is that workspace's wake only. Anyone may
    wake a workspace with a public port (again and again, should it fail), and every other workspace of the
    gateway must go to sleep meanwhile as usual."""
    clock = Clock()
    client = await make_gateway(workspaces={"ws": slow_workspace(next_address(), delay=0),
                                            "other": slow_workspace(next_address(), delay=0)}, idle=IDLE, clock=clock)
    gateway = gateway_of(client)
    assert (await gateway.runtime.wake("ws")).phase is Phase.RUNNING
    go_on = hold_wakes(monkeypatch, gateway.runtime, "other")
    waking = asyncio.ensure_future(client.get("/", headers={"Host": preview("other"), **API}))
    try:
        await until(lambda: gateway.waker.waking("other"))
        clock.now += TIMERS.to_warm + SLACK

        assert await _reap(client, "ws") is Phase.WARM
    finally:
        go_on.set()
        assert (await waking).status == 200


async def test_a_wake_in_the_moment_its_process_exits_leaves_the_new_process_its_workspaces(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A workspace process that exits is cleaned up after (its group and marked processes killed, off the loop) before
    the workspace is marked failed; a wake in that moment (the hub's Wake, the API's) found no process running and
    started one, which the clean-up then forgot: the workspace read FAILED with its new process running untracked,
    which no stop, archive or shutdown ended. The clean-up of an exit is only its own process's."""
    entered, release = threading.Event(), threading.Event()
    armed = False
    marked = local_runtime.signal_marked

    def slow_signal_marked(marks: Collection[str], sig: signal.Signals) -> None:
        if armed and sig is signal.SIGKILL:  # the clean-up after the exit takes its time (many processes in /proc)
            entered.set()
            release.wait(10)
        marked(marks, sig)

    monkeypatch.setattr(local_runtime, "signal_marked", slow_signal_marked)
    # the first start exits at once; the next one runs
    command = ["sh", "-c", "if [ -e again ]; then exec sleep 600; fi; touch again; exit 3"]
    runtime = LocalRuntime(settings(tmp_path, {"ws": workspace(next_address(), command=command)}).local)
    await runtime.start()
    armed = True
    pgid = None
    try:
        assert (await runtime.wake("ws")).phase is Phase.RUNNING
        async with asyncio.timeout(10):
            while not entered.is_set():  # noqa: ASYNC110
                await asyncio.sleep(0.01)

        assert (await runtime.wake("ws")).phase is Phase.RUNNING  # the first process is gone: a new one starts
        pgid = recorded_pgid(tmp_path / "state", "ws")
        armed = False
        release.set()
        await asyncio.sleep(0.5)  # the clean-up after the first process's exit ends

        state = runtime.get("ws")
        assert state is not None
        assert state.phase is Phase.RUNNING, state.message
        assert group_members(pgid)
        await runtime.stop("ws")
        await wait_gone(pgid, within=5)
    finally:
        release.set()
        await runtime.close()
        if pgid is not None and group_members(pgid):
            os.killpg(pgid, signal.SIGKILL)


def _damaged_archive(tmp_path: Path) -> None:
    """Workspace ``ws`` COLD, its archive damaged past its first members: every restore of it fails."""
    state = tmp_path / "state"
    home, archive = state / "workspaces" / "ws" / "home", state / "archives" / "ws.tar.gz"
    fill_home(home)
    archive_home(home, archive)
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))


async def test_a_visitor_cannot_make_a_workspace_that_fails_to_wake_try_again_and_again(
        make_gateway: MakeGateway, tmp_path: Path) -> None:
    """Whoever may wake a workspace (anyone, on a public port) wakes it on a request; one that fails to wake (an
    archive that cannot be restored, a command that exits at once) was woken again by each next request: a loop of
    requests, or a waiting page's reloads, restored a home of gigabytes over and over, or started its command as
    fast as they came. A failed wake is tried again only after a while, longer after each failure, and the requests
    meanwhile get its failure at once, with the time to come back."""
    _damaged_archive(tmp_path)
    client = await make_gateway(workspaces={"ws": slow_workspace(next_address(), delay=0)})

    answers = [await client.get("/", headers={"Host": preview("ws"), **API}) for _ in range(10)]
    page = await client.get("/", headers=browser("ws"))
    events = await sse_events(client, preview("ws"), within=10)
    owners = await client.get("/", headers={"Host": preview("ws"), **API, **owner(client, "ws")})

    samples = await metric_samples(client)
    assert sample(samples, "codehub_wakes_total", from_phase="COLD", result="failed") == 1
    for answer in answers:
        assert answer.status == 503
        assert (await answer.json())["error"]["message"].startswith("Workspace ws could not start")
    retry = answers[-1].headers["Retry-After"]
    assert int(retry) > 0
    assert f"(it is tried again in {retry} s)" in (await answers[-1].json())["error"]["message"]
    assert page.status == 503
    assert "could not start" in await page.text()
    assert events[-1][0] == "failed"
    assert events[-1][1]["message"].startswith("Workspace ws could not start (it is tried again in ")
    assert (await owners.json())["error"]["message"].startswith("restoring home failed: ")  # the owner is told why


async def test_a_command_that_exits_at_once_is_not_started_again_for_every_request(
        make_gateway: MakeGateway, tmp_path: Path) -> None:
    starts_file = tmp_path / "starts"
    crash = slow_workspace(next_address(), delay=0)
    crash["command"] = ["sh", "-c", f"echo start >> {starts_file}; exit 3"]
    client = await make_gateway(workspaces={"ws": crash})

    answers = [await client.get("/", headers={"Host": preview("ws"), **API, **owner(client, "ws")}) for _ in range(10)]

    assert [answer.status for answer in answers] == [503] * 10
    assert starts(starts_file) == 1
    for answer in answers:
        assert "exited with code 3" in (await answer.json())["error"]["message"]


async def _visit(client: Client, starts_file: Path) -> int:
    """A request to workspace ``ws``, which fails to wake; how many times its command was started so far."""
    response = await client.get("/", headers={"Host": preview("ws"), **API})
    assert response.status == 503
    return starts(starts_file)


async def test_a_failed_wake_is_tried_again_later_each_time_and_at_once_from_the_hub(
        make_gateway: MakeGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wait after a failed wake doubles with each failure in a row; the owner's Wake (the API) does not wait."""
    monkeypatch.setattr(wake_module, "RETRY_FIRST", 1.0)
    starts_file = tmp_path / "starts"
    crash = slow_workspace(next_address(), delay=0)
    crash["command"] = ["sh", "-c", f"echo start >> {starts_file}; exit 3"]
    client = await make_gateway(workspaces={"ws": crash})
    _, token = await gateway_of(client).auth.store.create_api_token(Identity("alice"), name="test")

    assert await _visit(client, starts_file) == 1
    assert await _visit(client, starts_file) == 1
    await asyncio.sleep(1.3)
    assert await _visit(client, starts_file) == 2  # the first wait was over; the next is twice as long
    await asyncio.sleep(1.3)
    assert await _visit(client, starts_file) == 2
    await asyncio.sleep(1.0)
    assert await _visit(client, starts_file) == 3

    woken = await client.post("/api/v1/workspaces/ws/wake", headers={"Host": "localhost:8080",
                                                                     "Authorization": f"Bearer {token}"})
    assert woken.status == 200
    assert starts(starts_file) == 4


async def test_a_failure_long_past_starts_the_back_off_over(
        make_gateway: MakeGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure is remembered for its wait and as long again: a workspace that fails again after that waits
    ``RETRY_FIRST`` once more, not twice its last wait (nor are the failures of every workspace ever kept)."""
    monkeypatch.setattr(wake_module, "RETRY_FIRST", 1.0)
    starts_file = tmp_path / "starts"
    crash = slow_workspace(next_address(), delay=0)
    crash["command"] = ["sh", "-c", f"echo start >> {starts_file}; exit 3"]
    client = await make_gateway(workspaces={"ws": crash})

    assert await _visit(client, starts_file) == 1
    await asyncio.sleep(2.5)  # past its wait of 1 s, and as long again
    assert await _visit(client, starts_file) == 2
    await asyncio.sleep(1.5)  # past a wait of 1 s, not of 2
    assert await _visit(client, starts_file) == 3


async def test_a_failure_from_before_the_workspace_last_changed_holds_nothing_back(
        make_gateway: MakeGateway, tmp_path: Path) -> None:
    """Its owner woke the workspace from the hub after a failed wake, and stopped it again: the failure is past, and
    the next visitor wakes it at once rather than hear of it."""
    starts_file = tmp_path / "starts"
    flaky = slow_workspace(next_address(), delay=0)
    flaky["command"] = ["sh", "-c", f"echo start >> {starts_file}; if [ -e again ]; then exec sleep 600; fi; "
                                    "touch again; exit 3"]
    client = await make_gateway(workspaces={"ws": flaky}, policy={"wake": {"warm_timeout": "1s"}})
    _, token = await gateway_of(client).auth.store.create_api_token(Identity("alice"), name="test")
    owner = {"Host": "localhost:8080", "Authorization": f"Bearer {token}"}
    assert (await client.get("/", headers={"Host": preview("ws"), **API})).status == 503
    assert starts(starts_file) == 1

    assert (await client.post("/api/v1/workspaces/ws/wake", headers=owner)).status == 200
    assert (await client.post("/api/v1/workspaces/ws/stop", headers=owner)).status == 200
    assert starts(starts_file) == 2

    response = await client.get("/", headers={"Host": preview("ws"), **API})  # woken: its port never opens
    assert "tried again" not in (await response.json())["error"]["message"]
    assert starts(starts_file) == 3


async def test_one_wake_that_fails_for_two_ports_is_one_failure(
        make_gateway: MakeGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests to two ports of a workspace wait on one wake, and each sees it fail: that is one failure, not two in
    a row (which would double the wait before the next wake already)."""
    _damaged_archive(tmp_path)
    restoring = hold_restores(monkeypatch)
    ws = slow_workspace(next_address(), delay=0)
    ws["ports"][EMPTY_PORT] = "public"
    client = await make_gateway(workspaces={"ws": ws})
    waker = gateway_of(client).waker
    asks = [asyncio.ensure_future(client.get("/", headers={"Host": preview("ws", port), **API}))
            for port in (PORT, EMPTY_PORT)]
    await until(lambda: waker.progress("ws", PORT) is not None and waker.progress("ws", EMPTY_PORT) is not None)
    restoring.set()
    assert [answer.status for answer in await asyncio.gather(*asks)] == [503, 503]

    later = await client.get("/", headers={"Host": preview("ws"), **API})

    assert later.status == 503
    assert 0 < int(later.headers["Retry-After"]) <= wake_module.RETRY_FIRST


async def test_a_wake_its_owner_stops_is_no_failure(
        make_gateway: MakeGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped while its port is awaited, a wake ends with an error for the requests that waited, but nothing
    failed: the next visitor wakes the workspace at once, not after a back-off. (The port is probed every 2 s here,
    so the wait mostly finds the workspace WARM, stamped before the error: found STOPPING, the stamp that follows
    would hold no wake back even if the error were taken for a failure.)"""
    monkeypatch.setattr(wake_module, "_PROBE_FAST", 2.0)
    monkeypatch.setattr(wake_module, "_PROBE_SLOW", 2.0)
    starts_file = tmp_path / "starts"
    client = await make_gateway(workspaces={"ws": slow_workspace(next_address(), delay=60, starts=starts_file)})
    gateway = gateway_of(client)
    held = asyncio.ensure_future(client.get("/", headers={"Host": preview("ws"), **API, **owner(client, "ws")}))
    await until(lambda: starts(starts_file) == 1 and gateway.waker.progress("ws", PORT) is not None)
    assert (await gateway.runtime.stop("ws")).phase is Phase.WARM
    assert (await held).status == 503
    stopped = f"Workspace ws stopped before port {PORT} answered: it stopped"
    assert (await (await held).json())["error"]["message"] == stopped  # its owner hears why

    page = await client.get("/", headers=browser("ws"))

    assert page.status == 503
    assert "tried again" not in await page.text()
    await until(lambda: starts(starts_file) == 2)

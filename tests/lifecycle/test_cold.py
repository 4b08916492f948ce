"""COLD workspaces: the home goes into a verified archive and comes back exactly, and a request brings it back.

The storm test sends 500 simultaneous API requests to one COLD workspace: one restore, one start, 500 answers of 200.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from gateway.errors import GatewayError
from gateway.lifecycle import Phase
from gateway.lifecycle.archive import archive_home
from gateway.lifecycle.local import LocalRuntime
from tests.conftest import MakeGateway, next_address, settings, workspace
from tests.lifecycle.conftest import (
    API,
    BODY,
    browser,
    fill_home,
    gateway_of,
    hold_restores,
    metric_samples,
    owner,
    preview,
    read_sse,
    sample,
    slow_workspace,
    snapshot,
    sse_events,
    starts,
)

pytestmark = pytest.mark.timeout(120)


def _paths(tmp_path: Path, name: str = "ws") -> tuple[Path, Path]:
    state = tmp_path / "state"
    return state / "workspaces" / name / "home", state / "archives" / f"{name}.tar.gz"


def _make_cold(tmp_path: Path, name: str = "ws", **fill: int) -> dict[str, tuple[object, ...]]:
    """A COLD workspace as a previous gateway left it: only the archive; returns the home's snapshot."""
    home, archive = _paths(tmp_path, name)
    fill_home(home, **fill)
    before = snapshot(home)
    archive_home(home, archive)
    assert not home.exists()
    return before


async def test_archive_and_restore_through_the_runtime_preserve_everything(tmp_path: Path) -> None:
    config = settings(tmp_path, {"ws": workspace(next_address())})
    home, archive = _paths(tmp_path)
    fill_home(home, big=6 << 20, small_files=300)
    home.chmod(0o750)
    before = snapshot(home)
    runtime = LocalRuntime(config.local)
    await runtime.start()
    try:
        assert runtime.get("ws").phase is Phase.WARM  # type: ignore[union-attr]
        with runtime.events() as events:
            state = await runtime.archive("ws")
            assert state.phase is Phase.COLD
            assert [events.queue.get_nowait().phase for _ in range(events.queue.qsize())] == [
                Phase.ARCHIVING, Phase.COLD]
        assert archive.is_file()
        assert not home.exists()
        assert sorted(p.name for p in archive.parent.iterdir()) == ["ws.tar.gz"]  # no .tmp left behind
        assert not any(p.name.startswith("home") for p in home.parent.iterdir())
        assert (await runtime.status("ws")).phase is Phase.COLD

        state = await runtime.wake("ws")

        assert state.phase is Phase.RUNNING
        assert not archive.exists()
        assert not home.with_name("home.restoring").exists()
        assert snapshot(home) == before
    finally:
        await runtime.close()


async def test_a_failed_archive_keeps_the_home(tmp_path: Path) -> None:
    config = settings(tmp_path, {"ws": workspace(next_address())})
    home, archive = _paths(tmp_path)
    fill_home(home, big=1 << 20)
    before = snapshot(home)
    runtime = LocalRuntime(config.local)
    await runtime.start()
    archive.mkdir()  # the finished archive cannot be renamed into place
    try:
        with pytest.raises(GatewayError):
            await runtime.archive("ws")

        assert snapshot(home) == before
        assert not archive.with_name(archive.name + ".tmp").exists()
        assert runtime.get("ws").phase is Phase.WARM  # type: ignore[union-attr]
    finally:
        await runtime.close()


async def test_a_failed_archive_is_told_until_an_archive_succeeds(tmp_path: Path) -> None:
    """Its reason is the message of the WARM workspace it left; once an archive succeeded, a later WARM (a start
    that failed, then a stop) says nothing of it."""
    missing = str(tmp_path / "no-such-program")
    config = settings(tmp_path, {"ws": workspace(next_address(), command=[missing])})
    home, archive = _paths(tmp_path)
    fill_home(home, big=1 << 10, small_files=1)
    runtime = LocalRuntime(config.local)
    await runtime.start()
    archive.mkdir()  # the finished archive cannot be renamed into place
    try:
        with pytest.raises(GatewayError):
            await runtime.archive("ws")
        assert (await runtime.status("ws")).message.startswith("The last archive failed, the home is kept: ")
        archive.rmdir()
        assert (await runtime.archive("ws")).phase is Phase.COLD
        assert (await runtime.wake("ws")).phase is Phase.FAILED  # its home is back, its command missing
        stopped = await runtime.stop("ws")
        assert (stopped.phase, stopped.message) == (Phase.WARM, "")
    finally:
        await runtime.close()


class _Bug(Exception):
    """An error of a kind the runtime does not expect (a bug in restore, say)."""


@pytest.mark.parametrize("broken", ["restore_home", "dies_with"])
async def test_a_wake_broken_off_by_an_unexpected_error_leaves_no_phase_in_flight(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, broken: str) -> None:
    """Mocked: the faults themselves (a bug cannot be made to happen on purpose). Without the guard the workspace
    read RESTORING or STARTING for good, and every later wake waited on a phase nothing would end."""
    before = _make_cold(tmp_path)
    config = settings(tmp_path, {"ws": workspace(next_address())})
    runtime = LocalRuntime(config.local)
    await runtime.start()

    def bug(*_args: object) -> None:
        raise _Bug("a bug")

    try:
        with monkeypatch.context() as patch:
            patch.setattr(f"gateway.lifecycle.local.{broken}", bug)
            with pytest.raises(_Bug):
                await runtime.wake("ws")
            state = await runtime.status("ws")
            assert state.phase is (Phase.COLD if broken == "restore_home" else Phase.FAILED)
            assert "_Bug" in state.message
            [failed] = [record for record in caplog.records if "broke off" in record.getMessage()]
            assert failed.exc_info  # the message sends people to the log: the traceback is there
            assert failed.exc_info[0] is _Bug

        assert (await runtime.wake("ws")).phase is Phase.RUNNING  # the next wake is not held up
        home, _ = _paths(tmp_path)
        assert snapshot(home) == before
    finally:
        await runtime.close()


async def test_request_to_a_cold_workspace_restores_then_serves(make_gateway: MakeGateway, tmp_path: Path) -> None:
    before = _make_cold(tmp_path)
    client = await make_gateway(workspaces={"ws": slow_workspace(next_address(), delay=0.5)})
    assert gateway_of(client).runtime.get("ws").phase is Phase.COLD  # type: ignore[union-attr]

    page = await client.get("/", headers=browser("ws"))
    assert page.status == 503
    html = await page.text()
    assert html.index('data-step="restoring"') < html.index('data-step="starting"') < html.index(
        'data-step="waiting-for-port"')
    events = await sse_events(client, preview("ws"))

    steps = [data["step"] for name, data in events if name == "progress"]
    assert [step for i, step in enumerate(steps) if i == 0 or steps[i - 1] != step] == [
        "restoring", "starting", "waiting-for-port"]
    assert all(data["from"] == "COLD" for name, data in events if name == "progress")
    assert events[-1][0] == "ready"
    response = await client.get("/", headers={"Host": preview("ws"), **API})
    assert response.status == 200
    assert await response.text() == BODY
    home, archive = _paths(tmp_path)
    assert snapshot(home) == before
    assert not archive.exists()


async def test_api_request_to_a_cold_workspace_is_held_through_the_restore(make_gateway: MakeGateway,
                                                                           tmp_path: Path) -> None:
    _make_cold(tmp_path)
    client = await make_gateway(workspaces={"ws": slow_workspace(next_address(), delay=0.5)})

    began = time.monotonic()
    response = await client.get("/", headers={"Host": preview("ws"), **API})
    held_for = time.monotonic() - began

    assert response.status == 200
    assert await response.text() == BODY
    samples = await metric_samples(client)
    assert sample(samples, "codehub_wakes_total", from_phase="COLD", result="ok") == 1
    assert sample(samples, "codehub_wake_duration_seconds_count", from_phase="COLD") == 1
    assert 0 < sample(samples, "codehub_wake_duration_seconds_sum", from_phase="COLD") <= held_for  # it woke meanwhile


async def test_storm_of_500_requests_starts_a_cold_workspace_once(make_gateway: MakeGateway, tmp_path: Path) -> None:
    _make_cold(tmp_path, big=1 << 20)
    starts_file = tmp_path / "starts"
    client = await make_gateway(workspaces={"ws": slow_workspace(next_address(), delay=3, starts=starts_file)})
    runtime = gateway_of(client).runtime
    url = client.make_url("/")
    headers = {"Host": preview("ws"), **API}

    async def one(session: aiohttp.ClientSession) -> tuple[int, str]:
        async with session.get(url, headers=headers) as response:
            return response.status, await response.text()

    with runtime.events() as events:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            storm = asyncio.gather(*(one(session) for _ in range(500)))
            peak = 0.0
            async with asyncio.timeout(60):
                while not storm.done() and peak < 500:
                    peak = max(peak, sample(await metric_samples(client), "codehub_held_requests"))
                    await asyncio.sleep(0.05)
                results = await storm
        phases = [events.queue.get_nowait() for _ in range(events.queue.qsize())]

    assert results == [(200, BODY)] * 500
    assert peak >= 250  # they were held together, not served one after another (all 500 on an idle machine)
    assert starts(starts_file) == 1
    assert [event.phase for event in phases if event.workspace == "ws"] == [
        Phase.RESTORING, Phase.STARTING, Phase.RUNNING]
    samples = await metric_samples(client)
    assert sample(samples, "codehub_held_requests") == 0
    assert sample(samples, "codehub_wakes_total", from_phase="COLD", result="ok") == 1


async def test_damaged_archive_fails_the_wake_and_keeps_the_archive(make_gateway: MakeGateway,
                                                                    tmp_path: Path) -> None:
    _make_cold(tmp_path)
    home, archive = _paths(tmp_path)
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    starts_file = tmp_path / "starts"
    client = await make_gateway(workspaces={"ws": slow_workspace(next_address(), delay=0, starts=starts_file)})

    response = await client.get("/", headers={"Host": preview("ws"), **API, **owner(client, "ws")})

    assert response.status == 503
    assert (await response.json())["error"]["message"].startswith("restoring home failed: ")
    assert archive.read_bytes() == bytes(data)
    assert not home.exists()
    assert starts(starts_file) == 0
    assert gateway_of(client).runtime.get("ws").phase is Phase.COLD  # type: ignore[union-attr]


async def test_a_port_opened_while_the_home_is_restored_shows_the_restore(make_gateway: MakeGateway, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A page on another port of a workspace that is being restored (for a request to its first port) joins that
    wake: it is a wake from COLD, restore step and all, not a plain start."""
    _make_cold(tmp_path)
    restoring = hold_restores(monkeypatch)
    client = await make_gateway(workspaces={"ws": slow_workspace(next_address(), delay=0,
                                                                 ports={8000: "public", 8001: "public"})})
    runtime = gateway_of(client).runtime
    try:
        assert (await client.get("/", headers=browser("ws", 8001))).status == 503
        async with asyncio.timeout(10):
            while runtime.get("ws").phase is not Phase.RESTORING:  # type: ignore[union-attr]  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        html = await (await client.get("/", headers=browser("ws"))).text()
    finally:
        restoring.set()
    events = await sse_events(client, preview("ws"))

    assert html.index('data-step="restoring"') < html.index('data-step="starting"') < html.index(
        'data-step="waiting-for-port"')
    assert "It was archived" in html
    assert {data["from"] for name, data in events if name == "progress"} == {"COLD"}
    assert events[-1] == ("ready", {"workspace": "ws", "port": 8000})


async def test_a_waiting_page_hears_of_the_restore_while_it_lasts(make_gateway: MakeGateway, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Each step reaches the page as it begins, with the runtime's word on it, not once the wake is over: a restore
    of a large home can take minutes, and a page that shows nothing meanwhile looks stuck."""
    _make_cold(tmp_path)
    restoring = hold_restores(monkeypatch)
    client = await make_gateway(workspaces={"ws": slow_workspace(next_address(), delay=0)})
    heard = []
    try:
        async with asyncio.timeout(30), client.get("/_codehub/wake/events",
                                                   headers={"Host": preview("ws"), **owner(client, "ws")}) as stream:
            events = read_sse(stream)
            async for name, data in events:
                heard.append((name, data["step"], data["message"]))
                if data["message"]:
                    break
            restoring.set()
            async for name, data in events:
                heard.append((name, data.get("step", ""), data.get("message", "")))
    finally:
        restoring.set()

    assert heard[0] == ("progress", "restoring", "")
    assert heard[1][:2] == ("progress", "restoring")
    assert heard[1][2]  # the runtime's message, heard while the restore was held
    assert heard[-1][0] == "ready"
    assert len(set(heard)) == len(heard)  # each step heard once, as it came, not again in a quiet stream's reminder
    assert [said for _, step, said in heard if step == "waiting-for-port"] == [""]  # the gateway's own wait: no words


async def test_the_runtimes_word_on_a_wake_is_for_its_owner_not_its_visitors(make_gateway: MakeGateway,
                                                                             tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A visitor's waiting page follows the same steps as the owner's, without what the runtime says of them (on
    Kubernetes an image's name, why no node could take the pod)."""
    _make_cold(tmp_path)
    restoring = hold_restores(monkeypatch)
    client = await make_gateway(workspaces={"ws": slow_workspace(next_address(), delay=0)})
    runtime = gateway_of(client).runtime
    try:
        assert (await client.get("/", headers=browser("ws"))).status == 503
        async with asyncio.timeout(10):
            while runtime.get("ws").phase is not Phase.RESTORING:  # type: ignore[union-attr]  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        visitors = await (await client.get("/", headers=browser("ws"))).text()
        owners = await (await client.get("/", headers={**browser("ws"), **owner(client, "ws")})).text()
        events = []
        async with asyncio.timeout(30), client.get("/_codehub/wake/events", headers={"Host": preview("ws")}) as stream:
            heard = read_sse(stream)
            async for event in heard:
                events.append(event)
                if len(events) == 2:  # the restore as it began, and what the runtime said of it
                    restoring.set()
    finally:
        restoring.set()

    said = "restoring the home directory from its archive"
    assert f'id="detail" aria-live="polite">{said}</p>' in owners
    assert 'id="detail" aria-live="polite"></p>' in visitors
    assert said not in visitors
    assert [data["step"] for name, data in events if name == "progress"][:2] == ["restoring", "restoring"]
    assert {data["message"] for name, data in events if name == "progress"} == {""}
    assert events[-1] == ("ready", {"workspace": "ws", "port": 8000})


async def test_a_request_to_a_cold_workspace_is_held_for_the_cold_timeout(make_gateway: MakeGateway,
                                                                          tmp_path: Path) -> None:
    """A restore comes before the start, so a wake from COLD may take longer than ``wake.warm_timeout``: its held
    requests wait up to ``wake.cold_timeout`` instead."""
    _make_cold(tmp_path)
    client = await make_gateway(workspaces={"ws": slow_workspace(next_address(), delay=2)},
                                policy={"wake": {"warm_timeout": 1, "cold_timeout": 60}})

    response = await client.get("/", headers={"Host": preview("ws"), **API})

    assert response.status == 200
    assert await response.text() == BODY

"""The ``--workers`` parent's control plane: its idle reaper is wired like the single process's, so a workspace a
worker is waking is never put to sleep (or archived) under it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.lifecycle import Phase, WorkspaceState
from gateway.lifecycle.idle import Activity
from gateway.metrics import Metrics
from gateway.server.control import ControlServer
from gateway.server.wiring import make_reaper, make_runtime
from tests.conftest import next_address, settings, workspace

pytestmark = pytest.mark.timeout(60)


async def test_a_workspace_a_worker_is_waking_is_not_reaped(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    config = settings(tmp_path, {"ws": workspace(next_address())},
                      idle={"to_warm": 0.001, "to_cold": 0.001, "check_every": 3600})
    runtime = make_runtime(config)
    await runtime.start()
    server = ControlServer(runtime, Activity())
    reaper = make_reaper(config, runtime, server.activity, Metrics(), busy=server.waking)
    release = asyncio.Event()
    real_wake = runtime.wake

    async def slow_wake(name: str) -> WorkspaceState:
        await release.wait()
        return await real_wake(name)

    monkeypatch.setattr(runtime, "wake", slow_wake)
    async with TestClient(TestServer(server.app())) as client:
        try:
            waking = asyncio.ensure_future(client.post("/workspaces/ws/wake"))
            async with asyncio.timeout(10):
                while not server.waking("ws"):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.01)  # long past to_cold: a WARM workspace would be archived now
            await asyncio.gather(*reaper.sweep())
            assert runtime.get("ws").phase is Phase.WARM  # type: ignore[union-attr]
            release.set()
            assert (await waking).status == 200
            assert runtime.get("ws").phase is Phase.RUNNING  # type: ignore[union-attr]
            assert server.activity.last("ws") is not None  # the wake itself was use: not reaped at once after
        finally:
            release.set()
            await reaper.close()
            await runtime.close()


async def test_the_parents_reaper_goes_by_what_the_workers_report(tmp_path: Path) -> None:
    """Workers report their newest activity and open connections to the parent, whose reaper decides: a report
    older than one already in keeps nothing awake longer, a connection open in any worker keeps its workspace
    running, and it stops counting once the worker reports it closed or the worker is gone."""
    config = settings(tmp_path, {name: workspace(next_address()) for name in ("a", "b", "c")},
                      idle={"to_warm": 60, "to_cold": 3600, "check_every": 3600})
    runtime = make_runtime(config)
    await runtime.start()
    now = [time.time()]
    server = ControlServer(runtime, Activity(clock=lambda: now[0]))
    reaper = make_reaper(config, runtime, server.activity, Metrics(), busy=server.waking)

    async def phases_after_a_pass() -> dict[str, Phase]:
        await asyncio.gather(*reaper.sweep())
        return {name: runtime.get(name).phase for name in ("a", "b", "c")}  # type: ignore[union-attr]

    async with TestClient(TestServer(server.app())) as client:
        try:
            for name in ("a", "b", "c"):
                await runtime.wake(name)
            start = now[0]
            for report in ({"source": 1, "last": {"a": start + 1000}, "open": {"b": 1}},
                           {"source": 2, "last": {"a": start - 1000}, "open": {"c": 2}}):
                assert (await client.post("/activity", json=report)).status == 204
            now[0] = start + 1030  # 30 s after a's last use, long after b's and c's wakes
            assert await phases_after_a_pass() == {"a": Phase.RUNNING, "b": Phase.RUNNING, "c": Phase.RUNNING}

            assert (await client.post("/activity", json={"source": 1, "last": {}, "open": {}})).status == 204
            server.activity.forget(2)  # what the parent does when worker 2 exits
            now[0] = start + 1070
            assert await phases_after_a_pass() == {"a": Phase.WARM, "b": Phase.WARM, "c": Phase.WARM}
        finally:
            await reaper.close()
            await runtime.close()

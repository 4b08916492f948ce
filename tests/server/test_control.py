"""The ``--workers`` parent's control plane: its idle reaper is wired like the single process's, so a workspace a
worker is waking is never put to sleep (or archived) under it."""

from __future__ import annotations

import asyncio
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

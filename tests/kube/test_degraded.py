"""Optional pieces stay optional: no VolumeSnapshot API means no COLD, and one lost cache stops only what needs it."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.errors import Conflict, NotFound
from gateway.lifecycle import LifecycleError, Phase
from gateway.lifecycle.idle import Activity, IdleTimers, reap_once
from gateway.lifecycle.kubernetes import KubernetesRuntime
from gateway.lifecycle.kubernetes.client import PVC as PVC_KIND
from gateway.metrics import Metrics
from gateway.server.app import build_app
from gateway.server.context import GATEWAY
from tests.kube.emulator import POD, PVC, VOLUME_SNAPSHOT, KubeEmulator, KubeEnv
from tests.kube.kubelet import FakeKubelet
from tests.kube.support import NS, MakeRuntime, names, new_workspace, snapshot_elsewhere, until
from tests.kube.test_gateway import gateway_config

pytestmark = pytest.mark.timeout(60)
SNAPSHOTS = "snapshot.storage.k8s.io/v1/volumesnapshots"


async def test_without_the_snapshot_api_the_gateway_starts_and_only_cold_is_off(
        kube: KubeEnv, kubelet: FakeKubelet, make_runtime: MakeRuntime, caplog: pytest.LogCaptureFixture) -> None:
    del kube.emulator.resources[SNAPSHOTS]
    with caplog.at_level(logging.WARNING):
        runtime = await make_runtime()
    warnings = [r.getMessage() for r in caplog.records if "VolumeSnapshot API" in r.getMessage()]
    assert len(warnings) == 1
    assert "COLD is disabled" in warnings[0]
    assert runtime.features() == {"cold": False, "create": True}
    assert runtime.api_healthy
    await new_workspace(runtime)
    assert (await runtime.wake("w1")).phase is Phase.RUNNING
    assert (await runtime.stop("w1")).phase is Phase.WARM
    with pytest.raises(Conflict) as refused:
        await runtime.archive("w1")
    assert refused.value.code == "cold-disabled"
    with pytest.raises(NotFound):
        await runtime.archive("nope")  # an unknown workspace is unknown first
    assert names(kube.emulator, PVC) == ["ws-w1-home"]
    timers = IdleTimers(to_warm=1, to_cold=1, check_every=1)
    state = runtime.get("w1")
    assert state is not None
    metrics = Metrics()
    caplog.clear()
    await reap_once(runtime, Activity(clock=lambda: state.since + 100), timers, metrics)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]  # no archive attempted
    assert names(kube.emulator, PVC) == ["ws-w1-home"]


async def test_the_metric_says_cold_is_off(kube: KubeEnv, aiohttp_client: Any, tmp_path: Path) -> None:
    del kube.emulator.resources[SNAPSHOTS]
    client: TestClient[web.Request, web.Application] = await aiohttp_client(build_app(gateway_config(kube, tmp_path)))
    assert client.app[GATEWAY].runtime.features() == {"cold": False, "create": True}
    scraped = client.app[GATEWAY].metrics.render().decode()
    assert 'codehub_runtime_feature{feature="cold"} 0.0' in scraped


async def lose_snapshot_watch(emu: KubeEmulator, runtime: KubernetesRuntime) -> None:
    """The snapshots' watch and list fail for good, and the runtime has noticed."""
    emu.fail("watch", VOLUME_SNAPSHOT, status=500, times=None)
    emu.fail("list", VOLUME_SNAPSHOT, status=500, times=None)
    emu.drop_watches(VOLUME_SNAPSHOT)
    await until(lambda: not runtime.api_healthy)


async def stopped_without_snapshot_watch(emu: KubeEmulator, make_runtime: MakeRuntime) -> KubernetesRuntime:
    """Workspace w1, woken and stopped (WARM), then the snapshots' watch and list fail for good."""
    runtime = await make_runtime()
    await new_workspace(runtime)
    await runtime.wake("w1")
    await runtime.stop("w1")
    await lose_snapshot_watch(emu, runtime)
    return runtime


async def test_a_lost_snapshot_watch_stops_archives_not_wakes(
        kube: KubeEnv, kubelet: FakeKubelet, make_runtime: MakeRuntime) -> None:
    emu = kube.emulator
    runtime = await stopped_without_snapshot_watch(emu, make_runtime)
    assert (await runtime.wake("w1")).phase is Phase.RUNNING  # WARM: the home is there, no snapshot needed
    with pytest.raises(LifecycleError) as refused:
        await runtime.archive("w1")
    assert refused.value.code == "kubernetes-unavailable"
    assert names(emu, POD) == ["ws-w1"]  # refused before anything was stopped


async def test_a_snapshot_watch_lost_while_an_archive_stops_the_workspace_ends_the_archive(
        kube: KubeEnv, kubelet: FakeKubelet, make_runtime: MakeRuntime) -> None:
    """An archive of a running workspace stops it first, and its pod takes a while to end; meanwhile the snapshots'
    watch is lost. What comes after the stop is decided from the snapshot cache (is a snapshot ready?), so the
    archive looks again once the stop is done and refuses clearly, its home kept and no snapshot asked for — not a
    snapshot it could never see become ready, waited for until its timeout."""
    emu = kube.emulator
    emu.controllers.pod_termination = 3.0
    runtime = await make_runtime()
    await new_workspace(runtime)
    await runtime.wake("w1")
    archiving = asyncio.create_task(runtime.archive("w1"))
    await until(lambda: runtime.get("w1").phase is Phase.STOPPING)  # type: ignore[union-attr]
    await lose_snapshot_watch(emu, runtime)
    assert not archiving.done()
    with pytest.raises(LifecycleError) as refused:
        await archiving
    assert refused.value.code == "kubernetes-unavailable"
    assert names(emu, VOLUME_SNAPSHOT) == []
    assert names(emu, PVC) == ["ws-w1-home"]


async def test_a_cold_wake_is_refused_while_the_snapshot_watch_is_lost(
        kube: KubeEnv, kubelet: FakeKubelet, make_runtime: MakeRuntime) -> None:
    emu = kube.emulator
    runtime = await stopped_without_snapshot_watch(emu, make_runtime)
    # Meanwhile another replica archives it: a snapshot this replica's cache never saw, and no home.
    snapshot_elsewhere(emu)
    emu.delete_object(PVC, NS, "ws-w1-home")
    await emu.wait_gone(PVC, NS, "ws-w1-home")
    await until(lambda: runtime.view.cached(PVC_KIND, "ws-w1-home") is None)
    with pytest.raises(LifecycleError) as refused:
        await runtime.wake("w1")
    assert refused.value.code == "kubernetes-unavailable"
    assert names(emu, PVC) == names(emu, POD) == []  # no empty home in place of the snapshot's


async def test_a_snapshot_api_that_fails_once_at_start_keeps_cold_on(
        kube: KubeEnv, kubelet: FakeKubelet, make_runtime: MakeRuntime) -> None:
    kube.emulator.fail("list", VOLUME_SNAPSHOT, status=500)  # unwell, not missing
    runtime = await make_runtime()
    assert runtime.features() == {"cold": True, "create": True}
    await new_workspace(runtime)
    await runtime.wake("w1")
    assert (await runtime.archive("w1")).phase is Phase.COLD

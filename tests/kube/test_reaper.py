"""The idle reaper on the Kubernetes runtime: concurrent, bounded, leadership checked before each workspace."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.lifecycle import Phase
from gateway.lifecycle.idle import Activity, IdleTimers, Reaper
from gateway.lifecycle.kubernetes import KubernetesRuntime
from gateway.metrics import Metrics
from tests.kube.emulator import KubeEnv
from tests.kube.kubelet import FakeKubelet
from tests.kube.support import MakeRuntime, PodIPs, new_workspace, until

pytestmark = pytest.mark.timeout(60)
TIMERS = IdleTimers(to_warm=1, to_cold=1, check_every=1)


def phase(runtime: KubernetesRuntime, workspace: str) -> Phase | None:
    state = runtime.get(workspace)
    return state.phase if state is not None else None


async def test_a_slow_snapshot_does_not_hold_the_pass(kube: KubeEnv, make_runtime: MakeRuntime,
                                                      pod_ips: PodIPs) -> None:
    runtime = await make_runtime(snapshot_timeout=30)
    async with FakeKubelet(kube.emulator, pod_ip=pod_ips, ready_snapshots=False):  # snapshots never get ready
        await new_workspace(runtime, "w1")
        await new_workspace(runtime, "w2")
        await runtime.wake("w1")
        await runtime.stop("w1")
        await runtime.wake("w2")  # w1 is WARM (due for COLD), w2 RUNNING (due for WARM)
        later = time.time() + 100
        reaper = Reaper(runtime, Activity(clock=lambda: later), TIMERS, Metrics())
        try:
            started = reaper.sweep()
            assert len(started) == 2
            await until(lambda: phase(runtime, "w2") is Phase.WARM)
            assert not reaper.tasks["w1"].done()  # its archive waits for a snapshot that never gets ready
            await until(lambda: phase(runtime, "w1") is Phase.ARCHIVING)
            first = reaper.tasks["w1"]
            assert "reap-w1" not in [task.get_name() for task in reaper.sweep()]  # in flight: not started twice
            assert reaper.tasks["w1"] is first
        finally:
            await reaper.close()


async def test_leadership_is_checked_before_each_workspace(kube: KubeEnv, make_runtime: MakeRuntime,
                                                           kubelet: FakeKubelet) -> None:
    runtime = await make_runtime()
    for name in ("w1", "w2"):
        await new_workspace(runtime, name)
        await runtime.wake(name)
    later = time.time() + 100
    reaper = Reaper(runtime, Activity(clock=lambda: later), TIMERS, Metrics(), concurrency=1,
                    is_leader=lambda: phase(runtime, "w1") is Phase.RUNNING)  # lost once w1 is stopped
    await asyncio.gather(*reaper.sweep())
    assert phase(runtime, "w1") is Phase.WARM
    assert phase(runtime, "w2") is Phase.RUNNING  # another replica leads now: not this one's to stop

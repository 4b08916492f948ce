"""The idle reaper on the Kubernetes runtime: concurrent, bounded, leadership checked before each workspace."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Set

import pytest

from gateway.lifecycle import Phase
from gateway.lifecycle.idle import Activity, IdleTimers, Reaper, reap_forever
from gateway.lifecycle.kubernetes import KubernetesRuntime
from gateway.metrics import Metrics
from tests.kube.emulator import KubeEnv
from tests.kube.kubelet import FakeKubelet
from tests.kube.support import MakeRuntime, PodIPs, kube_settings, new_workspace, until

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


async def test_what_is_kept_per_workspace_goes_with_it(kube: KubeEnv, make_runtime: MakeRuntime,
                                                       kubelet: FakeKubelet) -> None:
    """A gateway runs for months while workspaces come and go (one per branch, say): each pass forgets the deleted
    ones' last activity, and has the waker forget their past wake times; not a live one's."""
    runtime = await make_runtime()
    for name in ("w1", "w2", "w3"):
        await new_workspace(runtime, name)
    activity = Activity()
    told: list[Set[str]] = []
    reaper = Reaper(runtime, activity, TIMERS, Metrics(), keep_only=told.append)
    for name in ("w1", "w2", "w3"):
        activity.touch(name)
    await runtime.delete("w2")
    await runtime.delete("w3")
    await until(lambda: runtime.get("w2") is None and runtime.get("w3") is None)
    reaper.forget_gone()
    assert (activity.last("w1") is not None, activity.last("w2"), activity.last("w3")) == (True, None, None)
    assert told == [{"w1"}]


async def test_nothing_is_forgotten_while_the_caches_are_not_filled(kube: KubeEnv) -> None:
    """A runtime not ready lists no workspaces (its caches are empty): that says nothing of which are gone."""
    runtime = KubernetesRuntime(kube_settings(kube.url))
    activity = Activity()
    activity.touch("w1")
    told: list[Set[str]] = []
    Reaper(runtime, activity, TIMERS, Metrics(), keep_only=told.append).forget_gone()
    assert activity.last("w1") is not None
    assert told == []


async def test_every_pass_forgets_the_gone(kube: KubeEnv, make_runtime: MakeRuntime) -> None:
    runtime = await make_runtime()
    await new_workspace(runtime, "w1")
    activity = Activity()
    activity.touch("w1")
    task = asyncio.create_task(reap_forever(Reaper(runtime, activity, IdleTimers(3600, 3600, 0.05), Metrics())))
    try:
        await runtime.delete("w1")
        await until(lambda: activity.last("w1") is None)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

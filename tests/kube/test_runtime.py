"""The Kubernetes runtime against the emulated API, the real kubernetes-asyncio client and a fake kubelet."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from aiohttp import web

from gateway.config import Config
from gateway.errors import BadRequest, Conflict, NotFound
from gateway.lifecycle import LifecycleError, Phase, WorkspaceSpec
from gateway.lifecycle.kubernetes import KubernetesRuntime, phases
from gateway.lifecycle.kubernetes.client import LEASE as LEASE_KIND
from gateway.lifecycle.kubernetes.client import POD as POD_KIND
from gateway.lifecycle.kubernetes.client import WORKSPACE as WORKSPACE_KIND
from gateway.lifecycle.kubernetes.client import KubeClient
from gateway.lifecycle.kubernetes.objects import make_pod, make_pvc
from gateway.lifecycle.kubernetes.objects import parse_workspace as parse
from gateway.server.app import build_app
from gateway.server.context import GATEWAY
from tests.kube.emulator import (
    LEASE,
    POD,
    PVC,
    VOLUME_SNAPSHOT,
    WORKSPACE,
    Event,
    KubeEnv,
)
from tests.kube.kubelet import FakeKubelet
from tests.kube.support import (
    NS,
    MakeRuntime,
    PodIPs,
    kube_settings,
    names,
    new_workspace,
    recording,
    snapshot_elsewhere,
    until,
)

pytestmark = pytest.mark.timeout(60)

# --- waking, stopping, archiving ------------------------------------------------------------------

async def test_wake_creates_the_volume_and_the_pod(kube: KubeEnv, kubelet: FakeKubelet, pod_ips: PodIPs,
                                                   make_runtime: MakeRuntime) -> None:
    runtime = await make_runtime()
    await new_workspace(runtime)
    with runtime.events() as events:
        state = await runtime.wake("w1")
        seen = [events.queue.get_nowait().phase for _ in range(events.queue.qsize())]
    assert state.phase is Phase.RUNNING
    assert state.address == pod_ips.by_pod["ws-w1"]
    assert runtime.get("w1") == state
    assert Phase.STARTING in seen
    assert seen[-1] is Phase.RUNNING
    emu = kube.emulator
    assert names(emu, POD) == ["ws-w1"]
    assert names(emu, PVC) == ["ws-w1-home"]
    pod = emu.get_object(POD, NS, "ws-w1")
    assert pod is not None
    assert pod["metadata"]["labels"]["codehub.dev/workspace"] == "w1"
    assert await runtime.wake("w1") == state  # idempotent, nothing new
    assert len(emu.list_objects(POD, NS)) == 1
    await until(lambda: (emu.get_object(WORKSPACE, NS, "w1") or {}).get("status", {}).get("phase") == "RUNNING")


async def test_stop_keeps_the_volume_and_wake_from_warm_reuses_it(kube: KubeEnv, kubelet: FakeKubelet,
                                                                 make_runtime: MakeRuntime) -> None:
    runtime = await make_runtime()
    await new_workspace(runtime)
    await runtime.wake("w1")
    pvc_uid = kube.emulator.get_object(PVC, NS, "ws-w1-home")["metadata"]["uid"]  # type: ignore[index]
    state = await runtime.stop("w1")
    assert state.phase is Phase.WARM
    assert state.address is None
    assert names(kube.emulator, POD) == []
    assert names(kube.emulator, PVC) == ["ws-w1-home"]
    assert (await runtime.stop("w1")).phase is Phase.WARM  # stopping a stopped workspace is fine
    assert (await runtime.wake("w1")).phase is Phase.RUNNING
    assert kube.emulator.get_object(PVC, NS, "ws-w1-home")["metadata"]["uid"] == pvc_uid  # type: ignore[index]


async def test_a_stop_whose_pod_a_wake_elsewhere_replaced_at_once_ends_when_its_pod_is_gone(
        kube: KubeEnv, kubelet: FakeKubelet, make_runtime: MakeRuntime) -> None:
    """Replica A stops w1 and replica B wakes it again at once: B makes the next pod as soon as A's is gone. A's
    cache, listing pods again (its watch had lapsed), sees the one go and the other come in one step, never the
    name empty: a stop that waited for the name to empty waited out its start timeout and failed, though the pod
    it deleted was gone. It ends when that pod is gone, and the workspace is B's running one."""
    emu = kube.emulator
    emu.controllers.pod_termination = 0.3  # B's wake sees A's pod ending and waits for it
    a, b = await make_runtime("gw-a"), await make_runtime("gw-b")
    await new_workspace(a)
    await a.wake("w1")
    await a.informers[POD_KIND].stop()  # A's pod cache stands still until it lists again
    stopping = asyncio.create_task(a.stop("w1"))
    await until(lambda: phases.deleting(emu.get_object(POD, NS, "ws-w1")))
    assert (await b.wake("w1")).phase is Phase.RUNNING
    theirs = emu.get_object(POD, NS, "ws-w1")
    assert theirs is not None
    emu.compact()  # A resumes from a version the API no longer has: 410, and it lists again
    a.informers[POD_KIND].start()
    async with asyncio.timeout(30):
        state = await stopping
    assert state.phase is Phase.RUNNING  # woken after the stop, elsewhere
    now = emu.get_object(POD, NS, "ws-w1")
    assert now is not None
    assert now["metadata"]["uid"] == theirs["metadata"]["uid"]
    assert not now["metadata"].get("deletionTimestamp")


def _snapshot_ready(event: Event) -> bool:
    return event.resource == VOLUME_SNAPSHOT and bool((event.object.get("status") or {}).get("readyToUse"))


async def test_archive_deletes_the_volume_only_after_its_snapshot_is_ready(
        kube: KubeEnv, make_runtime: MakeRuntime, pod_ips: PodIPs) -> None:
    emu = kube.emulator
    runtime = await make_runtime(keep_snapshots=1)
    async with FakeKubelet(emu, pod_ip=pod_ips, snapshot_delay=0.3):
        await new_workspace(runtime)
        await runtime.wake("w1")
        async with recording(emu) as events:
            archiving = asyncio.create_task(runtime.archive("w1"))
            await until(lambda: bool(names(emu, VOLUME_SNAPSHOT)))
            assert runtime.get("w1").phase is Phase.ARCHIVING  # type: ignore[union-attr]
            assert names(emu, PVC) == ["ws-w1-home"]  # the snapshot is not ready yet: the volume stays
            state = await archiving
        assert state.phase is Phase.COLD
        assert names(emu, PVC) == []
        assert emu.get_object(WORKSPACE, NS, "w1")["status"]["phase"] == "COLD"  # type: ignore[index]
        order = [(e.resource, e.type) for e in events]
        ready_at = next(i for i, e in enumerate(events) if _snapshot_ready(e))
        assert order.index((PVC, "DELETED")) > ready_at
        assert order.index((POD, "DELETED")) < order.index((VOLUME_SNAPSHOT, "ADDED"))
        [first] = names(emu, VOLUME_SNAPSHOT)

        await asyncio.sleep(1.0)  # snapshot names carry a timestamp in seconds
        await runtime.wake("w1")
        async with recording(emu) as events:
            assert (await runtime.archive("w1")).phase is Phase.COLD
        [second] = names(emu, VOLUME_SNAPSHOT)
        assert second != first
        kinds = [(e.resource, e.type, e.object["metadata"]["name"]) for e in events]
        new_ready = next(i for i, e in enumerate(events) if _snapshot_ready(e))
        assert kinds.index((VOLUME_SNAPSHOT, "DELETED", first)) > new_ready  # pruned only after the new one


async def test_wake_from_cold_restores_the_volume_from_the_newest_snapshot(
        kube: KubeEnv, kubelet: FakeKubelet, make_runtime: MakeRuntime) -> None:
    emu = kube.emulator
    runtime = await make_runtime()
    await new_workspace(runtime)
    await runtime.wake("w1")
    assert (await runtime.archive("w1")).phase is Phase.COLD
    assert (await runtime.archive("w1")).phase is Phase.COLD  # nothing left to archive: fine
    [snapshot] = names(emu, VOLUME_SNAPSHOT)
    with runtime.events() as events:
        state = await runtime.wake("w1")
        published = [events.queue.get_nowait() for _ in range(events.queue.qsize())]
    seen = [event.phase for event in published]
    assert state.phase is Phase.RUNNING
    assert seen.index(Phase.RESTORING) < seen.index(Phase.STARTING) < seen.index(Phase.RUNNING)
    assert (Phase.RESTORING, f"Restoring the home volume from snapshot {snapshot}") in [
        (event.phase, event.message) for event in published]  # a line on the waiting page
    pvc = emu.get_object(PVC, NS, "ws-w1-home")
    assert pvc is not None
    assert pvc["spec"]["dataSource"] == {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot",
                                         "name": snapshot}
    assert names(emu, VOLUME_SNAPSHOT) == [snapshot]  # the snapshot outlives the restore


async def test_a_cold_workspace_whose_snapshots_are_none_ready_does_not_start_on_an_empty_home(
        kube: KubeEnv, make_runtime: MakeRuntime, pod_ips: PodIPs) -> None:
    """A COLD workspace's only snapshot is not ready (the snapshot controller is slow, or failed it). Its data is
    in that snapshot: a wake that made it an empty home (or a pod with none) would start it without its files, and
    the home made would be taken for the restored one from then on. The wake fails, saying why, and makes and
    deletes nothing; it can start once a snapshot is ready."""
    emu = kube.emulator
    runtime = await make_runtime()
    async with FakeKubelet(emu, pod_ip=pod_ips, ready_snapshots=False):
        await new_workspace(runtime)
        snapshot_elsewhere(emu)
        await until(lambda: runtime.get("w1").phase is Phase.FAILED)  # type: ignore[union-attr]
        with pytest.raises(LifecycleError, match="none is ready") as refused:
            await runtime.wake("w1")
        assert refused.value.code == "snapshot-not-ready"
        assert names(emu, PVC) == names(emu, POD) == []
        assert not list(emu["delete"])  # nor a pod or home of the name removed to make room


async def test_a_failed_snapshot_keeps_the_volume(kube: KubeEnv, make_runtime: MakeRuntime, pod_ips: PodIPs) -> None:
    emu = kube.emulator
    runtime = await make_runtime()
    async with FakeKubelet(emu, pod_ip=pod_ips, ready_snapshots=False):
        await new_workspace(runtime)
        await runtime.wake("w1")
        archiving = asyncio.create_task(runtime.archive("w1"))
        await until(lambda: bool(names(emu, VOLUME_SNAPSHOT)))
        emu.patch_status(VOLUME_SNAPSHOT, NS, names(emu, VOLUME_SNAPSHOT)[0],
                         {"readyToUse": False, "error": {"message": "out of quota"}})
        with pytest.raises(LifecycleError, match="out of quota") as failed:
            await archiving
        assert failed.value.code == "snapshot-failed"
    assert names(emu, PVC) == ["ws-w1-home"]
    assert runtime.get("w1").phase is Phase.WARM  # type: ignore[union-attr]


async def test_a_failed_pod_is_failed_and_wake_replaces_it(kube: KubeEnv, kubelet: FakeKubelet,
                                                            make_runtime: MakeRuntime) -> None:
    emu = kube.emulator
    emu.controllers.pod_termination = 0.5  # the failed pod, deleted, takes a moment to go
    runtime = await make_runtime()
    await new_workspace(runtime)
    await runtime.wake("w1")
    first = emu.get_object(POD, NS, "ws-w1")
    assert first is not None
    emu.patch_status(POD, NS, "ws-w1", {"phase": "Failed", "reason": "Evicted", "message": "low on memory"})
    await until(lambda: runtime.get("w1").phase is Phase.FAILED)  # type: ignore[union-attr]
    assert "Evicted" in runtime.get("w1").message  # type: ignore[union-attr]
    assert (await runtime.wake("w1")).phase is Phase.RUNNING
    second = emu.get_object(POD, NS, "ws-w1")
    assert second is not None
    assert second["metadata"]["uid"] != first["metadata"]["uid"]


async def test_a_wake_while_the_pod_is_ending_waits_for_it_and_makes_a_new_one(
        kube: KubeEnv, kubelet: FakeKubelet, make_runtime: MakeRuntime) -> None:
    """Another replica stops the workspace (or an operator deletes its pod), and the pod takes a moment to end;
    someone wakes the workspace through this replica meanwhile. The ending pod is no pod to wake on: taken for the
    workspace's (the create's 409), the wake would answer on a pod about to go. It waits for it to go and makes a
    new one."""
    emu = kube.emulator
    emu.controllers.pod_termination = 1.0
    runtime = await make_runtime()
    await new_workspace(runtime)
    await runtime.wake("w1")
    first = emu.get_object(POD, NS, "ws-w1")
    assert first is not None
    emu.delete_object(POD, NS, "ws-w1")
    await until(lambda: runtime.get("w1").phase is Phase.STOPPING)  # type: ignore[union-attr]
    assert (await runtime.wake("w1")).phase is Phase.RUNNING
    second = emu.get_object(POD, NS, "ws-w1")
    assert second is not None
    assert second["metadata"]["uid"] != first["metadata"]["uid"]
    assert not second["metadata"].get("deletionTimestamp")


async def test_a_name_taken_and_gone_again_between_create_and_read_is_taken(
        kube: KubeEnv, make_runtime: MakeRuntime) -> None:
    """The create of a Workspace is answered "already exists" (409), and by the read that follows to see whose it
    is, it is gone (deleted meanwhile elsewhere): the name was someone's a moment ago, so the answer is the same
    409 (try again), not a crash on the missing object."""
    runtime = await make_runtime()
    kube.emulator.fail("post", WORKSPACE, status=409)
    with pytest.raises(Conflict, match="already exists") as refused:
        await runtime.create_workspace(WorkspaceSpec(id="w1", owner="alice"))
    assert refused.value.code == "workspace-exists"


async def test_unknown_workspaces(kube: KubeEnv, make_runtime: MakeRuntime) -> None:
    runtime = await make_runtime()
    assert runtime.get("nope") is None
    assert runtime.last_activity("nope") is None  # the reaper asks of one deleted since it listed them
    for operation in (runtime.wake, runtime.stop, runtime.archive, runtime.status, runtime.delete):
        with pytest.raises(NotFound) as unknown:
            await operation("nope")
        assert unknown.value.code == "workspace-not-found"
    with pytest.raises(NotFound):
        await runtime.update("nope", ports={3000: "org"})
    await new_workspace(runtime)
    assert (await runtime.status("w1")).phase is Phase.WARM
    with pytest.raises(Conflict):
        await runtime.create_workspace(WorkspaceSpec(id="w1", owner="mallory"))
    assert (await runtime.create_workspace(WorkspaceSpec(id="w1", owner="alice"))).phase is Phase.WARM


async def test_an_update_answers_from_what_the_api_said_when_the_watch_lags(
        kube: KubeEnv, make_runtime: MakeRuntime) -> None:
    runtime = await make_runtime(request_timeout=1)
    await new_workspace(runtime)
    await runtime.informers[WORKSPACE_KIND].stop()  # the cache will not see the write
    state = await runtime.update("w1", ports={3000: "org"})
    assert state.spec.ports == {3000: "org"}
    assert state.phase is Phase.WARM


async def test_a_wait_on_a_workspace_whose_caches_do_not_change_does_not_spin(
        kube: KubeEnv, make_runtime: MakeRuntime) -> None:
    runtime = await make_runtime()
    await new_workspace(runtime)  # its caches have changed (and woken waiters) before
    looks: list[float] = []

    def never() -> None:
        looks.append(asyncio.get_running_loop().time())

    with pytest.raises(LifecycleError) as timed_out:
        await runtime.view.wait("w1", never, asyncio.get_running_loop().time() + 0.3, "nothing")
    assert timed_out.value.code == "kubernetes-timeout"
    assert len(looks) <= 3  # once, then only when something changed (nothing did): no busy loop


async def test_a_workspace_made_with_its_own_image_port_storage_and_resources_gets_them(
        kube: KubeEnv, kubelet: FakeKubelet, make_runtime: MakeRuntime) -> None:
    emu = kube.emulator
    runtime = await make_runtime()
    state = await runtime.create_workspace(WorkspaceSpec(id="w1", owner="alice", ide_port=8443),
                                           image="example/ide:2", storage="7Gi", resources={"limits": {"cpu": "2"}})
    assert state.spec.ide_port == 8443
    assert (await runtime.wake("w1")).phase is Phase.RUNNING
    pod, pvc = emu.get_object(POD, NS, "ws-w1"), emu.get_object(PVC, NS, "ws-w1-home")
    assert pod is not None
    assert pvc is not None
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "example/ide:2"
    assert container["ports"][0]["containerPort"] == 8443
    assert container["resources"] == {"limits": {"cpu": "2"}}
    assert pvc["spec"]["resources"]["requests"]["storage"] == "7Gi"
    # The gateway's own default port is not written into the Workspace: it follows the setting.
    await runtime.create_workspace(WorkspaceSpec(id="w2", owner="alice", ide_port=13337))
    stored = emu.get_object(WORKSPACE, NS, "w2")
    assert stored is not None
    assert "idePort" not in stored["spec"]


async def test_a_delete_decided_on_a_stale_cache_spares_a_namesake_made_since(
        kube: KubeEnv, make_runtime: MakeRuntime) -> None:
    emu = kube.emulator
    runtime = await make_runtime(request_timeout=1)
    await new_workspace(runtime)
    await runtime.informers[WORKSPACE_KIND].stop()  # its cache still holds the first w1
    emu.delete_object(WORKSPACE, NS, "w1")
    await emu.wait_gone(WORKSPACE, NS, "w1")
    emu.create_object(WORKSPACE, {"metadata": {"name": "w1"}, "spec": {"owner": "mallory"}}, NS)
    await runtime.delete("w1")  # meant the first w1, which is gone already
    survivor = emu.get_object(WORKSPACE, NS, "w1")
    assert survivor is not None
    assert survivor["spec"]["owner"] == "mallory"
    assert not survivor["metadata"].get("deletionTimestamp")


async def test_update_patches_the_workspace_spec(kube: KubeEnv, make_runtime: MakeRuntime) -> None:
    runtime = await make_runtime()
    await new_workspace(runtime)
    state = await runtime.update("w1", ports={3000: "org"}, collaborators=("bob", "carol"))
    assert state.spec.ports == {3000: "org"}
    assert state.spec.collaborators == ("bob", "carol")
    stored = kube.emulator.get_object(WORKSPACE, NS, "w1")
    assert stored is not None
    assert stored["spec"]["ports"] == {"3000": "org"}  # 8000 removed, not merged back
    assert parse(stored).collaborators == ("bob", "carol")
    assert runtime.get("w1") == state
    assert await runtime.update("w1") == state  # nothing to change: nothing written
    with pytest.raises(BadRequest) as refused:
        await runtime.update("w1", https_ports=frozenset({5173}))
    assert refused.value.code == "https-ports-unsupported"
    with pytest.raises(BadRequest) as refused:
        await runtime.update("w1", labels={3000: "Web"})
    assert refused.value.code == "labels-unsupported"


# --- faults ---------------------------------------------------------------------------------------

async def test_a_500_on_pod_create_is_retried(kube: KubeEnv, kubelet: FakeKubelet, make_runtime: MakeRuntime) -> None:
    runtime = await make_runtime()
    await new_workspace(runtime)
    fault = kube.emulator.fail("post", POD, status=500)
    assert (await runtime.wake("w1")).phase is Phase.RUNNING
    assert len(list(fault)) == 1
    assert names(kube.emulator, POD) == ["ws-w1"]


async def test_a_409_on_create_means_already_there(kube: KubeEnv, kubelet: FakeKubelet,
                                                  make_runtime: MakeRuntime) -> None:
    runtime = await make_runtime()
    await new_workspace(runtime)
    ws = parse(kube.emulator.get_object(WORKSPACE, NS, "w1") or {})
    kube.emulator.create_object(PVC, make_pvc(ws, runtime.settings), NS)  # another replica was quicker
    kube.emulator.create_object(POD, make_pod(ws, runtime.settings), NS)
    await until(lambda: runtime.get("w1").phase is Phase.RUNNING)  # type: ignore[union-attr]
    assert (await runtime.wake("w1")).phase is Phase.RUNNING
    assert names(kube.emulator, POD) == ["ws-w1"]


@pytest.mark.parametrize("kind", [PVC, POD], ids=["home", "pod"])
async def test_a_409_on_create_for_one_gone_by_the_read_makes_it_again(
        kube: KubeEnv, kubelet: FakeKubelet, make_runtime: MakeRuntime, kind: Any) -> None:
    """A create answered "already there" (409), and by the read that follows the one there is gone (a namesake's
    leftover the garbage collector took in between): nothing of the name is there to take or to remove, so the
    create is made again, and the wake starts on its own home and pod."""
    runtime = await make_runtime()
    await new_workspace(runtime)
    fault = kube.emulator.fail("post", kind, status=409)
    assert (await runtime.wake("w1")).phase is Phase.RUNNING
    assert len(list(fault)) == 1
    uid = (kube.emulator.get_object(WORKSPACE, NS, "w1") or {})["metadata"]["uid"]
    for made in (kube.emulator.get_object(POD, NS, "ws-w1"), kube.emulator.get_object(PVC, NS, "ws-w1-home")):
        assert made is not None
        assert [ref["uid"] for ref in made["metadata"]["ownerReferences"]] == [uid]


@pytest.mark.parametrize(("verb", "kind"), [("post", POD), ("get", WORKSPACE), ("patch", WORKSPACE)],
                         ids=["pod-create", "mark-read", "mark-write"])
async def test_an_api_that_keeps_failing_is_a_clear_503(kube: KubeEnv, kubelet: FakeKubelet,
                                                       make_runtime: MakeRuntime, verb: str, kind: Any) -> None:
    """Every call a wake makes gets the attempts the runtime was given, no more: the pod's creation, and the
    read and write of the Workspace's lifecycle mark that comes before it."""
    runtime = await make_runtime(retry_attempts=2)
    await new_workspace(runtime)
    fault = kube.emulator.fail(verb, kind, status=503, times=None)
    with pytest.raises(LifecycleError) as caught:
        await runtime.wake("w1")
    calls = [request for request in fault if not request.url.path.endswith("/status")]  # not the failure's own
    assert len(calls) == 2  # the attempts it was given
    assert caught.value.status == 503
    assert caught.value.code == "kubernetes-unavailable"
    assert "Kubernetes API unavailable" in caught.value.message


async def test_dropped_watches_resume_without_listing_again(kube: KubeEnv, make_runtime: MakeRuntime) -> None:
    runtime = await make_runtime()
    await new_workspace(runtime)
    emu = kube.emulator
    await emu.wait_watches(4)
    for abort in (False, True):
        emu.drop_watches(abort=abort)
        name = f"w{2 + abort}"
        emu.create_object(WORKSPACE, {"metadata": {"name": name}, "spec": {"owner": "bob"}}, NS)
        await until(lambda name=name: runtime.get(name) is not None)  # type: ignore[misc]
    assert {state.id for state in runtime.list()} == {"w1", "w2", "w3"}
    await until(lambda: runtime.api_healthy)  # every kind watches again after its backoff
    assert all(informer.lists == 1 for informer in runtime.informers.values())


async def test_410_gone_lists_again_and_converges(kube: KubeEnv, kubelet: FakeKubelet,
                                                 make_runtime: MakeRuntime) -> None:
    runtime = await make_runtime()
    await new_workspace(runtime)
    await runtime.wake("w1")
    emu = kube.emulator
    await emu.wait_watches(4)
    emu.compact()
    emu.drop_watches(error=410)
    emu.delete_object(POD, NS, "ws-w1")  # changes while the caches re-list
    emu.create_object(WORKSPACE, {"metadata": {"name": "w2"}, "spec": {"owner": "bob"}}, NS)
    await until(lambda: runtime.get("w1").phase is Phase.WARM and runtime.get("w2") is not None)  # type: ignore[union-attr]
    await until(lambda: all(informer.lists == 2 for informer in runtime.informers.values()))
    fault = emu.fail("watch", POD, status=410)  # a 410 on the next watch of pods only
    emu.drop_watches(POD)
    await until(lambda: len(list(fault)) == 1 and runtime.informers[POD_KIND].lists == 3)
    assert (await runtime.wake("w1")).phase is Phase.RUNNING


async def test_api_lost_serves_from_cache_and_fails_operations_clearly(
        kube: KubeEnv, kubelet: FakeKubelet, make_runtime: MakeRuntime) -> None:
    runtime = await make_runtime()
    await new_workspace(runtime, "w1")
    await new_workspace(runtime, "w2")
    running = await runtime.wake("w1")
    down = True
    kube.emulator.fail(lambda request: down, status=503, times=None)
    kube.emulator.drop_watches(abort=True)
    await until(lambda: not runtime.api_healthy)
    assert runtime.get("w1") == running  # routing keeps working for what runs
    assert {state.id for state in runtime.list()} == {"w1", "w2"}
    for operation in (runtime.wake, runtime.stop, runtime.archive):
        with pytest.raises(LifecycleError) as caught:
            await operation("w2")
        assert caught.value.status == 503
        assert caught.value.message.startswith("Kubernetes API unavailable (workspaces: ")  # which cache, why
    assert runtime.get("w2").phase is Phase.WARM  # type: ignore[union-attr]
    down = False
    await until(lambda: runtime.api_healthy, within=15)
    assert (await runtime.wake("w2")).phase is Phase.RUNNING


async def test_start_fails_clearly_without_an_api() -> None:
    runtime = KubernetesRuntime(kube_settings("http://127.0.0.1:9", sync_timeout=0.5))
    with pytest.raises(LifecycleError, match="Kubernetes API not reachable"):
        await runtime.start()
    await runtime.close()


async def test_a_gateway_that_cannot_start_closes_what_it_had_opened(tmp_path: Path) -> None:
    """The runtime fails the start after the gateway made its HTTP session and upstream pool: they are closed as
    the start fails (``serve`` logged "Unclosed client session" as it exited)."""
    config = Config.model_validate({
        "runtime": "kubernetes", "local": {"state_dir": str(tmp_path / "state")},
        "kubernetes": kube_settings("http://127.0.0.1:9", sync_timeout=0.5).model_dump(mode="json")})
    app = build_app(config)
    runner = web.AppRunner(app)
    with pytest.raises(LifecycleError, match="Kubernetes API not reachable"):
        await runner.setup()
    assert app[GATEWAY].session.closed


# --- several replicas -----------------------------------------------------------------------------

async def test_a_storm_of_wakes_from_two_replicas_makes_one_pod(kube: KubeEnv, make_runtime: MakeRuntime,
                                                               pod_ips: PodIPs) -> None:
    emu = kube.emulator
    a, b = await make_runtime("gw-a"), await make_runtime("gw-b")
    assert a._api is not b._api  # two clients, two connection pools: two gateways
    await new_workspace(a)
    await until(lambda: b.get("w1") is not None)
    async with FakeKubelet(emu, pod_ip=pod_ips, pod_delay=0.2), recording(emu) as events:
        states = await asyncio.gather(*(runtime.wake("w1") for _ in range(10) for runtime in (a, b)))
    assert {state.phase for state in states} == {Phase.RUNNING}
    assert {state.address for state in states} == {pod_ips.by_pod["ws-w1"]}
    assert [(e.type, e.object["metadata"]["name"]) for e in events if e.resource == POD and e.type == "ADDED"] == [
        ("ADDED", "ws-w1")]
    assert [e.type for e in events if e.resource == PVC and e.type == "ADDED"] == ["ADDED"]
    assert len(list(emu["post", POD])) == 2  # one per replica (each serialises its own), one of them got 409


def test_a_runtime_is_named_after_its_pod_or_its_host_and_process_and_leads_nothing_before_it_starts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "gateway-7d9f-abcde")
    assert KubernetesRuntime(kube_settings("http://127.0.0.1:1")).identity == "gateway-7d9f-abcde"
    monkeypatch.delenv("POD_NAME")
    runtime = KubernetesRuntime(kube_settings("http://127.0.0.1:1"))
    assert runtime.identity == f"{socket.gethostname()}-{os.getpid()}"
    assert runtime.is_leader() is False
    assert runtime.features() == {"cold": True, "create": True}  # until it finds no VolumeSnapshot API
    runtime.record_activity("w1", 1.0)  # a request served before the runtime started is not an error
    assert runtime.last_activity("w1") is None


async def test_exactly_one_leader_and_failover(kube: KubeEnv, make_runtime: MakeRuntime) -> None:
    a, b = await make_runtime("gw-a"), await make_runtime("gw-b")
    await until(lambda: a.is_leader() or b.is_leader())
    for _ in range(20):  # stays exactly one over several renewals
        assert a.is_leader() != b.is_leader()
        await asyncio.sleep(0.1)
    leader, follower = (a, b) if a.is_leader() else (b, a)
    assert leader.leader is not None
    first = (kube.emulator.get_object(LEASE, NS, "codehub-gateway-reaper") or {})["spec"]
    await leader.leader.stop(release=False)  # crashes: no release, the follower waits for expiry
    assert not leader.is_leader()
    await until(follower.is_leader, within=5)
    lease = kube.emulator.get_object(LEASE, NS, "codehub-gateway-reaper")
    assert lease is not None
    assert lease["spec"]["holderIdentity"] == follower.identity
    assert lease["spec"]["leaseTransitions"] == 1  # the takeover; renewals are no transitions
    taken = lease["spec"]
    assert taken["acquireTime"] != first["acquireTime"]  # acquired anew by the follower
    await until(lambda: (kube.emulator.get_object(LEASE, NS, "codehub-gateway-reaper") or {})["spec"].get(
        "renewTime") != taken["renewTime"])
    renewed = (kube.emulator.get_object(LEASE, NS, "codehub-gateway-reaper") or {})["spec"]
    assert (renewed["holderIdentity"], renewed["acquireTime"]) == (follower.identity, taken["acquireTime"])
    await follower.close()  # a clean stop releases the lease at once
    lease = kube.emulator.get_object(LEASE, NS, "codehub-gateway-reaper")
    assert lease is not None
    assert "holderIdentity" not in lease["spec"]
    assert lease["spec"]["leaseTransitions"] == 1  # kept by the release
    c = await make_runtime("gw-c")
    await until(c.is_leader)
    assert (kube.emulator.get_object(LEASE, NS, "codehub-gateway-reaper") or {})["spec"]["leaseTransitions"] == 2


async def test_a_409_on_the_lease_loses_that_round(kube: KubeEnv) -> None:
    from gateway.lifecycle.kubernetes.leader import LeaderElector

    client = KubeClient(kube.new_api_client(), NS)
    elector = LeaderElector(client, "reaper", "gw-a", duration=5)
    assert await elector.try_acquire_or_renew()
    kube.emulator.fail("put", LEASE, status=409)
    assert not await elector.try_acquire_or_renew()
    assert not elector.is_leader()
    assert await elector.try_acquire_or_renew()  # the lease is still ours: renewed next round
    other = LeaderElector(client, "reaper", "gw-b", duration=5)
    assert not await other.try_acquire_or_renew()
    assert (await client.get(LEASE_KIND, "reaper") or {})["spec"]["holderIdentity"] == "gw-a"


async def test_activity_is_shared_through_the_workspace_status(kube: KubeEnv, make_runtime: MakeRuntime) -> None:
    a, b = await make_runtime("gw-a"), await make_runtime("gw-b")
    await new_workspace(a)
    await until(lambda: b.get("w1") is not None)
    for at in (1_800_000_000.0, 1_800_000_001.0, 1_800_000_002.0):
        a.record_activity("w1", at)
    await until(lambda: b.last_activity("w1") == 1_800_000_002.0)
    assert a.activity is not None
    assert a.activity.writes == 1  # throttled: one write for the burst
    b.record_activity("w1", 1_700_000_000.0)  # older: never overwrites a newer time
    await asyncio.sleep(0.3)  # b's write would go at once (it has written none)
    assert b.last_activity("w1") == 1_800_000_002.0
    assert b.activity is not None
    assert b.activity.writes == 0
    a.record_activity("w1", 1_800_000_100.0)
    await until(lambda: b.last_activity("w1") == 1_800_000_100.0)
    await asyncio.sleep(0.5)
    assert a.last_activity("w1") == 1_800_000_100.0
    stored = kube.emulator.get_object(WORKSPACE, NS, "w1")
    assert stored is not None
    assert stored["status"]["lastActivity"] == "2027-01-15T08:01:40Z"


async def test_activity_written_on_a_stale_cache_is_read_again_and_written(
        kube: KubeEnv, make_runtime: MakeRuntime) -> None:
    a = await make_runtime("gw-a")
    await new_workspace(a)
    await a.informers[WORKSPACE_KIND].stop()  # its cached resourceVersion will be stale
    kube.emulator.patch_object(WORKSPACE, NS, "w1", {"spec": {"collaborators": ["bob"]}})  # someone writes
    a.record_activity("w1", 1_800_000_000.0)  # 409 on the cached version: read again, write again
    await until(lambda: ((kube.emulator.get_object(WORKSPACE, NS, "w1") or {}).get("status") or {}).get(
        "lastActivity") == "2027-01-15T08:00:00Z")


async def test_activity_the_api_server_failed_to_take_is_written_again(
        kube: KubeEnv, make_runtime: MakeRuntime) -> None:
    """The API server fails a write of the workspace's last use (a 500 while it restarts): the use is written again
    an interval later, not lost — or the leader's reaper would stop a workspace in use."""
    a = await make_runtime("gw-a")
    await new_workspace(a)
    failed = kube.emulator.fail("patch", WORKSPACE, status=500)
    a.record_activity("w1", 1_800_000_000.0)
    await until(lambda: len(list(failed)) == 1)
    await until(lambda: ((kube.emulator.get_object(WORKSPACE, NS, "w1") or {}).get("status") or {}).get(
        "lastActivity") == "2027-01-15T08:00:00Z")


async def test_a_replica_shutting_down_writes_the_activity_it_still_holds(
        kube: KubeEnv, make_runtime: MakeRuntime) -> None:
    a, b = await make_runtime("gw-a", activity_interval=600), await make_runtime("gw-b")
    await new_workspace(a)
    a.record_activity("w1", 1_800_000_000.0)  # written at once, then none for an interval
    await until(lambda: b.last_activity("w1") == 1_800_000_000.0)
    a.record_activity("w1", 1_800_000_100.0)
    a.record_activity("w1", 1_800_000_050.0)  # a worker's report of an older use, come later: the newest holds
    await asyncio.sleep(0.3)
    assert a.activity is not None
    assert a.activity.writes == 1  # held for the rest of the interval
    await a.close()  # a rolling update: the newer use is not lost, so the reaper does not stop a busy workspace
    await until(lambda: b.last_activity("w1") == 1_800_000_100.0)


# --- every manifest the runtime sends is valid ----------------------------------------------------

async def test_every_manifest_sent_validates_strictly(kube: KubeEnv, kubelet: FakeKubelet,
                                                      make_runtime: MakeRuntime) -> None:
    runtime = await make_runtime()
    await new_workspace(runtime)
    await runtime.wake("w1")
    await runtime.archive("w1")
    await runtime.wake("w1")
    await until(runtime.is_leader)
    await runtime.close()  # releases the lease: one more PUT
    bodies = [request.data for request in [*kube.emulator["post"], *kube.emulator["put"]]]
    checked: set[str] = set()
    for body in bodies:
        assert isinstance(body, dict)
        try:
            kubernetes_validate.validate(body, "1.30", strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert body["kind"] in ("Workspace", "VolumeSnapshot")  # custom kinds: no schema to check
            continue
        checked.add(body["kind"])
    assert checked == {"Pod", "PersistentVolumeClaim", "Lease"}

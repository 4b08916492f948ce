"""Archive on one replica, wake on another: the API server orders them, and no home is lost either way."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import kmock
import pytest
from kmock._internal import rendering  # Response(status=..., payload=...), as the emulator uses it

from gateway.errors import NotFound
from gateway.lifecycle import LifecycleError, Phase
from gateway.lifecycle.kubernetes.client import POD as POD_KIND
from gateway.lifecycle.kubernetes.intent import INTENT
from tests.kube.emulator import POD, PVC, VOLUME_SNAPSHOT, WORKSPACE, KubeEnv, k8s_status
from tests.kube.kubelet import FakeKubelet
from tests.kube.support import ARCHIVED, NS, MakeRuntime, PodIPs, names, new_workspace, snapshot_elsewhere, until

pytestmark = pytest.mark.timeout(60)


def intent(kube: KubeEnv) -> str | None:
    obj = kube.emulator.get_object(WORKSPACE, NS, "w1") or {}
    value = (obj.get("metadata", {}).get("annotations") or {}).get(INTENT)
    return str(value) if value is not None else None


async def test_a_wake_elsewhere_during_the_snapshot_aborts_the_archive_and_keeps_the_home(
        kube: KubeEnv, make_runtime: MakeRuntime, pod_ips: PodIPs) -> None:
    emu = kube.emulator
    archiver, waker = await make_runtime("gw-a"), await make_runtime("gw-b")
    async with FakeKubelet(emu, pod_ip=pod_ips, snapshot_delay=0.6):
        await new_workspace(archiver)
        await archiver.wake("w1")
        await archiver.stop("w1")
        home = emu.get_object(PVC, NS, "ws-w1-home")["metadata"]["uid"]  # type: ignore[index]
        await archiver.informers[POD_KIND].stop()  # its cache will not see the other replica's pod in time
        archiving = asyncio.create_task(archiver.archive("w1"))
        await until(lambda: bool(names(emu, VOLUME_SNAPSHOT)))
        assert (intent(kube) or "").startswith("archiving/gw-a/")
        await until(lambda: waker.get("w1") is not None and waker.get("w1").phase is Phase.ARCHIVING)  # type: ignore[union-attr]
        assert (await waker.wake("w1")).phase is Phase.RUNNING
        assert (intent(kube) or "").startswith("awake/gw-b/")
        await archiving
        claims = [r for r in emu["patch", WORKSPACE] if r.subresource is None and INTENT in json.dumps(r.data)]
        assert len(claims) >= 2  # the archive's claim and the wake's (and any redone after a 409)
        assert all(r.data["metadata"].get("resourceVersion") for r in claims)  # each a compare-and-swap
        await asyncio.sleep(0.2)
        pvc = emu.get_object(PVC, NS, "ws-w1-home")
        assert pvc is not None
        assert pvc["metadata"]["uid"] == home
        assert not pvc["metadata"].get("deletionTimestamp")  # the running pod's home was never deleted
        assert (intent(kube) or "").startswith("awake/gw-b/")


async def test_an_archive_overtaken_by_a_wake_on_its_replica_keeps_the_home(
        kube: KubeEnv, make_runtime: MakeRuntime, kubelet: FakeKubelet) -> None:
    """The reaper archives a running workspace: first its pod is stopped (which takes a moment), and a wake asked of
    the same replica meanwhile comes before the archive's turn, and starts the workspace again. The archive then
    finds a pod running on the home: snapshotting it and deleting it would take the home from under a running
    workspace. It leaves it (the workspace stays RUNNING) and takes no snapshot."""
    emu = kube.emulator
    emu.controllers.pod_termination = 0.5
    runtime = await make_runtime()
    await new_workspace(runtime)
    await runtime.wake("w1")
    home = emu.get_object(PVC, NS, "ws-w1-home")["metadata"]["uid"]  # type: ignore[index]
    archiving = asyncio.create_task(runtime.archive("w1"))
    await until(lambda: runtime.get("w1").phase is Phase.STOPPING)  # type: ignore[union-attr]
    waking = asyncio.create_task(runtime.wake("w1"))
    assert (await archiving).phase is Phase.RUNNING
    assert (await waking).phase is Phase.RUNNING
    assert names(emu, VOLUME_SNAPSHOT) == []
    pvc = emu.get_object(PVC, NS, "ws-w1-home")
    assert pvc is not None
    assert pvc["metadata"]["uid"] == home
    assert not pvc["metadata"].get("deletionTimestamp")


async def test_a_wake_after_the_archive_committed_waits_and_restores(
        kube: KubeEnv, make_runtime: MakeRuntime, kubelet: FakeKubelet) -> None:
    emu = kube.emulator
    runtime = await make_runtime()
    await new_workspace(runtime)
    await runtime.wake("w1")
    await runtime.stop("w1")
    snapshot_elsewhere(emu)
    await emu.wait_for(VOLUME_SNAPSHOT, NS, ARCHIVED,
                       lambda s: bool(s.get("status", {}).get("readyToUse")))
    # Another replica committed to deleting the volume, then died before it did.
    emu.patch_object(WORKSPACE, NS, "w1", {"metadata": {"annotations": {INTENT: "deleting/gw-z/1"}}})
    home = emu.get_object(PVC, NS, "ws-w1-home")
    assert home is not None
    old = home["metadata"]["uid"]
    emu.patch_object(PVC, NS, "ws-w1-home", {"metadata": {"finalizers": [*home["metadata"]["finalizers"],
                                                                         "test.example/hold"]}})
    waking = asyncio.create_task(runtime.wake("w1"))
    await until(lambda: bool((emu.get_object(PVC, NS, "ws-w1-home") or {})["metadata"].get("deletionTimestamp")))
    await asyncio.sleep(0.3)
    assert len(list(emu["delete", PVC])) == 1  # the wake finishes the deletion once, then waits for it
    assert names(emu, POD) == []
    emu.patch_object(PVC, NS, "ws-w1-home", {"metadata": {"finalizers": None}})
    assert (await waking).phase is Phase.RUNNING
    pvc = emu.get_object(PVC, NS, "ws-w1-home")
    assert pvc is not None
    assert pvc["metadata"]["uid"] != old
    assert pvc["spec"]["dataSource"]["name"] == ARCHIVED
    assert (intent(kube) or "").startswith("awake/gw-a/")


async def test_an_archive_does_not_start_over_another_in_progress(
        kube: KubeEnv, make_runtime: MakeRuntime, kubelet: FakeKubelet) -> None:
    emu = kube.emulator
    runtime = await make_runtime()
    await new_workspace(runtime)
    await runtime.wake("w1")
    await runtime.stop("w1")
    emu.patch_object(WORKSPACE, NS, "w1", {"metadata": {"annotations": {
        INTENT: f"archiving/gw-z/{time.time():.6f}"}}})
    await runtime.archive("w1")
    assert names(emu, VOLUME_SNAPSHOT) == []  # the other replica's archive is not doubled
    assert names(emu, PVC) == ["ws-w1-home"]


async def test_an_unreadable_archive_claim_does_not_block_archives_forever(
        kube: KubeEnv, make_runtime: MakeRuntime, kubelet: FakeKubelet) -> None:
    runtime = await make_runtime()
    await new_workspace(runtime)
    await runtime.wake("w1")
    await runtime.stop("w1")
    kube.emulator.patch_object(WORKSPACE, NS, "w1", {"metadata": {"annotations": {INTENT: "archiving/gw-z"}}})
    assert (await runtime.archive("w1")).phase is Phase.COLD  # nobody can vouch for a claim without a time
    assert names(kube.emulator, PVC) == []


async def test_a_wake_waits_for_a_terminating_home_and_makes_a_new_one(
        kube: KubeEnv, make_runtime: MakeRuntime, kubelet: FakeKubelet) -> None:
    emu = kube.emulator
    runtime = await make_runtime()
    await new_workspace(runtime)
    await runtime.wake("w1")
    await runtime.stop("w1")
    old = emu.get_object(PVC, NS, "ws-w1-home")
    assert old is not None
    emu.patch_object(PVC, NS, "ws-w1-home", {"metadata": {"finalizers": [*old["metadata"]["finalizers"],
                                                                         "test.example/hold"]}})
    emu.delete_object(PVC, NS, "ws-w1-home")  # kubectl delete pvc: terminating, held by a finalizer
    await until(lambda: runtime.get("w1") is not None and runtime.get("w1").phase is Phase.ARCHIVING)  # type: ignore[union-attr]
    waking = asyncio.create_task(runtime.wake("w1"))
    await asyncio.sleep(0.3)
    assert names(emu, POD) == []  # no pod is put on a volume that is going away
    emu.patch_object(PVC, NS, "ws-w1-home", {"metadata": {"finalizers": None}})
    assert (await waking).phase is Phase.RUNNING
    new = emu.get_object(PVC, NS, "ws-w1-home")
    assert new is not None
    assert new["metadata"]["uid"] != old["metadata"]["uid"]


@pytest.mark.parametrize(("status", "reason", "says", "code", "tries"), [
    (409, "Conflict", "kept changing; try again", "kubernetes-conflict", range(2, 21)),
    (422, "Invalid", "Kubernetes refused the operation: no such annotation here", "kubernetes-refused", [1]),
], ids=["keeps-losing", "refused"])
async def test_a_claim_the_api_server_will_not_take_fails_the_wake_with_its_reason(
        kube: KubeEnv, make_runtime: MakeRuntime, status: int, reason: str, says: str, code: str,
        tries: range | list[int]) -> None:
    """A wake's claim on its home is a write the API server may not take. Another writer changes the Workspace
    between each read and write (every claim answered 409): the wake reads and claims again, round after round,
    then gives up with "kept changing; try again" — not for ever, not with a crash. An admission webhook refuses
    it (422): that is said at once, in the server's words, not tried again as if someone had written first.
    Either way no pod is made without a claim."""
    emu = kube.emulator
    runtime = await make_runtime()
    await new_workspace(runtime)
    refused: list[kmock.Request] = []

    def refuse(request: kmock.Request) -> Any:
        if request.subresource is not None or INTENT not in json.dumps(request.data):
            return None  # the emulator serves it
        refused.append(request)
        message = "the object has been modified" if status == 409 else "no such annotation here"
        return rendering.Response(status=status, payload=k8s_status(status, reason, message))

    emu["patch", WORKSPACE] << refuse
    with pytest.raises(LifecycleError, match=says) as caught:
        await runtime.wake("w1")
    assert caught.value.code == code
    assert len(refused) in tries
    assert names(emu, POD) == []


async def test_a_claim_on_a_workspace_the_api_no_longer_has_is_404(
        kube: KubeEnv, make_runtime: MakeRuntime) -> None:
    """The Workspace was deleted through another replica and this one's cache has not heard yet: its wake reads
    the Workspace afresh to claim the home, finds none, and answers that there is no such workspace (404) rather
    than failing on the missing object; nothing is made for it."""
    emu = kube.emulator
    runtime = await make_runtime()
    await new_workspace(runtime)
    emu["get", WORKSPACE] << (lambda request: rendering.Response(
        status=404, payload=k8s_status(404, "NotFound", 'workspaces "w1" not found')) if request.name == "w1"
        else None)
    with pytest.raises(NotFound, match="There is no workspace called w1") as caught:
        await runtime.wake("w1")
    assert caught.value.code == "workspace-not-found"
    assert names(emu, POD) == []
    assert names(emu, PVC) == []

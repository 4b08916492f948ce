"""A workspace owns its pod, home and snapshots: they go with it, and a namesake never inherits them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.auth.identity import Identity
from gateway.errors import Conflict, NotFound
from gateway.lifecycle import Phase, WorkspaceSpec
from gateway.lifecycle.kubernetes.client import POD as POD_KIND
from gateway.server.app import build_app
from gateway.server.context import GATEWAY
from tests.kube.emulator import POD, PVC, VOLUME_SNAPSHOT, WORKSPACE, KubeEnv
from tests.kube.kubelet import FakeKubelet
from tests.kube.support import NS, MakeRuntime, names, new_workspace, until
from tests.kube.test_gateway import gateway_config

pytestmark = pytest.mark.timeout(60)


def owner_uids(obj: dict[str, Any] | None) -> list[str]:
    assert obj is not None
    return [ref["uid"] for ref in obj["metadata"].get("ownerReferences") or []]


async def test_deleting_a_workspace_deletes_its_pod_home_and_snapshots(
        kube: KubeEnv, kubelet: FakeKubelet, make_runtime: MakeRuntime) -> None:
    emu = kube.emulator
    runtime = await make_runtime()
    await new_workspace(runtime)
    await runtime.wake("w1")
    await runtime.archive("w1")
    await runtime.wake("w1")  # restored: a pod, a PVC and a snapshot now exist
    uid = emu.get_object(WORKSPACE, NS, "w1")["metadata"]["uid"]  # type: ignore[index]
    (snapshot,) = emu.list_objects(VOLUME_SNAPSHOT, NS)
    for obj in (emu.get_object(POD, NS, "ws-w1"), emu.get_object(PVC, NS, "ws-w1-home"), snapshot):
        assert owner_uids(obj) == [uid]
        assert obj["metadata"]["ownerReferences"][0] | {"uid": ""} == {  # type: ignore[index]
            "apiVersion": "codehub.dev/v1alpha1", "kind": "Workspace", "name": "w1", "uid": "",
            "controller": True, "blockOwnerDeletion": True}

    await runtime.delete("w1")
    assert runtime.get("w1") is None  # terminating: gone for routing and wakes at once
    with pytest.raises(NotFound):
        await runtime.wake("w1")
    await emu.wait_gone(WORKSPACE, NS, "w1")  # foreground: the Workspace goes last
    assert names(emu, POD) == names(emu, PVC) == names(emu, VOLUME_SNAPSHOT) == []


async def test_a_new_workspace_of_an_old_name_inherits_nothing(
        kube: KubeEnv, kubelet: FakeKubelet, make_runtime: MakeRuntime) -> None:
    emu = kube.emulator
    emu.controllers.paused_gc = True  # a busy garbage collector: the old pod and home are still there
    emu.controllers.pod_termination = 0.3  # and the old pod, once deleted, takes a moment to go
    runtime = await make_runtime()
    await new_workspace(runtime)
    await runtime.wake("w1")
    old_pvc = emu.get_object(PVC, NS, "ws-w1-home")["metadata"]["uid"]  # type: ignore[index]
    old_pod = emu.get_object(POD, NS, "ws-w1")["metadata"]["uid"]  # type: ignore[index]
    emu.delete_object(WORKSPACE, NS, "w1")  # kubectl delete workspace w1
    await until(lambda: runtime.get("w1") is None)

    state = await runtime.create_workspace(WorkspaceSpec(id="w1", owner="mallory", ports={8000: "public"}))
    assert state.phase is Phase.WARM  # not RUNNING on the old pod
    uid = emu.get_object(WORKSPACE, NS, "w1")["metadata"]["uid"]  # type: ignore[index]
    state = await runtime.wake("w1")
    assert state.phase is Phase.RUNNING
    pvc = emu.get_object(PVC, NS, "ws-w1-home")
    assert pvc is not None
    assert pvc["metadata"]["uid"] != old_pvc  # a fresh, empty home
    assert owner_uids(pvc) == [uid]
    assert owner_uids(emu.get_object(POD, NS, "ws-w1")) == [uid]
    # The old ones were deleted by UID: had a replica made the new ones first, they would have been spared.
    assert [r.data for r in emu["delete", POD]] == [{"preconditions": {"uid": old_pod}}]
    assert [r.data for r in emu["delete", PVC]] == [{"preconditions": {"uid": old_pvc}}]


async def test_a_name_is_not_reused_while_its_workspace_is_being_deleted(
        kube: KubeEnv, kubelet: FakeKubelet, make_runtime: MakeRuntime) -> None:
    emu = kube.emulator
    emu.controllers.paused_gc = True
    runtime = await make_runtime()
    await new_workspace(runtime)
    await runtime.wake("w1")
    await runtime.delete("w1")
    assert kube.emulator.get_object(WORKSPACE, NS, "w1") is not None  # terminating: its pod and home remain
    assert runtime.get("w1") is None  # but it is gone for routing, links and wakes
    with pytest.raises(NotFound):
        await runtime.wake("w1")
    with pytest.raises(Conflict, match="still being deleted") as refused:
        await runtime.create_workspace(WorkspaceSpec(id="w1", owner="alice"))
    assert refused.value.code == "workspace-exists"
    emu.controllers.paused_gc = False
    emu.controllers.reconcile()
    await emu.wait_gone(WORKSPACE, NS, "w1")


async def test_a_wake_that_waited_its_turn_does_not_start_a_workspace_deleted_meanwhile(
        kube: KubeEnv, kubelet: FakeKubelet, make_runtime: MakeRuntime) -> None:
    """Alice stops her workspace (its pod takes a moment to end) and someone asks for a wake of it meanwhile,
    which waits its turn; before it comes, she deletes the workspace, which stays terminating while its home is
    still there (a busy garbage collector). The wake's Workspace is the very one asked for (same uid), but it is
    being deleted: starting it would make a pod, with its home mounted, for a workspace its owner has deleted.
    A workspace being deleted is no workspace (404), and no pod is made."""
    emu = kube.emulator
    emu.controllers.paused_gc = True
    emu.controllers.pod_termination = 1.0
    runtime = await make_runtime()
    await new_workspace(runtime)
    await runtime.wake("w1")
    stop = asyncio.create_task(runtime.stop("w1"))
    await asyncio.sleep(0)  # the stop holds the workspace until its pod is gone
    wake = asyncio.create_task(runtime.wake("w1"))
    await until(lambda: (emu.get_object(POD, NS, "ws-w1") or {}).get("metadata", {}).get("deletionTimestamp")
                is not None)
    await runtime.delete("w1")
    assert not stop.done()
    for operation in (stop, wake):  # the stop ends on a workspace that is no more, and the wake begins on one
        with pytest.raises(NotFound):
            await operation
    assert emu.get_object(WORKSPACE, NS, "w1") is not None  # terminating still
    assert names(emu, POD) == []


async def test_the_api_and_its_owner_delete_a_workspace(kube: KubeEnv, aiohttp_client: Any, tmp_path: Path) -> None:
    emu = kube.emulator
    client: TestClient[web.Request, web.Application] = await aiohttp_client(build_app(gateway_config(kube, tmp_path)))
    gateway = client.app[GATEWAY]
    _a, alice = await gateway.auth.store.create_api_token(Identity("alice"), name="test")
    _b, bob = await gateway.auth.store.create_api_token(Identity("bob"), name="test")
    created = await client.post("/api/v1/workspaces", json={"id": "gone1", "collaborators": ["bob"]},
                                headers={"Host": "localhost:8080", "Authorization": f"Bearer {alice}"})
    assert created.status == 201
    refused = await client.delete("/api/v1/workspaces/gone1",
                                  headers={"Host": "localhost:8080", "Authorization": f"Bearer {bob}"})
    assert refused.status == 403
    deleted = await client.delete("/api/v1/workspaces/gone1",
                                  headers={"Host": "localhost:8080", "Authorization": f"Bearer {alice}"})
    assert deleted.status == 200
    assert await deleted.json() == {"id": "gone1", "deleted": True}
    await emu.wait_gone(WORKSPACE, NS, "gone1")
    again = await client.get("/api/v1/workspaces/gone1",
                             headers={"Host": "localhost:8080", "Authorization": f"Bearer {alice}"})
    assert again.status == 404


async def test_a_pod_not_labelled_for_a_workspace_is_not_taken_for_its_pod(
        kube: KubeEnv, make_runtime: MakeRuntime) -> None:
    kube.emulator.create_object(POD, {  # the gateway's name and manager label, but not its workspace label
        "metadata": {"name": "ws-w1", "labels": {"app.kubernetes.io/managed-by": "codehub-gateway"}},
        "spec": {"containers": [{"name": "c", "image": "i"}]}}, NS)
    runtime = await make_runtime()
    await new_workspace(runtime)  # WARM: no pod of its own
    assert runtime.view.cached(POD_KIND, "ws-w1") is None


async def test_another_workspaces_snapshot_is_never_restored_into_this_one(
        kube: KubeEnv, kubelet: FakeKubelet, make_runtime: MakeRuntime) -> None:
    emu = kube.emulator
    emu.create_object(VOLUME_SNAPSHOT, {  # w2's, made before snapshots had owners
        "metadata": {"name": "ws-w2-home-20260101000000",
                     "labels": {"app.kubernetes.io/managed-by": "codehub-gateway", "codehub.dev/workspace": "w2"}},
        "spec": {"source": {"persistentVolumeClaimName": "ws-w2-home"}}}, NS)
    await emu.wait_for(VOLUME_SNAPSHOT, NS, "ws-w2-home-20260101000000",
                       lambda s: bool(s.get("status", {}).get("readyToUse")))
    runtime = await make_runtime()
    await new_workspace(runtime)  # WARM and new, not COLD on w2's snapshot
    assert (await runtime.wake("w1")).phase is Phase.RUNNING
    pvc = emu.get_object(PVC, NS, "ws-w1-home")
    assert pvc is not None
    assert "dataSource" not in pvc["spec"]  # an empty home, not a copy of w2's

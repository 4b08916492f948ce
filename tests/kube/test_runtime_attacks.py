"""Attacks on the Kubernetes runtime's writes: a name that passes to someone else between the moment the runtime
looked at it and the moment its write reached the API server (see README, "Security model").

Each test shows what an attacker did and what they must not get.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kmock
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from kmock._internal import rendering  # Response(status=..., payload=...), as the emulator uses it

from gateway.errors import NotFound
from gateway.lifecycle import LifecycleError, Phase, WorkspaceSpec
from gateway.lifecycle.kubernetes.objects import WorkspaceResource, make_workspace
from gateway.server.app import build_app
from gateway.server.context import GATEWAY
from tests.auth.test_api_attacks import mallory_and_victim
from tests.kube.emulator import POD, PVC, VOLUME_SNAPSHOT, WORKSPACE, KubeEmulator, KubeEnv, k8s_status
from tests.kube.kubelet import FakeKubelet
from tests.kube.support import NS, MakeRuntime, PodIPs, until
from tests.kube.test_gateway import gateway_config

pytestmark = pytest.mark.timeout(60)


def namesake_before_the_next_patch(emu: KubeEmulator, name: str, owner: str) -> list[bool]:
    """The next change of Workspace ``name`` (not its status) finds it deleted and made again by ``owner``, as
    when another replica served both a moment earlier and this one's watch has not said so yet: the write then
    goes on to the API server as it came. The list holds True once that happened."""
    done: list[bool] = []

    def swap(request: kmock.Request) -> Any:
        if request.subresource is not None or request.name != name or done:
            return None  # kmock: no answer from this reaction; the emulator serves it
        done.append(True)
        emu.delete_object(WORKSPACE, NS, name)
        emu.create_object(WORKSPACE, make_workspace(WorkspaceResource(id=name, owner=owner, ports={3000: "private"})),
                          NS)
        return None

    emu["patch", WORKSPACE] << swap
    return done


@pytest.mark.parametrize(("path", "body", "harm"), [
    ("/collaborators", {"collaborators": ["mallory"]}, lambda spec: "mallory" in spec.get("collaborators", [])),
    ("/ports/3000", {"visibility": "public"}, lambda spec: spec.get("ports", {}).get("3000") == "public"),
], ids=["collaborators", "port"])
async def test_a_change_whose_workspace_passed_to_someone_else_meanwhile_does_not_land_on_theirs(
        kube: KubeEnv, aiohttp_client: Any, tmp_path: Path, path: str, body: dict[str, Any],
        harm: Callable[[dict[str, Any]], bool]) -> None:
    """Mallory changes her workspace ``demo`` (names herself a collaborator, makes port 3000 public) at the moment
    it is deleted and Victim makes a workspace called ``demo`` (another replica served both; this one's cache did
    not hold them yet). The write was guarded by the resourceVersion the cache held, so the API server refused
    it (409): and the runtime, to try again, read the Workspace of that name afresh — Victim's — and changed it:
    Mallory was a collaborator of Victim's workspace (its IDE, a terminal as Victim) or had made its private port
    public, and the API's answer showed her Victim's workspace. A change is for the Workspace that was checked:
    one of its name that is another (another uid) is no workspace of hers, 404."""
    emu = kube.emulator
    client: TestClient[web.Request, web.Application] = await aiohttp_client(build_app(gateway_config(kube, tmp_path)))
    headers = await mallory_and_victim(client)
    made = await client.post("/api/v1/workspaces", json={"id": "demo", "ports": {"3000": "private"}},
                             headers=headers["mallory"])
    assert made.status == 201
    swapped = namesake_before_the_next_patch(emu, "demo", "victim")
    answer = await client.put(f"/api/v1/workspaces/demo{path}", json=body, headers=headers["mallory"])
    assert swapped == [True]
    theirs = (emu.get_object(WORKSPACE, NS, "demo") or {}).get("spec", {})
    assert theirs.get("owner") == "victim"
    assert not harm(theirs), theirs
    assert answer.status == 404, await answer.text()
    state = client.app[GATEWAY].runtime.get("demo")
    assert state is None or state.spec.owner == "victim"


async def test_a_wake_asked_for_before_its_workspace_passed_to_someone_else_does_not_delete_theirs(
        kube: KubeEnv, make_runtime: MakeRuntime, pod_ips: PodIPs) -> None:
    """Mallory has replica A archive her workspace ``demo`` (its snapshot takes its time: a big home) and asks A to
    wake it meanwhile; the wake waits for the archive, which holds the workspace on A. Meanwhile she deletes
    ``demo``, and Victim makes a workspace called ``demo`` and works in it through replica B. When A's archive
    ended, the waiting wake went on with the workspace as it was when it was asked for, Mallory's: Victim's pod and
    home volume named another Workspace (by uid) as owner, so A took them for a deleted namesake's leftovers and
    deleted them, Victim's home (and everything in it) with them. A wake is for the Workspace it was asked for:
    one its name holds by the time its turn comes is another (404), and nothing of it is touched."""
    emu = kube.emulator
    async with FakeKubelet(emu, pod_ip=pod_ips, ready_snapshots=False):
        a = await make_runtime("gw-a", request_timeout=30)
        b = await make_runtime("gw-b")
        await a.create_workspace(WorkspaceSpec(id="demo", owner="mallory"))
        await a.wake("demo")
        await a.stop("demo")  # WARM: the home is kept, and may be archived
        holding, release = asyncio.Event(), asyncio.Event()

        async def slow_snapshot(request: kmock.Request) -> Any:
            holding.set()
            await release.wait()
            return rendering.Response(status=422, payload=k8s_status(422, "Invalid", "the snapshot is refused"))

        emu["post", VOLUME_SNAPSHOT] << slow_snapshot
        archive = asyncio.create_task(a.archive("demo"))
        await asyncio.wait_for(holding.wait(), 10)
        wake = asyncio.create_task(a.wake("demo"))  # Mallory's, checked against her workspace: it waits its turn
        await asyncio.sleep(0)
        await b.delete("demo")
        await until(lambda: emu.get_object(WORKSPACE, NS, "demo") is None)
        await b.create_workspace(WorkspaceSpec(id="demo", owner="victim"))
        assert (await b.wake("demo")).phase is Phase.RUNNING
        theirs = await b.stop("demo")  # Victim's day's work is in the home, kept while the workspace sleeps
        home = emu.get_object(PVC, NS, "ws-demo-home")
        assert home is not None
        release.set()
        with contextlib.suppress(LifecycleError):
            await archive
        with pytest.raises(NotFound):
            await wake
        now = emu.get_object(PVC, NS, "ws-demo-home")
        assert now is not None
        assert not now["metadata"].get("deletionTimestamp"), now
        assert now["metadata"]["uid"] == home["metadata"]["uid"]
        assert emu.get_object(POD, NS, "ws-demo") is None  # nothing started for Mallory in Victim's workspace
        assert (b.get("demo") or theirs).spec.owner == "victim"

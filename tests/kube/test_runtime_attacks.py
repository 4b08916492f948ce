"""Attacks on the Kubernetes runtime's writes: a name that passes to someone else between the moment the runtime
looked at it and the moment its write reached the API server (see README, "Security model").

Each test shows what an attacker did and what they must not get.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import kmock
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from kmock._internal import rendering  # Response(status=..., payload=...), as the emulator uses it

from gateway.errors import NotFound
from gateway.lifecycle import LifecycleError, Phase, WorkspaceSpec
from gateway.lifecycle.kubernetes.client import POD as PODS
from gateway.lifecycle.kubernetes.client import PVC as CLAIMS
from gateway.lifecycle.kubernetes.client import WORKSPACE as WORKSPACES
from gateway.lifecycle.kubernetes.objects import WorkspaceResource, labels, make_workspace
from gateway.lifecycle.kubernetes.runtime import KubernetesRuntime
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


@contextlib.asynccontextmanager
async def silent_watches(emu: KubeEmulator, kind: kmock.resource) -> AsyncIterator[None]:
    """From here on every watch of ``kind`` is silent: open, and nothing ever comes on it, as a connection that a NAT
    or a load balancer dropped without a word looks open until its read timeout (minutes). The watches open now
    are ended, so the runtimes watch again, silently; the other kinds' watches go on."""
    watching, done = asyncio.Event(), asyncio.Event()

    async def silent(request: kmock.Request) -> Any:
        watching.set()

        async def nothing() -> AsyncIterator[bytes]:
            yield b""  # the answer's head: the watch is open
            await done.wait()

        return rendering.Response(status=200, headers={"Content-Type": "application/json"}, payload=nothing())

    emu["watch", kind] << silent
    emu.drop_watches(kind)
    await asyncio.wait_for(watching.wait(), 10)
    try:
        yield
    finally:
        done.set()


def demos_home(owner: str, **metadata: Any) -> dict[str, Any]:
    """A home volume of the name ``demo``'s takes, naming the Workspace of uid ``owner`` as its owner."""
    ref = {"apiVersion": "codehub.dev/v1alpha1", "kind": "Workspace", "name": "demo", "uid": owner,
           "controller": True}
    return {"metadata": {"name": "ws-demo-home", "ownerReferences": [ref], "labels": labels("demo"), **metadata},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}


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


async def _mallorys_sleeping_demo(make_runtime: MakeRuntime) -> tuple[KubernetesRuntime, KubernetesRuntime]:
    """Replicas A and B, and mallory's workspace ``demo``, made and woken through A and stopped: WARM, its home
    kept, so it may be archived."""
    a = await make_runtime("gw-a", request_timeout=30)
    b = await make_runtime("gw-b")
    await a.create_workspace(WorkspaceSpec(id="demo", owner="mallory"))
    await a.wake("demo")
    await a.stop("demo")
    return a, b


async def test_operations_asked_for_before_a_workspace_passed_to_someone_else_do_not_act_on_theirs(
        kube: KubeEnv, make_runtime: MakeRuntime, pod_ips: PodIPs) -> None:
    """Mallory has replica A archive her workspace ``demo`` (its snapshot takes its time: a big home) and asks A to
    stop it and to wake it meanwhile; both wait for the archive, which holds the workspace on A. Meanwhile she
    deletes ``demo``, and Victim makes a workspace called ``demo`` and works in it through replica B. When A's
    archive ended, the waiting operations went on by the name: the stop deleted Victim's pod (the processes of
    their terminals with it), and the wake, which held Mallory's Workspace, answered with Victim's (its owner,
    collaborators and ports, for the API to show Mallory) or, Victim's workspace asleep, took its home volume for a
    deleted namesake's leftover and deleted it. An operation is for the Workspace it was asked for: one its name
    holds by the time its turn comes is another (404), and nothing of it is touched."""
    emu = kube.emulator
    async with FakeKubelet(emu, pod_ip=pod_ips, ready_snapshots=False):
        a, b = await _mallorys_sleeping_demo(make_runtime)
        holding, release = asyncio.Event(), asyncio.Event()

        async def slow_snapshot(request: kmock.Request) -> Any:
            holding.set()
            await release.wait()
            return rendering.Response(status=422, payload=k8s_status(422, "Invalid", "the snapshot is refused"))

        emu["post", VOLUME_SNAPSHOT] << slow_snapshot
        archive = asyncio.create_task(a.archive("demo"))
        await asyncio.wait_for(holding.wait(), 10)
        # Mallory's, each checked against her workspace (the API's ``_mine``): they wait their turn.
        stop, wake = asyncio.create_task(a.stop("demo")), asyncio.create_task(a.wake("demo"))
        await asyncio.sleep(0)
        await b.delete("demo")
        await until(lambda: emu.get_object(WORKSPACE, NS, "demo") is None)
        await b.create_workspace(WorkspaceSpec(id="demo", owner="victim"))
        assert (await b.wake("demo")).phase is Phase.RUNNING
        pod, home = emu.get_object(POD, NS, "ws-demo"), emu.get_object(PVC, NS, "ws-demo-home")
        assert pod is not None
        assert home is not None

        def a_sees_theirs() -> bool:
            state = a.get("demo")
            return state is not None and state.spec.owner == "victim"

        await until(a_sees_theirs)  # A is not behind: it waits on Mallory's archive, that is all
        release.set()
        with contextlib.suppress(LifecycleError):
            await archive
        for operation in (stop, wake):
            with pytest.raises(NotFound):
                await operation
        for kind, before in ((POD, pod), (PVC, home)):
            now = emu.get_object(kind, NS, before["metadata"]["name"])
            assert now is not None
            assert not now["metadata"].get("deletionTimestamp"), now
            assert now["metadata"]["uid"] == before["metadata"]["uid"]


@pytest.mark.parametrize("after", ["made-again", "deleted", "being-deleted"])
async def test_a_wake_on_a_replica_that_missed_the_names_passing_does_not_delete_the_new_owners_home(
        kube: KubeEnv, make_runtime: MakeRuntime, after: str) -> None:
    """Replica A's watch of Workspaces went silent (its connection died without a word, as a NAT or a load balancer
    drops an idle one: it looks open until its read timeout, minutes), while its watches of pods and volumes go on.
    Meanwhile Mallory's workspace ``demo`` was deleted, and Victim made a workspace called ``demo`` and has worked
    in it through replica B (its home volume). Mallory, or anyone she lets wake it, asks A to wake ``demo``: A,
    taking ``demo`` for Mallory's still, took Victim's home volume (which names Victim's Workspace as its owner) for
    a deleted namesake's leftover and deleted it. What is deleted for being a namesake's is deleted only once the
    API says this Workspace holds the name: one that holds another is no workspace of the asker's (404). So is
    one the name holds no more (``deleted``: the home is an earlier namesake's, the garbage collector busy), and
    Mallory's own while it is being deleted (``being-deleted``, held by a finalizer): not a crash of the gateway
    (500), nor a home and a pod made for a workspace its owner deleted; the leftover is the collector's."""
    emu = kube.emulator
    a = await make_runtime("gw-a")
    await a.create_workspace(WorkspaceSpec(id="demo", owner="mallory"))
    async with silent_watches(emu, WORKSPACE):
        if after == "being-deleted":
            emu.patch_object(WORKSPACE, NS, "demo", {"metadata": {"finalizers": ["example.com/held"]}})
        emu.delete_object(WORKSPACE, NS, "demo")
        emu.controllers.paused_gc = True
        uid = "uid-of-an-earlier-demo"
        if after == "made-again":
            theirs = emu.create_object(WORKSPACE, make_workspace(WorkspaceResource(id="demo", owner="victim")), NS)
            uid = theirs["metadata"]["uid"]
        home = emu.create_object(PVC, demos_home(uid), NS)
        await until(lambda: a.view.cached(CLAIMS, "ws-demo-home") is not None)
        state = a.get("demo")
        assert state is not None
        assert state.spec.owner == "mallory"  # as A still sees it
        with pytest.raises(NotFound):
            await a.wake("demo")
        now = emu.get_object(PVC, NS, "ws-demo-home")
        assert now is not None
        assert not now["metadata"].get("deletionTimestamp"), now
        assert now["metadata"]["uid"] == home["metadata"]["uid"]
        assert emu.get_object(POD, NS, "ws-demo") is None


async def test_a_stop_on_a_replica_that_missed_the_names_passing_does_not_stop_the_new_owners_workspace(
        kube: KubeEnv, make_runtime: MakeRuntime, pod_ips: PodIPs) -> None:
    """Mallory's workspace ``demo`` runs. Through replica B she deletes it and Victim makes a workspace called
    ``demo`` and works in it; replica A's caches have not shown either yet (their watches lapsed). Mallory asks A to
    stop ``demo``: A, which still holds her Workspace and her pod, deleted the pod by its name — Victim's, the
    processes of their terminals with it. Once its cache caught up, A answered her with Victim's workspace. The delete
    is of the pod A saw (by uid): Victim's stays, and Mallory is told there is no such workspace."""
    emu = kube.emulator
    async with FakeKubelet(emu, pod_ip=pod_ips):
        a, b = await make_runtime("gw-a"), await make_runtime("gw-b")
        await a.create_workspace(WorkspaceSpec(id="demo", owner="mallory"))
        mallorys = await a.wake("demo")
        for kind in (WORKSPACES, PODS):
            await a.informers[kind].stop()  # A's caches stand still: they resume from where they were
        await b.delete("demo")
        await until(lambda: emu.get_object(POD, NS, "ws-demo") is None)
        await b.create_workspace(WorkspaceSpec(id="demo", owner="victim"))
        assert (await b.wake("demo")).phase is Phase.RUNNING
        theirs = emu.get_object(POD, NS, "ws-demo")
        assert theirs is not None
        deletes: list[kmock.Request] = []
        emu["delete", POD] << (lambda request: deletes.append(request))  # noted, then served
        stopping = asyncio.create_task(a.stop("demo"))
        await until(lambda: bool(deletes) or stopping.done())
        a.informers[WORKSPACES].start()  # A catches up: first with the Workspace, then with the pods
        await until(lambda: (a.get("demo") or mallorys).spec.owner == "victim")
        a.informers[PODS].start()
        async with asyncio.timeout(30):
            with pytest.raises(NotFound):
                await stopping
        now = emu.get_object(POD, NS, "ws-demo")
        assert now is not None
        assert not now["metadata"].get("deletionTimestamp"), now
        assert now["metadata"]["uid"] == theirs["metadata"]["uid"]


async def test_an_archive_that_waited_after_its_stop_does_not_archive_a_namesake(
        kube: KubeEnv, make_runtime: MakeRuntime, pod_ips: PodIPs) -> None:
    """Mallory asks replica A to archive her sleeping workspace ``demo`` twice. The first archives (its snapshot takes
    its time); the second has stopped it already (nothing to stop) and waits its turn to archive. Meanwhile she
    deletes ``demo``, and Victim makes a workspace called ``demo`` through replica B, works in it and lets it sleep
    (its home kept, WARM). When the first archive ends, the second must not go on by the name: Victim's home would
    be snapshotted and, the snapshot ready, deleted (their workspace made COLD, and its next wake slow, by
    Mallory's word). It is for the Workspace it was asked for (404), and no snapshot of Victim's is asked for."""
    emu = kube.emulator
    async with FakeKubelet(emu, pod_ip=pod_ips, ready_snapshots=False):
        a, b = await _mallorys_sleeping_demo(make_runtime)
        snapshots: list[str] = []
        holding, release = asyncio.Event(), asyncio.Event()

        async def slow_snapshot(request: kmock.Request) -> Any:
            snapshots.append(str(request.data))
            holding.set()
            await release.wait()
            return rendering.Response(status=422, payload=k8s_status(422, "Invalid", "the snapshot is refused"))

        emu["post", VOLUME_SNAPSHOT] << slow_snapshot
        first, second = asyncio.create_task(a.archive("demo")), asyncio.create_task(a.archive("demo"))
        await asyncio.wait_for(holding.wait(), 10)
        assert not second.done()
        await b.delete("demo")
        await until(lambda: emu.get_object(WORKSPACE, NS, "demo") is None)
        await b.create_workspace(WorkspaceSpec(id="demo", owner="victim"))
        assert (await b.wake("demo")).phase is Phase.RUNNING
        assert (await b.stop("demo")).phase is Phase.WARM
        home = emu.get_object(PVC, NS, "ws-demo-home")
        assert home is not None

        def a_sees_theirs() -> bool:
            state = a.get("demo")
            return state is not None and state.spec.owner == "victim" and a.view.cached(PODS, "ws-demo") is None

        await until(a_sees_theirs)
        release.set()
        with contextlib.suppress(LifecycleError):
            await first
        with pytest.raises(NotFound):
            await second
        assert len(snapshots) == 1, snapshots  # Mallory's only
        now = emu.get_object(PVC, NS, "ws-demo-home")
        assert now is not None
        assert now["metadata"]["uid"] == home["metadata"]["uid"]
        assert not now["metadata"].get("deletionTimestamp"), now


@pytest.mark.parametrize("held", [False, True], ids=["collected", "held-by-a-finalizer"])
async def test_a_namesakes_leftover_the_cache_missed_is_not_taken_for_the_new_owners(
        kube: KubeEnv, make_runtime: MakeRuntime, pod_ips: PodIPs, held: bool) -> None:
    """Mallory's workspace ``demo`` was deleted, and its home volume is still there (a busy garbage collector).
    Victim makes a workspace called ``demo`` and wakes it through replica A, whose watch of volumes went silent (a
    connection dropped without a word looks open for minutes) and so never showed A the leftover. A's create of the
    home answered 409, which A took for "already there, ours": Victim's pod mounted Mallory's home (her shell
    profile, her editor's extensions, run as Victim). A home of the name that the API shows to be another
    Workspace's is removed and made again for Victim's, and Victim's workspace starts on its own; one that something
    holds from going (a finalizer) fails the wake at its deadline, and no pod is made on it (till then, the home is
    asked for again twice a second, not in a loop as fast as the API server answers)."""
    emu = kube.emulator
    a = await make_runtime("gw-a", start_timeout=2)
    await a.create_workspace(WorkspaceSpec(id="demo", owner="victim"))
    theirs = emu.get_object(WORKSPACE, NS, "demo")
    assert theirs is not None
    async with silent_watches(emu, PVC), FakeKubelet(emu, pod_ip=pod_ips):
        emu.controllers.paused_gc = True
        leftover = emu.create_object(PVC, demos_home("uid-of-mallorys-deleted-demo",
                                                     finalizers=["example.com/held"] if held else []), NS)
        if held:
            with pytest.raises(LifecycleError, match="removing the old PersistentVolumeClaim ws-demo-home"):
                await a.wake("demo")
            assert emu.get_object(POD, NS, "ws-demo") is None
            # Made again twice a second until the deadline (2 s), not as fast as the API answers.
            assert len(list(emu["post", PVC])) <= 10
        else:
            assert (await a.wake("demo")).phase is Phase.RUNNING
            for kind, name in ((PVC, "ws-demo-home"), (POD, "ws-demo")):
                now = emu.get_object(kind, NS, name)
                assert now is not None
                assert now["metadata"]["uid"] != leftover["metadata"]["uid"], now
                assert [ref["uid"] for ref in now["metadata"]["ownerReferences"]] == [
                    theirs["metadata"]["uid"]], now


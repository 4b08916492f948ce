"""Objects the gateway did not make, or made for someone else, meeting the gateway: what each one must not do.

Each test is a hole found by attacking the Kubernetes runtime through what it reads (Workspaces, pods, PVCs,
VolumeSnapshots, ShareLinks, ApiTokens) and through names reused while the cluster still holds an older namesake's
objects.
"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest

from gateway.auth.identity import Identity
from gateway.auth.kubernetes.tokens import seal_records
from gateway.auth.store import API_PREFIX, SHARE_PREFIX, token_hash
from gateway.errors import NotFound
from gateway.lifecycle import LifecycleError, Phase, WorkspaceSpec
from gateway.lifecycle.kubernetes.client import KubeClient
from gateway.lifecycle.kubernetes.objects import record_seal
from tests.kube.emulator import API_TOKEN, POD, PVC, SHARE_LINK, WORKSPACE, KubeEnv
from tests.kube.kubelet import FakeKubelet
from tests.kube.support import NS, MakeRuntime, until
from tests.kube.test_token_store import (
    Client,
    MakeReplica,
    alice_token,
    api,
    gateway,
    open_share,
    records_key,
    replica,
    store,
)

pytestmark = pytest.mark.timeout(60)
__all__ = ["replica"]  # the fixture, used by name


async def test_a_deleted_namesakes_share_link_does_not_open_the_new_workspace(
        kube: KubeEnv, replica: MakeReplica) -> None:
    """Alice shares port 8000 of w1 with a link for anyone, then deletes w1 with ``kubectl delete`` (background
    propagation: the garbage collector deletes the link a moment later, or much later on a busy cluster). Mallory
    takes the free name at once, port 8000 private. Alice's link, held by anyone she ever sent it to, must not open
    Mallory's private port, nor be listed (and counted, and revocable) as one of Mallory's links."""
    emu = kube.emulator
    a = await replica("gw-a")
    alice = await alice_token(a)
    status, link = await api(a, "POST", "/api/v1/workspaces/w1/shares", alice, {"port": 8000})
    assert status == 201
    assert (await open_share(a, link["token"]))[0] == 303  # it opens Alice's w1

    emu.controllers.paused_gc = True  # a busy garbage collector
    emu.delete_object(WORKSPACE, NS, "w1")  # kubectl delete workspace w1
    await until(lambda: gateway(a).runtime.get("w1") is None)
    assert emu.get_object(SHARE_LINK, NS, link["id"]) is not None  # not collected yet

    _, mallory = await store(a).create_api_token(Identity("mallory"), name="t")
    status, _ = await api(a, "POST", "/api/v1/workspaces", mallory, {"id": "w1", "ports": {"8000": "private"}})
    assert status == 201

    assert (await open_share(a, link["token"]))[0] != 303  # Alice's link is not a key to Mallory's private port
    assert link["id"] not in store(a).shares  # nor the cookie it set on Mallory's w1 host (looked up by id)
    status, listed = await api(a, "GET", "/api/v1/workspaces/w1/shares", mallory)
    assert status == 200
    assert [shown["id"] for shown in listed["shares"]] == []


def legacy_home(kube: KubeEnv) -> dict[str, Any]:
    """Alice's w1 and its home from before the gateway set ownerReferences (an upgraded cluster)."""
    emu = kube.emulator
    emu.create_object(WORKSPACE, {"metadata": {"name": "w1"}, "spec": {"owner": "alice"}}, NS)
    return emu.create_object(PVC, {
        "metadata": {"name": "ws-w1-home", "labels": {"app.kubernetes.io/managed-by": "codehub-gateway",
                                                      "codehub.dev/workspace": "w1"}},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}, NS)


async def test_deleting_a_workspace_deletes_its_home_made_before_owners(
        kube: KubeEnv, kubelet: FakeKubelet, make_runtime: MakeRuntime) -> None:
    """A home PVC from before owners points at no Workspace, so the garbage collector never deletes it: deleting
    Alice's w1 through the gateway left it, and the next owner of the name (Bob) had it mounted in his pod. The
    gateway's delete deletes it (that very one, by uid: a home of the name made since, Bob's, would be spared);
    Bob gets a new, empty home."""
    emu = kube.emulator
    legacy = legacy_home(kube)
    runtime = await make_runtime()
    await until(lambda: runtime.get("w1") is not None)
    await runtime.delete("w1")
    await emu.wait_gone(WORKSPACE, NS, "w1")
    await emu.wait_gone(PVC, NS, "ws-w1-home")
    assert [r.data for r in emu["delete", PVC]] == [{"preconditions": {"uid": legacy["metadata"]["uid"]}}]

    await runtime.create_workspace(WorkspaceSpec(id="w1", owner="bob"))
    assert (await runtime.wake("w1")).phase is Phase.RUNNING
    pvc = emu.get_object(PVC, NS, "ws-w1-home")
    assert pvc is not None
    assert pvc["metadata"]["uid"] != legacy["metadata"]["uid"]  # not Alice's


async def test_a_home_made_before_owners_is_not_mounted_for_the_next_owner_of_its_name(
        kube: KubeEnv, kubelet: FakeKubelet, make_runtime: MakeRuntime) -> None:
    """Alice's w1 from before owners is deleted past the gateway (``kubectl delete``): its home stays, and names no
    owner. Bob makes w1. His wake must neither mount Alice's home (it did) nor delete it (it may be a home an
    operator moved in before recreating its Workspace): it refuses, saying why, and the volume is left alone."""
    emu = kube.emulator
    legacy = legacy_home(kube)
    runtime = await make_runtime()
    await until(lambda: runtime.get("w1") is not None)
    emu.delete_object(WORKSPACE, NS, "w1")  # kubectl delete workspace w1
    await until(lambda: runtime.get("w1") is None)
    await asyncio.sleep(1.1)  # creation times are in seconds: Bob's w1 is made in a later one

    await runtime.create_workspace(WorkspaceSpec(id="w1", owner="bob"))
    state = runtime.get("w1")
    assert state is not None
    assert state.phase is Phase.WARM  # a new workspace, not one on Alice's home
    with pytest.raises(LifecycleError) as refused:
        await runtime.wake("w1")
    assert refused.value.code == "workspace-name-in-use"
    assert emu.get_object(POD, NS, "ws-w1") is None  # nothing mounted it
    pvc = emu.get_object(PVC, NS, "ws-w1-home")
    assert pvc is not None
    assert pvc["metadata"]["uid"] == legacy["metadata"]["uid"]  # nor deleted it


def written_back(obj: dict[str, Any]) -> dict[str, Any]:
    """What anyone who may read an object can write again later: its name, labels, owners and spec, seal and all."""
    meta = obj["metadata"]
    return {"metadata": {key: copy.deepcopy(meta[key]) for key in ("name", "labels", "ownerReferences") if key in meta},
            "spec": copy.deepcopy(obj["spec"])}


async def mallory_takes_w1(a: Client) -> str:
    """Alice's w1 goes; Mallory makes a w1 of her own, port 8000 private, a second later (creation times are in
    seconds). Mallory's API token."""
    await gateway(a).runtime.delete("w1")
    await until(lambda: gateway(a).runtime.get("w1") is None)
    await asyncio.sleep(1.1)
    _, mallory = await store(a).create_api_token(Identity("mallory"), name="t")
    status, _ = await api(a, "POST", "/api/v1/workspaces", mallory, {"id": "w1", "ports": {"8000": "private"}})
    assert status == 201
    return mallory


async def opens_nothing_of_mallorys(kube: KubeEnv, a: Client, mallory: str, obj: dict[str, Any], token: str) -> None:
    """``obj`` written into the cluster opens nothing of Mallory's w1, nor is listed as hers, while the garbage
    collector has not deleted it (its owner is gone)."""
    emu = kube.emulator
    emu.controllers.paused_gc = True
    name = obj["metadata"]["name"]
    emu.create_object(SHARE_LINK, obj, NS)
    await until(lambda: name in store(a)._shares)  # taken in (sealed), but not as Mallory's w1's
    assert (await open_share(a, token))[0] != 303
    _, listed = await api(a, "GET", "/api/v1/workspaces/w1/shares", mallory)
    assert [shown["id"] for shown in listed["shares"]] == []
    emu.delete_object(SHARE_LINK, NS, name)
    await until(lambda: name not in store(a)._shares)


async def test_a_link_made_before_owners_does_not_open_the_next_workspace_of_its_name(
        kube: KubeEnv, replica: MakeReplica, tmp_path: Path) -> None:
    """A ShareLink from before links had owners names only its workspace: nothing deletes it with the workspace,
    and it was taken for the workspace of its name by creation time, which writing it again renews. ``token seal``
    gives it the Workspace it belongs to, so it goes with Alice's w1; written back as it was sealed, or sealed
    without an owner (which no gateway makes), it does not open the w1 Mallory makes next."""
    emu = kube.emulator
    a = await replica("gw-a")
    token = SHARE_PREFIX + "x" * 40
    legacy: dict[str, Any] = {
        "metadata": {"name": "legacylink01", "labels": {"app.kubernetes.io/managed-by": "codehub-gateway",
                                                        "codehub.dev/workspace": "w1"}},
        "spec": {"workspace": "w1", "audience": "anyone", "createdBy": "alice", "port": 8000,
                 "expires": "2099-01-01T00:00:00.000000Z", "tokenHash": token_hash(token)}}
    emu.create_object(SHARE_LINK, legacy, NS)
    await seal_records(KubeClient(kube.api_client, NS), records_key(tmp_path))  # the operator's `token seal`
    await until(lambda: "legacylink01" in store(a).shares)
    assert (await open_share(a, token))[0] == 303  # Alice's w1: her link opens it
    sealed_then = written_back(emu.get_object(SHARE_LINK, NS, "legacylink01"))  # type: ignore[arg-type]
    owner_less = copy.deepcopy(legacy)
    owner_less["spec"]["seal"] = record_seal(records_key(tmp_path), "ShareLink", owner_less)

    mallory = await mallory_takes_w1(a)
    await emu.wait_gone(SHARE_LINK, NS, "legacylink01")  # it went with Alice's w1
    for obj in (sealed_then, owner_less):
        await opens_nothing_of_mallorys(kube, a, mallory, obj, token)


async def test_a_link_whose_owners_kind_is_renamed_does_not_open_the_next_workspace_of_its_name(
        kube: KubeEnv, replica: MakeReplica) -> None:
    """The seal holds an owner's uid; renaming the owner's kind (``WorkspaceX``) keeps it, and the link has no
    Workspace for owner any more: taken for one made before owners, it opened the next w1 by its new creation time.
    (A real garbage collector leaves an object whose owner's kind it cannot resolve.)"""
    emu = kube.emulator
    a = await replica("gw-a")
    alice = await alice_token(a)
    status, link = await api(a, "POST", "/api/v1/workspaces/w1/shares", alice, {"port": 8000})
    assert status == 201
    saved = written_back(emu.get_object(SHARE_LINK, NS, link["id"]))  # type: ignore[arg-type]
    mallory = await mallory_takes_w1(a)
    await emu.wait_gone(SHARE_LINK, NS, link["id"])
    (owner,) = saved["metadata"]["ownerReferences"]
    saved["metadata"]["ownerReferences"] = [{"apiVersion": owner["apiVersion"], "kind": "WorkspaceX",
                                             "name": owner["name"], "uid": owner["uid"]}]
    await opens_nothing_of_mallorys(kube, a, mallory, saved, link["token"])


def forged_token(subject: str, token: str, name: str = "forged000001") -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "codehub-gateway"}},
            "spec": {"subject": subject, "name": "t", "tokenHash": token_hash(token)}}


async def test_an_api_token_object_the_gateway_did_not_make_acts_for_nobody(
        kube: KubeEnv, replica: MakeReplica, caplog: pytest.LogCaptureFixture) -> None:
    """Someone who may create ApiToken objects (a custom resource) writes one for ``alice`` with the hash of a
    token of their own choosing, and uses it to delete Alice's workspace through the API. Its seal is missing, or
    made up: the gateway never takes it in, and says so once."""
    emu = kube.emulator
    a = await replica("gw-a")
    unsealed, made_up = API_PREFIX + "y" * 40, API_PREFIX + "z" * 40
    emu.create_object(API_TOKEN, forged_token("alice", unsealed), NS)
    forged = forged_token("alice", made_up, "forged000002")
    forged["spec"]["seal"] = record_seal(b"k" * 32, "ApiToken", forged)  # a key of the forger's own
    emu.create_object(API_TOKEN, forged, NS)
    await until(lambda: "ApiToken forged000002 is not sealed" in caplog.text)
    assert "ApiToken forged000001 is not sealed by this gateway's key: it grants nothing" in caplog.text
    for token in (unsealed, made_up):
        status, _ = await api(a, "DELETE", "/api/v1/workspaces/w1", token)
        assert status == 401
    assert emu.get_object(WORKSPACE, NS, "w1") is not None
    assert store(a).api_tokens == {}

    emu.patch_status(API_TOKEN, NS, "forged000001", {"replicas": {"gw-x": {"lastUsed": "2027-01-01T00:00:00Z"}}})
    await until(lambda: emu.get_object(API_TOKEN, NS, "forged000001")["status"])  # type: ignore[index]
    await asyncio.sleep(0.2)
    assert caplog.text.count("ApiToken forged000001 is not sealed") == 1  # said once, not at every event


async def test_a_token_made_over_to_someone_else_acts_for_nobody(kube: KubeEnv, replica: MakeReplica) -> None:
    """Mallory holds a token of her own, and may edit ApiToken objects: she makes hers out to Alice (subject,
    e-mail, groups). It stops acting for anyone, Mallory included."""
    emu = kube.emulator
    a = await replica("gw-a")
    record, token = await store(a).create_api_token(Identity("mallory", "mallory@corp.test"), name="t")
    assert (await api(a, "GET", "/api/v1/tokens", token))[0] == 200
    emu.patch_object(API_TOKEN, NS, record.id, {"spec": {"subject": "alice", "email": "alice@corp.test"}})
    await until(lambda: record.id not in store(a).api_tokens)
    assert (await api(a, "DELETE", "/api/v1/workspaces/w1", token))[0] == 401
    assert emu.get_object(WORKSPACE, NS, "w1") is not None


async def test_a_share_link_object_the_gateway_did_not_make_opens_nothing(
        kube: KubeEnv, replica: MakeReplica) -> None:
    """A ShareLink written past the gateway for Alice's private port, or one of Alice's links turned into one for
    anyone: neither opens it."""
    emu = kube.emulator
    a = await replica("gw-a")
    alice = await alice_token(a)
    status, link = await api(a, "POST", "/api/v1/workspaces/w1/shares", alice,
                             {"port": 8000, "audience": "people", "people": ["bob"]})
    assert status == 201
    token = SHARE_PREFIX + "x" * 40
    forged = {key: value for key, value in emu.get_object(SHARE_LINK, NS, link["id"]).items()  # type: ignore[union-attr]
              if key in ("apiVersion", "kind", "spec")}
    forged["metadata"] = {"name": "forgedlink01", "labels": {"app.kubernetes.io/managed-by": "codehub-gateway",
                                                             "codehub.dev/workspace": "w1"}}
    forged["spec"] = {**forged["spec"], "audience": "anyone", "tokenHash": token_hash(token)}
    emu.create_object(SHARE_LINK, forged, NS)  # the seal copied from Alice's link
    emu.patch_object(SHARE_LINK, NS, link["id"], {"spec": {"audience": "anyone"}})
    await until(lambda: link["id"] not in store(a).shares)
    assert "forgedlink01" not in store(a).shares
    assert (await open_share(a, token))[0] != 303
    assert (await open_share(a, link["token"]))[0] != 303
    status, listed = await api(a, "GET", "/api/v1/workspaces/w1/shares", alice)
    assert [shown["id"] for shown in listed["shares"]] == []


async def test_a_link_is_made_only_for_the_workspace_the_api_checked(kube: KubeEnv, replica: MakeReplica) -> None:
    """The API checks a workspace, then asks the store for a link: when the Workspace of that name by then is
    another (deleted and made again meanwhile, a new uid), the link is not made, for either."""
    a = await replica("gw-a")
    checked = gateway(a).runtime.get("w1")
    assert checked is not None
    with pytest.raises(NotFound):
        await store(a).create_share(workspace="w1", port=8000, audience="anyone", people=[], created_by="alice",
                                    ttl=3600, incarnation="uid-of-an-earlier-w1")
    assert not store(a).shares_of("w1")
    link, _token = await store(a).create_share(workspace="w1", port=8000, audience="anyone", people=[],
                                               created_by="alice", ttl=3600, incarnation=checked.spec.incarnation)
    assert link.workspace == "w1"

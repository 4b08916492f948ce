"""Share links and API tokens on Kubernetes: several gateway replicas (build_app with ``runtime: kubernetes``, each
with its own ApiClient) against one emulated API, sharing nothing else but the signing keys.

"At once" means: on the replica that made the change, before its answer returns; on the others, when their watch
delivers the change, which the tests wait for with a bounded wait (``until``) and never with a fixed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway import cli
from gateway.auth.identity import Identity
from gateway.auth.kubernetes.answers import UsedKeys, make_consent
from gateway.auth.kubernetes.tokens import KubeTokenStore, Sealing, seal_key, seal_records
from gateway.auth.sessions import Session
from gateway.auth.store import ApiToken, Consent, ShareLink, token_hash
from gateway.config import Config
from gateway.lifecycle import LifecycleError
from gateway.lifecycle.kubernetes.client import KubeClient, KubeError
from gateway.lifecycle.kubernetes.informer import Informers
from gateway.lifecycle.kubernetes.objects import (
    make_api_token,
    make_share_link,
    parse_api_token,
    parse_share_link,
    sealed,
    usage_patch,
)
from gateway.server.app import build_app
from gateway.server.context import GATEWAY, Gateway
from tests.kube.emulator import API_TOKEN, CONSENT, SHARE_LINK, USED_KEY, WORKSPACE, KubeEnv, merge_patch
from tests.kube.support import NS, kube_settings, until

pytestmark = pytest.mark.timeout(60)

Client = TestClient[web.Request, web.Application]
HUB = "localhost:8080"
PREVIEW = "8000-w1.localhost:8080"
MakeReplica = Callable[[str], Awaitable[Client]]


IDE_KEY = b"k" * 48


def ide_key_file(tmp_path: Path) -> Path:
    """The IDE key every replica mounts from the signing keys Secret; share links and API tokens are sealed with a
    key derived from it."""
    path = tmp_path / "ide-key"
    if not path.exists():
        path.write_bytes(IDE_KEY)
    return path


def records_key(tmp_path: Path) -> bytes:
    key = seal_key(kube_settings("http://127.0.0.1:9", ide_key_file=str(ide_key_file(tmp_path))))
    assert key is not None
    return key


@pytest.fixture
async def replica(kube: KubeEnv, aiohttp_client: Any, tmp_path: Path) -> MakeReplica:
    """A gateway replica named ``identity``; all share one signing-keys file and one IDE key (the Secret) and
    nothing else."""
    kube.emulator.create_object(WORKSPACE, {"metadata": {"name": "w1"},
                                            "spec": {"owner": "alice", "ports": {"8000": "private"}}}, NS)

    async def make(identity: str) -> Client:
        settings = kube_settings(kube.url, identity=identity, usage_interval=0.1,
                                 ide_key_file=str(ide_key_file(tmp_path))).model_dump(mode="json")
        config = Config.model_validate({"runtime": "kubernetes", "kubernetes": settings,
                                        "local": {"state_dir": str(tmp_path / "shared")}})
        client: Client = await aiohttp_client(build_app(config))
        assert isinstance(client.app[GATEWAY].auth.store, KubeTokenStore)
        return client

    return make


def gateway(client: Client) -> Gateway:
    return client.app[GATEWAY]


def store(client: Client) -> KubeTokenStore:
    found = client.app[GATEWAY].auth.store
    assert isinstance(found, KubeTokenStore)
    return found


async def alice_token(client: Client) -> str:
    _, token = await store(client).create_api_token(Identity("alice", "alice@corp.test", (), "alice"), name="t")
    return token


async def api(client: Client, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
    response = await client.request(method, path, json=body, headers={
        "Host": HUB, "Accept": "application/json", "Authorization": f"Bearer {token}"})
    return response.status, await response.json()


async def open_share(client: Client, token: str) -> tuple[int, str]:
    """A browser following a share URL: 303 (token leaves the URL, cookie set) when the link is good."""
    response = await client.get(f"/?codehub_share={token}", allow_redirects=False,
                                headers={"Host": PREVIEW, "Accept": "application/json"})
    code = "" if response.status == 303 else (await response.json())["error"]["code"]
    return response.status, code


async def link_on_two(replica: MakeReplica) -> tuple[Client, Client, str, Any]:
    """Two replicas, alice's API token, and a share link she made through the first, once the second knows it."""
    a, b = await replica("gw-a"), await replica("gw-b")
    token = await alice_token(a)
    _, link = await api(a, "POST", "/api/v1/workspaces/w1/shares", token, {"port": 8000})
    await until(lambda: link["id"] in store(b).shares)
    return a, b, token, link


async def test_a_link_made_on_one_replica_opens_on_another_and_a_revocation_reaches_both(
        kube: KubeEnv, replica: MakeReplica) -> None:
    a, b = await replica("gw-a"), await replica("gw-b")
    token = await alice_token(a)
    status, link = await api(a, "POST", "/api/v1/workspaces/w1/shares", token, {"port": 8000})
    assert status == 201, link
    assert await open_share(a, link["token"]) == (303, "")  # the replica that made it: at once

    await until(lambda: link["id"] in store(b).shares)  # the other: once its watch delivers the new object
    assert [found.id for found in store(b).shares_of("w1")] == [link["id"]]
    assert await open_share(b, link["token"]) == (303, "")

    stored = kube.emulator.get_object(SHARE_LINK, NS, link["id"])
    assert stored is not None
    assert stored["spec"]["tokenHash"] == token_hash(link["token"])
    assert link["token"] not in json.dumps(stored)  # only the hash is ever written

    await until(lambda: token_hash(token) in {t.token_hash for t in store(b).api_tokens.values()})
    status, revoked = await api(b, "DELETE", f"/api/v1/workspaces/w1/shares/{link['id']}", token)
    assert status == 200
    assert revoked["active"] is False
    assert await open_share(b, link["token"]) == (403, "share-revoked")  # the revoking replica: at once

    await until(lambda: store(a).shares[link["id"]].revoked is not None, within=5)
    assert await open_share(a, link["token"]) == (403, "share-revoked")
    assert await open_share(a, "chs_not-a-link") == (401, "share-invalid")
    assert "revoked" in (kube.emulator.get_object(SHARE_LINK, NS, link["id"]) or {})["spec"]


async def test_use_counts_from_every_replica_add_up_and_the_newest_use_wins(
        kube: KubeEnv, replica: MakeReplica) -> None:
    a, b, token, link = await link_on_two(replica)
    for _ in range(3):
        assert (await open_share(a, link["token"]))[0] == 303
    before_b = time.time()
    for _ in range(2):
        assert (await open_share(b, link["token"]))[0] == 303

    def replicas() -> dict[str, Any]:
        obj = kube.emulator.get_object(SHARE_LINK, NS, link["id"]) or {}
        return dict((obj.get("status") or {}).get("replicas") or {})

    await until(lambda: {name: entry.get("uses") for name, entry in replicas().items()} == {"gw-a": 3, "gw-b": 2})

    def listed(client: Client) -> ShareLink:
        return store(client).shares[link["id"]]

    await until(lambda: listed(a).uses == 5 and listed(b).uses == 5)
    assert (listed(a).last_used or 0) >= before_b
    assert listed(a).last_used == pytest.approx(listed(b).last_used, abs=1e-5)  # written with microseconds
    status, body = await api(a, "GET", "/api/v1/workspaces/w1/shares", token)
    assert status == 200
    (shown,) = body["shares"]
    assert shown["uses"] == 5
    assert shown["last_used"] == listed(a).last_used
    writes = store(a).writes + store(b).writes
    assert writes <= 6, "uses are written in batches, not once per request"
    store(a).use_share(listed(a), 1_900_000_000.0)  # counted at the time the request was served
    assert listed(a).uses == 6
    assert listed(a).last_used == 1_900_000_000.0


async def test_a_replaced_replica_keeps_links_tokens_and_counts(kube: KubeEnv, replica: MakeReplica) -> None:
    a = await replica("gw-a")
    token = await alice_token(a)
    _, link = await api(a, "POST", "/api/v1/workspaces/w1/shares", token, {"port": 8000})
    for _ in range(2):
        assert (await open_share(a, link["token"]))[0] == 303
    await a.close()  # shutdown writes the uses it still had in memory

    again = await replica("gw-a")  # the same pod name (a container restart) continues its own count
    assert await open_share(again, link["token"]) == (303, "")
    status, body = await api(again, "GET", "/api/v1/workspaces/w1/shares", token)
    assert status == 200
    assert body["shares"][0]["uses"] == 3
    await again.close()

    other = await replica("gw-c")  # a new pod: everything is in the API, nothing in the old pod
    assert await open_share(other, link["token"]) == (303, "")
    await until(lambda: store(other).shares[link["id"]].uses == 4)
    status, tokens = await api(other, "GET", "/api/v1/tokens", token)
    assert status == 200
    assert [t["name"] for t in tokens["tokens"]] == ["t"]


async def test_api_tokens_are_shared_and_revoked_everywhere(kube: KubeEnv, replica: MakeReplica) -> None:
    a, b = await replica("gw-a"), await replica("gw-b")
    seed = await alice_token(a)
    assert (await api(a, "POST", "/api/v1/tokens", seed, {"name": "ci"}))[0] == 403  # a token mints none
    record, token = await store(a).create_api_token(Identity("alice", "alice@corp.test", (), "alice"), name="ci")
    made = {"id": record.id, "token": token}
    assert made["token"] not in json.dumps(kube.emulator.list_objects(API_TOKEN, NS))
    assert (await api(a, "GET", "/api/v1/tokens", made["token"]))[0] == 200

    await until(lambda: made["id"] in store(b).api_tokens)
    status, listed = await api(b, "GET", "/api/v1/tokens", made["token"])
    assert status == 200
    assert {t["name"] for t in listed["tokens"]} == {"t", "ci"}

    def last_used_by(replica_name: str) -> Any:
        obj = kube.emulator.get_object(API_TOKEN, NS, made["id"]) or {}
        return ((obj.get("status") or {}).get("replicas") or {}).get(replica_name, {}).get("lastUsed")

    await until(lambda: last_used_by("gw-a") is not None and last_used_by("gw-b") is not None)

    status, _ = await api(b, "DELETE", f"/api/v1/tokens/{made['id']}", seed)
    assert status == 200
    status, refused = await api(b, "GET", "/api/v1/tokens", made["token"])  # the revoking replica: at once
    assert (status, refused["error"]["code"]) == (401, "token-invalid")
    assert kube.emulator.get_object(API_TOKEN, NS, made["id"]) is None
    await until(lambda: made["id"] not in store(a).api_tokens)
    assert (await api(a, "GET", "/api/v1/tokens", made["token"]))[0] == 401
    assert (await api(a, "GET", "/api/v1/tokens", seed))[0] == 200


async def test_the_cli_issues_tokens_into_the_cluster(
        kube: KubeEnv, replica: MakeReplica, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Sealed, as the replicas' own: the replicas refuse a record without a seal."""
    a = await replica("gw-a")
    config = cluster_config(kube, tmp_path)
    argv = ["token", "issue", "--user", "ops", "--groups", "admins", "--name", "deploy", "--config", str(config)]
    assert await asyncio.to_thread(cli.main, argv) == 0  # the CLI runs its own event loop
    out, err = capsys.readouterr()
    token = out.strip()
    assert token.startswith("chk_")
    assert f"in namespace {NS}" in err
    await until(lambda: token_hash(token) in {t.token_hash for t in store(a).api_tokens.values()})
    status, body = await api(a, "GET", "/api/v1/tokens", token)
    assert status == 200
    assert [t["name"] for t in body["tokens"]] == ["deploy"]


def cluster_config(kube: KubeEnv, tmp_path: Path, **extra: Any) -> Path:
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"runtime": "kubernetes", "kubernetes": {
        "api_url": kube.url, "namespace": NS, "ide_key_file": str(ide_key_file(tmp_path)), **extra}}))
    return config


async def test_token_seal_seals_what_an_older_gateway_made_once_and_nothing_else(
        kube: KubeEnv, replica: MakeReplica, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """Upgrading from a gateway that stored records unsealed: until ``token seal`` runs they grant nothing; it
    seals each record there, leaves one sealed with another key (and one changed while it ran), and run again
    changes nothing."""
    emu = kube.emulator
    a = await replica("gw-a")
    link_token, api_token, foreign_token = "chs_" + "l" * 40, "chk_" + "t" * 40, "chk_" + "f" * 40
    old_link = make_share_link(ShareLink(id="oldlink00001", token_hash=token_hash(link_token), workspace="w1",
                                         port=8000, audience="anyone", people=[], created_by="alice", created=0.0,
                                         expires=time.time() + 3600))
    emu.create_object(SHARE_LINK, old_link, NS)
    emu.create_object(API_TOKEN, make_api_token(ApiToken(
        id="oldtoken0001", token_hash=token_hash(api_token), subject="alice", name="old", created=0.0)), NS)
    emu.create_object(API_TOKEN, make_api_token(ApiToken(
        id="foreign00001", token_hash=token_hash(foreign_token), subject="alice", name="f", created=0.0), b"x" * 32),
        NS)
    old_consent = Consent.answer("bob", "w1", 8000, owner="alice", share=True, claims=["user"])
    emu.create_object(CONSENT, make_consent(old_consent), NS)
    await until(lambda: "ApiToken foreign00001 is not sealed" in caplog.text)
    assert old_consent.id not in store(a).consents
    assert (await api(a, "GET", "/api/v1/tokens", api_token))[0] == 401
    assert (await open_share(a, link_token))[0] != 303

    argv = ["token", "seal", "--config", str(cluster_config(kube, tmp_path))]
    emu.fail("patch", SHARE_LINK, status=409)  # the link changed between the list and the seal
    assert await asyncio.to_thread(cli.main, argv) == 0
    assert capsys.readouterr().out.splitlines() == [
        "ShareLink: 0 sealed, 0 already sealed; left as they are (sealed otherwise, of no workspace now, or changed "
        "meanwhile): "
        "oldlink00001",
        "ApiToken: 1 sealed, 0 already sealed; left as they are (sealed otherwise, of no workspace now, or changed "
        "meanwhile): "
        "foreign00001",
        "IdentityConsent: 1 sealed, 0 already sealed"]
    assert await asyncio.to_thread(cli.main, argv) == 0
    assert capsys.readouterr().out.splitlines() == [
        "ShareLink: 1 sealed, 0 already sealed",
        "ApiToken: 0 sealed, 1 already sealed; left as they are (sealed otherwise, of no workspace now, or changed "
        "meanwhile): "
        "foreign00001",
        "IdentityConsent: 0 sealed, 1 already sealed"]

    await until(lambda: "oldtoken0001" in store(a).api_tokens and "oldlink00001" in store(a).shares
                and old_consent.id in store(a).consents)
    assert (await api(a, "GET", "/api/v1/tokens", api_token))[0] == 200
    assert (await open_share(a, link_token))[0] == 303
    assert (await api(a, "GET", "/api/v1/tokens", foreign_token))[0] == 401
    sealed_link = emu.get_object(SHARE_LINK, NS, "oldlink00001")
    assert sealed_link is not None
    assert sealed_link["spec"] == {**old_link["spec"], "seal": sealed_link["spec"]["seal"]}  # nothing else changed
    w1 = emu.get_object(WORKSPACE, NS, "w1")
    assert w1 is not None  # the link had no owner: it has the Workspace it belongs to now
    assert [ref["uid"] for ref in sealed_link["metadata"]["ownerReferences"]] == [w1["metadata"]["uid"]]

    emu.patch_object(API_TOKEN, NS, "oldtoken0001", {"spec": {"subject": "root"}})  # refused again: said again
    await until(lambda: caplog.text.count("ApiToken oldtoken0001 is not sealed") == 2)
    assert "oldtoken0001" not in store(a).api_tokens


class RacingClient(KubeClient):
    """A client that lets the test change the cluster between a list and what follows it."""

    def __init__(self, kube: KubeEnv, meanwhile: Callable[[Any], None]) -> None:
        super().__init__(kube.api_client, NS)
        self.meanwhile = meanwhile

    async def list(self, kind: Any, **selectors: str | None) -> dict[str, Any]:
        found = await super().list(kind, **selectors)
        self.meanwhile(kind)
        return found


async def test_token_seal_leaves_a_record_changed_or_deleted_after_it_was_read(kube: KubeEnv) -> None:
    """Its seal is of what it read: written over a change (Mallory makes an unsealed token out to root between the
    list and the seal), it would vouch for the change."""
    emu = kube.emulator
    for name in ("changed00001", "deleted00001", "kept00000001"):
        emu.create_object(API_TOKEN, make_api_token(ApiToken(
            id=name, token_hash=token_hash("chk_" + name), subject="alice", name="n", created=0.0)), NS)

    def meanwhile(kind: Any) -> None:
        if kind.kind == "ApiToken":
            emu.patch_object(API_TOKEN, NS, "changed00001", {"spec": {"subject": "root"}})
            emu.delete_object(API_TOKEN, NS, "deleted00001")

    done = await seal_records(RacingClient(kube, meanwhile), SEAL_KEY)
    assert done["ApiToken"] == Sealing(sealed=1, already=0, left=["changed00001", "deleted00001"])
    changed = emu.get_object(API_TOKEN, NS, "changed00001")
    assert changed is not None
    assert "seal" not in changed["spec"]
    kept = emu.get_object(API_TOKEN, NS, "kept00000001")
    assert kept is not None
    assert sealed(SEAL_KEY, "ApiToken", kept)

    emu.fail("patch", API_TOKEN, status=403, reason="Forbidden", message="RBAC says no")
    with pytest.raises(KubeError) as refused:  # any other refusal stops it, to be said
        await seal_records(KubeClient(kube.api_client, NS), SEAL_KEY)
    assert refused.value.status == 403


async def test_token_seal_leaves_a_link_of_no_workspace_now(kube: KubeEnv) -> None:
    """A link from before owners is sealed with the Workspace it belongs to as owner; with none of its name, one
    being deleted, or one made after it (another's, by ``belongs``), there is nothing it may open: it is left, and
    said so."""
    emu = kube.emulator
    emu.create_object(WORKSPACE, {"metadata": {"name": "w3", "finalizers": ["test/held"]},
                                  "spec": {"owner": "alice"}}, NS)
    for name, workspace in (("going0000001", "w3"), ("nowhere00001", "w9"), ("older0000001", "w2")):
        emu.create_object(SHARE_LINK, make_share_link(ShareLink(
            id=name, token_hash=token_hash("chs_" + name), workspace=workspace, port=8000, audience="anyone",
            people=[], created_by="alice", created=0.0, expires=time.time() + 3600)), NS)
    emu.delete_object(WORKSPACE, NS, "w3")  # held by its finalizer: going, not gone
    assert (emu.get_object(WORKSPACE, NS, "w3") or {})["metadata"]["deletionTimestamp"]
    await asyncio.sleep(1.1)  # creation times are in seconds
    emu.create_object(WORKSPACE, {"metadata": {"name": "w2"}, "spec": {"owner": "bob"}}, NS)
    done = await seal_records(KubeClient(kube.api_client, NS), SEAL_KEY)
    assert done["ShareLink"] == Sealing(sealed=0, already=0, left=["going0000001", "nowhere00001", "older0000001"])
    for name in ("going0000001", "nowhere00001", "older0000001"):
        left = emu.get_object(SHARE_LINK, NS, name)
        assert left is not None
        assert "seal" not in left["spec"]
        assert "ownerReferences" not in left["metadata"]


def test_seals_stay_what_they_were_when_records_were_made(tmp_path: Path) -> None:
    """A record sealed by one release must stay sealed for the next: the key's derivation and the seal's canonical
    form are pinned to the values the first sealing release computed."""
    (tmp_path / "ide-key").write_bytes(b"0123456789abcdef" * 3 + b"\n")  # as `base64 > ide-key` leaves it
    settings = kube_settings("http://127.0.0.1:9", ide_key_file=str(tmp_path / "ide-key"))
    assert (seal_key(settings) or b"").hex() == SEAL_KEY_VECTOR
    assert seal_key(kube_settings("http://127.0.0.1:9", ide_key_file=str(tmp_path / "ide-key"),
                                  namespace="another")) != seal_key(settings)  # another installation's
    obj = make_share_link(ShareLink(id="abc123def456", token_hash="f" * 64, workspace="w1", port=8000,
                                    audience="people", people=["bob", "grüße"], created_by="alice",
                                    created=0.0, expires=1_800_003_600.5), "uid-1", bytes.fromhex(SEAL_KEY_VECTOR))
    assert obj["spec"]["seal"] == SEAL_VECTOR


async def test_a_cluster_whose_definitions_drop_the_seal_is_told_to_update_them(
        kube: KubeEnv, replica: MakeReplica, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Helm never upgrades CRDs: a cluster still on the ShareLink and ApiToken definitions from before seals prunes
    ``spec.seal``, and what the gateway made would be refused by every replica. Whoever asked is told what to do,
    and nothing made is left behind."""
    emu = kube.emulator
    a = await replica("gw-a")
    alice = await alice_token(a)
    assert emu.schemas is not None
    current, old = emu.schemas, copy.deepcopy(dict(emu.schemas))
    for plural in ("sharelinks", "apitokens"):
        del old[f"codehub.dev/v1alpha1/{plural}"]["properties"]["spec"]["properties"]["seal"]
    emu.schemas = old
    status, body = await api(a, "POST", "/api/v1/workspaces/w1/shares", alice, {"port": 8000})
    assert (status, body["error"]["code"]) == (503, "kubernetes-refused")
    assert body["error"]["message"] == ("The cluster's ShareLink definition drops spec.seal: apply the chart's CRDs "
                                        "(charts/codehub-gateway/crds) and try again.")
    argv = ["token", "issue", "--user", "ops", "--config", str(cluster_config(kube, tmp_path))]
    assert await asyncio.to_thread(cli.main, argv) == 1
    assert "codehub-gateway: The cluster's ApiToken definition drops spec.seal" in capsys.readouterr().err
    assert emu.list_objects(SHARE_LINK, NS) == []
    assert [obj["spec"]["name"] for obj in emu.list_objects(API_TOKEN, NS)] == ["t"]  # Alice's, from before
    emu.schemas = current
    emu.pruned.clear()  # what the test made happen (Alice's token's use, written meanwhile, lost its seal too)


async def test_token_seal_says_when_the_cluster_refuses(kube: KubeEnv, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    kube.emulator.fail("list", API_TOKEN, status=403, reason="Forbidden", message="RBAC says no")
    argv = ["token", "seal", "--config", str(cluster_config(kube, tmp_path))]
    assert await asyncio.to_thread(cli.main, argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("codehub-gateway: token seal: the cluster refused: ")
    assert "RBAC says no" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(("config", "said"), [
    ({"runtime": "local"}, "token seal: only a cluster's records are sealed (runtime: kubernetes)"),
    ({"runtime": "kubernetes", "kubernetes": {"api_url": "http://127.0.0.1:9"}},
     "token seal: kubernetes.ide_key_file is not set: records are neither sealed nor checked"),
])
def test_token_seal_says_why_it_cannot_seal(config: dict[str, Any], said: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["token", "seal", "--config", str(path)]) == 1
    assert capsys.readouterr().err == f"codehub-gateway: {said}\n"


async def test_changes_fail_clearly_while_the_api_refuses(kube: KubeEnv, replica: MakeReplica) -> None:
    a = await replica("gw-a")
    token = await alice_token(a)
    kube.emulator.fail("post", SHARE_LINK, status=403, reason="Forbidden", message="RBAC says no")
    status, body = await api(a, "POST", "/api/v1/workspaces/w1/shares", token, {"port": 8000})
    assert (status, body["error"]["code"]) == (503, "kubernetes-refused")
    assert store(a).shares == {}


# -- the resources as pure data --

LINK = ShareLink(id="abc123def456", token_hash="f" * 64, workspace="w1", port=8000, audience="people",
                 people=["bob", "group:qa"], created_by="alice", created=1_800_000_000.0,
                 expires=1_800_003_600.5)


def test_a_share_link_resource_round_trips() -> None:
    obj = make_share_link(LINK)
    assert obj == {
        "apiVersion": "codehub.dev/v1alpha1", "kind": "ShareLink",
        "metadata": {"name": "abc123def456", "labels": {"app.kubernetes.io/managed-by": "codehub-gateway",
                                                        "codehub.dev/workspace": "w1"}},
        "spec": {"workspace": "w1", "audience": "people", "people": ["bob", "group:qa"], "createdBy": "alice",
                 "expires": "2027-01-15T09:00:00.500000Z", "tokenHash": "f" * 64, "port": 8000},
    }
    obj["metadata"]["creationTimestamp"] = "2027-01-15T08:00:00Z"
    obj["status"] = {"replicas": {"gw-a": {"uses": 3, "lastUsed": "2027-01-15T08:10:00Z"},
                                  "gw-b": {"uses": 2, "lastUsed": "2027-01-15T08:20:00Z"},
                                  "gw-c": "nonsense"}}
    parsed = parse_share_link(obj)
    assert parsed == ShareLink(**{**LINK.__dict__, "uses": 5, "last_used": 1_800_001_200.0})


@pytest.mark.parametrize("change", [
    {"tokenHash": ""}, {"workspace": None}, {"expires": "soon"}, {"audience": "everyone"}, {"port": 0},
    {"port": "8000"},
])
def test_a_malformed_share_link_grants_nothing(change: dict[str, Any]) -> None:
    obj = make_share_link(LINK)
    obj["spec"].update(change)
    assert parse_share_link(obj) is None


SEAL_KEY = b"s" * 32
# HMAC-SHA256(b"0123456789abcdef" * 3, b"codehub-records\0codehub") (the namespace), and with it, of the canonical
# form (compact JSON, keys sorted, ASCII): ["ShareLink","abc123def456",["uid-1"],["w1",8000,"people",
# ["bob","gr\u00fc\u00dfe"],"alice","2027-01-15T09:00:00.500000Z","ff…ff"]]
SEAL_KEY_VECTOR = "d57de51b54a2765da75daa16cc3764cb41d45b0387bfcbcd2847aa25a651d30f"
SEAL_VECTOR = "bd6c74fdb63826822fe29a167dd0758441f9dc5e166e76b4ecd394a97d462086"
ANSWER = Consent.answer("bob", "w1", 8000, owner="alice", share=False, claims=["user"])
RECORD = ApiToken(id="0a1b2c3d4e5f", token_hash="e" * 64, subject="alice", name="ci", created=0.0,
                  email="alice@corp.test", groups=["qa"], attributes={"team": "web"})


@pytest.mark.parametrize(("kind", "change"), [
    *[("ShareLink", {"spec": {name: value}}) for name, value in [
        ("workspace", "w2"), ("port", 8001), ("port", None), ("audience", "anyone"), ("people", ["bob"]),
        ("people", None), ("createdBy", "mallory"), ("expires", "2099-01-01T00:00:00.000000Z"),
        ("tokenHash", "0" * 64)]],
    *[("ApiToken", {"spec": {name: value}}) for name, value in [
        ("subject", "bob"), ("email", "bob@corp.test"), ("groups", ["qa", "admins"]), ("groups", None),
        ("attributes", {"team": "ops"}), ("attributes", None), ("name", "other"), ("tokenHash", "0" * 64)]],
    *[("IdentityConsent", {"spec": {name: value}}) for name, value in [
        ("subject", "carol"), ("workspace", "w2"), ("port", 8001), ("share", True), ("claims", ["user", "email"]),
        ("claims", None), ("answered", "2099-01-01T00:00:00.000000Z")]],
    ("ShareLink", {"metadata": {"name": "otherlink001"}}),
    ("ApiToken", {"metadata": {"name": "othertoken01"}}),
    ("ShareLink", {"metadata": {"ownerReferences": None}}),
    ("ShareLink", {"metadata": {"ownerReferences": [{"kind": "Workspace", "name": "w1", "uid": "uid-of-another"}]}}),
    ("ShareLink", {"metadata": {"ownerReferences": [{"kind": "Workspace", "name": "w1", "uid": "uid-1"},
                                                    {"kind": "Workspace", "name": "w1", "uid": "uid-2"}]}}),
    ("ShareLink", {"spec": {"seal": None}}),
    ("ShareLink", {"spec": {"seal": "0" * 64}}),
    ("ApiToken", {"spec": {"seal": 7}}),
])
def test_a_seal_holds_only_for_what_it_was_made_for(kind: str, change: dict[str, Any]) -> None:
    """Every field that decides what a record opens, for whom and until when, its name and owners."""
    obj = {"ShareLink": lambda: make_share_link(LINK, "uid-1", SEAL_KEY),
           "ApiToken": lambda: make_api_token(RECORD, SEAL_KEY),
           "IdentityConsent": lambda: make_consent(ANSWER, SEAL_KEY)}[kind]()
    assert sealed(SEAL_KEY, kind, obj)
    assert not sealed(b"t" * 32, kind, obj)
    assert not sealed(SEAL_KEY, kind, merge_patch(obj, change))


@pytest.mark.parametrize("change", [
    {"spec": {"revoked": "2027-01-15T09:00:00.000000Z"}},  # the gateway's own patch, after the seal
    {"status": {"replicas": {"gw-a": {"uses": 3}}}},
    {"metadata": {"labels": {"extra": "x"}, "resourceVersion": "7", "creationTimestamp": "2027-01-15T08:00:00Z",
                  "uid": "u"}},
])
def test_a_seal_holds_through_what_the_gateway_and_the_cluster_change_later(change: dict[str, Any]) -> None:
    obj = make_share_link(LINK, "uid-1", SEAL_KEY)
    assert sealed(SEAL_KEY, "ShareLink", merge_patch(obj, change))
    assert parse_share_link(merge_patch(obj, change)) is not None
    assert sealed(None, "ShareLink", make_share_link(LINK))  # without a key, nothing is checked


@pytest.mark.parametrize("obj", [{}, {"metadata": {"name": "x"}}, {"spec": {"seal": "0" * 64}},
                                 {"metadata": None, "spec": None}])
def test_an_object_without_spec_or_metadata_is_not_sealed_and_breaks_nothing(obj: dict[str, Any]) -> None:
    for kind in ("ShareLink", "ApiToken", "IdentityConsent"):
        assert not sealed(SEAL_KEY, kind, obj)


def test_a_seal_holds_whatever_order_the_api_server_gives_a_maps_keys() -> None:
    """The API server keeps a custom resource as a map and writes its keys in its own (sorted) order."""
    record = ApiToken(id="0a1b2c3d4e5f", token_hash="e" * 64, subject="alice", name="ci", created=0.0,
                      attributes={"team": "web", "dept": "rd", "site": "ber"})
    obj = make_api_token(record, SEAL_KEY)
    obj["spec"]["attributes"] = dict(sorted(obj["spec"]["attributes"].items()))
    assert list(obj["spec"]["attributes"]) != list(record.attributes)
    assert sealed(SEAL_KEY, "ApiToken", obj)


def test_an_api_token_resource_round_trips_and_usage_patches_are_per_replica() -> None:
    identity = Identity("alice", "alice@corp.test", ("qa",), "", (("team", "web"),))  # the token's label is no name
    record = ApiToken(id="0a1b2c3d4e5f", token_hash="e" * 64, subject="alice", name="ci", created=0.0,
                      email="alice@corp.test", groups=["qa"], attributes={"team": "web"})
    obj = make_api_token(record)
    assert obj["spec"] == {"subject": "alice", "email": "alice@corp.test", "groups": ["qa"],
                           "attributes": {"team": "web"}, "name": "ci", "tokenHash": "e" * 64}
    parsed = parse_api_token(obj)
    assert parsed == record
    assert parsed.identity() == identity
    assert usage_patch("gw-a", 1_800_000_000.0, 7) == {
        "status": {"replicas": {"gw-a": {"lastUsed": "2027-01-15T08:00:00.000000Z", "uses": 7}}}}
    assert usage_patch("gw-b", 1_800_000_000.0) == {
        "status": {"replicas": {"gw-b": {"lastUsed": "2027-01-15T08:00:00.000000Z"}}}}


async def test_a_hand_off_code_is_admitted_once_across_replicas(kube: KubeEnv, replica: MakeReplica) -> None:
    """Any replica may be shown a hand-off code; the API server, not a replica's memory, says it was used."""
    a, b = await replica("gw-a"), await replica("gw-b")
    sessions = gateway(a).auth.sessions
    code = sessions.handoff_code(Session(Identity("alice"), sessions.sign_in()), PREVIEW, "state-1-of-this-browser0")

    async def callback(client: Client) -> tuple[int, str]:
        response = await client.get(f"/_codehub/auth/callback?code={code}&next=/", allow_redirects=False,
                                    headers={"Host": PREVIEW, "Accept": "application/json",
                                             "Cookie": "codehub_handoff=state-1-of-this-browser0"})
        return response.status, "" if response.status == 303 else (await response.json())["error"]["code"]

    assert await callback(b) == (303, "")
    assert await callback(a) == (400, "handoff-replayed")
    assert await callback(b) == (400, "handoff-replayed")
    used = kube.emulator.list_objects(USED_KEY, NS)
    assert [item["spec"]["usedBy"] for item in used] == ["gw-b"]

    # Past its time (a code is refused by its signature by then) the record is deleted, by whichever replica.
    assert await store(a).forget_used(time.time()) == 0
    assert await store(a).forget_used(time.time() + 120) == 1
    assert not kube.emulator.list_objects(USED_KEY, NS)


async def test_a_sign_out_through_one_replica_ends_the_sign_in_in_every_one(kube: KubeEnv,
                                                                            replica: MakeReplica) -> None:
    """A session opens on every replica until its sign-in is signed out through any one of them; the record is a
    used key of its own label (the only ones watched: hand-off codes are not), deleted past the sign-in's time."""
    a, b = await replica("gw-a"), await replica("gw-b")
    sessions = gateway(a).auth.sessions
    sign_in, other = sessions.sign_in(), sessions.sign_in()
    cookie, untouched = (sessions.issue(Identity("alice"), HUB, sign_in), sessions.issue(Identity("alice"), HUB, other))

    async def status(client: Client, session: str) -> int:
        response = await client.get("/api/v1/me", headers={"Host": HUB, "Cookie": f"codehub_session={session}"})
        return response.status

    assert [await status(client, cookie) for client in (a, b)] == [200, 200]
    await store(a).use_once("handoff-x", time.time() + 60)
    cut = kube.emulator.fail("watch", USED_KEY, status=200, times=None)  # no replica hears of it for now
    kube.emulator.drop_watches(USED_KEY)
    await store(b).end_sign_in(sign_in)
    assert [await status(client, cookie) for client in (a, b)] == [200, 401]  # at once where it was taken
    cut._disabled.set()
    await until(lambda: sign_in.id in store(a).ended_sign_ins)  # the others when their watch is back
    assert await status(a, cookie) == 401
    await store(a).end_sign_in(sign_in)  # again, through another replica: nothing changes
    assert [await status(client, untouched) for client in (a, b)] == [200, 200]
    assert list(store(a).ended_sign_ins) == [sign_in.id]
    ended = kube.emulator.get_object(USED_KEY, NS, f"sign-out-{sign_in.id}")
    assert ended is not None
    assert (ended["metadata"]["labels"]["codehub.dev/used-for"], ended["spec"]["usedBy"]) == ("sign-out", "gw-b")

    assert await store(a).forget_used(time.time() + 120) == 1  # the hand-off code's
    assert sign_in.id in store(b).ended_sign_ins
    assert await store(a).forget_used(sign_in.expires + 2) == 1
    await until(lambda: sign_in.id not in store(a).ended_sign_ins and sign_in.id not in store(b).ended_sign_ins)


async def test_what_a_replica_holds_survives_its_caches_listing_again(kube: KubeEnv, replica: MakeReplica) -> None:
    """A re-list (the API's history compacted past the caches' place) tells the store only what changed: a sign-in
    signed out stays ended, a consent stays given, a revoked link stays revoked and a link's uses stay counted."""
    a = await replica("gw-a")
    token = await alice_token(a)
    sessions = gateway(a).auth.sessions
    sign_in = sessions.sign_in()
    cookie = sessions.issue(Identity("alice"), HUB, sign_in)
    await store(a).end_sign_in(sign_in)
    answer = Consent.answer("bob", "w1", 8000, owner="alice", share=True, claims=["user"])
    await store(a).record_consent(answer)
    links = [(await api(a, "POST", "/api/v1/workspaces/w1/shares", token, {"port": 8000}))[1] for _ in range(2)]
    assert (await api(a, "DELETE", f"/api/v1/workspaces/w1/shares/{links[1]['id']}", token))[0] == 200
    assert await open_share(a, links[0]["token"]) == (303, "")
    caches = [store(a).informers[kind] for kind in store(a).kinds]
    await until(lambda: all(cache.healthy for cache in caches))

    kube.emulator.compact()
    kube.emulator.drop_watches(error=410)
    await until(lambda: all(cache.lists == 2 and cache.healthy for cache in caches))
    response = await a.get("/api/v1/me", headers={"Host": HUB, "Cookie": f"codehub_session={cookie}"})
    assert response.status == 401
    assert store(a).consents[answer.id].share
    assert await open_share(a, links[1]["token"]) == (403, "share-revoked")
    assert await open_share(a, links[0]["token"]) == (303, "")
    assert store(a).shares[links[0]["id"]].uses == 2


async def test_a_consent_given_through_one_replica_applies_in_every_one(kube: KubeEnv, replica: MakeReplica) -> None:
    a, b = await replica("gw-a"), await replica("gw-b")
    answer = Consent.answer("bob", "w1", 8000, owner="alice", share=True, claims=["user", "email"])
    await store(a).record_consent(answer)
    assert store(a).consents[answer.id] == answer  # at once where it was given
    await until(lambda: answer.id in store(b).consents)
    assert store(b).consents[answer.id].share
    stored = kube.emulator.get_object(CONSENT, NS, answer.id)
    assert stored is not None
    assert stored["spec"] == {"subject": "bob", "workspace": "w1", "port": 8000, "share": True,
                              "claims": ["user", "email"], "answered": stored["spec"]["answered"],
                              "seal": stored["spec"]["seal"]}

    # Answered again (declined this time): the same object, replaced.
    declined = Consent.answer("bob", "w1", 8000, owner="alice", share=False, claims=["user", "email"])
    await store(b).record_consent(declined)
    await until(lambda: not store(a).consents[answer.id].share)
    assert len(kube.emulator.list_objects(CONSENT, NS)) == 1

    await store(a).withdraw_consent(declined)
    assert answer.id not in store(a).consents
    await until(lambda: answer.id not in store(b).consents)


async def test_a_consent_answer_written_past_the_gateway_is_no_answer(kube: KubeEnv, replica: MakeReplica) -> None:
    """Whoever may write IdentityConsent objects cannot make a visitor's identity go to an app: neither an answer
    made up for Carol nor Bob's "no" turned into a "yes" is taken; they are asked again."""
    emu = kube.emulator
    a = await replica("gw-a")
    made_up = Consent.answer("carol", "w1", 8000, owner="alice", share=True, claims=["user"])
    emu.create_object(CONSENT, make_consent(made_up), NS)
    declined = Consent.answer("bob", "w1", 8000, owner="alice", share=False, claims=["user", "email"])
    await store(a).record_consent(declined)
    emu.patch_object(CONSENT, NS, declined.id, {"spec": {"share": True}})
    await until(lambda: declined.id not in store(a).consents)
    assert store(a).consents == {}


async def test_links_go_with_their_workspace(kube: KubeEnv, replica: MakeReplica) -> None:
    a = await replica("gw-a")
    token = await alice_token(a)
    status, link = await api(a, "POST", "/api/v1/workspaces/w1/shares", token, {"port": 8000})
    assert status == 201
    stored = kube.emulator.get_object(SHARE_LINK, NS, link["id"])
    workspace = kube.emulator.get_object(WORKSPACE, NS, "w1")
    assert stored is not None
    assert workspace is not None
    assert [ref["uid"] for ref in stored["metadata"]["ownerReferences"]] == [workspace["metadata"]["uid"]]

    status, _ = await api(a, "DELETE", "/api/v1/workspaces/w1", token)
    assert status == 200
    await kube.emulator.wait_gone(SHARE_LINK, NS, link["id"])
    await kube.emulator.wait_gone(WORKSPACE, NS, "w1")
    await until(lambda: link["id"] not in store(a).shares)
    assert (await open_share(a, link["token"]))[0] in (401, 404)  # nothing left to open


async def test_a_link_deleted_in_the_cluster_stops_opening_on_every_replica(
        kube: KubeEnv, replica: MakeReplica) -> None:
    a, b, _, link = await link_on_two(replica)
    assert (await open_share(b, link["token"]))[0] == 303
    kube.emulator.delete_object(SHARE_LINK, NS, link["id"])  # kubectl delete sharelink: a leaked link
    for client in (a, b):
        await until(lambda: link["id"] not in store(client).shares)  # noqa: B023
        assert store(client).find_share(link["token"]) is None
        assert (await open_share(client, link["token"]))[0] != 303


async def test_the_leader_deletes_expired_links(kube: KubeEnv, aiohttp_client: Any, tmp_path: Path) -> None:
    kube.emulator.create_object(WORKSPACE, {"metadata": {"name": "w1"}, "spec": {"owner": "alice"}}, NS)
    settings = kube_settings(kube.url, identity="gw-a", share_retention=0.2,
                             share_prune_interval=0.1).model_dump(mode="json")
    config = Config.model_validate({"runtime": "kubernetes", "kubernetes": settings,
                                    "local": {"state_dir": str(tmp_path / "shared")}})
    client: Client = await aiohttp_client(build_app(config))
    links = store(client)
    await until(lambda: gateway(client).runtime.is_leader())
    short, _ = await links.create_share(workspace="w1", port=8000, audience="anyone", people=[],
                                        created_by="alice", ttl=0.1)
    long, _ = await links.create_share(workspace="w1", port=8000, audience="anyone", people=[],
                                       created_by="alice", ttl=3600)
    await kube.emulator.wait_gone(SHARE_LINK, NS, short.id)
    assert kube.emulator.get_object(SHARE_LINK, NS, long.id) is not None
    await until(lambda: [link.id for link in links.shares_of("w1")] == [long.id])  # the hub lists it no more


async def test_a_replica_that_does_not_lead_deletes_nothing(kube: KubeEnv) -> None:
    kube.emulator.create_object(WORKSPACE, {"metadata": {"name": "w1"}, "spec": {"owner": "alice"}}, NS)
    client = KubeClient(kube.new_api_client(), NS)
    informers = Informers()
    links = KubeTokenStore(kube_settings(kube.url, share_retention=0.1, share_prune_interval=0.1), "gw-b",
                           lambda: client, informers)
    await informers.start(client, sync_timeout=5)
    await links.start()
    try:
        link, _ = await links.create_share(workspace="w1", port=8000, audience="anyone", people=[],
                                           created_by="alice", ttl=0.05)
        await asyncio.sleep(0.6)
        assert kube.emulator.get_object(SHARE_LINK, NS, link.id) is not None
    finally:
        await links.close()
        await informers.stop()


async def test_a_store_not_started_refuses_clearly_and_closes_quietly(kube: KubeEnv) -> None:
    links = KubeTokenStore(kube_settings(kube.url), "gw-b", lambda: None, Informers())
    with pytest.raises(LifecycleError) as refused:
        await links.start()  # the runtime has no client yet
    assert refused.value.code == "kubernetes-unavailable"
    for call in (links.use_once("code", until=1.0), links.create_share(
            workspace="w1", port=8000, audience="anyone", people=[], created_by="alice", ttl=60)):
        with pytest.raises(LifecycleError) as refused:
            await call
        assert refused.value.code == "kubernetes-unavailable"
    await links.close()


async def test_used_keys_past_their_time_are_forgotten_in_the_background(kube: KubeEnv) -> None:
    used = UsedKeys(KubeClient(kube.new_api_client(), NS), "gw-a", attempts=1)
    assert await used.use_once("code-1", until=time.time() - 1)  # already past its time
    forgetting = asyncio.create_task(used.forget_forever(every=0.05))
    try:
        await until(lambda: not kube.emulator.list_objects(USED_KEY, NS))
    finally:
        forgetting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await forgetting

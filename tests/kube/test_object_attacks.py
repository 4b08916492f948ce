"""Objects the gateway did not make, or made for someone else, meeting the gateway: what each one must not do.

Each test is a hole found by attacking the Kubernetes runtime through what it reads (Workspaces, pods, PVCs,
VolumeSnapshots, ShareLinks) and through names reused while the cluster still holds an older namesake's objects.
"""

from __future__ import annotations

import pytest

from gateway.auth.identity import Identity
from tests.kube.emulator import SHARE_LINK, WORKSPACE, KubeEnv
from tests.kube.support import NS, until
from tests.kube.test_token_store import MakeReplica, alice_token, api, gateway, open_share, replica, store

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

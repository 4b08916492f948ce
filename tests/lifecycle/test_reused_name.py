"""A local workspace's name given to someone else: the files of the one before are not the new owner's.

The operator removes alice's ``proj`` from the configuration and later declares a ``proj`` for bob with the same
``state_dir``. Before, bob's workspace started in alice's home (her files, her keys), with her collaborators, port
rules and identity opt-ins: nothing tied the folder to its owner.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from gateway.auth.identity import Identity
from gateway.edge.policy import Grant, Policy, decide
from gateway.lifecycle import Phase
from gateway.lifecycle.base import LifecycleError
from gateway.lifecycle.local import LocalRuntime
from gateway.lifecycle.remote import state_from_wire, state_to_wire
from tests.conftest import MakeGateway, next_address, settings, workspace
from tests.lifecycle.conftest import API, gateway_of

pytestmark = pytest.mark.timeout(60)


async def test_a_name_given_to_another_owner_does_not_start_in_the_old_owners_files(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    old = LocalRuntime(settings(tmp_path, {"proj": workspace(next_address(), owner="alice")}).local)
    await old.start()
    alices_link = time.time()
    try:
        await old.wake("proj")
        home = tmp_path / "state" / "workspaces" / "proj" / "home"
        (home / "alice-secret.txt").write_text("alice's ssh key")
        (home / ".devcontainer").mkdir()
        (home / ".devcontainer" / "devcontainer.json").write_text('{"portsAttributes": {"3000": {"label": "A"}}}')
        await old.update("proj", collaborators=("eve",), identity_ports=frozenset({3000}))
        await old.stop("proj")
    finally:
        await old.close()

    new = LocalRuntime(settings(tmp_path, {"proj": workspace(next_address(), owner="bob")}).local)
    await new.start()
    try:
        state = new.get("proj")
        assert state is not None
        assert state.phase is Phase.FAILED
        assert "earlier workspace of the same name" in state.message
        assert "alice" not in state.message, "bob is not told whose it was; the operator's log says"
        [said] = [r.getMessage() for r in caplog.records if "moved away" in r.getMessage()]
        assert "alice" in said
        assert str(tmp_path / "state" / "workspaces" / "proj") in said
        assert state.spec.collaborators == ()
        assert state.spec.identity_ports == frozenset()
        assert new.port_labels("proj") == {}
        woken = await new.wake("proj")
        assert woken.phase is Phase.FAILED
        assert new.listening_ports("proj") == set(), "nothing started in alice's home"
        assert (await new.stop("proj")).phase is Phase.FAILED
        with pytest.raises(LifecycleError):
            await new.update("proj", collaborators=("bob2",))
    finally:
        await new.close()

    shutil.rmtree(tmp_path / "state" / "workspaces" / "proj")  # the operator moves alice's files away
    fresh = LocalRuntime(settings(tmp_path, {"proj": workspace(next_address(), owner="bob")}).local)
    await fresh.start()
    try:
        state = await fresh.wake("proj")
        assert state.phase is Phase.RUNNING
        assert not (tmp_path / "state" / "workspaces" / "proj" / "home" / "alice-secret.txt").exists()
        # alice's share links for "proj", still in the token store, are not links to bob's workspace
        policy = Policy()
        for made, opens in ((alices_link, False), (time.time(), True)):
            grant = Grant("l1", "proj", None, "anyone", created=made)
            assert decide(policy, state.spec, 3000, None, grant).allow is opens
        assert state_from_wire(state_to_wire(state, 1)).spec == state.spec, "and so do serve --workers' workers"
    finally:
        await fresh.close()


async def test_the_new_owner_is_shown_none_of_the_old_owners_links(tmp_path: Path, make_gateway: MakeGateway) -> None:
    """Nor can they revoke them: the API and the hub list a workspace's own links only."""
    old = await make_gateway(workspaces={"proj": workspace(next_address(), owner="alice")})
    link, _token = await gateway_of(old).auth.store.create_share(workspace="proj", port=None, audience="anyone",
                                                                people=[], created_by="alice", ttl=86400)
    await old.close()
    shutil.rmtree(tmp_path / "state" / "workspaces" / "proj")
    new = await make_gateway(workspaces={"proj": workspace(next_address(), owner="bob")})
    _record, bob = await gateway_of(new).auth.store.create_api_token(Identity("bob"), name="t")
    hub = {"Host": "localhost:8080", "Authorization": f"Bearer {bob}", **API}
    listed = await new.get("/api/v1/workspaces/proj/shares", headers=hub)
    assert (listed.status, await listed.json()) == (200, {"shares": []})
    snapshot = await (await new.get("/api/v1/hub/snapshot", headers=hub)).json()
    assert [view["shares"] for view in snapshot["workspaces"]] == [[]]
    revoked = await new.delete(f"/api/v1/workspaces/proj/shares/{link.id}", headers=hub)
    assert revoked.status == 404

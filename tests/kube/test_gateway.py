"""The whole gateway on the Kubernetes runtime: build_app(config) with ``runtime: kubernetes`` against the
emulated API, a fake kubelet giving the pod a loopback IP, and real aiohttp servers listening there."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient

from gateway.auth.identity import Identity
from gateway.config import Config
from gateway.lifecycle import Phase
from gateway.lifecycle.idle import Activity, IdleTimers, reap_once
from gateway.lifecycle.kubernetes import KubernetesRuntime
from gateway.metrics import Metrics
from gateway.server.app import build_app
from gateway.server.context import GATEWAY
from tests.conftest import MakeUpstream, next_address
from tests.kube.emulator import POD, WORKSPACE, KubeEnv
from tests.kube.kubelet import FakeKubelet
from tests.kube.support import NS, MakeRuntime, kube_settings, new_workspace, until

pytestmark = pytest.mark.timeout(60)


def upstream(name: str) -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"server": name, "path": request.path, "host": request.headers.get("Host")})

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    return app


@pytest.fixture
async def pod_address(kube: KubeEnv) -> AsyncIterator[str]:
    address = next_address()
    async with FakeKubelet(kube.emulator, pod_ip=lambda pod: address):
        yield address


def gateway_config(kube: KubeEnv, tmp_path: Path) -> Config:
    settings = kube_settings(kube.url).model_dump(mode="json")
    data: dict[str, Any] = {"runtime": "kubernetes", "kubernetes": settings,
                            "local": {"state_dir": str(tmp_path / "state")}}
    return Config.model_validate(data)


async def test_a_share_url_wakes_the_pod_and_proxies_to_it(
        kube: KubeEnv, pod_address: str, make_upstream: MakeUpstream, aiohttp_client: Any, tmp_path: Path) -> None:
    emu = kube.emulator
    emu.create_object(WORKSPACE, {"metadata": {"name": "w1"},
                                  "spec": {"owner": "alice", "ports": {"8000": "public"}}}, NS)
    await make_upstream(upstream("preview"), pod_address, 8000)
    client: TestClient[web.Request, web.Application] = await aiohttp_client(build_app(gateway_config(kube, tmp_path)))
    runtime = client.app[GATEWAY].runtime
    assert isinstance(runtime, KubernetesRuntime)
    state = runtime.get("w1")
    assert state is not None
    assert state.phase is Phase.WARM
    assert emu.list_objects(POD, NS) == []

    response = await client.get("/some/page?x=1", headers={"Host": "8000-w1.localhost:8080",
                                                           "Accept": "application/json"})
    assert response.status == 200
    body = await response.json()
    assert body["server"] == "preview"
    assert body["path"] == "/some/page"
    assert [pod["metadata"]["name"] for pod in emu.list_objects(POD, NS)] == ["ws-w1"]
    state = runtime.get("w1")
    assert state is not None
    assert (state.phase, state.address) == (Phase.RUNNING, pod_address)

    again = await client.get("/", headers={"Host": "8000-w1.localhost:8080"})  # running: straight through
    assert again.status == 200
    unknown = await client.get("/", headers={"Host": "8000-nope.localhost:8080", "Accept": "application/json"})
    assert unknown.status == 404


async def test_a_browser_gets_the_waiting_page_while_the_pod_starts(
        kube: KubeEnv, pod_address: str, aiohttp_client: Any, tmp_path: Path) -> None:
    kube.emulator.create_object(WORKSPACE, {"metadata": {"name": "w2"},
                                            "spec": {"owner": "alice", "ports": {"8000": "public"}}}, NS)
    client: TestClient[web.Request, web.Application] = await aiohttp_client(build_app(gateway_config(kube, tmp_path)))
    response = await client.get("/", headers={"Host": "8000-w2.localhost:8080", "Accept": "text/html"})
    assert response.status == 503
    assert response.headers["Retry-After"]
    await kube.emulator.wait_for(POD, NS, "ws-w2")  # the page's wake carries on behind it


async def test_the_reaper_on_the_leader_sees_activity_from_other_replicas(
        kube: KubeEnv, pod_address: str, make_runtime: MakeRuntime) -> None:
    leader, other = await make_runtime("gw-a"), await make_runtime("gw-b")
    await new_workspace(leader)
    await leader.wake("w1")
    later = time.time() + 100  # the reaper runs 100 s from now; the workspace started "now"
    timers = IdleTimers(to_warm=30, to_cold=3600, check_every=1)
    other.record_activity("w1", later - 10)  # a request on the other replica, 10 s before the reaper runs
    await until(lambda: leader.last_activity("w1") is not None)

    await reap_once(leader, Activity(clock=lambda: later, shared=leader), timers, Metrics())
    assert leader.get("w1").phase is Phase.RUNNING  # type: ignore[union-attr]

    await reap_once(leader, Activity(clock=lambda: later + 60, shared=leader), timers, Metrics())
    assert leader.get("w1").phase is Phase.WARM  # type: ignore[union-attr]


async def test_use_seen_since_the_replicas_last_write_to_the_cluster_still_counts_for_its_reaper(
        kube: KubeEnv, pod_address: str, make_runtime: MakeRuntime) -> None:
    """A replica writes a workspace's activity to the cluster at most once per ``activity_interval``: what it saw
    since is newer than what the cluster holds, and its reaper goes by the newest use it knows of."""
    leader = await make_runtime("gw-a", activity_interval=3600)
    await new_workspace(leader)
    await leader.wake("w1")
    later = time.time() + 100  # the reaper runs 100 s from now
    timers = IdleTimers(to_warm=30, to_cold=3600, check_every=1)
    seen = [later - 60]
    activity = Activity(clock=lambda: seen[-1], shared=leader)
    activity.touch("w1")  # written at once: the first use
    await until(lambda: leader.last_activity("w1") is not None)
    seen.append(later - 10)
    activity.touch("w1")  # written only an hour after the first
    seen.append(later)

    await reap_once(leader, activity, timers, Metrics())

    cluster = leader.last_activity("w1")
    assert cluster is not None
    assert cluster <= later - 60  # by the cluster's word it has been idle for a minute
    assert leader.get("w1").phase is Phase.RUNNING  # type: ignore[union-attr]


async def test_the_management_api_creates_and_shares_workspaces(
        kube: KubeEnv, aiohttp_client: Any, tmp_path: Path) -> None:
    emu = kube.emulator
    client: TestClient[web.Request, web.Application] = await aiohttp_client(build_app(gateway_config(kube, tmp_path)))
    gateway = client.app[GATEWAY]
    _record, token = await gateway.auth.store.create_api_token(Identity("alice"), name="test")
    bearer = {"Host": "localhost:8080", "Authorization": f"Bearer {token}"}

    named = await client.post("/api/v1/workspaces", json={"id": "demo2", "ports": {"3000": "org"}}, headers=bearer)
    assert named.status == 201, await named.text()
    assert (await named.json())["owner"] == "alice"
    resource = emu.get_object(WORKSPACE, NS, "demo2")
    assert resource is not None
    assert resource["spec"]["owner"] == "alice"
    assert resource["spec"]["ports"] == {"3000": "org"}

    generated = await client.post("/api/v1/workspaces", json={}, headers=bearer)
    assert generated.status == 201
    new_id = (await generated.json())["id"]
    assert re.fullmatch(r"[a-z0-9]{12}", new_id)
    assert (emu.get_object(WORKSPACE, NS, new_id) or {}).get("spec", {}).get("owner") == "alice"

    shared = await client.put("/api/v1/workspaces/demo2/collaborators", json={"collaborators": ["bob"]},
                              headers=bearer)
    assert shared.status == 200
    assert (emu.get_object(WORKSPACE, NS, "demo2") or {}).get("spec", {}).get("collaborators") == ["bob"]

    _other, mallory = await gateway.auth.store.create_api_token(Identity("mallory"), name="test")
    taken = await client.post("/api/v1/workspaces", json={"id": "demo2"},
                              headers={**bearer, "Authorization": f"Bearer {mallory}"})
    assert taken.status == 409
    assert (await taken.json())["error"]["code"] == "workspace-exists"


async def test_a_person_owns_at_most_the_workspaces_the_policy_allows(
        kube: KubeEnv, aiohttp_client: Any, tmp_path: Path) -> None:
    """Each is a Workspace in the cluster, a home volume and a pod once woken: one person with an API token and a
    loop would otherwise take the cluster's room from everyone."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("workspaces:\n  most_per_person: 2\n")
    config = gateway_config(kube, tmp_path).model_copy(update={"policy_file": policy})
    kube.emulator.create_object(WORKSPACE, {"metadata": {"name": "old1"}, "spec": {"owner": "Alice"}}, NS)
    kube.emulator.create_object(WORKSPACE, {"metadata": {"name": "hers"}, "spec": {"owner": "carol"}}, NS)
    client: TestClient[web.Request, web.Application] = await aiohttp_client(build_app(config))
    gateway = client.app[GATEWAY]
    await until(lambda: gateway.runtime.get("hers") is not None)
    bearer = {"Host": "localhost:8080"}
    for name in ("alice", "carol"):
        _record, token = await gateway.auth.store.create_api_token(Identity(name), name="test")
        bearer[name] = f"Bearer {token}"

    async def create(who: str, workspace: str) -> ClientResponse:
        return await client.post("/api/v1/workspaces", json={"id": workspace},
                                 headers={"Host": "localhost:8080", "Authorization": bearer[who]})

    assert (await create("alice", "new1")).status == 201  # old1 is hers too (owner names compare as users)
    refused = await create("alice", "new2")
    assert refused.status == 409
    assert (await refused.json())["error"]["code"] == "too-many-workspaces"
    assert kube.emulator.get_object(WORKSPACE, NS, "new2") is None
    assert (await create("carol", "new3")).status == 201  # one person's count is theirs alone

    assert (await client.delete("/api/v1/workspaces/new1", headers={"Host": "localhost:8080",
                                                                    "Authorization": bearer["alice"]})).status == 200
    await until(lambda: gateway.runtime.get("new1") is None)
    assert (await create("alice", "new2")).status == 201


async def test_requests_through_one_replica_keep_the_workspace_up_for_the_leaders_reaper(
        kube: KubeEnv, pod_address: str, make_upstream: MakeUpstream, make_runtime: MakeRuntime, aiohttp_client: Any,
        tmp_path: Path) -> None:
    """A replica that serves a workspace's requests is not the one that reaps it: it writes their time to the
    Workspace, where the leader's reaper finds it and leaves the workspace running."""
    leader = await make_runtime("gw-a")
    await new_workspace(leader)
    await leader.wake("w1")
    await make_upstream(upstream("preview"), pod_address, 8000)
    later = time.time() + 100  # the leader's reaper runs 100 s from now; the workspace started "now"
    replica = build_app(gateway_config(kube, tmp_path), clock=lambda: later - 10)  # used 10 s before the pass
    client: TestClient[web.Request, web.Application] = await aiohttp_client(replica)

    assert (await client.get("/", headers={"Host": "8000-w1.localhost:8080"})).status == 200
    await until(lambda: leader.last_activity("w1") is not None)

    timers = IdleTimers(to_warm=30, to_cold=3600, check_every=1)
    await reap_once(leader, Activity(clock=lambda: later, shared=leader), timers, Metrics())
    assert leader.get("w1").phase is Phase.RUNNING  # type: ignore[union-attr]


async def test_a_websocket_open_on_one_replica_keeps_the_workspace_up_for_the_leaders_reaper(
        kube: KubeEnv, pod_address: str, make_upstream: MakeUpstream, make_runtime: MakeRuntime, aiohttp_client: Any,
        tmp_path: Path) -> None:
    """An open WebSocket is use for as long as it lasts, but it is one request: the replica holding it says so
    again at each of its reaper's ticks, so that the leader, which sees no connection of another replica, does not
    put the workspace to sleep under it."""
    leader = await make_runtime("gw-a")
    await new_workspace(leader)
    await leader.wake("w1")

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str(message.data)
        return ws

    app = web.Application()
    app.router.add_get("/ws", echo)
    await make_upstream(app, pod_address, 8000)
    later = time.time() + 100
    config = gateway_config(kube, tmp_path)
    config = config.model_copy(update={"idle": config.idle.model_copy(update={"check_every": 0.05})})
    client: TestClient[web.Request, web.Application] = await aiohttp_client(
        build_app(config, clock=lambda: later - 10))

    async with client.ws_connect("/ws", headers={"Host": "8000-w1.localhost:8080"}) as ws:
        await ws.send_str("hello")
        assert (await ws.receive(timeout=10)).data == "hello"
        await until(lambda: leader.last_activity("w1") is not None)

        timers = IdleTimers(to_warm=30, to_cold=3600, check_every=1)
        await reap_once(leader, Activity(clock=lambda: later, shared=leader), timers, Metrics())
        assert leader.get("w1").phase is Phase.RUNNING  # type: ignore[union-attr]

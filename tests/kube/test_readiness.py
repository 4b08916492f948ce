"""Readiness on the Kubernetes runtime: /readyz fails while the caches are not filled or have been cut off from the
API for longer than ``kubernetes.ready_grace``, and passes again once they watch again; /healthz (liveness) stays
"ok" throughout, because restarting a replica never brings an API back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.auth.kubernetes.tokens import KubeTokenStore
from gateway.config import Config
from gateway.lifecycle.kubernetes import KubernetesRuntime
from gateway.server.app import build_app
from gateway.server.context import GATEWAY
from tests.kube.emulator import SHARE_LINK, KubeEnv
from tests.kube.support import MakeRuntime, kube_settings, until

pytestmark = pytest.mark.timeout(60)


def lose_the_api(kube: KubeEnv) -> list[bool]:
    """Every API call answers 503 and every watch drops until ``down[0]`` is set to False."""
    down = [True]
    kube.emulator.fail(lambda request: down[0], status=503, times=None)
    kube.emulator.drop_watches(abort=True)
    return down


async def test_not_ready_before_the_caches_are_filled(kube: KubeEnv, make_runtime: MakeRuntime) -> None:
    assert KubernetesRuntime(kube_settings(kube.url)).not_ready() == "Kubernetes caches not started"
    runtime = await make_runtime()
    assert runtime.not_ready() is None


async def test_a_short_loss_of_the_api_is_ridden_out_from_the_cache(kube: KubeEnv,
                                                                    make_runtime: MakeRuntime) -> None:
    runtime = await make_runtime(ready_grace=3600)
    lose_the_api(kube)
    await until(lambda: not runtime.api_healthy)
    assert runtime.not_ready() is None


async def test_a_loss_past_the_grace_is_not_ready_until_the_api_is_back(kube: KubeEnv,
                                                                        make_runtime: MakeRuntime) -> None:
    runtime = await make_runtime(ready_grace=0.01)
    down = lose_the_api(kube)
    await until(lambda: runtime.not_ready() is not None)
    assert "Kubernetes API unreachable for" in str(runtime.not_ready())
    down[0] = False
    await until(lambda: runtime.not_ready() is None, within=20)


async def test_readyz_and_healthz_through_the_gateway(kube: KubeEnv, aiohttp_client: Any, tmp_path: Path) -> None:
    settings = kube_settings(kube.url, ready_grace=0.01).model_dump(mode="json")
    config = Config.model_validate({"runtime": "kubernetes", "kubernetes": settings,
                                    "local": {"state_dir": str(tmp_path / "state")}})
    client: TestClient[web.Request, web.Application] = await aiohttp_client(build_app(config))
    for host in ("localhost:8080", "10.1.2.3:8080"):  # the hub, and a pod IP as the kubelet probes it
        response = await client.get("/readyz", headers={"Host": host})
        assert (response.status, await response.json()) == (200, {"status": "ready"})
    down = lose_the_api(kube)
    runtime = client.app[GATEWAY].runtime
    await until(lambda: runtime.not_ready() is not None)
    response = await client.get("/readyz", headers={"Host": "10.1.2.3:8080"})
    assert response.status == 503
    body = await response.json()
    assert body["status"] == "not-ready"
    assert "Kubernetes API unreachable" in body["reason"]
    assert response.headers["Cache-Control"] == "no-store"
    response = await client.get("/healthz", headers={"Host": "10.1.2.3:8080"})
    assert (response.status, await response.json()) == (200, {"status": "ok"})
    down[0] = False
    await until(lambda: runtime.not_ready() is None, within=20)
    assert (await client.get("/readyz", headers={"Host": "10.1.2.3:8080"})).status == 200


async def test_a_lost_token_store_watch_makes_the_replica_not_ready_but_stops_no_wake(kube: KubeEnv,
                                                                                    aiohttp_client: Any,
                                                                                    tmp_path: Path) -> None:
    """Share links, API tokens and consent answers are cached in the runtime's registry: readiness covers them,
    while operations that decide from the runtime's own caches go on."""
    settings = kube_settings(kube.url, ready_grace=0.01).model_dump(mode="json")
    config = Config.model_validate({"runtime": "kubernetes", "kubernetes": settings,
                                    "local": {"state_dir": str(tmp_path / "state")}})
    client: TestClient[web.Request, web.Application] = await aiohttp_client(build_app(config))
    gateway = client.app[GATEWAY]
    runtime, store = gateway.runtime, gateway.auth.store
    assert isinstance(runtime, KubernetesRuntime)
    assert isinstance(store, KubeTokenStore)
    down = [True]
    kube.emulator.fail("watch", SHARE_LINK, lambda request: down[0], status=503, times=None)
    kube.emulator.fail("list", SHARE_LINK, lambda request: down[0], status=503, times=None)
    kube.emulator.drop_watches(SHARE_LINK, abort=True)
    await until(lambda: runtime.not_ready() is not None)
    response = await client.get("/readyz", headers={"Host": "10.1.2.3:8080"})
    assert response.status == 503
    assert (await response.json())["reason"].startswith("sharelinks: Kubernetes API unreachable for")
    assert runtime.api_healthy  # the runtime's own caches watch: wakes and stops go on
    assert not store.healthy
    down[0] = False
    await until(lambda: runtime.not_ready() is None, within=20)
    assert (await client.get("/readyz", headers={"Host": "10.1.2.3:8080"})).status == 200

"""One registry of list+watch caches per replica (``Informers``): the runtime's view and the token store register
their kinds in the runtime's registry, which watches each kind once and starts, reports on and stops them all."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from gateway.auth.kubernetes.tokens import KubeTokenStore
from gateway.lifecycle import LifecycleError
from gateway.lifecycle.kubernetes import KubernetesRuntime
from gateway.lifecycle.kubernetes.client import POD as POD_KIND
from gateway.lifecycle.kubernetes.client import SHARE_LINK as SHARE_LINK_KIND
from gateway.lifecycle.kubernetes.client import WORKSPACE as WORKSPACE_KIND
from gateway.lifecycle.kubernetes.client import KubeClient
from gateway.lifecycle.kubernetes.informer import Informers
from gateway.lifecycle.kubernetes.throttle import Throttle
from gateway.server.wiring import make_runtime, make_store
from tests.kube.emulator import SHARE_LINK, WORKSPACE, KubeEnv
from tests.kube.support import NS, kube_settings, until
from tests.kube.test_gateway import gateway_config

pytestmark = pytest.mark.timeout(60)

EVERY_KIND = {"workspaces", "pods", "persistentvolumeclaims", "volumesnapshots",  # the runtime's view
              "sharelinks", "apitokens", "identityconsents", "usedkeys"}  # the token store's (used keys: sign-outs)


def ignore(_event: str, _obj: dict[str, Any]) -> None:
    """A listener for tests about registering, not about changes."""


async def test_the_token_store_caches_in_the_runtimes_registry_and_closing_the_runtime_ends_every_watch(
        kube: KubeEnv, tmp_path: Path) -> None:
    emu = kube.emulator
    config = gateway_config(kube, tmp_path)
    runtime = make_runtime(config)  # as both process shapes wire them
    store = make_store(config, runtime)
    assert isinstance(runtime, KubernetesRuntime)
    assert isinstance(store, KubeTokenStore)
    await runtime.start()
    await store.start()
    try:
        assert store.informers is runtime.informers
        assert {kind.plural for kind in runtime.informers} == EVERY_KIND
        await emu.wait_watches(len(EVERY_KIND))
        assert emu.watch_count == len(EVERY_KIND)  # one watch per kind, however many read it
        await store.close()  # as the app closes it: first, while the runtime's client is open
        assert emu.watch_count == len(EVERY_KIND)  # its watches are the runtime's, not the store's to end
    finally:
        await store.close()
        await runtime.close()  # the store's watches too
        await until(lambda: emu.watch_count == 0)


async def test_listeners_of_one_kind_share_its_watch_and_a_failing_one_starves_no_other(kube: KubeEnv) -> None:
    emu = kube.emulator
    informers = Informers()
    seen: list[tuple[str, str]] = []

    def broken(_event: str, _obj: dict[str, Any]) -> None:
        raise ValueError("a bug in one listener")

    informers.register(WORKSPACE_KIND, broken)
    informers.register(WORKSPACE_KIND, lambda event, obj: seen.append((event, obj["metadata"]["name"])))
    await informers.start(KubeClient(kube.new_api_client(), NS), sync_timeout=5)
    try:
        await emu.wait_watches(1)
        assert emu.watch_count == 1
        emu.create_object(WORKSPACE, {"metadata": {"name": "w1"}, "spec": {"owner": "bob"}}, NS)
        await until(lambda: seen == [("ADDED", "w1")])
        with pytest.raises(RuntimeError, match="register before the informers start"):
            informers.register(POD_KIND, ignore)  # it would never be watched
    finally:
        await informers.stop()
    await until(lambda: emu.watch_count == 0)


def test_a_kind_is_watched_with_one_label_selector() -> None:
    informers = Informers()
    informers.register(POD_KIND, ignore, label_selector="app=codehub")
    informers.register(POD_KIND, ignore, label_selector="app=codehub")
    with pytest.raises(ValueError, match="pods is watched with the selector 'app=codehub', not None"):
        informers.register(POD_KIND, ignore)


async def test_a_first_fill_longer_than_the_sync_timeout_starts_while_pages_keep_coming(kube: KubeEnv) -> None:
    """The sync timeout is for an API that does not answer, not for a big one: 100,000 share links are 200 pages,
    which the client's rate limit (20 a second) alone spreads over 10 s (bench.scale found a gateway that never
    started). Here 12 pages at 10 a second take over a second, against a timeout of half of one."""
    emu = kube.emulator
    for index in range(12):
        emu.create_object(WORKSPACE, {"metadata": {"name": f"w{index:02d}"}, "spec": {"owner": "bob"}}, NS)
    seen: list[str] = []
    informers = Informers()
    informers.register(WORKSPACE_KIND, lambda event, obj: seen.append(obj["metadata"]["name"]))
    client = KubeClient(kube.new_api_client(), NS, throttle=Throttle(10, 1, 4), page_size=1)
    started = time.monotonic()
    await informers.start(client, sync_timeout=0.5)
    try:
        assert time.monotonic() - started > 1
        assert sorted(seen) == [f"w{index:02d}" for index in range(12)]
    finally:
        await informers.stop()


async def test_caches_that_cannot_be_filled_in_time_are_all_stopped_again(kube: KubeEnv) -> None:
    emu = kube.emulator
    emu.fail("list", SHARE_LINK, status=500, times=None)
    informers = Informers()
    informers.register(WORKSPACE_KIND, ignore)
    informers.register(SHARE_LINK_KIND, ignore)
    with pytest.raises(LifecycleError, match=r"Kubernetes API not reachable within 1 s \(sharelinks: "):
        await informers.start(KubeClient(kube.new_api_client(), NS), sync_timeout=1)
    assert not informers
    await until(lambda: emu.watch_count == 0)  # the workspaces' cache had filled and was watching


async def test_a_runtime_closes_its_own_api_connection_and_watches_after_running_and_after_failing_to_start(
        kube: KubeEnv) -> None:
    runtime = KubernetesRuntime(kube_settings(kube.url), identity="gw-a")
    await runtime.start()
    api = runtime._api
    assert api is not None
    await runtime.close()
    assert api.rest_client.pool_manager.closed
    assert not runtime.informers  # its caches stopped, not left retrying on a closed connection
    await until(lambda: kube.emulator.watch_count == 0)
    kube.emulator.fail("list", WORKSPACE, status=500, times=None)
    failing = KubernetesRuntime(kube_settings(kube.url, sync_timeout=1), identity="gw-b")
    with pytest.raises(LifecycleError):
        await failing.start()
    assert failing._api is None  # closed again, not left open behind the error
    assert not failing.informers

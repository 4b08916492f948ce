"""Every config the benchmark writes must be one the gateway accepts: the benchmark runs by hand, so a config rule
added later (two local workspaces may not share an address) would otherwise first show as a run that stops after
half an hour, at its scale part."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from bench.scale import _ide_key, _populate, with_workspaces
from bench.servers import Layout, gateway_config
from gateway.auth.kubernetes.tokens import KubeTokenStore
from gateway.config import Config, load_config
from gateway.server.app import build_app
from gateway.server.context import GATEWAY
from tests.kube.emulator import KubeEnv, kube
from tests.kube.support import NS, kube_settings, until

__all__ = ["kube"]  # the emulator's fixture, used by name


def test_the_benchmark_gateway_config_loads(tmp_path: Path) -> None:
    config = load_config(gateway_config(Layout(tmp_path), "gateway", 8080), environ={})
    assert config.local.addresses()["ws1"] == Layout(tmp_path).up_host


def test_the_scale_configs_load_with_an_address_for_every_workspace(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    base = yaml.safe_load(gateway_config(layout, "scale-many", 8080).read_text())
    made = with_workspaces(base, 600)  # past 253: the second /24 of handed-out addresses too
    path = tmp_path / "scale.yaml"
    path.write_text(yaml.safe_dump(made))
    addresses = load_config(path, environ={}).local.addresses()
    assert len(addresses) == 600
    assert len(set(addresses.values())) == 600
    servers = {layout.up_host, layout.wake_host, layout.hold_host, layout.small_host, layout.vite_host,
               layout.screen_host}
    assert servers.isdisjoint(address for name, address in addresses.items() if name != "ws1")


async def test_the_kubernetes_scale_shapes_links_and_tokens_are_what_a_gateway_takes_in(
        kube: KubeEnv, aiohttp_client: Any, tmp_path: Path) -> None:
    """The Kubernetes shapes measure a gateway holding their links and tokens; one it refused (not sealed with
    its key, or a link without its Workspace as owner) would be measured as a gateway holding none."""
    layout = Layout(tmp_path)
    _populate(kube.emulator, NS, layout, 4, 6)
    settings = kube_settings(kube.url, ide_key_file=str(_ide_key(layout))).model_dump(mode="json")
    app = build_app(Config.model_validate({"runtime": "kubernetes", "kubernetes": settings,
                                           "local": {"state_dir": str(tmp_path / "state")}}))
    client = await aiohttp_client(app)
    store = client.app[GATEWAY].auth.store
    assert isinstance(store, KubeTokenStore)
    await until(lambda: len(store.api_tokens) == 6 and len(store.shares) == 6)

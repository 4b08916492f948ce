"""Every config the benchmark writes must be one the gateway accepts: the benchmark runs by hand, so a config rule
added later (two local workspaces may not share an address) would otherwise first show as a run that stops after
half an hour, at its scale part."""

from __future__ import annotations

from pathlib import Path

import yaml

from bench.scale import with_workspaces
from bench.servers import Layout, gateway_config
from gateway.config import load_config


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

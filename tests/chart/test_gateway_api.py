"""Gateway API routes (optional, besides or instead of the Ingress): valid against the Gateway API CRD schemas
(npm @kubernetes-models/gateway-api, run by Node), and routing exactly what the Ingress routes."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest

from tests.chart.helm import CHART_DIR, NAMESPACE, Manifest, render

pytestmark = pytest.mark.timeout(60)

REPO = CHART_DIR.parents[1]
VALIDATOR = Path(__file__).with_name("gateway_api.mjs")
PARENTS = [{"name": "shared", "namespace": "gateways", "sectionName": "https"}]
ENABLED: dict[str, Any] = {"gatewayApi": {"enabled": True, "parentRefs": PARENTS}}


def schema_errors(objects: list[Manifest]) -> list[list[str]]:
    """Each object's complaints from the Gateway API schemas ([] when valid)."""
    package = REPO / "node_modules" / "@kubernetes-models" / "gateway-api"
    if not package.exists():
        pytest.fail(f"{package} is missing: run `npm ci` in {REPO}")
    node = shutil.which("node")
    assert node is not None, "Node is needed (.ci/install)"
    done = subprocess.run([node, str(VALIDATOR)], input=json.dumps(objects), capture_output=True, text=True,
                          timeout=30, check=True, cwd=REPO)
    errors: list[list[str]] = json.loads(done.stdout)
    return errors


def routes(values: dict[str, Any]) -> dict[str, Manifest]:
    return {route["metadata"]["name"]: route for route in render(values).of_kind("HTTPRoute")}


@pytest.mark.parametrize("values", [
    ENABLED,
    {**ENABLED, "ingress": {"enabled": False, "hub": {"host": "code.corp.example.org", "tlsSecretName": "x"},
                            "preview": {"domain": "apps.corp.example.org", "tlsSecretName": "y"}}},
])
def test_routes_are_valid_gateway_api_objects(values: dict[str, Any]) -> None:
    found = list(routes(values).values())
    assert len(found) == 2
    assert schema_errors(found) == [[], []]


def test_the_validator_refuses_what_the_schema_refuses() -> None:
    route = routes(ENABLED)["codehub-codehub-gateway-preview"]
    broken = json.loads(json.dumps(route))
    broken["spec"]["hostnames"] = ["https://apps.example.com"]
    broken["spec"]["rules"][0]["backendRefs"][0]["port"] = 70000
    (errors,) = schema_errors([broken])
    assert any("hostnames/0" in error for error in errors), errors
    assert any("port must be <= 65535" in error for error in errors), errors


def test_routes_send_the_hub_and_the_wildcard_preview_host_to_the_http_port_only() -> None:
    rendered = render(ENABLED)
    service = rendered.one("Service")
    http = next(port for port in service["spec"]["ports"] if port["name"] == "http")
    by_name = routes(ENABLED)
    assert {name: route["spec"]["hostnames"] for name, route in by_name.items()} == {
        "codehub-codehub-gateway-hub": ["hub.example.com"],
        "codehub-codehub-gateway-preview": ["*.preview.example.com"]}
    for route in by_name.values():
        assert route["metadata"]["namespace"] == NAMESPACE
        assert route["spec"]["parentRefs"] == PARENTS
        (rule,) = route["spec"]["rules"]
        assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
        assert rule["backendRefs"] == [{"name": service["metadata"]["name"], "port": http["port"]}]


def test_routes_need_a_gateway_to_attach_to() -> None:
    with pytest.raises(helm.HelmRenderError, match=r"gatewayApi\.parentRefs is required with gatewayApi\.enabled"):
        render({"gatewayApi": {"enabled": True}})

"""What the rendered NetworkPolicies let through: who may reach the gateway and the workspaces, and where workspaces
may connect to, checked connection by connection (tests/chart/netpol.py decides as an enforcing CNI would)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import Kubernetes
from gateway.lifecycle.kubernetes.objects import WorkspaceResource, make_pod
from tests.chart.helm import NAMESPACE, WORKSPACE_NAMESPACE, render
from tests.chart.netpol import Cluster, Endpoint, External, Pod

pytestmark = pytest.mark.timeout(60)

NAMESPACES = (NAMESPACE, WORKSPACE_NAMESPACE, "ingress-nginx", "traefik", "monitoring", "kube-system", "other")


def gateway_pod(values: dict[str, Any] | None = None) -> Pod:
    template = render(values).one("Deployment")["spec"]["template"]
    (container,) = template["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    return Pod("gateway", NAMESPACE, template["metadata"]["labels"], "10.4.0.10", ports)


def workspace_pod(workspace: str, ip: str) -> Pod:
    """A workspace pod exactly as the Kubernetes runtime makes it (its labels and port names)."""
    pod = make_pod(WorkspaceResource(id=workspace, owner="alice"), Kubernetes(namespace=WORKSPACE_NAMESPACE))
    (container,) = pod["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    return Pod(workspace, WORKSPACE_NAMESPACE, pod["metadata"]["labels"], ip, ports)


GATEWAY = gateway_pod()
WS1 = workspace_pod("ws1", "10.4.1.11")
WS2 = workspace_pod("ws2", "10.4.1.12")
NGINX = Pod("ingress-nginx", "ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"}, "10.4.2.2")
TRAEFIK = Pod("traefik", "traefik", {"app.kubernetes.io/name": "traefik"}, "10.4.2.3")
NGINX_ELSEWHERE = Pod("fake-nginx", "other", {"app.kubernetes.io/name": "ingress-nginx"}, "10.4.2.4")
PROMETHEUS = Pod("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"}, "10.4.3.3")
NEIGHBOUR = Pod("neighbour", NAMESPACE, {"app.kubernetes.io/name": "something-else"}, "10.4.0.20")
KUBE_DNS = Pod("kube-dns", "kube-system", {"k8s-app": "kube-dns"}, "10.4.9.9", {"dns": 53})
INTERNET = External("registry.npmjs.org", "104.16.0.35")
METADATA = External("cloud metadata", "169.254.169.254")
NODE_LOCAL_DNS = External("node-local DNS cache", "169.254.20.10")
API_SERVER = External("API server", "10.0.0.1")
COMPANY = External("company host", "192.168.10.5")
CGNAT = External("carrier-grade NAT range", "100.64.3.4")
INTERNAL_REGISTRY = External("internal registry", "10.20.1.1")


def cluster(values: dict[str, Any] | None = None) -> Cluster:
    return Cluster(render(values).of_kind("NetworkPolicy"), NAMESPACES)


DEFAULTS: list[tuple[Endpoint, Endpoint, int, str, bool]] = [
    # The gateway: its HTTP port from the ingress controller only, its metrics port from the scraper only.
    (NGINX, GATEWAY, 8080, "TCP", True),
    (NGINX, GATEWAY, 9090, "TCP", False),
    (PROMETHEUS, GATEWAY, 9090, "TCP", True),
    (PROMETHEUS, GATEWAY, 8080, "TCP", False),
    (WS1, GATEWAY, 8080, "TCP", False),
    (WS1, GATEWAY, 9090, "TCP", False),
    (NEIGHBOUR, GATEWAY, 8080, "TCP", False),
    (NGINX_ELSEWHERE, GATEWAY, 8080, "TCP", False),  # the right labels in the wrong namespace
    (TRAEFIK, GATEWAY, 8080, "TCP", False),
    # Workspaces: from the gateway pods, on any port (the IDE and every shared port); from nobody else.
    (GATEWAY, WS1, 13337, "TCP", True),
    (GATEWAY, WS1, 3000, "TCP", True),
    (NGINX, WS1, 13337, "TCP", False),
    (NEIGHBOUR, WS1, 3000, "TCP", False),
    (PROMETHEUS, WS1, 3000, "TCP", False),
    (WS2, WS1, 13337, "TCP", False),
    (WS2, WS1, 3000, "TCP", False),
    # Workspace egress: the internet and DNS; not the metadata server, the API server, other private ranges.
    (WS1, INTERNET, 443, "TCP", True),
    (WS1, METADATA, 80, "TCP", False),
    (WS1, API_SERVER, 443, "TCP", False),
    (WS1, COMPANY, 22, "TCP", False),
    (WS1, CGNAT, 443, "TCP", False),
    (WS1, KUBE_DNS, 53, "UDP", True),
    (WS1, KUBE_DNS, 53, "TCP", True),
    (WS1, KUBE_DNS, 9153, "TCP", False),
    (WS1, NODE_LOCAL_DNS, 53, "UDP", True),
    (WS1, API_SERVER, 53, "UDP", True),  # DNS to private ranges (some clusters run it off-pod)
]


@pytest.mark.parametrize(("source", "destination", "port", "protocol", "allowed"), DEFAULTS,
                         ids=[f"{s.name}->{d.name}:{p}/{proto}" for s, d, p, proto, _ in DEFAULTS])
def test_default_policies(source: Endpoint, destination: Endpoint, port: int, protocol: str, allowed: bool) -> None:
    assert cluster().allowed(source, destination, port, protocol) is allowed


def test_every_pod_the_chart_and_the_runtime_make_is_selected() -> None:
    # A policy that selects nothing would leave the pods open; these are the selections the rows above rely on.
    policies = render().of_kind("NetworkPolicy")
    by_namespace = {policy["metadata"]["namespace"]: policy for policy in policies}
    assert set(by_namespace) == {NAMESPACE, WORKSPACE_NAMESPACE}
    assert by_namespace[NAMESPACE]["spec"]["policyTypes"] == ["Ingress"]
    assert by_namespace[WORKSPACE_NAMESPACE]["spec"]["policyTypes"] == ["Ingress", "Egress"]


@pytest.mark.parametrize(("egress", "rows"), [
    ({"privateIPs": True}, [(COMPANY, 22, True), (API_SERVER, 443, True), (METADATA, 80, False)]),
    ({"cloudMetadataServer": True}, [(METADATA, 80, True), (COMPANY, 22, False)]),
    ({"nonPrivateIPs": False}, [(INTERNET, 443, False), (KUBE_DNS, 53, True)]),
    ({"dns": False}, [(KUBE_DNS, 53, False), (INTERNET, 443, True)]),
    ({"nonPrivateIPs": False, "dns": False}, [(INTERNET, 443, False), (KUBE_DNS, 53, False), (COMPANY, 22, False)]),
    ({"allow": [{"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "ports": [{"port": 443, "protocol": "TCP"}]}]},
     [(INTERNAL_REGISTRY, 443, True), (INTERNAL_REGISTRY, 80, False), (COMPANY, 443, False)]),
])
def test_workspace_egress_is_configurable(egress: dict[str, Any], rows: list[tuple[Endpoint, int, bool]]) -> None:
    policies = cluster({"networkPolicy": {"workspaceEgress": egress}})
    for destination, port, allowed in rows:
        protocol = "UDP" if port == 53 else "TCP"
        assert policies.allowed(WS1, destination, port, protocol) is allowed, (egress, destination.name, port)


def test_ingress_controller_selector_is_configurable() -> None:
    policies = cluster({"networkPolicy": {"ingressController": {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "traefik"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "traefik"}}}}})
    assert policies.allowed(TRAEFIK, GATEWAY, 8080)
    assert not policies.allowed(NGINX, GATEWAY, 8080)
    assert not policies.allowed(TRAEFIK, WS1, 13337)


def test_metrics_scraper_selector_and_port_are_configurable() -> None:
    values: dict[str, Any] = {"metricsPort": 9464, "networkPolicy": {"metricsScraper": {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "other"}},
        "podSelector": {"matchLabels": None,  # null removes the default, as with helm --set
                        "matchExpressions": [{"key": "app", "operator": "In", "values": ["vmagent"]}]}}}}
    policies = cluster(values)
    gateway = gateway_pod(values)
    vmagent = Pod("vmagent", "other", {"app": "vmagent"}, "10.4.3.9")
    assert policies.allowed(vmagent, gateway, 9464)
    assert not policies.allowed(vmagent, gateway, 8080)
    assert not policies.allowed(PROMETHEUS, gateway, 9464)


def test_without_policies_everything_is_open() -> None:
    # What the chart's README warns about: without NetworkPolicy only the IDE secret guards the IDE.
    policies = cluster({"networkPolicy": {"enabled": False}})
    assert policies.policies == []
    assert policies.allowed(WS2, WS1, 13337)
    assert policies.allowed(WS1, METADATA, 80)

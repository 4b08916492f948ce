"""The chart renders (real Helm engine), lints clean, and every manifest is valid Kubernetes (strict schemas)."""

from __future__ import annotations

import re
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.chart.helm import (
    CHART_DIR,
    NAMESPACE,
    REQUIRED,
    WORKSPACE_NAMESPACE,
    Rendered,
    crds,
    lint,
    merge,
    render,
)

pytestmark = pytest.mark.timeout(120)

# Kinds kubernetes-validate has no schema for (custom resources). Only these may be skipped, and only these are.
NO_SCHEMA = frozenset({
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),  # tests/chart/test_gateway_api.py checks these
    ("codehub.dev/v1alpha1", "Workspace"),
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshot"),
})
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest with shipped schemas.
KUBE_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())

VARIATIONS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "service-monitor": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}}},
    "other-hosts": {"ingress": {"className": "nginx",
                                "hub": {"host": "code.corp.example.org", "tlsSecretName": "code-tls"},
                                "preview": {"domain": "apps.corp.example.org", "tlsSecretName": "apps-wildcard-tls"}}},
    "three-replicas": {"replicaCount": 3, "podDisruptionBudget": {"minAvailable": 2}},
    "workspace-namespace": {"workspaces": {"namespace": "dev-envs", "createNamespace": False,
                                           "storageClass": "fast-ssd", "snapshotClass": "csi-snapclass"}},
    "gateway-api": {"ingress": {"enabled": False},
                    "gatewayApi": {"enabled": True, "parentRefs": [{"name": "shared", "namespace": "gateways"}]}},
    "pinned-and-open": {"image": {"digest": "sha256:" + "ab" * 32}, "preStopSleepSeconds": 10,
                        "networkPolicy": {"workspaceEgress": {
                            "privateIPs": True, "cloudMetadataServer": True,
                            "allow": [{"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "ports": [{"port": 443}]}]}}},
    "inline-oidc-secret": {"auth": {"oidc": {"existingSecret": "", "clientSecret": "not-a-real-secret"}}},
    "everything-optional-off": {"ingress": {"enabled": False}, "networkPolicy": {"enabled": False},
                                "podDisruptionBudget": {"enabled": False},
                                "workspaces": {"createNamespace": False},
                                "metrics": {"dashboard": {"enabled": False}}, "topologySpread": {"enabled": False},
                                "podAntiAffinity": {"enabled": False}},
    "extras": {"podAnnotations": {"example.com/team": "dev-env"}, "nodeSelector": {"pool": "system"},
               "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "codehub", "effect": "NoSchedule"}],
               "imagePullSecrets": [{"name": "registry"}], "priorityClassName": "platform",
               "gateway": {"trustedProxies": ["10.0.0.0/8"], "env": [{"name": "TZ", "value": "UTC"}],
                           "extraConfig": {"idle": {"to_warm": 3600}}}},
}


def validate_all(rendered: Rendered) -> set[tuple[str, str]]:
    """Validate every manifest strictly against each supported Kubernetes version; return the kinds skipped."""
    skipped: set[tuple[str, str]] = set()
    for manifest in rendered.manifests:
        key = (manifest["apiVersion"], manifest["kind"])
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(manifest, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                assert key in NO_SCHEMA, f"{key} has no schema in kubernetes-validate {version}"
                skipped.add(key)
            except kubernetes_validate.ValidationError as error:
                where = "/".join(str(part) for part in error.absolute_path)
                pytest.fail(f"{manifest['kind']} {manifest['metadata']['name']} (Kubernetes {version}): "
                            f"{where}: {error.message}")
    return skipped


@pytest.mark.parametrize("name", list(VARIATIONS))
def test_every_manifest_is_valid_kubernetes(name: str) -> None:
    rendered = render(VARIATIONS[name])
    assert rendered.manifests
    skipped = validate_all(rendered)
    expected = {"service-monitor": {("monitoring.coreos.com/v1", "ServiceMonitor")},
                "gateway-api": {("gateway.networking.k8s.io/v1", "HTTPRoute")}}.get(name, set())
    assert skipped == expected


def test_crds_are_valid_kubernetes_and_not_templates() -> None:
    definitions = crds()
    assert sorted(d["metadata"]["name"] for d in definitions) == [
        "apitokens.codehub.dev", "identityconsents.codehub.dev", "sharelinks.codehub.dev", "usedkeys.codehub.dev",
        "workspaces.codehub.dev"]
    assert validate_all(Rendered(files={}, manifests=definitions)) == set()
    assert "CustomResourceDefinition" not in render().kinds  # templates never carry them (rollback, 2nd release)
    assert not list((CHART_DIR / "templates").glob("crd*"))
    for definition in definitions:
        # Conversion-ready: one storage version, the conversion strategy said out loud.
        assert definition["spec"]["conversion"] == {"strategy": "None"}
        assert [v["name"] for v in definition["spec"]["versions"] if v["storage"]] == ["v1alpha1"]


@pytest.mark.parametrize("name", list(VARIATIONS))
def test_lint_is_clean(name: str) -> None:
    for kube_version in ("v1.25.0", None):
        report = lint(merge(REQUIRED, VARIATIONS[name]), kube_version=kube_version)
        assert report["errors"] == [], report
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


def test_lint_with_the_chart_defaults_alone() -> None:
    # Like `helm lint`, required values only warn in lint mode; the chart itself has no problems.
    report = lint()
    assert report["errors"] == []
    assert report["total_charts_linted"] == 1


def test_default_render_has_each_piece_once() -> None:
    rendered = render()
    kinds = sorted(m["kind"] for m in rendered.manifests)
    assert kinds == sorted([
        "ConfigMap", "ConfigMap", "ConfigMap",  # settings, policies, dashboard
        "Deployment", "Ingress", "Namespace", "NetworkPolicy", "NetworkPolicy", "PodDisruptionBudget",
        "Role", "RoleBinding", "Service", "ServiceAccount",
    ])
    assert "Secret" not in rendered.kinds  # signing keys and OIDC secret are existing Secrets by default
    in_workspace_namespace = {("Role", "codehub-codehub-gateway"), ("RoleBinding", "codehub-codehub-gateway"),
                              ("NetworkPolicy", "codehub-codehub-gateway-workspaces")}
    for manifest in rendered.manifests:
        key = (manifest["kind"], manifest["metadata"]["name"])
        if manifest["kind"] != "Namespace":
            expected = WORKSPACE_NAMESPACE if key in in_workspace_namespace else NAMESPACE
            assert manifest["metadata"]["namespace"] == expected, key
        assert manifest["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    notes = rendered.files["codehub-gateway/templates/NOTES.txt"]
    assert "*.preview.example.com" in notes
    assert "https://hub.example.com/auth/callback" in notes


def test_optional_pieces_switch_off() -> None:
    rendered = render(VARIATIONS["everything-optional-off"])
    assert rendered.kinds == {"ConfigMap", "Deployment", "Role", "RoleBinding", "Service", "ServiceAccount"}
    assert "HTTPRoute" not in render().kinds  # Gateway API routes only when asked for
    pod = rendered.one("Deployment")["spec"]["template"]["spec"]
    assert "topologySpreadConstraints" not in pod
    assert "affinity" not in pod


def test_service_monitor_scrapes_metrics() -> None:
    monitor = render(VARIATIONS["service-monitor"]).one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s",
                                             "scrapeTimeout": "10s"}]
    ports = {port["name"]: port for port in render().one("Service")["spec"]["ports"]}
    assert ports["metrics"] == {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}
    assert monitor["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "codehub-gateway",
                                                          "app.kubernetes.io/instance": "codehub"}
    assert "ServiceMonitor" not in render().kinds  # off by default


def test_inline_oidc_secret_becomes_a_secret_the_pod_mounts() -> None:
    rendered = render(VARIATIONS["inline-oidc-secret"])
    secret = rendered.one("Secret")
    assert secret["metadata"]["name"] == "codehub-codehub-gateway-oidc"
    assert set(secret["data"]) == {"client-secret"}
    volumes = {v["name"]: v for v in rendered.one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["oidc"]["secret"]["secretName"] == "codehub-codehub-gateway-oidc"



def test_strict_validation_catches_a_field_kubernetes_does_not_know() -> None:
    # The values schema leaves securityContext free-form, so a typo there reaches the manifest: strict mode sees it.
    rendered = render({"securityContext": {"readOnlyRootFileSystem": True}})
    with pytest.raises(pytest.fail.Exception, match="readOnlyRootFileSystem"):
        validate_all(rendered)


def test_the_readme_example_installs() -> None:
    readme = (CHART_DIR / "README.md").read_text()
    (example,) = re.findall(r"```yaml\n(# codehub-values\.yaml\n.*?)```", readme, flags=re.DOTALL)
    rendered = render(yaml.safe_load(example), with_required=False)
    assert validate_all(rendered) == set()
    assert "helm install codehub-gateway ./charts/codehub-gateway -n codehub -f codehub-values.yaml" in readme
    assert rendered.one("Ingress")["spec"]["ingressClassName"] == "nginx"
    assert rendered.gateway_config()["kubernetes"]["storage_size"] == "20Gi"

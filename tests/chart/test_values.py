"""Values: the schema refuses bad input, missing secrets fail with a message that says what to do, and what the
chart renders is what the gateway itself accepts (settings, policies, Workspace phases, metric names)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import pytest
import yaml

from gateway.auth.store import ApiToken, ShareLink
from gateway.config import Config, load_config
from gateway.edge.policy import parse_policy
from gateway.lifecycle.base import Phase
from gateway.lifecycle.kubernetes.client import SHARE_LINK
from gateway.lifecycle.kubernetes.objects import make_api_token, make_share_link, usage_patch
from gateway.metrics import Metrics
from tests.chart.helm import CHART_DIR, REQUIRED, chart, merge, render
from tests.chart.helm import crd as chart_crd

pytestmark = pytest.mark.timeout(60)

# The `kubernetes:` settings the chart renders: the lifecycle module's names (gateway/lifecycle/kubernetes).
KUBERNETES_KEYS = {"in_cluster", "namespace", "image", "ide_port", "storage_class", "snapshot_class", "storage_size",
                   "resources", "lease_name", "lease_duration", "ide_key_file"}


@pytest.mark.parametrize(("values", "complaint"), [
    ({"replicaCount": "two"}, "/replicaCount': got string, want integer"),
    ({"replicaCount": 1}, "/replicaCount"),
    ({"ingress": {"hub": {"host": "https://hub.example.com"}}}, "/ingress/hub/host"),
    ({"ingress": {"preview": {"domain": "*.preview.example.com"}}}, "/ingress/preview/domain"),
    ({"workspaces": {"storageSize": "lots"}}, "/workspaces/storageSize"),
    ({"workspaces": {"resources": {"limits": {"memory": "4 GB"}}}}, "/workspaces/resources/limits/memory"),
    ({"service": {"port": 70000}}, "/service/port"),
    ({"auth": {"oidc": {"issuer": "sso.example.com"}}}, "/auth/oidc/issuer"),
    ({"policies": {"default.json": {}}}, "'default.json' does not match pattern"),
    ({"replicas": 3}, "additional properties 'replicas' not allowed"),
])
def test_schema_rejects_bad_values(values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(complaint)):
        chart().validate_schema(merge(REQUIRED, values))
    with pytest.raises(helm.HelmValuesError, match=re.escape(complaint)):
        render(values)  # an install checks the schema too


def test_schema_accepts_the_defaults_and_the_documented_examples() -> None:
    chart().validate_schema(REQUIRED)
    chart().validate_schema(merge(REQUIRED, {
        "replicaCount": 3, "podDisruptionBudget": {"minAvailable": "50%"},
        "workspaces": {"resources": {"requests": {"cpu": 1, "memory": "1Gi"}}},
        "policies": {"strict.yaml": "ports:\n  max_visibility: org\n"}, "gateway": {"policyFile": "strict.yaml"},
    }))


@pytest.mark.parametrize(("values", "message"), [
    ({"auth": {"signingKeys": {"existingSecret": ""}}},
     "auth.signingKeys.existingSecret is required: create the signing keys Secret first"),
    ({"auth": {"oidc": {"existingSecret": ""}}}, "the OIDC client secret is required"),
    ({"auth": {"oidc": {"issuer": ""}}}, "auth.oidc.issuer is required"),
    ({"gateway": {"policyFile": "missing.yaml"}}, 'gateway.policyFile "missing.yaml" is not a key of policies'),
    ({"podDisruptionBudget": {"minAvailable": 2}}, "must be less than replicaCount"),
])
def test_missing_or_inconsistent_values_fail_with_a_clear_message(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(values)


def test_missing_signing_keys_message_says_how_to_make_them() -> None:
    with pytest.raises(helm.HelmRenderError) as error:
        render({"auth": {"oidc": REQUIRED["auth"]["oidc"]}}, with_required=False)
    assert "codehub-gateway keys rotate" in str(error.value)
    assert "kubectl -n <namespace> create secret generic codehub-signing-keys" in str(error.value)


def test_rendered_settings_are_accepted_by_the_gateway(tmp_path: Path) -> None:
    rendered = render({"workspaces": {"storageClass": "fast-ssd", "snapshotClass": "csi-snapclass"},
                       "gateway": {"trustedProxies": ["10.0.0.0/8"], "extraConfig": {"idle": {"to_warm": 3600}}}})
    settings = rendered.gateway_config()
    assert settings["runtime"] == "kubernetes"
    assert settings["listen"] == {"host": "0.0.0.0", "port": 8080}
    assert settings["metrics"] == {"host": "0.0.0.0", "port": 9090}
    assert settings["idle"] == {"to_warm": 3600}  # extraConfig deep-merged
    kubernetes = settings["kubernetes"]
    assert set(kubernetes) == KUBERNETES_KEYS
    assert kubernetes | {"resources": None} == {
        "in_cluster": True, "namespace": "codehub-workspaces", "image": "codercom/code-server:4.99.0",
        "ide_port": 13337, "storage_class": "fast-ssd", "snapshot_class": "csi-snapclass", "storage_size": "10Gi",
        "lease_name": "codehub-gateway-reaper", "lease_duration": 15, "resources": None,
        "ide_key_file": "/etc/codehub/ide/ide-key"}
    assert kubernetes["resources"] == {"requests": {"cpu": "250m", "memory": "512Mi"},
                                       "limits": {"cpu": "2", "memory": "4Gi"}}
    if "kubernetes" not in Config.model_fields:
        # The kubernetes: section arrives with gateway/lifecycle/kubernetes; until then check the rest.
        del settings["kubernetes"]
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(settings))
    config = load_config(path, environ={})
    assert config.hub_url == "https://hub.example.com"
    assert config.preview_domain == "preview.example.com"
    assert config.auth.mode == "oidc"
    assert config.auth.oidc is not None
    assert config.auth.oidc.sign_out_at_idp
    assert str(config.keys_file) == "/etc/codehub/keys/signing-keys.json"
    assert str(config.store_file) == "/var/lib/codehub/tokens.json"
    assert (config.listen.port, config.metrics.port) == (8080, 9090)


def test_sign_out_at_the_idp_can_be_switched_off(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(render({"auth": {"oidc": {"signOutAtIdp": False}}}).gateway_config()))
    oidc = load_config(path, environ={}).auth.oidc
    assert oidc is not None
    assert not oidc.sign_out_at_idp


def test_empty_storage_and_snapshot_class_mean_the_cluster_default() -> None:
    kubernetes = render().gateway_config()["kubernetes"]
    assert "storage_class" not in kubernetes
    assert "snapshot_class" not in kubernetes


def test_config_change_rolls_the_pods_but_a_policy_change_does_not() -> None:
    def checksum(values: dict[str, Any]) -> str:
        annotations = render(values).one("Deployment")["spec"]["template"]["metadata"]["annotations"]
        return str(annotations["checksum/config"])

    base = checksum({})
    assert checksum({"workspaces": {"image": "codercom/code-server:4.100.0"}}) != base
    assert checksum({"policies": {"default.yaml": {"ports": {"max_visibility": "org"}}}}) == base


def test_policies_render_into_files_the_gateway_parses() -> None:
    policies = render({"policies": {"strict.yaml": "# kept as written\nports:\n  max_visibility: org\n"}}).one(
        "ConfigMap", "-policies")["data"]
    assert set(policies) == {"default.yaml", "strict.yaml"}
    default = parse_policy(policies["default.yaml"], "default.yaml")
    assert default.org.email_domains == ("example.com",)
    assert default.ports.default_visibility == "private"
    assert policies["strict.yaml"].startswith("# kept as written")
    assert parse_policy(policies["strict.yaml"], "strict.yaml").ports.max_visibility == "org"


def crd_schema() -> dict[str, Any]:
    crd = chart_crd("workspaces.codehub.dev")
    (version,) = crd["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def as_json_schema(node: Any) -> Any:
    """OpenAPI v3 (structural) → JSON Schema: `nullable` becomes a null type; x-kubernetes-* markers go."""
    if isinstance(node, list):
        return [as_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: as_json_schema(value) for key, value in node.items()
           if not key.startswith("x-kubernetes-") and key != "nullable"}
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def test_workspace_crd_shape() -> None:
    crd = chart_crd("workspaces.codehub.dev")
    assert crd["metadata"]["name"] == "workspaces.codehub.dev"
    spec = crd["spec"]
    assert (spec["group"], spec["scope"]) == ("codehub.dev", "Namespaced")
    assert spec["names"]["kind"] == "Workspace"
    assert spec["names"]["plural"] == "workspaces"
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1"
    assert version["served"]
    assert version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase"
    assert columns["Owner"] == ".spec.owner"
    schema = version["schema"]["openAPIV3Schema"]
    assert set(schema["properties"]["spec"]["properties"]) == {
        "owner", "collaborators", "image", "idePort", "storage", "resources", "ports", "identityPorts"}
    assert set(schema["properties"]["status"]["properties"]) == {"phase", "podIP", "lastActivity", "conditions"}


def test_workspace_crd_phases_are_the_lifecycle_phases() -> None:
    phases = crd_schema()["properties"]["status"]["properties"]["phase"]["enum"]
    assert set(phases) == {phase.value for phase in Phase}


GOOD_WORKSPACE: dict[str, Any] = {
    "apiVersion": "codehub.dev/v1alpha1", "kind": "Workspace", "metadata": {"name": "ws1"},
    "spec": {"owner": "alice", "collaborators": ["bob", "group:frontend"], "ports": {"3000": "org", "8000": "public"},
             "image": "codercom/code-server:4.99.0", "idePort": 13337, "storage": "20Gi",
             "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": 2, "memory": "4Gi"}}},
    "status": {"phase": "RUNNING", "podIP": "10.1.2.3", "lastActivity": "2026-01-01T10:00:00Z",
               "conditions": [{"type": "Ready", "status": "True", "reason": "Running", "message": "",
                               "lastTransitionTime": "2026-01-01T09:59:00Z"}]},
}


def crd_errors(workspace: dict[str, Any]) -> list[jsonschema.ValidationError]:
    return list(jsonschema.Draft7Validator(as_json_schema(crd_schema())).iter_errors(workspace))


@pytest.mark.parametrize(("change", "valid"), [
    ({}, True),
    ({"status": {"phase": "COLD", "podIP": None}}, True),
    ({"spec": {"ports": {"3000": "everyone"}}}, False),
    ({"spec": {"collaborators": "bob"}}, False),
    ({"spec": {"idePort": 0}}, False),
    ({"spec": {"storage": "big"}}, False),
    ({"spec": {"owner": ""}}, False),
    ({"status": {"phase": "SLEEPING"}}, False),
])
def test_workspace_crd_schema_admits_workspaces_and_refuses_nonsense(change: dict[str, Any], valid: bool) -> None:
    errors = crd_errors(merge(GOOD_WORKSPACE, change))
    assert (errors == []) is valid, errors


def test_workspace_crd_needs_only_an_owner() -> None:
    assert crd_errors({"apiVersion": "codehub.dev/v1alpha1", "kind": "Workspace", "metadata": {"name": "ws2"},
                       "spec": {"owner": "alice"}}) == []
    assert crd_errors({"apiVersion": "codehub.dev/v1alpha1", "kind": "Workspace", "metadata": {"name": "ws2"},
                       "spec": {}}) != []


def token_crd(name: str) -> dict[str, Any]:
    return chart_crd(f"{name}.codehub.dev")


@pytest.mark.parametrize(("plural", "kind"), [("sharelinks", "ShareLink"), ("apitokens", "ApiToken")])
def test_token_crds_shape(plural: str, kind: str) -> None:
    crd = token_crd(plural)
    spec = crd["spec"]
    assert (spec["group"], spec["scope"], spec["names"]["kind"], spec["names"]["plural"]) == (
        SHARE_LINK.group, "Namespaced", kind, plural)
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == (SHARE_LINK.version, True, True)
    assert version["subresources"] == {"status": {}}


def crd_object_errors(plural: str, obj: dict[str, Any]) -> list[jsonschema.ValidationError]:
    (version,) = token_crd(plural)["spec"]["versions"]
    schema = as_json_schema(version["schema"]["openAPIV3Schema"])
    return list(jsonschema.Draft7Validator(schema).iter_errors(obj))


LINK = ShareLink(id="abc123def456", token_hash="a" * 64, workspace="ws1", port=3000, audience="people",
                 people=["bob"], created_by="alice", created=0.0, expires=1_800_000_000.0, revoked=1_700_000_000.0)
TOKEN = ApiToken(id="0a1b2c3d4e5f", token_hash="b" * 64, subject="alice", name="ci", created=0.0,
                 email="alice@corp.test", groups=["qa"], attributes={"team": "web"})
SEAL_KEY = b"k" * 32


@pytest.mark.parametrize(("change", "valid"), [
    ({}, True),
    ({"status": usage_patch("gw-a", 1_800_000_000.0, 3)["status"]}, True),
    ({"spec": {"port": None}}, True),  # every port: the key is left out
    ({"spec": {"audience": "everyone"}}, False),
    ({"spec": {"tokenHash": "not-a-hash"}}, False),
    ({"spec": {"port": 70000}}, False),
    ({"status": {"replicas": {"gw-a": {"uses": -1}}}}, False),
    ({"spec": {"seal": "not-a-seal"}}, False),
])
def test_sharelink_crd_admits_what_the_gateway_writes(change: dict[str, Any], valid: bool) -> None:
    obj = merge(make_share_link(LINK, "uid-1", SEAL_KEY), change)
    if obj["spec"].get("port") is None:
        obj["spec"].pop("port")
    errors = crd_object_errors("sharelinks", obj)
    assert (errors == []) is valid, errors


@pytest.mark.parametrize(("change", "valid"), [
    ({}, True),
    ({"status": usage_patch("gw-a", 1_800_000_000.0)["status"]}, True),
    ({"spec": {"subject": ""}}, False),
    ({"spec": {"attributes": {"team": 1}}}, False),
    ({"spec": {"seal": "not-a-seal"}}, False),
])
def test_apitoken_crd_admits_what_the_gateway_writes(change: dict[str, Any], valid: bool) -> None:
    errors = crd_object_errors("apitokens", merge(make_api_token(TOKEN, SEAL_KEY), change))
    assert (errors == []) is valid, errors


def test_dashboard_charts_every_gateway_metric() -> None:
    rendered = render()
    config_map = rendered.one("ConfigMap", "-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["codehub-gateway.json"])
    assert dashboard == json.loads((CHART_DIR / "dashboards" / "codehub-gateway.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = set(re.findall(r"\bcodehub_[a-z_]+", " ".join(exprs)))
    metrics = Metrics()
    metrics.track_workspaces(list)  # what build_app does with the runtime's states
    exported = {metric.name for metric in metrics.registry.collect()}
    expected = {
        "codehub_requests_total", "codehub_request_duration_seconds_bucket", "codehub_websockets_open",
        "codehub_held_requests", "codehub_wakes_total", "codehub_wake_duration_seconds_bucket", "codehub_workspaces",
        "codehub_policy_decisions_total", "codehub_upstream_connect_errors_total", "codehub_idle_transitions_total",
    }
    assert used == expected
    # Every series the dashboard asks for is one the gateway exports (counters gain _total, histograms _bucket).
    for name in used:
        assert re.sub(r"_(total|bucket)$", "", name) in exported, name
    assert 'histogram_quantile(0.99, sum by (le, kind) (rate(codehub_request_duration_seconds_bucket' in " ".join(exprs)
    by_title = {panel["title"]: panel for panel in dashboard["panels"]}
    assert "sum by (kind, code)" in by_title["Requests / s by kind and code"]["targets"][0]["expr"]
    assert "by (phase)" in by_title["Workspaces by phase"]["targets"][0]["expr"]
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])


def _service_links(services: list[dict[str, Any]]) -> dict[str, str]:
    """What the kubelet puts in the environment of every container in the namespace of ``services`` unless its pod
    says ``enableServiceLinks: false`` (Docker links, pkg/kubelet/envvars): ``{NAME}_SERVICE_HOST``,
    ``{NAME}_SERVICE_PORT[_{PORT_NAME}]``, ``{NAME}_PORT`` and ``{NAME}_PORT_{N}_{PROTO}[_PROTO|_PORT|_ADDR]``."""
    links: dict[str, str] = {}
    for number, service in enumerate(services):
        name = service["metadata"]["name"].upper().replace("-", "_")
        host = f"10.96.0.{number + 10}"
        ports = service["spec"]["ports"]
        links[f"{name}_SERVICE_HOST"] = host
        links[f"{name}_SERVICE_PORT"] = str(ports[0]["port"])
        links[f"{name}_PORT"] = f"tcp://{host}:{ports[0]['port']}"
        for port in ports:
            if "name" in port:
                links[f"{name}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(port["port"])
            prefix = f"{name}_PORT_{port['port']}_{port.get('protocol', 'TCP')}"
            links.update({prefix: f"tcp://{host}:{port['port']}", f"{prefix}_PROTO": "tcp",
                          f"{prefix}_PORT": str(port["port"]), f"{prefix}_ADDR": host})
    return links


def test_the_gateway_starts_beside_its_own_service(tmp_path: Path) -> None:
    """The chart's Service is named after the release, codehub-…: the kubelet gave the gateway's container
    CODEHUB_…_SERVICE_HOST and the like, which the gateway reads as settings (``CODEHUB_*``) and refused as unknown.
    Installed as the README says, it never started."""
    rendered = render()
    pod = rendered.one("Deployment")["spec"]["template"]["spec"]
    [container] = [item for item in pod["containers"] if item["name"] == "gateway"]
    environ = {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}
    if pod.get("enableServiceLinks", True):
        environ |= _service_links(rendered.of_kind("Service"))
    assert any(name.startswith("CODEHUB_") and name != "CODEHUB_CONFIG" for name in _service_links(
        rendered.of_kind("Service"))), "the release's Services should be named codehub-…, as the README installs them"
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(rendered.gateway_config()))
    load_config(path, environ=environ)

"""Security properties of the rendered chart: least-privilege RBAC, hardened pods, workspace isolation, TLS, HA."""

from __future__ import annotations

import re
from typing import Any

import helm_python as helm
import pytest

from gateway.config import Kubernetes
from gateway.lifecycle.kubernetes.objects import WorkspaceResource, make_pod
from tests.chart.helm import NAMESPACE, WORKSPACE_NAMESPACE, Manifest, render
from tests.chart.kube_calls import INFORMER_VERBS, informer_verbs, used_rules

pytestmark = pytest.mark.timeout(60)

GATEWAY_SELECTOR = {"app.kubernetes.io/name": "codehub-gateway", "app.kubernetes.io/instance": "codehub"}

def pod_spec(values: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = render(values).one("Deployment")["spec"]["template"]["spec"]
    return spec


def rules_of(role: Manifest) -> dict[tuple[str, str], set[str]]:
    rules: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs", "resourceNames"}, f"unexpected rule fields {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                rules.setdefault((group, resource), set()).update(rule["verbs"])
    return rules


def test_rbac_is_exactly_what_the_gateway_calls() -> None:
    rendered = render()
    assert rendered.of_kind("ClusterRole") == []
    assert rendered.of_kind("ClusterRoleBinding") == []
    (role,) = rendered.of_kind("Role")  # one Role, in the workspace namespace; none where the Secrets are
    assert role["metadata"]["namespace"] == WORKSPACE_NAMESPACE
    assert informer_verbs() == set(INFORMER_VERBS)
    rules = rules_of(role)
    assert rules == used_rules()
    for (group, resource), verbs in rules.items():
        assert "*" not in verbs
        assert "*" not in group
        assert "*" not in resource
        assert resource != "secrets"
        assert not resource.startswith("secrets/")
        assert not verbs & {"escalate", "bind", "impersonate", "deletecollection"}
    (binding,) = rendered.of_kind("RoleBinding")
    assert binding["metadata"]["namespace"] == WORKSPACE_NAMESPACE
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    account = rendered.one("ServiceAccount")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    assert pod_spec()["serviceAccountName"] == account


@pytest.mark.parametrize("lease", ["codehub-gateway-reaper", "another-lease"])
def test_lease_access_is_narrowed_to_the_one_lease(lease: str) -> None:
    rendered = render({"leaderElection": {"leaseName": lease}})
    lease_rules = [rule for rule in rendered.one("Role")["rules"] if rule["resources"] == ["leases"]]
    # A create is authorised before the object has a name, so only it goes without resourceNames.
    assert sorted((rule["verbs"], rule.get("resourceNames")) for rule in lease_rules) == [
        (["create"], None), (["get", "update"], [lease])]
    assert rendered.gateway_config()["kubernetes"]["lease_name"] == lease


def test_workspaces_get_their_own_namespace_by_default() -> None:
    rendered = render()
    namespace = rendered.one("Namespace")
    assert namespace["metadata"]["name"] == WORKSPACE_NAMESPACE != NAMESPACE
    labels = namespace["metadata"]["labels"]
    assert {key: labels[key] for key in labels if key.startswith("pod-security.kubernetes.io/")} == {
        "pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest",
        "pod-security.kubernetes.io/audit": "restricted", "pod-security.kubernetes.io/warn": "restricted"}
    assert namespace["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}  # home volumes live there
    assert rendered.gateway_config()["kubernetes"]["namespace"] == WORKSPACE_NAMESPACE
    binding = rendered.one("RoleBinding")
    assert binding["subjects"][0]["namespace"] == NAMESPACE  # the gateway's own account, in the release namespace


def test_a_given_workspace_namespace_is_used_and_created_only_when_asked() -> None:
    rendered = render({"workspaces": {"namespace": "dev-envs", "createNamespace": False}})
    assert rendered.of_kind("Namespace") == []
    assert rendered.one("Role")["metadata"]["namespace"] == "dev-envs"
    assert rendered.one("NetworkPolicy", "-workspaces")["metadata"]["namespace"] == "dev-envs"
    assert rendered.gateway_config()["kubernetes"]["namespace"] == "dev-envs"
    assert render({"workspaces": {"namespace": "dev-envs"}}).one("Namespace")["metadata"]["name"] == "dev-envs"


def test_workspaces_never_share_the_namespace_of_the_signing_keys() -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(
            'workspaces.namespace must not be the release namespace "codehub": whoever may create pods there may '
            "mount the gateway's signing keys")):
        render({"workspaces": {"namespace": NAMESPACE}})


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """The restricted Pod Security Standard's checks that a pod spec can fail (kubernetes.io/docs, v1.25+)."""
    problems = []
    pod_context = spec.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            problems.append(key)
    if any("hostPath" in volume for volume in spec.get("volumes") or []):
        problems.append("hostPath volume")
    if (pod_context.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
        problems.append("seccompProfile")
    for container in spec["containers"] + spec.get("initContainers", []):
        context = container.get("securityContext") or {}
        if context.get("privileged"):
            problems.append(f"{container['name']}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{container['name']}: allowPrivilegeEscalation")
        if not (context.get("runAsNonRoot") or pod_context.get("runAsNonRoot")):
            problems.append(f"{container['name']}: runAsNonRoot")
        if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
            problems.append(f"{container['name']}: runAsUser 0")
        capabilities = context.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []) or set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}:
            problems.append(f"{container['name']}: capabilities")
        if any(port.get("hostPort") for port in container.get("ports") or []):
            problems.append(f"{container['name']}: hostPort")
    return problems


def test_pods_meet_the_restricted_pod_security_standard_of_their_namespaces() -> None:
    assert restricted_violations(pod_spec()) == []
    workspace = make_pod(WorkspaceResource(id="ws1", owner="alice"), Kubernetes(namespace=WORKSPACE_NAMESPACE))
    assert restricted_violations(workspace["spec"]) == []
    assert restricted_violations(pod_spec({"podSecurityContext": {"seccompProfile": None}})) == ["seccompProfile"]


def test_gateway_pod_is_hardened() -> None:
    spec = pod_spec()
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "hostNetwork" not in spec
    assert "hostPID" not in spec
    assert "hostIPC" not in spec
    (container,) = spec["containers"]
    context = container["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context.get("privileged") is not True
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]
    # The only writable places are emptyDirs.
    volumes = {v["name"]: v for v in spec["volumes"]}
    writable = [m for m in container["volumeMounts"] if not m.get("readOnly")]
    assert {m["mountPath"] for m in writable} == {"/var/lib/codehub", "/tmp"}
    assert all("emptyDir" in volumes[m["name"]] for m in writable)


def test_probes_ports_and_the_drain_before_sigterm() -> None:
    spec = pod_spec()
    (container,) = spec["containers"]
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                                  {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["lifecycle"]["preStop"] == {"exec": {"command": [
        "python3", "-c", "import time; time.sleep(5)"]}}
    assert spec["terminationGracePeriodSeconds"] > 5


def test_grace_period_must_outlast_the_pre_stop_wait() -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(
            "terminationGracePeriodSeconds (10) must be longer than preStopSleepSeconds (10)")):
        render({"terminationGracePeriodSeconds": 10, "preStopSleepSeconds": 10})


@pytest.mark.parametrize(("image", "expected"), [
    ({}, "ghcr.io/codehub/codehub-gateway:0.2.0"),
    ({"tag": "0.2.1"}, "ghcr.io/codehub/codehub-gateway:0.2.1"),
    ({"tag": "0.2.1", "digest": "sha256:" + "ab" * 32}, "ghcr.io/codehub/codehub-gateway@sha256:" + "ab" * 32),
])
def test_image_by_tag_or_digest(image: dict[str, str], expected: str) -> None:
    (container,) = pod_spec({"image": image})["containers"]
    assert container["image"] == expected


@pytest.mark.parametrize("values", [{"image": {"digest": "sha256:abc"}},
                                    {"workspaces": {"image": "codercom/code-server@sha1:abc"}}])
def test_digests_are_checked(values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        render(values)


def test_workspace_image_may_be_pinned_by_digest() -> None:
    image = "codercom/code-server:4.99.0@sha256:" + "0f" * 32
    assert render({"workspaces": {"image": image}}).gateway_config()["kubernetes"]["image"] == image


def test_config_secrets_and_policies_are_mounted_where_the_settings_say() -> None:
    rendered = render()
    spec = rendered.one("Deployment")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert {"name": "CODEHUB_CONFIG", "value": "/etc/codehub/gateway.yaml"} in container["env"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    config = rendered.gateway_config()

    settings_mount = mounts["/etc/codehub/gateway.yaml"]
    assert settings_mount["subPath"] == "gateway.yaml"
    settings_map = rendered.one("ConfigMap", "-config")["metadata"]["name"]
    assert volumes[settings_mount["name"]]["configMap"]["name"] == settings_map

    keys = volumes[mounts["/etc/codehub/keys"]["name"]]["secret"]
    assert keys["secretName"] == "codehub-signing-keys"
    assert config["auth"]["keys_file"] == "/etc/codehub/keys/" + keys["items"][0]["path"]

    oidc = volumes[mounts["/etc/codehub/oidc"]["name"]]["secret"]
    assert oidc["secretName"] == "codehub-oidc"
    assert config["auth"]["oidc"]["client_secret_file"] == "/etc/codehub/oidc/" + oidc["items"][0]["path"]
    assert "client_secret" not in config["auth"]["oidc"]  # never the secret itself in a ConfigMap

    ide = volumes[mounts["/etc/codehub/ide"]["name"]]["secret"]
    assert ide["secretName"] == "codehub-signing-keys"  # beside the signing keys unless auth.ideKey says otherwise
    assert config["kubernetes"]["ide_key_file"] == "/etc/codehub/ide/" + ide["items"][0]["path"] == (
        "/etc/codehub/ide/ide-key")

    policies = volumes[mounts["/etc/codehub/policies"]["name"]]["configMap"]["name"]
    assert policies == rendered.one("ConfigMap", "-policies")["metadata"]["name"]
    assert config["policy_file"] == "/etc/codehub/policies/default.yaml"
    # Secrets and policies are directory mounts (not subPath), so rotation and edits reach running pods.
    for path in ("/etc/codehub/keys", "/etc/codehub/oidc", "/etc/codehub/ide", "/etc/codehub/policies"):
        assert "subPath" not in mounts[path]
        assert mounts[path]["readOnly"] is True


@pytest.mark.parametrize(("hub", "preview"), [("hub.example.com", "preview.example.com"),
                                               ("code.corp.example.org", "apps.corp.example.org")])
def test_ingress_has_tls_for_the_hub_and_the_wildcard_preview_host(hub: str, preview: str) -> None:
    rendered = render({"ingress": {"hub": {"host": hub, "tlsSecretName": "hub-tls"},
                                   "preview": {"domain": preview, "tlsSecretName": "preview-tls"}}})
    spec = rendered.one("Ingress")["spec"]
    assert spec["tls"] == [{"hosts": [hub], "secretName": "hub-tls"},
                           {"hosts": [f"*.{preview}"], "secretName": "preview-tls"}]
    service = rendered.one("Service")
    for rule, host in zip(spec["rules"], (hub, f"*.{preview}"), strict=True):
        assert rule["host"] == host
        (path,) = rule["http"]["paths"]
        assert path["path"] == "/"
        assert path["pathType"] == "Prefix"
        assert path["backend"]["service"] == {"name": service["metadata"]["name"],
                                              "port": {"number": service["spec"]["ports"][0]["port"]}}
    config = rendered.gateway_config()
    assert config["hub_url"] == f"https://{hub}"
    assert config["preview_domain"] == preview


@pytest.mark.parametrize("replicas", [2, 3])
def test_replicas_spread_and_disruption_budget(replicas: int) -> None:
    rendered = render({"replicaCount": replicas})
    deployment = rendered.one("Deployment")
    assert deployment["spec"]["replicas"] == replicas >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pdb = rendered.one("PodDisruptionBudget")
    assert pdb["spec"] == {"minAvailable": 1, "selector": {"matchLabels": GATEWAY_SELECTOR}}
    spec = deployment["spec"]["template"]["spec"]
    spread = {c["topologyKey"]: c for c in spec["topologySpreadConstraints"]}
    assert set(spread) == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    assert all(c["labelSelector"] == {"matchLabels": GATEWAY_SELECTOR} for c in spread.values())
    (preference,) = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preference["podAffinityTerm"] == {"topologyKey": "kubernetes.io/hostname",
                                             "labelSelector": {"matchLabels": GATEWAY_SELECTOR}}


def test_default_replicas_is_at_least_two() -> None:
    assert render().one("Deployment")["spec"]["replicas"] >= 2


def test_the_ide_key_may_live_in_a_secret_of_its_own() -> None:
    rendered = render({"auth": {"ideKey": {"existingSecret": "codehub-ide", "key": "key"}}})
    volumes = {v["name"]: v for v in rendered.one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["ide-key"]["secret"]["secretName"] == "codehub-ide"
    assert volumes["ide-key"]["secret"]["items"] == [{"key": "key", "path": "key"}]
    assert rendered.gateway_config()["kubernetes"]["ide_key_file"] == "/etc/codehub/ide/key"

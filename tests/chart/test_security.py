"""Security properties of the rendered chart: least-privilege RBAC, hardened pods, workspace isolation, TLS, HA."""

from __future__ import annotations

from typing import Any

import pytest

from tests.chart.helm import NAMESPACE, Manifest, render

pytestmark = pytest.mark.timeout(60)

GATEWAY_SELECTOR = {"app.kubernetes.io/name": "codehub-gateway", "app.kubernetes.io/instance": "codehub"}

# Exactly what gateway/lifecycle/kubernetes uses (runtime and token store): (API group, resource) → verbs.
EXPECTED_RULES = {
    ("", "pods"): {"get", "list", "watch", "create", "delete"},
    ("", "persistentvolumeclaims"): {"get", "list", "watch", "create", "delete"},
    ("", "events"): {"get", "list", "watch"},
    ("snapshot.storage.k8s.io", "volumesnapshots"): {"get", "list", "watch", "create", "delete"},
    ("codehub.dev", "workspaces"): {"get", "list", "watch", "create", "update", "patch", "delete"},
    ("codehub.dev", "workspaces/finalizers"): {"update"},
    ("codehub.dev", "workspaces/status"): {"get", "update", "patch"},
    ("coordination.k8s.io", "leases"): {"get", "create", "update"},
    ("codehub.dev", "sharelinks"): {"list", "watch", "create", "patch", "delete"},
    ("codehub.dev", "apitokens"): {"list", "watch", "create", "delete"},
    ("codehub.dev", "sharelinks/status"): {"patch"},
    ("codehub.dev", "apitokens/status"): {"patch"},
}


def pod_spec(values: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = render(values).one("Deployment")["spec"]["template"]["spec"]
    return spec


def rules_of(role: Manifest) -> dict[tuple[str, str], set[str]]:
    rules: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, f"unexpected rule fields {rule}"  # no resourceNames
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                rules.setdefault((group, resource), set()).update(rule["verbs"])
    return rules


def test_rbac_is_exactly_what_the_gateway_uses() -> None:
    rendered = render()
    assert rendered.of_kind("ClusterRole") == []
    assert rendered.of_kind("ClusterRoleBinding") == []
    role = rendered.one("Role")
    rules = rules_of(role)
    assert rules == EXPECTED_RULES
    for (group, resource), verbs in rules.items():
        assert "*" not in verbs
        assert "*" not in group
        assert "*" not in resource
        assert resource != "secrets"
        assert not resource.startswith("secrets/")
        assert not verbs & {"escalate", "bind", "impersonate", "deletecollection"}
    binding = rendered.one("RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    account = rendered.one("ServiceAccount")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    assert pod_spec()["serviceAccountName"] == account


def test_rbac_lives_in_the_workspace_namespace() -> None:
    rendered = render({"workspaces": {"namespace": "codehub-workspaces"}})
    assert rendered.one("Role")["metadata"]["namespace"] == "codehub-workspaces"
    binding = rendered.one("RoleBinding")
    assert binding["metadata"]["namespace"] == "codehub-workspaces"
    assert binding["subjects"][0]["namespace"] == NAMESPACE  # the gateway's own account, in the release namespace
    assert rendered.gateway_config()["kubernetes"]["namespace"] == "codehub-workspaces"


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


def test_probes_on_the_gateway_port() -> None:
    (container,) = pod_spec()["containers"]
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}


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

    policies = volumes[mounts["/etc/codehub/policies"]["name"]]["configMap"]["name"]
    assert policies == rendered.one("ConfigMap", "-policies")["metadata"]["name"]
    assert config["policy_file"] == "/etc/codehub/policies/default.yaml"
    # Secrets and policies are directory mounts (not subPath), so rotation and edits reach running pods.
    for path in ("/etc/codehub/keys", "/etc/codehub/oidc", "/etc/codehub/policies"):
        assert "subPath" not in mounts[path]
        assert mounts[path]["readOnly"] is True


def test_network_policy_admits_only_gateway_pods_to_workspaces() -> None:
    policy = render().one("NetworkPolicy")
    spec = policy["spec"]
    assert policy["metadata"]["namespace"] == NAMESPACE
    assert spec["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "codehub-workspace"}}
    assert spec["policyTypes"] == ["Ingress"]
    assert spec["ingress"] == [{"from": [{"podSelector": {"matchLabels": GATEWAY_SELECTOR}}]}]
    # The selector really picks the gateway's pods.
    labels = render().one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert GATEWAY_SELECTOR.items() <= labels.items()


def test_network_policy_across_namespaces_names_the_gateway_namespace() -> None:
    policy = render({"workspaces": {"namespace": "codehub-workspaces"}}).one("NetworkPolicy")
    assert policy["metadata"]["namespace"] == "codehub-workspaces"
    (peer,) = policy["spec"]["ingress"][0]["from"]
    # One peer with both selectors: gateway pods AND in the gateway's namespace (not either).
    assert peer == {"podSelector": {"matchLabels": GATEWAY_SELECTOR},
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}}}


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

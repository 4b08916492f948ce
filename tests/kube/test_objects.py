"""Manifest builders against literal dicts, the phase table, and schema validation of every built manifest."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

import kubernetes_validate
import pytest

from gateway.config import Config, Kubernetes, KubernetesResources
from gateway.lifecycle.base import Phase
from gateway.lifecycle.kubernetes import phases
from gateway.lifecycle.kubernetes.objects import (
    WorkspaceResource,
    belongs,
    make_lease,
    make_pod,
    make_pvc,
    make_snapshot,
    make_workspace,
    parse_workspace,
    workspace_status,
)

AT = datetime.datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=datetime.UTC)
SETTINGS = Kubernetes(namespace="codehub", storage_class="fast", snapshot_class="csi-snap",
                      resources=KubernetesResources(requests={"cpu": "500m", "memory": "1Gi"},
                                                    limits={"cpu": "2", "memory": "4Gi"}))
WS = WorkspaceResource(id="abc", owner="alice", collaborators=("bob",), ports={8000: "public", 3000: "org"})
LABELS = {
    "app.kubernetes.io/name": "codehub-workspace",
    "app.kubernetes.io/instance": "ws-abc",
    "app.kubernetes.io/managed-by": "codehub-gateway",
    "codehub.dev/workspace": "abc",
}
K8S_VERSION = "1.30"


def validate(manifest: Mapping[str, Any]) -> None:
    kubernetes_validate.validate(dict(manifest), K8S_VERSION, strict=True)


def test_make_pod() -> None:
    assert make_pod(WS, SETTINGS) == {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "ws-abc", "labels": LABELS},
        "spec": {
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "securityContext": {
                "runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [{
                "name": "code-server",
                "image": "codercom/code-server:4.99.0",
                "args": ["--auth", "none", "--bind-addr", "0.0.0.0:13337", "--disable-telemetry",
                         "--disable-update-check", "/home/coder"],
                "env": [{"name": "HOME", "value": "/home/coder"}, {"name": "CODEHUB_WORKSPACE", "value": "abc"}],
                "ports": [{"name": "ide", "containerPort": 13337, "protocol": "TCP"}],
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": 13337}, "periodSeconds": 2,
                                   "failureThreshold": 3},
                "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
                "securityContext": {
                    "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                    "capabilities": {"drop": ["ALL"]},
                },
                "volumeMounts": [{"name": "home", "mountPath": "/home/coder"}, {"name": "tmp", "mountPath": "/tmp"}],
            }],
            "volumes": [
                {"name": "home", "persistentVolumeClaim": {"claimName": "ws-abc-home"}},
                {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
            ],
        },
    }


def test_make_pod_places_the_pod_as_configured() -> None:
    settings = Kubernetes(
        image="registry.example.com:5000/ide/code-server:4.99.0", image_digest="sha256:" + "ab" * 32,
        node_selector={"pool": "workspaces"}, priority_class="workspaces", image_pull_secrets=["regcred"],
        tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
        resources=KubernetesResources(requests={"cpu": "1"}, limits={"cpu": "2", "nvidia.com/gpu": "1"}))
    spec = make_pod(WS, settings)["spec"]
    assert spec["containers"][0]["image"] == "registry.example.com:5000/ide/code-server@sha256:" + "ab" * 32
    assert spec["nodeSelector"] == {"pool": "workspaces"}
    assert spec["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert spec["affinity"] == settings.affinity
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["priorityClassName"] == "workspaces"
    assert spec["containers"][0]["resources"]["limits"] == {"cpu": "2", "nvidia.com/gpu": "1"}
    kubernetes_validate.validate(make_pod(WS, settings), K8S_VERSION, strict=True)
    assert "nodeSelector" not in make_pod(WS, SETTINGS)["spec"]  # nothing set, nothing sent
    with pytest.raises(ValueError, match="not an image digest"):
        Kubernetes(image_digest="latest")


def test_make_pod_uses_the_workspace_overrides() -> None:
    ws = WorkspaceResource(id="abc", owner="alice", image="example/ide:1", ide_port=8443,
                           resources={"requests": {"cpu": "1"}, "limits": {"cpu": "1"}})
    container = make_pod(ws, SETTINGS)["spec"]["containers"][0]
    assert container["image"] == "example/ide:1"
    assert container["args"][3] == "0.0.0.0:8443"
    assert container["readinessProbe"]["httpGet"]["port"] == 8443
    assert container["resources"] == {"requests": {"cpu": "1"}, "limits": {"cpu": "1"}}


def test_make_pod_points_code_server_at_the_share_urls() -> None:
    """code-server's Ports view and "Open in Browser" use VSCODE_PROXY_URI: the workspace's own share URL."""
    config = Config(hub_url="https://hub.example.com", preview_domain="preview.example.com:443")
    pod = make_pod(WS, SETTINGS, proxy_uri=config.proxy_uri(WS.id))
    env = pod["spec"]["containers"][0]["env"]
    assert {"name": "VSCODE_PROXY_URI", "value": "https://{{port}}-abc.preview.example.com/"} in env
    validate(pod)


def test_make_pvc() -> None:
    assert make_pvc(WS, SETTINGS) == {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "ws-abc-home", "labels": LABELS},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Gi"}},
                 "storageClassName": "fast"},
    }


def test_make_pvc_restores_from_a_snapshot_with_the_default_storage_class() -> None:
    pvc = make_pvc(WorkspaceResource(id="abc", owner="alice", storage="20Gi"), Kubernetes(),
                   restore_from_snapshot="ws-abc-home-20260304050607")
    assert pvc["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "20Gi"}},
        "dataSource": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot",
                       "name": "ws-abc-home-20260304050607"},
    }


def test_make_snapshot() -> None:
    assert make_snapshot(WS, SETTINGS, AT) == {
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshot",
        "metadata": {"name": "ws-abc-home-20260304050607", "labels": LABELS},
        "spec": {"source": {"persistentVolumeClaimName": "ws-abc-home"}, "volumeSnapshotClassName": "csi-snap"},
    }
    later = make_snapshot(WS, Kubernetes(), AT + datetime.timedelta(seconds=1))
    assert later["metadata"]["name"] == "ws-abc-home-20260304050608"  # never the same name as the last one
    assert "volumeSnapshotClassName" not in later["spec"]


def test_make_workspace_and_parse_it_back() -> None:
    manifest = make_workspace(WS)
    assert manifest == {
        "apiVersion": "codehub.dev/v1alpha1",
        "kind": "Workspace",
        "metadata": {"name": "abc", "labels": {"app.kubernetes.io/managed-by": "codehub-gateway"}},
        "spec": {"owner": "alice", "collaborators": ["bob"], "ports": {"3000": "org", "8000": "public"}},
    }
    assert parse_workspace(manifest) == WS
    full = WorkspaceResource(id="x", owner="o", image="i:1", ide_port=8443, storage="5Gi",
                             resources={"limits": {"cpu": "1"}})
    assert make_workspace(full)["spec"] == {"owner": "o", "collaborators": [], "ports": {}, "image": "i:1",
                                            "idePort": 8443, "storage": "5Gi", "resources": {"limits": {"cpu": "1"}}}
    assert parse_workspace(make_workspace(full)) == full
    assert parse_workspace(make_workspace(full)).spec(SETTINGS).ide_port == 8443
    assert WS.spec(SETTINGS).ide_port == 13337


def test_parse_workspace_is_lenient() -> None:
    obj = {"metadata": {"name": "w"}, "spec": {"owner": "a", "ports": {"x": "public", "80": "everyone", "81": "org",
                                                                       "\u00b2": "public", "9" * 5000: "public"},
                                               "idePort": "nope"}}
    assert parse_workspace(obj) == WorkspaceResource(id="w", owner="a", ports={81: "org"})


def test_workspace_status() -> None:
    assert workspace_status("RUNNING", pod_ip="10.0.0.5", at=AT) == {
        "phase": "RUNNING",
        "podIP": "10.0.0.5",
        "conditions": [{"type": "Ready", "status": "True", "reason": "Running", "message": "",
                        "lastTransitionTime": "2026-03-04T05:06:07Z"}],
    }


def test_make_lease() -> None:
    assert make_lease("reaper", "gw-1", 15, now=AT) == {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "reaper", "labels": {"app.kubernetes.io/managed-by": "codehub-gateway"}},
        "spec": {"holderIdentity": "gw-1", "leaseDurationSeconds": 15, "leaseTransitions": 0,
                 "acquireTime": "2026-03-04T05:06:07.890123Z", "renewTime": "2026-03-04T05:06:07.890123Z"},
    }
    released = make_lease("reaper", None, 0.3, now=AT, transitions=2, resource_version="7")
    assert released["metadata"]["resourceVersion"] == "7"
    assert released["spec"] == {"leaseDurationSeconds": 1, "leaseTransitions": 2,
                                "renewTime": "2026-03-04T05:06:07.890123Z"}


@pytest.mark.parametrize("manifest", [
    make_pod(WS, SETTINGS),
    make_pod(WorkspaceResource(id="b", owner="o", ide_port=8443, resources={"limits": {"cpu": "1"}}), Kubernetes()),
    make_pvc(WS, SETTINGS),
    make_pvc(WS, Kubernetes(), restore_from_snapshot="ws-abc-home-1"),
    make_lease("reaper", "gw-1", 15, now=AT),
    make_lease("reaper", None, 15, now=AT, transitions=1, resource_version="3"),
], ids=["pod", "pod-overrides", "pvc", "pvc-restore", "lease", "lease-released"])
def test_manifests_validate_strictly(manifest: dict[str, Any]) -> None:
    validate(manifest)


def test_strict_validation_catches_mistakes() -> None:
    broken = make_pod(WS, SETTINGS)
    broken["spec"]["containers"][0]["securityContext"]["runAsNonroot"] = True  # typo: unknown field
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)


@pytest.mark.parametrize("manifest", [make_snapshot(WS, SETTINGS, AT), make_workspace(WS)])
def test_custom_kinds_have_no_schema(manifest: dict[str, Any]) -> None:
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate(manifest)


# --- the phase table ------------------------------------------------------------------------------

def pod(*, ready: bool = False, ip: str | None = None, phase: str = "Running", waiting: str | None = None,
        deleting: bool = False) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase, "conditions": [{"type": "Ready", "status": str(ready)}]}
    if ip:
        status["podIP"] = ip
    if waiting:
        status["containerStatuses"] = [{"state": {"waiting": {"reason": waiting, "message": "m"}}}]
    meta: dict[str, Any] = {"name": "ws-abc"}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "status": status}


PVC = {"metadata": {"name": "ws-abc-home"}}
PVC_DELETING = {"metadata": {"name": "ws-abc-home", "deletionTimestamp": "2026-01-01T00:00:00Z"}}


def snap(name: str, *, ready: bool = True, created: str = "2026-01-01T00:00:00Z", error: dict[str, Any] | None = None,
         deleting: bool = False) -> dict[str, Any]:
    status: dict[str, Any] = {"readyToUse": ready}
    if error is not None:
        status["error"] = error
    meta: dict[str, Any] = {"name": name, "creationTimestamp": created}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-02T00:00:00Z"
    return {"metadata": meta, "status": status}


QUOTA = {"message": "quota"}
JUST_MADE_POD = {"metadata": {"name": "ws-abc"}}  # as created: the kubelet has written no status yet
JUST_TAKEN = {"metadata": {"name": "s1", "creationTimestamp": "2026-01-01T00:00:00Z"}}  # the snapshotter's neither


@pytest.mark.parametrize(("pod_", "pvc", "snapshots", "expected"), [
    (pod(ready=True, ip="10.1.1.1"), PVC, [], phases.Observation(Phase.RUNNING, "10.1.1.1")),
    (pod(ready=True), PVC, [], phases.Observation(Phase.STARTING, message="starting the workspace")),
    (pod(phase="Pending"), PVC, [], phases.Observation(Phase.STARTING, message="starting the workspace")),
    (pod(phase="Pending", ready=True, ip="10.1.1.1"), PVC, [],
     phases.Observation(Phase.STARTING, message="starting the workspace")),
    (JUST_MADE_POD, PVC, [], phases.Observation(Phase.STARTING, message="starting the workspace")),
    ({**pod(), "status": {"phase": "Pending", "containerStatuses": [{"name": "code-server"}]}}, PVC, [],
     phases.Observation(Phase.STARTING, message="starting the workspace")),
    (pod(deleting=True, ready=True, ip="10.1.1.1"), PVC, [], phases.Observation(Phase.STOPPING,
                                                                                 message="stopping the workspace")),
    (pod(phase="Failed"), PVC, [], phases.Observation(Phase.FAILED, message="the workspace pod ended (Failed)")),
    ({**pod(), "status": {"phase": "Failed", "reason": "Evicted", "message": "low on memory"}}, PVC, [],
     phases.Observation(Phase.FAILED, message="the workspace pod ended (Evicted: low on memory)")),
    (pod(waiting="CrashLoopBackOff"), PVC, [], None),
    (pod(waiting="ImagePullBackOff"), PVC, [], phases.Observation(Phase.STARTING, message="starting the workspace")),
    (None, PVC, [], phases.Observation(Phase.WARM)),
    (None, PVC, [snap("s1")], phases.Observation(Phase.WARM)),
    (None, PVC, [snap("s1", ready=False)], phases.Observation(Phase.ARCHIVING,
                                                              message="taking a snapshot of the volume")),
    (None, PVC, [JUST_TAKEN], phases.Observation(Phase.ARCHIVING, message="taking a snapshot of the volume")),
    (None, PVC, [snap("s1", ready=False, error=QUOTA)], phases.Observation(Phase.WARM)),
    (None, PVC, [snap("s1", ready=False, deleting=True)], phases.Observation(Phase.WARM)),  # given up, not taken
    (None, PVC_DELETING, [snap("s1")], phases.Observation(Phase.ARCHIVING,
                                                          message="removing the volume after its snapshot")),
    (None, None, [snap("s1")], phases.Observation(Phase.COLD)),
    (None, None, [snap("s1", ready=False, error=QUOTA)], phases.Observation(
        Phase.FAILED, message="the workspace has snapshots but none is ready to restore: quota")),
    (None, None, [snap("s1", ready=False, error={"time": "2026-01-01T00:00:00Z"})], phases.Observation(
        Phase.FAILED, message="the workspace has snapshots but none is ready to restore: the snapshot failed")),
    (None, None, [snap("s1", deleting=True)], phases.Observation(
        Phase.FAILED, message="the workspace has snapshots but none is ready to restore")),
    (None, None, [snap("s1", ready=False)], phases.Observation(
        Phase.FAILED, message="the workspace has snapshots but none is ready to restore")),
    (None, None, [], phases.Observation(Phase.WARM)),
])
def test_observe(pod_: dict[str, Any] | None, pvc: dict[str, Any] | None, snapshots: list[dict[str, Any]],
                 expected: phases.Observation | None) -> None:
    seen = phases.observe(pod_, pvc, snapshots)
    if expected is None:
        assert seen.phase is Phase.FAILED
        assert seen.message
    else:
        assert seen == expected


def test_observe_reads_its_snapshots_once_given_any_iterable() -> None:
    seen = phases.observe(None, None, iter([snap("s1", ready=False, error=QUOTA)]))
    assert seen == phases.Observation(Phase.FAILED, message="the workspace has snapshots but none is ready to "
                                                            "restore: quota")


def test_newest_first_and_pruning_never_touch_the_newest_ready() -> None:
    snapshots = [snap("a", created="2026-01-01T00:00:00Z"), snap("c", created="2026-01-03T00:00:00Z"),
                 snap("b", created="2026-01-02T00:00:00Z"), snap("d", created="2026-01-04T00:00:00Z", ready=False)]
    assert [s["metadata"]["name"] for s in phases.newest_first(snapshots)] == ["c", "b", "a"]
    assert phases.prunable(snapshots, keep=2) == ["a"]
    assert phases.prunable(snapshots, keep=1) == ["b", "a"]
    assert phases.prunable(snapshots, keep=0) == ["b", "a"]  # the newest ready one stays whatever keep says
    assert phases.prunable([snap("x", ready=False)], keep=1) == []
    going = snap("e", created="2026-01-05T00:00:00Z", deleting=True)  # the newest, but on its way out: never restored
    assert [s["metadata"]["name"] for s in phases.newest_first([*snapshots, going])] == ["c", "b", "a"]
    # By when it was taken, whatever its name says (an operator's own); names order those of one second only.
    named = [snap("z-old", created="2026-01-01T00:00:00Z"), snap("a-new", created="2026-01-03T00:00:00Z"),
             snap("s-0900", created="2026-01-02T00:00:00Z"), snap("s-1000", created="2026-01-02T00:00:00Z")]
    assert [s["metadata"]["name"] for s in phases.newest_first(named)] == ["a-new", "s-1000", "s-0900", "z-old"]


def test_what_a_workspace_makes_points_at_it_by_uid() -> None:
    ws = WorkspaceResource(id="abc", owner="alice", uid="u-1")
    reference = {"apiVersion": "codehub.dev/v1alpha1", "kind": "Workspace", "name": "abc", "uid": "u-1",
                 "controller": True, "blockOwnerDeletion": True}
    for manifest in (make_pod(ws, SETTINGS), make_pvc(ws, SETTINGS), make_snapshot(ws, SETTINGS, AT)):
        assert manifest["metadata"]["ownerReferences"] == [reference]
        assert belongs(manifest, "u-1")
        assert not belongs(manifest, "u-2")  # a namesake's
    assert "ownerReferences" not in make_pod(WS, SETTINGS)["metadata"]
    assert belongs(make_pod(WS, SETTINGS), "u-2")  # made before owners were set: adopted
    assert parse_workspace({"metadata": {"name": "abc", "uid": "u-1"}, "spec": {"owner": "alice"}}) == ws

"""Manifests as pure functions: data in, Kubernetes objects (plain dicts) out. No I/O here.

Names: Workspace ``{id}``, pod ``ws-{id}``, PVC ``ws-{id}-home``, snapshots ``ws-{id}-home-{UTC timestamp}``
(a new snapshot never replaces the last good one). Everything the gateway creates carries the labels from
:func:`labels`, which is also what the caches select on.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.config import Kubernetes
from gateway.lifecycle.base import WorkspaceSpec
from gateway.lifecycle.kubernetes.client import LEASE, POD, PVC, SNAPSHOT, WORKSPACE

MANAGED_BY = "codehub-gateway"
WORKSPACE_LABEL = "codehub.dev/workspace"
SELECTOR = f"app.kubernetes.io/managed-by={MANAGED_BY},{WORKSPACE_LABEL}"
HOME = "/home/coder"
UID = 1000


@dataclass(frozen=True, slots=True)
class WorkspaceResource:
    """What one Workspace custom resource asks for; unset fields fall back to the gateway's settings."""

    id: str
    owner: str
    collaborators: tuple[str, ...] = ()
    ports: Mapping[int, str] = field(default_factory=dict)
    image: str | None = None
    ide_port: int | None = None
    storage: str | None = None
    resources: Mapping[str, Mapping[str, str]] | None = None

    def spec(self, settings: Kubernetes) -> WorkspaceSpec:
        return WorkspaceSpec(id=self.id, owner=self.owner, collaborators=self.collaborators,
                             ide_port=self.ide_port or settings.ide_port, ports=dict(self.ports))


def pod_name(workspace: str) -> str:
    return f"ws-{workspace}"


def pvc_name(workspace: str) -> str:
    return f"ws-{workspace}-home"


def snapshot_name(workspace: str, at: datetime.datetime) -> str:
    return f"{pvc_name(workspace)}-{at.astimezone(datetime.UTC).strftime('%Y%m%d%H%M%S')}"


def labels(workspace: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "codehub-workspace",
        "app.kubernetes.io/instance": pod_name(workspace),
        "app.kubernetes.io/managed-by": MANAGED_BY,
        WORKSPACE_LABEL: workspace,
    }


def make_pod(ws: WorkspaceResource, settings: Kubernetes) -> dict[str, Any]:
    """The code-server pod: hardened, its home on the workspace's PVC, writable /tmp from an emptyDir."""
    port = ws.ide_port or settings.ide_port
    resources = ws.resources or {"requests": dict(settings.resources.requests),
                                 "limits": dict(settings.resources.limits)}
    return {
        "apiVersion": POD.api_version,
        "kind": POD.kind,
        "metadata": {"name": pod_name(ws.id), "labels": labels(ws.id)},
        "spec": {
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": UID,
                "runAsGroup": UID,
                "fsGroup": UID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [{
                "name": "code-server",
                "image": ws.image or settings.image,
                "args": ["--auth", "none", "--bind-addr", f"0.0.0.0:{port}", "--disable-telemetry",
                         "--disable-update-check", HOME],
                "env": [{"name": "HOME", "value": HOME}, {"name": "CODEHUB_WORKSPACE", "value": ws.id}],
                "ports": [{"name": "ide", "containerPort": port, "protocol": "TCP"}],
                "readinessProbe": {
                    "httpGet": {"path": "/healthz", "port": port},
                    "periodSeconds": 2,
                    "failureThreshold": 3,
                },
                "resources": {key: dict(value) for key, value in resources.items()},
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": settings.read_only_root,
                    "runAsNonRoot": True,
                    "capabilities": {"drop": ["ALL"]},
                },
                "volumeMounts": [
                    {"name": "home", "mountPath": HOME},
                    {"name": "tmp", "mountPath": "/tmp"},
                ],
            }],
            "volumes": [
                {"name": "home", "persistentVolumeClaim": {"claimName": pvc_name(ws.id)}},
                {"name": "tmp", "emptyDir": {"sizeLimit": settings.tmp_size}},
            ],
        },
    }


def make_pvc(ws: WorkspaceResource, settings: Kubernetes, restore_from_snapshot: str | None = None) -> dict[str, Any]:
    """The home volume; with ``restore_from_snapshot`` its data comes from that VolumeSnapshot."""
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": ws.storage or settings.storage_size}},
    }
    if settings.storage_class is not None:
        spec["storageClassName"] = settings.storage_class
    if restore_from_snapshot is not None:
        spec["dataSource"] = {"apiGroup": SNAPSHOT.group, "kind": SNAPSHOT.kind, "name": restore_from_snapshot}
    return {
        "apiVersion": PVC.api_version,
        "kind": PVC.kind,
        "metadata": {"name": pvc_name(ws.id), "labels": labels(ws.id)},
        "spec": spec,
    }


def make_snapshot(workspace: str, settings: Kubernetes, at: datetime.datetime) -> dict[str, Any]:
    spec: dict[str, Any] = {"source": {"persistentVolumeClaimName": pvc_name(workspace)}}
    if settings.snapshot_class is not None:
        spec["volumeSnapshotClassName"] = settings.snapshot_class
    return {
        "apiVersion": SNAPSHOT.api_version,
        "kind": SNAPSHOT.kind,
        "metadata": {"name": snapshot_name(workspace, at), "labels": labels(workspace)},
        "spec": spec,
    }


def make_workspace(ws: WorkspaceResource) -> dict[str, Any]:
    """The Workspace custom resource; ``status`` is written separately (the status subresource)."""
    spec: dict[str, Any] = {
        "owner": ws.owner,
        "collaborators": list(ws.collaborators),
        "ports": {str(port): visibility for port, visibility in sorted(ws.ports.items())},
    }
    optional = {"image": ws.image, "idePort": ws.ide_port, "storage": ws.storage,
                "resources": {key: dict(value) for key, value in ws.resources.items()} if ws.resources else None}
    spec.update({key: value for key, value in optional.items() if value is not None})
    return {
        "apiVersion": WORKSPACE.api_version,
        "kind": WORKSPACE.kind,
        "metadata": {"name": ws.id, "labels": {"app.kubernetes.io/managed-by": MANAGED_BY}},
        "spec": spec,
    }


def workspace_status(phase: str, *, pod_ip: str | None = None, message: str = "",
                     at: datetime.datetime) -> dict[str, Any]:
    """A status merge patch: phase, podIP and one ``Ready`` condition (lastActivity is written on its own)."""
    ready = phase == "RUNNING"
    return {
        "phase": phase,
        "podIP": pod_ip,
        "conditions": [{
            "type": "Ready",
            "status": "True" if ready else "False",
            "reason": phase.capitalize(),
            "message": message,
            "lastTransitionTime": timestamp(at),
        }],
    }


def parse_workspace(obj: Mapping[str, Any]) -> WorkspaceResource:
    """Read a Workspace custom resource leniently: a malformed field falls back to its default."""
    spec = obj.get("spec") or {}
    ports: dict[int, str] = {}
    for port, visibility in (spec.get("ports") or {}).items():
        if str(port).isdigit() and visibility in ("private", "org", "public"):
            ports[int(port)] = visibility
    resources = spec.get("resources")
    ide_port = spec.get("idePort")
    return WorkspaceResource(
        id=obj["metadata"]["name"],
        owner=str(spec.get("owner") or ""),
        collaborators=tuple(str(name) for name in spec.get("collaborators") or ()),
        ports=ports,
        image=spec.get("image") or None,
        ide_port=ide_port if isinstance(ide_port, int) and 0 < ide_port < 65536 else None,
        storage=spec.get("storage") or None,
        resources=resources if isinstance(resources, dict) and resources else None,
    )


def make_lease(name: str, holder: str | None, duration: float, *, now: datetime.datetime, transitions: int = 0,
               acquired: datetime.datetime | None = None, resource_version: str | None = None) -> dict[str, Any]:
    """A coordination.k8s.io/v1 Lease; ``holder`` None releases it. With a resourceVersion, a PUT is guarded."""
    metadata: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/managed-by": MANAGED_BY}}
    if resource_version is not None:
        metadata["resourceVersion"] = resource_version
    spec: dict[str, Any] = {
        "leaseDurationSeconds": max(1, round(duration)),
        "leaseTransitions": transitions,
        "renewTime": micro_time(now),
    }
    if holder is not None:
        spec["holderIdentity"] = holder
        spec["acquireTime"] = micro_time(acquired or now)
    return {"apiVersion": LEASE.api_version, "kind": LEASE.kind, "metadata": metadata, "spec": spec}


def timestamp(at: datetime.datetime) -> str:
    return at.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_time(at: datetime.datetime) -> str:
    return at.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: object) -> datetime.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None

"""Manifests as pure functions: data in, Kubernetes objects (plain dicts) out. No I/O here.

Names: Workspace ``{id}``, pod ``ws-{id}``, PVC ``ws-{id}-home``, snapshots ``ws-{id}-home-{UTC timestamp}``
(a new snapshot never replaces the last good one); ShareLink and ApiToken ``{id}`` (the id the API shows, never
the token: only its SHA-256 is stored). Everything the gateway creates carries the labels from
:func:`labels`, which is also what the caches select on. A workspace's pod, PVC, snapshots and share links also
carry an ``ownerReference`` to its Workspace (by UID), so the cluster's garbage collector deletes them with it
and a new Workspace of an old name is never mistaken for their owner.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.auth.ide import HASHED_PASSWORD
from gateway.auth.store import ApiToken, ShareLink
from gateway.config import PORT_TEXT, Kubernetes
from gateway.lifecycle.base import WorkspaceSpec
from gateway.lifecycle.kubernetes.client import (
    API_TOKEN,
    CONSENT,
    LEASE,
    POD,
    PVC,
    SHARE_LINK,
    SNAPSHOT,
    WORKSPACE,
)

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
    identity_ports: frozenset[int] = frozenset()
    image: str | None = None
    ide_port: int | None = None
    storage: str | None = None
    resources: Mapping[str, Mapping[str, str]] | None = None
    uid: str = ""  # the Workspace object's metadata.uid: what its pods, volumes and snapshots point at

    def spec(self, settings: Kubernetes) -> WorkspaceSpec:
        return WorkspaceSpec(id=self.id, owner=self.owner, collaborators=self.collaborators,
                             ide_port=self.ide_port or settings.ide_port, ports=dict(self.ports),
                             identity_ports=self.identity_ports, incarnation=self.uid)


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


def owner_reference(workspace: str, uid: str) -> dict[str, Any]:
    """Points at the Workspace by UID: a Workspace deleted and created again under its name owns nothing old."""
    return {"apiVersion": WORKSPACE.api_version, "kind": WORKSPACE.kind, "name": workspace, "uid": uid,
            "controller": True, "blockOwnerDeletion": True}


def _metadata(name: str, ws: WorkspaceResource) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels(ws.id)}
    if ws.uid:
        meta["ownerReferences"] = [owner_reference(ws.id, ws.uid)]
    return meta


def owners(obj: Mapping[str, Any]) -> set[str]:
    return {str(ref.get("uid")) for ref in (obj.get("metadata") or {}).get("ownerReferences") or []}


def belongs(obj: Mapping[str, Any], uid: str, since: object = None) -> bool:
    """Whether an object is the Workspace's: it points at that UID, or (made before owners were set) at none and
    was made no earlier than the Workspace (``since``: its ``creationTimestamp``).

    An object without owners outlives the deletion of its Workspace (the garbage collector deletes only what
    names an owner): taken for the next Workspace of the name, its home would be mounted in someone else's pod."""
    found = owners(obj)
    if found:
        return not uid or uid in found
    made, began = parse_time((obj.get("metadata") or {}).get("creationTimestamp")), parse_time(since)
    return made is None or began is None or made.timestamp() >= began.timestamp()


def make_pod(ws: WorkspaceResource, settings: Kubernetes, ide_secret: str | None = None,
             proxy_uri: str | None = None) -> dict[str, Any]:
    """The code-server pod: hardened, its home on the workspace's PVC, writable /tmp from an emptyDir; with an
    ``ide_secret`` code-server admits only requests carrying it (gateway/auth/ide.py), else anyone who reaches it.

    ``proxy_uri`` becomes ``VSCODE_PROXY_URI`` (the workspace's share URL with ``{{port}}``), so ports opened in
    the IDE point at the gateway's previews."""
    port = ws.ide_port or settings.ide_port
    auth = ["--auth", "password" if ide_secret is not None else "none"]
    secret = [{"name": HASHED_PASSWORD, "value": ide_secret}] if ide_secret is not None else []
    resources = ws.resources or {"requests": dict(settings.resources.requests),
                                 "limits": dict(settings.resources.limits)}
    pod: dict[str, Any] = {
        "apiVersion": POD.api_version,
        "kind": POD.kind,
        "metadata": _metadata(pod_name(ws.id), ws),
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
                "fsGroupChangePolicy": "OnRootMismatch",  # not a chown of the whole home at every start
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [{
                "name": "code-server",
                "image": ws.image or image(settings),
                "args": [*auth, "--bind-addr", f"0.0.0.0:{port}", "--disable-telemetry", "--disable-update-check",
                         HOME],
                "env": [{"name": "HOME", "value": HOME}, {"name": "CODEHUB_WORKSPACE", "value": ws.id}, *secret,
                        *([{"name": "VSCODE_PROXY_URI", "value": proxy_uri}] if proxy_uri else [])],
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
    placement = {"nodeSelector": dict(settings.node_selector) or None,
                 "tolerations": [dict(t) for t in settings.tolerations] or None,
                 "affinity": dict(settings.affinity) if settings.affinity else None,
                 "imagePullSecrets": [{"name": name} for name in settings.image_pull_secrets] or None,
                 "priorityClassName": settings.priority_class}
    pod["spec"].update({key: value for key, value in placement.items() if value is not None})
    return pod


def image(settings: Kubernetes) -> str:
    """The default image, pinned to ``image_digest`` when one is given (``repo@sha256:…``, the tag dropped)."""
    if settings.image_digest is None:
        return settings.image
    repository = settings.image.split("@", 1)[0]
    name = repository.rsplit("/", 1)[-1]
    if ":" in name:
        repository = repository[: len(repository) - len(name)] + name.split(":", 1)[0]
    return f"{repository}@{settings.image_digest}"


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
        "metadata": _metadata(pvc_name(ws.id), ws),
        "spec": spec,
    }


def make_snapshot(ws: WorkspaceResource, settings: Kubernetes, at: datetime.datetime) -> dict[str, Any]:
    spec: dict[str, Any] = {"source": {"persistentVolumeClaimName": pvc_name(ws.id)}}
    if settings.snapshot_class is not None:
        spec["volumeSnapshotClassName"] = settings.snapshot_class
    return {
        "apiVersion": SNAPSHOT.api_version,
        "kind": SNAPSHOT.kind,
        "metadata": _metadata(snapshot_name(ws.id, at), ws),
        "spec": spec,
    }


def make_workspace(ws: WorkspaceResource) -> dict[str, Any]:
    """The Workspace custom resource; ``status`` is written separately (the status subresource)."""
    spec: dict[str, Any] = {
        "owner": ws.owner,
        "collaborators": list(ws.collaborators),
        "ports": {str(port): visibility for port, visibility in sorted(ws.ports.items())},
    }
    if ws.identity_ports:
        spec["identityPorts"] = sorted(ws.identity_ports)
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
        if PORT_TEXT.fullmatch(str(port)) and visibility in ("private", "org", "public"):
            ports[int(port)] = visibility
    resources = spec.get("resources")
    ide_port = spec.get("idePort")
    return WorkspaceResource(
        id=obj["metadata"]["name"],
        owner=str(spec.get("owner") or ""),
        collaborators=tuple(str(name) for name in spec.get("collaborators") or ()),
        ports=ports,
        identity_ports=frozenset(port for port in spec.get("identityPorts") or () if isinstance(port, int)
                                 and 0 < port < 65536),
        image=spec.get("image") or None,
        ide_port=ide_port if isinstance(ide_port, int) and 0 < ide_port < 65536 else None,
        storage=spec.get("storage") or None,
        resources=resources if isinstance(resources, dict) and resources else None,
        uid=str((obj.get("metadata") or {}).get("uid") or ""),
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


# What a seal vouches for: every field that says what a record opens or tells, for whom and until when (not
# ``revoked``: the gateway patches it later, and a record's earlier state, seal and all, can be written back by
# whoever may edit it anyway).
SEALED_FIELDS = {
    SHARE_LINK.kind: ("workspace", "port", "audience", "people", "createdBy", "expires", "tokenHash"),
    API_TOKEN.kind: ("subject", "email", "groups", "attributes", "name", "tokenHash"),
    CONSENT.kind: ("subject", "workspace", "port", "share", "claims", "answered"),
}


# Keys sorted: the API server keeps a custom resource as a map and writes its keys in an order of its own.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def record_seal(key: bytes, kind: str, obj: Mapping[str, Any]) -> str:
    """The HMAC-SHA256 a ShareLink, ApiToken or IdentityConsent object carries in ``spec.seal``: of its kind, name,
    owners and sealed fields, as stored.

    Only hashes of tokens are stored, and anyone can hash a token of their own: someone allowed to create or edit
    these custom resources (RBAC grants custom resources apart from Secrets) could otherwise write a record that
    lets their token act as anyone or open any workspace, or say that a visitor agreed to tell an app who they
    are. The key is derived from the IDE key, which only the gateway reads."""
    spec = obj.get("spec") or {}
    meta = obj.get("metadata") or {}
    message = [kind, meta.get("name"), sorted(owners(obj)), [spec.get(name) for name in SEALED_FIELDS[kind]]]
    return hmac.new(key, _CANONICAL.encode(message).encode(), hashlib.sha256).hexdigest()


def sealed(key: bytes | None, kind: str, obj: Mapping[str, Any]) -> bool:
    """Whether the object's seal is the one ``key`` makes for it; every object is, without a key."""
    if key is None:
        return True
    seal = (obj.get("spec") or {}).get("seal")
    return isinstance(seal, str) and hmac.compare_digest(seal, record_seal(key, kind, obj))


def with_seal(obj: dict[str, Any], kind: str, key: bytes | None) -> dict[str, Any]:
    if key is not None:
        obj["spec"]["seal"] = record_seal(key, kind, obj)
    return obj


def make_share_link(link: ShareLink, workspace_uid: str = "", key: bytes | None = None) -> dict[str, Any]:
    """A ShareLink custom resource; ``spec.revoked`` is set later by a patch, use counts live in ``status``.

    It belongs to its Workspace (``workspace_uid``): deleting the workspace deletes its links. With ``key``, it is
    sealed (:func:`record_seal`).
    """
    spec: dict[str, Any] = {
        "workspace": link.workspace,
        "audience": link.audience,
        "people": list(link.people),
        "createdBy": link.created_by,
        "expires": micro_time(_utc(link.expires)),
        "tokenHash": link.token_hash,
    }
    if link.port is not None:
        spec["port"] = link.port
    if link.revoked is not None:
        spec["revoked"] = micro_time(_utc(link.revoked))
    metadata: dict[str, Any] = {"name": link.id, "labels": {"app.kubernetes.io/managed-by": MANAGED_BY,
                                                            WORKSPACE_LABEL: link.workspace}}
    if workspace_uid:
        metadata["ownerReferences"] = [owner_reference(link.workspace, workspace_uid)]
    return with_seal({"apiVersion": SHARE_LINK.api_version, "kind": SHARE_LINK.kind, "metadata": metadata,
                     "spec": spec}, SHARE_LINK.kind, key)


def revoke_patch(at: float) -> dict[str, Any]:
    """Revocation is the owner's intent, so it goes in ``spec`` (status may be dropped by a backup restore)."""
    return {"spec": {"revoked": micro_time(_utc(at))}}


def usage_patch(replica: str, last_used: float, uses: int | None = None) -> dict[str, Any]:
    """A status merge patch of this replica's own entry: absolute values, so a repeated write changes nothing and
    replicas never overwrite each other (each owns its key)."""
    entry: dict[str, Any] = {"lastUsed": micro_time(_utc(last_used))}
    if uses is not None:
        entry["uses"] = uses
    return {"status": {"replicas": {replica: entry}}}


@dataclass(frozen=True, slots=True)
class Usage:
    uses: int = 0
    last_used: float | None = None


def usage_by_replica(obj: Mapping[str, Any]) -> dict[str, Usage]:
    """``status.replicas`` read leniently: what each replica has written (uses, last use)."""
    found: dict[str, Usage] = {}
    replicas = (obj.get("status") or {}).get("replicas")
    for replica, entry in (replicas.items() if isinstance(replicas, dict) else ()):
        if not isinstance(entry, dict):
            continue
        uses = entry.get("uses")
        when = parse_time(entry.get("lastUsed"))
        found[str(replica)] = Usage(uses if isinstance(uses, int) and uses >= 0 else 0,
                                    when.timestamp() if when is not None else None)
    return found


def total_usage(usages: Mapping[str, Usage]) -> Usage:
    """Uses add up across replicas; the newest last use wins."""
    times = [usage.last_used for usage in usages.values() if usage.last_used is not None]
    return Usage(sum(usage.uses for usage in usages.values()), max(times) if times else None)


def parse_share_link(obj: Mapping[str, Any]) -> ShareLink | None:
    """A ShareLink resource as the gateway's ShareLink, or None when it is malformed (then it grants nothing)."""
    spec = obj.get("spec") or {}
    meta = obj.get("metadata") or {}
    token_hash, workspace = spec.get("tokenHash"), spec.get("workspace")
    expires, created = parse_time(spec.get("expires")), parse_time(meta.get("creationTimestamp"))
    port = spec.get("port")
    if not (isinstance(token_hash, str) and token_hash and isinstance(workspace, str) and workspace
            and expires is not None and spec.get("audience") in ("anyone", "org", "people")):
        return None
    if port is not None and not (isinstance(port, int) and 0 < port < 65536):
        return None
    revoked = parse_time(spec.get("revoked"))
    usage = total_usage(usage_by_replica(obj))
    return ShareLink(
        id=str(meta["name"]), token_hash=token_hash, workspace=workspace, port=port, audience=str(spec["audience"]),
        people=[str(person) for person in spec.get("people") or ()], created_by=str(spec.get("createdBy") or ""),
        created=created.timestamp() if created is not None else 0.0, expires=expires.timestamp(),
        revoked=revoked.timestamp() if revoked is not None else None, uses=usage.uses, last_used=usage.last_used,
    )


def make_api_token(record: ApiToken, key: bytes | None = None) -> dict[str, Any]:
    """An ApiToken custom resource: who the token acts for, as they were when they created it; with ``key``,
    sealed (:func:`record_seal`)."""
    return with_seal({
        "apiVersion": API_TOKEN.api_version,
        "kind": API_TOKEN.kind,
        "metadata": {"name": record.id, "labels": {"app.kubernetes.io/managed-by": MANAGED_BY}},
        "spec": {
            "subject": record.subject,
            "email": record.email,
            "groups": list(record.groups),
            "attributes": dict(record.attributes),
            "name": record.name,
            "tokenHash": record.token_hash,
        },
    }, API_TOKEN.kind, key)


def parse_api_token(obj: Mapping[str, Any]) -> ApiToken | None:
    spec = obj.get("spec") or {}
    meta = obj.get("metadata") or {}
    token_hash, subject = spec.get("tokenHash"), spec.get("subject")
    if not (isinstance(token_hash, str) and token_hash and isinstance(subject, str) and subject):
        return None
    created = parse_time(meta.get("creationTimestamp"))
    attributes = spec.get("attributes")
    return ApiToken(
        id=str(meta["name"]), token_hash=token_hash, subject=subject, name=str(spec.get("name") or ""),
        created=created.timestamp() if created is not None else 0.0, email=str(spec.get("email") or ""),
        groups=[str(group) for group in spec.get("groups") or ()],
        last_used=total_usage(usage_by_replica(obj)).last_used,
        attributes={str(k): str(v) for k, v in attributes.items()} if isinstance(attributes, dict) else {},
    )


def _utc(at: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(at, tz=datetime.UTC)


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

"""A workspace's phase from what the caches hold: its pod, its home PVC, its VolumeSnapshots. Pure functions.

The table, first match wins:

| observed                                            | phase     |
|-----------------------------------------------------|-----------|
| pod being deleted                                   | STOPPING  |
| pod failed, or a container stuck (crash loop, bad image name) | FAILED |
| pod Ready with an IP                                | RUNNING   |
| pod (not ready yet)                                 | STARTING  |
| PVC being deleted                                   | ARCHIVING |
| PVC and a snapshot still being taken                | ARCHIVING |
| PVC                                                 | WARM      |
| no PVC, a ready snapshot                            | COLD      |
| no PVC, snapshots, none ready                       | FAILED    |
| nothing yet (a new workspace)                       | WARM      |

An operation in flight on this replica (STARTING, STOPPING, ARCHIVING, RESTORING) overrides the table.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.lifecycle.base import Phase

# Waiting reasons that never clear by themselves. ErrImagePull / ImagePullBackOff are not among them: a registry
# hiccup is retried by the kubelet, so a wake gives those a grace (``starting.judge``) before it gives up.
STUCK = frozenset({"InvalidImageName", "CrashLoopBackOff", "CreateContainerConfigError", "CreateContainerError",
                   "RunContainerError"})

Obj = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Observation:
    phase: Phase
    address: str | None = None
    message: str = ""


def deleting(obj: Obj | None) -> bool:
    return obj is not None and bool((obj.get("metadata") or {}).get("deletionTimestamp"))


def pod_ready(pod: Obj) -> bool:
    status = pod.get("status") or {}
    conditions = status.get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    return ready and status.get("phase") == "Running" and bool(status.get("podIP"))


def pod_failure(pod: Obj) -> str | None:
    status = pod.get("status") or {}
    if status.get("phase") in ("Failed", "Succeeded"):
        why, detail = status.get("reason") or status.get("phase"), status.get("message")
        return f"the workspace pod ended ({why}: {detail})" if detail else f"the workspace pod ended ({why})"
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK:
            return f"the workspace container cannot run: {waiting['reason']} {waiting.get('message', '')}".strip()
    return None


def snapshot_ready(snapshot: Obj) -> bool:
    return bool((snapshot.get("status") or {}).get("readyToUse")) and not deleting(snapshot)


def snapshot_error(snapshot: Obj) -> str | None:
    error = (snapshot.get("status") or {}).get("error") or {}
    return str(error.get("message") or "the snapshot failed") if error else None


def _created(snapshot: Obj) -> tuple[str, str]:
    meta = snapshot.get("metadata") or {}
    return (str(meta.get("creationTimestamp") or ""), str(meta.get("name") or ""))


def newest_first(snapshots: Iterable[Obj]) -> list[Obj]:
    """Ready snapshots, newest first (creation time, then the timestamped name)."""
    return sorted((s for s in snapshots if snapshot_ready(s)), key=_created, reverse=True)


def prunable(snapshots: Iterable[Obj], keep: int) -> list[str]:
    """Names of ready snapshots beyond the ``keep`` newest ready ones; never the newest."""
    return [str(s["metadata"]["name"]) for s in newest_first(snapshots)[max(1, keep):]]


def observe(pod: Obj | None, pvc: Obj | None, snapshots: Iterable[Obj]) -> Observation:
    snapshots = list(snapshots)
    if pod is not None:
        if deleting(pod):
            return Observation(Phase.STOPPING, message="stopping the workspace")
        failure = pod_failure(pod)
        if failure is not None:
            return Observation(Phase.FAILED, message=failure)
        if pod_ready(pod):
            return Observation(Phase.RUNNING, str((pod.get("status") or {})["podIP"]))
        return Observation(Phase.STARTING, message="starting the workspace")
    if pvc is not None:
        if deleting(pvc):
            return Observation(Phase.ARCHIVING, message="removing the volume after its snapshot")
        if any(not snapshot_ready(s) and snapshot_error(s) is None and not deleting(s) for s in snapshots):
            return Observation(Phase.ARCHIVING, message="taking a snapshot of the volume")
        return Observation(Phase.WARM)
    if newest_first(snapshots):
        return Observation(Phase.COLD)
    if snapshots:
        errors = [e for e in (snapshot_error(s) for s in snapshots) if e]
        return Observation(Phase.FAILED, message="the workspace has snapshots but none is ready to restore"
                                                 + (f": {errors[0]}" if errors else ""))
    return Observation(Phase.WARM)

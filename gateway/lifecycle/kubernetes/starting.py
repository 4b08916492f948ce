"""Why a workspace is not up yet, in the cluster's own words, and when to stop waiting for it.

Like kubespawner's progress: every Event the scheduler, the kubelet or the volume provisioner writes about this
wake's pod or home PVC becomes one line on the waiting page ("Scheduling — 0/3 nodes are available: 3
Insufficient memory"). :func:`judge` (pure) ends a start that cannot succeed, with the cluster's words too:

| observed                                             | gives up                  |
|------------------------------------------------------|---------------------------|
| pod ``Failed``, CrashLoopBackOff, a bad image name…  | at once                   |
| home PVC still ``Pending``                           | after ``bind_timeout``    |
| pod ``PodScheduled=False`` (Unschedulable)           | after ``unschedulable_grace`` |
| ErrImagePull / ImagePullBackOff                      | after ``image_pull_grace`` (one failed pull may be transient) |
| not Ready                                            | at ``start_timeout`` (the runtime's deadline) |

A grace counts from when the condition was first seen *continuously*: an image pull that fails once and then
works starts the clock again the next time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.lifecycle.kubernetes import phases
from gateway.lifecycle.kubernetes.client import EVENT, KubeClient, KubeError

log = logging.getLogger(__name__)
Obj = Mapping[str, Any]

# Event reason -> how the waiting page names the step it is about.
STEPS = {
    "FailedScheduling": "Scheduling", "Scheduled": "Scheduled", "Pulling": "Pulling image",
    "Pulled": "Image pulled", "Failed": "Failed", "BackOff": "Back-off", "Created": "Container created",
    "Started": "Container started", "Unhealthy": "Not ready yet", "Killing": "Stopping",
    "Provisioning": "Provisioning the home volume", "ProvisioningSucceeded": "Home volume provisioned",
    "ProvisioningFailed": "Home volume provisioning failed", "ExternalProvisioning": "Waiting for the provisioner",
    "WaitForFirstConsumer": "Home volume waits for the pod", "FailedMount": "Mounting the home volume",
    "FailedAttachVolume": "Attaching the home volume", "SuccessfulAttachVolume": "Home volume attached",
}
PULLING = frozenset({"ErrImagePull", "ImagePullBackOff"})


def describe(event: Obj) -> str:
    reason = str(event.get("reason") or "")
    return f"{STEPS.get(reason, reason)} — {event.get('message') or ''}".strip(" —")


@dataclass(frozen=True, slots=True)
class Graces:
    unschedulable: float
    bind: float
    image_pull: float


def _waiting(pod: Obj) -> tuple[str, str]:
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in PULLING:
            return str(waiting["reason"]), str(waiting.get("message") or "")
    return "", ""


def _unschedulable(pod: Obj) -> str | None:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if (condition.get("type") == "PodScheduled" and condition.get("status") == "False"
                and condition.get("reason") == "Unschedulable"):
            return str(condition.get("message") or "no node can run the workspace")
    return None


@dataclass
class Judge:
    """Remembers since when each blocking condition holds; one per wake."""

    graces: Graces
    since: dict[str, float] = field(default_factory=dict)
    warnings: dict[str, str] = field(default_factory=dict)  # object name -> the message of its last Warning event

    def __call__(self, pod: Obj, pvc: Obj | None, now: float) -> tuple[str | None, float | None]:
        """(why this start cannot succeed, or None; when to look again even if nothing changes)."""
        if not phases.deleting(pod):  # the end of a pod going away is not this start's failure
            failure = phases.pod_failure(pod)
            if failure is not None:
                return failure, None
        held: dict[str, tuple[float, str]] = {}
        if pvc is not None and (pvc.get("status") or {}).get("phase", "Pending") == "Pending":
            name = str(pvc["metadata"]["name"])
            held["bind"] = (self.graces.bind, "the home volume was not provisioned within "
                            f"{self.graces.bind:g} s: {self.warnings.get(name, 'the claim is still Pending')}")
        elif (message := _unschedulable(pod)) is not None:
            held["unschedulable"] = (self.graces.unschedulable, f"Scheduling — {message}")
        reason, message = _waiting(pod)
        if reason:  # the kubelet's Warning says why ("Back-off pulling image" does not)
            detail = self.warnings.get(str(pod["metadata"]["name"])) or message or reason
            held["pull"] = (self.graces.image_pull, f"Image pull failed — {detail}")
        for key in list(self.since):
            if key not in held:
                del self.since[key]  # it cleared: a later occurrence starts its grace again
        recheck = None
        for key, (grace, message) in held.items():
            first = self.since.setdefault(key, now)
            if now - first >= grace:
                return message, None
            recheck = first + grace if recheck is None else min(recheck, first + grace)
        return None, recheck


class EventFeed:
    """Follows the Events about some objects (by name) from now on, handing each to ``on_event``.

    Best effort: an explanation that cannot be read never fails the wake it explains.
    """

    def __init__(self, client: KubeClient, names: list[str], on_event: Callable[[Obj], None], *,
                 watch_timeout: int = 300) -> None:
        self.client = client
        self.names = names
        self.on_event = on_event
        self.watch_timeout = watch_timeout
        self._tasks: list[asyncio.Task[None]] = []
        self._seen: set[tuple[str, str, object]] = set()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._follow(name), name=f"events-{name}") for name in self.names]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _hand(self, event: Obj) -> None:
        meta = event.get("metadata") or {}
        key = (str(meta.get("name")), str(meta.get("resourceVersion")), event.get("count"))
        if key not in self._seen:
            self._seen.add(key)
            self.on_event(event)

    async def _follow(self, name: str) -> None:
        selector = f"involvedObject.name={name}"
        version: str | None = None
        for _ in range(5):
            try:
                if version is None:
                    listing = await self.client.list(EVENT, field_selector=selector)
                    version = str((listing.get("metadata") or {}).get("resourceVersion") or "0")
                    for event in listing["items"]:
                        self._hand(event)  # the caller tells old objects' events from this wake's by UID
                async with self.client.watch(EVENT, version, field_selector=selector,
                                             timeout_seconds=self.watch_timeout) as events:
                    async for change in events:
                        obj = change.get("object") or {}
                        version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                        if change.get("type") in ("ADDED", "MODIFIED"):
                            self._hand(obj)
            except KubeError as exc:
                log.info("events of %s not readable (%s); the waiting page explains less", name, exc)
                version = None
            await asyncio.sleep(0.2)

"""What this replica knows about the cluster: the four caches, and each workspace's state derived from them.

Every change a cache sees re-derives the workspace's state (``phases.observe``, overridden by an operation in
flight here) and publishes an Event when the phase moved; waiters are woken by the same change, so nothing
polls. Reads never touch the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gateway.config import Kubernetes
from gateway.errors import NotFound
from gateway.lifecycle.base import Event, EventHub, LifecycleError, Phase, WorkspaceState
from gateway.lifecycle.kubernetes import phases
from gateway.lifecycle.kubernetes.client import (
    POD,
    PVC,
    SNAPSHOT,
    WORKSPACE,
    KubeClient,
    KubeError,
    Resource,
    unavailable,
)
from gateway.lifecycle.kubernetes.informer import Informers
from gateway.lifecycle.kubernetes.objects import (
    SELECTOR,
    WORKSPACE_LABEL,
    WorkspaceResource,
    belongs,
    owners,
    parse_workspace,
    pod_name,
    pvc_name,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
Obj = dict[str, Any]


@dataclass
class Slot:
    """Per-workspace bookkeeping on this replica: the lock that serialises its operations, the last state."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    in_flight: Phase | None = None
    state: WorkspaceState | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class ClusterView:
    """Registers its kinds in the runtime's ``informers``; the runtime starts and stops them."""

    def __init__(self, settings: Kubernetes, hub: EventHub, informers: Informers) -> None:
        self.settings = settings
        self.hub = hub
        self.informers = informers
        self.kinds: list[Resource] = []
        self.slots: dict[str, Slot] = {}
        self.snapshots_enabled = True
        for kind, selector in ((WORKSPACE, None), (POD, SELECTOR), (PVC, SELECTOR)):
            self._register(kind, selector)

    def _register(self, kind: Resource, selector: str | None) -> None:
        self.informers.register(kind, self._on_change(kind), label_selector=selector)
        self.kinds.append(kind)

    async def watch_snapshots(self, client: KubeClient) -> None:
        """Cache VolumeSnapshots too if the cluster serves them (the CSI snapshot CRDs are optional, and so is
        COLD); once, before the informers start."""
        self.snapshots_enabled = await self._snapshot_api(client)
        if self.snapshots_enabled:
            self._register(SNAPSHOT, SELECTOR)

    async def _snapshot_api(self, client: KubeClient) -> bool:
        try:
            await client.request("GET", SNAPSHOT.path(self.settings.namespace), query={"limit": "1"})
        except KubeError as exc:
            if exc.status != 404:
                return True  # the API is unwell, not missing the kind: the informer retries and reports it
            log.warning("The VolumeSnapshot API (%s/%s) is not installed: COLD is disabled, idle workspaces "
                        "sleep WARM (pod stopped, home kept). Install the CSI snapshot CRDs and restart to "
                        "enable it.", SNAPSHOT.group, SNAPSHOT.version)
            return False
        return True

    @property
    def healthy(self) -> bool:
        """Whether this view's own caches watch (the token store's kinds in the same registry do not count)."""
        return self.informers.healthy(self.kinds)

    def require_api(self, kinds: Iterable[Resource] = (WORKSPACE, POD, PVC)) -> None:
        """An operation refuses clearly while a cache it decides from is cut off from the API; the others
        may be unwell (a lost snapshot watch does not stop wakes from WARM)."""
        lost = [self.informers[kind] for kind in kinds if kind in self.informers and not self.informers[kind].healthy]
        if lost or not self.informers:
            detail = f"{lost[0].kind.plural}: {lost[0].error}" if lost else "not started"
            raise unavailable(KubeError(0, "watch lost", detail))

    # -- reading --

    def _on_change(self, kind: Resource) -> Callable[[str, Obj], None]:
        def changed(_type: str, obj: Obj) -> None:
            meta = obj.get("metadata") or {}
            workspace = meta.get("name") if kind is WORKSPACE else (meta.get("labels") or {}).get(WORKSPACE_LABEL)
            if workspace:
                self.refresh(str(workspace))
        return changed

    def slot(self, workspace: str) -> Slot:
        return self.slots.setdefault(workspace, Slot())

    def cached(self, kind: Resource, name: str) -> Obj | None:
        informer = self.informers.get(kind)
        return informer.get(name) if informer is not None else None

    def uid(self, workspace: str) -> str:
        obj = self.cached(WORKSPACE, workspace)
        return str((obj.get("metadata") or {}).get("uid") or "") if obj is not None else ""

    def created(self, workspace: str) -> str:
        """The Workspace's ``creationTimestamp``: objects without owners made before it are an earlier one's."""
        obj = self.cached(WORKSPACE, workspace)
        return str((obj.get("metadata") or {}).get("creationTimestamp") or "") if obj is not None else ""

    def owned(self, kind: Resource, name: str, workspace: str) -> Obj | None:
        """The cached object if it is this Workspace's; one left by a deleted namesake is not (GC takes it, or,
        made before owners were set, the wake that finds it)."""
        obj = self.cached(kind, name)
        return obj if obj is not None and belongs(obj, self.uid(workspace), self.created(workspace)) else None

    def unowned(self, workspace: str) -> list[tuple[Resource, Obj]]:
        """The workspace's pod, home and snapshots that name no owner (made before owners were set): deleting the
        Workspace does not delete them, so deleting the workspace must."""
        found = [(kind, self.owned(kind, name, workspace)) for kind, name in
                 ((POD, pod_name(workspace)), (PVC, pvc_name(workspace)))]
        found += [(SNAPSHOT, snapshot) for snapshot in self.snapshots(workspace)]
        return [(kind, obj) for kind, obj in found if obj is not None and not owners(obj)]

    def snapshots(self, workspace: str) -> list[Obj]:
        """The workspace's snapshots: labelled for it, and its own (or, without owners, made no earlier than it).

        Not judged by what they were taken of: a snapshot moved from another namespace (the 0.1 upgrade: its
        VolumeSnapshotContent bound again) names no claim at all, and whoever may create VolumeSnapshots here may
        make one of any content (README, "Limits")."""
        informer = self.informers.get(SNAPSHOT)
        uid, since = self.uid(workspace), self.created(workspace)
        return [s for s in (informer.values() if informer else [])
                if (s["metadata"].get("labels") or {}).get(WORKSPACE_LABEL) == workspace and belongs(s, uid, since)]

    def workspace(self, workspace: str) -> Obj | None:
        """The Workspace object, unless it is being deleted (then it is gone for routing, links and wakes)."""
        obj = self.cached(WORKSPACE, workspace)
        return None if phases.deleting(obj) else obj

    def resource(self, workspace: str) -> WorkspaceResource:
        obj = self.workspace(workspace)
        if obj is None:
            raise NotFound(f"There is no workspace called {workspace}.", code="workspace-not-found")
        return parse_workspace(obj)

    def observe(self, workspace: str) -> phases.Observation:
        return phases.observe(self.owned(POD, pod_name(workspace), workspace),
                              self.owned(PVC, pvc_name(workspace), workspace), self.snapshots(workspace))

    def get(self, workspace: str) -> WorkspaceState | None:
        slot = self.slots.get(workspace)
        return slot.state if slot is not None else None

    def states(self) -> list[WorkspaceState]:
        return [slot.state for slot in self.slots.values() if slot.state is not None]

    def refresh(self, workspace: str) -> WorkspaceState | None:
        """Derive the state from the caches; publish an Event when the phase moved; wake waiters."""
        slot = self.slot(workspace)
        obj = self.workspace(workspace)
        previous = slot.state
        if obj is None:
            slot.state = None
        else:
            spec = parse_workspace(obj).spec(self.settings)
            seen = self.observe(workspace)
            phase = slot.in_flight or seen.phase
            address = seen.address if phase is Phase.RUNNING else None
            message = seen.message if phase is seen.phase else ""
            if previous is not None and (previous.phase, previous.address, previous.message, previous.spec) == (
                    phase, address, message, spec):
                slot.state = previous
            else:
                since = previous.since if previous is not None and previous.phase is phase else time.time()
                slot.state = WorkspaceState(spec, phase, address, message, since)
            if previous is None or previous.phase is not phase:
                self.hub.publish(Event(workspace, phase, message))
        slot.notify()
        return slot.state

    # -- operations in flight on this replica --

    def begin(self, workspace: str, phase: Phase) -> None:
        self.slot(workspace).in_flight = phase
        self.refresh(workspace)

    def end(self, workspace: str) -> WorkspaceState:
        self.slot(workspace).in_flight = None
        state = self.refresh(workspace)
        if state is None:
            raise NotFound(f"There is no workspace called {workspace}.", code="workspace-not-found")
        return state

    def explain(self, workspace: str, message: str) -> None:
        """A progress line for whoever waits on the workspace (the waiting page), in its current phase."""
        state = self.get(workspace)
        if state is not None:
            self.hub.publish(Event(workspace, state.phase, message))

    async def wait(self, workspace: str, check: Callable[[], T | None], deadline: float, what: str, *,
                   recheck: Callable[[], float | None] | None = None) -> T:
        """Wait, woken by cache changes, until ``check`` returns something; LifecycleError at the deadline.

        ``recheck`` names a (loop) time to look again without a change: when a grace ``check`` counts runs out.
        """
        slot = self.slot(workspace)
        loop = asyncio.get_running_loop()
        while True:
            changed = slot.changed
            result = check()
            if result is not None:
                return result
            again = recheck() if recheck is not None else None
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), max(0.0, min(remaining, again - loop.time()))
                                           if again is not None else remaining)
            except TimeoutError:
                raise LifecycleError(f"Workspace {workspace}: {what} did not happen in time.",
                                    code="kubernetes-timeout") from None

    async def gone(self, workspace: str, kind: Resource, obj: Mapping[str, Any], deadline: float) -> None:
        """Until the cache holds no longer this very object (by uid), not until its name is empty: a wake on
        another replica may make the next one at once, and a cache that lists again sees the one go and the other
        come in one step."""
        name, uid = str(obj["metadata"]["name"]), obj["metadata"].get("uid")
        await self.wait(workspace, lambda: True if (self.cached(kind, name) or {}).get("metadata", {}).get("uid")
                        != uid else None, deadline, f"removing {kind.kind} {name}")

"""The Kubernetes runtime: Workspaces are custom resources, compute is a pod, the home a PVC, COLD a snapshot.

Reads (``get``/``list``) come only from the caches; every change the caches see re-derives the workspace's
phase (``phases.observe``) and publishes an Event when it moved, so waiting is event-driven, never polled.
Operations are serialised per workspace on this replica; across replicas they are safe because every create
is idempotent (409 = already there) and every delete too (404 = already gone), so a storm of wakes from any
number of gateways makes one pod. The home PVC is deleted only after a snapshot of it is ``readyToUse``.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import ApiClient, Configuration

from gateway.config import Config, Kubernetes
from gateway.errors import Conflict, NotFound
from gateway.lifecycle.base import Event, Phase, Runtime, RuntimeError_, WorkspaceSpec, WorkspaceState
from gateway.lifecycle.kubernetes import phases
from gateway.lifecycle.kubernetes.activity import ActivitySync
from gateway.lifecycle.kubernetes.client import (
    POD,
    PVC,
    SNAPSHOT,
    WORKSPACE,
    Kind,
    KubeClient,
    KubeError,
    retrying,
    unavailable,
)
from gateway.lifecycle.kubernetes.informer import Informer
from gateway.lifecycle.kubernetes.leader import LeaderElector
from gateway.lifecycle.kubernetes.objects import (
    SELECTOR,
    WORKSPACE_LABEL,
    WorkspaceResource,
    make_pod,
    make_pvc,
    make_snapshot,
    make_workspace,
    parse_workspace,
    pod_name,
    pvc_name,
    workspace_status,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
Obj = dict[str, Any]


@dataclass
class _Slot:
    """Per-workspace bookkeeping on this replica: the lock that serialises its operations, the last state."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    in_flight: Phase | None = None
    state: WorkspaceState | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


def default_identity() -> str:
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


class KubernetesRuntime(Runtime):
    def __init__(self, settings: Kubernetes, *, api: ApiClient | None = None, identity: str | None = None,
                 retry_attempts: int = 5) -> None:
        super().__init__()
        self.settings = settings
        self.identity = identity or settings.identity or default_identity()
        self._api = api
        self._owns_api = api is None
        self._attempts = retry_attempts
        self._slots: dict[str, _Slot] = {}
        self.client: KubeClient | None = None
        self.informers: dict[Kind, Informer] = {}
        self.leader: LeaderElector | None = None
        self.activity: ActivitySync | None = None

    @classmethod
    def from_config(cls, config: Config) -> KubernetesRuntime:
        return cls(config.kubernetes)

    # -- lifespan --

    async def _connect(self) -> ApiClient:
        settings = self.settings
        configuration = Configuration()
        if settings.api_url is not None:
            configuration.host = settings.api_url
        elif settings.in_cluster:
            kube_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            path = str(settings.kubeconfig) if settings.kubeconfig else None
            await kube_config.load_kube_config(config_file=path, client_configuration=configuration)
        configuration.connection_pool_maxsize = 64  # five watches stay open; operations need room beside them
        return ApiClient(configuration=configuration)

    async def start(self) -> None:
        if self._api is None:
            self._api = await self._connect()
        settings = self.settings
        self.client = KubeClient(self._api, settings.namespace, timeout=settings.request_timeout)
        for kind, selector in ((WORKSPACE, None), (POD, SELECTOR), (PVC, SELECTOR), (SNAPSHOT, SELECTOR)):
            self.informers[kind] = Informer(self.client, kind, label_selector=selector,
                                            on_change=self._changed_callback(kind),
                                            watch_timeout=settings.watch_timeout)
        self.activity = ActivitySync(self.client, self.informers[WORKSPACE], interval=settings.activity_interval)
        self.leader = LeaderElector(self.client, settings.lease_name, self.identity, duration=settings.lease_duration)
        for informer in self.informers.values():
            informer.start()
        try:
            async with asyncio.timeout(settings.sync_timeout):
                await asyncio.gather(*(informer.synced.wait() for informer in self.informers.values()))
        except TimeoutError:
            errors = "; ".join(f"{i.kind.plural}: {i.error}" for i in self.informers.values() if not i.synced.is_set())
            await self.close()
            raise RuntimeError_(f"Kubernetes API not reachable within {settings.sync_timeout:.0f} s ({errors})",
                                code="kubernetes-unavailable") from None
        self.leader.start()

    async def close(self) -> None:
        if self.leader is not None:
            await self.leader.stop(release=True)
        if self.activity is not None:
            await self.activity.close()
        for informer in self.informers.values():
            await informer.stop()
        if self._owns_api and self._api is not None:
            await self._api.close()
            self._api = None

    # -- reading from memory --

    def _changed_callback(self, kind: Kind) -> Callable[[str, Obj], None]:
        def changed(_type: str, obj: Obj) -> None:
            meta = obj.get("metadata") or {}
            workspace = meta.get("name") if kind is WORKSPACE else (meta.get("labels") or {}).get(WORKSPACE_LABEL)
            if workspace:
                self._refresh(str(workspace))
        return changed

    def _slot(self, workspace: str) -> _Slot:
        return self._slots.setdefault(workspace, _Slot())

    def _cached(self, kind: Kind, name: str) -> Obj | None:
        informer = self.informers.get(kind)
        return informer.get(name) if informer is not None else None

    def _snapshots(self, workspace: str) -> list[Obj]:
        informer = self.informers.get(SNAPSHOT)
        return [s for s in (informer.values() if informer else [])
                if (s["metadata"].get("labels") or {}).get(WORKSPACE_LABEL) == workspace]

    def _resource(self, workspace: str) -> WorkspaceResource:
        obj = self._cached(WORKSPACE, workspace)
        if obj is None:
            raise NotFound(f"There is no workspace called {workspace}.", code="workspace-not-found")
        return parse_workspace(obj)

    def _observe(self, workspace: str) -> phases.Observation:
        return phases.observe(self._cached(POD, pod_name(workspace)), self._cached(PVC, pvc_name(workspace)),
                              self._snapshots(workspace))

    def _refresh(self, workspace: str) -> WorkspaceState | None:
        """Derive the state from the caches; publish an Event when the phase moved; wake waiters."""
        slot = self._slot(workspace)
        obj = self._cached(WORKSPACE, workspace)
        previous = slot.state
        if obj is None:
            slot.state = None
        else:
            spec = parse_workspace(obj).spec(self.settings)
            seen = self._observe(workspace)
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

    def get(self, workspace: str) -> WorkspaceState | None:
        slot = self._slots.get(workspace)
        return slot.state if slot is not None else None

    def list(self) -> list[WorkspaceState]:
        return [slot.state for slot in self._slots.values() if slot.state is not None]

    async def status(self, workspace: str) -> WorkspaceState:
        """The caches are pushed every change, so "observe again" is reading them again."""
        self._resource(workspace)
        state = self._refresh(workspace)
        assert state is not None
        return state

    @property
    def api_healthy(self) -> bool:
        return bool(self.informers) and all(i.healthy for i in self.informers.values())

    def _require_api(self) -> KubeClient:
        if self.client is None:
            raise RuntimeError_("The Kubernetes runtime has not started.", code="kubernetes-unavailable")
        lost = [i for i in self.informers.values() if not i.healthy]
        if lost:
            raise unavailable(KubeError(0, "watch lost", f"{lost[0].kind.plural}: {lost[0].error}"))
        return self.client

    # -- doing --

    async def _call(self, call: Callable[[KubeClient], Any]) -> Any:
        """One API operation with the retry loop around it; a refusal becomes a clear RuntimeError_."""
        client = self._require_api()
        try:
            return await retrying(lambda: call(client), attempts=self._attempts)
        except KubeError as exc:
            raise RuntimeError_(f"Kubernetes refused the operation: {exc.message or exc.reason}",
                                code="kubernetes-refused") from exc

    async def _wait(self, workspace: str, check: Callable[[], T | None], deadline: float, what: str) -> T:
        """Wait, woken by cache changes only, until ``check`` returns something; RuntimeError_ at the deadline."""
        slot = self._slot(workspace)
        loop = asyncio.get_running_loop()
        while True:
            changed = slot.changed
            result = check()
            if result is not None:
                return result
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                raise RuntimeError_(f"Workspace {workspace}: {what} did not happen in time.",
                                    code="kubernetes-timeout") from None

    def _begin(self, workspace: str, phase: Phase) -> None:
        self._slot(workspace).in_flight = phase
        self._refresh(workspace)

    def _end(self, workspace: str) -> WorkspaceState:
        self._slot(workspace).in_flight = None
        state = self._refresh(workspace)
        if state is None:
            raise NotFound(f"There is no workspace called {workspace}.", code="workspace-not-found")
        return state

    async def _gone(self, workspace: str, kind: Kind, name: str, deadline: float) -> None:
        await self._wait(workspace, lambda: True if self._cached(kind, name) is None else None, deadline,
                         f"removing {kind.kind} {name}")

    async def wake(self, workspace: str) -> WorkspaceState:
        ws = self._resource(workspace)
        slot = self._slot(workspace)
        async with slot.lock:
            try:
                return await self._wake(ws)
            finally:
                await self._write_status(workspace, self._end(workspace))

    async def _wake(self, ws: WorkspaceResource) -> WorkspaceState:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.start_timeout
        seen = self._observe(ws.id)
        if seen.phase is Phase.RUNNING:
            return self._end(ws.id)
        self._require_api()
        pod, pvc = pod_name(ws.id), pvc_name(ws.id)
        if seen.phase is Phase.FAILED and self._cached(POD, pod) is not None:
            await self._call(lambda c: c.delete(POD, pod))  # a failed pod is replaced, not waited on
        if phases.deleting(self._cached(POD, pod)) or seen.phase is Phase.FAILED:
            await self._gone(ws.id, POD, pod, deadline)
        if phases.deleting(self._cached(PVC, pvc)):
            await self._gone(ws.id, PVC, pvc, deadline)  # an archive elsewhere is finishing: restore after it
        if self._cached(PVC, pvc) is None:
            snapshots = self._snapshots(ws.id)
            ready = phases.newest_first(snapshots)
            if ready:
                self._begin(ws.id, Phase.RESTORING)
                source = str(ready[0]["metadata"]["name"])
                await self._call(lambda c: c.create(PVC, make_pvc(ws, self.settings, restore_from_snapshot=source)))
            elif snapshots:
                raise RuntimeError_(f"Workspace {ws.id} has snapshots but none is ready to restore; its data is "
                                    "not lost, but it cannot start until one is.", code="snapshot-not-ready")
            else:
                await self._call(lambda c: c.create(PVC, make_pvc(ws, self.settings)))
        self._begin(ws.id, Phase.STARTING)
        await self._call(lambda c: c.create(POD, make_pod(ws, self.settings)))

        def started() -> phases.Observation | None:
            if self._cached(POD, pod) is None and self._cached(WORKSPACE, ws.id) is not None:
                return None  # not in the cache yet (or removed meanwhile: the deadline tells)
            seen = self._observe(ws.id)
            return seen if seen.phase in (Phase.RUNNING, Phase.FAILED, Phase.STOPPING) else None

        seen = await self._wait(ws.id, started, deadline, "the pod becoming ready")
        if seen.phase is Phase.FAILED:
            log.error("workspace %s failed to start: %s", ws.id, seen.message)
        return self._end(ws.id)

    async def stop(self, workspace: str) -> WorkspaceState:
        self._resource(workspace)
        slot = self._slot(workspace)
        async with slot.lock:
            self._require_api()  # even with no pod in the cache: a cache cut off from the API may be stale
            try:
                pod = pod_name(workspace)
                if self._cached(POD, pod) is not None:
                    self._begin(workspace, Phase.STOPPING)
                    await self._call(lambda c: c.delete(POD, pod))
                    deadline = asyncio.get_running_loop().time() + self.settings.start_timeout
                    await self._gone(workspace, POD, pod, deadline)
            finally:
                state = self._end(workspace)
            await self._write_status(workspace, state)
            return state

    async def archive(self, workspace: str) -> WorkspaceState:
        await self.stop(workspace)
        slot = self._slot(workspace)
        async with slot.lock:
            self._require_api()
            pvc = pvc_name(workspace)
            if self._cached(PVC, pvc) is None or self._cached(POD, pod_name(workspace)) is not None:
                return self._end(workspace)  # already COLD, or woken again meanwhile
            try:
                await self._archive(workspace, pvc)
            except RuntimeError_ as exc:
                log.error("archive of %s failed, its volume is kept: %s", workspace, exc.message)
                raise RuntimeError_(f"Archiving {workspace} failed; its volume is untouched. {exc.message}",
                                    code=exc.code) from exc
            finally:
                state = self._end(workspace)
            await self._write_status(workspace, state)
            return state

    async def _archive(self, workspace: str, pvc: str) -> None:
        self._begin(workspace, Phase.ARCHIVING)
        deadline = asyncio.get_running_loop().time() + self.settings.snapshot_timeout
        body = make_snapshot(workspace, self.settings, datetime.datetime.now(tz=datetime.UTC))
        name = str(body["metadata"]["name"])
        await self._call(lambda c: c.create(SNAPSHOT, body))

        def settled() -> Obj | None:
            snapshot = self._cached(SNAPSHOT, name)
            if snapshot is not None and (phases.snapshot_ready(snapshot) or phases.snapshot_error(snapshot)):
                return snapshot
            return None

        snapshot = await self._wait(workspace, settled, deadline, f"snapshot {name} becoming ready")
        if not phases.snapshot_ready(snapshot):
            raise RuntimeError_(f"snapshot {name} failed: {phases.snapshot_error(snapshot)}", code="snapshot-failed")
        if self._cached(POD, pod_name(workspace)) is not None:
            log.info("workspace %s was woken while archiving; keeping its volume", workspace)
            return
        # Only now, with a ready snapshot of it, may the volume go.
        await self._call(lambda c: c.delete(PVC, pvc))
        await self._gone(workspace, PVC, pvc, deadline)
        for old in phases.prunable(self._snapshots(workspace), self.settings.keep_snapshots):
            await self._prune(workspace, old)

    async def _prune(self, workspace: str, snapshot: str) -> None:
        """Older snapshots go only after a newer one is ready (``phases.prunable`` never names the newest)."""
        try:
            await self._call(lambda c: c.delete(SNAPSHOT, snapshot))
        except RuntimeError_ as exc:
            log.warning("could not prune snapshot %s of %s: %s", snapshot, workspace, exc.message)

    async def _write_status(self, workspace: str, state: WorkspaceState) -> None:
        """Tell people reading the Workspace (kubectl, other tools) what this replica last saw.

        Best effort and a single attempt: the phase is always derived from observed objects, never read back.
        """
        if self.client is None or not self.api_healthy:
            return
        patch = {"status": workspace_status(state.phase.value, pod_ip=state.address, message=state.message,
                                            at=datetime.datetime.fromtimestamp(state.since, tz=datetime.UTC))}
        try:
            await self.client.patch(WORKSPACE, workspace, patch, subresource="status")
        except KubeError as exc:
            log.info("could not write the status of %s: %s", workspace, exc)

    # -- the Workspace resources --

    async def create_workspace(self, spec: WorkspaceSpec, *, image: str | None = None, storage: str | None = None,
                               resources: Mapping[str, Mapping[str, str]] | None = None) -> WorkspaceState:
        """Create the Workspace resource (idempotent for the same owner); 409 Conflict if someone else owns it."""
        ws = WorkspaceResource(id=spec.id, owner=spec.owner, collaborators=spec.collaborators, ports=spec.ports,
                               image=image, ide_port=spec.ide_port if spec.ide_port != self.settings.ide_port else None,
                               storage=storage, resources=resources)
        created = await self._call(lambda c: c.create(WORKSPACE, make_workspace(ws)))
        if created is None:
            existing = await self._call(lambda c: c.get(WORKSPACE, spec.id))
            if existing is None or parse_workspace(existing).owner != spec.owner:
                raise Conflict(f"A workspace called {spec.id} already exists.", code="workspace-exists")
            created = existing
        return await self._until_cached(spec.id, created)

    async def update(self, workspace: str, *, ports: Mapping[int, str] | None = None,
                     collaborators: tuple[str, ...] | None = None) -> WorkspaceState:
        current = self._resource(workspace)
        spec: dict[str, Any] = {}
        if ports is not None:
            spec["ports"] = {**{str(p): None for p in current.ports if p not in ports},
                             **{str(p): visibility for p, visibility in ports.items()}}
        if collaborators is not None:
            spec["collaborators"] = list(collaborators)
        if not spec:
            return await self.status(workspace)
        patched = await self._call(lambda c: c.patch(WORKSPACE, workspace, {"spec": spec}))
        return await self._until_cached(workspace, patched)

    async def _until_cached(self, workspace: str, written: Obj) -> WorkspaceState:
        """Return once the cache holds what we wrote (or something newer), so callers read their own write."""
        deadline = asyncio.get_running_loop().time() + self.settings.request_timeout

        def caught_up() -> WorkspaceState | None:
            cached = self._cached(WORKSPACE, workspace)
            if cached is None or cached.get("spec") != written.get("spec"):
                return None
            return self.get(workspace)

        try:
            return await self._wait(workspace, caught_up, deadline, "the cache catching up")
        except RuntimeError_:  # the watch lags: answer from what the API said
            state = self.get(workspace)
            spec = parse_workspace(written).spec(self.settings)
            return replace(state, spec=spec) if state is not None else WorkspaceState(spec, Phase.WARM)

    # -- activity and leadership --

    def record_activity(self, workspace: str, at: float) -> None:
        if self.activity is not None:
            self.activity.record(workspace, at)

    def last_activity(self, workspace: str) -> float | None:
        return self.activity.last(workspace) if self.activity is not None else None

    def is_leader(self) -> bool:
        return self.leader is not None and self.leader.is_leader()

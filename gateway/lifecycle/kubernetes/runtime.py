"""The Kubernetes runtime: Workspaces are custom resources, compute is a pod, the home a PVC, COLD a snapshot.

Reads (``get``/``list``) come only from the caches; every change the caches see re-derives the workspace's
phase (``phases.observe``) and publishes an Event when it moved, so waiting is event-driven, never polled.
Operations are serialised per workspace on this replica; across replicas they are safe because every create
is idempotent (409 = already there) and every delete too (404 = already gone), so a storm of wakes from any
number of gateways makes one pod. The home PVC is deleted only after a snapshot of it is ``readyToUse``.
Everything made for a workspace points at its Workspace by UID (ownerReferences): deleting the Workspace deletes
it all, and a pod or PVC still named for a deleted namesake is removed, never reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from kubernetes_asyncio.client import ApiClient

from gateway.auth.ide import ide_secret, load_key
from gateway.config import Config, Kubernetes
from gateway.errors import BadRequest, Conflict, NotFound
from gateway.lifecycle.base import LifecycleError, Phase, Runtime, WorkspaceSpec, WorkspaceState
from gateway.lifecycle.kubernetes import intent, phases
from gateway.lifecycle.kubernetes.activity import ActivitySync
from gateway.lifecycle.kubernetes.client import (
    POD,
    PVC,
    SNAPSHOT,
    WORKSPACE,
    KubeClient,
    KubeError,
    Resource,
    connect,
    retrying,
)
from gateway.lifecycle.kubernetes.informer import Informers
from gateway.lifecycle.kubernetes.leader import LeaderElector
from gateway.lifecycle.kubernetes.objects import (
    WorkspaceResource,
    belongs,
    make_pod,
    make_pvc,
    make_snapshot,
    make_workspace,
    owners,
    parse_time,
    parse_workspace,
    pod_name,
    pvc_name,
    workspace_status,
)
from gateway.lifecycle.kubernetes.starting import EventFeed, Graces, Judge, describe
from gateway.lifecycle.kubernetes.throttle import Throttle
from gateway.lifecycle.kubernetes.view import ClusterView

log = logging.getLogger(__name__)
Obj = dict[str, Any]
MAX_FEEDS = 16
MAKE_AGAIN = 0.5  # s between creates (four API calls) while a namesake's leftover the cache never showed goes


def default_identity() -> str:
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


class KubernetesRuntime(Runtime):
    def __init__(self, settings: Kubernetes, *, api: ApiClient | None = None, identity: str | None = None,
                 retry_attempts: int = 5, proxy_uri: Callable[[str], str] | None = None) -> None:
        super().__init__()
        self.settings = settings
        self._proxy_uri = proxy_uri
        self.identity = identity or settings.identity or default_identity()
        self._api = api
        self._owns_api = api is None
        self._attempts = retry_attempts
        self.informers = Informers(watch_timeout=settings.watch_timeout)  # the view's kinds and the token store's
        self.view = ClusterView(settings, self.hub, self.informers)
        self.client: KubeClient | None = None
        self.leader: LeaderElector | None = None
        self.activity: ActivitySync | None = None
        self._ide_key = load_key(settings.ide_key_file) if settings.ide_key_file is not None else None
        self._feeds = 0  # wakes following their Events right now

    @classmethod
    def from_config(cls, config: Config) -> KubernetesRuntime:
        return cls(config.kubernetes, proxy_uri=config.proxy_uri)

    # -- lifespan --

    async def start(self) -> None:
        if self._api is None:
            self._api = await connect(self.settings)
        settings = self.settings
        self.client = KubeClient(self._api, settings.namespace, timeout=settings.request_timeout,
                                 throttle=Throttle(settings.api_qps, settings.api_burst, settings.api_concurrency),
                                 page_size=settings.list_page_size)
        self.activity = ActivitySync(self.client, lambda name: self.view.cached(WORKSPACE, name),
                                     interval=settings.activity_interval)
        self.leader = LeaderElector(self.client, settings.lease_name, self.identity, duration=settings.lease_duration)
        try:
            await self.view.watch_snapshots(self.client)
            await self.informers.start(self.client, sync_timeout=settings.sync_timeout)
        except LifecycleError:
            await self.close()
            raise
        self.leader.start()

    async def close(self) -> None:
        if self.leader is not None:
            await self.leader.stop(release=True)
        if self.activity is not None:
            await self.activity.close()
        await self.informers.stop()
        if self._owns_api and self._api is not None:
            await self._api.close()
            self._api = None

    # -- reading from memory --

    @property
    def api_healthy(self) -> bool:
        return self.view.healthy

    def not_ready(self) -> str | None:
        """Every cache counts, the token store's too: a replica that cannot see share links is as stale."""
        return self.informers.not_ready(self.settings.ready_grace)

    def get(self, workspace: str) -> WorkspaceState | None:
        return self.view.get(workspace)

    def list(self) -> list[WorkspaceState]:
        return self.view.states()

    async def status(self, workspace: str) -> WorkspaceState:
        """The caches are pushed every change, so "observe again" is reading them again."""
        self.view.resource(workspace)
        state = self.view.refresh(workspace)
        assert state is not None
        return state

    def _ide_secret(self, ws: WorkspaceResource) -> str | None:
        return ide_secret(self._ide_key, ws.id, ws.uid) if self._ide_key is not None else None

    def _require_api(self, *kinds: Resource) -> KubeClient:
        """The client, if the caches this operation decides from (default: Workspaces, pods, PVCs) are live."""
        if self.client is None:
            raise LifecycleError("The Kubernetes runtime has not started.", code="kubernetes-unavailable")
        self.view.require_api(kinds or (WORKSPACE, POD, PVC))
        return self.client

    def features(self) -> dict[str, bool]:
        return {"cold": self.view.snapshots_enabled, "create": True}

    # -- doing --

    async def _swap(self, workspace: str, decide: Callable[[str | None], str | None]) -> tuple[bool, str | None]:
        """``intent.swap`` with this runtime's attempts, as every other call of it gets."""
        return await intent.swap(self._require_api(), workspace, decide, attempts=self._attempts)

    async def _call(self, call: Callable[[KubeClient], Any]) -> Any:
        """One API operation with the retry loop around it; a refusal becomes a clear LifecycleError."""
        client = self._require_api()
        try:
            return await retrying(lambda: call(client), attempts=self._attempts)
        except KubeError as exc:
            raise LifecycleError(f"Kubernetes refused the operation: {exc.message or exc.reason}",
                                code="kubernetes-refused") from exc

    def _still(self, workspace: str, uid: str) -> None:
        """After waiting for the workspace's lock: an operation asked for one Workspace goes on only if its name
        still holds that one. Deleted meanwhile and made again by someone else (through another replica, while an
        operation here held the lock), it is another workspace, whose pod and home the asker's would take for a
        deleted namesake's leftovers and delete."""
        if self.view.workspace(workspace) is None or self.view.uid(workspace) != uid:
            raise NotFound(f"There is no workspace called {workspace}.", code="workspace-not-found")

    async def wake(self, workspace: str) -> WorkspaceState:
        ws = self.view.resource(workspace)
        slot = self.view.slot(workspace)
        async with slot.lock:
            self._still(workspace, ws.uid)
            try:
                return await self._wake(ws)
            finally:
                await self._write_status(workspace, self.view.end(workspace))

    async def _wake(self, ws: WorkspaceResource) -> WorkspaceState:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.start_timeout
        seen = self.view.observe(ws.id)
        if seen.phase is Phase.RUNNING:
            return self.view.end(ws.id)
        client = self._require_api()
        pod, pvc = pod_name(ws.id), pvc_name(ws.id)
        for kind, name in ((POD, pod), (PVC, pvc)):
            await self._remove_foreign(ws, kind, self.view.cached(kind, name), deadline)
        await self._claim_home(ws, deadline)
        settings = self.settings
        judge = Judge(Graces(settings.unschedulable_grace, settings.bind_timeout, settings.image_pull_grace))
        began = time.time()
        feed = None
        if self._feeds < MAX_FEEDS:  # two watches each: a wake storm does not open a thousand
            feed = EventFeed(client, [pod, pvc], lambda event: self._explain(ws.id, event, judge, began),
                             watch_timeout=settings.watch_timeout)
            feed.start()
            self._feeds += 1
        try:
            return await self._start(ws, seen, judge, deadline)
        finally:
            if feed is not None:
                self._feeds -= 1
                await feed.stop()

    async def _start(self, ws: WorkspaceResource, seen: phases.Observation, judge: Judge,
                     deadline: float) -> WorkspaceState:
        pod, pvc = pod_name(ws.id), pvc_name(ws.id)
        old = self.view.owned(POD, pod, ws.id)
        if old is not None and seen.phase is Phase.FAILED:
            await self._delete(POD, old)  # a failed pod is replaced, not waited on
        if old is not None and (phases.deleting(old) or seen.phase is Phase.FAILED):
            await self.view.gone(ws.id, POD, old, deadline)
        home = self.view.owned(PVC, pvc, ws.id)
        if home is not None and phases.deleting(home):
            await self.view.gone(ws.id, PVC, home, deadline)  # an archive elsewhere is finishing: restore after it
        if self.view.owned(PVC, pvc, ws.id) is None:
            if self.view.snapshots_enabled:  # whether to restore is decided from the snapshot cache: it must be live
                self._require_api(WORKSPACE, POD, PVC, SNAPSHOT)
            snapshots = self.view.snapshots(ws.id)
            ready = phases.newest_first(snapshots)
            if ready:
                self.view.begin(ws.id, Phase.RESTORING)
                source = str(ready[0]["metadata"]["name"])
                self.view.explain(ws.id, f"Restoring the home volume from snapshot {source}")
                await self._make(ws, PVC, make_pvc(ws, self.settings, restore_from_snapshot=source), deadline)
            elif snapshots:
                raise LifecycleError(f"Workspace {ws.id} has snapshots but none is ready to restore; its data is "
                                    "not lost, but it cannot start until one is.", code="snapshot-not-ready")
            else:
                await self._make(ws, PVC, make_pvc(ws, self.settings), deadline)
        self.view.begin(ws.id, Phase.STARTING)
        proxy_uri = self._proxy_uri(ws.id) if self._proxy_uri is not None else None
        made = await self._make(ws, POD, make_pod(ws, self.settings, self._ide_secret(ws), proxy_uri), deadline)
        loop = asyncio.get_running_loop()
        look_again: list[float | None] = [None]

        def started() -> phases.Observation | None:
            found = self.view.owned(POD, pod, ws.id)
            if self.view.workspace(ws.id) is None:
                return phases.Observation(Phase.STOPPING)  # deleted meanwhile: end() says so
            if found is None:
                return None  # not in the cache yet
            seen = self.view.observe(ws.id)
            if seen.phase in (Phase.RUNNING, Phase.STOPPING):
                return seen
            failure, look_again[0] = judge(found, self.view.owned(PVC, pvc, ws.id), loop.time())
            return phases.Observation(Phase.FAILED, message=failure) if failure is not None else None

        try:
            seen = await self.view.wait(ws.id, started, deadline, "the pod becoming ready",
                                        recheck=lambda: look_again[0])
        except LifecycleError as exc:
            if exc.code != "kubernetes-timeout":
                raise
            last = judge.warnings.get(pod)
            seen = phases.Observation(Phase.FAILED, message=f"it did not become ready within "
                                      f"{self.settings.start_timeout:g} s" + (f" ({last})" if last else ""))
        if seen.phase is Phase.FAILED:
            log.error("workspace %s failed to start: %s", ws.id, seen.message)
            self.view.explain(ws.id, seen.message)
            with contextlib.suppress(LifecycleError):  # a failed pod is not left behind (nor its quota used), also
                await self._delete(POD, made)  # one the cache never showed (its watch silent)
            raise LifecycleError(f"Workspace {ws.id} could not start: {seen.message}", code="workspace-start-failed")
        return self.view.end(ws.id)

    def _explain(self, workspace: str, event: Mapping[str, Any], judge: Judge, began: float) -> None:
        """One Event about this wake's pod or PVC as a progress line; an older namesake's are left out."""
        involved = event.get("involvedObject") or {}
        kind = {"Pod": POD, "PersistentVolumeClaim": PVC}.get(str(involved.get("kind")))
        name = str(involved.get("name") or "")
        if kind is None:
            return
        current = self.view.owned(kind, name, workspace)
        if current is not None:
            if current["metadata"].get("uid") != involved.get("uid"):
                return
        else:
            when = parse_time(event.get("lastTimestamp") or event.get("eventTime"))
            if when is None or when.timestamp() < began - 1:
                return
        text = describe(event)
        if event.get("type") == "Warning":
            judge.warnings[name] = str(event.get("message") or text)
        self.view.explain(workspace, text)

    async def _claim_home(self, ws: WorkspaceResource, deadline: float) -> None:
        """Mark the home in use (guarded by resourceVersion) before a pod is made for it: an archive that has not
        committed yet will keep the volume; one that has is finished here first, then the home is restored."""
        pvc = pvc_name(ws.id)
        while True:
            written, found = await self._swap(ws.id, lambda v: intent.KEEP if intent.kind_of(v) == "deleting"
                                              and self.view.owned(PVC, pvc, ws.id) is not None
                                              else intent.token("awake", self.identity))
            if written:
                return
            log.info("%s: its volume is being deleted after a snapshot (%s); restoring after that", ws.id, found)
            home = self.view.owned(PVC, pvc, ws.id)
            assert home is not None, "KEEP is decided only while the cache holds it, and swap returns on it at once"
            await self._delete(PVC, home)  # finishes a crashed archiver's work
            await self.view.gone(ws.id, PVC, home, deadline)

    async def _make(self, ws: WorkspaceResource, kind: Resource, body: Mapping[str, Any],
                    deadline: float) -> Mapping[str, Any]:
        """Create the pod or the home; the one made, or taken. One of the name already there (409) is taken for
        this Workspace's only if the API says so: the cache may never have shown a deleted namesake's (its watch
        silent for minutes), whose home would be mounted in the new owner's pod. That one goes, and ours is made."""
        name = str(body["metadata"]["name"])
        loop = asyncio.get_running_loop()
        while True:
            made: Mapping[str, Any] | None = await self._call(lambda c: c.create(kind, body))
            if made is not None:
                return made
            found: Mapping[str, Any] | None = await self._call(lambda c: c.get(kind, name))
            if found is not None and belongs(found, ws.uid, self.view.created(ws.id)):
                return found
            await self._remove_foreign(ws, kind, found, deadline)
            if loop.time() >= deadline:
                raise LifecycleError(f"Workspace {ws.id}: removing the old {kind.kind} {name} did not happen in "
                                     "time.", code="kubernetes-timeout")
            await asyncio.sleep(MAKE_AGAIN)

    async def _remove_foreign(self, ws: WorkspaceResource, kind: Resource, found: Mapping[str, Any] | None,
                              deadline: float) -> None:
        """A pod or PVC under our name but owned by a deleted namesake goes first (GC may not have got to it).

        One that names no owner and is older than this Workspace (made before owners were set, and left when its
        Workspace was deleted past the gateway) is neither mounted nor deleted: it may be a home an operator
        moved here before recreating its Workspace, and only they can tell whose it is."""
        if found is None or belongs(found, ws.uid, self.view.created(ws.id)):
            return
        name = str(found["metadata"]["name"])
        if not owners(found):
            raise LifecycleError(f"Workspace {ws.id} cannot start: the {kind.kind} {name} is older than it and names "
                                 "no owner (an earlier workspace's of this name, from before owners were set). An "
                                 "operator deletes it, or makes this Workspace its owner to keep it.",
                                 code="workspace-name-in-use")
        # Asked of the API, not the cache: a cache that missed the name passing to someone else (a watch whose
        # connection died without a word looks open for minutes) takes the new owner's pod and home for leftovers.
        holder = await self._call(lambda c: c.get(WORKSPACE, ws.id))
        if holder is None or phases.deleting(holder) or (holder.get("metadata") or {}).get("uid") != ws.uid:
            raise NotFound(f"There is no workspace called {ws.id}.", code="workspace-not-found")
        log.warning("%s %s belongs to a deleted workspace of the same name; removing it", kind.kind, name)
        await self._delete(kind, found)
        await self.view.gone(ws.id, kind, found, deadline)

    async def _delete(self, kind: Resource, obj: Mapping[str, Any]) -> None:
        """Delete that very object (by uid): by the time the request lands, its name may hold the next one — a
        wake's on another replica, or a namesake's the cache has not shown."""
        name, uid = str(obj["metadata"]["name"]), str(obj["metadata"].get("uid") or "")
        await self._call(lambda c: c.delete(kind, name, uid=uid))

    async def stop(self, workspace: str, *, uid: str | None = None) -> WorkspaceState:
        """``uid``: of the Workspace asked for, where the caller looked at it earlier (``archive``)."""
        asked = self.view.resource(workspace).uid if uid is None else uid
        slot = self.view.slot(workspace)
        async with slot.lock:
            self._still(workspace, asked)
            self._require_api()  # even with no pod in the cache: a cache cut off from the API may be stale
            try:
                pod = self.view.owned(POD, pod_name(workspace), workspace)
                if pod is not None:
                    self.view.begin(workspace, Phase.STOPPING)
                    await self._delete(POD, pod)
                    deadline = asyncio.get_running_loop().time() + self.settings.start_timeout
                    await self.view.gone(workspace, POD, pod, deadline)
                    self._still(workspace, asked)  # the wait shows the name's Workspace of now: ours, or none
            finally:
                state = self.view.end(workspace)
            await self._write_status(workspace, state)
            return state

    async def archive(self, workspace: str) -> WorkspaceState:
        if not self.view.snapshots_enabled:
            self.view.resource(workspace)
            raise Conflict("COLD is disabled on this cluster (the VolumeSnapshot API is not installed); the "
                           "workspace can only sleep WARM.", code="cold-disabled")
        self._require_api(WORKSPACE, POD, PVC, SNAPSHOT)
        uid = self.view.resource(workspace).uid
        await self.stop(workspace, uid=uid)
        slot = self.view.slot(workspace)
        async with slot.lock:
            self._still(workspace, uid)
            self._require_api(WORKSPACE, POD, PVC, SNAPSHOT)
            home = self.view.owned(PVC, pvc_name(workspace), workspace)
            if home is None or self.view.owned(POD, pod_name(workspace), workspace) is not None:
                return self.view.end(workspace)  # already COLD, or woken again meanwhile
            try:
                await self._archive(workspace, home)
            except LifecycleError as exc:
                log.error("archive of %s failed, its volume is kept: %s", workspace, exc.message)
                raise LifecycleError(f"Archiving {workspace} failed; its volume is untouched. {exc.message}",
                                    code=exc.code) from exc
            finally:
                state = self.view.end(workspace)
            await self._write_status(workspace, state)
            return state

    async def _archive(self, workspace: str, home: Obj) -> None:
        """Snapshot ``home`` and, once the snapshot is ready and no wake came between, delete that very volume."""
        mine = intent.token("archiving", self.identity)
        stale = self.settings.snapshot_timeout + self.settings.request_timeout  # a crashed archiver's claim
        written, found = await self._swap(workspace, lambda v: intent.KEEP if intent.kind_of(v) in (
            "archiving", "deleting") and intent.age(v) < stale else mine)
        if not written:
            log.info("%s is being archived elsewhere (%s)", workspace, found)
            return
        try:
            committed = await self._snapshot_then_commit(workspace, mine)
        except LifecycleError:
            with contextlib.suppress(LifecycleError, NotFound):  # let the next archive try at once
                await self._swap(workspace, lambda v: None if v == mine else intent.KEEP)
            raise
        if committed is None:
            return
        # Only now, with a ready snapshot of it and no wake since, may the volume go.
        deadline = asyncio.get_running_loop().time() + self.settings.snapshot_timeout
        await self._delete(PVC, home)
        await self.view.gone(workspace, PVC, home, deadline)
        for old in phases.prunable(self.view.snapshots(workspace), self.settings.keep_snapshots):
            await self._prune(workspace, old)
        await self._swap(workspace, lambda v: None if v == committed else intent.KEEP)

    async def _snapshot_then_commit(self, workspace: str, mine: str) -> str | None:
        """Take a ready snapshot, then turn our ``archiving`` into ``deleting``; None when a wake came between."""
        self.view.begin(workspace, Phase.ARCHIVING)
        deadline = asyncio.get_running_loop().time() + self.settings.snapshot_timeout
        body = make_snapshot(self.view.resource(workspace), self.settings, datetime.datetime.now(tz=datetime.UTC))
        name = str(body["metadata"]["name"])
        await self._call(lambda c: c.create(SNAPSHOT, body))

        def settled() -> Obj | None:
            snapshot = self.view.cached(SNAPSHOT, name)
            if snapshot is not None and (phases.snapshot_ready(snapshot) or phases.snapshot_error(snapshot)):
                return snapshot
            return None

        snapshot = await self.view.wait(workspace, settled, deadline, f"snapshot {name} becoming ready")
        if not phases.snapshot_ready(snapshot):
            raise LifecycleError(f"snapshot {name} failed: {phases.snapshot_error(snapshot)}", code="snapshot-failed")
        commit = "deleting/" + mine.split("/", 1)[1]
        written, found = await self._swap(workspace, lambda v: commit if v == mine else intent.KEEP)
        if not written:
            log.info("workspace %s was woken while archiving (%s); keeping its volume", workspace, found)
            return None
        return commit

    async def _prune(self, workspace: str, snapshot: str) -> None:
        """Older snapshots go only after a newer one is ready (``phases.prunable`` never names the newest)."""
        try:
            await self._call(lambda c: c.delete(SNAPSHOT, snapshot))
        except LifecycleError as exc:
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
            if existing is not None and phases.deleting(existing):
                raise Conflict(f"A workspace called {spec.id} is still being deleted; try again shortly.",
                               code="workspace-exists")
            if existing is None or parse_workspace(existing).owner != spec.owner:
                raise Conflict(f"A workspace called {spec.id} already exists.", code="workspace-exists")
            created = existing
        return await self._until_cached(spec.id, created)

    async def create(self, spec: WorkspaceSpec) -> WorkspaceState:
        return await self.create_workspace(spec)

    async def delete(self, workspace: str) -> None:
        """Delete the Workspace and, through the garbage collector, everything it owns: pod, home, snapshots.

        Foreground propagation keeps the Workspace (terminating) until they are gone, so its name cannot be
        taken again while its old home still exists; this returns once the API has accepted the deletion.
        """
        self.view.resource(workspace)
        uid = self.view.uid(workspace)
        unowned = self.view.unowned(workspace)  # the garbage collector deletes only what names an owner
        await self._call(lambda c: c.delete(WORKSPACE, workspace, uid=uid or None, foreground=True))
        for kind, obj in unowned:
            name, made = str(obj["metadata"]["name"]), str(obj["metadata"].get("uid") or "")
            try:
                await self._call(lambda c: c.delete(kind, name, uid=made or None))  # noqa: B023
            except LifecycleError as exc:
                log.warning("could not delete %s %s of the deleted workspace %s: %s", kind.kind, name, workspace,
                            exc.message)
        deadline = asyncio.get_running_loop().time() + self.settings.request_timeout
        with contextlib.suppress(LifecycleError):  # the watch lags: the deletion stands all the same
            await self.view.wait(workspace, lambda: True if self.view.workspace(workspace) is None else None,
                                 deadline, "the cache seeing the deletion")

    async def update(self, workspace: str, *, ports: Mapping[int, str] | None = None,
                     collaborators: tuple[str, ...] | None = None,
                     identity_ports: frozenset[int] | None = None,
                     https_ports: frozenset[int] | None = None,
                     labels: Mapping[int, str] | None = None) -> WorkspaceState:
        """Change the spec as read at one resourceVersion; a 409 (someone wrote since) reads again and redoes it,
        on that Workspace only (by uid): one its name now holds is someone else's (NotFound)."""
        if https_ports:
            raise BadRequest("HTTPS ports are available on the local runtime only; a Workspace resource cannot "
                             "mark them yet.", code="https-ports-unsupported")
        if labels:
            raise BadRequest("Port labels set on the hub are kept by the local runtime only; name ports in the "
                             "workspace's .devcontainer/devcontainer.json instead.", code="labels-unsupported")
        if ports is None and collaborators is None and identity_ports is None:
            return await self.status(workspace)
        obj = self.view.workspace(workspace)
        uid = (obj or {}).get("metadata", {}).get("uid")
        for _ in range(5):
            if obj is None or phases.deleting(obj) or obj["metadata"].get("uid") != uid:
                # Read again after a 409, the name may be another's: deleted and made again meanwhile (another
                # replica served both before this one's cache saw them). The change is for the one checked.
                raise NotFound(f"There is no workspace called {workspace}.", code="workspace-not-found")
            current = parse_workspace(obj)
            spec: dict[str, Any] = {}
            if ports is not None:
                spec["ports"] = {**{str(p): None for p in current.ports if p not in ports},
                                 **{str(p): visibility for p, visibility in ports.items()}}
            if collaborators is not None:
                spec["collaborators"] = list(collaborators)
            if identity_ports is not None:
                spec["identityPorts"] = sorted(identity_ports)
            patch = {"metadata": {"resourceVersion": obj["metadata"].get("resourceVersion")}, "spec": spec}
            try:
                patched = await self._call(lambda c: c.patch(WORKSPACE, workspace, patch))  # noqa: B023
            except LifecycleError as exc:
                if not (isinstance(exc.__cause__, KubeError) and exc.__cause__.status == 409):
                    raise
                obj = await self._call(lambda c: c.get(WORKSPACE, workspace))
                continue
            return await self._until_cached(workspace, patched)
        raise Conflict(f"Workspace {workspace} kept changing; try again.", code="workspace-changed")

    async def _until_cached(self, workspace: str, written: Obj) -> WorkspaceState:
        """Return once the cache holds what we wrote (or something newer), so callers read their own write."""
        deadline = asyncio.get_running_loop().time() + self.settings.request_timeout

        def caught_up() -> WorkspaceState | None:
            cached = self.view.cached(WORKSPACE, workspace)
            if cached is None or cached.get("spec") != written.get("spec"):
                return None
            return self.view.get(workspace)

        try:
            return await self.view.wait(workspace, caught_up, deadline, "the cache catching up")
        except LifecycleError:  # the watch lags: answer from what the API said
            state = self.view.get(workspace)
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

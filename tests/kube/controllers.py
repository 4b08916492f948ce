"""What a cluster's control plane does by itself, played on the emulator's store after every change.

A real API server never deletes a dependent or a terminating pod in the same request that asked for it: the
garbage collector, the kubelet and the volume controllers do it a moment later, and only once their finalizers
allow. Code that assumes "deleted" means "gone" passes against a plain store and fails on a cluster, so the
emulator runs these loops too:

* garbage collection by ``ownerReferences``: an object whose owners are all gone is deleted (background
  propagation); an owner deleted with ``propagationPolicy: Foreground`` keeps a ``foregroundDeletion``
  finalizer until its dependents are gone. ``paused_gc`` holds the collector (a slow cluster).
* graceful pod termination: a deleted pod stays, with ``deletionTimestamp``, for ``pod_termination`` seconds.
* ``kubernetes.io/pvc-protection`` holds a deleted PVC while any pod names it; the snapshot controller's
  finalizer holds a deleted VolumeSnapshot while a PVC is still being restored from it.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import kmock

if TYPE_CHECKING:
    from tests.kube.emulator import KubeEmulator

POD = kmock.resource('', 'v1', 'pods')
PVC = kmock.resource('', 'v1', 'persistentvolumeclaims')
VOLUME_SNAPSHOT = kmock.resource('snapshot.storage.k8s.io', 'v1', 'volumesnapshots')
PVC_PROTECTION = 'kubernetes.io/pvc-protection'
SNAPSHOT_PROTECTION = 'snapshot.storage.kubernetes.io/volumesnapshot-as-source-protection'
FOREGROUND = 'foregroundDeletion'

# Finalizers the API server's admission (or the controllers, at once) put on new objects.
ADMISSION_FINALIZERS = {PVC: [PVC_PROTECTION], VOLUME_SNAPSHOT: [SNAPSHOT_PROTECTION]}


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = obj['metadata']
    return meta


class Controllers:
    def __init__(self, emulator: KubeEmulator) -> None:
        self.emulator = emulator
        self.paused_gc = False
        self.pod_termination = 0.0
        self.collected: list[str] = []  # "kind/name" of everything the garbage collector deleted, in order
        self._terminating: set[str] = set()  # uids of pods whose termination is scheduled
        self._task: asyncio.Task[None] | None = None
        # What the loops look at, kept from the store's change log (``_live``): the uids of every object, and the
        # objects that may need acting on, by key, in the order they came to.
        self._uids: set[Any] = set()
        self._acting: dict[tuple[kmock.resource, str | None, str], dict[str, Any]] = {}
        self._rv = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name='kube-controllers')

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            changed = self.emulator.changed
            self.reconcile()
            await changed.wait()

    def _live(self) -> list[tuple[kmock.resource, dict[str, Any]]]:
        """The objects the loops may act on (with owners or a deletion under way; every pod, PVC and snapshot),
        with ``_uids`` current: followed through the store's change log since the last pass, read whole only when
        the log was compacted past it. Reading every object on every change took 2 s a change with 200,000 share
        links (bench.scale), and the emulated API stalled meanwhile."""
        events = self.emulator.events_after(self._rv) if self._rv else None
        if events is None:
            self._uids.clear()
            self._acting.clear()
            for resource, obj in self.emulator.live_objects():
                self._note(resource, 'ADDED', obj)
        else:
            for event in events:
                self._note(event.resource, event.type, event.object)
        self._rv = self.emulator.resource_version
        return [(key[0], obj) for key, obj in self._acting.items()]

    def _note(self, resource: kmock.resource, type_: str, obj: dict[str, Any]) -> None:
        meta = _meta(obj)
        key = (resource, meta.get('namespace'), meta['name'])
        if type_ == 'DELETED':
            self._uids.discard(meta.get('uid'))
            self._acting.pop(key, None)
            return
        self._uids.add(meta.get('uid'))
        if resource in (POD, PVC, VOLUME_SNAPSHOT) or meta.get('ownerReferences') or meta.get('deletionTimestamp'):
            self._acting[key] = obj
        else:
            self._acting.pop(key, None)

    def reconcile(self) -> None:
        """One pass of every loop; each write it makes triggers the next pass."""
        live = self._live()
        uids = self._uids
        if not self.paused_gc:
            self._collect(live, uids)
        for resource, obj in live:
            meta = _meta(obj)
            if not meta.get('deletionTimestamp'):
                continue
            if resource == POD and not meta.get('finalizers'):
                self._terminate(obj)
            elif resource == PVC and PVC_PROTECTION in (meta.get('finalizers') or []):
                if not any(self._mounts(pod, meta['name']) for res, pod in live if res == POD
                           and _meta(pod).get('namespace') == meta.get('namespace')):
                    self._drop_finalizer(resource, obj, PVC_PROTECTION)
            elif resource == VOLUME_SNAPSHOT and SNAPSHOT_PROTECTION in (meta.get('finalizers') or []):
                if not any(self._restoring_from(pvc, meta['name']) for res, pvc in live if res == PVC):
                    self._drop_finalizer(resource, obj, SNAPSHOT_PROTECTION)
            elif FOREGROUND in (meta.get('finalizers') or []) and not any(
                    meta.get('uid') in self._owners(dep) for _, dep in live):
                self._drop_finalizer(resource, obj, FOREGROUND)

    @staticmethod
    def _owners(obj: dict[str, Any]) -> set[str]:
        return {str(ref.get('uid')) for ref in _meta(obj).get('ownerReferences') or []}

    def _collect(self, live: list[tuple[kmock.resource, dict[str, Any]]], uids: set[Any]) -> None:
        doomed = {_meta(obj).get('uid') for _, obj in live
                  if FOREGROUND in (_meta(obj).get('finalizers') or []) and _meta(obj).get('deletionTimestamp')}
        for resource, obj in live:
            owners = self._owners(obj)
            meta = _meta(obj)
            if not owners or meta.get('deletionTimestamp'):
                continue
            if owners.isdisjoint(uids) or owners <= doomed:
                self.collected.append(f"{resource.plural}/{meta['name']}")
                self.emulator.op_delete(resource, meta.get('namespace'), meta['name'])

    def _terminate(self, pod: dict[str, Any]) -> None:
        uid = str(_meta(pod).get('uid'))
        if uid in self._terminating:
            return
        self._terminating.add(uid)
        loop = asyncio.get_running_loop()
        loop.call_later(self.pod_termination, self.emulator.remove, POD, pod)

    @staticmethod
    def _mounts(pod: dict[str, Any], claim: str) -> bool:
        volumes = (pod.get('spec') or {}).get('volumes') or []
        return any((v.get('persistentVolumeClaim') or {}).get('claimName') == claim for v in volumes)

    @staticmethod
    def _restoring_from(pvc: dict[str, Any], snapshot: str) -> bool:
        source = (pvc.get('spec') or {}).get('dataSource') or {}
        return source.get('name') == snapshot and (pvc.get('status') or {}).get('phase') != 'Bound'

    def _drop_finalizer(self, resource: kmock.resource, obj: dict[str, Any], finalizer: str) -> None:
        meta = _meta(obj)
        rest = [f for f in meta.get('finalizers') or [] if f != finalizer]
        self.emulator.op_patch(resource, meta.get('namespace'), meta['name'],
                               {'metadata': {'finalizers': rest or None}})

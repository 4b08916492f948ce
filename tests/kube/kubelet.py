"""The kubelet, the scheduler, the volume binder and the snapshot controller, played on the emulator's store."""
from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import kmock

from tests.kube.emulator import POD, PVC, VOLUME_SNAPSHOT, EmulatorApiError, KubeEmulator, _now, k8s_status
from tests.kube.scenarios import UNBOUND, PickScenario, Scenario, bind, never_ready, play, record_event


class LoopbackIPs:
    """Pod -> 127.0.0.N (N = first, first+1, ...), stable per namespace/name. For FakeKubelet(pod_ip=...)."""

    def __init__(self, first: int = 2) -> None:
        self.mapping: dict[tuple[str, str], str] = {}
        self._next = first

    def __call__(self, pod: Mapping[str, Any]) -> str:
        key = (pod['metadata'].get('namespace') or '', pod['metadata']['name'])
        if key not in self.mapping:
            if self._next > 254:
                raise RuntimeError('out of loopback addresses')
            self.mapping[key] = f'127.0.0.{self._next}'
            self._next += 1
        return self.mapping[key]


PodIP = Callable[[dict[str, Any]], 'str | Awaitable[str | None] | None']


class FakeKubelet:
    """
    Plays the kubelet, the PV binder and the snapshot controller on the emulator's in-memory store.

    * New pods (phase Pending) wait until the PVCs they mount are Bound (``FailedScheduling`` meanwhile), then
      go as their :class:`Scenario` says (``scenario``: one for every pod, or a function of the pod), with the
      Events a cluster emits, to ``Running``, conditions Ready/ContainersReady/Initialized/PodScheduled
      True, ``podIP`` from ``pod_ip(pod)`` (sync or async; returning None leaves the pod Pending; start
      it later with :meth:`start_pod`). Optional ``pod_delay`` seconds before that.
    * New PVCs -> ``status.phase: Bound`` (+ capacity from the request), per the scenario's binding.
    * New VolumeSnapshots -> ``status.readyToUse: true`` after ``snapshot_delay`` seconds.

    Use ``async with FakeKubelet(emu, pod_ip=LoopbackIPs()) as kubelet:`` or ``start()``/``stop()``.
    """

    def __init__(self, emulator: KubeEmulator, pod_ip: PodIP | None = None, *, pod_delay: float = 0.0,
                 snapshot_delay: float = 0.0, bind_pvcs: bool = True, ready_snapshots: bool = True,
                 scenario: Scenario | PickScenario | None = None) -> None:
        self.emulator = emulator
        self.scenario = scenario or Scenario()
        self.pod_ip: PodIP = pod_ip or LoopbackIPs()
        self.pod_delay = pod_delay
        self.snapshot_delay = snapshot_delay
        self.bind_pvcs = bind_pvcs
        self.ready_snapshots = ready_snapshots
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._seen: set[str] = set()  # uids already handled

    async def __aenter__(self) -> FakeKubelet:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name='fake-kubelet')

    async def stop(self) -> None:
        tasks = [t for t in [self._task, *self._pending] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None
        self._pending.clear()

    async def _run(self) -> None:
        emu = self.emulator
        since = emu.resource_version
        for resource in (POD, PVC, VOLUME_SNAPSHOT):
            for obj in emu.list_objects(resource):
                self._consider(resource, obj)
        async for event in emu.events(since=since):
            if event.type != 'DELETED':
                self._consider(event.resource, event.object)

    def _consider(self, resource: kmock.resource, obj: dict[str, Any]) -> None:
        meta = obj.get('metadata') or {}
        uid = meta.get('uid') or f"{meta.get('namespace')}/{meta.get('name')}"
        if uid in self._seen or meta.get('deletionTimestamp'):
            return
        status = obj.get('status') or {}
        if resource == POD and status.get('phase', 'Pending') == 'Pending':
            self._spawn(self._start_pod(obj, self.pod_delay))
        elif resource == PVC and self.bind_pvcs and status.get('phase', 'Pending') == 'Pending':
            self._spawn(self._bind_pvc(obj))
        elif resource == VOLUME_SNAPSHOT and self.ready_snapshots and not status.get('readyToUse'):
            self._spawn(self._ready_snapshot(obj))
        else:
            return
        self._seen.add(uid)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _patch_status(self, resource: kmock.resource, obj: Mapping[str, Any], status: dict[str, Any]) -> None:
        meta = obj['metadata']
        with contextlib.suppress(EmulatorApiError):  # deleted meanwhile: nothing to do
            self.emulator.patch_status(resource, meta.get('namespace'), meta['name'], status)

    def _scenario(self, obj: dict[str, Any]) -> Scenario:
        return self.scenario if isinstance(self.scenario, Scenario) else self.scenario(obj)

    def _alive(self, pod: dict[str, Any]) -> bool:
        meta = pod['metadata']
        now = self.emulator.get_object(POD, meta.get('namespace'), meta['name'])
        return (now is not None and now['metadata'].get('uid') == meta.get('uid')
                and not now['metadata'].get('deletionTimestamp'))

    def _patcher(self, pod: dict[str, Any]) -> Callable[[dict[str, Any]], bool]:
        def patch(status: dict[str, Any]) -> bool:
            if not self._alive(pod):
                return False
            self._patch_status(POD, pod, status)
            return True
        return patch

    async def _volumes_bound(self, pod: dict[str, Any]) -> bool:
        """The scheduler waits for the pod's claims to bind; False if the pod goes first."""
        emu, meta = self.emulator, pod['metadata']
        claims = [v['persistentVolumeClaim']['claimName'] for v in (pod.get('spec') or {}).get('volumes') or []
                  if v.get('persistentVolumeClaim')]
        told = ''
        while self._alive(pod):
            changed = emu.changed
            pvcs = [emu.get_object(PVC, meta.get('namespace'), claim) for claim in claims]
            usable = [pvc is not None and not pvc['metadata'].get('deletionTimestamp') for pvc in pvcs]
            if all(usable) and all((pvc or {}).get('status', {}).get('phase') == 'Bound' for pvc in pvcs):
                return True
            why = UNBOUND if all(usable) else (f'0/3 nodes are available: persistentvolumeclaim '
                                              f'"{claims[usable.index(False)]}" is being deleted.')
            if told != why:
                told = why
                record_event(emu, pod, 'Warning', 'FailedScheduling', why, 'default-scheduler')
            await changed.wait()
        return False

    async def _start_pod(self, pod: dict[str, Any], delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        scenario = self._scenario(pod)
        if not await self._volumes_bound(pod) or not await play(self.emulator, pod, scenario, self._patcher(pod)):
            return
        ip = self.pod_ip(pod)
        if inspect.isawaitable(ip):
            ip = await ip
        if ip is None or not self._alive(pod):
            return
        namespace, name = pod['metadata'].get('namespace'), pod['metadata']['name']
        if scenario.ready_after is None:
            self.start_pod(namespace, name, ip, ready=False)
            await never_ready(self.emulator, pod, ip, scenario, lambda: self._alive(pod))
        elif scenario.ready_after > 0:
            self.start_pod(namespace, name, ip, ready=False)
            await asyncio.sleep(scenario.ready_after)
            if self._alive(pod):
                self.set_pod_ready(namespace, name, True)
        else:
            self.start_pod(namespace, name, ip)

    def start_pod(self, namespace: str | None, name: str, ip: str, *, ready: bool = True) -> dict[str, Any]:
        """Make a pod Running with the given IP (and Ready unless ready=False)."""
        pod = self.emulator.get_object(POD, namespace, name)
        if pod is None:
            raise EmulatorApiError(404, k8s_status(404, 'NotFound', f'pods "{name}" not found'))
        now = _now()
        containers = (pod.get('spec') or {}).get('containers') or []
        status = {
            'phase': 'Running', 'podIP': ip, 'podIPs': [{'ip': ip}], 'hostIP': '127.0.0.1', 'startTime': now,
            'conditions': self._conditions(ready, now),
            'containerStatuses': [{
                'name': c.get('name', f'c{i}'), 'image': c.get('image', ''), 'imageID': '', 'ready': ready,
                'started': True, 'restartCount': 0, 'state': {'running': {'startedAt': now}},
            } for i, c in enumerate(containers)],
        }
        return self.emulator.patch_status(POD, namespace, name, status)

    @staticmethod
    def _conditions(ready: bool, now: str) -> list[dict[str, Any]]:
        flag = 'True' if ready else 'False'
        return [{'type': t, 'status': s, 'lastProbeTime': None, 'lastTransitionTime': now}
                for t, s in [('PodScheduled', 'True'), ('Initialized', 'True'),
                             ('ContainersReady', flag), ('Ready', flag)]]

    def set_pod_ready(self, namespace: str | None, name: str, ready: bool) -> dict[str, Any]:
        """Flip the Ready/ContainersReady conditions (e.g. to test readiness-gated proxying)."""
        pod = self.emulator.get_object(POD, namespace, name)
        if pod is None:
            raise EmulatorApiError(404, k8s_status(404, 'NotFound', f'pods "{name}" not found'))
        statuses = [dict(cs, ready=ready) for cs in (pod.get('status') or {}).get('containerStatuses') or []]
        return self.emulator.patch_status(POD, namespace, name, {
            'conditions': self._conditions(ready, _now()), 'containerStatuses': statuses})

    async def _bind_pvc(self, pvc: dict[str, Any]) -> None:
        if not await bind(self.emulator, pvc, self._scenario(pvc)):
            return
        spec = pvc.get('spec') or {}
        storage = ((spec.get('resources') or {}).get('requests') or {}).get('storage', '1Gi')
        self._patch_status(PVC, pvc, {'phase': 'Bound', 'capacity': {'storage': storage},
                                      'accessModes': spec.get('accessModes') or ['ReadWriteOnce']})

    async def _ready_snapshot(self, snapshot: dict[str, Any]) -> None:
        if self.snapshot_delay:
            await asyncio.sleep(self.snapshot_delay)
        self._patch_status(VOLUME_SNAPSHOT, snapshot, {
            'readyToUse': True, 'creationTime': _now(), 'restoreSize': '1Gi',
            'boundVolumeSnapshotContentName': f"snapcontent-{snapshot['metadata'].get('uid', 'x')}"})



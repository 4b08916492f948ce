"""How a pod's start goes on the fake kubelet, and the Events a real scheduler, kubelet and provisioner emit.

A :class:`Scenario` drives :class:`tests.kube.kubelet.FakeKubelet` through what a cluster shows while a pod
starts: ``status`` (conditions, container states) and ``v1/events`` with the reasons and message shapes of
kube-scheduler (``FailedScheduling``), the kubelet (``Pulling``, ``Failed``, ``BackOff``, ``Unhealthy``...) and
a CSI provisioner (``Provisioning``, ``ProvisioningFailed``).
"""
from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Callable
from typing import Any

from tests.kube.emulator import KubeEmulator, _now

EVENTS = 'v1/events'
UNBOUND = ('0/3 nodes are available: pod has unbound immediate PersistentVolumeClaims. preemption: 0/3 nodes are'
           ' available: 3 Preemption is not helpful for scheduling.')
INSUFFICIENT_MEMORY = ('0/3 nodes are available: 3 Insufficient memory. preemption: 0/3 nodes are available:'
                       ' 3 No preemption victims found for incoming pod.')


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One pod start. Defaults: scheduled, pulled, started and Ready at once."""

    unschedulable: str | None = None  # a FailedScheduling message: the pod stays Pending for ever
    pull_failures: int = 0  # ErrImagePull -> ImagePullBackOff rounds before the pull works (-1: never works)
    pull_error: str = 'rpc error: code = NotFound desc = failed to pull and unpack image: not found'
    crash_loop: bool = False  # the container exits at once, again and again
    ready_after: float | None = 0.0  # seconds Running before Ready; None: the readiness probe never passes
    step: float = 0.05  # seconds between the kubelet's steps (back-off rounds, probe failures)
    bind_delay: float = 0.0  # seconds before a new PVC binds
    bind_failure: str | None = None  # a ProvisioningFailed message: PVCs never bind


PickScenario = Callable[[dict[str, Any]], Scenario]


def record_event(emu: KubeEmulator, obj: dict[str, Any], type_: str, reason: str, message: str,
                 component: str) -> dict[str, Any]:
    """A core/v1 Event about ``obj``, as its controller writes it."""
    meta = obj['metadata']
    now = _now()
    return emu.create_object(EVENTS, {
        'metadata': {'name': f"{meta['name']}.{uuid.uuid4().hex[:16]}", 'namespace': meta.get('namespace')},
        'involvedObject': {'kind': obj.get('kind'), 'apiVersion': obj.get('apiVersion'), 'name': meta['name'],
                           'namespace': meta.get('namespace'), 'uid': meta.get('uid')},
        'type': type_, 'reason': reason, 'message': message, 'source': {'component': component},
        'reportingComponent': component, 'firstTimestamp': now, 'lastTimestamp': now, 'count': 1,
    }, meta.get('namespace'))


def _container(pod: dict[str, Any], state: dict[str, Any], restarts: int = 0, ready: bool = False
               ) -> list[dict[str, Any]]:
    return [{'name': c.get('name', 'c'), 'image': c.get('image', ''), 'imageID': '', 'ready': ready,
             'started': 'running' in state, 'restartCount': restarts, 'state': state}
            for c in (pod.get('spec') or {}).get('containers') or []]


def _scheduled(ok: bool, reason: str = '', message: str = '') -> list[dict[str, Any]]:
    condition: dict[str, Any] = {'type': 'PodScheduled', 'status': 'True' if ok else 'False',
                                 'lastTransitionTime': _now(), 'lastProbeTime': None}
    if not ok:
        condition.update(reason=reason, message=message)
    return [condition]


async def play(emu: KubeEmulator, pod: dict[str, Any], scenario: Scenario,
               patch: Callable[[dict[str, Any]], bool]) -> bool:
    """Drive the pod up to Running (not Ready); False when the scenario leaves it stuck for ever.

    ``patch`` writes the pod's status and says whether the pod still exists.
    """
    meta = pod['metadata']
    image = ((pod.get('spec') or {}).get('containers') or [{}])[0].get('image', '')
    if scenario.unschedulable is not None:
        record_event(emu, pod, 'Warning', 'FailedScheduling', scenario.unschedulable, 'default-scheduler')
        patch({'phase': 'Pending', 'conditions': _scheduled(False, 'Unschedulable', scenario.unschedulable)})
        return False
    node = 'node-1'
    record_event(emu, pod, 'Normal', 'Scheduled', f"Successfully assigned {meta.get('namespace')}/{meta['name']}"
                 f' to {node}', 'default-scheduler')
    if not patch({'phase': 'Pending', 'conditions': _scheduled(True)}):
        return False
    failures = 0
    while scenario.pull_failures < 0 or failures < scenario.pull_failures:
        failures += 1
        record_event(emu, pod, 'Normal', 'Pulling', f'Pulling image "{image}"', 'kubelet')
        message = f'Failed to pull image "{image}": {scenario.pull_error}'
        record_event(emu, pod, 'Warning', 'Failed', message, 'kubelet')
        if not patch({'containerStatuses': _container(pod, {'waiting': {'reason': 'ErrImagePull',
                                                                        'message': message}})}):
            return False
        await asyncio.sleep(scenario.step)
        back_off = f'Back-off pulling image "{image}"'
        record_event(emu, pod, 'Normal', 'BackOff', back_off, 'kubelet')
        if not patch({'containerStatuses': _container(pod, {'waiting': {'reason': 'ImagePullBackOff',
                                                                        'message': back_off}})}):
            return False
        await asyncio.sleep(scenario.step)
    record_event(emu, pod, 'Normal', 'Pulling', f'Pulling image "{image}"', 'kubelet')
    record_event(emu, pod, 'Normal', 'Pulled', f'Successfully pulled image "{image}" in 1.2s', 'kubelet')
    record_event(emu, pod, 'Normal', 'Created', 'Created container code-server', 'kubelet')
    record_event(emu, pod, 'Normal', 'Started', 'Started container code-server', 'kubelet')
    restarts = 0
    while scenario.crash_loop:
        restarts += 1
        record_event(emu, pod, 'Warning', 'BackOff', f"Back-off restarting failed container code-server in pod "
                     f"{meta['name']}_{meta.get('namespace')}({meta.get('uid')})", 'kubelet')
        waiting = {'reason': 'CrashLoopBackOff', 'message': f"back-off {10 * restarts}s restarting failed "
                   f"container=code-server pod={meta['name']}_{meta.get('namespace')}({meta.get('uid')})"}
        if not patch({'phase': 'Running', 'containerStatuses': _container(pod, {'waiting': waiting}, restarts)}):
            return False
        await asyncio.sleep(scenario.step)
    return True


async def never_ready(emu: KubeEmulator, pod: dict[str, Any], ip: str, scenario: Scenario,
                      exists: Callable[[], bool]) -> None:
    """The readiness probe fails, as the kubelet reports it, until the pod goes."""
    port = 13337
    while exists():
        record_event(emu, pod, 'Warning', 'Unhealthy', f'Readiness probe failed: Get "http://{ip}:{port}/healthz": '
                     f'dial tcp {ip}:{port}: connect: connection refused', 'kubelet')
        await asyncio.sleep(max(scenario.step, 0.2))


async def bind(emu: KubeEmulator, pvc: dict[str, Any], scenario: Scenario) -> bool:
    """The provisioner's side of a new PVC; False when it never binds."""
    meta = pvc['metadata']
    component = 'csi.example.com_csi-provisioner'
    if scenario.bind_failure is not None:
        record_event(emu, pvc, 'Warning', 'ProvisioningFailed', scenario.bind_failure, 'persistentvolume-controller')
        return False
    record_event(emu, pvc, 'Normal', 'Provisioning', 'External provisioner is provisioning volume for claim '
                 f'"{meta.get("namespace")}/{meta["name"]}"', component)
    if scenario.bind_delay:
        await asyncio.sleep(scenario.bind_delay)
    record_event(emu, pvc, 'Normal', 'ProvisioningSucceeded', f'Successfully provisioned volume pvc-{meta["uid"]}',
                 component)
    return True

"""The fake kubelet's scenarios: the status and the Events a cluster shows for each way a start can go."""
from __future__ import annotations

from typing import Any

import pytest

from tests.kube.emulator import POD, PVC, KubeEmulator
from tests.kube.kubelet import FakeKubelet, LoopbackIPs
from tests.kube.scenarios import EVENTS, INSUFFICIENT_MEMORY, UNBOUND, Scenario
from tests.kube.support import until

pytestmark = pytest.mark.timeout(30)
NS = 'ns1'


def make(emu: KubeEmulator) -> None:
    emu.create_object(PVC, {'metadata': {'name': 'home'}, 'spec': {'resources': {'requests': {'storage': '1Gi'}}}},
                      NS)
    emu.create_object(POD, {'metadata': {'name': 'p'}, 'spec': {
        'containers': [{'name': 'code-server', 'image': 'example/ide:1'}],
        'volumes': [{'name': 'home', 'persistentVolumeClaim': {'claimName': 'home'}}]}}, NS)


def reasons(emu: KubeEmulator, name: str) -> list[str]:
    events = sorted(emu.list_objects(EVENTS, NS), key=lambda e: int(e['metadata']['resourceVersion']))
    return [e['reason'] for e in events if e['involvedObject']['name'] == name]


def pod(emu: KubeEmulator) -> dict[str, Any]:
    found = emu.get_object(POD, NS, 'p')
    assert found is not None
    return found


def waiting(emu: KubeEmulator) -> str:
    statuses = pod(emu).get('status', {}).get('containerStatuses') or [{}]
    return str(statuses[0].get('state', {}).get('waiting', {}).get('reason', ''))


async def test_a_healthy_start(kube_emulator: KubeEmulator) -> None:
    emu = kube_emulator
    async with FakeKubelet(emu, pod_ip=LoopbackIPs()):
        make(emu)
        await emu.wait_for(POD, NS, 'p', lambda p: p.get('status', {}).get('phase') == 'Running')
    assert reasons(emu, 'home') == ['Provisioning', 'ProvisioningSucceeded']
    assert reasons(emu, 'p')[-5:] == ['Scheduled', 'Pulling', 'Pulled', 'Created', 'Started']


async def test_unschedulable(kube_emulator: KubeEmulator) -> None:
    emu = kube_emulator
    async with FakeKubelet(emu, scenario=Scenario(unschedulable=INSUFFICIENT_MEMORY)):
        make(emu)
        await until(lambda: 'FailedScheduling' in reasons(emu, 'p') and 'conditions' in pod(emu)['status'])
    (condition,) = pod(emu)['status']['conditions']
    assert (condition['type'], condition['status'], condition['reason']) == ('PodScheduled', 'False', 'Unschedulable')
    assert condition['message'] == INSUFFICIENT_MEMORY
    assert pod(emu)['status']['phase'] == 'Pending'


async def test_a_claim_that_never_binds_keeps_the_pod_unscheduled(kube_emulator: KubeEmulator) -> None:
    emu = kube_emulator
    async with FakeKubelet(emu, scenario=Scenario(bind_failure='storageclass.storage.k8s.io "fast" not found')):
        make(emu)
        await until(lambda: 'FailedScheduling' in reasons(emu, 'p') and 'ProvisioningFailed' in reasons(emu, 'home'))
    (event,) = [e for e in emu.list_objects(EVENTS, NS) if e['reason'] == 'FailedScheduling']
    assert event['message'] == UNBOUND
    assert event['involvedObject']['uid'] == pod(emu)['metadata']['uid']
    assert emu.get_object(PVC, NS, 'home')['status']['phase'] == 'Pending'  # type: ignore[index]


async def test_image_pull_back_off_then_pulled(kube_emulator: KubeEmulator) -> None:
    emu = kube_emulator
    seen: set[str] = set()
    async with FakeKubelet(emu, scenario=Scenario(pull_failures=2, step=0.1)):
        make(emu)

        def running() -> bool:
            seen.add(waiting(emu))
            return bool(pod(emu)['status'].get('phase') == 'Running')

        await until(running)
    assert {'ErrImagePull', 'ImagePullBackOff'} <= seen
    assert reasons(emu, 'p').count('Failed') == 2
    assert reasons(emu, 'p').count('BackOff') == 2


async def test_crash_loop_back_off(kube_emulator: KubeEmulator) -> None:
    emu = kube_emulator
    async with FakeKubelet(emu, scenario=Scenario(crash_loop=True)):
        make(emu)
        await until(lambda: waiting(emu) == 'CrashLoopBackOff'
                    and pod(emu)['status']['containerStatuses'][0]['restartCount'] >= 2)
    assert 'BackOff' in reasons(emu, 'p')


async def test_readiness_after_a_while_and_never(kube_emulator: KubeEmulator) -> None:
    emu = kube_emulator

    def ready() -> bool:
        return any(c['type'] == 'Ready' and c['status'] == 'True' for c in pod(emu)['status'].get('conditions', []))

    async with FakeKubelet(emu, scenario=Scenario(ready_after=0.3)):
        make(emu)
        await emu.wait_for(POD, NS, 'p', lambda p: p.get('status', {}).get('phase') == 'Running')
        assert not ready()
        await until(ready)
    emu.delete_object(POD, NS, 'p')
    await emu.wait_gone(POD, NS, 'p')
    emu.create_object(POD, {'metadata': {'name': 'p'}, 'spec': {'containers': [{'name': 'code-server', 'image': 'i'}]}},
                      NS)
    async with FakeKubelet(emu, scenario=Scenario(ready_after=None)):
        await until(lambda: 'Unhealthy' in reasons(emu, 'p'))
    assert pod(emu)['status']['phase'] == 'Running'
    assert not ready()

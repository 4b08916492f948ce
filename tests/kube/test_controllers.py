"""The emulator's control plane: garbage collection, graceful termination, protection finalizers."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client import ApiClient

from tests.kube.controllers import FOREGROUND, PVC_PROTECTION, SNAPSHOT_PROTECTION
from tests.kube.emulator import POD, PVC, VOLUME_SNAPSHOT, WORKSPACE, EmulatorApiError, KubeEmulator

pytestmark = pytest.mark.timeout(30)
NS = 'ns1'


def owned_by(owner: dict[str, Any]) -> dict[str, Any]:
    meta = owner['metadata']
    return {'ownerReferences': [{'apiVersion': owner['apiVersion'], 'kind': owner['kind'], 'name': meta['name'],
                                 'uid': meta['uid'], 'controller': True, 'blockOwnerDeletion': True}]}


def pod(name: str, claim: str | None = None, **meta: Any) -> dict[str, Any]:
    volumes = [{'name': 'home', 'persistentVolumeClaim': {'claimName': claim}}] if claim else []
    return {'metadata': dict(meta, name=name),
            'spec': {'containers': [{'name': 'c', 'image': 'i'}], 'volumes': volumes,
                     'terminationGracePeriodSeconds': 30}}


async def test_dependents_are_collected_with_their_owner(kube_emulator: KubeEmulator) -> None:
    emu = kube_emulator
    owner = emu.create_object(WORKSPACE, {'metadata': {'name': 'w'}, 'spec': {'owner': 'a'}}, NS)
    other = emu.create_object(WORKSPACE, {'metadata': {'name': 'x'}, 'spec': {'owner': 'a'}}, NS)
    emu.create_object(POD, pod('ws-w', **owned_by(owner)), NS)
    emu.create_object(PVC, {'metadata': {'name': 'ws-w-home', **owned_by(owner)}, 'spec': {}}, NS)
    emu.create_object(VOLUME_SNAPSHOT, {'metadata': {'name': 's', **owned_by(owner)}, 'spec': {}}, NS)
    emu.create_object(PVC, {'metadata': {'name': 'ws-x-home', **owned_by(other)}, 'spec': {}}, NS)
    emu.delete_object(WORKSPACE, NS, 'w')
    for resource, name in ((POD, 'ws-w'), (PVC, 'ws-w-home'), (VOLUME_SNAPSHOT, 's')):
        await emu.wait_gone(resource, NS, name)
    assert sorted(emu.controllers.collected) == ['persistentvolumeclaims/ws-w-home', 'pods/ws-w',
                                                 'volumesnapshots/s']
    assert emu.get_object(PVC, NS, 'ws-x-home') is not None  # another owner's dependents stay


async def test_an_owner_deleted_after_the_collector_saw_it_takes_its_dependents(kube_emulator: KubeEmulator) -> None:
    """The collector follows the store's changes from where it last looked (a pass over every object per change
    stalled an emulated API of 200,000 objects): an owner's deletion it hears of, not only one it finds gone."""
    emu = kube_emulator
    owner = emu.create_object(WORKSPACE, {'metadata': {'name': 'w'}, 'spec': {'owner': 'a'}}, NS)
    emu.create_object(PVC, {'metadata': {'name': 'ws-w-home', **owned_by(owner)}, 'spec': {}}, NS)
    emu.controllers.reconcile()  # it has seen both
    emu.create_object(PVC, {'metadata': {'name': 'late', **owned_by(owner)}, 'spec': {}}, NS)
    emu.delete_object(WORKSPACE, NS, 'w')
    await emu.wait_gone(PVC, NS, 'ws-w-home')
    await emu.wait_gone(PVC, NS, 'late')


async def test_a_paused_collector_leaves_dependents_until_it_runs(kube_emulator: KubeEmulator) -> None:
    emu = kube_emulator
    emu.controllers.paused_gc = True
    owner = emu.create_object(WORKSPACE, {'metadata': {'name': 'w'}, 'spec': {'owner': 'a'}}, NS)
    emu.create_object(PVC, {'metadata': {'name': 'ws-w-home', **owned_by(owner)}, 'spec': {}}, NS)
    emu.delete_object(WORKSPACE, NS, 'w')
    await asyncio.sleep(0.1)
    assert emu.get_object(PVC, NS, 'ws-w-home') is not None
    emu.controllers.paused_gc = False
    emu.controllers.reconcile()
    await emu.wait_gone(PVC, NS, 'ws-w-home')


async def test_foreground_deletion_keeps_the_owner_until_its_dependents_are_gone(
        kube_api: ApiClient, kube_emulator: KubeEmulator) -> None:
    emu = kube_emulator
    emu.controllers.pod_termination = 0.3
    owner = emu.create_object(WORKSPACE, {'metadata': {'name': 'w'}, 'spec': {'owner': 'a'}}, NS)
    emu.create_object(POD, pod('ws-w', **owned_by(owner)), NS)
    await client.CustomObjectsApi(kube_api).delete_namespaced_custom_object(
        'codehub.dev', 'v1alpha1', NS, 'workspaces', 'w', body=client.V1DeleteOptions(propagation_policy='Foreground'))
    marked = emu.get_object(WORKSPACE, NS, 'w')
    assert marked is not None
    assert marked['metadata']['finalizers'] == [FOREGROUND]
    await emu.wait_for(POD, NS, 'ws-w', lambda p: bool(p['metadata'].get('deletionTimestamp')))
    assert emu.get_object(WORKSPACE, NS, 'w') is not None  # the pod is still terminating
    await emu.wait_gone(WORKSPACE, NS, 'w')
    assert emu.get_object(POD, NS, 'ws-w') is None


async def test_pods_terminate_gracefully(kube_api: ApiClient, kube_emulator: KubeEmulator) -> None:
    emu = kube_emulator
    emu.controllers.pod_termination = 0.3
    emu.create_object(POD, pod('p'), NS)
    answer = await client.CoreV1Api(kube_api).delete_namespaced_pod('p', NS)
    assert answer.metadata.deletion_timestamp is not None
    assert answer.metadata.deletion_grace_period_seconds == 30
    await asyncio.sleep(0.1)
    assert emu.get_object(POD, NS, 'p') is not None
    emu.patch_status(POD, NS, 'p', {'phase': 'Running'})  # the kubelet still reports while it stops
    assert emu.get_object(POD, NS, 'p') is not None
    await emu.wait_gone(POD, NS, 'p', timeout=2)


async def test_pvc_protection_holds_a_claim_while_a_pod_uses_it(kube_emulator: KubeEmulator) -> None:
    emu = kube_emulator
    claim = emu.create_object(PVC, {'metadata': {'name': 'home'}, 'spec': {}}, NS)
    assert claim['metadata']['finalizers'] == [PVC_PROTECTION]
    emu.create_object(POD, pod('p', claim='home'), NS)
    emu.delete_object(PVC, NS, 'home')
    await asyncio.sleep(0.1)
    held = emu.get_object(PVC, NS, 'home')
    assert held is not None
    assert held['metadata']['deletionTimestamp']
    emu.delete_object(POD, NS, 'p')
    await emu.wait_gone(PVC, NS, 'home')


async def test_a_snapshot_is_held_while_a_claim_restores_from_it(kube_emulator: KubeEmulator) -> None:
    emu = kube_emulator
    snap = emu.create_object(VOLUME_SNAPSHOT, {'metadata': {'name': 's'}, 'spec': {}}, NS)
    assert snap['metadata']['finalizers'] == [SNAPSHOT_PROTECTION]
    emu.create_object(PVC, {'metadata': {'name': 'home'},
                            'spec': {'dataSource': {'kind': 'VolumeSnapshot', 'name': 's'}}}, NS)
    emu.delete_object(VOLUME_SNAPSHOT, NS, 's')
    await asyncio.sleep(0.1)
    assert emu.get_object(VOLUME_SNAPSHOT, NS, 's') is not None
    emu.patch_status(PVC, NS, 'home', {'phase': 'Bound'})
    await emu.wait_gone(VOLUME_SNAPSHOT, NS, 's')


# --- API manners: pages, Retry-After, bookmarks ---------------------------------------------------

async def test_lists_paginate_with_limit_and_continue(kube_api: ApiClient, kube_emulator: KubeEmulator) -> None:
    core = client.CoreV1Api(kube_api)
    for index in range(5):
        kube_emulator.create_object(PVC, {'metadata': {'name': f'c{index}'}, 'spec': {}}, NS)
    first = await core.list_namespaced_persistent_volume_claim(NS, limit=2)
    assert [p.metadata.name for p in first.items] == ['c0', 'c1']
    assert first.metadata.remaining_item_count == 3
    kube_emulator.create_object(PVC, {'metadata': {'name': 'c9'}, 'spec': {}}, NS)
    second = await core.list_namespaced_persistent_volume_claim(NS, limit=2, _continue=first.metadata._continue)
    assert [p.metadata.name for p in second.items] == ['c2', 'c3']
    assert second.metadata.resource_version == first.metadata.resource_version  # one consistent list
    kube_emulator.compact()
    with pytest.raises(client.ApiException) as expired:
        await core.list_namespaced_persistent_volume_claim(NS, limit=2, _continue=second.metadata._continue)
    assert expired.value.status == 410


async def test_429_carries_retry_after(kube_api: ApiClient, kube_emulator: KubeEmulator) -> None:
    kube_emulator.fail('list', PVC, status=429, retry_after=3)
    with pytest.raises(client.ApiException) as refused:
        await client.CoreV1Api(kube_api).list_namespaced_persistent_volume_claim(NS)
    assert refused.value.status == 429
    assert refused.value.headers is not None
    assert refused.value.headers['Retry-After'] == '3'


async def test_a_quiet_watch_gets_bookmarks(kube_api: ApiClient, kube_emulator: KubeEmulator) -> None:
    kube_emulator.bookmark_interval = 0.2
    core = client.CoreV1Api(kube_api)
    listing = await core.list_namespaced_pod(NS)
    kube_emulator.create_object(PVC, {'metadata': {'name': 'elsewhere'}, 'spec': {}}, NS)  # not a pod
    response: Any = await core.list_namespaced_pod(NS, watch=True, allow_watch_bookmarks=True, timeout_seconds=5,
                                              resource_version=listing.metadata.resource_version,
                                              _preload_content=False)
    line = await asyncio.wait_for(response.content.readline(), 3)
    response.close()
    event = json.loads(line)
    assert event['type'] == 'BOOKMARK'
    assert int(event['object']['metadata']['resourceVersion']) == kube_emulator.resource_version


# --- the chart's CRD schemas ----------------------------------------------------------------------

async def test_custom_objects_are_validated_and_pruned_by_the_charts_schemas(
        kube_api: ApiClient, kube_emulator: KubeEmulator) -> None:
    custom = client.CustomObjectsApi(kube_api)
    with pytest.raises(client.ApiException) as invalid:
        await custom.create_namespaced_custom_object('codehub.dev', 'v1alpha1', NS, 'workspaces', {
            'metadata': {'name': 'bad'}, 'spec': {'owner': 'a', 'idePort': 0, 'ports': {'80': 'everyone'}}})
    assert invalid.value.status == 422
    assert 'spec.idePort' in str(invalid.value.body)
    assert "'everyone'" in str(invalid.value.body)
    with pytest.raises(client.ApiException) as missing:
        await custom.create_namespaced_custom_object('codehub.dev', 'v1alpha1', NS, 'workspaces',
                                                     {'metadata': {'name': 'bad'}, 'spec': {}})
    assert missing.value.status == 422
    assert 'spec.owner: Required value' in str(missing.value.body)

    created = await custom.create_namespaced_custom_object('codehub.dev', 'v1alpha1', NS, 'workspaces', {
        'metadata': {'name': 'w'}, 'spec': {'owner': 'a', 'colour': 'red'}})
    assert created['spec'] == {'owner': 'a'}  # silently dropped, as a real API server does by default
    assert kube_emulator.pruned == ['workspaces/w: spec.colour']
    kube_emulator.pruned.clear()  # (left there, it fails the test at teardown)
    with pytest.raises(client.ApiException) as strict:
        await custom.create_namespaced_custom_object('codehub.dev', 'v1alpha1', NS, 'workspaces', {
            'metadata': {'name': 'x'}, 'spec': {'owner': 'a', 'colour': 'red'}}, field_validation='Strict')
    assert strict.value.status == 400
    assert json.loads(strict.value.body or b'{}')['message'] == 'strict decoding error: unknown field "spec.colour"'
    with pytest.raises(EmulatorApiError) as status:
        kube_emulator.patch_status(WORKSPACE, NS, 'w', {'phase': 'Sleeping'})
    assert status.value.status == 422
    assert 'status.phase: Unsupported value' in status.value.body['message']

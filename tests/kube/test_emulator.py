"""Tests of the Kubernetes emulator itself, through the real kubernetes-asyncio client."""
# kubernetes-asyncio's generated signatures type request bodies as its V1 models and leave out the ``_content_type``
# keyword; at run time it takes plain dicts and the keyword, as these tests (and the gateway's client) send them.
# mypy: disable-error-code="arg-type, call-arg"
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client import ApiClient, ApiException

from tests.kube.emulator import (
    LEASE,
    POD,
    PVC,
    VOLUME_SNAPSHOT,
    WORKSPACE,
    KubeEmulator,
    KubeEnv,
    running_emulator,
)
from tests.kube.kubelet import FakeKubelet, LoopbackIPs

pytestmark = pytest.mark.timeout(30)


@pytest_asyncio.fixture()
async def kube() -> AsyncIterator[KubeEnv]:
    """The generic emulator without CRD schemas: these tests use custom kinds as free-form objects."""
    async with running_emulator() as env:
        yield env

NS = 'ns1'
WS = ('codehub.dev', 'v1alpha1')
SNAPSHOTS = ('snapshot.storage.k8s.io', 'v1')
MERGE = 'application/merge-patch+json'


def pod_body(name: str | None = None, labels: dict[str, str] | None = None, **meta: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = dict(meta, labels=labels or {})
    if name:
        metadata['name'] = name
    return {'metadata': metadata, 'spec': {'containers': [{'name': 'code', 'image': 'code-server'}]}}


async def collect(stream: watch.Watch, count: int, within: float = 5.0) -> list[dict[str, Any]]:
    events = []
    async with asyncio.timeout(within):
        async for event in stream:
            events.append(event)
            if len(events) >= count:
                break
    return events


def names(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e['type'], e['raw_object']['metadata']['name']) for e in events]


# --- basics ---------------------------------------------------------------------------------------

async def test_declared_resources_list_empty(kube_api: ApiClient) -> None:
    core, custom = client.CoreV1Api(kube_api), client.CustomObjectsApi(kube_api)
    assert (await core.list_namespaced_pod(NS)).items == []
    assert (await core.list_namespaced_persistent_volume_claim(NS)).items == []
    assert (await core.list_namespaced_secret(NS)).items == []
    assert (await core.list_pod_for_all_namespaces()).items == []
    assert (await client.CoordinationV1Api(kube_api).list_namespaced_lease(NS)).items == []
    snaps = await custom.list_namespaced_custom_object('snapshot.storage.k8s.io', 'v1', NS, 'volumesnapshots')
    assert snaps['items'] == []
    assert snaps['kind'] == 'VolumeSnapshotList'
    workspaces = await custom.list_namespaced_custom_object(*WS, NS, 'workspaces')
    assert workspaces['items'] == []
    assert workspaces['metadata']['resourceVersion'] == '0'
    with pytest.raises(ApiException) as err:
        await custom.list_namespaced_custom_object('example.com', 'v1', NS, 'unknowns')
    assert err.value.status == 404


async def test_discovery(kube_api: ApiClient) -> None:
    resources = await client.CustomObjectsApi(kube_api).get_api_resources(*WS)
    [workspaces] = [r for r in resources.resources if r.name == 'workspaces']
    assert workspaces.kind == 'Workspace'
    assert workspaces.namespaced is True
    assert 'workspaces/status' in {r.name for r in resources.resources}
    groups = await client.ApisApi(kube_api).get_api_versions()
    expected = {'codehub.dev', 'coordination.k8s.io', 'snapshot.storage.k8s.io'}
    assert expected <= {g.name for g in groups.groups}
    core = await client.CoreV1Api(kube_api).get_api_resources()
    assert {'pods', 'pods/status', 'secrets', 'persistentvolumeclaims'} <= {r.name for r in core.resources}


async def test_create_sets_server_fields(kube_api: ApiClient) -> None:
    core = client.CoreV1Api(kube_api)
    pod = await core.create_namespaced_pod(NS, pod_body(generateName='ws-'))
    assert pod.metadata.name.startswith('ws-')
    assert len(pod.metadata.name) == len('ws-') + 5
    assert pod.metadata.namespace == NS  # from the URL
    assert pod.metadata.uid
    assert pod.metadata.creation_timestamp is not None
    assert pod.metadata.resource_version == '1'
    assert pod.metadata.generation == 1
    assert pod.api_version == 'v1'
    assert pod.kind == 'Pod'
    assert pod.status.phase == 'Pending'
    got = await core.read_namespaced_pod(pod.metadata.name, NS)
    assert got.metadata.uid == pod.metadata.uid
    with pytest.raises(ApiException) as err:  # namespace mismatch between the URL and the body
        await core.create_namespaced_pod(NS, pod_body('x', namespace='other'))
    assert err.value.status == 400


async def test_resource_version_is_cluster_wide_and_monotonic(kube_api: ApiClient) -> None:
    core, custom = client.CoreV1Api(kube_api), client.CustomObjectsApi(kube_api)
    rvs = [int((await core.create_namespaced_pod(NS, pod_body('p1'))).metadata.resource_version)]
    secret = await core.create_namespaced_secret(NS, {'metadata': {'name': 's'}})
    rvs.append(int(secret.metadata.resource_version))
    ws = await custom.create_namespaced_custom_object(*WS, NS, 'workspaces', {'metadata': {'name': 'w'}})
    rvs.append(int(ws['metadata']['resourceVersion']))
    patched = await core.patch_namespaced_pod('p1', NS, {'metadata': {'labels': {'a': 'b'}}})
    rvs.append(int(patched.metadata.resource_version))
    assert rvs == sorted(rvs)
    assert len(set(rvs)) == 4
    listing = await core.list_namespaced_pod(NS)
    assert int(listing.metadata.resource_version) == rvs[-1]
    # A no-op patch does not bump the resourceVersion (as the real API).
    again = await core.patch_namespaced_pod('p1', NS, {'metadata': {'labels': {'a': 'b'}}})
    assert again.metadata.resource_version == patched.metadata.resource_version


async def test_label_and_field_selectors(kube_api: ApiClient) -> None:
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_pod(NS, pod_body('a', {'app': 'ws', 'user': 'ann'}))
    await core.create_namespaced_pod(NS, pod_body('b', {'app': 'ws', 'user': 'bob'}))
    await core.create_namespaced_pod(NS, pod_body('c', {'app': 'other'}))
    await core.create_namespaced_pod('ns2', pod_body('d', {'app': 'ws', 'user': 'ann'}))

    async def sel(label: str | None = None, field: str | None = None, ns: str | None = NS) -> list[str]:
        kwargs = {k: v for k, v in {'label_selector': label, 'field_selector': field}.items() if v}
        if ns:
            pods = await core.list_namespaced_pod(ns, **kwargs)
        else:
            pods = await core.list_pod_for_all_namespaces(**kwargs)
        return sorted(p.metadata.name for p in pods.items)

    assert await sel('app=ws') == ['a', 'b']
    assert await sel('app==ws,user!=bob') == ['a']
    assert await sel('user') == ['a', 'b']
    assert await sel('!user') == ['c']
    assert await sel('user in (bob, carl)') == ['b']
    assert await sel('app notin (other)') == ['a', 'b']
    assert await sel(field='metadata.name=b') == ['b']
    assert await sel(field='metadata.name!=b') == ['a', 'c']
    assert await sel('user=ann', ns=None) == ['a', 'd']
    assert await sel(field='metadata.namespace=ns2', ns=None) == ['d']
    assert await sel(field='status.phase=Pending') == ['a', 'b', 'c']
    with pytest.raises(ApiException) as err:
        await sel('a b c')
    assert err.value.status == 400


# --- watches --------------------------------------------------------------------------------------

async def test_watch_true_streams_added_modified_deleted(
        kube_api: ApiClient, kube_emulator: KubeEmulator) -> None:
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_pod(NS, pod_body('existing'))
    stream = watch.Watch().stream(core.list_namespaced_pod, NS, timeout_seconds=10)
    async with stream:
        first = await collect(stream, 1)
        assert names(first) == [('ADDED', 'existing')]
        assert kube_emulator.watch_count == 1
        assert next(iter(kube_emulator['watch'])).params['watch'] == 'True'  # what the client sends
        await core.create_namespaced_pod(NS, pod_body('new'))
        await core.patch_namespaced_pod('new', NS, {'metadata': {'labels': {'x': 'y'}}})
        deleted = await core.delete_namespaced_pod('existing', NS)
        events = await collect(stream, 4)
    # A pod terminates gracefully: first marked (deletionTimestamp), then removed by the kubelet.
    assert names(events) == [('ADDED', 'new'), ('MODIFIED', 'new'), ('MODIFIED', 'existing'), ('DELETED', 'existing')]
    assert events[1]['object'].metadata.labels == {'x': 'y'}
    rvs = [int(e['raw_object']['metadata']['resourceVersion']) for e in first + events]
    assert rvs == sorted(rvs)
    assert events[2]['raw_object']['metadata']['resourceVersion'] == deleted.metadata.resource_version
    assert deleted.metadata.deletion_timestamp is not None
    assert deleted.metadata.deletion_grace_period_seconds == 30
    # DELETED carries the last state, with the deletion's own resourceVersion.
    assert events[3]['object'].metadata.uid == deleted.metadata.uid
    assert int(events[3]['raw_object']['metadata']['resourceVersion']) > int(deleted.metadata.resource_version)


async def test_watch_custom_objects_and_leases(kube_api: ApiClient) -> None:
    custom, coord = client.CustomObjectsApi(kube_api), client.CoordinationV1Api(kube_api)
    ws_stream = watch.Watch().stream(custom.list_namespaced_custom_object, *WS, NS, 'workspaces',
                                     timeout_seconds=10)
    lease_stream = watch.Watch().stream(coord.list_namespaced_lease, NS, timeout_seconds=10)
    async with ws_stream, lease_stream:
        await custom.create_namespaced_custom_object(*WS, NS, 'workspaces', {'metadata': {'name': 'w1'}})
        await coord.create_namespaced_lease(NS, {'metadata': {'name': 'leader'},
                                                 'spec': {'holderIdentity': 'a'}})
        [ws_event] = await collect(ws_stream, 1)
        [lease_event] = await collect(lease_stream, 1)
    assert ws_event['type'] == 'ADDED'
    assert ws_event['object']['metadata']['name'] == 'w1'
    assert lease_event['object'].spec.holder_identity == 'a'


async def test_watch_from_resource_version(kube_api: ApiClient) -> None:
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_pod(NS, pod_body('p1'))
    listing = await core.list_namespaced_pod(NS)
    await core.create_namespaced_pod(NS, pod_body('p2'))
    await core.delete_namespaced_pod('p1', NS)
    stream = watch.Watch().stream(core.list_namespaced_pod, NS, timeout_seconds=10,
                                  resource_version=listing.metadata.resource_version)
    async with stream:
        events = await collect(stream, 3)
    # No synthetic ADDED p1: replayed history (the pod's graceful deletion is two events).
    assert names(events) == [('ADDED', 'p2'), ('MODIFIED', 'p1'), ('DELETED', 'p1')]


async def test_watch_too_old_resource_version_is_410(
        kube_api: ApiClient, kube_emulator: KubeEmulator) -> None:
    core = client.CoreV1Api(kube_api)
    old_rv = (await core.create_namespaced_pod(NS, pod_body('p1'))).metadata.resource_version
    await core.create_namespaced_pod(NS, pod_body('p2'))
    kube_emulator.compact()
    stream = watch.Watch().stream(core.list_namespaced_pod, NS, resource_version=old_rv, timeout_seconds=5)
    with pytest.raises(ApiException) as err:
        async with stream:
            await collect(stream, 1)
    assert err.value.status == 410
    assert 'too old resource version' in str(err.value.reason)


async def test_watch_label_selector_enter_and_leave(kube_api: ApiClient) -> None:
    core = client.CoreV1Api(kube_api)
    created = await core.create_namespaced_pod(NS, pod_body('p', {'role': 'idle'}))
    # Watch().stream() is lazy: the request starts at the first iteration. Pin it to an RV so that
    # the writes below are seen as events even if they happen before the request arrives.
    stream = watch.Watch().stream(core.list_namespaced_pod, NS, label_selector='role=active',
                                  timeout_seconds=10, resource_version=created.metadata.resource_version)
    async with stream:
        await core.create_namespaced_pod(NS, pod_body('q', {'role': 'idle'}))  # never seen
        await core.patch_namespaced_pod('p', NS, {'metadata': {'labels': {'role': 'active'}}})
        await core.patch_namespaced_pod('p', NS, {'metadata': {'labels': {'role': 'idle'}}})
        events = await collect(stream, 2)
    assert names(events) == [('ADDED', 'p'), ('DELETED', 'p')]


async def test_watch_timeout_seconds_ends_stream(kube_api: ApiClient) -> None:
    core = client.CoreV1Api(kube_api)
    loop = asyncio.get_running_loop()
    started = loop.time()
    stream = watch.Watch().stream(core.list_namespaced_pod, NS, timeout_seconds=1)
    async with asyncio.timeout(5), stream:
        events = [event async for event in stream]
    assert events == []
    assert 0.9 <= loop.time() - started < 4


async def test_dropped_watch_reconnects_from_last_rv(
        kube_api: ApiClient, kube_emulator: KubeEmulator) -> None:
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_pod(NS, pod_body('p1'))
    stream = watch.Watch().stream(core.list_namespaced_pod, NS)  # no timeout_seconds: "watch forever"
    async with stream:
        assert names(await collect(stream, 1)) == [('ADDED', 'p1')]
        assert kube_emulator.drop_watches() == 1
        await core.create_namespaced_pod(NS, pod_body('p2'))
        events = await collect(stream, 1)
        assert names(events) == [('ADDED', 'p2')]  # no duplicate ADDED p1: it resumed from its RV
    assert len(list(kube_emulator['watch'])) == 2
    assert list(kube_emulator['watch'])[1].params['resourceVersion'] == '1'


async def test_aborted_watch_raises_in_client(kube_api: ApiClient, kube_emulator: KubeEmulator) -> None:
    core = client.CoreV1Api(kube_api)
    stream = watch.Watch().stream(core.list_namespaced_pod, NS, timeout_seconds=10)
    async with stream:
        reader = asyncio.create_task(collect(stream, 1))
        await kube_emulator.wait_watches(1)
        kube_emulator.drop_watches(abort=True)
        with pytest.raises((aiohttp.ClientError, ConnectionError)):
            await reader


async def test_watch_error_410_then_compacted(kube_api: ApiClient, kube_emulator: KubeEmulator) -> None:
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_pod(NS, pod_body('p1'))
    stream = watch.Watch().stream(core.list_namespaced_pod, NS)  # retries a 410 once, from its last RV
    async with stream:
        await collect(stream, 1)  # ADDED p1 at RV 1: the client resumes from there
        kube_emulator.create_object('v1/secrets', {'metadata': {'name': 's'}}, namespace=NS)  # RV 2
        kube_emulator.compact()  # RV 1 is too old now
        kube_emulator.drop_watches(error=410)
        with pytest.raises(ApiException) as err:
            await collect(stream, 1)
    assert err.value.status == 410  # the informer must now re-list


# --- writes ---------------------------------------------------------------------------------------

async def test_replace_and_stale_resource_version(kube_api: ApiClient) -> None:
    coord = client.CoordinationV1Api(kube_api)
    lease = await coord.create_namespaced_lease(NS, {'metadata': {'name': 'leader'},
                                                     'spec': {'holderIdentity': 'replica-a'}})
    lease.spec.holder_identity = 'replica-b'
    replaced = await coord.replace_namespaced_lease('leader', NS, lease)
    assert replaced.spec.holder_identity == 'replica-b'
    assert int(replaced.metadata.resource_version) > int(lease.metadata.resource_version)
    assert replaced.metadata.uid == lease.metadata.uid
    lease.spec.holder_identity = 'replica-c'  # still carries the old resourceVersion
    with pytest.raises(ApiException) as err:
        await coord.replace_namespaced_lease('leader', NS, lease)
    assert err.value.status == 409
    assert 'the object has been modified' in str(err.value.body)
    assert (await coord.read_namespaced_lease('leader', NS)).spec.holder_identity == 'replica-b'
    with pytest.raises(ApiException) as err:
        await coord.replace_namespaced_lease('missing', NS, {'metadata': {'name': 'missing'}})
    assert err.value.status == 404
    # A merge patch carrying a stale resourceVersion is a conditional write, too.
    with pytest.raises(ApiException) as err:
        await coord.patch_namespaced_lease('leader', NS, {'metadata': {'resourceVersion': '1'}})
    assert err.value.status == 409


async def test_duplicate_create_and_missing_delete(kube_api: ApiClient) -> None:
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_secret(NS, {'metadata': {'name': 's'}, 'stringData': {'a': 'b'}})
    with pytest.raises(ApiException) as err:
        await core.create_namespaced_secret(NS, {'metadata': {'name': 's'}})
    assert err.value.status == 409
    assert '"reason": "AlreadyExists"' in str(err.value.body)
    assert 'secrets \\"s\\" already exists' in str(err.value.body)
    with pytest.raises(ApiException) as err:
        await core.delete_namespaced_pod('nope', NS)
    assert err.value.status == 404
    assert '"kind": "Status"' in str(err.value.body)
    with pytest.raises(ApiException) as err:
        await core.read_namespaced_pod('nope', NS)
    assert err.value.status == 404
    status = await core.delete_namespaced_secret('s', NS)  # secrets answer with a Status
    assert status.status == 'Success'
    # Re-creating after deletion works and gives a new uid.
    again = await core.create_namespaced_secret(NS, {'metadata': {'name': 's'}})
    assert again.metadata.uid != status.details.uid


async def test_delete_collection(kube_api: ApiClient) -> None:
    core = client.CoreV1Api(kube_api)
    for name, user in [('a', 'ann'), ('b', 'ann'), ('c', 'bob')]:
        await core.create_namespaced_pod(NS, pod_body(name, {'user': user}))
    await core.create_namespaced_pod('ns2', pod_body('d', {'user': 'ann'}))
    await core.delete_collection_namespaced_pod(NS, label_selector='user=ann')
    assert sorted(p.metadata.name for p in (await core.list_pod_for_all_namespaces()).items) == ['c', 'd']
    await core.delete_collection_namespaced_pod(NS)
    assert [p.metadata.name for p in (await core.list_pod_for_all_namespaces()).items] == ['d']


async def test_patch_types(kube_api: ApiClient) -> None:
    custom, core = client.CustomObjectsApi(kube_api), client.CoreV1Api(kube_api)
    await custom.create_namespaced_custom_object(*WS, NS, 'workspaces', {
        'metadata': {'name': 'w'}, 'spec': {'image': 'a', 'ports': [1, 2], 'keep': True}})
    merged = await custom.patch_namespaced_custom_object(
        *WS, NS, 'workspaces', 'w', {'spec': {'image': 'b', 'ports': [3], 'keep': None}}, _content_type=MERGE)
    assert merged['spec'] == {'image': 'b', 'ports': [3]}
    assert merged['metadata']['generation'] == 2
    jsonpatched = await custom.patch_namespaced_custom_object(
        *WS, NS, 'workspaces', 'w', [{'op': 'add', 'path': '/spec/ports/-', 'value': 4}])
    assert jsonpatched['spec']['ports'] == [3, 4]
    # Trap: CustomObjectsApi sends a dict as application/json-patch+json unless told otherwise (400, as real).
    with pytest.raises(ApiException) as err:
        await custom.patch_namespaced_custom_object(*WS, NS, 'workspaces', 'w', {'spec': {'image': 'c'}})
    assert err.value.status == 400
    # CoreV1Api sends dicts as strategic merge patches: applied as merge patches (lists replaced).
    await core.create_namespaced_pod(NS, pod_body('p'))
    pod = await core.patch_namespaced_pod('p', NS, {'metadata': {'annotations': {'a': '1'}}})
    assert pod.metadata.annotations == {'a': '1'}


async def test_status_subresource_separation(kube_api: ApiClient, kube_emulator: KubeEmulator) -> None:
    custom = client.CustomObjectsApi(kube_api)
    created = await custom.create_namespaced_custom_object(*WS, NS, 'workspaces', {
        'metadata': {'name': 'w'}, 'spec': {'size': 1}, 'status': {'phase': 'Forged'}})
    assert 'status' not in created  # not settable on create
    status = await custom.patch_namespaced_custom_object_status(
        *WS, NS, 'workspaces', 'w', {'status': {'phase': 'Running'}, 'spec': {'size': 99}},
        _content_type=MERGE)
    assert status['status'] == {'phase': 'Running'}
    assert status['spec'] == {'size': 1}
    assert status['metadata']['generation'] == 1  # status writes do not bump the generation
    spec = await custom.patch_namespaced_custom_object(
        *WS, NS, 'workspaces', 'w', {'spec': {'size': 2}, 'status': {'phase': 'Hacked'}}, _content_type=MERGE)
    assert spec['spec'] == {'size': 2}
    assert spec['status'] == {'phase': 'Running'}
    assert spec['metadata']['generation'] == 2
    replaced = await custom.replace_namespaced_custom_object_status(
        *WS, NS, 'workspaces', 'w', dict(spec, status={'phase': 'Stopped'}))
    assert replaced['status'] == {'phase': 'Stopped'}
    read = await custom.get_namespaced_custom_object_status(*WS, NS, 'workspaces', 'w')
    assert read['status'] == {'phase': 'Stopped'}
    assert read['spec'] == {'size': 2}
    # The same for pods (core API, strategic-merge content type).
    core = client.CoreV1Api(kube_api)
    await core.create_namespaced_pod(NS, pod_body('p'))
    pod = await core.patch_namespaced_pod('p', NS, {'status': {'phase': 'Running'}})
    assert pod.status.phase == 'Pending'
    pod = await core.patch_namespaced_pod_status('p', NS, {'status': {'phase': 'Running',
                                                                      'podIP': '127.0.0.9'}})
    assert pod.status.phase == 'Running'
    assert pod.status.pod_ip == '127.0.0.9'
    assert kube_emulator.objects[POD, NS, 'p'] >= {'status': {'phase': 'Running'}}  # kmock's own assertions


async def test_finalizers_delay_deletion(kube_api: ApiClient) -> None:
    custom = client.CustomObjectsApi(kube_api)
    created = await custom.create_namespaced_custom_object(*WS, NS, 'workspaces', {
        'metadata': {'name': 'w', 'finalizers': ['codehub.dev/cleanup']}})
    stream = watch.Watch().stream(custom.list_namespaced_custom_object, *WS, NS, 'workspaces',
                                  timeout_seconds=10, resource_version=created['metadata']['resourceVersion'])
    async with stream:
        await custom.delete_namespaced_custom_object(*WS, NS, 'workspaces', 'w')
        marked = await custom.get_namespaced_custom_object(*WS, NS, 'workspaces', 'w')
        assert marked['metadata']['deletionTimestamp']
        await custom.patch_namespaced_custom_object(*WS, NS, 'workspaces', 'w',
                                                    {'metadata': {'finalizers': None}}, _content_type=MERGE)
        events = await collect(stream, 3)
    assert [e['type'] for e in events] == ['MODIFIED', 'MODIFIED', 'DELETED']
    assert events[0]['object']['metadata']['deletionTimestamp']
    assert 'finalizers' not in events[2]['object']['metadata']
    with pytest.raises(ApiException) as err:
        await custom.get_namespaced_custom_object(*WS, NS, 'workspaces', 'w')
    assert err.value.status == 404


async def test_several_api_clients(kube: KubeEnv) -> None:
    a, b = kube.new_api_client(), kube.new_api_client()
    assert a is not b
    assert a.configuration.host == b.configuration.host == kube.url
    await client.CoreV1Api(a).create_namespaced_pod(NS, pod_body('p'))
    assert [p.metadata.name for p in (await client.CoreV1Api(b).list_namespaced_pod(NS)).items] == ['p']


async def test_in_memory_helpers(kube_emulator: KubeEmulator) -> None:
    created = kube_emulator.create_object(WORKSPACE, {'metadata': {'name': 'w'}, 'spec': {'a': 1}},
                                          namespace=NS)
    assert created['metadata']['resourceVersion'] == str(kube_emulator.resource_version)
    waiter = asyncio.create_task(kube_emulator.wait_for(WORKSPACE, NS, 'w', lambda o: 'status' in o))
    await asyncio.sleep(0.01)
    kube_emulator.patch_status(WORKSPACE, NS, 'w', {'phase': 'Ready'})
    assert (await waiter)['status'] == {'phase': 'Ready'}
    assert [o['metadata']['name'] for o in kube_emulator.list_objects(WORKSPACE, NS)] == ['w']
    kube_emulator.delete_object(WORKSPACE, NS, 'w')
    await kube_emulator.wait_gone(WORKSPACE, NS, 'w')


# --- the kubelet ----------------------------------------------------------------------------------

async def test_fake_kubelet(kube_api: ApiClient, kube_emulator: KubeEmulator) -> None:
    core, custom = client.CoreV1Api(kube_api), client.CustomObjectsApi(kube_api)
    ips = LoopbackIPs(first=10)
    await core.create_namespaced_pod(NS, pod_body('before'))  # existing pods are started too
    async with FakeKubelet(kube_emulator, pod_ip=ips, snapshot_delay=0.2):
        await core.create_namespaced_pod(NS, pod_body('after'))
        stream = watch.Watch().stream(core.list_namespaced_pod, NS, field_selector='status.phase=Running',
                                      timeout_seconds=10)
        async with stream:
            running = {e['object'].metadata.name: e['object'] for e in await collect(stream, 2)}
        assert {p.status.pod_ip for p in running.values()} == {'127.0.0.10', '127.0.0.11'}
        assert ips.mapping[(NS, 'after')] == running['after'].status.pod_ip
        ready = {c.type: c.status for c in running['after'].status.conditions}
        assert ready['Ready'] == 'True'
        assert running['after'].status.container_statuses[0].ready is True

        await core.create_namespaced_persistent_volume_claim(NS, {
            'metadata': {'name': 'home'},
            'spec': {'accessModes': ['ReadWriteOnce'], 'resources': {'requests': {'storage': '5Gi'}}}})
        pvc = await kube_emulator.wait_for(PVC, NS, 'home', lambda o: o['status'].get('phase') == 'Bound')
        assert pvc['status']['capacity'] == {'storage': '5Gi'}

        await custom.create_namespaced_custom_object(*SNAPSHOTS, NS, 'volumesnapshots', {
            'metadata': {'name': 'snap'}, 'spec': {'source': {'persistentVolumeClaimName': 'home'}}})
        snap = await custom.get_namespaced_custom_object(*SNAPSHOTS, NS, 'volumesnapshots', 'snap')
        assert not (snap.get('status') or {}).get('readyToUse')  # not yet: delayed
        snap = await kube_emulator.wait_for(VOLUME_SNAPSHOT, NS, 'snap',
                                            lambda o: (o.get('status') or {}).get('readyToUse') is True)
        assert snap['status']['boundVolumeSnapshotContentName']


async def test_fake_kubelet_manual_start_and_readiness(
        kube_api: ApiClient, kube_emulator: KubeEmulator) -> None:
    core = client.CoreV1Api(kube_api)
    async with FakeKubelet(kube_emulator, pod_ip=lambda pod: None) as kubelet:  # leave pods Pending
        await core.create_namespaced_pod(NS, pod_body('p'))
        await asyncio.sleep(0.05)
        assert (await core.read_namespaced_pod('p', NS)).status.phase == 'Pending'
        kubelet.start_pod(NS, 'p', '127.0.0.7')
        kubelet.set_pod_ready(NS, 'p', False)
        pod = await core.read_namespaced_pod('p', NS)
        assert pod.status.phase == 'Running'
        assert pod.status.pod_ip == '127.0.0.7'
        assert {c.type: c.status for c in pod.status.conditions}['Ready'] == 'False'


# --- fault injection ------------------------------------------------------------------------------

async def test_fault_500_then_success(kube_api: ApiClient, kube_emulator: KubeEmulator) -> None:
    core = client.CoreV1Api(kube_api)
    fault = kube_emulator.fail('post', POD, status=500, times=1)
    with pytest.raises(ApiException) as err:
        await core.create_namespaced_pod(NS, pod_body('p'))
    assert err.value.status == 500
    assert kube_emulator.get_object(POD, NS, 'p') is None  # nothing was written while failing
    pod = await core.create_namespaced_pod(NS, pod_body('p'))
    assert pod.metadata.name == 'p'
    assert len(list(fault)) == 1


async def test_fault_409_on_lease_and_raw_dsl(kube_api: ApiClient, kube_emulator: KubeEmulator) -> None:
    coord = client.CoordinationV1Api(kube_api)
    lease = await coord.create_namespaced_lease(NS, {'metadata': {'name': 'l'},
                                                     'spec': {'holderIdentity': 'a'}})
    kube_emulator.fail('put', LEASE, status=409, times=2)
    for _ in range(2):
        with pytest.raises(ApiException) as err:
            await coord.replace_namespaced_lease('l', NS, lease)
        assert err.value.status == 409
    await coord.replace_namespaced_lease('l', NS, lease)
    # The plain kmock DSL works too (here: every GET of this lease answers 503 until the reaction is removed;
    # beware: `[:1]` would mean "the first matching request ever", not "the next one").
    kube_emulator['get', LEASE, kube_emulator.name('l')] << 503 << {'kind': 'Status', 'code': 503}
    with pytest.raises(ApiException) as err:
        await coord.read_namespaced_lease('l', NS)
    assert err.value.status == 503


async def test_fault_410_on_watch(kube_api: ApiClient, kube_emulator: KubeEmulator) -> None:
    core = client.CoreV1Api(kube_api)
    kube_emulator.fail('watch', POD, status=410)
    stream = watch.Watch().stream(core.list_namespaced_pod, NS, timeout_seconds=5)
    with pytest.raises(ApiException) as err:
        async with stream:
            await collect(stream, 1)
    assert err.value.status == 410
    stream = watch.Watch().stream(core.list_namespaced_pod, NS, timeout_seconds=1)  # the next one works
    async with stream:
        assert [e async for e in stream] == []


async def test_shutdown_with_open_watch() -> None:
    loop = asyncio.get_running_loop()
    async with running_emulator() as env:
        core = client.CoreV1Api(env.api_client)
        stream = watch.Watch().stream(core.list_namespaced_pod, NS)
        reader = asyncio.create_task(collect(stream, 1, within=20))
        await env.emulator.wait_watches(1)
        started = loop.time()
    assert loop.time() - started < 3
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    await stream.close()

"""
A Kubernetes API emulator for tests: ``kmock.KubernetesEmulator`` (kmock==0.8) made close enough
to a real API server for the kubernetes-asyncio client and for controllers/watchers built on it.

What this subclass adds or replaces (the kmock DSL for user reactions keeps working on top of it):

* ``watch=True`` / ``watch=1`` are recognised as watches (kmock only knows ``watch=true``).
* ``labelSelector`` (``a=b``, ``a==b``, ``a!=b``, ``a``, ``!a``, ``a in (x,y)``, ``a notin (x,y)``)
  and ``fieldSelector`` (``=``, ``==``, ``!=`` on any dotted path, e.g. ``metadata.name``,
  ``metadata.namespace``, ``status.phase``) on list, watch and deletecollection.
* A cluster-wide, monotonic ``metadata.resourceVersion`` set on every write; lists carry it in
  ``metadata.resourceVersion``; watches honour ``resourceVersion`` (events after it, replayed from
  an in-memory history) and answer a too-old one with an ``ERROR`` event of code 410 (Expired).
* ``uid``, ``creationTimestamp``, ``generation`` (bumped on spec changes), the namespace from the
  URL, ``generateName``, ``apiVersion``/``kind`` filled in on create.
* PUT (replace, 409 Conflict on a stale ``resourceVersion``), deletecollection, 409 AlreadyExists,
  404 NotFound, 400/422/415 answers: all as ``Status`` objects like the real API.
* Declared resources (see ``DEFAULT_RESOURCES``) list as empty instead of 404 and are discoverable.
* ``/status`` subresource separation for resources declaring the ``status`` subresource: writes to
  ``/status`` change only ``.status``; writes to the main resource never change ``.status``.
* Patches: JSON patch (a list) and merge patch; strategic-merge patch is applied as a merge patch
  (lists are replaced, not merged by key); apply-patch (server-side apply) answers 415.
* Watch streams: JSON lines ``{"type": ADDED|MODIFIED|DELETED|ERROR, "object": ...}``;
  ``timeoutSeconds`` ends the stream; objects entering/leaving a selector produce ADDED/DELETED;
  tests can end or abort the streams (:meth:`KubeEmulator.drop_watches`).
* Deletion: a ``DELETED`` event carrying the last state (with a new resourceVersion); objects with
  finalizers get ``deletionTimestamp`` and disappear when the last finalizer is removed.

Entry points for tests: :func:`running_emulator` (async context manager), the fixtures
``kube``, ``kube_emulator``, ``kube_url``, ``kube_api``, ``kube_api_factory`` (import them into a
conftest, or add ``pytest_plugins = ["tests.kube.emulator"]`` to the root ``tests/conftest.py``),
:class:`tests.kube.kubelet.FakeKubelet` and :class:`tests.kube.kubelet.LoopbackIPs`.

Usage::

    async def test_x(kube: KubeEnv) -> None:          # or kube_api / kube_emulator / kube_url
        core = client.CoreV1Api(kube.api_client)
        other_replica = kube.new_api_client()          # own session; closed at teardown
        async with FakeKubelet(kube.emulator, pod_ip=LoopbackIPs()):
            ...

    async with running_emulator() as env: ...          # without pytest fixtures

Fault injection (kmock DSL; user reactions outrank the emulator's own fallback handlers, and while
a fault answers, nothing is written)::

    emu.fail('post', POD, status=500)                  # the next POST of a pod -> 500, then normal
    emu.fail('put', LEASE, status=409, times=2)        # the next two lease replaces -> 409
    emu.fail('watch', POD, status=410)                 # the next pod watch -> ERROR event, code 410
    emu.fail('get', POD, emu.name('p'), times=None)    # for ever (kmock criteria: 'get'/'post'/...,
                                                       # 'list'/'watch'/'fetch'/'create'/'update',
                                                       # resources, emu.namespace(), emu.name(), dicts
                                                       # of params/headers, callables(request))
    emu['get', LEASE] << 503 << {'kind': 'Status', 'code': 503}   # raw DSL: for ever
    emu['get', LEASE][:1] << 503   # BEWARE: [:1] = the first matching request *ever*, not the next

Dropping watches: ``emu.drop_watches()`` ends streams cleanly (kubernetes-asyncio's Watch without
``timeout_seconds`` reconnects from its last RV), ``abort=True`` resets the connection,
``error=410`` sends an ERROR event first; ``emu.compact()`` makes older RVs answer 410 Gone.
``emu.wait_watches(n)`` waits until n streams are open (Watch().stream() is lazy: the request starts
at the first iteration, so pin ``resource_version=`` or wait before writing).
"""
from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import copy
import datetime
import itertools
import json
import random
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from typing import Any

import attrs
import jsonpatch  # a dependency of kmock
import kmock
import pytest_asyncio
from kmock._internal import rendering  # Response(status=..., payload=...): not re-exported by kmock 0.8
from kubernetes_asyncio.client import ApiClient, Configuration

from tests.kube.controllers import ADMISSION_FINALIZERS, FOREGROUND, Controllers
from tests.kube.schemas import Schema, chart_schemas, check

__all__ = [
    'DEFAULT_RESOURCES',
    'EmulatorApiError',
    'KubeEmulator',
    'KubeEnv',
    'k8s_status',
    'kube',
    'kube_api',
    'kube_api_factory',
    'kube_emulator',
    'kube_url',
    'running_emulator',
]

ALL_VERBS = {'create', 'delete', 'deletecollection', 'get', 'list', 'patch', 'update', 'watch'}

POD = kmock.resource('', 'v1', 'pods')
PVC = kmock.resource('', 'v1', 'persistentvolumeclaims')
SECRET = kmock.resource('', 'v1', 'secrets')
LEASE = kmock.resource('coordination.k8s.io', 'v1', 'leases')
VOLUME_SNAPSHOT = kmock.resource('snapshot.storage.k8s.io', 'v1', 'volumesnapshots')
WORKSPACE = kmock.resource('codehub.dev', 'v1alpha1', 'workspaces')
SHARE_LINK = kmock.resource('codehub.dev', 'v1alpha1', 'sharelinks')
API_TOKEN = kmock.resource('codehub.dev', 'v1alpha1', 'apitokens')
CONSENT = kmock.resource('codehub.dev', 'v1alpha1', 'identityconsents')
USED_KEY = kmock.resource('codehub.dev', 'v1alpha1', 'usedkeys')


def _info(kind: str, singular: str, *, namespaced: bool = True, status: bool = False,
          shortnames: Iterable[str] = ()) -> kmock.ResourceInfo:
    return kmock.ResourceInfo(kind=kind, singular=singular, namespaced=namespaced, verbs=set(ALL_VERBS),
                              shortnames=set(shortnames), subresources={'status'} if status else set())


# Resources that exist (listable when empty, discoverable). Those with the `status` subresource
# get the spec/status separation. Extend with `KubeEmulator(resources={...})` or `emu.resources[...]`.
DEFAULT_RESOURCES: dict[str, kmock.ResourceInfo] = {
    'v1/pods': _info('Pod', 'pod', status=True, shortnames={'po'}),
    'v1/persistentvolumeclaims': _info('PersistentVolumeClaim', 'persistentvolumeclaim', status=True,
                                       shortnames={'pvc'}),
    'v1/secrets': _info('Secret', 'secret'),
    'v1/configmaps': _info('ConfigMap', 'configmap', shortnames={'cm'}),
    'v1/services': _info('Service', 'service', status=True, shortnames={'svc'}),
    'v1/events': _info('Event', 'event', shortnames={'ev'}),
    'v1/namespaces': _info('Namespace', 'namespace', namespaced=False, status=True, shortnames={'ns'}),
    'coordination.k8s.io/v1/leases': _info('Lease', 'lease'),
    'snapshot.storage.k8s.io/v1/volumesnapshots': _info('VolumeSnapshot', 'volumesnapshot', status=True,
                                                        shortnames={'vs'}),
    'codehub.dev/v1alpha1/workspaces': _info('Workspace', 'workspace', status=True, shortnames={'ws'}),
    'codehub.dev/v1alpha1/sharelinks': _info('ShareLink', 'sharelink', status=True),
    'codehub.dev/v1alpha1/apitokens': _info('ApiToken', 'apitoken', status=True),
    'codehub.dev/v1alpha1/identityconsents': _info('IdentityConsent', 'identityconsent'),
    'codehub.dev/v1alpha1/usedkeys': _info('UsedKey', 'usedkey'),
}

# The real API answers DELETE of these with a `Status` (kind: Status, status: Success), not the object.
_DELETE_RETURNS_STATUS = {'secrets', 'configmaps', 'leases', 'events'}

MERGE_PATCH = 'application/merge-patch+json'
_REASONS = {400: 'BadRequest', 403: 'Forbidden', 404: 'NotFound', 409: 'Conflict', 410: 'Expired',
            422: 'Invalid', 429: 'TooManyRequests', 500: 'InternalError', 503: 'ServiceUnavailable',
            504: 'Timeout'}
_GENERATE_ALPHABET = 'bcdfghjklmnpqrstvwxz2456789'  # as in k8s.io/apimachinery/pkg/util/rand


def k8s_status(code: int, reason: str, message: str = '', details: Mapping[str, Any] | None = None,
               ) -> dict[str, Any]:
    """A `Status` object as the real API returns it for failures (also usable as a DSL payload)."""
    status: dict[str, Any] = {
        'kind': 'Status', 'apiVersion': 'v1', 'metadata': {},
        'status': 'Failure' if code >= 300 else 'Success',
        'message': message, 'reason': reason, 'code': code,
    }
    if details:
        status['details'] = dict(details)
    return status


class EmulatorApiError(Exception):
    """Raised by the in-memory helpers (KubeEmulator.create/patch/...) where the API would answer non-2xx."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"{status} {body.get('reason')}: {body.get('message')}")
        self.status = status
        self.body = body


_Result = tuple[int, dict[str, Any]]


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')


def _res(resource: str | kmock.resource) -> kmock.resource:
    return resource if isinstance(resource, kmock.resource) else kmock.resource(resource)


def _qualified(resource: kmock.resource) -> str:
    return f'{resource.plural}.{resource.group}' if resource.group else f'{resource.plural}'


def _api_version(resource: kmock.resource) -> str:
    return f'{resource.group}/{resource.version}' if resource.group else f'{resource.version}'


# --- selectors ---------------------------------------------------------------------------------

Selector = Callable[[Mapping[str, Any]], bool]
_KEY = r'[A-Za-z0-9][-A-Za-z0-9_./]*'
_VAL = r'[-A-Za-z0-9_.]*'


def _split_terms(text: str) -> list[str]:
    terms, depth, current = [], 0, ''
    for char in text:
        if char == ',' and depth == 0:
            terms.append(current)
            current = ''
            continue
        depth += (char == '(') - (char == ')')
        current += char
    terms.append(current)
    return [term.strip() for term in terms if term.strip()]


def _label_term(op: str, key: str, values: frozenset[str], labels: Mapping[str, Any]) -> bool:
    match op:
        case '=' | 'in':
            return key in labels and labels[key] in values
        case '!=' | 'notin':  # also true when the label is absent, as in Kubernetes
            return labels.get(key) not in values
        case 'exists':
            return key in labels
        case _:  # '!exists'
            return key not in labels


def parse_label_selector(text: str | None) -> Selector:
    """Equality-, set- and existence-based label selectors, as `kubectl -l`. Raises ValueError."""
    terms: list[tuple[str, str, frozenset[str]]] = []
    for term in _split_terms(text or ''):
        if m := re.fullmatch(rf'({_KEY})\s*(==|=|!=)\s*({_VAL})', term):
            key, op, val = m.groups()
            terms.append(('!=' if op == '!=' else '=', key, frozenset([val])))
        elif m := re.fullmatch(rf'({_KEY})\s+(in|notin)\s*\(([^()]*)\)', term):
            key, op, vals = m.groups()
            terms.append((op, key, frozenset(v.strip() for v in vals.split(',') if v.strip())))
        elif m := re.fullmatch(rf'(!?)\s*({_KEY})', term):
            neg, key = m.groups()
            terms.append(('!exists' if neg else 'exists', key, frozenset()))
        else:
            raise ValueError(f'unable to parse requirement: {term!r}')

    def selector(obj: Mapping[str, Any]) -> bool:
        labels = (obj.get('metadata') or {}).get('labels') or {}
        return all(_label_term(op, key, values, labels) for op, key, values in terms)
    return selector


def _dig(obj: Mapping[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split('.'):
        value = value.get(part) if isinstance(value, Mapping) else None
    if value is None:
        return ''
    if isinstance(value, bool):
        return 'true' if value else 'false'
    return str(value)


def parse_field_selector(text: str | None) -> Selector:
    """`path=value`, `path==value`, `path!=value` on any dotted path (lenient: the real API whitelists)."""
    terms: list[tuple[str, bool, str]] = []
    for term in _split_terms(text or ''):
        m = re.fullmatch(r'([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*)', term)
        if not m:
            raise ValueError(f'invalid field selector: {term!r}')
        path, op, val = m.groups()
        terms.append((path, op != '!=', val))

    def selector(obj: Mapping[str, Any]) -> bool:
        return all((_dig(obj, path) == val) == equal for path, equal, val in terms)
    return selector


# --- patches -----------------------------------------------------------------------------------

def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (also used for strategic-merge patches: lists are replaced)."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# --- events & watches --------------------------------------------------------------------------

@attrs.frozen
class Event:
    rv: int
    resource: kmock.resource
    type: str  # ADDED | MODIFIED | DELETED
    object: dict[str, Any]  # the new state (for DELETED: the last state with the deletion's RV)
    old: dict[str, Any] | None  # the previous state, if any


@attrs.define(eq=False)
class _Watcher:
    resource: kmock.resource
    namespace: str | None
    name: str | None
    selector: Selector
    stop: str | None = None  # None | 'end' | 'abort' | 'error'
    error: dict[str, Any] | None = None

    def matches(self, obj: Mapping[str, Any] | None) -> bool:
        if obj is None:
            return False
        meta = obj.get('metadata') or {}
        return ((self.namespace is None or meta.get('namespace') == self.namespace)
                and (self.name is None or meta.get('name') == self.name)
                and self.selector(obj))

    def translate(self, event: Event) -> dict[str, Any] | None:
        if event.resource != self.resource:
            return None
        now, before = self.matches(event.object), self.matches(event.old)
        if event.type == 'DELETED':
            return {'type': 'DELETED', 'object': event.object} if now else None
        if now and (before or event.type == 'ADDED'):
            return {'type': event.type, 'object': event.object}
        if now:  # started to match the selector
            return {'type': 'ADDED', 'object': event.object}
        if before:  # stopped to match the selector: the real API sends the old state as DELETED
            old = copy.deepcopy(event.old)
            assert old is not None
            old.setdefault('metadata', {})['resourceVersion'] = str(event.rv)
            return {'type': 'DELETED', 'object': old}
        return None


# --- the emulator ------------------------------------------------------------------------------

class UnhandledRequest(kmock.KMockError):  # type: ignore[name-defined,misc]  # kmock exports it untyped
    """No reaction answers the request: recorded as a server error, so a test with check_errors fails."""


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    """
    kmock's emulator with a resourceVersion-consistent store, selectors, PUT, deletecollection,
    status subresources and real watch semantics. See the module docstring.

    State: ``emu.objects`` (kmock's ObjectsArray; every write appends a version to the history),
    ``emu.resource_version`` (the cluster-wide counter), ``emu.requests``-like views via the DSL
    (``list(emu['put'])``), ``emu.errors`` (internal failures, should stay empty).
    """

    resources_init: Mapping[str, kmock.ResourceInfo] | None = attrs.field(default=None, alias='resources')
    max_history: int = 10_000  # watch events kept for watch-from-RV; older RVs answer 410
    bookmark_interval: float = 1.0  # seconds between BOOKMARK events on a quiet watch that asked for them
    schemas: Mapping[str, Schema] | None = None  # CRD schemas by "group/version/plural" (see tests.kube.schemas)
    pruned: list[str] = attrs.field(factory=list, init=False)  # unknown fields dropped, as "plural/name: path"
    _strict: bool = attrs.field(default=False, init=False)

    _rv: int = attrs.field(default=0, init=False)
    _log: list[Event] = attrs.field(factory=list, init=False)
    _floor: int = attrs.field(default=0, init=False)  # events with rv <= floor are compacted away
    # Per resource, the (namespace, name) of its objects in list order; dropped when one is added. A page of
    # a list starts by bisection, as an API server's watch cache serves it: 100,000 objects (bench.scale) listed
    # 500 at a time took a deep copy and a sort of all of them per page (seconds each), which the gateway's
    # informers waited for (it failed to start: its sync timeout ran out in the emulator).
    _order: dict[kmock.resource, list[tuple[str, str]]] = attrs.field(factory=dict, init=False)
    _changed: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    _watchers: set[_Watcher] = attrs.field(factory=set, init=False)
    controllers: Controllers = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()  # registers discovery + the (overridden) _serve_* fallbacks
        self.controllers = Controllers(self)
        for key, info in {**DEFAULT_RESOURCES, **(self.resources_init or {})}.items():
            self.resources[key] = copy.deepcopy(info)
        self.fallback['get /apis/'] << self._serve_apis  # kubernetes-asyncio's ApisApi asks with the slash
        self.fallback['get /api/'] << self._serve_api
        self.fallback[self._is_replace] << self._serve_replace
        self.fallback[self._is_delete_collection] << self._serve_delete_collection

    # -- kmock plumbing --

    @staticmethod
    def _is_replace(request: kmock.Request) -> bool:
        return bool(request.method == kmock.method.PUT and request.resource is not None
                    and request.resource.plural and request.name)

    @staticmethod
    def _is_delete_collection(request: kmock.Request) -> bool:
        return bool(request.method == kmock.method.DELETE and request.resource is not None
                    and request.resource.plural and not request.name)

    async def _handle(self, request: kmock.Request) -> Any:
        # 1. kmock only recognises `watch=true`; kubernetes-asyncio sends `watch=True`.
        if (request.resource is not None and request.method == kmock.method.GET
                and str(request.params.get('watch', '')).lower() in ('true', '1')):
            object.__setattr__(request, 'action', kmock.action.WATCH)  # frozen attrs; keep identity
        # 2. Dispatch over the DSL reactions like kmock.RawHandler._handle does, but (a) skip
        #    KubernetesEmulator._handle, which mutates the store *before* user reactions (so an injected
        #    500 would still have created the object), and (b) test simple filter chains against this one
        #    request instead of `request in view`, which re-filters the whole request history (O(n^2)).
        #    kmock also passes over reactions that call themselves non-actionable ("matched, nothing to
        #    answer"); none here do, so such a signal surfaces as the server error it would be.
        priorities = [payload.priorities for payload in self._payloads]
        width = max((len(p) for p in priorities), default=0)
        keys = [tuple(-p for p in prio) + (0,) * (width - len(prio)) for prio in priorities]
        order = sorted(range(len(keys)), key=lambda index: keys[index])
        for payload in [self._payloads[index] for index in order]:
            if payload._disabled.is_set() or not self._sees(payload._source, request):
                continue
            try:
                return await payload(request)
            except rendering.ReactionMismatchError:
                payload._disabled.set()
        raise UnhandledRequest(f'No reaction matches {request.method} {request.url}.')

    def _sees(self, view: kmock.View, request: kmock.Request) -> bool:
        if view is self:
            return True
        if type(view) is kmock.Priority:
            return self._sees(view._source, request)
        if type(view) is kmock.Filter:
            return bool(view.criteria(request)) and self._sees(view._source, request)
        return request in view  # slices, groups, exclusions, streams: kmock's own (history-based) logic

    @staticmethod
    def _respond(result: _Result) -> rendering.Response:
        # Always with an explicit status: kmock copies an inner Response's status onto the (shared)
        # reaction's Response, so a 404 would otherwise stick to the next answers of the same fallback.
        return rendering.Response(status=result[0], payload=result[1])

    # -- the store core --

    @property
    def resource_version(self) -> int:
        """The current cluster-wide resourceVersion (as an int; the API shows it as a string)."""
        return self._rv

    def _declared(self, resource: kmock.resource) -> kmock.ResourceInfo | None:
        if resource in self.resources:
            return self.resources[resource]
        if resource in self._get_resources():
            return kmock.ResourceInfo()
        return None

    def _namespaced(self, resource: kmock.resource, url_namespace: str | None) -> bool:
        info = self._declared(resource)
        if info is not None and info.namespaced is not None:
            return info.namespaced
        return url_namespace is not None

    def _has_status(self, resource: kmock.resource) -> bool:
        info = self._declared(resource)
        return info is not None and 'status' in info.subresources

    def _current(self, resource: kmock.resource, namespace: str | None, name: str) -> dict[str, Any] | None:
        key = (resource, namespace, name)
        if key not in self._objects:
            return None
        obj = self._objects[key]
        return None if obj.deleted else copy.deepcopy(obj.raw)

    def _all(self, resource: kmock.resource, namespace: str | None) -> list[dict[str, Any]]:
        return [copy.deepcopy(obj) for obj in self._in_order(resource, namespace)]

    def _in_order(self, resource: kmock.resource, namespace: str | None,
                  after: tuple[str, str] = ('', '')) -> Iterator[dict[str, Any]]:
        """The live objects of ``resource`` (in ``namespace``, or all) in list order, from past ``after``; not
        copied (callers copy what they hand out)."""
        order = self._order.get(resource)
        if order is None:
            order = self._order[resource] = sorted((ns or '', name) for (res, ns, name) in self._objects
                                                   if res == resource)
        start = bisect.bisect_right(order, after)
        if namespace is not None and after < (namespace, ''):
            start = bisect.bisect_left(order, (namespace, ''), start)
        for ns, name in order[start:] if start else order:
            if namespace is not None and ns != namespace:  # past it: it starts at ``start`` at the latest
                return
            obj = self._objects[(resource, ns or None, name)]
            if not obj.deleted:
                yield obj.raw

    def _commit(self, resource: kmock.resource, type_: str, obj: dict[str, Any],
                old: dict[str, Any] | None) -> dict[str, Any]:
        self._rv += 1
        obj = copy.deepcopy(obj)
        meta = obj.setdefault('metadata', {})
        meta['resourceVersion'] = str(self._rv)
        key = (resource, meta.get('namespace'), meta['name'])
        if type_ == 'DELETED':
            self._objects[key].delete()
        elif key not in self._objects:
            self._objects[key] = copy.deepcopy(obj)
            self._order.pop(resource, None)  # a key it lacks (a deleted object keeps its key, marked deleted)
        else:
            self._objects[key].history.append(copy.deepcopy(obj))
        self._log.append(Event(self._rv, resource, type_, copy.deepcopy(obj), old))
        if len(self._log) > self.max_history:
            cut = len(self._log) - self.max_history // 2
            self._floor = self._log[cut - 1].rv
            del self._log[:cut]
        self._notify()
        return obj

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    @property
    def changed(self) -> asyncio.Event:
        """Set (and replaced) on the next change of the store or of the open watches."""
        return self._changed

    def live_objects(self) -> list[tuple[kmock.resource, dict[str, Any]]]:
        """Every object that exists now (terminating ones included), for the cluster's controllers: to read, not to
        change (not copied: a write replaces an object, never changes it in place). The controllers look at all of
        them on every change, and a copy of 200,000 (bench.scale) took seconds each time, the API stalled meanwhile."""
        return [(res, obj.raw) for (res, _, _), obj in self._objects.items() if not obj.deleted]

    def remove(self, resource: kmock.resource, obj: Mapping[str, Any]) -> None:
        """The end of a graceful deletion: the object goes if it is still that one, terminating, unfinalized."""
        meta = obj['metadata']
        current = self._current(resource, meta.get('namespace'), meta['name'])
        if (current is not None and current['metadata'].get('uid') == meta.get('uid')
                and current['metadata'].get('deletionTimestamp') and not current['metadata'].get('finalizers')):
            self._commit(resource, 'DELETED', current, current)

    def compact(self, upto: int | None = None) -> int:
        """Forget the event history up to RV ``upto`` (default: all of it), as etcd compaction does: watches
        and continue tokens from older RVs get 410 Gone."""
        self._floor = self._rv if upto is None else upto
        self._log = [event for event in self._log if event.rv > self._floor]
        return self._floor

    def events_after(self, rv: int) -> list[Event] | None:
        """Every change after ``rv``, or None once the history was compacted past it."""
        if rv < self._floor:
            return None  # too old
        return self._log[bisect.bisect_right(self._log, rv, key=lambda e: e.rv):]

    # -- CRD schemas --

    def _admit(self, resource: kmock.resource, obj: dict[str, Any]) -> tuple[dict[str, Any], _Result | None]:
        """Validate a custom object against its CRD schema and prune unknown fields, as the API server does."""
        schema = (self.schemas or {}).get(f'{resource.group}/{resource.version}/{resource.plural}')
        if schema is None:
            return obj, None
        kept, errors, pruned = check(schema, obj)
        name = str((obj.get('metadata') or {}).get('name') or '')
        if errors:
            return obj, self._invalid(resource, name, ', '.join(errors))
        if pruned and self._strict:
            return obj, self._bad_request(f'strict decoding error: unknown field "{pruned[0]}"')
        self.pruned.extend(f'{resource.plural}/{name}: {path}' for path in pruned)
        return kept, None

    @contextlib.contextmanager
    def _strictness(self, request: kmock.Request) -> Iterator[None]:
        """``fieldValidation=Strict`` for the (synchronous) operation run inside."""
        self._strict = request.params.get('fieldValidation') == 'Strict'
        try:
            yield
        finally:
            self._strict = False

    # -- errors --

    def _not_found(self, resource: kmock.resource, name: str) -> _Result:
        return 404, k8s_status(404, 'NotFound', f'{_qualified(resource)} "{name}" not found',
                               {'name': name, 'group': resource.group, 'kind': resource.plural})

    @staticmethod
    def _no_resource() -> _Result:
        return 404, k8s_status(404, 'NotFound', 'the server could not find the requested resource')

    @staticmethod
    def _bad_request(message: str) -> _Result:
        return 400, k8s_status(400, 'BadRequest', message)

    def _invalid(self, resource: kmock.resource, name: str, message: str) -> _Result:
        info = self._declared(resource) or kmock.ResourceInfo()
        kind = info.kind or resource.plural
        return 422, k8s_status(422, 'Invalid', f'{kind} "{name}" is invalid: {message}',
                               {'name': name, 'group': resource.group, 'kind': kind})

    def _conflict(self, resource: kmock.resource, name: str) -> _Result:
        return 409, k8s_status(
            409, 'Conflict',
            f'Operation cannot be fulfilled on {_qualified(resource)} "{name}": the object has been modified;'
            ' please apply your changes to the latest version and try again',
            {'name': name, 'group': resource.group, 'kind': resource.plural})

    # -- operations (shared by the HTTP handlers and the in-memory helpers) --

    def op_create(self, resource: kmock.resource, url_namespace: str | None, body: Any,
                  *, dry_run: bool = False) -> _Result:
        info = self._declared(resource)
        if info is None:
            return self._no_resource()
        if not isinstance(body, Mapping):
            return self._bad_request('the body of the request must be a JSON object')
        obj = copy.deepcopy(dict(body))
        meta = obj.setdefault('metadata', {})
        if self._namespaced(resource, url_namespace):
            if url_namespace and meta.get('namespace') and meta['namespace'] != url_namespace:
                return self._bad_request('the namespace of the provided object does not match'
                                         ' the namespace sent on the request')
            namespace = url_namespace or meta.get('namespace') or 'default'
            meta['namespace'] = namespace
        else:
            namespace = None
            meta.pop('namespace', None)
        if not meta.get('name'):
            if not meta.get('generateName'):
                return self._invalid(resource, '',
                                     'metadata.name: Required value: name or generateName is required')
            for _ in range(100):
                name = meta['generateName'] + ''.join(random.choices(_GENERATE_ALPHABET, k=5))
                if self._current(resource, namespace, name) is None:
                    break
            meta['name'] = name
        name = meta['name']
        if self._current(resource, namespace, name) is not None:
            return 409, k8s_status(409, 'AlreadyExists', f'{_qualified(resource)} "{name}" already exists',
                                   {'name': name, 'group': resource.group, 'kind': resource.plural})
        obj['apiVersion'] = _api_version(resource)
        obj['kind'] = info.kind or obj.get('kind') or resource.plural
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        for field in ('resourceVersion', 'deletionTimestamp', 'deletionGracePeriodSeconds'):
            meta.pop(field, None)
        if resource in ADMISSION_FINALIZERS:
            meta['finalizers'] = [*(meta.get('finalizers') or []), *ADMISSION_FINALIZERS[resource]]
        if 'status' in info.subresources:  # status is not settable on create; the "controllers" set it
            obj.pop('status', None)
            if resource in (POD, PVC):
                obj['status'] = {'phase': 'Pending'}
        obj, invalid = self._admit(resource, obj)
        if invalid is not None:
            return invalid
        if dry_run:
            return 201, obj
        return 201, self._commit(resource, 'ADDED', obj, None)

    def op_get(self, resource: kmock.resource, namespace: str | None, name: str) -> _Result:
        if self._declared(resource) is None:
            return self._no_resource()
        namespace = namespace if self._namespaced(resource, namespace) else None
        obj = self._current(resource, namespace, name)
        return (200, obj) if obj is not None else self._not_found(resource, name)

    def op_list(self, resource: kmock.resource, namespace: str | None,
                label_selector: str | None = None, field_selector: str | None = None, *,
                after: tuple[str, str] = ('', ''), most: int | None = None) -> _Result:
        """The objects that match, in list order: past ``after`` (namespace, name), at most ``most``."""
        info = self._declared(resource)
        if info is None:
            return self._no_resource()
        try:
            labels, fields = parse_label_selector(label_selector), parse_field_selector(field_selector)
        except ValueError as e:
            return self._bad_request(str(e))
        matching = (obj for obj in self._in_order(resource, namespace, after) if labels(obj) and fields(obj))
        items = copy.deepcopy(list(itertools.islice(matching, most)))
        return 200, {
            'apiVersion': _api_version(resource),
            'kind': f'{info.kind or resource.plural}List',
            'metadata': {'resourceVersion': str(self._rv)},
            'items': items,
        }

    def _finish_update(self, resource: kmock.resource, old: dict[str, Any], new: dict[str, Any],
                       subresource: str | None, *, dry_run: bool) -> _Result:
        meta, old_meta = new.setdefault('metadata', {}), old['metadata']
        if subresource == 'status':  # only .status changes; everything else stays
            new = dict(copy.deepcopy(old), status=new.get('status'))
            if new['status'] is None:
                del new['status']
            meta = new['metadata']
        elif subresource is not None:
            return 404, k8s_status(404, 'NotFound', f'the subresource {subresource!r} is not supported')
        elif self._has_status(resource):  # the main resource never changes .status
            new.pop('status', None)
            if 'status' in old:
                new['status'] = copy.deepcopy(old['status'])
        for field in ('name', 'namespace', 'uid', 'creationTimestamp', 'generation', 'deletionTimestamp',
                      'deletionGracePeriodSeconds'):
            if field in old_meta:
                meta[field] = old_meta[field]
            else:
                meta.pop(field, None)
        if old_meta.get('deletionTimestamp') and len(meta.get('finalizers') or []) > len(
                old_meta.get('finalizers') or []):
            return 422, k8s_status(422, 'Invalid',
                                   'no new finalizers can be added if the object is being deleted')
        new['apiVersion'], new['kind'] = old.get('apiVersion'), old.get('kind')
        new, invalid = self._admit(resource, new)
        if invalid is not None:
            return invalid
        meta = new['metadata']
        def body_of(obj: Mapping[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in obj.items() if k not in ('metadata', 'status')}

        if body_of(new) != body_of(old):
            meta['generation'] = int(old_meta.get('generation') or 1) + 1
        meta['resourceVersion'] = old_meta.get('resourceVersion')
        if new == old:
            return 200, old  # a no-op write: the real API does not bump the resourceVersion either
        if dry_run:
            return 200, new
        stored = self._commit(resource, 'MODIFIED', new, old)
        if meta.get('deletionTimestamp') and old_meta.get('finalizers') and not meta.get('finalizers'):
            self._commit(resource, 'DELETED', stored, stored)
        return 200, stored

    def op_replace(self, resource: kmock.resource, namespace: str | None, name: str, body: Any,
                   subresource: str | None = None, *, dry_run: bool = False) -> _Result:
        if self._declared(resource) is None:
            return self._no_resource()
        if not isinstance(body, Mapping):
            return self._bad_request('the body of the request must be a JSON object')
        namespace = namespace if self._namespaced(resource, namespace) else None
        old = self._current(resource, namespace, name)
        if old is None:
            return self._not_found(resource, name)
        new = copy.deepcopy(dict(body))
        meta = new.setdefault('metadata', {})
        if meta.get('name') and meta['name'] != name:
            return self._bad_request('the name of the object does not match the name on the URL')
        if meta.get('namespace') and namespace and meta['namespace'] != namespace:
            return self._bad_request('the namespace of the provided object does not match'
                                     ' the namespace sent on the request')
        if meta.get('resourceVersion') and meta['resourceVersion'] != old['metadata']['resourceVersion']:
            return self._conflict(resource, name)
        return self._finish_update(resource, old, new, subresource, dry_run=dry_run)

    def op_patch(self, resource: kmock.resource, namespace: str | None, name: str, patch: Any,
                 content_type: str = 'application/merge-patch+json', subresource: str | None = None,
                 *, dry_run: bool = False) -> _Result:
        if self._declared(resource) is None:
            return self._no_resource()
        namespace = namespace if self._namespaced(resource, namespace) else None
        old = self._current(resource, namespace, name)
        if old is None:
            return self._not_found(resource, name)
        content_type = content_type.split(';')[0].strip().lower()
        if content_type == 'application/json-patch+json':
            if not isinstance(patch, list):
                return self._bad_request('json: cannot unmarshal object into Go value of type jsonpatch.Patch'
                                         ' (a JSON patch must be a list; for dicts pass'
                                         ' _content_type="application/merge-patch+json")')
            try:
                new = jsonpatch.apply_patch(copy.deepcopy(old), patch)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                return self._invalid(resource, name, f'the JSON patch cannot be applied: {e}')
        elif content_type in ('application/merge-patch+json', 'application/strategic-merge-patch+json'):
            if not isinstance(patch, Mapping):
                return self._bad_request('a merge patch must be a JSON object')
            expected_rv = (patch.get('metadata') or {}).get('resourceVersion')
            if expected_rv and expected_rv != old['metadata']['resourceVersion']:
                return self._conflict(resource, name)
            new = merge_patch(old, patch)
        else:
            return 415, k8s_status(415, 'UnsupportedMediaType',
                                   f'the emulator does not support the patch type {content_type!r}')
        if not isinstance(new, dict):
            return self._bad_request('the patched object is not a JSON object')
        return self._finish_update(resource, old, new, subresource, dry_run=dry_run)

    def op_delete(self, resource: kmock.resource, namespace: str | None, name: str,
                  options: Any = None, *, dry_run: bool = False) -> _Result:
        if self._declared(resource) is None:
            return self._no_resource()
        namespace = namespace if self._namespaced(resource, namespace) else None
        old = self._current(resource, namespace, name)
        if old is None:
            return self._not_found(resource, name)
        preconditions = (options or {}).get('preconditions') or {} if isinstance(options, Mapping) else {}
        if preconditions.get('resourceVersion') not in (None, old['metadata']['resourceVersion']):
            return self._conflict(resource, name)
        if preconditions.get('uid') not in (None, old['metadata'].get('uid')):
            return self._conflict(resource, name)
        if dry_run:
            return 200, old
        policy = options.get('propagationPolicy') if isinstance(options, Mapping) else None
        finalizers = list(old['metadata'].get('finalizers') or [])
        if policy == 'Foreground' and FOREGROUND not in finalizers:
            finalizers.append(FOREGROUND)
        if finalizers or resource == POD:  # pods always terminate gracefully (the kubelet removes them)
            if old['metadata'].get('deletionTimestamp'):
                return 202, old
            new = copy.deepcopy(old)
            grace = ((old.get('spec') or {}).get('terminationGracePeriodSeconds', 30) if resource == POD else 0)
            new['metadata'].update(deletionTimestamp=_now(), deletionGracePeriodSeconds=grace)
            if finalizers:
                new['metadata']['finalizers'] = finalizers
            return 202 if resource != POD else 200, self._commit(resource, 'MODIFIED', new, old)
        gone = self._commit(resource, 'DELETED', old, old)
        if resource.plural in _DELETE_RETURNS_STATUS:
            return 200, {'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Success',
                         'details': {'name': name, 'group': resource.group, 'kind': resource.plural,
                                     'uid': old['metadata'].get('uid')}}
        return 200, gone

    def op_delete_collection(self, resource: kmock.resource, namespace: str | None,
                             label_selector: str | None = None, field_selector: str | None = None,
                             options: Any = None, *, dry_run: bool = False) -> _Result:
        code, listing = self.op_list(resource, namespace, label_selector, field_selector)
        if code != 200:
            return code, listing
        deleted = []
        for obj in listing['items']:
            meta = obj['metadata']
            code, result = self.op_delete(resource, meta.get('namespace'), meta['name'], options,
                                          dry_run=dry_run)
            if code < 300 and result.get('kind') != 'Status':
                deleted.append(result)
        listing['items'] = deleted
        listing['metadata'] = {'resourceVersion': str(self._rv)}
        return 200, listing

    # -- HTTP handlers (registered as kmock fallbacks: user DSL reactions outrank them) --

    @staticmethod
    def _dry(request: kmock.Request) -> bool:
        return request.params.get('dryRun') == 'All'

    async def _serve_create(self, request: kmock.Request) -> rendering.Response:
        assert request.resource is not None
        if request.subresource:
            return self._respond((404, k8s_status(404, 'NotFound', 'subresources are not supported on POST')))
        with self._strictness(request):
            return self._respond(self.op_create(request.resource, request.namespace, request.data,
                                                dry_run=self._dry(request)))

    async def _serve_fetch(self, request: kmock.Request) -> rendering.Response:
        assert request.resource is not None
        assert request.name is not None
        if request.subresource not in (None, 'status'):
            message = f'no subresource {request.subresource!r}'
            return self._respond((404, k8s_status(404, 'NotFound', message)))
        return self._respond(self.op_get(request.resource, request.namespace, request.name))

    async def _serve_list(self, request: kmock.Request) -> rendering.Response:
        assert request.resource is not None
        if not request.resource.plural:  # e.g. /api/v1/ with a slash (kubernetes-asyncio's discovery)
            return rendering.Response(status=200, payload=await self._serve_version(request))
        params = request.params
        if not (params.get('limit') or params.get('continue')):
            return self._respond(self.op_list(request.resource, request.namespace,
                                              params.get('labelSelector'), params.get('fieldSelector')))
        return self._respond(self._page(request.resource, request.namespace, params))

    def _page(self, resource: kmock.resource, namespace: str | None, params: Mapping[str, str]) -> _Result:
        """``limit``/``continue`` as the real API: a continue token names the list's RV and the last object served;
        once that RV is compacted away the token answers 410 Expired (the client lists again from the start)."""
        try:
            size = int(params['limit']) if params.get('limit') else None
            rv, after_ns, after_name = (json.loads(base64.urlsafe_b64decode(params['continue']))
                                        if params.get('continue') else (None, '', ''))
            after = (str(after_ns), str(after_name))
        except (ValueError, TypeError):
            return self._bad_request('invalid limit or continue parameter')
        if rv is not None and int(rv) < self._floor:
            return 410, k8s_status(410, 'Expired', 'The provided continue parameter is too old to display a'
                                   ' consistent list result. You can start a new list without the continue parameter.')
        code, listing = self.op_list(resource, namespace, params.get('labelSelector'), params.get('fieldSelector'),
                                     after=after, most=size + 1 if size else None)
        if code != 200:
            return code, listing
        if rv is not None:
            listing['metadata']['resourceVersion'] = str(rv)
        if size and len(listing['items']) > size:
            del listing['items'][size:]
            last = listing['items'][-1]['metadata']
            listing['metadata']['continue'] = base64.urlsafe_b64encode(json.dumps(
                [int(listing['metadata']['resourceVersion']), last.get('namespace') or '', last['name']]
            ).encode()).decode()
            if not (params.get('labelSelector') or params.get('fieldSelector')):  # as the API: only then
                listing['metadata']['remainingItemCount'] = self._after(resource, namespace,
                                                                        (last.get('namespace') or '', last['name']))
        return 200, listing

    def _after(self, resource: kmock.resource, namespace: str | None, key: tuple[str, str]) -> int:
        """How many objects come after ``key`` in list order: an estimate, as the API's is (deleted ones count)."""
        order = self._order[resource]
        end = len(order) if namespace is None else bisect.bisect_left(order, (namespace + '\0', ''))
        return end - bisect.bisect_right(order, key)

    async def _serve_replace(self, request: kmock.Request) -> rendering.Response:
        assert request.resource is not None
        assert request.name is not None
        with self._strictness(request):
            return self._respond(self.op_replace(request.resource, request.namespace, request.name, request.data,
                                                 request.subresource, dry_run=self._dry(request)))

    async def _serve_update(self, request: kmock.Request) -> rendering.Response:  # PATCH
        assert request.resource is not None
        assert request.name is not None
        with self._strictness(request):
            return self._respond(self.op_patch(
                request.resource, request.namespace, request.name, request.data,
                request.headers.get('Content-Type', 'application/merge-patch+json'), request.subresource,
                dry_run=self._dry(request)))

    async def _serve_delete(self, request: kmock.Request) -> rendering.Response:
        assert request.resource is not None
        assert request.name is not None
        return self._respond(self.op_delete(request.resource, request.namespace, request.name, request.data,
                                            dry_run=self._dry(request)))

    async def _serve_delete_collection(self, request: kmock.Request) -> rendering.Response:
        assert request.resource is not None
        return self._respond(self.op_delete_collection(
            request.resource, request.namespace, request.params.get('labelSelector'),
            request.params.get('fieldSelector'), request.data, dry_run=self._dry(request)))

    async def _serve_watch(self, request: kmock.Request) -> rendering.Response:  # type: ignore[override]
        resource = request.resource
        assert resource is not None
        if self._declared(resource) is None:
            return self._respond(self._no_resource())
        try:
            selector_l = parse_label_selector(request.params.get('labelSelector'))
            selector_f = parse_field_selector(request.params.get('fieldSelector'))
            timeout_param = request.params.get('timeoutSeconds')
            timeout = float(timeout_param) if timeout_param else None
            rv_param = request.params.get('resourceVersion') or ''
            since = int(rv_param) if rv_param not in ('', '0') else None
        except ValueError as e:
            return self._respond(self._bad_request(str(e)))
        namespace = request.namespace if self._namespaced(resource, request.namespace) else None
        watcher = _Watcher(resource, namespace, request.name, lambda o: selector_l(o) and selector_f(o))
        if since is None:  # "any"/"most recent": synthetic ADDED for the current state, then live
            initial = [obj for obj in self._all(resource, namespace) if watcher.matches(obj)]
            since = self._rv
        else:
            initial = []
        self._watchers.add(watcher)
        self._notify()  # wakes wait_watches()
        stream = self._watch_stream(request, watcher, since, initial, timeout)
        return rendering.Response(status=200, headers={'Content-Type': 'application/json'}, payload=stream)

    async def _watch_stream(self, request: kmock.Request, watcher: _Watcher, since: int,
                            initial: list[dict[str, Any]], timeout_s: float | None) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        raw = request._raw_request
        try:
            yield b''  # send the headers now, even if nothing happens for a while
            for obj in initial:
                yield {'type': 'ADDED', 'object': obj}
            position = since
            bookmarks = str(request.params.get('allowWatchBookmarks', '')).lower() == 'true'
            quiet_since = loop.time()
            while watcher.stop is None:
                changed = self._changed
                events = self.events_after(position)
                if events is None:
                    yield {'type': 'ERROR', 'object': k8s_status(
                        410, 'Expired', f'too old resource version: {position} ({self._floor + 1})')}
                    return
                for event in events:
                    position = event.rv
                    translated = watcher.translate(event)
                    if translated is not None:
                        quiet_since = loop.time()
                        yield translated
                    if watcher.stop is not None:
                        break
                if events:
                    continue
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return  # timeoutSeconds: the server ends the stream normally
                if bookmarks and loop.time() - quiet_since >= self.bookmark_interval:
                    quiet_since = loop.time()
                    info = self._declared(watcher.resource)
                    yield {'type': 'BOOKMARK', 'object': {
                        'kind': info.kind if info is not None else '', 'apiVersion': _api_version(watcher.resource),
                        'metadata': {'resourceVersion': str(position)}}}
                if raw is not None and (raw.transport is None or raw.transport.is_closing()):
                    return  # the client went away
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), 0.5 if remaining is None else min(remaining, 0.5))
            if watcher.stop == 'error' and watcher.error is not None:
                yield {'type': 'ERROR', 'object': watcher.error}
            elif watcher.stop == 'abort' and raw is not None and raw.transport is not None:
                raw.transport.abort()  # a connection reset: the client sees a payload/disconnect error
        finally:
            self._watchers.discard(watcher)
            self._notify()

    # -- test controls --

    @property
    def watch_count(self) -> int:
        """How many watch streams are open right now."""
        return len(self._watchers)

    def watches_of(self, resource: str | kmock.resource) -> int:
        """How many watch streams of one resource are open right now."""
        res = _res(resource)
        return sum(watcher.resource == res for watcher in self._watchers)

    def drop_watches(self, resource: str | kmock.resource | None = None, *, abort: bool = False,
                     error: int | None = None, message: str = '') -> int:
        """
        Close the open watch streams (all, or of one resource); returns how many.

        * default: end the stream cleanly (as a server-side timeout): kubernetes-asyncio's
          ``Watch().stream()`` without ``timeout_seconds`` silently reconnects from its last RV;
          with ``timeout_seconds`` it stops iterating.
        * ``abort=True``: reset the TCP connection (aiohttp raises ClientPayloadError or similar).
        * ``error=410`` (or any code): send an ``ERROR`` event with a Status of that code, then end.
          Combine with :meth:`compact` to make the reconnection from the last RV fail with 410 too.
        """
        res = None if resource is None else _res(resource)
        count = 0
        for watcher in list(self._watchers):
            if res is None or watcher.resource == res:
                count += 1
                if error is not None:
                    reason = _REASONS.get(error, 'Error')
                    watcher.stop, watcher.error = 'error', k8s_status(error, reason, message or reason)
                else:
                    watcher.stop = 'abort' if abort else 'end'
        self._notify()
        return count

    async def wait_watches(self, count: int = 1, *, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until at least `count` watch streams are open (e.g. before writing in a test)."""
        async with asyncio.timeout(timeout):
            while self.watch_count < count:
                await self._changed.wait()

    def fail(self, *criteria: Any, status: int = 500, times: int | None = 1, reason: str | None = None,
             message: str = 'injected fault', retry_after: int | None = None,
             watch_payload: bytes | None = None) -> Any:
        """
        Inject a fault for the *next* `times` requests matching kmock criteria (None: for ever).

        E.g. ``emu.fail('post', POD, status=500)``, ``emu.fail('put', LEASE, status=409)``,
        ``emu.fail('watch', POD, status=410)``. Nothing is written while the fault answers.
        ``emu.fail('watch', POD, status=200)`` is a watch that ends at once, cleanly and empty.
        Watch requests get HTTP 200 + an ``ERROR`` event (as the real API does mid-stream);
        other requests get the HTTP status with a ``Status`` body. When depleted, the reaction
        disables itself and the emulator serves normally. Returns the kmock reaction: assert on
        ``len(list(reaction))`` for how many requests it answered. ``watch_payload``: a watch gets these bytes
        instead (what no API server sends: a line that is not an event).
        """
        body = k8s_status(status, reason or _REASONS.get(status, 'Error'), message)
        left = [times]
        reactions: list[Any] = []

        def answer(request: kmock.Request) -> Any:
            if left[0] is not None:
                if left[0] <= 0:
                    return StopIteration  # kmock: "depleted" -> disable this reaction, fall through
                left[0] -= 1
                if left[0] <= 0:
                    reactions[0]._disabled.set()  # so that it does not even record the next request
            if request.action == kmock.action.WATCH:
                line = json.dumps({'type': 'ERROR', 'object': body}).encode() + b'\n'
                if watch_payload is not None:
                    line = watch_payload
                return rendering.Response(status=200, payload=line if status != 200 else b'\n')
            headers = {'Retry-After': str(retry_after)} if retry_after is not None else {}
            return rendering.Response(status=status, payload=body, headers=headers)

        view = self[criteria] if criteria else self
        reactions.append(view << answer)
        return reactions[0]

    # -- in-memory API for tests and fake controllers (same semantics, RVs and events as HTTP) --

    @staticmethod
    def _raise(result: _Result) -> dict[str, Any]:
        if result[0] >= 300:
            raise EmulatorApiError(*result)
        return result[1]

    def get_object(self, resource: str | kmock.resource, namespace: str | None,
                   name: str) -> dict[str, Any] | None:
        code, body = self.op_get(_res(resource), namespace, name)
        return body if code == 200 else None

    def list_objects(self, resource: str | kmock.resource, namespace: str | None = None, *,
             label_selector: str | None = None, field_selector: str | None = None) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self._raise(
            self.op_list(_res(resource), namespace, label_selector, field_selector))['items']
        return items

    def create_object(self, resource: str | kmock.resource, body: Mapping[str, Any],
               namespace: str | None = None) -> dict[str, Any]:
        return self._raise(self.op_create(_res(resource), namespace, body))

    def patch_object(self, resource: str | kmock.resource, namespace: str | None, name: str,
              patch: Mapping[str, Any] | list[Any], *, subresource: str | None = None) -> dict[str, Any]:
        content_type = 'application/json-patch+json' if isinstance(patch, list) else MERGE_PATCH
        return self._raise(self.op_patch(_res(resource), namespace, name, patch, content_type, subresource))

    def patch_status(self, resource: str | kmock.resource, namespace: str | None, name: str,
                     status: Mapping[str, Any]) -> dict[str, Any]:
        return self.patch_object(resource, namespace, name, {'status': dict(status)}, subresource='status')

    def delete_object(self, resource: str | kmock.resource, namespace: str | None,
                      name: str) -> dict[str, Any]:
        return self._raise(self.op_delete(_res(resource), namespace, name))

    async def events(self, resource: str | kmock.resource | None = None, *,
                     since: int | None = None) -> AsyncIterator[Event]:
        """All store events (of one resource or all) after RV `since` (default: from now), for ever."""
        res = None if resource is None else _res(resource)
        position = self._rv if since is None else since
        while True:
            changed = self._changed
            events = self.events_after(position)
            if events is None:
                message = f'too old resource version: {position}'
                raise EmulatorApiError(410, k8s_status(410, 'Expired', message))
            for event in events:
                position = event.rv
                if res is None or event.resource == res:
                    yield event
            if not events:
                await changed.wait()

    async def wait_for(self, resource: str | kmock.resource, namespace: str | None, name: str,
                       predicate: Callable[[dict[str, Any]], bool] | None = None, *,
                       timeout: float = 5.0) -> dict[str, Any]:  # noqa: ASYNC109
        """Wait until the object exists (and satisfies `predicate`); return it."""
        async with asyncio.timeout(timeout):
            while True:
                changed = self._changed
                obj = self.get_object(resource, namespace, name)
                if obj is not None and (predicate is None or predicate(obj)):
                    return obj
                await changed.wait()

    async def wait_gone(self, resource: str | kmock.resource, namespace: str | None, name: str, *,
                        timeout: float = 5.0) -> None:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            while self.get_object(resource, namespace, name) is not None:
                await self._changed.wait()


# --- running it ---------------------------------------------------------------------------------

@attrs.define
class KubeEnv:
    """What the fixtures yield: the emulator, its URL, a ready ApiClient, and a factory for more."""
    emulator: KubeEmulator
    url: str
    api_client: ApiClient
    _clients: list[ApiClient] = attrs.field(factory=list)

    def new_api_client(self) -> ApiClient:
        """Another independent ApiClient (own aiohttp session) against the emulator; closed at exit."""
        client = ApiClient(configuration=Configuration(host=self.url))
        self._clients.append(client)
        return client


@contextlib.asynccontextmanager
async def running_emulator(*, check_errors: bool = True, **kwargs: Any) -> AsyncIterator[KubeEnv]:
    """
    Start a KubeEmulator on 127.0.0.1:<free port>; yield a :class:`KubeEnv`; stop everything.

    `kwargs` go to KubeEmulator (e.g. ``resources={...}``, ``max_history=...``). With `check_errors`,
    exceptions raised inside the emulator (its bugs, or exceptions injected via the DSL other than
    kmock.KubernetesError) fail the exit with an ExceptionGroup.
    """
    emulator = KubeEmulator(**kwargs)
    async with emulator, kmock.Server(emulator, host='127.0.0.1') as server:
        env = KubeEnv(emulator=emulator, url=str(server.url).rstrip('/'),
                      api_client=ApiClient(configuration=Configuration(host=str(server.url).rstrip('/'))))
        env._clients.append(env.api_client)
        emulator.controllers.start()
        try:
            yield env
        finally:
            await emulator.controllers.stop()
            for client in env._clients:
                await client.close()
            emulator.drop_watches()  # or the server shutdown waits for the open streams
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    while emulator.watch_count:
                        await emulator._changed.wait()
            errors = [e for e in emulator.errors if not isinstance(e, kmock.KubernetesError)]
            if emulator.pruned:  # a real API server would have lost these fields without a word
                errors.append(AssertionError(f'unknown fields pruned by the CRD schemas: {emulator.pruned}'))
            if check_errors and errors:
                raise ExceptionGroup('errors inside the Kubernetes emulator', errors)


@pytest_asyncio.fixture()
async def kube() -> AsyncIterator[KubeEnv]:
    """The running emulator with everything (the chart's CRD schemas included): .emulator, .url, .api_client,
    .new_api_client()."""
    async with running_emulator(schemas=chart_schemas()) as env:
        yield env


@pytest_asyncio.fixture()
async def kube_emulator(kube: KubeEnv) -> KubeEmulator:
    return kube.emulator


@pytest_asyncio.fixture()
async def kube_url(kube: KubeEnv) -> str:
    return kube.url


@pytest_asyncio.fixture()
async def kube_api(kube: KubeEnv) -> ApiClient:
    return kube.api_client


@pytest_asyncio.fixture()
async def kube_api_factory(kube: KubeEnv) -> Callable[[], ApiClient]:
    return kube.new_api_client

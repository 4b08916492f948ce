"""A thin, dict-in dict-out client over kubernetes-asyncio's ``ApiClient``: one table of kinds, single attempts.

Every call here is one HTTP request. "Already there" (409 on create) and "already gone" (404 on delete) are
answers, not errors; the retry loop for transient failures (:func:`retrying`) lives outside, so the caller
decides what is worth repeating. Objects stay plain JSON dicts, the same shape for core and custom kinds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import ApiClient, Configuration

from gateway.config import Kubernetes
from gateway.lifecycle.base import LifecycleError
from gateway.lifecycle.kubernetes.throttle import Throttle

log = logging.getLogger(__name__)
T = TypeVar("T")
JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"


@dataclass(frozen=True, slots=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        path = f"{base}/namespaces/{namespace}/{self.plural}"
        if name is not None:
            path += f"/{name}"
        if subresource is not None:
            path += f"/{subresource}"
        return path


POD = Resource("", "v1", "pods", "Pod")
PVC = Resource("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim")
SNAPSHOT = Resource("snapshot.storage.k8s.io", "v1", "volumesnapshots", "VolumeSnapshot")
WORKSPACE = Resource("codehub.dev", "v1alpha1", "workspaces", "Workspace")
LEASE = Resource("coordination.k8s.io", "v1", "leases", "Lease")
SHARE_LINK = Resource("codehub.dev", "v1alpha1", "sharelinks", "ShareLink")
API_TOKEN = Resource("codehub.dev", "v1alpha1", "apitokens", "ApiToken")
CONSENT = Resource("codehub.dev", "v1alpha1", "identityconsents", "IdentityConsent")
USED_KEY = Resource("codehub.dev", "v1alpha1", "usedkeys", "UsedKey")
EVENT = Resource("", "v1", "events", "Event")

TRANSIENT = frozenset({0, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER = 30.0


class KubeError(Exception):
    """A non-2xx answer (``status``) or no answer at all (``status`` 0: connection refused, reset, timeout)."""

    def __init__(self, status: int, reason: str, message: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {reason}: {message}" if status else f"{reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after  # seconds the server asked us to wait (429, 503), if it said

    @property
    def transient(self) -> bool:
        return self.status in TRANSIENT


class Gone(KubeError):
    """410: the resourceVersion a watch asked for is compacted away; list again."""


def unavailable(error: Exception) -> LifecycleError:
    """The one error users see when an operation needs the API and cannot reach it."""
    detail = error.message or error.reason if isinstance(error, KubeError) else str(error) or type(error).__name__
    return LifecycleError(f"Kubernetes API unavailable ({detail}); try again shortly.", code="kubernetes-unavailable",
                         headers={"Retry-After": "5"})


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: rare from an API server; the backoff applies instead


def _error(status: int, body: bytes, retry_after: float | None = None) -> KubeError:
    try:
        data = json.loads(body)
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    reason = str(data.get("reason") or "Error")
    message = str(data.get("message") or body[:200].decode("utf-8", "replace"))
    return (Gone if status == 410 else KubeError)(status, reason, message, retry_after=retry_after)


async def connect(settings: Kubernetes) -> ApiClient:
    """An ApiClient for ``api_url`` (tests, ``kubectl proxy``), the in-cluster service account, or a kubeconfig."""
    configuration = Configuration()
    if settings.api_url is not None:
        configuration.host = settings.api_url
    elif settings.in_cluster:
        kube_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        path = str(settings.kubeconfig) if settings.kubeconfig else None
        await kube_config.load_kube_config(config_file=path, client_configuration=configuration)
    # Six watches stay open (4 runtime, 2 tokens), two per explained wake (at most 32), and operations need room.
    configuration.connection_pool_maxsize = 64
    return ApiClient(configuration=configuration)


class KubeClient:
    """Single-attempt calls in one namespace; every method raises :class:`KubeError` on failure."""

    def __init__(self, api: ApiClient, namespace: str, *, timeout: float = 10.0, throttle: Throttle | None = None,
                 page_size: int = 500) -> None:
        self.api = api
        self.namespace = namespace
        self.timeout = timeout
        self.throttle = throttle
        self.page_size = page_size
        self.pages = 0
        """Pages of lists answered: how the first fill of the caches shows it is getting on (``Informers.start``)."""

    async def _send(self, method: str, path: str, *, query: Mapping[str, str] | None = None,
                    body: Any = None, content_type: str = JSON,
                    limits: aiohttp.ClientTimeout | None = None) -> aiohttp.ClientResponse:
        try:
            response: aiohttp.ClientResponse = await self.api.call_api(
                path, method, query_params=list((query or {}).items()),
                header_params={"Accept": JSON, "Content-Type": content_type}, body=body,
                auth_settings=["BearerToken"], _preload_content=False,
                _request_timeout=limits or aiohttp.ClientTimeout(total=self.timeout),
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise KubeError(0, type(exc).__name__, str(exc)) from exc
        if response.status >= 300:
            try:
                body_bytes = await response.read()
            except (aiohttp.ClientError, OSError, TimeoutError):
                body_bytes = b""
            finally:
                response.release()
            raise _error(response.status, body_bytes, _seconds(response.headers.get("Retry-After")))
        return response

    async def request(self, method: str, path: str, *, query: Mapping[str, str] | None = None, body: Any = None,
                      content_type: str = JSON) -> dict[str, Any]:
        async with self.throttle.request() if self.throttle is not None else contextlib.nullcontext():
            response = await self._send(method, path, query=query, body=body, content_type=content_type)
            try:
                data = await response.json(content_type=None)
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                raise KubeError(0, type(exc).__name__, str(exc)) from exc
            finally:
                response.release()
        if not isinstance(data, dict):
            raise KubeError(0, "BadResponse", f"{method} {path} answered {type(data).__name__}")
        return data

    async def create(self, kind: Resource, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """The created object, or None when one of that name is already there (409 = done)."""
        try:
            return await self.request("POST", kind.path(self.namespace), body=body)
        except KubeError as exc:
            if exc.status == 409:
                return None
            raise

    async def get(self, kind: Resource, name: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", kind.path(self.namespace, name))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def delete(self, kind: Resource, name: str, *, uid: str | None = None, foreground: bool = False) -> bool:
        """True if this call deleted it, False if it was already gone (404 = done).

        With ``uid``, only that very object (409 if the name now belongs to another: also "not ours, done");
        with ``foreground``, the object stays until the garbage collector has deleted everything it owns.
        """
        options: dict[str, Any] = {}
        if uid is not None:
            options["preconditions"] = {"uid": uid}
        if foreground:
            options["propagationPolicy"] = "Foreground"
        try:
            await self.request("DELETE", kind.path(self.namespace, name), body=options or None)
        except KubeError as exc:
            if exc.status == 404 or (exc.status == 409 and uid is not None):
                return False
            raise
        return True

    async def patch(self, kind: Resource, name: str, patch: Mapping[str, Any], *,
                    subresource: str | None = None) -> dict[str, Any]:
        """A JSON merge patch (RFC 7386): maps merge, lists are replaced, ``None`` removes a key."""
        return await self.request("PATCH", kind.path(self.namespace, name, subresource), body=patch,
                                  content_type=MERGE_PATCH)

    async def replace(self, kind: Resource, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """PUT; with ``metadata.resourceVersion`` set, a stale write answers 409."""
        return await self.request("PUT", kind.path(self.namespace, name), body=body)

    async def list(self, kind: Resource, *, label_selector: str | None = None,
                   field_selector: str | None = None) -> dict[str, Any]:
        """Every item, fetched in pages of ``page_size`` (``limit``/``continue``), as one list at one version.

        A continue token that expired (410: the list's version was compacted meanwhile) starts the list again.
        """
        query = _selectors(label_selector, field_selector)
        for _ in range(3):
            items: list[Any] = []
            token = ""
            try:
                while True:
                    ask = {**query, "limit": str(self.page_size), **({"continue": token} if token else {})}
                    page = await self.request("GET", kind.path(self.namespace), query=ask)
                    self.pages += 1
                    items.extend(page.get("items") or [])
                    token = str((page.get("metadata") or {}).get("continue") or "")
                    if not token:
                        return {**page, "items": items}
            except Gone:
                if not token:
                    raise
                log.info("list of %s expired between pages; listing again", kind.plural)
        raise KubeError(410, "Expired", f"the list of {kind.plural} kept expiring between pages")

    @contextlib.asynccontextmanager
    async def watch(self, kind: Resource, resource_version: str, *, label_selector: str | None = None,
                    field_selector: str | None = None,
                    timeout_seconds: int = 300) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """A watch stream of ``{"type", "object"}`` events after ``resource_version``; ERROR events raise."""
        query = {"watch": "true", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                 "timeoutSeconds": str(timeout_seconds), **_selectors(label_selector, field_selector)}
        if self.throttle is not None:
            await self.throttle.token()
        response = await self._send("GET", kind.path(self.namespace), query=query,
                                    limits=aiohttp.ClientTimeout(sock_connect=self.timeout,
                                                                 sock_read=timeout_seconds + self.timeout))

        async def events() -> AsyncIterator[dict[str, Any]]:
            while True:
                try:
                    line = await response.content.readline()
                except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                    raise KubeError(0, type(exc).__name__, str(exc)) from exc
                if not line:
                    return
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError as exc:
                    raise KubeError(0, "BadWatchEvent", line[:200].decode("utf-8", "replace")) from exc
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    code = int(status.get("code") or 500)
                    raise (Gone if code == 410 else KubeError)(code, str(status.get("reason") or "Error"),
                                                               str(status.get("message") or ""))
                yield event

        try:
            yield events()
        finally:
            response.release()
            response.close()


def _selectors(labels: str | None, fields: str | None) -> dict[str, str]:
    query = {"labelSelector": labels, "fieldSelector": fields}
    return {key: value for key, value in query.items() if value}


async def retrying(call: Callable[[], Awaitable[T]], *, attempts: int = 5, first_delay: float = 0.2,
                   max_delay: float = 5.0, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> T:
    """Run a single-attempt call again on transient failures (5xx, 429, no answer), with jittered backoff.

    Anything else is the caller's answer to handle. When the attempts run out, the failure becomes the one
    503 users see: "Kubernetes API unavailable".
    """
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except KubeError as exc:
            if not exc.transient:
                raise
            if attempt == attempts:
                raise unavailable(exc) from exc
            log.warning("Kubernetes API call failed (attempt %d of %d), retrying: %s", attempt, attempts, exc)
            pause = delay * (0.5 + random.random())
            if exc.retry_after is not None:  # the server said when (429, 503): not sooner, within reason
                pause = max(pause, min(exc.retry_after, MAX_RETRY_AFTER))
        await sleep(pause)
        delay = min(delay * 2, max_delay)
    raise AssertionError("unreachable")

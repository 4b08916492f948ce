"""One list+watch cache per kind: the gateway's memory of the cluster.

The loop (as kubespawner's reflector): list (in pages), then watch from the list's resourceVersion; a watch
that ends is resumed from the last resourceVersion seen — at once, unless it ended at once and empty: then with
backoff and jitter, as for errors. BOOKMARK events move the version on, so a quiet kind resumes without a
re-list. 410 Gone (history compacted) means list again; any other failure backs off exponentially and tries
again, for ever, until cancelled. Cancellation is always re-raised.

While the API cannot be reached the cache keeps serving the last state it saw (``healthy`` turns False), so
routing keeps working for RUNNING workspaces; operations that need the API check ``healthy`` and fail clearly.

:class:`Informers` is the replica's one registry of them: the runtime's view and the token store register the
kinds they read (several listeners may share a kind, and so one watch), and the runtime starts, reports and stops
them all at once, so readiness covers every cache the request path reads and closing leaves no watch open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.lifecycle.base import LifecycleError
from gateway.lifecycle.kubernetes.client import Gone, KubeClient, KubeError, Resource

log = logging.getLogger(__name__)

# (event type, the object as now known or, for DELETED, as last known)
OnChange = Callable[[str, dict[str, Any]], None]
QUICK_END = 1.0  # a watch that ends sooner than this, empty, is reopened only after a backoff


def _name(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["name"])


def _rv(obj: dict[str, Any]) -> str | None:
    value = (obj.get("metadata") or {}).get("resourceVersion")
    return str(value) if value else None


class Informer:
    """A cache of one kind in one namespace, kept current by list + watch, telling its listeners every change."""

    def __init__(self, client: KubeClient, kind: Resource, *, listeners: Sequence[OnChange],
                 label_selector: str | None = None,
                 watch_timeout: int = 300, first_delay: float = 0.1, max_delay: float = 10.0) -> None:
        self.client = client
        self.kind = kind
        self.label_selector = label_selector
        self.objects: dict[str, dict[str, Any]] = {}
        self.resource_version: str | None = None
        self.synced = asyncio.Event()
        self.healthy = False
        self.error = ""
        self.unhealthy_since: float | None = None  # time.monotonic() when the API was lost, for readiness
        self.lists = 0  # how many times the whole kind was listed (1 + re-lists after 410 Gone)
        self._listeners = tuple(listeners)
        self._watch_timeout = watch_timeout
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._task: asyncio.Task[None] | None = None

    def get(self, name: str) -> dict[str, Any] | None:
        return self.objects.get(name)

    def values(self) -> list[dict[str, Any]]:
        return list(self.objects.values())

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name=f"informer-{self.kind.plural}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self) -> None:
        delay = self._first_delay
        while True:
            try:
                if self.resource_version is None:
                    await self._list()
                began = asyncio.get_running_loop().time()
                if await self._watch() or asyncio.get_running_loop().time() - began >= QUICK_END:
                    delay = self._first_delay
                    continue
                # Ended at once with nothing in it (an API server shedding watches): back off, do not spin.
            except asyncio.CancelledError:
                raise
            except Gone as exc:
                log.info("watch of %s: %s; listing again", self.kind.plural, exc)
                self.resource_version = None
            except KubeError as exc:
                self._unhealthy(exc)
            except Exception as exc:  # a bug or a surprise from the wire: keep the cache alive, say so loudly
                log.exception("watch of %s failed unexpectedly", self.kind.plural)
                self._unhealthy(exc)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self._max_delay)

    def _unhealthy(self, exc: Exception) -> None:
        if self.healthy:
            log.warning("lost the watch of %s, serving from cache: %s", self.kind.plural, exc)
        if self.healthy or self.unhealthy_since is None:
            self.unhealthy_since = time.monotonic()
        self.healthy, self.error = False, str(exc)

    async def _list(self) -> None:
        listing = await self.client.list(self.kind, label_selector=self.label_selector)
        fresh = {_name(obj): obj for obj in listing["items"]}
        old, self.objects = self.objects, fresh
        self.resource_version = str((listing.get("metadata") or {}).get("resourceVersion") or "0")
        self.lists += 1
        self.healthy, self.error = True, ""
        for name, obj in old.items():
            if name not in fresh:
                self._notify("DELETED", obj)
        for name, obj in fresh.items():
            previous = old.get(name)
            if previous is None:
                self._notify("ADDED", obj)
            elif _rv(previous) != _rv(obj):
                self._notify("MODIFIED", obj)
        self.synced.set()

    async def _watch(self) -> int:
        """Follow one watch stream until it ends; how many events (bookmarks included) it carried."""
        assert self.resource_version is not None
        count = 0
        async with self.client.watch(self.kind, self.resource_version, label_selector=self.label_selector,
                                     timeout_seconds=self._watch_timeout) as events:
            was, self.healthy, self.error = self.healthy, True, ""
            try:
                async for event in events:
                    count += 1
                    self._take(event)
            except KubeError:
                if not count:  # an error first thing (an ERROR event): no better than before it opened
                    self.healthy = was
                raise
        return count

    def _take(self, event: dict[str, Any]) -> None:
        """One watch event into the cache and its version, told to the listeners. A change without an object, or
        of one without a name, raises as any bug does (the watch is lost, loudly) rather than pass in silence."""
        kind, obj = event.get("type"), event["object"]
        rv = _rv(obj)
        if kind == "BOOKMARK":
            self.resource_version = rv or self.resource_version
            return
        if kind == "DELETED":
            self.objects.pop(_name(obj), None)
        elif kind in ("ADDED", "MODIFIED"):
            self.objects[_name(obj)] = obj
        else:
            return
        self.resource_version = rv or self.resource_version
        self._notify(str(kind), obj)

    def _notify(self, kind: str, obj: dict[str, Any]) -> None:
        for listener in self._listeners:
            try:
                listener(kind, obj)
            except Exception:  # one bad listener must neither stop the cache nor keep the change from the others
                log.exception("change callback for %s %s failed", self.kind.plural, obj["metadata"].get("name"))


@dataclass
class _Registration:
    label_selector: str | None
    listeners: list[OnChange] = field(default_factory=list)


class Informers(Mapping[Resource, Informer]):
    """Every cache of this replica: kinds are registered first, then all are started, reported on and stopped as
    one. As a mapping it holds the running caches by kind (empty until started)."""

    def __init__(self, *, watch_timeout: int = 300) -> None:
        self._watch_timeout = watch_timeout
        self._registered: dict[Resource, _Registration] = {}
        self._running: dict[Resource, Informer] = {}

    def register(self, kind: Resource, on_change: OnChange, *, label_selector: str | None = None) -> None:
        """Ask for ``kind`` to be cached and ``on_change`` told of its changes. A kind registered again shares
        the one watch, so it must select the same objects."""
        if self._running:
            raise RuntimeError(f"{kind.plural}: register before the informers start; they are running")
        registration = self._registered.setdefault(kind, _Registration(label_selector))
        if registration.label_selector != label_selector:
            raise ValueError(f"{kind.plural} is watched with the selector {registration.label_selector!r}, "
                             f"not {label_selector!r}")
        registration.listeners.append(on_change)

    async def start(self, client: KubeClient, *, sync_timeout: float) -> None:
        """Fill every cache; LifecycleError, with every watch stopped again, if no page of a list comes for
        ``sync_timeout``. A big cluster's first fill takes as long as it takes (100,000 share links are 200 pages,
        10 s at the client's rate limit alone); an API that does not answer fails the start as soon as ever."""
        for kind, registration in self._registered.items():
            self._running[kind] = Informer(client, kind, listeners=registration.listeners,
                                           label_selector=registration.label_selector,
                                           watch_timeout=self._watch_timeout)
        for informer in self._running.values():
            informer.start()
        pages = -1
        while pages != client.pages:  # a page came since the last look: wait on
            pages = client.pages
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(sync_timeout):
                    await asyncio.gather(*(informer.synced.wait() for informer in self._running.values()))
                return
        errors = "; ".join(f"{i.kind.plural}: {i.error}" for i in self._running.values() if not i.synced.is_set())
        await self.stop()
        raise LifecycleError(f"Kubernetes API not reachable within {sync_timeout:.0f} s ({errors})",
                             code="kubernetes-unavailable")

    async def stop(self) -> None:
        running, self._running = self._running, {}
        for informer in running.values():
            await informer.stop()

    def healthy(self, kinds: Iterable[Resource]) -> bool:
        """Whether the caches of ``kinds`` are running and watching: each reader asks about its own kinds, so a
        lost share-link watch does not stop wakes."""
        return bool(self._running) and all(kind in self._running and self._running[kind].healthy for kind in kinds)

    def not_ready(self, grace: float) -> str | None:
        """Why a replica with these caches should get no traffic: they were never started, one was never filled,
        or one has been cut off from the API for longer than ``grace`` (a short loss is ridden out from the cache).
        Names kinds, never addresses."""
        if not self._running:
            return "Kubernetes caches not started"
        now = time.monotonic()
        for informer in self._running.values():
            if not informer.synced.is_set():
                return f"{informer.kind.plural}: not synced yet"
            since = informer.unhealthy_since
            if not informer.healthy and since is not None and now - since > grace:
                return f"{informer.kind.plural}: Kubernetes API unreachable for {now - since:.0f} s"
        return None

    def __getitem__(self, kind: Resource) -> Informer:
        return self._running[kind]

    def __iter__(self) -> Iterator[Resource]:
        return iter(self._running)

    def __len__(self) -> int:
        return len(self._running)

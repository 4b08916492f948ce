"""Share links and API tokens as custom resources: the :class:`TokenStore` every replica shares on Kubernetes.

A ShareLink or ApiToken object per link or token (named by its id; only the token's SHA-256 is stored), sealed
with a key only the gateway holds (``objects.record_seal``): one without a valid seal is not taken in. The
store registers both kinds (and consent answers) in the runtime's informers, which list+watch them with the
runtime's own kinds, and indexes them by id and by token hash, so a lookup is a dict read: the request path never
calls the API.

Creating, revoking (``spec.revoked``) and deleting (API tokens) go to the API, with :func:`retrying` around
the single attempt, and the API's answer is applied to this replica's index before the call returns, so the
replica that made a change sees it at once. Other replicas see it when their watch delivers it (milliseconds
normally; while a watch is cut off they keep serving their last view until it is back).

Uses and last use are counted in memory and written at most once per ``interval`` as a status merge patch of
this replica's own entry, ``status.replicas[identity] = {uses, lastUsed}``, with absolute values: replicas never
overwrite each other and a repeated write changes nothing, so no resourceVersion guard or retry loop is needed.
Readers add the entries up (uses) and take the newest (last use).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gateway.auth.ide import load_key
from gateway.auth.identity import Identity
from gateway.auth.kubernetes.answers import Consents, EndedSignIns, UsedKeys, create_sealed, refused_as_error
from gateway.auth.sessions import Ended, SignIn
from gateway.auth.store import (
    API_PREFIX,
    SHARE_PREFIX,
    ApiToken,
    Consent,
    LinksByWorkspace,
    ShareLink,
    new_api_token,
    new_id,
    new_share_token,
    token_hash,
)
from gateway.config import Kubernetes
from gateway.errors import NotFound
from gateway.lifecycle.base import LifecycleError
from gateway.lifecycle.kubernetes.client import (
    API_TOKEN,
    SHARE_LINK,
    WORKSPACE,
    KubeClient,
    KubeError,
    Resource,
)
from gateway.lifecycle.kubernetes.informer import Informers
from gateway.lifecycle.kubernetes.objects import (
    Usage,
    belongs,
    make_api_token,
    make_share_link,
    owner_reference,
    owners,
    parse_api_token,
    parse_share_link,
    record_seal,
    revoke_patch,
    sealed,
    total_usage,
    usage_by_replica,
    usage_patch,
)

log = logging.getLogger(__name__)
P = TypeVar("P")
Obj = dict[str, Any]


class _CurrentLinks(Mapping[str, ShareLink]):
    """The links by id, without those of an earlier workspace of the same name (see ``KubeTokenStore.current``)."""

    def __init__(self, store: KubeTokenStore) -> None:
        self._store = store

    def __getitem__(self, name: str) -> ShareLink:
        link = self._store._shares[name]
        if not self._store.current(link):
            raise KeyError(name)
        return link

    def __iter__(self) -> Iterator[str]:
        return (name for name, link in self._store._shares.items() if self._store.current(link))

    def __len__(self) -> int:
        return sum(1 for _ in self)


@dataclass
class _Counted:
    """This replica's own usage of one link or token: its total, and whether the API has all of it yet."""

    uses: int
    last_used: float | None
    version: int = 0
    written: int = 0


def seal_key(settings: Kubernetes) -> bytes | None:
    """The key that seals ShareLink, ApiToken and IdentityConsent objects (``objects.record_seal``), derived from
    the IDE key — a secret every replica holds and no pod or custom resource does — and the namespace, so that two
    installations given one IDE key do not take each other's records. None without an IDE key: records are then
    trusted as they stand in the cluster, and whoever may write them there may act as anyone."""
    if settings.ide_key_file is None:
        return None
    label = b"codehub-records\0" + settings.namespace.encode()
    return hmac.new(load_key(settings.ide_key_file), label, hashlib.sha256).digest()


async def create_api_token(client: KubeClient, identity: Identity, *, name: str, key: bytes | None,
                           attempts: int = 5) -> tuple[ApiToken, Obj, str]:
    """Create an ApiToken resource (a fresh id on the rare name collision); the record, the object, the token."""
    for _ in range(3):
        token = new_api_token()
        record = ApiToken(id=new_id(), token_hash=token_hash(token), subject=identity.subject, name=name,
                          created=time.time(), email=identity.email, groups=list(identity.groups),
                          attributes=dict(identity.attributes))
        created = await create_sealed(client, API_TOKEN, make_api_token(record, key), attempts)
        if created is not None:
            return parse_api_token(created) or record, created, token
    raise LifecycleError("Could not pick an unused token id; try again.", code="kubernetes-refused")


@dataclass
class Sealing:
    """What :func:`seal_records` did to one kind: how many it sealed, how many were already, and the names it left
    (sealed otherwise — changed since, or with another key — or changed or gone while it sealed)."""

    sealed: int = 0
    already: int = 0
    left: list[str] = field(default_factory=list)


def _owned(link: Obj, workspaces: Mapping[str, Obj]) -> Obj | None:
    """A link from before links had owners, given the Workspace that holds its name as owner if it is that one's
    (made no earlier than it): sealed without an owner, written again it would take a new creation time, and with it
    the next workspace of its name. None when it is no workspace's now."""
    if owners(link):
        return link
    workspace = str((link.get("spec") or {}).get("workspace") or "")
    meta = (workspaces.get(workspace) or {}).get("metadata") or {}
    uid = str(meta.get("uid") or "")
    if not uid or meta.get("deletionTimestamp") or not belongs(link, uid, meta.get("creationTimestamp")):
        return None
    return {**link, "metadata": {**link["metadata"], "ownerReferences": [owner_reference(workspace, uid)]}}


async def seal_records(client: KubeClient, key: bytes) -> dict[str, Sealing]:
    """Seal every ShareLink, ApiToken and IdentityConsent that carries no seal: once, after upgrading from a gateway
    that made them unsealed (which this one refuses); links without an owner get the Workspace they belong to, or
    are left when there is none. Each write is conditional on the version read, so a record changed meanwhile is
    left unsealed (and said so); one sealed otherwise is never overwritten."""
    done: dict[str, Sealing] = {}
    workspaces = {str(ws["metadata"]["name"]): ws for ws in (await client.list(WORKSPACE))["items"]}
    for kind in (SHARE_LINK, API_TOKEN, Consents.kind):
        sealing = done[kind.kind] = Sealing()
        for obj in (await client.list(kind))["items"]:
            meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
            if "seal" in spec:
                if sealed(key, kind.kind, obj):
                    sealing.already += 1
                else:
                    sealing.left.append(str(meta.get("name")))
                continue
            whole = _owned(obj, workspaces) if kind is SHARE_LINK else obj
            if whole is None:
                sealing.left.append(str(meta.get("name")))
                continue
            patch: Obj = {"metadata": {"resourceVersion": meta.get("resourceVersion")},
                          "spec": {"seal": record_seal(key, kind.kind, whole)}}
            if whole is not obj:
                patch["metadata"]["ownerReferences"] = whole["metadata"]["ownerReferences"]
            try:
                await client.patch(kind, str(meta.get("name")), patch)
            except KubeError as exc:
                if exc.status not in (404, 409):  # gone, or changed since it was read: not sealed
                    raise
                sealing.left.append(str(meta.get("name")))
                continue
            sealing.sealed += 1
    return done


class KubeTokenStore:
    """Registers its kinds in ``informers`` when made, so it must be made before they start (the runtime's
    ``start``); the runtime's ``client`` is there once it has."""

    def __init__(self, settings: Kubernetes, identity: str, client: Callable[[], KubeClient | None],
                 informers: Informers, *, interval: float | None = None, retry_attempts: int = 5,
                 is_leader: Callable[[], bool] = lambda: False) -> None:
        self.settings = settings
        self.is_leader = is_leader
        self.identity = identity
        self.interval = settings.usage_interval if interval is None else interval
        self._client_source = client
        self._attempts = retry_attempts
        self._key = seal_key(settings)
        self._refused: set[tuple[Resource, str]] = set()  # unsealed objects already logged
        self.client: KubeClient | None = None
        self.informers = informers
        self._shares: dict[str, ShareLink] = {}
        self._share_index: dict[str, ShareLink] = {}  # token hash -> link
        self._link_meta: dict[str, Obj] = {}  # link id -> the object's owners and creation time
        self._by_workspace = LinksByWorkspace()
        self._tokens: dict[str, ApiToken] = {}
        self._token_index: dict[str, ApiToken] = {}
        self._used: UsedKeys | None = None
        # Written here, not yet delivered by the watch: applied over the cache until it is.
        self._created: dict[tuple[Resource, str], Obj] = {}
        self._revoked: dict[str, float] = {}
        self._deleted: set[str] = set()
        self._counted: dict[tuple[Resource, str], _Counted] = {}
        self._dirty = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._forgetter: asyncio.Task[None] | None = None
        self._pruner: asyncio.Task[None] | None = None
        self.writes = 0
        informers.register(SHARE_LINK, self._on_change(SHARE_LINK))
        informers.register(API_TOKEN, self._on_change(API_TOKEN))
        self._consents = Consents(informers, attempts=self._attempts, key=self._key)
        self._ended = EndedSignIns(informers)
        self.kinds = (SHARE_LINK, API_TOKEN, Consents.kind, EndedSignIns.kind)

    # -- lifespan --

    async def start(self) -> None:
        """Start writing; the caches were filled by the runtime's start, which this follows."""
        client = self._client_source()
        if client is None:
            raise LifecycleError("The Kubernetes runtime has not started.", code="kubernetes-unavailable")
        self.client = client
        self._used = UsedKeys(client, self.identity, attempts=self._attempts)
        self._flusher = asyncio.get_running_loop().create_task(self._flush_forever(), name="token-usage")
        self._forgetter = asyncio.get_running_loop().create_task(self._used.forget_forever(), name="forget-used-keys")
        self._pruner = asyncio.get_running_loop().create_task(self._prune_forever(), name="share-pruning")

    async def close(self, *, flush_within: float = 2.0) -> None:
        chores = (self._forgetter, self._pruner)
        self._forgetter = self._pruner = None
        for chore in chores:
            if chore is not None:
                chore.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await chore
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(flush_within):
                    await self.write_usage()

    @property
    def healthy(self) -> bool:
        return self.informers.healthy(self.kinds)

    def flush(self) -> None:
        """Nothing to do on the caller's clock: usage is written by this store's own task."""

    # -- reading (memory only) --

    @property
    def shares(self) -> Mapping[str, ShareLink]:
        return _CurrentLinks(self)

    @property
    def api_tokens(self) -> Mapping[str, ApiToken]:
        return self._tokens

    def current(self, link: ShareLink) -> bool:
        """Whether the link belongs to the Workspace that holds its name now (by the uid of its ownerReference).

        ``kubectl delete workspace`` deletes in the background: the garbage collector deletes the links a moment
        later (or much later on a busy cluster), and a Workspace made under the free name meanwhile by someone else
        must not be opened by them, list them, nor count them. A link pointing at no Workspace (made before links
        had owners, so nothing ever deletes it) is taken for the one of its name if made no earlier than it, as
        ``objects.belongs`` takes pods and volumes, unless links are sealed."""
        workspaces = self.informers.get(WORKSPACE)
        holder = workspaces.get(link.workspace) if workspaces is not None else None
        if holder is None:
            return workspaces is None  # no Workspace of its name: nothing to open, list or count
        meta, made = holder.get("metadata") or {}, self._link_meta.get(link.id, {})
        if self._key is not None and not owners(made):
            # Sealed links have a Workspace for owner (``seal_records`` gives the old ones theirs): one without (or
            # whose owner's kind was renamed) was written again, with a new creation time that ``belongs`` would
            # take for the next workspace of its name.
            return False
        return belongs(made, str(meta.get("uid") or ""), meta.get("creationTimestamp"))

    def find_share(self, token: str) -> ShareLink | None:
        link = self._share_index.get(token_hash(token)) if token.startswith(SHARE_PREFIX) else None
        return link if link is not None and self.current(link) else None

    def shares_of(self, workspace: str) -> list[ShareLink]:
        return [link for link in self._by_workspace.of(workspace) if self.current(link)]

    def find_api_token(self, token: str) -> ApiToken | None:
        return self._token_index.get(token_hash(token)) if token.startswith(API_PREFIX) else None

    def use_api_token(self, record: ApiToken, now: float) -> None:
        self._count(API_TOKEN, record.id, now, uses=0)
        record.last_used = now

    def use_share(self, link: ShareLink, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._count(SHARE_LINK, link.id, now, uses=1)
        obj = self._current(SHARE_LINK, link.id)
        if obj is None:
            return
        usage = self._usage(SHARE_LINK, link.id, obj)
        for known in (link, self._shares.get(link.id)):
            if known is not None:
                known.uses, known.last_used = usage.uses, usage.last_used

    # -- writing (through the API) --

    async def create_share(self, *, workspace: str, port: int | None, audience: str, people: list[str],
                           created_by: str, ttl: float, now: float | None = None,
                           incarnation: str = "") -> tuple[ShareLink, str]:
        """The link belongs to the Workspace (an ownerReference by uid), so deleting it deletes the link. Refused
        when that Workspace is gone or going, or is another than ``incarnation`` (the uid the caller saw): the
        caller looked a moment ago, and requests queue (for the API, for the link count), so a link asked for
        just before a delete was made without an owner, outlived the workspace, and opened the ports of whoever
        made the next workspace of its name (``WorkspaceSpec.since`` is 0 on Kubernetes)."""
        client = self._require()
        now = time.time() if now is None else now
        owner = await refused_as_error(lambda: client.get(WORKSPACE, workspace), self._attempts)
        metadata = (owner or {}).get("metadata") or {}
        uid = str(metadata.get("uid") or "")  # the link goes with the workspace
        if owner is None or metadata.get("deletionTimestamp") or not uid or incarnation not in ("", uid):
            raise NotFound(f"There is no workspace called {workspace}.", code="workspace-not-found")
        for _ in range(3):
            token = new_share_token()
            link = ShareLink(id=new_id(), token_hash=token_hash(token), workspace=workspace, port=port,
                             audience=audience, people=list(people), created_by=created_by, created=now,
                             expires=now + ttl)
            body = make_share_link(link, uid, self._key)
            created = await create_sealed(client, SHARE_LINK, body, self._attempts)
            if created is not None:
                self._created[(SHARE_LINK, link.id)] = created
                self._refresh(SHARE_LINK, link.id)
                return self._shares.get(link.id, link), token
        raise LifecycleError("Could not pick an unused share link id; try again.", code="kubernetes-refused")

    async def revoke_share(self, link: ShareLink, now: float | None = None) -> ShareLink:
        if link.revoked is not None:
            return link  # the first revocation stands
        client = self._require()
        now = time.time() if now is None else now
        try:
            patched = await refused_as_error(lambda: client.patch(SHARE_LINK, link.id, revoke_patch(now)),
                                             self._attempts)
        except LifecycleError as exc:
            if isinstance(exc.__cause__, KubeError) and exc.__cause__.status == 404:
                raise NotFound("There is no such share link.", code="share-not-found") from None
            raise
        self._revoked[link.id] = now
        if (SHARE_LINK, link.id) in self._created:
            self._created[(SHARE_LINK, link.id)] = patched
        self._refresh(SHARE_LINK, link.id)
        current = self._shares.get(link.id)
        if current is None:
            link.revoked = now
            return link
        return current

    async def create_api_token(self, identity: Identity, *, name: str) -> tuple[ApiToken, str]:
        client = self._require()
        record, created, token = await create_api_token(client, identity, name=name, key=self._key,
                                                     attempts=self._attempts)
        self._created[(API_TOKEN, record.id)] = created
        self._refresh(API_TOKEN, record.id)
        return self._tokens.get(record.id, record), token

    async def revoke_api_token(self, record: ApiToken) -> None:
        client = self._require()
        await refused_as_error(lambda: client.delete(API_TOKEN, record.id), self._attempts)  # 404: already gone
        self._deleted.add(record.id)
        self._refresh(API_TOKEN, record.id)

    @property
    def consents(self) -> Mapping[str, Consent]:
        return self._consents.answers

    async def record_consent(self, consent: Consent) -> None:
        await self._consents.record(self._require(), consent)

    async def withdraw_consent(self, consent: Consent) -> None:
        await self._consents.withdraw(self._require(), consent)

    async def use_once(self, key: str, until: float) -> bool:
        return await self._started(self._used).use_once(key, until)

    @property
    def ended_sign_ins(self) -> Ended:
        return self._ended.ids

    async def end_sign_in(self, sign_in: SignIn) -> None:
        await self._ended.end(self._started(self._used), sign_in)

    async def forget_used(self, now: float) -> int:
        return await self._started(self._used).forget(now)

    def _started(self, part: P | None) -> P:
        if part is None:
            raise LifecycleError("The token store has not started.", code="kubernetes-unavailable")
        return part

    def _require(self) -> KubeClient:
        if self.client is None:
            raise LifecycleError("The token store has not started.", code="kubernetes-unavailable")
        return self.client

    # -- the index --

    def _on_change(self, kind: Resource) -> Callable[[str, Obj], None]:
        def changed(event: str, obj: Obj) -> None:
            name = str(obj["metadata"]["name"])
            if event == "DELETED":
                self._created.pop((kind, name), None)
                self._counted.pop((kind, name), None)
                self._revoked.pop(name, None)
                self._deleted.discard(name)
            self._refresh(kind, name)
        return changed

    def _current(self, kind: Resource, name: str) -> Obj | None:
        informer = self.informers.get(kind)
        cached = informer.get(name) if informer is not None else None
        if cached is not None:
            self._created.pop((kind, name), None)
            return cached
        return self._created.get((kind, name))

    def _usage(self, kind: Resource, name: str, obj: Obj) -> Usage:
        usages = usage_by_replica(obj)
        mine = self._counted.get((kind, name))
        if mine is not None:
            seen = usages.get(self.identity, Usage())
            times = [t for t in (seen.last_used, mine.last_used) if t is not None]
            usages[self.identity] = Usage(max(seen.uses, mine.uses), max(times) if times else None)
        return total_usage(usages)

    def _vouched(self, kind: Resource, name: str, obj: Obj | None) -> Obj | None:
        """The object if its seal holds; else None, said once while it stays unsealed."""
        if obj is None or sealed(self._key, kind.kind, obj):
            self._refused.discard((kind, name))
            return obj
        if (kind, name) not in self._refused:
            self._refused.add((kind, name))
            log.warning("%s %s is not sealed by this gateway's key: it grants nothing (made before records "
                        "were sealed: `codehub-gateway token seal` seals those once; else changed or made past the "
                        "gateway)", kind.kind, name)
        return None

    def _refresh(self, kind: Resource, name: str) -> None:
        """Re-derive one entry of the index from the cache and what this replica wrote."""
        obj = self._vouched(kind, name, self._current(kind, name))
        if kind is SHARE_LINK:
            old_link = self._shares.pop(name, None)
            self._link_meta.pop(name, None)
            if old_link is not None:
                self._share_index.pop(old_link.token_hash, None)
                self._by_workspace.discard(old_link)
            link = parse_share_link(obj) if obj is not None else None
            if link is None or obj is None:
                return
            meta = obj.get("metadata") or {}
            self._link_meta[name] = {"metadata": {
                "ownerReferences": [ref for ref in meta.get("ownerReferences") or []
                                    if isinstance(ref, dict) and ref.get("kind") == WORKSPACE.kind],
                "creationTimestamp": meta.get("creationTimestamp")}}
            if link.revoked is not None:
                self._revoked.pop(name, None)
            else:
                link.revoked = self._revoked.get(name)
            usage = self._usage(kind, name, obj)
            link.uses, link.last_used = usage.uses, usage.last_used
            self._shares[name] = link
            self._share_index[link.token_hash] = link
            self._by_workspace.add(link)
        else:
            old_token = self._tokens.pop(name, None)
            if old_token is not None:
                self._token_index.pop(old_token.token_hash, None)
            record = parse_api_token(obj) if obj is not None and name not in self._deleted else None
            if record is None or obj is None:
                return
            record.last_used = self._usage(kind, name, obj).last_used
            self._tokens[name] = record
            self._token_index[record.token_hash] = record

    # -- usage, written in batches --

    def _count(self, kind: Resource, name: str, now: float, *, uses: int) -> None:
        key = (kind, name)
        mine = self._counted.get(key)
        if mine is None:
            # Continue what this identity wrote before (a restarted process): the entry holds absolute values.
            obj = self._current(kind, name)
            seen = usage_by_replica(obj).get(self.identity, Usage()) if obj is not None else Usage()
            mine = self._counted[key] = _Counted(seen.uses, seen.last_used)
        mine.uses += uses
        mine.last_used = max(mine.last_used or now, now)
        mine.version += 1
        self._dirty.set()

    async def delete_expired(self, now: float | None = None) -> int:
        """The leader's chore: delete links expired longer than ``share_retention`` ago; how many went."""
        client = self._require()
        cutoff = (time.time() if now is None else now) - self.settings.share_retention
        deleted = 0
        for link in [link for link in self._shares.values() if link.expires < cutoff]:
            try:
                deleted += await refused_as_error(lambda: client.delete(SHARE_LINK, link.id), self._attempts)  # noqa: B023
            except LifecycleError as exc:
                log.warning("could not delete the expired share link %s: %s", link.id, exc.message)
        return deleted

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.share_prune_interval)
            if self.is_leader() and self.healthy:
                await self.delete_expired()

    async def _flush_forever(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self.interval)  # at most one write per link per interval from this replica
            await self.write_usage()

    async def write_usage(self) -> None:
        """Write every entry with uses the API has not seen yet; a failure is retried at the next interval."""
        self._dirty.clear()
        client = self.client
        if client is None:
            return
        for (kind, name), mine in list(self._counted.items()):
            version = mine.version
            if mine.written == version or mine.last_used is None:
                continue
            patch = usage_patch(self.identity, mine.last_used, mine.uses if kind is SHARE_LINK else None)
            try:
                await client.patch(kind, name, patch, subresource="status")
            except KubeError as exc:
                if exc.status == 404:  # deleted meanwhile: nothing to count on
                    self._counted.pop((kind, name), None)
                    continue
                log.warning("could not record the use of %s %s (will retry): %s", kind.kind, name, exc)
                self._dirty.set()
                continue
            mine.written = version
            self.writes += 1

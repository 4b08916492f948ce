"""Share links and API tokens: opaque random tokens, stored only as SHA-256 hashes.

Opaque tokens (not JWTs) keep share URLs short and make revocation immediate: every use is looked up.
:class:`TokenStore` is what the rest of the gateway sees; lookups are synchronous reads of memory (the request
path never waits for storage), changes are awaited. Two implementations: :class:`FileTokenStore` here (one JSON
file, the local runtime) and ``gateway.lifecycle.kubernetes.tokens.KubeTokenStore`` (custom resources shared by
every replica). Use counts are batched in memory in both, so a busy link costs no write per request.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gateway.auth.identity import Identity

SHARE_PREFIX = "chs_"
API_PREFIX = "chk_"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_share_token() -> str:
    return SHARE_PREFIX + secrets.token_urlsafe(24)


def new_api_token() -> str:
    return API_PREFIX + secrets.token_urlsafe(32)


def new_id() -> str:
    return secrets.token_hex(6)


@dataclass
class ShareLink:
    id: str
    token_hash: str
    workspace: str
    port: int | None
    audience: str
    people: list[str]
    created_by: str
    created: float
    expires: float
    revoked: float | None = None
    uses: int = 0
    last_used: float | None = None

    def active(self, now: float) -> bool:
        return self.revoked is None and now < self.expires

    def public(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        del data["token_hash"]
        return data


@dataclass
class ApiToken:
    id: str
    token_hash: str
    subject: str
    name: str
    created: float
    email: str = ""
    groups: list[str] = dataclasses.field(default_factory=list)
    last_used: float | None = None
    attributes: dict[str, str] = dataclasses.field(default_factory=dict)

    def identity(self) -> Identity:
        """The person the token acts for, as they were when they created it."""
        return Identity(self.subject, self.email, tuple(self.groups), self.name, tuple(sorted(self.attributes.items())))

    def public(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        del data["token_hash"], data["attributes"]
        return data


class TokenStore(Protocol):
    """Where share links and API tokens live. Reads come from memory; writes are awaited and, once they return,
    apply to every later lookup on this replica (and, for a shared store, on the others soon after)."""

    @property
    def shares(self) -> Mapping[str, ShareLink]:
        """Every share link by id (revoked and expired ones included: owners see them listed)."""

    @property
    def api_tokens(self) -> Mapping[str, ApiToken]:
        """Every live API token by id."""

    def find_share(self, token: str) -> ShareLink | None: ...

    def use_share(self, link: ShareLink, now: float | None = None) -> None:
        """Count one use (in memory; written in a batch later)."""

    async def create_share(self, *, workspace: str, port: int | None, audience: str, people: list[str],
                           created_by: str, ttl: float, now: float | None = None) -> tuple[ShareLink, str]: ...

    async def revoke_share(self, link: ShareLink, now: float | None = None) -> ShareLink: ...

    def find_api_token(self, token: str) -> ApiToken | None:
        """The token's record, noting its use, or None."""

    async def create_api_token(self, identity: Identity, *, name: str) -> tuple[ApiToken, str]: ...

    async def revoke_api_token(self, record: ApiToken) -> None: ...

    def flush(self) -> None:
        """Write batched use counts now if this store batches on the caller's clock (the file store)."""

    async def start(self) -> None: ...

    async def close(self) -> None:
        """Write what is still batched, then let go of resources."""


class FileTokenStore:
    """One JSON file, read at start: right for one process (the local runtime), wrong for several replicas."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self.shares: dict[str, ShareLink] = {}  # a plain dict: tests age links by editing them
        self.api_tokens: dict[str, ApiToken] = {}
        self._dirty = False
        if path is not None and path.exists():
            data = json.loads(path.read_text())
            self.shares = {item["id"]: ShareLink(**item) for item in data.get("shares", [])}
            self.api_tokens = {item["id"]: ApiToken(**item) for item in data.get("api_tokens", [])}
        self._share_index = {link.token_hash: link for link in self.shares.values()}
        self._api_index = {token.token_hash: token for token in self.api_tokens.values()}

    def save(self) -> None:
        if self._path is None:
            return
        data = {"shares": [dataclasses.asdict(link) for link in self.shares.values()],
                "api_tokens": [dataclasses.asdict(token) for token in self.api_tokens.values()]}
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_name(self._path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle)
        os.replace(tmp, self._path)
        self._dirty = False

    def flush(self) -> None:
        if self._dirty:
            self.save()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self.flush()

    async def create_share(self, *, workspace: str, port: int | None, audience: str, people: list[str],
                           created_by: str, ttl: float, now: float | None = None) -> tuple[ShareLink, str]:
        now = time.time() if now is None else now
        token = new_share_token()
        link = ShareLink(id=new_id(), token_hash=token_hash(token), workspace=workspace, port=port,
                         audience=audience, people=people, created_by=created_by, created=now, expires=now + ttl)
        self.shares[link.id] = link
        self._share_index[link.token_hash] = link
        self.save()
        return link, token

    def find_share(self, token: str) -> ShareLink | None:
        return self._share_index.get(token_hash(token)) if token.startswith(SHARE_PREFIX) else None

    def use_share(self, link: ShareLink, now: float | None = None) -> None:
        link.uses += 1
        link.last_used = time.time() if now is None else now
        self._dirty = True

    async def revoke_share(self, link: ShareLink, now: float | None = None) -> ShareLink:
        link.revoked = time.time() if now is None else now
        self.save()
        return link

    async def create_api_token(self, identity: Identity, *, name: str) -> tuple[ApiToken, str]:
        return self.create_api_token_now(identity, name=name)

    def create_api_token_now(self, identity: Identity, *, name: str) -> tuple[ApiToken, str]:
        """The same, synchronously (the CLI writes the file without an event loop)."""
        token = new_api_token()
        record = ApiToken(id=new_id(), token_hash=token_hash(token), subject=identity.subject, name=name,
                          created=time.time(), email=identity.email, groups=list(identity.groups),
                          attributes=dict(identity.attributes))
        self.api_tokens[record.id] = record
        self._api_index[record.token_hash] = record
        self.save()
        return record, token

    def find_api_token(self, token: str) -> ApiToken | None:
        record = self._api_index.get(token_hash(token)) if token.startswith(API_PREFIX) else None
        if record is not None:
            record.last_used = time.time()
            self._dirty = True
        return record

    async def revoke_api_token(self, record: ApiToken) -> None:
        self.api_tokens.pop(record.id, None)
        self._api_index.pop(record.token_hash, None)
        self.save()

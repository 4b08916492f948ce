"""Share links and API tokens: opaque random tokens, stored only as SHA-256 hashes.

Opaque tokens (not JWTs) keep share URLs short and make revocation immediate: every use is looked up.
:class:`TokenStore` is what the rest of the gateway sees; lookups are synchronous reads of memory (the request
path never waits for storage), changes are awaited. Two implementations: :class:`FileTokenStore` here (one JSON
file, the local runtime) and ``gateway.auth.kubernetes.tokens.KubeTokenStore`` (custom resources shared by
every replica). Use counts are batched in memory in both, so a busy link costs no write per request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gc
import hashlib
import json
import logging
import math
import os
import secrets
import time
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from gateway.auth.identity import Identity
from gateway.auth.sessions import HANDOFF_TTL, Ended, SignIn
from gateway.config import SESSION_TTL
from gateway.errors import ServiceUnavailable

log = logging.getLogger(__name__)

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
        """The person the token acts for, as they were when they created it. Without a name: ``name`` is the
        token's own label, which its holder types, and an app the policy tells names would take it for theirs."""
        return Identity(self.subject, self.email, tuple(self.groups), "", tuple(sorted(self.attributes.items())))

    def public(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        del data["token_hash"], data["attributes"]
        return data


@dataclass
class Consent:
    """A visitor's answer on an app's consent page: whether it may receive their identity (``share``), and the
    claims the page named. One record per person and app (``id`` is derived from them, the app's owner too: a
    workspace deleted and made again under its name by someone else is another app), until withdrawn."""

    id: str
    subject: str
    workspace: str
    port: int
    share: bool
    claims: list[str]
    at: float

    @classmethod
    def answer(cls, subject: str, workspace: str, port: int, *, owner: str, share: bool, claims: list[str],
               now: float | None = None) -> Consent:
        return cls(consent_id(subject, workspace, port, owner), subject, workspace, port, share, claims,
                   time.time() if now is None else now)

    def of(self, owner: str) -> bool:
        """Given to the app of this owner (not to an app of a workspace of the same name before it)."""
        return self.id == consent_id(self.subject, self.workspace, self.port, owner)


def consent_id(subject: str, workspace: str, port: int, owner: str) -> str:
    return hashlib.sha256(f"{subject}\0{workspace}\0{port}\0{owner}".encode()).hexdigest()[:24]


class LinksByWorkspace:
    """Share links grouped by workspace, kept beside the map by id: the hub shows a page of workspaces with their
    links, and finding them by a scan of every link took about a second per page with 100,000 links."""

    def __init__(self, links: Iterable[ShareLink] = ()) -> None:
        self._groups: dict[str, dict[str, ShareLink]] = {}
        for link in links:
            self.add(link)

    def add(self, link: ShareLink) -> None:
        self._groups.setdefault(link.workspace, {})[link.id] = link

    def discard(self, link: ShareLink) -> None:
        group = self._groups.get(link.workspace)
        if group is not None and group.pop(link.id, None) is not None and not group:
            del self._groups[link.workspace]

    def of(self, workspace: str) -> list[ShareLink]:
        """The workspace's links, newest first."""
        return sorted(self._groups.get(workspace, {}).values(), key=lambda link: -link.created)


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

    def shares_of(self, workspace: str) -> list[ShareLink]:
        """The workspace's share links, newest first (without looking at every other link)."""

    def use_share(self, link: ShareLink, now: float | None = None) -> None:
        """Count one use (in memory; written in a batch later)."""

    async def create_share(self, *, workspace: str, port: int | None, audience: str, people: list[str],
                           created_by: str, ttl: float, now: float | None = None,
                           incarnation: str = "") -> tuple[ShareLink, str]:
        """A new link; ``incarnation``: the ``WorkspaceSpec.incarnation`` the caller saw, where a store ties links
        to their workspace (``NotFound`` when that workspace is gone by now)."""

    async def revoke_share(self, link: ShareLink, now: float | None = None) -> ShareLink: ...

    def find_api_token(self, token: str) -> ApiToken | None:
        """The token's record, or None (a lookup: its use is noted by ``use_api_token``)."""

    def use_api_token(self, record: ApiToken, now: float) -> None:
        """Note that the token was used (in memory; written in a batch later)."""

    async def create_api_token(self, identity: Identity, *, name: str) -> tuple[ApiToken, str]: ...

    async def revoke_api_token(self, record: ApiToken) -> None: ...

    @property
    def consents(self) -> Mapping[str, Consent]:
        """Every visitor's answer on every app's consent page, by id."""

    async def record_consent(self, consent: Consent) -> None:
        """Store (or replace) a visitor's answer for an app."""

    async def withdraw_consent(self, consent: Consent) -> None: ...

    async def use_once(self, key: str, until: float) -> bool:
        """True the first time ``key`` is used, False ever after (until ``until``, when it may be forgotten):
        in every process and replica, for one-time codes that any of them may be shown."""

    @property
    def ended_sign_ins(self) -> Ended:
        """The sign-ins signed out before their time: no session of theirs opens (read on every request a session
        cookie comes with)."""

    async def end_sign_in(self, sign_in: SignIn) -> None:
        """Sign out everywhere: the sign-in's sessions no longer open, in every process and replica."""

    def flush(self) -> None:
        """Write batched use counts now if this store batches on the caller's clock (the file store)."""

    async def start(self) -> None: ...

    async def close(self) -> None:
        """Write what is still batched, then let go of resources."""


Stamp = tuple[int, int, int, int]
SHARE_RETENTION = 86400.0
"""Seconds an expired share link stays listed (to its owner, and in the file each change rewrites) before the file
store forgets it, with the next new link: as the Kubernetes store's leader deletes them (``share_retention``)."""
LOG_LIMIT = 8 << 20
"""Bytes of counts in the log before the next batch folds them into the big file instead (2.4 s with 200,000
records here): 1,000 links used every 2 s fill it in 5 minutes, a few busy links in weeks. Longer would cost
every worker that reloads the big file more: it reads the whole log again."""
_RESET = ""
"""The key no code has: in the used-codes file, codes that expire by its time may have been used (see
``use_once``)."""
ENDED = "sign-out-"
"""A used key of this prefix and a sign-in's id: that sign-in was signed out (until it would have expired)."""
_SIGN_OUTS_LOST = "sign-outs-lost"
"""In the used-keys file, with the time every sign-in from before the file was started again will have expired:
which of them were signed out was lost with the file, so none of them opens (see ``Ended``)."""
ENDED_READ_EVERY = 1.0
"""Seconds between looks at the used-keys file for sign-outs made through other processes: a sign-out applies in
the process that took it at once, in the others within this (a look per request would cost every request a
``stat``)."""


class StoreUnavailable(ServiceUnavailable):
    code = "token-store-unavailable"


_UNREADABLE = "Share links and tokens cannot be used now: their file cannot be read."
_UNWRITABLE = "Share links and tokens cannot be changed now: their file cannot be written."
_CORRUPT = (ValueError, TypeError, KeyError, AttributeError, ArithmeticError, RecursionError)
"""What reading a file this store did not write as it is (cut short, edited by hand) can raise."""


def _add_counts(shares: Mapping[str, ShareLink], tokens: Mapping[str, ApiToken], entry: dict[str, Any]) -> None:
    """Add counts as a line of the log has them (as ``_share_uses`` and ``_token_uses`` hold them): the whole
    line, or ValueError and none of it."""
    share_counts = [(shares.get(key), int(uses), _time(last)) for key, (uses, last) in entry.get("shares", {}).items()]
    token_counts = [(tokens.get(key), _time(last)) for key, last in entry.get("tokens", {}).items()]
    for link, uses, last in share_counts:
        if link is not None:
            link.uses += uses
            link.last_used = max(link.last_used or 0.0, last)
    for record, last in token_counts:
        if record is not None:
            record.last_used = max(record.last_used or 0.0, last)


def _time(value: Any) -> float:
    """A time from a file: a last use of Infinity would be in the hub's JSON, which no browser parses."""
    at = float(value)
    if not math.isfinite(at):
        raise ValueError(f"{value!r} is not a time")
    return at


R = TypeVar("R", ShareLink, ApiToken, Consent)
_Shape = dict[str, tuple[tuple[type, ...], tuple[type, ...]]]


def _shape(cls: type) -> _Shape:
    """Per field of a record: the types its JSON value may have, and those of a list's items or a map's values.
    From the dataclass itself, so the two cannot drift."""
    def types_of(kind: Any) -> tuple[type, ...]:
        if typing.get_origin(kind) is types.UnionType:
            return sum((types_of(arg) for arg in typing.get_args(kind)), ())
        return (float, int) if kind is float else (typing.get_origin(kind) or kind,)
    shape: _Shape = {}
    for name, kind in typing.get_type_hints(cls).items():
        args = typing.get_args(kind)
        shape[name] = types_of(kind), (types_of(args[-1]) if typing.get_origin(kind) in (list, dict) else ())
    return shape


_SHAPES = {cls: _shape(cls) for cls in (ShareLink, ApiToken, Consent)}


def _record(cls: type[R], item: Any) -> R:
    """A record as the file has it, or ValueError naming the field: a value of another type (a list of people
    that is a number, a port that is a string) loaded once and broke every request that used it. ``type() in``,
    not ``isinstance``: a bool is no number here, and 200,000 records are checked on every reload."""
    shape = _SHAPES[cls]
    for field, value in item.items():
        kinds, inner = shape.get(field, ((), ()))
        kind = type(value)
        if kind not in kinds or (kind is float and not math.isfinite(value)) or (
                inner and any(type(v) not in inner for v in (value.values() if kind is dict else value))):
            wanted = " or ".join(k.__name__ for k in kinds) + (" of " + " or ".join(k.__name__ for k in inner)
                                                               if inner else "")
            raise ValueError(f"{cls.__name__} {item.get('id')!r}: {field} is not {wanted or 'a field'}")
    return cls(**item)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Without the cyclic garbage collector, which the million objects of 200,000 records set off again and again
    though none of them is garbage yet: a reload took 2.9 s, 1.1 s of it in the collector."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _expired_if_nan(item: dict[str, Any]) -> dict[str, Any]:
    """A link an older version stored with ``expires: NaN`` (from a ``ttl`` of NaN, refused since) loads
    expired: it never granted anything, as ``now < NaN`` is false, and NaN in the hub's JSON stopped the hub."""
    expires = item.get("expires")
    return {**item, "expires": item.get("created", 0.0)} if expires != expires else item


def _stamp(path: Path | None) -> Stamp | None:
    """A file's identity (mtime, ctime, size, inode): it changes whenever the file is replaced or written, even in
    place with its old mtime put back (``cp -p``, ``touch -r``). None: no file yet;
    any other failure raises, as a file that is there but cannot be looked at is not an empty store."""
    if path is None:
        return None
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return (stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size, stat.st_ino)


def _replace(path: Path, text: str) -> None:
    """Write a whole file atomically, readable by its owner only (these files hold token hashes)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except OSError:  # a full disk: the part written would hold the space
        tmp.unlink(missing_ok=True)
        raise


def _times(data: Any) -> dict[str, float]:
    """A map of keys to times, or ValueError."""
    if not isinstance(data, dict) or not all(isinstance(value, (int, float)) for value in data.values()):
        raise ValueError("not a map of keys to times")
    return data


class FileTokenStore:
    """JSON files: right for the local runtime, also when ``serve --workers`` runs several processes on them.

    The links, tokens and consents are one file, rewritten only when one of them is created, revoked or
    withdrawn. What changes all the time goes beside it: the one-time codes of every sign-in to a preview in a
    small file of their own (``<name>.used.json``), and use counts appended as they are written in batches
    (``<name>.uses.jsonl``, a line of additions per batch). With 100,000 links and 100,000 tokens the big file
    takes seconds to write, with the event loop stopped, and each sign-in and each batch of counts once rewrote it.

    Writers take an exclusive ``flock`` on ``<file>.lock``, read in what another process changed, apply their
    change and replace the file atomically (or append a line to the log). Readers look at the big file's identity
    (mtime, size, inode) on every lookup and reload it when it changed, and read the lines added to the log since
    they last looked, so a link revoked or a token created through one worker applies in every other worker on its
    next request. The big file names the log that goes with it (``uses_log``), whose first line names it back: a
    rewrite of the big file folds the log's counts in and starts a new log, and a log that does not match is
    already counted.
    """

    def __init__(self, path: Path | None, *, session_ttl: float = SESSION_TTL) -> None:
        self._path = path
        self._session_ttl = session_ttl  # how long a sign-in lasts: what a used-keys file lost may have ended
        self._used_path = None if path is None else path.with_name(f"{path.stem}.used.json")
        self._log_path = None if path is None else path.with_name(f"{path.stem}.uses.jsonl")
        self._shares: dict[str, ShareLink] = {}  # plain dicts: tests age links by editing them
        self._api_tokens: dict[str, ApiToken] = {}
        self._share_index: dict[str, ShareLink] = {}
        self._by_workspace = LinksByWorkspace()
        self._api_index: dict[str, ApiToken] = {}
        self._stamp: Stamp | None = None
        self._unparsed: Stamp | None = None  # the big file as it failed to parse: not read again
        self._said: str | None = None  # the last failure logged
        self._log_name: str | None = None  # the log the big file goes with
        self._log_read: tuple[int, int] | None = None  # the log's inode, and how far its lines are counted
        self._log_counts = False  # its first line named the big file's log
        self._share_uses: dict[str, tuple[int, float]] = {}
        self._token_uses: dict[str, float] = {}
        self._used: dict[str, float] = {}  # one-time keys and when they may be forgotten: without a file, and
        # those an older version kept in the big file
        self._consents: dict[str, Consent] = {}
        self._ended = Ended()
        self._ended_next = -math.inf  # when to look at the used-keys file again
        self._ended_stamp: Stamp | None = None  # the used-keys file as last read
        with contextlib.suppress(StoreUnavailable):  # logged; it starts, and answers 503 where the file is needed
            self.refresh()

    @property
    def shares(self) -> dict[str, ShareLink]:
        self.refresh()
        return self._shares

    @property
    def api_tokens(self) -> dict[str, ApiToken]:
        self.refresh()
        return self._api_tokens

    def refresh(self) -> None:
        """Read in what another process changed since this one last read or wrote.

        A big file that changed and cannot be read is StoreUnavailable (503) for every use until it is mended:
        what this process holds may lack a revoke, and a writer would write over others' changes (or, new, over
        every link). The log of counts holds up only the counts: see ``_append_counts``.
        """
        stamp = None
        try:
            stamp = _stamp(self._path)
            if stamp is not None and stamp not in (self._stamp, self._unparsed):
                assert self._path is not None
                self._load(stamp, self._path.read_text())
                self._said = None
        except OSError as exc:  # tried again next time
            raise self._unavailable(f"{self._path} cannot be read: {exc}") from None
        except _CORRUPT as exc:  # not parsed again until it changes: it may be 55 MB
            self._unparsed = stamp
            raise self._unavailable(f"{self._path} cannot be read: {str(exc) or type(exc).__name__}") from None
        if stamp is not None and stamp != self._stamp:  # the same bytes that did not parse before
            raise StoreUnavailable(_UNREADABLE, retry=True)
        with contextlib.suppress(OSError):
            self._follow_log()

    def _unavailable(self, why: str, message: str = _UNREADABLE) -> StoreUnavailable:
        """The 503 for a file that cannot be read or written, with one ERROR line per worker and failure (not one
        per request): share links, tokens and changes answer 503 until it is mended, and nothing is written over."""
        if why != self._said:
            self._said = why
            log.error("%s; share links and tokens answer 503 and nothing is written over it", why)
        return StoreUnavailable(message, retry=True)

    def _load(self, stamp: Stamp, text: str) -> None:
        """All or nothing: a file that fails half way leaves what was there before."""
        with _collector_paused():
            self._build(stamp, json.loads(text))

    def _build(self, stamp: Stamp | None, data: Any) -> None:
        shares = {item["id"]: _record(ShareLink, _expired_if_nan(item)) for item in data.get("shares", [])}
        api_tokens = {item["id"]: _record(ApiToken, item) for item in data.get("api_tokens", [])}
        used, log_name = _times(data.get("used", {})), data.get("uses_log")
        consents = {item["id"]: _record(Consent, item) for item in data.get("consents", [])}
        _add_counts(shares, api_tokens, {"shares": self._share_uses, "tokens": self._token_uses})  # not yet written
        share_index = {link.token_hash: link for link in shares.values()}
        by_workspace = LinksByWorkspace(shares.values())
        api_index = {token.token_hash: token for token in api_tokens.values()}
        self._stamp = stamp
        self._shares, self._api_tokens, self._used, self._consents = shares, api_tokens, used, consents
        self._share_index, self._by_workspace, self._api_index = share_index, by_workspace, api_index
        self._log_name, self._log_read = log_name, None  # the fresh records take its counts again

    def _follow_log(self) -> None:
        """Add the counts other processes appended since this one last looked."""
        if self._log_path is None:
            return
        try:
            stat = self._log_path.stat()  # every lookup comes here: a stat, not an open, when nothing was added
            if self._log_read == (stat.st_ino, stat.st_size):
                return
            with self._log_path.open("rb") as handle:
                stat = os.fstat(handle.fileno())
                inode, size = stat.st_ino, stat.st_size
                known, offset = self._log_read or (inode, 0)
                if known != inode or size < offset or offset == 0:  # a new log: the old one's counts are in the
                    offset, self._log_counts = 0, False  # big file, and its first line says whether it goes with it
                if offset == size:
                    self._log_read = (inode, offset)
                    return
                handle.seek(offset)
                chunk = handle.read(size - offset)
        except FileNotFoundError:  # none yet, or removed: the next batch starts one
            self._log_read = None
            return
        whole = chunk.rfind(b"\n") + 1  # a line still being written is read next time
        for line in chunk[:whole].splitlines():
            try:
                entry = json.loads(line)
                if "log" in entry:  # the first line
                    self._log_counts = entry["log"] == self._log_name
                elif self._log_counts:
                    _add_counts(self._shares, self._api_tokens, entry)
            except _CORRUPT as exc:
                log.warning("%s: a line of use counts skipped: %s", self._log_path, exc)
        self._log_read = (inode, offset + whole)

    @contextlib.contextmanager
    def _locked(self, *, read: bool = True) -> Iterator[None]:
        """Exclusive across processes, with whatever another process wrote before read in (see ``refresh``)."""
        if self._path is None:
            yield
            return
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._path.with_name(self._path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise self._unavailable(f"{self._path.parent}: {exc}", _UNWRITABLE) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if read:
                self.refresh()
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Locked, and the big file replaced on the way out."""
        with self._locked():
            yield
            if self._path is not None:
                try:
                    self._write()
                except OSError as exc:  # a full disk: the change held here goes, with the next look at the file
                    self._stamp = None
                    if not os.path.lexists(self._path):  # or now, with none yet to read it away from
                        self._build(None, {})
                    raise self._unavailable(f"{self._path} cannot be written: {exc}", _UNWRITABLE) from None

    def _write(self) -> None:
        """The big file, with every count so far folded in, and a new log to go with it."""
        assert self._path is not None
        assert self._used_path is not None
        if self._used:  # one-time keys an older version kept in the big file: to their own file first
            used = self._read_used()
            if used is not None:
                _replace(self._used_path, json.dumps({**self._used, **used}))
                self._used = {}
        name = new_id()
        # ``vars``, not ``dataclasses.asdict``: the deep copy asdict makes of every record took 5.8 s with 200,000
        # of them; json only reads. One ``json.dumps``: ``json.dump`` writes thousands of pieces, 2.4× slower.
        data: dict[str, Any] = {"shares": [vars(link) for link in self._shares.values()],
                                "api_tokens": [vars(token) for token in self._api_tokens.values()],
                                "consents": [vars(consent) for consent in self._consents.values()],
                                "uses_log": name}
        if self._used:  # the used-codes file could not be read: they stay here
            data["used"] = self._used
        _replace(self._path, json.dumps(data))
        self._stamp = _stamp(self._path)
        self._share_uses.clear()  # in the big file now: if the disk has no room for the new log, the next
        self._token_uses.clear()  # batch starts it
        self._log_name, self._log_counts = name, False
        try:
            self._start_log(name)
        except OSError as exc:  # what was asked for is done: the next batch of counts starts the log
            log.error("%s not started: %s", self._log_path, exc)

    def _start_log(self, name: str | None) -> None:
        assert self._log_path is not None
        _replace(self._log_path, json.dumps({"log": name}) + "\n")
        self._log_name, self._log_counts = name, True
        stat = self._log_path.stat()
        self._log_read = (stat.st_ino, stat.st_size)

    def save(self) -> None:
        with self._writing():
            pass

    def flush(self) -> None:
        """Append this process's counts to the log (or, once the log is long, fold it into the big file)."""
        if not (self._share_uses or self._token_uses) or self._log_path is None:
            return
        try:
            self._append_counts()
        except OSError as exc:  # a full disk must not end the task that calls this every 2 s
            log.error("%s: use counts not written, kept for the next try: %s", self._log_path, exc)
        except StoreUnavailable:
            pass  # said where it was found; kept for the next try

    def _append_counts(self) -> None:
        assert self._log_path is not None
        with self._locked():
            self._follow_log()  # whole, or nothing is appended: it could start the log over, or append after
            # lines it never read
            if self._log_read is not None and self._log_read[1] > LOG_LIMIT:
                self._write()
                return
            if not self._log_counts or self._log_read is None:
                self._start_log(self._log_name)  # none yet, or one already in the big file
            line = json.dumps({"shares": self._share_uses, "tokens": self._token_uses}).encode() + b"\n"
            fd = os.open(self._log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "wb") as handle:
                assert self._log_read is not None  # read under the lock, or started just above
                inode, offset = self._log_read
                if os.fstat(fd).st_size > offset:  # half a batch (a full disk, a worker killed): never joined to
                    os.ftruncate(fd, offset)  # this one; no reader counted it, they read whole lines
                handle.write(line)
            self._log_read = (inode, offset + len(line))
            self._share_uses.clear()
            self._token_uses.clear()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self.flush()

    async def create_share(self, *, workspace: str, port: int | None, audience: str, people: list[str],
                           created_by: str, ttl: float, now: float | None = None,
                           incarnation: str = "") -> tuple[ShareLink, str]:
        """``incarnation`` is not used: local links are told from an earlier namesake's by ``WorkspaceSpec.since``."""
        now = time.time() if now is None else now
        token = new_share_token()
        link = ShareLink(id=new_id(), token_hash=token_hash(token), workspace=workspace, port=port,
                         audience=audience, people=people, created_by=created_by, created=now, expires=now + ttl)
        with self._writing():
            for gone in [old for old in self._shares.values() if old.expires < now - SHARE_RETENTION]:
                del self._shares[gone.id]
                self._share_index.pop(gone.token_hash, None)
                self._by_workspace.discard(gone)
            self._shares[link.id] = link
            self._share_index[link.token_hash] = link
            self._by_workspace.add(link)
        return link, token

    @property
    def consents(self) -> dict[str, Consent]:
        self.refresh()
        return self._consents

    async def record_consent(self, consent: Consent) -> None:
        with self._writing():
            self._consents[consent.id] = consent

    async def withdraw_consent(self, consent: Consent) -> None:
        with self._writing():
            self._consents.pop(consent.id, None)

    def _parse_used(self) -> dict[str, float]:
        """The used-codes file; OSError, or one of ``_CORRUPT`` for what this store did not write as it is."""
        assert self._used_path is not None
        return _times(json.loads(self._used_path.read_text()))

    def _read_used(self) -> dict[str, float] | None:
        """The used-codes file (empty when there is none yet), or None when it cannot be read."""
        assert self._used_path is not None
        try:
            return self._parse_used()
        except FileNotFoundError:
            return {}
        except (OSError, *_CORRUPT) as exc:  # RecursionError too: ``[[[…`` ended every sign-in with a 500, for good
            log.error("%s cannot be read (%s): sign-in codes given out before now are refused", self._used_path, exc)
            return None

    async def use_once(self, key: str, until: float) -> bool:
        """Checked and recorded under the lock, so two workers shown one code admit it once.

        If the file of used codes cannot be read, any code given out so far may have been used: every code that
        expires within a hand-off code's life from now is refused (``_RESET``), and the file starts again."""
        now = time.time()
        with self._locked(read=False):  # nothing of the big file's: a sign-in goes on while it cannot be read
            stored = {} if self._used_path is None else self._read_used()
            if stored is None:  # and so which sign-ins were signed out: every one from before now ends
                stored = {_RESET: now + HANDOFF_TTL, _SIGN_OUTS_LOST: now + self._session_ttl}
            used = {name: forget for name, forget in {**self._used, **stored}.items() if forget > now}
            first = key not in used and until > used.get(_RESET, 0.0)
            used[key] = max(until, used.get(key, until))
            if self._used_path is None:
                self._used = used
            else:
                try:
                    _replace(self._used_path, json.dumps(used))
                except OSError as exc:  # not recorded, so not admitted: it could be used again
                    raise self._unavailable(f"{self._used_path} cannot be written: {exc}", _UNWRITABLE) from None
        return first

    @property
    def ended_sign_ins(self) -> Ended:
        now = time.monotonic()
        if now >= self._ended_next and self._used_path is not None:
            self._ended_next = now + ENDED_READ_EVERY
            self._read_ended()
        return self._ended

    def _read_ended(self) -> None:
        """Sign-outs from the used-keys file, added to those known (one this process saw still holds here until
        its time). A file that was lost, or cannot be parsed now (cut short, edited by hand), lost which sign-ins
        were signed out: every sign-in from before then ends, here as in the file ``use_once`` starts again."""
        assert self._used_path is not None
        try:
            stamp = _stamp(self._used_path)
            if stamp == self._ended_stamp:
                return
            used = {} if stamp is None else self._parse_used()
        except OSError:  # the folder or the file, maybe for now (no descriptors left): looked at again in a second
            return
        except _CORRUPT as exc:
            log.error("%s cannot be read (%s): every sign-in from before now is ended", self._used_path, exc)
            used = {_SIGN_OUTS_LOST: time.time() + self._session_ttl}
        self._ended_stamp, now = stamp, time.time()
        ended = Ended({sid: until for sid, until in self._ended.items() if until > now},
                      max(self._ended.before, used.get(_SIGN_OUTS_LOST, -math.inf)))
        ended.update((key.removeprefix(ENDED), until) for key, until in used.items()
                     if key.startswith(ENDED) and until > now)
        self._ended = ended

    async def end_sign_in(self, sign_in: SignIn) -> None:
        await self.use_once(ENDED + sign_in.id, sign_in.expires)
        self._ended[sign_in.id] = sign_in.expires

    def find_share(self, token: str) -> ShareLink | None:
        if not token.startswith(SHARE_PREFIX):
            return None
        self.refresh()
        return self._share_index.get(token_hash(token))

    def shares_of(self, workspace: str) -> list[ShareLink]:
        self.refresh()
        return self._by_workspace.of(workspace)

    def use_share(self, link: ShareLink, now: float | None = None) -> None:
        now = time.time() if now is None else now
        link.uses += 1
        link.last_used = now
        current = self._shares.get(link.id)
        if current is not None and current is not link:  # ``link`` is from before a reload, which made ``current``
            current.uses += 1
            current.last_used = now
        uses, _ = self._share_uses.get(link.id, (0, now))
        self._share_uses[link.id] = (uses + 1, now)

    async def revoke_share(self, link: ShareLink, now: float | None = None) -> ShareLink:
        now = time.time() if now is None else now
        with self._writing():
            fresh = self._shares.get(link.id)
            if fresh is not None and fresh.revoked is None:
                fresh.revoked = now
        link.revoked = link.revoked or now
        return self._shares.get(link.id, link)

    async def create_api_token(self, identity: Identity, *, name: str) -> tuple[ApiToken, str]:
        return self.create_api_token_now(identity, name=name)

    def create_api_token_now(self, identity: Identity, *, name: str) -> tuple[ApiToken, str]:
        """The same, synchronously (the CLI writes the file without an event loop)."""
        token = new_api_token()
        record = ApiToken(id=new_id(), token_hash=token_hash(token), subject=identity.subject, name=name,
                          created=time.time(), email=identity.email, groups=list(identity.groups),
                          attributes=dict(identity.attributes))
        with self._writing():
            self._api_tokens[record.id] = record
            self._api_index[record.token_hash] = record
        return record, token

    def find_api_token(self, token: str) -> ApiToken | None:
        if not token.startswith(API_PREFIX):
            return None
        self.refresh()
        return self._api_index.get(token_hash(token))

    def use_api_token(self, record: ApiToken, now: float) -> None:
        record.last_used = now
        self._token_uses[record.id] = now

    async def revoke_api_token(self, record: ApiToken) -> None:
        with self._writing():
            self._api_tokens.pop(record.id, None)
            self._api_index.pop(record.token_hash, None)

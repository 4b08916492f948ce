"""Session cookies, hand-off codes and upstream assertions, made with the gateway's keys.

Every token names its audience (the exact host it is for) and its type, so a cookie or code minted for one
host is refused on any other. Codes and assertions are short JWTs; a session cookie is sealed (AES-GCM), as it
can land in the hands of the owner of the host it is for (see ``issue``). Session cookies read are cached until
they expire, so the request path opens a cookie once, not once per request.
"""

from __future__ import annotations

import functools
import json
import math
import re
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jwt
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.auth.identity import Identity
from gateway.auth.keys import KeySet, same_secret
from gateway.errors import BadRequest, GatewayError

HANDOFF_TTL = 60.0
ASSERTION_TTL = 120.0
_CACHE_LIMIT = 50_000
SIGN_INS_PER_HOUR = 30
"""Sign-ins of one person an hour, in one process (see ``Sessions.begin``)."""
HAND_OFFS_PER_MINUTE = 60
"""Hand-off codes for one person to one host a minute, in one process (see ``Sessions.handoff_code``)."""
HAND_OFFS_PER_MINUTE_IN_ALL = 600
"""The same to all hosts together."""
_SEAL_BLOCK = 1024
"""A sealed identity's length says only how many such blocks it takes: a name, an e-mail and a few groups fit in
one (the code travels in a URL, beside the path the visitor asked for: it is kept short)."""
_SESSION_BLOCK = 256
"""The same for session cookies, in smaller steps: browsers drop a cookie over 4 KB, and a sealed identity grows
by a third in base64, so blocks of 1,024 would refuse identities of over 2 KB (groups) that fitted before."""


@functools.cache  # a handful of names, asked for on every request
def cookie_name(base: str, secure: bool) -> str:
    """``__Host-`` under HTTPS pins the cookie to exactly this host, path ``/`` and Secure."""
    return f"__Host-codehub_{base}" if secure else f"codehub_{base}"


_COOKIE_SPACE = " \t"
"""What separates cookies in a ``Cookie`` header (RFC 6265 §5.4): only this is trimmed off a name. Chromium keeps the
``__Host-`` rule for names that begin with it, but takes ``\u2000__Host-codehub_session`` with a ``Domain=`` on the
shared parent, from any sibling host, as an ordinary cookie: trimmed as Python's ``str.strip`` trims (every Unicode
space), it would pass for ours, and a preview could sign its visitors in to the hub or another preview as anyone."""


def read_cookie(headers: CIMultiDictProxy[str] | CIMultiDict[str], name: str) -> str | None:
    """One of the gateway's cookies from the request, the first one when a name repeats (as browsers list the
    most specific first). A name matches only as the browser spelt it (see ``_COOKIE_SPACE``): at the start of a
    pair (after ``;`` and spaces), followed by spaces and ``=``.

    Read pair by pair, the fastest way for what browsers send (0.5 µs with a session cookie); a long header of
    more than ``_MANY_PAIRS`` pairs by a regular expression, in C: a client chooses its heads, and a hundred
    ``Cookie`` headers of ``codehub_session;;;;…`` cost 45 ms a read pair by pair in Python, 8 ms so."""
    for header in headers.getall("Cookie", ()):
        if name not in header:
            continue
        if len(header) > _SHORT and header.count(";") > _MANY_PAIRS:
            if (found := _cookie_pattern(name).search(";" + header)) is not None:
                return found[1].strip(_COOKIE_SPACE)
            continue
        for part in header.split(";"):
            key, eq, value = part.partition("=")
            if eq and key.strip(_COOKIE_SPACE) == name:
                return value.strip(_COOKIE_SPACE)
    return None


def cookie_is_alone(headers: CIMultiDictProxy[str], name: str) -> bool:
    """Whether the request carries exactly one cookie called ``name``: a cookie set for the shared parent domain,
    or for a longer path, comes beside the host's own under the same name (and only to that path)."""
    return sum(len(_cookie_pattern(name).findall(";" + header)) for header in headers.getall("Cookie", ())) == 1


_SHORT, _MANY_PAIRS = 1024, 200
"""A ``Cookie`` header longer than ``_SHORT`` is counted (shorter ones hold few pairs, and counting costs a tenth of a
microsecond), and read by the pattern past ``_MANY_PAIRS`` pairs: more than a browser sends (it keeps some 180
cookies per site)."""


@functools.cache
def _cookie_pattern(name: str) -> re.Pattern[str]:
    """``name``'s pair in a ``Cookie`` header with a ``;`` put before it (so the first pair starts like the rest)."""
    return re.compile(rf";[{_COOKIE_SPACE}]*{re.escape(name)}[{_COOKIE_SPACE}]*=([^;]*)")


def set_cookie(name: str, value: str, *, max_age: int, secure: bool, embedded: bool = False,
               cross_site: bool = False) -> str:
    """A host-only cookie (never ``Domain=``), HttpOnly, path ``/``; Secure under HTTPS.

    ``embedded`` cookies are set inside an iframe on another site: browsers that block third-party cookies keep
    them only as ``Partitioned`` (CHIPS) cookies, which need ``SameSite=None; Secure``. ``cross_site`` cookies
    must ride on credentialed CORS requests from other preview hosts, so they are ``SameSite=None`` too.
    """
    same_site = "None" if embedded or cross_site else "Lax"
    parts = [f"{name}={value}", "Path=/", f"Max-Age={max_age}", "HttpOnly", f"SameSite={same_site}"]
    if secure or same_site == "None":
        parts.append("Secure")
    if embedded:
        parts.append("Partitioned")
    return "; ".join(parts)


def is_embedded(headers: Mapping[str, str]) -> bool:
    """The browser is loading this inside a frame (Fetch Metadata)."""
    return headers.get("Sec-Fetch-Dest") in ("iframe", "frame")


def is_prefetch(headers: Mapping[str, str]) -> bool:
    """The browser fetches this ahead, on a page's guess (a prefetch or prerender), not because someone opened it."""
    return "prefetch" in headers.get("Sec-Purpose", headers.get("Purpose", ""))


class SignIn(NamedTuple):
    """One sign-in at the hub. Every session it leads to (the hub's, and each preview's and IDE's it opens through a
    hand-off) carries its id and ends with it: at its expiry, or as soon as it is signed out, which the hub cannot
    otherwise do to cookies of other hosts."""

    id: str
    expires: float

    def left(self) -> int:
        """Whole seconds it has left: the ``Max-Age`` of every cookie of its sessions."""
        return max(0, int(self.expires - time.time()))


class Ended(dict[str, float]):
    """The sign-ins signed out before their time, as a store knows them: id -> when it would have expired; and
    every sign-in that expires at or before ``before``, for when which ones were signed out was lost (the file
    store's used-keys file cut short or edited): everyone from before the loss signs in once more, none of them
    opens again. A dict, so that the look every request with a session makes is a dict's."""

    __slots__ = ("before",)

    def __init__(self, ids: Mapping[str, float] | None = None, before: float = -math.inf) -> None:
        super().__init__(ids or {})
        self.before = before


class Session(NamedTuple):
    identity: Identity
    sign_in: SignIn

    def record(self) -> dict[str, Any]:
        """As a cookie or a hand-off code seals it."""
        return {**self.identity.claims(), "sid": self.sign_in.id, "exp": int(self.sign_in.expires)}

    @classmethod
    def of(cls, record: Any) -> Session:
        """From what ``record`` sealed; KeyError or ValueError for a record of no sign-in (sealed before there
        were any)."""
        return cls(Identity.from_claims(record), SignIn(str(record["sid"]), float(record["exp"])))


class TooManySignIns(GatewayError):
    status = 429
    code = "too-many-sign-ins"
    title = "Too many sign-ins"


class TooManyHandOffs(GatewayError):
    status = 429
    code = "too-many-hand-offs"
    title = "Too many sign-ins to previews"


class _Quota:
    """At most ``most`` acts of each person in the last ``window`` seconds, in this process: for acts that cost
    everyone something (a record kept in every worker, a rewrite of a file they share). The memory of who acted when
    is bounded too: past ``_CACHE_LIMIT`` people, those idle for a window are forgotten first, else all."""

    def __init__(self, most: int, window: float) -> None:
        self._most = most
        self._window = window
        self._times: dict[str, list[float]] = {}  # subject -> when they acted in the last window

    def take(self, subject: str, now: float) -> int:
        """0 when ``subject`` may act now (counted as acting), else the whole seconds until they may."""
        recent = [at for at in self._times.get(subject, ()) if at > now - self._window]
        if len(recent) >= self._most:
            return int(recent[0] + self._window - now) + 1  # at least 1: recent[0] is within the window
        if subject not in self._times and len(self._times) >= _CACHE_LIMIT:
            self._times = {who: times for who, times in self._times.items() if times[-1] > now - self._window}
            if len(self._times) >= _CACHE_LIMIT:
                self._times.clear()
        self._times[subject] = [*recent, now]
        return 0


class Sessions:
    def __init__(self, keys: Callable[[], KeySet], issuer: str, *, ttl: float,
                 clock: Callable[[], float] = time.time) -> None:
        self._keys = keys
        self._issuer = issuer
        self.ttl = ttl
        self._clock = clock
        self._verified: dict[tuple[str, str], tuple[Session, str, float]] = {}  # and its sign-in's id and end
        self._assertions: dict[tuple[Identity, str], tuple[str, float]] = {}
        self._marks: dict[tuple[str, str], tuple[str, ...]] = {}
        self._sign_ins = _Quota(SIGN_INS_PER_HOUR, 3600)
        self._hand_offs = _Quota(HAND_OFFS_PER_MINUTE, 60)
        self._hand_offs_in_all = _Quota(HAND_OFFS_PER_MINUTE_IN_ALL, 60)

    def _sign(self, claims: dict[str, Any], audience: str, ttl: float) -> str:
        now = int(self._clock())
        return self._keys().sign({**claims, "iss": self._issuer, "aud": audience, "iat": now, "exp": now + int(ttl)})

    def _verify(self, token: str, audience: str, typ: str) -> dict[str, Any]:
        claims = self._keys().verify(token, audience=audience, issuer=self._issuer)
        if claims.get("typ") != typ:
            raise jwt.InvalidTokenError("wrong token type")
        return claims

    def _seal(self, record: dict[str, Any], block: int, context: str) -> str:
        """``record`` as JSON, padded with blanks to a whole number of ``block`` bytes (its length says no more than
        that number), sealed for ``context``."""
        text = json.dumps(record).encode()
        return self._keys().seal(text.ljust(-(-len(text) // block) * block), context.encode())

    def _open(self, sealed: str, context: str) -> Any:
        """What ``_seal`` sealed for ``context``; ``jwt.InvalidTokenError`` or ``ValueError`` for anything else."""
        return json.loads(self._keys().unseal(sealed, context.encode()))

    def sign_in(self) -> SignIn:
        """A new sign-in, for ``ttl``: an unguessable id, as it names the sign-in in the token store."""
        return SignIn(secrets.token_hex(16), int(self._clock()) + int(self.ttl))

    def begin(self, identity: Identity) -> SignIn:
        """A new sign-in at the hub for ``identity``, or ``TooManySignIns`` past ``SIGN_INS_PER_HOUR`` of theirs in
        the last hour. Each sign-in may be signed out, and a sign-out is kept until the sign-in would have expired
        (in every worker's memory, in the used-keys file that every hand-off rewrites, as a UsedKey): a loop of
        sign-in and sign-out would grow them, and the cost of everyone's sign-ins, without bound."""
        wait = self._sign_ins.take(identity.subject, self._clock())
        if wait:
            minutes = -(-wait // 60)
            raise TooManySignIns(f"You have signed in {SIGN_INS_PER_HOUR} times in the last hour. Sign in again in "
                                 f"{minutes} minute{'s' if minutes != 1 else ''}.", headers={"Retry-After": str(wait)})
        return self.sign_in()

    def issue(self, identity: Identity, audience: str, sign_in: SignIn | None = None) -> str:
        """A session cookie for ``audience``, sealed: it tells whoever holds it nothing, not even who it is for.
        Its holder may be the owner of the host it is for: their page can send a visitor's browser through the
        hand-off with a state of their own choosing, read the code off the callback URL on their origin, and
        redeem it themselves. What that buys them is this cookie, which opens their own host only, and no longer
        than the sign-in it came from (a new one when none is given: a sign-in at the hub)."""
        return self._seal(Session(identity, sign_in or self.sign_in()).record(), _SESSION_BLOCK, f"session {audience}")

    def read(self, token: str, audience: str, ended: Ended) -> Session | None:
        """The session in a cookie for ``audience``, or None when it is invalid, expired, or its sign-in is one of
        ``ended`` (signed out). Cookies from before sign-ins had ids do not open: everyone signs in once more."""
        cached = self._verified.get((token, audience))
        if cached is None:
            try:
                session = Session.of(self._open(token, f"session {audience}"))  # no code's, nor another host's
            except (jwt.InvalidTokenError, ValueError, KeyError):  # not sealed by these keys for this host
                return None
            if len(self._verified) >= _CACHE_LIMIT:
                self._verified.clear()
            cached = self._verified[(token, audience)] = (session, *session.sign_in)
        session, sign_in_id, expires = cached
        if self._clock() >= expires:
            del self._verified[(token, audience)]
            return None
        return None if sign_in_id in ended or expires <= ended.before else session

    def forget_cached(self) -> None:
        """After a key change: verify everything again."""
        self._verified.clear()
        self._assertions.clear()
        self._marks.clear()

    def owner_marks(self, audience: str, owner: str) -> tuple[str, ...]:
        """What a browser is told, in a cookie of ``audience``'s, of whose workspace that host is now: the mark
        to set first, then those of keys rotated out (still this owner's). Keyed, and made for the host, so it
        tells nobody who owns it, nor whether two hosts have one owner (cached: asked on every request to a
        workspace's host)."""
        marks = self._marks.get((audience, owner))
        if marks is None:
            if len(self._marks) >= _CACHE_LIMIT:
                self._marks.clear()
            marks = self._marks[(audience, owner)] = self._keys().marks(f"owner {audience}\0{owner}".encode())
        return marks

    def handoff_code(self, session: Session, host: str, state: str) -> str:
        """A code the hub puts in a URL on ``host``, where the owner's scripts can read it: the identity in it is
        sealed, so it tells them nothing (not even who), and it signs in only the browser holding ``state``, to
        the hub session's sign-in.

        At most ``HAND_OFFS_PER_MINUTE`` of a person's to one host and ``HAND_OFFS_PER_MINUTE_IN_ALL`` to all, else
        ``TooManyHandOffs``: each code redeemed is kept for its minute where every worker reads it (the used-keys
        file, rewritten per code; a UsedKey), so a loop of hand-offs would cost everyone's sign-ins and every
        worker's reads in step with it. Per host first, and only what that lets through counts in all: a page can
        send its visitor round the hand-off to its own host as fast as it likes (it completes them itself), and
        must spend only that host's minute, not the visitor's every other preview's."""
        now, subject = self._clock(), session.identity.subject
        for quota, key, most, where in ((self._hand_offs, f"{subject}\0{host}", HAND_OFFS_PER_MINUTE, "this preview"),
                                        (self._hand_offs_in_all, subject, HAND_OFFS_PER_MINUTE_IN_ALL, "previews")):
            if wait := quota.take(key, now):
                raise TooManyHandOffs(f"You were signed in to {where} {most} times in the last minute. "
                                      f"Open the page again in {wait} seconds.", headers={"Retry-After": str(wait)})
        who = self._seal(session.record(), _SEAL_BLOCK, f"handoff {host}")
        return self._sign({"typ": "handoff", "state": state, "jti": secrets.token_hex(12), "who": who}, host,
                          HANDOFF_TTL)

    def read_code(self, code: str, host: str, state: str | None) -> tuple[Session, str, float]:
        """A hand-off code's session, once-key and expiry, if it is for this host and the browser holding its
        state cookie. That it is used only once is the token store's to enforce: every replica must agree."""
        try:
            claims = self._verify(code, host, "handoff")
            session = Session.of(self._open(str(claims.get("who")), f"handoff {host}"))
        except (jwt.InvalidTokenError, ValueError, KeyError):
            raise BadRequest("This sign-in link is invalid or has expired. Open the page again.",
                             code="handoff-invalid") from None
        if not state or not same_secret(state, str(claims.get("state", ""))):
            raise BadRequest("This sign-in link was started in another browser or tab. Open the page again.",
                             code="handoff-state-mismatch")
        return session, f"handoff-{claims.get('jti')}", float(claims["exp"])

    def assertion(self, identity: Identity, audience: str) -> str:
        """The signed identity header upstream apps can verify with the gateway's JWKS (cached while fresh)."""
        now = self._clock()
        cached = self._assertions.get((identity, audience))
        if cached is not None and now < cached[1] - ASSERTION_TTL / 2:
            return cached[0]
        token = self._sign({**identity.claims(), "typ": "assertion"}, audience, ASSERTION_TTL)
        if len(self._assertions) >= _CACHE_LIMIT:
            self._assertions.clear()
        self._assertions[(identity, audience)] = (token, now + ASSERTION_TTL)
        return token

    def sign_state(self, claims: dict[str, Any], audience: str, ttl: float) -> str:
        return self._sign({**claims, "typ": "state"}, audience, ttl)

    def seal_state(self, claims: dict[str, Any], audience: str, ttl: float, *, block: int = _SESSION_BLOCK) -> str:
        """As ``sign_state``, for claims whoever carries it must not read: a consent page's ``ask`` names the
        visitor, and the owner of the app that sent them there can hold one of its own (a navigation with the
        session a visitor's hand-off code bought them). Sealed, and padded as session cookies are unless a
        ``block`` says otherwise."""
        record = {**claims, "typ": "state", "exp": int(self._clock()) + int(ttl)}
        return self._seal(record, block, f"state {audience}")

    def open_state(self, token: str | None, audience: str) -> dict[str, Any] | None:
        """What ``seal_state`` sealed for ``audience``, while it lasts; None for anything else."""
        if not token:
            return None
        try:
            claims: dict[str, Any] = self._open(token, f"state {audience}")  # as sealed above: with an "exp"
        except (jwt.InvalidTokenError, ValueError):
            return None
        return None if self._clock() >= claims["exp"] else claims

    def read_state(self, token: str | None, audience: str) -> dict[str, Any] | None:
        if not token:
            return None
        try:
            return self._verify(token, audience, "state")
        except jwt.InvalidTokenError:
            return None

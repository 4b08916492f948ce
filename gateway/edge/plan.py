"""The one decision per request: its facts and a read-only view of the world in, a plan and its effects out.

Plans and effects are values: made once, read by the lane that acts, never changed (they are plain slotted
dataclasses rather than frozen ones only because a frozen one costs microseconds to make, on every request).

Both lanes execute plans and neither decides anything itself: the fast lane serves a ``Forward`` of a bodiless
GET or HEAD, aiohttp's lane any plan, and a hand-over from one to the other carries the plan. Host, route,
credentials, the CORS rule and membership are each worked out once, here. Nothing here does I/O: what must
happen once the plan is acted on (count a share link's use, record the decision) is returned as ``effects`` for
the lane that acts on it, so a plan can be made, inspected and thrown away (tests do) without a trace.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.auth.authenticate import (
    SESSION,
    SHARE,
    Credentials,
    authenticate,
    share_cookie_redirect,
    sign_in_redirect,
    stale_share_refusal,
)
from gateway.auth.ide import put_ide_cookie
from gateway.auth.identity import Identity
from gateway.auth.keys import same_secret
from gateway.auth.sessions import Sessions, cookie_is_alone, cookie_name, is_embedded, read_cookie, set_cookie
from gateway.auth.store import ApiToken, ShareLink, StoreUnavailable, TokenStore
from gateway.edge import cors
from gateway.edge.disclosure import consent_pending, consent_url, disclosed, identity_headers
from gateway.edge.policy import (
    OTHER_TARGET,
    CorsRule,
    Decision,
    Policy,
    Reason,
    decide,
    denial,
    grants_target,
    may_wake,
)
from gateway.edge.routing import WAKE_EVENTS_PATH, Hosts, Kind, Target, normalise_host, route
from gateway.errors import BadRequest, Conflict, Forbidden, GatewayError, NotFound
from gateway.errors import Redirect as RedirectError
from gateway.lifecycle.base import Phase, WorkspaceSpec, WorkspaceState
from gateway.proxy.headers import ClientFacts, ResponseRules, upstream_request_headers

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IDE_RULES = ResponseRules({"Content-Security-Policy": "frame-ancestors 'self'", "X-Frame-Options": "SAMEORIGIN"})
"""The IDE frames itself (code-server's webviews, the markdown preview), and nothing else may frame it."""
_HUB, _IDE, _IDE_MOVED, _PREVIEW, _RESERVED = Kind.HUB, Kind.IDE, Kind.IDE_MOVED, Kind.PREVIEW, Kind.RESERVED
_RUNNING, _OWNER, _COLLABORATOR, _ADMIN = Phase.RUNNING, Reason.OWNER, Reason.COLLABORATOR, Reason.ADMIN
"""Read as globals on every request: Python 3.11 looks enum members up through a slow ``__getattr__`` hook."""
OWNER_MARK = "owner"
"""The cookie on a workspace's host that says whose workspace registered a service worker there (``_name_reused``)."""
_OWNER_MARK_NAMES = (cookie_name(OWNER_MARK, False), cookie_name(OWNER_MARK, True))
"""Its name over plain HTTP and under HTTPS: looked up on every request to a workspace's host."""
OWNER_MARK_AGE = 400 * 86400
"""As long as Chromium keeps a cookie: a service worker outlives a cookie that ends with the browser's session."""
CLEARED = '"cache", "storage"'
"""What of a host's former workspace a browser is told to drop (``Clear-Site-Data``): its service workers, storage
and cached files. Never ``"cookies"``, which browsers clear for the whole site: the hub's and every preview's."""


class NameReused(Conflict):
    """A browser comes back to a host whose workspace's name passed to another owner since it was served there."""

    code = "name-reused"
    title = "This address has a new owner"


class World(Protocol):
    """What a decision may look at; every lookup is in memory (the runtime's and the store's caches)."""

    @property
    def hosts(self) -> Hosts: ...
    @property
    def policy(self) -> Policy: ...
    @property
    def secure(self) -> bool: ...
    @property
    def trusted_proxies(self) -> tuple[IPNetwork, ...]: ...
    @property
    def sessions(self) -> Sessions: ...
    @property
    def store(self) -> TokenStore: ...
    def workspace(self, name: str) -> WorkspaceState | None: ...
    def waking(self, workspace: str, port: int) -> bool: ...
    def ide_secret(self, spec: WorkspaceSpec) -> str | None: ...


@dataclass(slots=True)
class Facts:
    """What the request says, whichever lane read it."""

    method: str
    target: str
    """The request target as sent: path and query, still percent-encoded."""
    headers: CIMultiDictProxy[str]
    peer: str
    now: float


# ---------------------------------------------------------------------------------------------------- effects
@dataclass(slots=True)
class UseShare:
    """A share link was presented: it counts one use."""

    link: ShareLink
    at: float


@dataclass(slots=True)
class UseToken:
    """An API token was presented: its last use is noted."""

    token: ApiToken
    at: float


@dataclass(slots=True)
class RecordDecision:
    """The policy's answer, for metrics and (refusals) the policy log."""

    target: Target
    identity: Identity | None
    decision: Decision


Effect = UseShare | UseToken | RecordDecision


# ---------------------------------------------------------------------------------------------------- plans
@dataclass(slots=True, kw_only=True)
class _Plan:
    effects: tuple[Effect, ...] = ()
    user: str | None = None
    """The caller's subject, for the access log."""
    target: Target | None = None


@dataclass(slots=True, kw_only=True)
class Forward(_Plan):
    """Send the request to a port of a RUNNING workspace and stream the answer back."""

    workspace: str
    address: str | None
    """Where the workspace runs; a ``Hold`` learns it once the workspace is awake."""
    port: int
    tls: bool
    public_origin: str
    path: str
    """The target as the app sees it (a share token in the query removed)."""
    headers: CIMultiDict[str]
    """The request headers as they go upstream (hygiene applied, identity as disclosed)."""
    rules: ResponseRules
    websocket: bool
    keeps_awake: bool
    """Visitors keep a workspace awake unless the policy says only its members do."""
    on_error: dict[str, str] = field(default_factory=dict)
    """Headers for the gateway's own error answers to this request (CORS, so a front end can read why)."""


@dataclass(slots=True, kw_only=True)
class Hold(_Plan):
    """The workspace (or this port of it) is waking: wait for it, then ``forward`` — to the address it wakes on."""

    forward: Forward
    state: WorkspaceState
    explained: bool
    """Whether the caller is told the runtime's own words if the wake fails (``_Request._explained``)."""


@dataclass(slots=True, kw_only=True)
class WaitingPage(_Plan):
    """A browser navigating to a waking workspace gets a page that follows the wake, instead of being held."""

    state: WorkspaceState
    port: int
    explained: bool
    """Whether the page shows the runtime's own words on the wake (``_Request._explained``)."""


@dataclass(slots=True, kw_only=True)
class Preflight(_Plan):
    """A CORS preflight the port's rule answers (204 with these headers)."""

    headers: dict[str, str]


@dataclass(slots=True, kw_only=True)
class Refuse(_Plan):
    """The gateway answers itself: a refusal, a sign-in page, a consent page (all ``GatewayError``s)."""

    error: GatewayError


@dataclass(slots=True, kw_only=True)
class Redirect(_Plan):
    """Elsewhere, on the same host or the hub (a share token dropped from the URL, a sign-in, the IDE moved)."""

    error: RedirectError


class Page(enum.Enum):
    HUB = "hub"
    """The hub origin's own pages and API: aiohttp's router."""
    AUTH_CALLBACK = "auth-callback"
    AUTH_POPUP = "auth-popup"
    WAKE_EVENTS = "wake-events"


@dataclass(slots=True, kw_only=True)
class GatewayPage(_Plan):
    """One of the gateway's own handlers serves it (what it needs to know is decided here)."""

    page: Page
    state: WorkspaceState | None = None
    port: int | None = None
    host: str = ""
    """``AUTH_CALLBACK``: the host its session cookie is bound to."""
    cross_site: bool = False
    """``AUTH_CALLBACK``: the port lets other sites call it with credentials, so its cookie must be SameSite=None."""
    explained: bool = False
    """``WAKE_EVENTS``: the stream carries the runtime's own words on the wake (``_Request._explained``)."""


Plan = Forward | Hold | WaitingPage | Preflight | Refuse | Redirect | GatewayPage


# ---------------------------------------------------------------------------------------------------- the decision
def wants_page(method: str, headers: CIMultiDictProxy[str]) -> bool:
    """Browsers navigating get pages; scripts, fetch/XHR and API clients get JSON."""
    mode = headers.get("Sec-Fetch-Mode")
    if mode is not None:
        return mode == "navigate"
    if method not in ("GET", "HEAD") or "Authorization" in headers:
        return False
    if headers.get("X-Requested-With"):
        return False
    return "text/html" in headers.get("Accept", "")


def is_websocket(method: str, headers: CIMultiDictProxy[str]) -> bool:
    return method == "GET" and headers.get("Upgrade", "").lower() == "websocket"


def plan(facts: Facts, world: World) -> Plan:
    """The request's plan. Never raises for anything a client can send: a refusal is a plan too."""
    hosts = facts.headers.getall("Host", ())
    if len(hosts) != 1:
        return Refuse(error=BadRequest("Send exactly one Host header.", code="bad-host"))
    try:
        target = route(hosts[0], facts.target, world.hosts)
    except GatewayError as exc:
        return Refuse(error=exc)
    if target.kind is _HUB:
        return GatewayPage(page=Page.HUB, target=target)
    assert target.workspace is not None
    if target.kind is _IDE_MOVED:
        return Redirect(error=RedirectError(world.hosts.ide_url(target.workspace, target.path), status=308),
                        target=target)
    try:
        return _Request(facts, world, target, hosts[0]).plan()
    except GatewayError as exc:  # what the plan asked could not be answered (the token store cannot be read)
        return Refuse(error=exc, target=target)


class Granted(NamedTuple):
    """What a ``Forward`` let through: to where, for whom, and what of them its app was told (``None``: nothing).
    A WebSocket lives for hours (an IDE's terminal is one), so this is asked again while it lasts
    (``still_granted``)."""

    workspace: str
    port: int
    user: str | None
    told: tuple[str, str, str] | None

    @classmethod
    def of(cls, forward: Forward) -> Granted:
        headers = forward.headers  # the identity headers are the gateway's alone: a client's are removed
        told = (headers.get("X-Forwarded-User", ""), headers.get("X-Forwarded-Email", ""),
                headers.get("X-Forwarded-Groups", "")) if "X-Codehub-Assertion" in headers else None
        return cls(forward.workspace, forward.port, forward.user, told)


def still_granted(facts: Facts, was: Granted, world: World, now: float) -> bool:
    """Whether a request let through as ``was`` would be let through so now: it ends with the sign-in, share link,
    token, visibility, policy or consent that let it in. The same place is not enough: the same caller (a signed-out
    copy of a cookie on a public port goes there too, as nobody), and, when its app was told who, told the same (a
    consent withdrawn). A store that cannot be read for now (503) says nothing was revoked: it holds until it can be
    read. The plan's effects are dropped: asking is not a new use."""
    again = plan(Facts(facts.method, facts.target, facts.headers, facts.peer, now), world)
    if isinstance(again, Refuse) and isinstance(again.error, StoreUnavailable):
        return True
    forward = again.forward if isinstance(again, Hold) else again
    if not isinstance(forward, Forward):
        return False
    now_granted = Granted.of(forward)
    return now_granted[:3] == was[:3] and (was.told is None or now_granted.told == was.told)


_GRANT_HEADERS = ("Host", "Origin", "Upgrade", "Authorization", "Sec-Fetch-Site", "Sec-Fetch-Mode", "Sec-Fetch-Dest",
                  "Sec-Fetch-User", "Sec-Purpose", "Purpose", "X-Requested-With", "Accept")
"""The headers a plan reads to decide whether and where a request goes (the rest shape only what goes upstream)."""


def grant_facts(facts: Facts, secure: bool) -> Facts:
    """What of a WebSocket's request ``still_granted`` asks again with, on every heartbeat tick for as long as it
    lives: the headers a plan decides by, and of its cookies only the gateway's. The rest is the client's to choose
    (a hundred 8 KB ``Cookie`` headers of ``;``, a ``Connection`` naming thousands) and would cost each tick ~60 ms,
    per WebSocket, for one head sent once; it is not kept either."""
    headers = facts.headers
    kept = CIMultiDict([(name, value) for name in _GRANT_HEADERS for value in headers.getall(name, ())])
    cookies = [f"{name}={value}" for name in (cookie_name(SESSION, secure), cookie_name(SHARE, secure))
               if (value := read_cookie(headers, name)) is not None]
    if cookies:
        kept.add("Cookie", "; ".join(cookies))
    return Facts(facts.method, facts.target, CIMultiDictProxy(kept), facts.peer, facts.now)


_FRAMING_RULES: dict[tuple[int, bool], tuple[Policy, ResponseRules]] = {}


def _framing_rules(policy: Policy, drop_cors: bool) -> ResponseRules:
    """A preview response's rules when no CORS answer is added: the same for every request under one policy, so
    made once per policy (kept with it, so an ``id`` reused after a reload is never mistaken for it), read-only."""
    key = (id(policy), drop_cors)
    made = _FRAMING_RULES.get(key)
    if made is None or made[0] is not policy:
        if len(_FRAMING_RULES) >= 8:  # policies past are never asked about again
            _FRAMING_RULES.clear()
        rules = ResponseRules(MappingProxyType({"Content-Security-Policy": cors.frame_ancestors(policy)}),
                              drop_cors=drop_cors, drop_frame_options=bool(policy.embedding.frame_ancestors))
        made = _FRAMING_RULES[key] = (policy, rules)
    return made[1]


class _Request:
    """One request to a workspace's host, while its plan is made: each fact worked out at most once."""

    __slots__ = ("_role", "audience", "effects", "facts", "found", "host", "marked", "origin", "policy", "rule",
                 "state", "target", "world")

    def __init__(self, facts: Facts, world: World, target: Target, host: str) -> None:
        self.facts, self.world, self.target, self.host = facts, world, target, host
        self.policy = world.policy
        """The policy this plan follows throughout (a reload mid-plan does not mix two)."""
        self.origin = world.hosts.origin(host)
        audience = normalise_host(host, world.hosts.scheme)
        assert audience is not None, "routing accepted the host"
        self.audience = audience
        """The host as sessions, share cookies and hand-off codes are bound to it."""
        self.rule: CorsRule | None = cors.rule_for(self.policy, target.port) if target.port is not None else None
        self.effects: list[Effect] = []
        self.found = False
        """Whether ``state`` is known yet (the refusals before it carry no CORS headers)."""
        self.marked = False
        """Whether the browser holds the mark of the host's owner (``_name_reused``): none is set again."""
        self._role: Reason | None = None
        """Why the caller was let in (owner, collaborator, admin, a public port, a share link...), or None: nobody
        was let in (a passthru preflight goes on as nobody)."""
        self.state: WorkspaceState

    # --- the shape of it -------------------------------------------------------------------------------------
    def plan(self) -> Plan:
        target, facts = self.target, self.facts
        path = target.path.partition("?")[0]
        if target.kind is _RESERVED and path == "/_codehub/auth/callback":
            cross_site = self.rule is not None and self.rule.mode == "replace" and self.rule.allow_credentials
            return GatewayPage(page=Page.AUTH_CALLBACK, target=target, host=self.audience, cross_site=cross_site)
        if target.kind is _RESERVED and path == "/_codehub/auth/popup":
            return GatewayPage(page=Page.AUTH_POPUP, target=target)
        assert target.workspace is not None
        state = self.world.workspace(target.workspace)
        if state is None:
            return self._refuse(NotFound(f"There is no workspace called {target.workspace}.",
                                         code="workspace-not-found"))
        self.state, self.found = state, True
        if (reused := self._name_reused()) is not None:
            return reused
        if target.kind is _RESERVED:
            return self._reserved(path)
        if target.kind is _PREVIEW and cors.is_preflight(facts.method, facts.headers) and self.rule is not None:
            return self._preflight()
        credentials = self._check()
        if isinstance(credentials, (Refuse, Redirect)):
            return credentials
        if (target.port is not None and self._asks_consent(credentials.identity) and facts.method == "GET"
                and wants_page(facts.method, facts.headers) and not is_websocket(facts.method, facts.headers)
                and not is_embedded(facts.headers)):  # a frame goes on knowing nobody: the hub is never framed
            assert credentials.identity is not None
            asked = consent_url(self.world.hosts, self.world.sessions, credentials.identity, state.spec, target.port,
                                credentials.path)
            return Redirect(error=RedirectError(asked, status=302), target=target, effects=tuple(self.effects))
        return self._forward(credentials)

    def _reserved(self, path: str) -> Plan:
        target, state = self.target, self.state
        if path == WAKE_EVENTS_PATH:
            credentials = self._check()
            if isinstance(credentials, (Refuse, Redirect)):
                return credentials
            identity = credentials.identity
            return GatewayPage(page=Page.WAKE_EVENTS, target=target, state=state, port=self._port(),
                               explained=self._explained(), effects=tuple(self.effects),
                               user=identity.subject if identity else None)
        return self._refuse(NotFound("There is nothing at this address.", code="no-route"))

    def _name_reused(self) -> Refuse | None:
        """A host belongs to a workspace's name, and a name can pass to another owner (a workspace deleted and one of
        that name made by someone else; a local one declared for someone else). A service worker that the former
        owner's page registered there stays in its visitors' browsers, whatever the host serves since, and answers
        the new owner's pages: it fetches them with the visitor's cookie, reads them, writes as the visitor (from
        the host's own origin), shows what it likes under that address. So the answer to a browser's fetch of a
        service worker's script marks whose workspace it was (``OWNER_MARK``), and a browser that comes back with
        another owner's mark is answered with ``Clear-Site-Data`` (which ends the worker) and the new owner's mark,
        nothing of the app's: the page it then opens again is the new owner's. Two marks are no mark (one was set
        for the shared parent domain, over plain HTTP, by a page elsewhere: beside the host's own it would refuse
        every request there for good)."""
        state, facts = self.state, self.facts
        name = _OWNER_MARK_NAMES[self.world.secure]
        sent = read_cookie(facts.headers, name)
        if sent is None or not cookie_is_alone(facts.headers, name):
            return None
        marks = self.world.sessions.owner_marks(self.audience, state.spec.owner)
        if any(same_secret(sent, mark) for mark in marks):
            self.marked = True
            return None
        error = NameReused(f"This address was another workspace's before {state.id} was made, and your browser still "
                           "ran what that one had left here (a service worker), with its stored data and cached "
                           "files: they were removed. Open the page again.",
                           headers={"Clear-Site-Data": CLEARED}, retry=True)
        error.cookies = (self._owner_mark(marks[0]),)  # the new owner's: a planted one beside it makes two, no mark
        return Refuse(error=error, target=self.target)

    def _owner_mark(self, mark: str) -> str:
        """The host's own ``SameSite=Lax`` cookie, in a frame too: the mark a refusal there refused was sent to a frame
        on the same site (a ``Lax`` one is sent to no other), where it may be replaced. A frame's cookie
        (``SameSite=None; Partitioned``) would be kept beside it, not in its place: two marks from then on, which
        count as none, and the host's next owner unseen."""
        return set_cookie(_OWNER_MARK_NAMES[self.world.secure], mark, max_age=OWNER_MARK_AGE, secure=self.world.secure)

    # --- who, and may they ---------------------------------------------------------------------------------
    def _check(self) -> Credentials | Refuse | Redirect:
        """Authenticate and authorize; a refusal becomes a sign-in for browsers, else 401/403.

        A gateway cookie rides along on requests other previews' pages make (they are all one site), so what a
        cookie vouches for covers reads only, unless the request comes from this origin or one the port's CORS
        rule admits: a hostile preview cannot write to, or open a WebSocket to, another as its visitor."""
        facts, world, target, state = self.facts, self.world, self.target, self.state
        try:
            credentials = authenticate(facts.method, facts.headers, target.path, self.audience,
                                       sessions=world.sessions, store=world.store, secure=world.secure,
                                       preview=target.port is not None, now=facts.now)
        except GatewayError as exc:
            return self._refuse(exc)
        grant, port = credentials.grant, target.port
        if credentials.in_url and grant is not None and port is not None and not grants_target(grant, state.spec, port):
            # Never a cookie for a host the link does not open: a page elsewhere could make its visitor's browser
            # fetch this with a link of its owner's, and the cookie would stand in the way of signing in here
            # (the link's answer, "another port or workspace", comes before the sign-in) for as long as it lives.
            self.effects.append(RecordDecision(target, None, OTHER_TARGET))
            return self._refuse(denial(OTHER_TARGET))
        if credentials.presented is not None:
            self.effects.append(UseShare(credentials.presented, facts.now))
        if credentials.api_token is not None:
            self.effects.append(UseToken(credentials.api_token, facts.now))
        if credentials.in_url:  # the token becomes a cookie, and leaves the URL
            redirect = share_cookie_redirect(credentials, self.audience, facts.headers,
                                             sessions=world.sessions, secure=world.secure, now=facts.now)
            return Redirect(error=redirect, target=target, effects=tuple(self.effects))
        identity = credentials.identity
        if credentials.by_cookie and cors.needs_same_origin(facts.method, facts.headers) and not \
                cors.same_origin_or_admitted(facts.headers, self.origin, self._admits_with_credentials):
            decision = Decision(False, Reason.CROSS_ORIGIN, "a cookie does not vouch for other origins")
        else:
            decision = decide(self.policy, state.spec, target.port, identity, credentials.grant)
            if decision.allow and state.phase is not _RUNNING:
                decision = may_wake(self.policy, decision)
                if decision.allow and credentials.by_cookie and not cors.wakes_from_here(
                        facts.headers, self.origin, self._admits_with_credentials):
                    decision = Decision(False, Reason.WAKE_FROM_ELSEWHERE,
                                        "a page elsewhere may not wake a workspace with its visitor's cookie")
        self.effects.append(RecordDecision(target, identity, decision))
        if decision.allow:
            self._role = decision.reason
            return credentials
        stale = stale_share_refusal(credentials, facts.headers, world.secure, facts.now)
        if stale is not None:
            return self._refuse(stale, identity)
        if (decision.reason is Reason.USER_UNAUTHENTICATED and facts.method in ("GET", "HEAD")
                and wants_page(facts.method, facts.headers)):
            sign_in = sign_in_redirect(facts.headers, self.origin + credentials.path, world.hosts.hub_url(""),
                                       secure=world.secure)
            if isinstance(sign_in, RedirectError):
                return Redirect(error=sign_in, target=target, effects=tuple(self.effects))
            return self._refuse(sign_in, identity)
        error = denial(decision)
        if error.status == 401:
            error.headers["WWW-Authenticate"] = 'Bearer realm="codehub"'
        return self._refuse(error, identity)

    def _explained(self) -> bool:
        """Why a wake is slow or failed, in the runtime's own words (the app's last output, a path, an image, why the
        cluster could not place the pod), is for those who run the workspace: its owner, collaborators and the
        policy's admins. Anyone else the policy lets wake it (a public port's visitor, a share link's holder) sees
        the steps and that it failed."""
        role = self._role
        return role is _OWNER or role is _COLLABORATOR or role is _ADMIN

    def _admits_with_credentials(self, origin: str) -> bool:
        """Whether the port's CORS rule admits an origin *with credentials* (the IDE has no rule): a rule that
        lets other origins call without credentials does not let them use the visitor's cookie."""
        rule = self.rule
        return rule is not None and rule.allow_credentials and self._origin_allowed(rule, origin)

    def _origin_allowed(self, rule: CorsRule, origin: str) -> bool:
        return cors.origin_allowed(rule, origin, self.state.spec, self.world.hosts, self._owner_of)

    def _owner_of(self, workspace: str) -> str | None:
        state = self.world.workspace(workspace)
        return state.spec.owner if state is not None else None

    def _asks_consent(self, identity: Identity | None) -> bool:
        return consent_pending(self.state.spec, self.target.port, identity, owner=self._role is _OWNER,
                               consents=lambda: self.world.store.consents)

    def _disclosed(self, identity: Identity | None) -> Identity | None:
        return disclosed(self.policy.identity, self.state.spec, self.target.port, identity,
                         owner=self._role is _OWNER, consents=lambda: self.world.store.consents)

    # --- answers -------------------------------------------------------------------------------------------
    def _preflight(self) -> Plan:
        """A CORS preflight is answered from policy, before any credentials are asked for (browsers never send
        them); under ``passthru`` the app answers its own, but a port shut for everyone (the IDE port,
        ``ports.denied``) stays shut to them too, and they wake only what anyone may wake."""
        rule, facts, state, target = self.rule, self.facts, self.state, self.target
        assert rule is not None
        assert target.port is not None
        if rule.mode != "passthru":
            origin = facts.headers["Origin"]
            if not self._origin_allowed(rule, origin):
                return self._refuse(Forbidden(f"Cross-origin requests from {origin} are not allowed by policy.",
                                              code="cors-origin-denied"))
            return Preflight(headers=cors.preflight_headers(rule, origin,
                                                            facts.headers.get("Access-Control-Request-Headers", "")),
                             target=target)
        anonymous = decide(self.policy, state.spec, target.port, None)
        asleep = state.phase is not _RUNNING
        if asleep and anonymous.allow:
            anonymous = may_wake(self.policy, anonymous)
        if anonymous.reason is Reason.PORT_DENIED or (asleep and not anonymous.allow):
            self.effects.append(RecordDecision(target, None, anonymous))
            return self._refuse(denial(anonymous))
        return self._forward(Credentials(None, None, None, False, target.path))

    def _forward(self, credentials: Credentials) -> Plan:
        facts, world, target, state = self.facts, self.world, self.target, self.state
        port = self._port()
        identity = credentials.identity
        asleep = state.phase is not _RUNNING or world.waking(state.id, port)
        websocket = is_websocket(facts.method, facts.headers)
        user = identity.subject if identity is not None else None
        if asleep and wants_page(facts.method, facts.headers) and not websocket:
            return WaitingPage(state=state, port=port, explained=self._explained(), target=target, user=user,
                               effects=tuple(self.effects))
        shown = self._disclosed(identity)
        assertion = world.sessions.assertion(shown, self.origin) if shown is not None else None
        trusted = bool(world.trusted_proxies) and any(
            ipaddress.ip_address(facts.peer) in network for network in world.trusted_proxies)
        client = ClientFacts(peer=facts.peer, scheme=world.hosts.scheme, public_host=self.host, trusted=trusted)
        headers = upstream_request_headers(
            facts.headers, client, upstream_host=f"localhost:{port}",
            strip_authorization=credentials.consumed_authorization,
            identity=identity_headers(shown, assertion),
        )
        if target.kind is _IDE:
            put_ide_cookie(headers, world.ide_secret(state.spec))
        rules = self._response_rules()
        if "Service-Worker" in facts.headers and not self.marked:  # a worker's script, fetched to (re)register it
            mark = world.sessions.owner_marks(self.audience, state.spec.owner)[0]
            rules = dataclasses.replace(rules, cookies=(self._owner_mark(mark),))
        forward = Forward(
            workspace=state.id, address=state.address, port=port, tls=port in state.spec.https_ports,
            public_origin=self.origin, path=credentials.path, headers=headers, rules=rules,
            websocket=websocket,
            keeps_awake=self.policy.wake.visitors_keep_awake or self._role is _OWNER or self._role is _COLLABORATOR,
            on_error=self._error_cors(), target=target, user=user, effects=tuple(self.effects),
        )
        if asleep:
            return Hold(forward=forward, state=state, explained=self._explained(), target=target, user=user,
                        effects=forward.effects)
        return forward

    def _port(self) -> int:
        """The workspace port a target names; the IDE's host names none and means the IDE port."""
        return self.target.port if self.target.port is not None else self.state.spec.ide_port

    def _response_rules(self) -> ResponseRules:
        """Framing policy on every preview and IDE response; CORS answers where the port's rule replaces the
        app's."""
        if self.target.kind is not _PREVIEW:
            return IDE_RULES
        policy, rule = self.policy, self.rule
        drop_cors = rule is not None and rule.mode == "replace"
        origin = self.facts.headers.get("Origin") if drop_cors else None
        if drop_cors and rule is not None and origin and self._origin_allowed(rule, origin):
            return ResponseRules({"Content-Security-Policy": cors.frame_ancestors(policy),
                                  **cors.response_headers(rule, origin)},
                                 drop_cors=True, drop_frame_options=bool(policy.embedding.frame_ancestors))
        return _framing_rules(policy, drop_cors)

    def _error_cors(self) -> dict[str, str]:
        """CORS headers for the gateway's own refusals (401, 403, 503…) to an origin the port's rule admits, so a
        front end can read why its call failed (e.g. "sign in on the API host") instead of an opaque network
        error."""
        rule = self.rule
        if rule is None or rule.mode != "replace" or self.target.kind is not _PREVIEW:
            return {}
        origin = self.facts.headers.get("Origin")
        if not origin or not self._origin_allowed(rule, origin):
            return {}
        return cors.response_headers(rule, origin)

    def _refuse(self, error: GatewayError, identity: Identity | None = None) -> Refuse:
        if self.found:
            error.headers.update(self._error_cors())
        return Refuse(error=error, target=self.target, effects=tuple(self.effects),
                      user=identity.subject if identity is not None else None)


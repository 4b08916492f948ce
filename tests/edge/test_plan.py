"""The request plan as a pure function: facts and a world in memory in, a plan and its effects out.

The world here is made of the gateway's own parts (sessions signed with a real key, the file token store, a
parsed policy), with no server, socket or clock behind them: what the lanes do with a plan is tested elsewhere.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

import jwt
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.auth.authenticate import EmbedSignIn, authenticate
from gateway.auth.identity import Identity
from gateway.auth.keys import KeySet, SigningKey
from gateway.auth.sessions import Sessions
from gateway.auth.store import Consent, FileTokenStore
from gateway.edge import plan as plan_module
from gateway.edge.plan import (
    Facts,
    Forward,
    GatewayPage,
    Granted,
    Hold,
    NameReused,
    Page,
    Plan,
    Preflight,
    RecordDecision,
    Redirect,
    Refuse,
    UseShare,
    UseToken,
    WaitingPage,
    is_websocket,
    plan,
    still_granted,
    wants_page,
)
from gateway.edge.policy import Policy, Reason, parse_policy
from gateway.edge.routing import Hosts
from gateway.lifecycle import Phase, WorkspaceSpec, WorkspaceState
from gateway.proxy.headers import ResponseRules

HUB = "localhost:8080"
PREVIEW = "3000-ws.localhost:8080"
ALICE = Identity("alice", "alice@example.com")
NOW = time.time()
"""The plans' clock, set again as each test starts (``_now``): the store and JWTs are checked against the real
clock too, and the module is imported when the run starts, which on a loaded machine was more than a link's ten
minutes before its tests ran (every share link made "now" had expired)."""


@pytest.fixture(autouse=True)
def _now() -> None:
    global NOW
    NOW = time.time()


@dataclass
class World:
    """``gateway.edge.plan.World`` from real parts, none of them started."""

    store: FileTokenStore
    policy: Policy = field(default_factory=lambda: parse_policy("ports: {default_visibility: private}\n"))
    hosts: Hosts = field(default_factory=lambda: Hosts.from_urls(f"http://{HUB}", HUB))
    secure: bool = False
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    states: dict[str, WorkspaceState] = field(default_factory=dict)
    busy: set[tuple[str, int]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.keys = KeySet([SigningKey.generate()])
        self.sessions = Sessions(lambda: self.keys, f"http://{HUB}", ttl=3600, clock=lambda: NOW)
        spec = WorkspaceSpec(id="ws", owner="alice", ports={3000: "private", 4000: "public"})
        self.states["ws"] = WorkspaceState(spec, Phase.RUNNING, address="127.0.0.9")

    def workspace(self, name: str) -> WorkspaceState | None:
        return self.states.get(name)

    def waking(self, workspace: str, port: int) -> bool:
        return (workspace, port) in self.busy

    def ide_secret(self, spec: WorkspaceSpec) -> str | None:
        return None

    def cookie(self, identity: Identity, host: str = PREVIEW) -> str:
        return f"codehub_session={self.sessions.issue(identity, host)}"


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(FileTokenStore(tmp_path / "tokens.json"))


def facts(target: str = "/", *, method: str = "GET", host: str | None = PREVIEW, peer: str = "127.0.0.1",
          **headers: str) -> Facts:
    given = CIMultiDict({name.replace("_", "-"): value for name, value in headers.items()})
    if host is not None:
        given.add("Host", host)
    return Facts(method, target, CIMultiDictProxy(given), peer, NOW)


NAVIGATE = {"Sec_Fetch_Mode": "navigate", "Accept": "text/html"}


def decisions(made: Plan) -> list[tuple[bool, Reason]]:
    return [(e.decision.allow, e.decision.reason) for e in made.effects if isinstance(e, RecordDecision)]


@pytest.mark.parametrize(("method", "headers", "page"), [
    ("GET", {"Sec-Fetch-Mode": "navigate"}, True),
    ("GET", {"Sec-Fetch-Mode": "navigate", "Accept": "application/json"}, True),
    ("GET", {"Sec-Fetch-Mode": "cors", "Accept": "text/html"}, False),  # fetch metadata, where sent, decides
    ("GET", {"Accept": "text/html,application/xhtml+xml"}, True),  # a browser that sends none
    ("HEAD", {"Accept": "text/html"}, True),
    ("POST", {"Accept": "text/html"}, False),
    ("GET", {"Accept": "text/html", "Authorization": "Bearer x"}, False),
    ("GET", {"Accept": "text/html", "X-Requested-With": "XMLHttpRequest"}, False),
    ("GET", {"Accept": "*/*"}, False),
    ("GET", {}, False),
])
def test_pages_are_for_browsers_navigating(method: str, headers: dict[str, str], page: bool) -> None:
    """A navigation gets a page (a sign-in redirect, the waiting page); fetch/XHR, API clients and anything that
    is not a GET or HEAD get JSON they can read, or are held."""
    assert wants_page(method, CIMultiDictProxy(CIMultiDict(headers))) is page


@pytest.mark.parametrize(("method", "headers", "upgrade"), [
    ("GET", {"Upgrade": "websocket"}, True),
    ("GET", {"Upgrade": "WebSocket"}, True),
    ("POST", {"Upgrade": "websocket"}, False),
    ("GET", {"Upgrade": "h2c"}, False),
    ("GET", {}, False),
])
def test_a_websocket_is_a_get_asking_for_one(method: str, headers: dict[str, str], upgrade: bool) -> None:
    assert is_websocket(method, CIMultiDictProxy(CIMultiDict(headers))) is upgrade


def test_two_host_headers_are_refused_whichever_lane_asks(world: World) -> None:
    two = Facts("GET", "/", CIMultiDictProxy(CIMultiDict([("Host", PREVIEW), ("Host", "evil.test")])), "1.2.3.4", NOW)
    made = plan(two, world)
    assert isinstance(made, Refuse)
    assert (made.error.status, made.error.code) == (400, "bad-host")


@pytest.mark.parametrize(
    ("host", "target", "status", "code"),
    [
        (None, "/", 400, "bad-host"),
        ("3000-nope.localhost:8080", "/", 404, "workspace-not-found"),
        ("elsewhere.test", "/", 404, "unknown-host"),
        (PREVIEW, "http://absolute/", 400, "bad-request-target"),
        (PREVIEW, "/_codehub/nothing", 404, "no-route"),
    ],
)
def test_refusals(world: World, host: str | None, target: str, status: int, code: str) -> None:
    """Once the host names a workspace, the refusal names it too, for the access log."""
    made = plan(facts(target, host=host), world)
    assert isinstance(made, Refuse)
    assert (made.error.status, made.error.code) == (status, code)
    named = (made.target.workspace, made.target.port) if made.target is not None else None
    assert named == {"workspace-not-found": ("nope", 3000), "no-route": ("ws", 3000)}.get(code)


def test_the_hub_is_the_routers(world: World) -> None:
    assert plan(facts("/api/v1/workspaces", host=HUB), world) == GatewayPage(page=Page.HUB, target=plan(
        facts("/api/v1/workspaces", host=HUB), world).target)


def test_the_old_ide_address_moves(world: World) -> None:
    made = plan(facts("/w/ws/src?x=1", host=HUB), world)
    assert isinstance(made, Redirect)
    assert made.error.status == 308
    assert made.error.location == "http://ide-ws.localhost:8080/src?x=1"
    assert made.target is not None
    assert made.target.workspace == "ws", "the access log names the workspace it moved"


def test_an_anonymous_navigation_to_a_private_port_signs_in(world: World) -> None:
    made = plan(facts("/page", **NAVIGATE), world)
    assert isinstance(made, Redirect)
    assert made.error.location.startswith("http://localhost:8080/auth/handoff?target=")
    assert decisions(made) == [(False, Reason.USER_UNAUTHENTICATED)]


def test_an_anonymous_script_hears_401(world: World) -> None:
    made = plan(facts("/api", Accept="application/json"), world)
    assert isinstance(made, Refuse)
    assert made.error.status == 401
    assert made.error.headers["WWW-Authenticate"] == 'Bearer realm="codehub"'


def test_the_owner_is_forwarded_with_identity_and_without_gateway_cookies(world: World) -> None:
    made = plan(facts("/x?y=1", Cookie=world.cookie(ALICE) + "; app=1"), world)
    assert isinstance(made, Forward)
    assert (made.workspace, made.address, made.port, made.path) == ("ws", "127.0.0.9", 3000, "/x?y=1")
    assert made.headers["X-Forwarded-User"] == "alice"
    assert made.headers["Cookie"] == "app=1"
    assert made.headers["Host"] == "localhost:3000"
    assert made.public_origin == f"http://{PREVIEW}", "the app's redirects to itself are rewritten to it"
    assert (made.headers["X-Forwarded-Proto"], made.headers["X-Forwarded-Host"]) == ("http", PREVIEW)
    assert not made.websocket
    assert made.target is not None
    assert (made.target.workspace, made.target.port) == ("ws", 3000)
    assert made.user == "alice"
    assert made.keeps_awake
    assert decisions(made) == [(True, Reason.OWNER)]


def test_a_sleeping_workspace_holds_scripts_and_shows_browsers_a_page(world: World) -> None:
    world.states["ws"] = WorkspaceState(world.states["ws"].spec, Phase.WARM)
    held = plan(facts("/", Cookie=world.cookie(ALICE)), world)
    assert isinstance(held, Hold)
    assert held.forward.address is None
    page = plan(facts("/", Cookie=world.cookie(ALICE), **NAVIGATE), world)
    assert isinstance(page, WaitingPage)
    assert page.port == 3000
    assert (held.user, page.user) == ("alice", "alice"), "the access log names who waited"
    assert decisions(held) == decisions(page) == [(True, Reason.OWNER)]


@pytest.mark.parametrize("accept", ["text/html", "*/*"])
def test_a_websocket_to_a_sleeping_workspace_is_held_not_shown_a_page(world: World, accept: str) -> None:
    """A WebSocket cannot read a page: it waits for the wake (and is relayed once the workspace runs), whatever it
    says it accepts (a client without fetch metadata may say ``text/html``)."""
    world.states["ws"] = WorkspaceState(world.states["ws"].spec, Phase.WARM)
    made = plan(facts("/ws", Cookie=world.cookie(ALICE), Upgrade="websocket", Connection="Upgrade", Accept=accept,
                      Origin=f"http://{PREVIEW}"), world)
    assert isinstance(made, Hold), made
    assert made.forward.websocket


_SITE = {"Sec_Fetch_Site": "same-site"}  # another preview: one site with this one, so its Lax cookie rides along
_CLICKED = {"Sec_Fetch_Mode": "navigate", "Sec_Fetch_User": "?1"}  # a navigation the visitor's click started


@pytest.mark.parametrize(("headers", "woken"), [
    ({}, True),  # a script, or a browser that says nothing (plain HTTP outside localhost)
    ({"Origin": "http://4000-ws.localhost:8080"}, False),  # ...but a credentialed fetch says where it came from
    ({"Origin": f"http://{PREVIEW}"}, True),
    ({"Sec_Fetch_Site": "same-origin", "Sec_Fetch_Mode": "cors", "Sec_Fetch_Dest": "empty"}, True),  # its own page
    ({"Sec_Fetch_Site": "none", "Sec_Fetch_Mode": "navigate", "Sec_Fetch_Dest": "document"}, True),  # typed
    ({**_SITE, **_CLICKED, "Sec_Fetch_Dest": "document"}, True),  # a link clicked
    ({"Sec_Fetch_Site": "cross-site", **_CLICKED, "Sec_Fetch_Dest": "document"}, True),  # in a chat
    ({**_SITE, "Sec_Fetch_Mode": "navigate", "Sec_Fetch_Dest": "document"}, False),  # `location = ...` in a script
    ({"Sec_Fetch_Site": "cross-site", "Sec_Fetch_Mode": "navigate", "Sec_Fetch_Dest": "document",
      "Sec_Fetch_User": "?0"}, False),
    ({**_SITE, "Sec_Fetch_Mode": "navigate", "Sec_Fetch_Dest": "iframe"}, False),  # a frame, hidden perhaps
    ({"Sec_Fetch_Site": "cross-site", "Sec_Fetch_Mode": "navigate", "Sec_Fetch_Dest": "frame"}, False),
    ({**_SITE, "Sec_Fetch_Mode": "no-cors", "Sec_Fetch_Dest": "image"}, False),  # <img>
    ({**_SITE, "Sec_Fetch_Mode": "no-cors", "Sec_Fetch_Dest": "script"}, False),
    ({**_SITE, "Sec_Fetch_Mode": "no-cors", "Sec_Fetch_Dest": "empty"}, False),  # fetch(..., {mode: "no-cors"})
    ({**_SITE, "Sec_Fetch_Mode": "cors", "Sec_Fetch_Dest": "empty", "Origin": "http://4000-ws.localhost:8080"},
     False),  # a credentialed fetch from an origin no CORS rule admits
    ({**_SITE, **_CLICKED, "Sec_Fetch_Dest": "document", "Sec_Purpose": "prefetch;prerender"}, False),
    ({**_SITE, **_CLICKED, "Sec_Fetch_Dest": "document", "Purpose": "prefetch"}, False),
    # a page's speculation rules: Chromium says `none` for them, as for the address bar's own guesses (which wake
    # nothing either: the visitor's Enter does)
    ({"Sec_Fetch_Site": "none", "Sec_Fetch_Mode": "no-cors", "Sec_Fetch_Dest": "empty", "Sec_Purpose": "prefetch"},
     False),
    ({"Sec_Fetch_Site": "none", "Sec_Fetch_Mode": "navigate", "Sec_Fetch_Dest": "document",
      "Sec_Purpose": "prefetch;prerender"}, False),
])
def test_only_the_visitor_wakes_a_workspace_with_their_cookie(world: World, headers: dict[str, str],
                                                               woken: bool) -> None:
    """A hostile preview (one site with the others) could make each visitor's browser wake every sleeping workspace
    the visitor may wake, theirs among them, with frames, images, fetches or prerenders: what a cookie vouches for
    wakes a workspace only on the visitor's own navigation to it, or from the workspace's own origin."""
    world.states["ws"] = WorkspaceState(world.states["ws"].spec, Phase.WARM)
    made = plan(facts("/", Cookie=world.cookie(ALICE), **headers), world)
    assert isinstance(made, Hold | WaitingPage) is woken, made
    if not woken:
        assert isinstance(made, Refuse)
        assert (made.error.status, made.error.code) == (403, "wake-from-elsewhere")
        assert decisions(made) == [(False, Reason.WAKE_FROM_ELSEWHERE)]
        assert made.user == "alice", "the access log names whose cookie it was"
    world.states["ws"] = WorkspaceState(world.states["ws"].spec, Phase.RUNNING, address="127.0.0.9")
    assert isinstance(plan(facts("/", Cookie=world.cookie(ALICE), **headers), world), Forward), \
        "reads of a running workspace stay the app's to judge"


def test_who_may_not_wake_it_at_all_hears_that_first(world: World) -> None:
    """Under ``wake.who: owner-and-collaborators`` a signed-in visitor of a public port may not wake it from
    anywhere: told so, not that the page elsewhere may not."""
    world.policy = parse_policy("wake: {who: owner-and-collaborators}\n")
    world.states["ws"] = WorkspaceState(world.states["ws"].spec, Phase.WARM)
    host = "4000-ws.localhost:8080"
    made = plan(facts("/", host=host, Cookie=world.cookie(Identity("eve"), host), **_SITE, Sec_Fetch_Mode="no-cors",
                      Sec_Fetch_Dest="image"), world)
    assert isinstance(made, Refuse)
    assert made.error.code == "wake-not-allowed"


def test_a_page_elsewhere_cannot_follow_a_wake_to_start_it(world: World) -> None:
    """Following a wake's events (re)starts it: an ``EventSource`` from another preview may not."""
    world.states["ws"] = WorkspaceState(world.states["ws"].spec, Phase.WARM)
    elsewhere = plan(facts("/_codehub/wake/events", Cookie=world.cookie(ALICE), **_SITE, Sec_Fetch_Mode="cors",
                           Sec_Fetch_Dest="empty", Origin="http://4000-ws.localhost:8080"), world)
    assert isinstance(elsewhere, Refuse)
    assert elsewhere.error.code == "wake-from-elsewhere"
    own = plan(facts("/_codehub/wake/events", Cookie=world.cookie(ALICE), Sec_Fetch_Site="same-origin",
                     Sec_Fetch_Mode="cors", Sec_Fetch_Dest="empty"), world)
    assert isinstance(own, GatewayPage)


@pytest.mark.parametrize(("credentials", "woken"), [(True, True), (False, False)])
def test_an_origin_the_rule_admits_with_credentials_wakes_the_port(world: World, credentials: bool,
                                                                   woken: bool) -> None:
    """A front end on another origin that the port's CORS rule lets call it with the visitor's cookie may wake it
    (its own page is awake, its API asleep), as it may write to it."""
    world.policy = parse_policy(f"cors: [{{ports: [3000], allow_origins: ['{_ADMITTED}'], "
                                f"allow_credentials: {str(credentials).lower()}}}]")
    world.states["ws"] = WorkspaceState(world.states["ws"].spec, Phase.WARM)
    made = plan(facts("/", Cookie=world.cookie(ALICE), **_SITE, Sec_Fetch_Mode="cors", Sec_Fetch_Dest="empty",
                      Origin=_ADMITTED), world)
    assert isinstance(made, Hold) is woken
    if not woken:
        assert isinstance(made, Refuse)
        assert made.error.code == "wake-from-elsewhere"


@pytest.mark.parametrize("kind", ["api-token", "share-link"])
def test_a_token_is_no_cookie_a_page_can_make_a_browser_send(world: World, kind: str) -> None:
    """A bearer token (an API token, a share link's) is its holder's own: a page sending one wakes what its holder
    may, as the holder could. (A share link in the URL becomes a cookie first, by a redirect, and that cookie is
    a cookie like any other.)"""
    world.states["ws"] = WorkspaceState(world.states["ws"].spec, Phase.WARM)
    if kind == "api-token":
        _record, token = asyncio.run(world.store.create_api_token(ALICE, name="ci"))
    else:
        _link, token = asyncio.run(world.store.create_share(workspace="ws", port=3000, audience="anyone", people=[],
                                                            created_by="alice", ttl=600, now=NOW))
    made = plan(facts("/", Authorization=f"Bearer {token}", **_SITE, Sec_Fetch_Mode="cors", Sec_Fetch_Dest="empty",
                      Origin="http://4000-ws.localhost:8080"), world)
    assert isinstance(made, Hold), made


def test_a_port_being_woken_is_held_even_when_running(world: World) -> None:
    world.busy.add(("ws", 4000))
    assert isinstance(plan(facts("/", host="4000-ws.localhost:8080"), world), Hold)
    assert isinstance(plan(facts("/", host="4001-ws.localhost:8080"), world), Refuse | Redirect)


def test_a_cookie_does_not_vouch_for_writes_from_other_origins(world: World) -> None:
    cookie = world.cookie(ALICE)
    made = plan(facts("/", method="POST", Cookie=cookie, Origin="http://4000-ws.localhost:8080"), world)
    assert isinstance(made, Refuse)
    assert made.error.code == "cross-origin-request"
    own = plan(facts("/", method="POST", Cookie=cookie, Origin=f"http://{PREVIEW}"), world)
    assert isinstance(own, Forward)


def test_a_share_token_in_the_url_becomes_a_cookie_and_counts_once_acted_on(world: World) -> None:
    link, token = asyncio.run(world.store.create_share(workspace="ws", port=3000, audience="anyone", people=[],
                                                        created_by="alice", ttl=600, now=NOW))
    made = plan(facts(f"/p?a=1&codehub_share={token}"), world)
    assert isinstance(made, Redirect)
    assert made.error.location == "/p?a=1"
    assert made.error.cookies[0].startswith("codehub_share=")
    assert made.effects == (UseShare(link, NOW),)
    assert link.uses == 0, "making a plan records nothing"


@pytest.mark.parametrize(("workspace", "port"), [("ws2", 3000), ("ws", 4000)])
def test_a_share_token_for_another_target_leaves_no_cookie(world: World, workspace: str, port: int) -> None:
    """A link is traded for a cookie only where it opens something: another's page could have a visitor's browser
    fetch this URL with its owner's link, and the cookie would answer "another port or workspace" instead of a
    sign-in here for as long as the link lives (tests/browser/test_isolation.py)."""
    _, token = asyncio.run(world.store.create_share(workspace=workspace, port=port, audience="anyone", people=[],
                                                     created_by="alice", ttl=600, now=NOW))
    made = plan(facts(f"/p?codehub_share={token}"), world)
    assert isinstance(made, Refuse)
    assert (made.error.status, made.error.code, made.error.cookies) == (403, "share-other-target", ())
    assert decisions(made) == [(False, Reason.SHARE_OTHER_TARGET)]


@pytest.mark.parametrize("secure", [False, True])
def test_the_share_cookie_opens_the_port_for_as_long_as_its_link_lives(world: World, secure: bool) -> None:
    """The cookie a share URL leaves behind is what the next request shows: it must open the port, and it lives
    no longer than its link does. Under HTTPS it is a ``__Host-`` cookie (no sibling host can plant or toss it),
    which is also the only name read there."""
    world.secure = secure
    _, token = asyncio.run(world.store.create_share(workspace="ws", port=3000, audience="anyone", people=[],
                                                     created_by="alice", ttl=600, now=NOW))
    made = plan(facts(f"/p?codehub_share={token}"), world)
    assert isinstance(made, Redirect)
    cookie, *attributes = made.error.cookies[0].split("; ")
    assert cookie.startswith("__Host-codehub_share=" if secure else "codehub_share=")
    assert ("Secure" in attributes) is secure
    max_age = [int(attribute.partition("=")[2]) for attribute in attributes if attribute.startswith("Max-Age=")]
    assert len(max_age) == 1
    assert 590 <= max_age[0] <= 600
    followed = plan(facts("/p", Cookie=cookie), world)
    assert isinstance(followed, Forward)
    assert decisions(followed) == [(True, Reason.SHARE_LINK)]


def test_an_open_websocket_is_granted_while_what_let_it_in_still_would(world: World) -> None:
    """Its facts are planned again: the same target, or the same target held through a wake, holds; a refusal, or
    a plan to anywhere else, does not; nothing is counted."""
    link, token = asyncio.run(world.store.create_share(workspace="ws", port=3000, audience="anyone", people=[],
                                                        created_by="alice", ttl=600, now=NOW))
    swapped = plan(facts(f"/?codehub_share={token}"), world)
    assert isinstance(swapped, Redirect)
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Origin": f"http://{PREVIEW}"}
    owners = facts("/ws", Cookie=world.cookie(ALICE), **upgrade)
    shared = facts("/ws", Cookie=swapped.error.cookies[0].partition(";")[0], **upgrade)
    owner_forward, shared_forward = plan(owners, world), plan(shared, world)
    assert isinstance(owner_forward, Forward)
    assert isinstance(shared_forward, Forward)
    assert (owner_forward.websocket, shared_forward.websocket) == (True, True), "relayed, not proxied as HTTP"
    alices, links = Granted.of(owner_forward), Granted.of(shared_forward)
    assert (alices.user, alices.told is not None, links.user, links.told) == ("alice", True, None, None)
    assert still_granted(owners, alices, world, NOW)
    assert still_granted(shared, links, world, NOW)
    assert (still_granted(owners, alices._replace(port=4000), world, NOW),
            still_granted(owners, alices._replace(workspace="ws2"), world, NOW)) == (False, False)
    assert link.uses == 0

    assert not still_granted(shared, links, world, NOW + 601)  # the link expired meanwhile
    asyncio.run(world.store.revoke_share(link, NOW))
    assert not still_granted(shared, links, world, NOW)
    world.states["ws"] = WorkspaceState(world.states["ws"].spec, Phase.WARM)
    assert still_granted(owners, alices, world, NOW)  # held, not refused (its upstream is gone anyway)
    assert not still_granted(facts("/ws", **upgrade), alices, world, NOW)


def test_an_open_websocket_is_not_granted_to_another_caller_or_as_one_its_app_was_told_of_no_more(
        world: World) -> None:
    """On a public port a signed-out cookie still goes to the same place, as nobody: the WebSocket it opened as
    alice does not hold. One that told its app nobody holds whoever it would tell now."""
    upgrade = {"Upgrade": "websocket", "Origin": "http://4000-ws.localhost:8080"}
    alices = facts("/ws", host="4000-ws.localhost:8080", Cookie=world.cookie(ALICE, "4000-ws.localhost:8080"),
                   **upgrade)
    forward = plan(alices, world)
    assert isinstance(forward, Forward)
    was = Granted.of(forward)
    assert still_granted(alices, was, world, NOW)
    assert not still_granted(alices, was._replace(user="bob"), world, NOW)
    assert not still_granted(alices, was._replace(told=("alice", "", "")), world, NOW)
    assert still_granted(alices, was._replace(told=None), world, NOW)
    anonymous = facts("/ws", host="4000-ws.localhost:8080", **upgrade)
    assert not still_granted(anonymous, was, world, NOW)
    assert still_granted(anonymous, was._replace(user=None, told=None), world, NOW)


def test_an_open_websocket_is_asked_again_with_only_what_its_grant_is_decided_by(world: World) -> None:
    """A client chooses the rest of its head, and it would be parsed again on every heartbeat tick: what is kept
    is small, and plans to the same grant."""
    token = world.cookie(ALICE).partition("=")[2]
    junk = [("Cookie", "codehub_session" + ";" * 8000)] * 20 + [("Connection", "Upgrade" + ",a" * 4000)] * 20
    given = CIMultiDict([("Host", PREVIEW), ("Upgrade", "websocket"), ("Origin", f"http://{PREVIEW}"),
                         *junk, ("Cookie", f"app=1; codehub_session={token}; codehub_share=x"),
                         ("Authorization", "Basic x"), ("X-Anything", "a" * 8000)])
    full = Facts("GET", "/ws", CIMultiDictProxy(given), "127.0.0.1", NOW)
    kept = plan_module.grant_facts(full, world.secure)
    assert sum(len(name) + len(value) for name, value in kept.headers.items()) < 2048
    assert kept.headers.getall("Cookie") == [f"codehub_session={token}; codehub_share=x"]
    made, again = plan(full, world), plan(kept, world)
    assert isinstance(made, Forward)
    assert isinstance(again, Forward)
    assert Granted.of(made) == Granted.of(again)
    assert still_granted(kept, Granted.of(made), world, NOW)


def test_an_api_token_is_noted_only_as_an_effect(world: World) -> None:
    record, token = asyncio.run(world.store.create_api_token(ALICE, name="ci"))
    made = plan(facts("/", Authorization=f"Bearer {token}"), world)
    assert isinstance(made, Forward)
    assert "Authorization" not in made.headers
    assert UseToken(record, NOW) in made.effects
    assert record.last_used is None


def test_a_preflight_is_answered_from_policy(world: World) -> None:
    world.policy = parse_policy("""
cors:
  - ports: [3000]
    mode: replace
    allow_origins: ["http://4000-ws.localhost:8080"]
    allow_methods: [GET, POST]
""")
    made = plan(facts("/", method="OPTIONS", Origin="http://4000-ws.localhost:8080",
                      Access_Control_Request_Method="POST"), world)
    assert isinstance(made, Preflight)
    assert made.headers["Access-Control-Allow-Origin"] == "http://4000-ws.localhost:8080"
    assert made.target is not None
    assert made.target.port == 3000, "the access log names the port it answered for"
    refused = plan(facts("/", method="OPTIONS", Origin="http://evil.test", Access_Control_Request_Method="POST"),
                   world)
    assert isinstance(refused, Refuse)
    assert refused.error.code == "cors-origin-denied"


def test_a_preflight_to_a_port_without_a_cors_rule_is_a_request_like_any_other(world: World) -> None:
    """No rule, no answer from policy: the preflight is the app's, behind the port's access check like any request
    (only the owner's reaches it here)."""
    preflight = {"method": "OPTIONS", "Origin": "http://4000-ws.localhost:8080", "Access_Control_Request_Method": "PUT"}
    anonymous = plan(facts("/", **preflight), world)
    owner = plan(facts("/", Cookie=world.cookie(ALICE), **preflight), world)
    assert isinstance(anonymous, Refuse)
    assert anonymous.error.code == "user-unauthenticated"
    assert isinstance(owner, Forward)
    assert "Access-Control-Allow-Origin" not in owner.rules.replace


@pytest.mark.parametrize(("requested", "allowed"), [
    ("content-type, x-trace", "content-type, x-trace"),
    ("x-a,x-b", "x-a,x-b"),
    ("x-a, <script>", None),
    ("x-a\u2028evil", None),
])
def test_a_preflight_echoes_only_header_names(world: World, requested: str, allowed: str | None) -> None:
    """Under ``allow_headers: ["*"]`` the requested names are echoed; anything that is not a list of header names
    is the client's text, and is not written into the answer."""
    world.policy = parse_policy("""
cors:
  - ports: [3000]
    mode: replace
    allow_origins: ["http://4000-ws.localhost:8080"]
""")
    made = plan(facts("/", method="OPTIONS", Origin="http://4000-ws.localhost:8080",
                      Access_Control_Request_Method="POST", Access_Control_Request_Headers=requested), world)
    assert isinstance(made, Preflight)
    assert made.headers.get("Access-Control-Allow-Headers") == allowed


_ORIGINS = st.one_of(
    st.text(max_size=40),
    st.builds(lambda scheme, rest: f"{scheme}://{rest}", st.sampled_from(["http", "https", "ws", ""]),
              st.text(alphabet="[]@:/.%?#\\0123456789abcdefghijklmnopqrstuvwxyz-", max_size=30)),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(origin=_ORIGINS)
@example(origin="http://[]@")
def test_no_origin_makes_the_plan_raise(world: World, origin: str) -> None:
    """``Origin: http://[]@`` made yarl raise IndexError, which the CORS check did not expect: a 500 and two
    logged tracebacks for anyone, signed in or not. Whatever the Origin, the plan is an answer."""
    world.policy = parse_policy("cors:\n  - ports: [3000, 4000]\n    mode: replace\n"
                                "    allow_origins: [same-workspace]\n")
    for method, extra in (("GET", {}), ("OPTIONS", {"Access_Control_Request_Method": "POST"}),
                          ("POST", {})):
        for host in (PREVIEW, "4000-ws.localhost:8080"):
            assert isinstance(plan(facts("/", method=method, host=host, Origin=origin, **extra), world), Plan)


def _framing(world: World) -> str:
    made = plan(facts("/", host="4000-ws.localhost:8080"), world)  # a public port: forwarded without a session
    assert isinstance(made, Forward)
    return made.rules.replace["Content-Security-Policy"]


def test_framing_rules_follow_the_policy_they_were_made_for(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The framing rules are made once per policy: a reloaded policy gets its own, even when the old one's
    ``id`` is reused for it, and the policies of the past are not kept."""
    monkeypatch.setattr(plan_module, "_FRAMING_RULES", {})  # as a fresh process has it, whatever ran before
    review = parse_policy("embedding: {frame_ancestors: ['https://review.example']}\n")
    world.policy = review
    assert _framing(world) == "frame-ancestors 'self' https://review.example"
    world.policy = parse_policy("embedding: {frame_ancestors: ['https://other.example']}\n")
    assert _framing(world) == "frame-ancestors 'self' https://other.example"
    plan_module._FRAMING_RULES[(id(world.policy), False)] = (review, plan_module._FRAMING_RULES[(id(review), False)][1])
    assert _framing(world) == "frame-ancestors 'self' https://other.example"  # an id now naming another policy
    for number in range(20):
        world.policy = parse_policy(f"embedding: {{frame_ancestors: ['https://{number}.example']}}\n")
        assert _framing(world).endswith(f"https://{number}.example")
    assert len(plan_module._FRAMING_RULES) <= 8


def test_a_refusal_before_the_workspace_is_known_carries_no_cors(world: World) -> None:
    """An origin a port's rule admits learns nothing from a workspace that does not exist: its 404 is as opaque to
    that origin's scripts as to any other."""
    world.policy = parse_policy("""
cors:
  - ports: [3000]
    mode: replace
    allow_origins: ["http://4000-ws.localhost:8080"]
""")
    made = plan(facts("/", host="3000-nope.localhost:8080", Origin="http://4000-ws.localhost:8080"), world)
    assert isinstance(made, Refuse)
    assert made.error.code == "workspace-not-found"
    assert "Access-Control-Allow-Origin" not in made.error.headers


async def test_an_answer_goes_to_the_app_it_was_given_to_not_to_the_next_owner_of_its_name(world: World) -> None:
    """Bob agreed to share who he is with alice's app on port 4000 of ``ws``. Alice deletes ``ws``, mallory makes
    a ``ws`` of her own and opts its port 4000 in: her app is not alice's, and learns nothing of bob."""
    host = "4000-ws.localhost:8080"
    for owner in ("alice", "mallory"):
        spec = WorkspaceSpec(id="ws", owner=owner, ports={4000: "public"}, identity_ports=frozenset({4000}))
        world.states["ws"] = WorkspaceState(spec, Phase.RUNNING, address="127.0.0.9")
        if owner == "alice":
            await world.store.record_consent(Consent.answer("bob", "ws", 4000, owner="alice", share=True,
                                                            claims=["user"]))
        made = plan(facts("/", host=host, Cookie=world.cookie(Identity("bob"), host)), world)
        assert isinstance(made, Forward)
        assert ("X-Forwarded-User" in made.headers) is (owner == "alice"), owner


def test_the_identity_assertion_vouches_for_the_visitor_to_the_app_it_is_sent_to_only(world: World) -> None:
    """An app cannot replay the assertion it was sent to another app that trusts the gateway's (another port,
    another workspace, another person's) as the visitor: it names this origin as its audience, and no other."""
    made = plan(facts("/", Cookie=world.cookie(ALICE)), world)
    assert isinstance(made, Forward)
    assertion = made.headers["X-Codehub-Assertion"]
    late = time.time() - NOW + 5  # the plan's clock stands at NOW, when this test started
    claims = world.keys.verify(assertion, audience=f"http://{PREVIEW}", issuer=f"http://{HUB}", leeway=late)
    assert claims["sub"] == "alice"
    with pytest.raises(jwt.InvalidAudienceError):
        world.keys.verify(assertion, audience="http://4000-ws.localhost:8080", issuer=f"http://{HUB}", leeway=late)


def test_a_token_store_that_cannot_be_read_is_a_refusal_not_a_crash(tmp_path: Path) -> None:
    """Its answers (here: has this visitor agreed to share who they are?) cannot be trusted: 503, in either lane."""
    path = tmp_path / "tokens.json"
    world = World(FileTokenStore(path))
    spec = WorkspaceSpec(id="ws", owner="alice", ports={4000: "public"}, identity_ports=frozenset({4000}))
    world.states["ws"] = WorkspaceState(spec, Phase.RUNNING, address="127.0.0.9")
    path.write_text('{"consents": [')
    host = "4000-ws.localhost:8080"
    made = plan(facts("/", host=host, Cookie=world.cookie(Identity("bob"), host), **NAVIGATE), world)
    assert isinstance(made, Refuse)
    assert (made.error.status, made.error.code) == (503, "token-store-unavailable")


@pytest.mark.parametrize(("rule", "cross_site"), [
    ("", False),
    ("cors: [{ports: [3000], allow_origins: ['http://4000-ws.localhost:8080']}]", True),
    ("cors: [{ports: [3000], allow_origins: ['http://4000-ws.localhost:8080'], allow_credentials: false}]", False),
    ("cors: [{ports: [3000], allow_origins: ['http://4000-ws.localhost:8080'], mode: passthru}]", False),
    ("cors: [{ports: [4000], allow_origins: ['http://4000-ws.localhost:8080']}]", False),
])
def test_the_sign_in_callback_is_the_gateways_on_every_preview(world: World, rule: str, cross_site: bool) -> None:
    """The hand-off lands on ``/_codehub/auth/callback`` (with its code in the query), whoever is signed in; its
    session cookie is bound to this host, and is SameSite=None only where the port's rule takes credentialed
    calls from other origins."""
    world.policy = parse_policy(rule or "{}")
    made = plan(facts("/_codehub/auth/callback?code=c&state=s"), world)
    assert isinstance(made, GatewayPage)
    assert (made.page, made.host, made.cross_site) == (Page.AUTH_CALLBACK, PREVIEW, cross_site)
    popup = plan(facts("/_codehub/auth/popup?target=x"), world)
    assert isinstance(popup, GatewayPage)
    assert popup.page is Page.AUTH_POPUP
    nothing = plan(facts("/_codehub/auth/callbacks"), world)
    assert isinstance(nothing, Refuse)
    assert nothing.error.code == "no-route"


def test_wake_events_are_for_who_may_see_the_port(world: World) -> None:
    """The waiting page's event stream answers to the same check as the port it waits for."""
    made = plan(facts("/_codehub/wake/events?x=1", Cookie=world.cookie(ALICE)), world)
    assert isinstance(made, GatewayPage)
    assert (made.page, made.port, made.user) == (Page.WAKE_EVENTS, 3000, "alice")
    assert made.state is world.states["ws"]
    assert decisions(made) == [(True, Reason.OWNER)]
    anonymous = plan(facts("/_codehub/wake/events", Accept="application/json"), world)
    assert isinstance(anonymous, Refuse)
    assert anonymous.error.status == 401


@pytest.mark.parametrize(("who", "explained"), [
    (ALICE, True),  # the owner
    (Identity("bob"), True),  # a collaborator
    (Identity("root"), True),  # a policy admin
    (Identity("eve"), False),  # a visitor of the public port
    (None, False),  # an anonymous one
])
def test_only_those_who_run_a_workspace_are_told_the_runtimes_words_on_its_wake(
        world: World, who: Identity | None, explained: bool) -> None:
    """Why a wake is slow or failed, in the runtime's words (the app's last output, a path, an image), is for the
    workspace's owner, collaborators and admins, in each plan that follows a wake: the page, the held request and
    the page's event stream."""
    world.policy = parse_policy("admins: [root]\n")
    spec = dataclasses.replace(world.states["ws"].spec, collaborators=("bob",))
    world.states["ws"] = WorkspaceState(spec, Phase.WARM)
    host = "4000-ws.localhost:8080"
    cookie = {"Cookie": world.cookie(who, host)} if who is not None else {}
    page = plan(facts("/", host=host, **NAVIGATE, **cookie), world)
    held = plan(facts("/", host=host, Accept="application/json", **cookie), world)
    events = plan(facts("/_codehub/wake/events", host=host, **cookie), world)
    assert isinstance(page, WaitingPage)
    assert isinstance(held, Hold)
    assert isinstance(events, GatewayPage)
    assert (page.explained, held.explained, events.explained) == (explained, explained, explained)


@pytest.mark.parametrize(("authorization", "status", "code"), [
    ("Bearer chk_not-a-token", 401, "token-invalid"),
    ("Bearer chs_not-a-link", 401, "share-invalid"),
])
def test_a_token_that_is_not_valid_is_refused(world: World, authorization: str, status: int, code: str) -> None:
    made = plan(facts("/", Authorization=authorization), world)
    assert isinstance(made, Refuse)
    assert (made.error.status, made.error.code) == (status, code)


_ADMITTED = "http://4000-ws.localhost:8080"
_CORS_3000 = f"cors: [{{ports: [3000], allow_origins: ['{_ADMITTED}']}}]"


def test_a_refusal_to_an_admitted_origin_says_why_in_a_way_it_can_read(world: World) -> None:
    """Once the workspace is known, the gateway's own refusals carry the CORS answer for an origin the port's rule
    admits (a front end reads "sign in", not an opaque network error); other origins get none."""
    world.policy = parse_policy(_CORS_3000)
    made = plan(facts("/api", Origin=_ADMITTED, Accept="application/json"), world)
    assert isinstance(made, Refuse)
    assert made.error.status == 401
    assert made.error.headers["Access-Control-Allow-Origin"] == _ADMITTED
    other = plan(facts("/api", Origin="http://evil.test", Accept="application/json"), world)
    assert isinstance(other, Refuse)
    assert "Access-Control-Allow-Origin" not in other.error.headers
    for origin, answer in ((_ADMITTED, _ADMITTED), ("http://evil.test", None)):  # and a 502 once let through
        forwarded = plan(facts("/api", Origin=origin, Cookie=world.cookie(ALICE)), world)
        assert isinstance(forwarded, Forward)
        assert forwarded.on_error.get("Access-Control-Allow-Origin") == answer
    world.policy = parse_policy(f"cors: [{{ports: [3000], allow_origins: ['{_ADMITTED}'], mode: passthru}}]")
    passthru = plan(facts("/api", Origin=_ADMITTED, Accept="application/json"), world)
    assert isinstance(passthru, Refuse)
    assert "Access-Control-Allow-Origin" not in passthru.error.headers, "under passthru CORS is the app's"


@pytest.mark.parametrize(("target", "status"), [("/_codehub/wake/events", 401), ("/_codehub/nothing", 404)])
def test_the_gateways_own_addresses_on_a_preview_answer_no_other_origin(world: World, target: str,
                                                                        status: int) -> None:
    """The port's CORS rule opens the app to the origins it admits, not the gateway's own addresses beside it: their
    refusals stay as opaque to those origins' scripts as to any other."""
    world.policy = parse_policy(_CORS_3000)
    made = plan(facts(target, Origin=_ADMITTED, Accept="application/json"), world)
    assert isinstance(made, Refuse)
    assert made.error.status == status
    assert "Access-Control-Allow-Origin" not in made.error.headers


def test_a_request_that_is_no_preflight_is_not_answered_as_one(world: World) -> None:
    """A port's CORS rule answers preflights; every other request, with or without an Origin, goes through the
    checks and on to the app."""
    world.policy = parse_policy(_CORS_3000)
    for origin in ({}, {"Origin": _ADMITTED}):
        made = plan(facts("/", method="GET", Cookie=world.cookie(ALICE), **origin), world)
        assert isinstance(made, Forward), origin
    options = plan(facts("/", method="OPTIONS", Cookie=world.cookie(ALICE)), world)  # no Access-Control-Request-*
    assert isinstance(options, Forward)


@pytest.fixture
def opted_in(world: World) -> World:
    """Port 4000 of ``ws`` is public and its app asks visitors who they are."""
    spec = WorkspaceSpec(id="ws", owner="alice", ports={4000: "public"}, identity_ports=frozenset({4000}))
    world.states["ws"] = WorkspaceState(spec, Phase.RUNNING, address="127.0.0.9")
    return world


_OPTED = "4000-ws.localhost:8080"


def test_a_visitor_navigating_to_an_app_that_asks_is_asked_first(opted_in: World) -> None:
    made = plan(facts("/p?q=1", host=_OPTED, Cookie=opted_in.cookie(Identity("bob"), _OPTED), **NAVIGATE), opted_in)
    assert isinstance(made, Redirect)
    assert made.error.status == 302
    assert made.error.location.startswith("http://localhost:8080/consent?workspace=ws&port=4000&next=%2Fp%3Fq%3D1&")
    assert decisions(made) == [(True, Reason.PUBLIC_PORT)]


@pytest.mark.parametrize(("who", "method", "headers"), [
    ("alice", "GET", NAVIGATE),  # the owner is never asked
    ("bob", "GET", {"Accept": "application/json"}),  # a script cannot answer a page
    ("bob", "GET", {**NAVIGATE, "Sec_Fetch_Dest": "iframe"}),  # nor a frame: the hub is never framed
    ("bob", "GET", {"Upgrade": "websocket", "Connection": "Upgrade", "Origin": f"http://{_OPTED}"}),
    ("bob", "GET", {"Upgrade": "websocket", "Connection": "Upgrade", "Origin": f"http://{_OPTED}",
                    "Accept": "text/html"}),  # a WebSocket cannot follow a redirect, whatever it accepts
    ("bob", "HEAD", NAVIGATE),
    ("bob", "POST", {"Accept": "text/html", "Origin": f"http://{_OPTED}"}),
])
def test_who_is_not_asked_goes_on_to_the_app(opted_in: World, who: str, method: str,
                                             headers: dict[str, str]) -> None:
    """Only a visitor's browser navigating (a GET page, not in a frame) is sent to the consent page; anything else
    goes on, and the app learns nothing of a visitor who has not answered."""
    made = plan(facts("/", method=method, host=_OPTED, Cookie=opted_in.cookie(Identity(who), _OPTED), **headers),
                opted_in)
    assert isinstance(made, Forward)
    assert ("X-Forwarded-User" in made.headers) is (who == "alice")


@pytest.mark.parametrize("headers", [NAVIGATE, {"Accept": "application/json"}])
def test_an_anonymous_visitor_of_an_app_that_asks_is_not_asked_and_learns_it_nothing(
        opted_in: World, headers: dict[str, str]) -> None:
    """A public port asks only the signed-in: someone who is not signed in has nothing to share."""
    made = plan(facts("/", host=_OPTED, **headers), opted_in)
    assert isinstance(made, Forward)
    assert not [name for name in made.headers if name.startswith(("X-Forwarded-User", "X-Forwarded-Email",
                                                                  "X-Codehub-Assertion"))]


@pytest.mark.parametrize(("phase", "who", "woken"), [
    (Phase.RUNNING, None, True),  # nothing to wake: the public port is open
    (Phase.WARM, None, False),
    (Phase.WARM, ALICE, True),
])
def test_who_may_wake_is_asked_only_of_a_sleeping_workspace(world: World, phase: Phase, who: Identity | None,
                                                             woken: bool) -> None:
    """Under ``wake.who: owner-and-collaborators`` a visitor of a public port sees it while it runs, but cannot
    wake it."""
    world.policy = parse_policy("wake: {who: owner-and-collaborators}\n")
    world.states["ws"] = WorkspaceState(world.states["ws"].spec, phase, address="127.0.0.9")
    host = "4000-ws.localhost:8080"
    cookie = {"Cookie": world.cookie(who, host)} if who is not None else {}
    made = plan(facts("/", host=host, Accept="application/json", **cookie), world)
    assert isinstance(made, Forward | Hold) is woken
    if not woken:
        assert isinstance(made, Refuse)
        assert made.error.code == "wake-not-allowed"


@pytest.mark.parametrize("who", [None, Identity("eve")])
def test_who_may_wake_is_not_asked_of_someone_refused_already(world: World, who: Identity | None) -> None:
    """A sleeping workspace under ``wake.who: owner-and-collaborators``: someone the port refuses anyway hears why
    (a sign-in page, not shared with them), not that they may not wake it."""
    world.policy = parse_policy("wake: {who: owner-and-collaborators}\n")
    world.states["ws"] = WorkspaceState(world.states["ws"].spec, Phase.WARM, address="127.0.0.9")
    cookie = {"Cookie": world.cookie(who)} if who is not None else {}
    made = plan(facts("/", **NAVIGATE, **cookie), world)
    if who is None:
        assert isinstance(made, Redirect)
        assert made.error.location.startswith(f"http://{HUB}/auth/handoff?")
    else:
        assert isinstance(made, Refuse)
        assert made.error.code == "not-shared-with-user"
    assert decisions(made) == [(False, Reason.USER_UNAUTHENTICATED if who is None else Reason.NOT_SHARED_WITH_USER)]


@pytest.mark.parametrize(("dest", "attributes"), [
    ("document", {"SameSite=Lax"}),
    # In a frame the cookie was set partitioned (CHIPS), and only a Set-Cookie that says Partitioned reaches that jar.
    ("iframe", {"SameSite=None", "Secure", "Partitioned"}),
])
def test_a_share_cookie_for_a_dead_link_hears_why_and_loses_the_cookie(world: World, dest: str,
                                                                       attributes: set[str]) -> None:
    """Not a sign-in page: the visitor came with a link, and is told it expired (or was revoked)."""
    link, _ = asyncio.run(world.store.create_share(workspace="ws", port=3000, audience="anyone", people=[],
                                                    created_by="alice", ttl=600, now=NOW - 1_000))
    cookie = f"codehub_share={world.sessions.sign_state({'share': link.id}, PREVIEW, 600)}"
    made = plan(facts("/", Cookie=cookie, **{**NAVIGATE, "Sec_Fetch_Dest": dest}), world)
    assert isinstance(made, Refuse)
    assert (made.error.status, made.error.code) == (403, "share-expired")
    [cleared] = made.error.cookies
    assert cleared.startswith("codehub_share=;")
    assert set(cleared.split("; ")[1:]) == {"Path=/", "Max-Age=0", "HttpOnly", *attributes}


@pytest.mark.parametrize(("method", "headers", "answer"), [
    ("GET", NAVIGATE, "redirect"),
    ("HEAD", NAVIGATE, "redirect"),
    ("GET", {**NAVIGATE, "Sec_Fetch_Dest": "iframe"}, "embedded"),  # a redirect to the hub would loop in a frame
    ("GET", {"Accept": "application/json"}, "401"),
    ("POST", NAVIGATE, "401"),  # a form sent: a redirect would lose what it sent, and make it a GET
])
def test_an_anonymous_browser_is_sent_to_sign_in_the_way_it_can_follow(world: World, method: str,
                                                                        headers: dict[str, str], answer: str) -> None:
    made = plan(facts("/", method=method, **headers), world)
    if answer == "redirect":
        assert isinstance(made, Redirect)
        assert made.error.location.startswith("http://localhost:8080/auth/handoff?")
    else:
        assert isinstance(made, Refuse)
        assert (made.error.status, made.error.code) == (401, "user-unauthenticated")
        assert isinstance(made.error, EmbedSignIn) is (answer == "embedded")


@pytest.mark.parametrize(("dest", "framed"), [("document", False), ("iframe", True), ("frame", True)])
def test_the_sign_in_state_cookie_is_one_the_browser_keeps_where_it_signs_in(world: World, dest: str,
                                                                              framed: bool) -> None:
    """A top-level sign-in's state cookie is first-party (SameSite=Lax). In a frame (an iframe or an old <frame>) it
    is set under another site's page, where a browser that blocks third-party cookies keeps only a partitioned one
    (CHIPS: SameSite=None, Secure, Partitioned), and the hub is asked to sign in in a popup. Either way the hub is
    handed the state the cookie holds."""
    made = plan(facts("/p", **NAVIGATE, Sec_Fetch_Dest=dest), world)
    assert isinstance(made, Refuse if framed else Redirect)
    assert isinstance(made.error, EmbedSignIn) is framed
    [cookie] = made.error.cookies
    name, _, rest = cookie.partition("=")
    state, *attributes = rest.split("; ")
    assert name == "codehub_handoff"
    handoff = URL(made.error.handoff_url if isinstance(made.error, EmbedSignIn) else made.error.headers["Location"])
    assert handoff.path == "/auth/handoff"
    assert handoff.query["state"] == state
    assert handoff.query.get("popup") == ("1" if framed else None)
    same_site = {"SameSite=None", "Secure", "Partitioned"} if framed else {"SameSite=Lax"}
    assert set(attributes) == {"Path=/", "Max-Age=300", "HttpOnly", *same_site}


@pytest.mark.parametrize("cookies", [
    ["app=1; {ours}"],  # after the app's own cookies
    ["app=1", "{ours}"],  # in a Cookie header of its own (HTTP/2 may send one per cookie)
    ["flag; app=; {ours}"],  # after a cookie without a value, and one with an empty value
    ["my_codehub_session=forged; {ours}"],  # a name that ends with ours is not ours
])
def test_the_session_cookie_is_found_among_the_apps(world: World, cookies: list[str]) -> None:
    ours = world.cookie(ALICE)
    sent = CIMultiDict([("Host", PREVIEW), *(("Cookie", header.format(ours=ours)) for header in cookies)])
    made = plan(Facts("GET", "/", CIMultiDictProxy(sent), "127.0.0.1", NOW), world)
    assert isinstance(made, Forward)
    assert made.user == "alice"


@pytest.mark.parametrize(("credentials", "origin", "forwarded"), [
    (True, _ADMITTED, True),
    (False, _ADMITTED, False),
    (True, "http://5000-ws.localhost:8080", False),  # a rule with credentials admits its origins, not every one
    (True, "http://evil.test", False),
])
def test_a_cookie_vouches_for_writes_from_origins_the_rule_admits_with_credentials(world: World, credentials: bool,
                                                                                   origin: str,
                                                                                   forwarded: bool) -> None:
    """A rule without credentials lets other origins call the port, but not with the visitor's cookie; one with
    credentials lets the origins it lists, and no other."""
    world.policy = parse_policy(f"cors: [{{ports: [3000], allow_origins: ['{_ADMITTED}'], "
                                f"allow_credentials: {str(credentials).lower()}}}]")
    made = plan(facts("/", method="POST", Cookie=world.cookie(ALICE), Origin=origin), world)
    assert isinstance(made, Forward) is forwarded
    if not forwarded:
        assert isinstance(made, Refuse)
        assert made.error.code == "cross-origin-request"


@pytest.mark.parametrize(("owner", "admitted"), [("alice", True), ("mallory", False), (None, False)])
def test_same_owner_admits_the_workspaces_of_the_ports_owner(world: World, owner: str | None, admitted: bool) -> None:
    """``same-owner`` admits ports of workspaces with the same owner: not another person's, nor one that does not
    exist."""
    world.policy = parse_policy("cors: [{ports: [3000], allow_origins: [same-owner]}]")
    if owner is not None:
        world.states["ws2"] = WorkspaceState(WorkspaceSpec(id="ws2", owner=owner), Phase.RUNNING, address="127.0.0.8")
    made = plan(facts("/", method="OPTIONS", Origin="http://5000-ws2.localhost:8080",
                      Access_Control_Request_Method="POST"), world)
    assert isinstance(made, Preflight) is admitted
    if not admitted:
        assert isinstance(made, Refuse)
        assert made.error.code == "cors-origin-denied"


@pytest.mark.parametrize(("policy", "visitors_keep_awake"), [
    ("{}", True),  # by default a public port's visitors keep it awake, as its owner does
    ("wake: {visitors_keep_awake: false}\n", False),
])
def test_only_members_keep_a_workspace_awake_when_the_policy_says_so(world: World, policy: str,
                                                                      visitors_keep_awake: bool) -> None:
    world.policy = parse_policy(policy)
    owner = plan(facts("/", Cookie=world.cookie(ALICE)), world)
    visitor = plan(facts("/", host="4000-ws.localhost:8080"), world)
    assert isinstance(owner, Forward)
    assert isinstance(visitor, Forward)
    assert (owner.keeps_awake, visitor.keeps_awake) == (True, visitors_keep_awake)


def test_a_signed_in_visitor_is_no_member_and_a_collaborator_is(world: World) -> None:
    """Membership is read off the access decision's reason: a signed-in visitor let in by a public port, the org or
    a policy admin keeps no workspace awake that only its members may, and a collaborator does."""
    world.policy = parse_policy("admins: [root]\nwake: {visitors_keep_awake: false}\n")
    world.states["ws"] = WorkspaceState(WorkspaceSpec(id="ws", owner="alice", collaborators=("bob",),
                                                      ports={3000: "private", 4000: "public"}),
                                        Phase.RUNNING, address="127.0.0.9")
    public = "4000-ws.localhost:8080"
    kept = {}
    for name, host in (("bob", PREVIEW), ("bob", public), ("root", PREVIEW), ("eve", public)):
        made = plan(facts("/", host=host, Cookie=world.cookie(Identity(name), host)), world)
        assert isinstance(made, Forward)
        kept[name, host] = made.keeps_awake
    assert kept == {("bob", PREVIEW): True, ("bob", public): True, ("root", PREVIEW): False, ("eve", public): False}


def test_a_refusal_names_the_signed_in_caller_for_the_access_log(world: World) -> None:
    refused = plan(facts("/", Cookie=world.cookie(Identity("eve"))), world)
    anonymous = plan(facts("/"), world)
    assert isinstance(refused, Refuse)
    assert isinstance(anonymous, Refuse)
    assert (refused.error.code, refused.user) == ("not-shared-with-user", "eve")
    assert anonymous.user is None
    stale = _share_cookie(world, "ws", 3000, PREVIEW, created=NOW - 1_000)
    expired = plan(facts("/", Cookie=f"{world.cookie(Identity('eve'))}; {stale}"), world)
    assert isinstance(expired, Refuse)
    assert (expired.error.code, expired.user) == ("share-expired", "eve")


@pytest.mark.parametrize("target", ["/p?q=codehub_share", "/p?codehub_shares=1&a", "/p?a=codehub_share=1&&b", "/p",
                                    "/p?", "/p?a&&b=%3D"])
def test_a_query_that_only_mentions_the_share_parameter_is_left_alone(world: World, target: str) -> None:
    """Only a ``codehub_share=`` parameter is a share token: the app's own parameters, whatever they contain, go
    through as sent, and a path without a query gains none."""
    made = plan(facts(target, Cookie=world.cookie(ALICE)), world)
    assert isinstance(made, Forward)
    assert made.path == target


@pytest.mark.parametrize(("policy", "phase", "code"), [
    ("cors: [{ports: [3000], mode: passthru}]", Phase.RUNNING, None),  # the app answers its own preflights
    ("cors: [{ports: [3000], mode: passthru}]", Phase.WARM, "user-unauthenticated"),  # which wake nothing
    ("{ports: {denied: [3000]}, cors: [{ports: [3000], mode: passthru}]}", Phase.RUNNING, "port-denied"),
])
def test_a_passthru_preflight_goes_to_the_app_of_a_port_anyone_may_reach(world: World, policy: str, phase: Phase,
                                                                         code: str | None) -> None:
    world.policy = parse_policy(policy)
    world.states["ws"] = WorkspaceState(world.states["ws"].spec, phase, address="127.0.0.9")
    made = plan(facts("/", method="OPTIONS", Origin="http://elsewhere.test", Access_Control_Request_Method="PUT",
                      Authorization="Basic YXBwOmFwcA=="), world)
    if code is None:
        assert isinstance(made, Forward)
        assert made.headers["Origin"] == "http://elsewhere.test"
        assert made.headers["Authorization"] == "Basic YXBwOmFwcA==", "the app's own credentials are the app's"
        assert decisions(made) == []
    else:
        assert isinstance(made, Refuse)
        assert made.error.code == code
        assert [reason.value for _, reason in decisions(made)] == [code]


@pytest.mark.parametrize(("revoke", "age", "code"), [
    (False, 599, None),
    (False, 600, "share-expired"),  # a link's last moment is before its expiry, not at it
    (True, 0, "share-revoked"),
])
def test_a_share_link_opens_until_it_expires_or_is_revoked(world: World, revoke: bool, age: float,
                                                           code: str | None) -> None:
    link, token = asyncio.run(world.store.create_share(workspace="ws", port=3000, audience="anyone", people=[],
                                                        created_by="alice", ttl=600, now=NOW - age))
    if revoke:
        asyncio.run(world.store.revoke_share(link, now=NOW))
    made = plan(facts("/", Authorization=f"Bearer {token}"), world)
    if code is None:
        assert isinstance(made, Forward)
        assert decisions(made) == [(True, Reason.SHARE_LINK)]
    else:
        assert isinstance(made, Refuse)
        assert (made.error.status, made.error.code) == (403, code)


def test_a_share_cookie_does_not_vouch_for_writes_from_other_origins(world: World) -> None:
    """A share link's cookie rides along on requests other previews make, like a session cookie: it lets their
    pages read, but not write as its holder."""
    link, _ = asyncio.run(world.store.create_share(workspace="ws", port=3000, audience="anyone", people=[],
                                                    created_by="alice", ttl=600, now=NOW))
    cookie = f"codehub_share={world.sessions.sign_state({'share': link.id}, PREVIEW, 600)}"
    elsewhere = plan(facts("/", method="POST", Cookie=cookie, Origin="http://4000-ws.localhost:8080"), world)
    assert isinstance(elsewhere, Refuse)
    assert elsewhere.error.code == "cross-origin-request"
    own = plan(facts("/", method="POST", Cookie=cookie, Origin=f"http://{PREVIEW}"), world)
    assert isinstance(own, Forward)
    assert decisions(own) == [(True, Reason.SHARE_LINK)]


def test_what_the_gateway_consumes_never_reaches_the_app_and_what_it_does_not_does(world: World) -> None:
    """A bearer token of the gateway's (an API token, a share token) is taken off the request; the app's own
    ``Authorization`` goes through; two are refused, as which one counts would be a guess."""
    _, share = asyncio.run(world.store.create_share(workspace="ws", port=3000, audience="anyone", people=[],
                                                    created_by="alice", ttl=600, now=NOW))
    _, api = asyncio.run(world.store.create_api_token(ALICE, name="ci"))
    for token in (share, api):
        made = plan(facts("/", Authorization=f"Bearer {token}"), world)
        assert isinstance(made, Forward)
        assert "Authorization" not in made.headers
    own = plan(facts("/", Cookie=world.cookie(ALICE), Authorization="Basic YXBwOmFwcA=="), world)
    assert isinstance(own, Forward)
    assert own.headers["Authorization"] == "Basic YXBwOmFwcA=="
    two = CIMultiDict([("Host", PREVIEW), ("Authorization", f"Bearer {api}"), ("Authorization", "Basic eDp5")])
    made = plan(Facts("GET", "/", CIMultiDictProxy(two), "127.0.0.1", NOW), world)
    assert isinstance(made, Refuse)
    assert (made.error.status, made.error.code) == (400, "bad-authorization")


@pytest.mark.parametrize("authorization", ["Basic YXBwOmFwcA==", "Bearer eyJhbGciOiJIUzI1NiJ9.e30.app",
                                           "Digest chk_of-the-app", "Digest chs_of-the-app"])
def test_credentials_of_another_scheme_are_the_apps_even_when_they_look_like_ours(world: World,
                                                                                 authorization: str) -> None:
    """Only a ``Bearer`` token that begins like one of the gateway's is the gateway's: the app's own bearer tokens,
    and credentials under any other scheme even if they begin like a gateway token, are sent on as they came."""
    made = plan(facts("/", Cookie=world.cookie(ALICE), Authorization=authorization), world)
    assert isinstance(made, Forward)
    assert made.headers["Authorization"] == authorization


def test_a_bearer_token_writes_from_any_origin(world: World) -> None:
    """Only cookies ride along unasked: a script holding an API token may call from anywhere."""
    _, api = asyncio.run(world.store.create_api_token(ALICE, name="ci"))
    made = plan(facts("/", method="POST", Authorization=f"Bearer {api}", Origin="http://elsewhere.test"), world)
    assert isinstance(made, Forward)


_IDE = "ide-ws.localhost:8080"
_PUBLIC = "4000-ws.localhost:8080"
_PROXIES = "10.0.0.0/8", "192.0.2.0/24"


@pytest.mark.parametrize(("proxies", "peer", "chain"), [
    ((), "10.1.2.3", "10.1.2.3"),  # no proxy is trusted: the client's chain is its own claim
    (_PROXIES, "10.1.2.3", "203.0.113.7, 10.1.2.3"),
    (_PROXIES, "192.0.2.5", "203.0.113.7, 192.0.2.5"),  # any of the trusted networks, not only the first
    (_PROXIES, "198.51.100.1", "198.51.100.1"),  # a peer outside them all
    (_PROXIES[1:], "10.1.2.3", "10.1.2.3"),
])
def test_only_a_trusted_proxy_speaks_for_the_client(world: World, proxies: tuple[str, ...], peer: str,
                                                    chain: str) -> None:
    """A request from a trusted proxy keeps the ``X-Forwarded-For`` chain it sent (the peer appended); from anyone
    else the chain is a forgery and the app sees only the peer, so it cannot be told who the client is."""
    world.trusted_proxies = tuple(ipaddress.ip_network(network) for network in proxies)
    made = plan(facts("/", host=_PUBLIC, peer=peer, X_Forwarded_For="203.0.113.7"), world)
    assert isinstance(made, Forward)
    assert made.headers["X-Forwarded-For"] == chain


@dataclass
class _IdeWorld(World):
    """A runtime that locks each IDE with a secret of its own (the Kubernetes one)."""

    def ide_secret(self, spec: WorkspaceSpec) -> str | None:
        return f"secret-of-{spec.id}"


@pytest.mark.parametrize(("host", "cookie"), [
    (_IDE, "code-server-session=secret-of-ws"),  # the IDE gets its secret, not the one the client sent
    (PREVIEW, "code-server-session=forged"),  # a preview's app is no IDE: nothing of the IDE's is added
])
def test_the_ide_and_only_the_ide_gets_its_secret_cookie(tmp_path: Path, host: str, cookie: str) -> None:
    """Without the secret, a locked code-server answers the owner with its login page; a preview's app must never
    learn the secret that opens the IDE."""
    world = _IdeWorld(FileTokenStore(tmp_path / "tokens.json"))
    made = plan(facts("/", host=host, Cookie=world.cookie(ALICE, host) + "; code-server-session=forged"), world)
    assert isinstance(made, Forward)
    assert made.headers["Cookie"] == cookie


@pytest.mark.parametrize(("port", "tls"), [(3000, True), (4000, False)])
def test_a_port_that_speaks_tls_is_forwarded_over_tls(world: World, port: int, tls: bool) -> None:
    """``vite --https`` answers nothing but TLS, and a plain dev server nothing but plain HTTP."""
    spec = WorkspaceSpec(id="ws", owner="alice", ports={3000: "public", 4000: "public"},
                         https_ports=frozenset({3000}))
    world.states["ws"] = WorkspaceState(spec, Phase.RUNNING, address="127.0.0.9")
    made = plan(facts("/", host=f"{port}-ws.localhost:8080"), world)
    assert isinstance(made, Forward)
    assert (made.port, made.tls) == (port, tls)


_CSP = {"Content-Security-Policy": "frame-ancestors 'self'"}
_IDE_FRAMING = ResponseRules({**_CSP, "X-Frame-Options": "SAMEORIGIN"})
_REPLACE_3000 = f"cors: [{{ports: [3000], mode: replace, allow_origins: ['{_ADMITTED}']}}]"
_EMBEDDED = "embedding: {frame_ancestors: ['https://review.example']}"
_EMBEDDED_CSP = {"Content-Security-Policy": "frame-ancestors 'self' https://review.example"}


@pytest.mark.parametrize(("policy", "host", "origin", "rules"), [
    ("{}", _IDE, _ADMITTED, _IDE_FRAMING),  # the IDE frames itself and nothing else frames it
    (_REPLACE_3000, _IDE, _ADMITTED, _IDE_FRAMING),  # and no preview's CORS rule reaches it
    ("{}", PREVIEW, _ADMITTED, ResponseRules(_CSP)),  # a preview: framing only, the app's CORS is its own
    (_REPLACE_3000, PREVIEW, _ADMITTED, ResponseRules({
        **_CSP, "Access-Control-Allow-Origin": _ADMITTED, "Vary": "Origin", "Access-Control-Allow-Credentials": "true",
    }, drop_cors=True)),
    (_REPLACE_3000, PREVIEW, "http://evil.test", ResponseRules(_CSP, drop_cors=True)),
    (_REPLACE_3000, PREVIEW, "", ResponseRules(_CSP, drop_cors=True)),
    (f"cors: [{{ports: [3000], mode: passthru, allow_origins: ['{_ADMITTED}']}}]", PREVIEW, _ADMITTED,
     ResponseRules(_CSP)),
    # a policy that lets a site frame previews drops the app's X-Frame-Options, which would forbid it
    (_EMBEDDED, PREVIEW, "", ResponseRules(_EMBEDDED_CSP, drop_frame_options=True)),
    (f"{{{_EMBEDDED}, {_REPLACE_3000}}}", PREVIEW, _ADMITTED, ResponseRules({
        **_EMBEDDED_CSP, "Access-Control-Allow-Origin": _ADMITTED, "Vary": "Origin",
        "Access-Control-Allow-Credentials": "true",
    }, drop_cors=True, drop_frame_options=True)),
    (_EMBEDDED, _IDE, "", _IDE_FRAMING),  # and not the IDE's
])
def test_response_rules_frame_every_answer_and_answer_cors_for_admitted_origins(
        world: World, policy: str, host: str, origin: str, rules: ResponseRules) -> None:
    """Where the port's rule replaces the app's CORS, the app's own answer is dropped and the gateway's is given
    to an origin the rule admits, alongside the framing policy; any other origin gets the framing policy alone."""
    world.policy = parse_policy(policy)
    headers = {"Origin": origin} if origin else {}
    made = plan(facts("/", host=host, Cookie=world.cookie(ALICE, host), **headers), world)
    assert isinstance(made, Forward)
    assert (dict(made.rules.replace), made.rules.drop_cors, made.rules.drop_frame_options) == (
        dict(rules.replace), rules.drop_cors, rules.drop_frame_options)


@pytest.mark.parametrize(("who", "phase", "port", "answer"), [
    ("anyone-with-access", Phase.WARM, 4000, "hold"),  # anyone may reach the port, and anyone may wake it
    ("owner-and-collaborators", Phase.WARM, 4000, "wake-not-allowed"),  # a preflight wakes only what anyone may
    ("owner-and-collaborators", Phase.RUNNING, 4000, "forward"),  # nothing to wake: who may wake is not asked
    ("owner-and-collaborators", Phase.WARM, 3000, "user-unauthenticated"),  # not reachable: who wakes is moot
])
def test_a_passthru_preflight_wakes_only_what_anyone_may_wake(world: World, who: str, phase: Phase, port: int,
                                                              answer: str) -> None:
    """A preflight carries no credentials, so it wakes a workspace only if anyone could; a port anyone may not
    reach is refused for that reason, not for who may wake it."""
    world.policy = parse_policy(f"{{wake: {{who: {who}}}, cors: [{{ports: [3000, 4000], mode: passthru}}]}}")
    world.states["ws"] = WorkspaceState(world.states["ws"].spec, phase, address="127.0.0.9")
    made = plan(facts("/", method="OPTIONS", host=f"{port}-ws.localhost:8080", Origin="http://elsewhere.test",
                      Access_Control_Request_Method="PUT"), world)
    if answer == "hold":
        assert isinstance(made, Hold)
        assert made.forward.port == port
    elif answer == "forward":
        assert isinstance(made, Forward)
    else:
        assert isinstance(made, Refuse)
        assert made.error.code == answer
        assert [reason.value for _, reason in decisions(made)] == [answer]


@pytest.mark.parametrize("allow_headers", ["['*']", "[content-type]"])
def test_a_preflight_that_asks_for_no_headers_is_allowed_none(world: World, allow_headers: str) -> None:
    """A preflight without ``Access-Control-Request-Headers`` asks for none, and its answer allows none."""
    world.policy = parse_policy(f"cors: [{{ports: [3000], mode: replace, allow_origins: ['{_ADMITTED}'], "
                                f"allow_headers: {allow_headers}}}]")
    made = plan(facts("/", method="OPTIONS", Origin=_ADMITTED, Access_Control_Request_Method="POST"), world)
    assert isinstance(made, Preflight)
    assert "Access-Control-Allow-Headers" not in made.headers
    assert made.headers["Access-Control-Allow-Origin"] == _ADMITTED


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_share_token_in_the_url_of_a_get_or_head_leaves_the_url(world: World, method: str) -> None:
    """A HEAD is a navigation's shape too (link checkers, previews of the link): its token becomes the cookie and
    leaves the URL as a GET's does, and is not handed on to the app in the address."""
    link, token = asyncio.run(world.store.create_share(workspace="ws", port=3000, audience="anyone", people=[],
                                                        created_by="alice", ttl=600, now=NOW))
    made = plan(facts(f"/p?codehub_share={token}", method=method, Authorization="Basic YXBwOmFwcA=="), world)
    assert isinstance(made, Redirect)
    assert made.error.location == "/p"
    assert made.error.cookies[0].startswith("codehub_share=")
    assert made.effects == (UseShare(link, NOW),)
    found = authenticate(method, facts(method=method, Authorization="Basic YXBwOmFwcA==").headers,
                         f"/p?codehub_share={token}", PREVIEW, sessions=world.sessions, store=world.store,
                         secure=False, preview=True, now=NOW)
    assert (found.in_url, found.link, found.path) == (True, link, "/p")
    assert found.consumed_authorization is False, "the app's own Authorization is not the gateway's to take"


def test_a_share_token_in_the_url_of_a_write_is_taken_off_before_the_app_sees_it(world: World) -> None:
    """A write is not redirected (its body would be lost): the link opens the port there and then, and counts, but
    its token still leaves the address the app is sent, as a GET's does."""
    link, token = asyncio.run(world.store.create_share(workspace="ws", port=3000, audience="anyone", people=[],
                                                        created_by="alice", ttl=600, now=NOW))
    made = plan(facts(f"/p?a=1&codehub_share={token}", method="POST"), world)
    assert isinstance(made, Forward)
    assert made.path == "/p?a=1"
    assert made.effects[0] == UseShare(link, NOW)
    assert decisions(made) == [(True, Reason.SHARE_LINK)]


def test_a_sign_in_comes_back_to_the_address_without_a_share_token(world: World) -> None:
    """The IDE reads no share token, and someone signed out who brings one is sent to sign in: the token is not
    carried to the hub in the hand-off, nor back into the address after it."""
    made = plan(facts("/src?x=1&codehub_share=chs_any", host=_IDE, **NAVIGATE), world)
    assert isinstance(made, Redirect)
    assert parse_qs(URL(made.error.location).query_string)["target"] == [f"http://{_IDE}/src?x=1"]


def test_a_host_is_known_by_its_normal_form_whatever_its_spelling(world: World) -> None:
    """Sessions and the sign-in callback's cookie are bound to the host in its normal form (lower case, port
    spelt out), so a host spelt otherwise (a script's upper case) is the same host: the owner's cookie opens it,
    and the callback binds a session that opens it next time."""
    spelt = PREVIEW.upper()
    made = plan(facts("/", host=spelt, Cookie=world.cookie(ALICE)), world)
    assert isinstance(made, Forward)
    assert made.user == "alice"
    callback = plan(facts("/_codehub/auth/callback?code=c&state=s", host=spelt), world)
    assert isinstance(callback, GatewayPage)
    assert callback.host == PREVIEW
    _, token = asyncio.run(world.store.create_share(workspace="ws", port=3000, audience="anyone", people=[],
                                                    created_by="alice", ttl=600, now=NOW))
    swapped = plan(facts(f"/?codehub_share={token}", host=spelt), world)
    assert isinstance(swapped, Redirect)
    followed = plan(facts("/", host=spelt, Cookie=swapped.error.cookies[0].partition(";")[0]), world)
    assert isinstance(followed, Forward), "the share cookie opens the host it was set on"


def _share_cookie(world: World, workspace: str, port: int, host: str, *, created: float = NOW) -> str:
    link, _ = asyncio.run(world.store.create_share(workspace=workspace, port=port, audience="anyone", people=[],
                                                    created_by="alice", ttl=600, now=created))
    return f"codehub_share={world.sessions.sign_state({'share': link.id}, host, 600)}"


def test_the_ide_host_reads_no_share_cookie(world: World) -> None:
    """Share links open previews, never the IDE: a share cookie on the IDE's host is not read, not even to say its
    link expired: a browser there is sent to sign in."""
    cookie = _share_cookie(world, "ws", 3000, _IDE, created=NOW - 1_000)
    made = plan(facts("/", host=_IDE, Cookie=cookie, **NAVIGATE), world)
    assert isinstance(made, Redirect)
    assert made.error.location.startswith("http://localhost:8080/auth/handoff?")
    live = _share_cookie(world, "ws", 3000, _IDE)
    found = authenticate("GET", facts(host=_IDE, Cookie=live).headers, "/", _IDE, sessions=world.sessions,
                         store=world.store, secure=False, preview=False, now=NOW)
    assert (found.link, found.grant, found.by_cookie) == (None, None, False)


@pytest.mark.parametrize("port", [3000, None])
def test_a_share_token_presented_to_the_ide_opens_nothing(world: World, port: int | None) -> None:
    """Nor does a share token sent as a bearer token open the IDE, even one for every port of its workspace: it is
    taken off the request (it is the gateway's), and the caller is as anonymous as without it."""
    _, token = asyncio.run(world.store.create_share(workspace="ws", port=port, audience="anyone", people=[],
                                                    created_by="alice", ttl=600, now=NOW))
    for presented in (token, "chs_not-a-link"):
        made = plan(facts("/", host=_IDE, Authorization=f"Bearer {presented}"), world)
        assert isinstance(made, Refuse)
        assert (made.error.status, made.error.code) == (401, "user-unauthenticated")
    owner = plan(facts("/", host=_IDE, Authorization=f"Bearer {token}", Cookie=world.cookie(ALICE, _IDE)), world)
    assert isinstance(owner, Forward)
    assert "Authorization" not in owner.headers


@pytest.mark.parametrize("live", [True, False])
def test_a_share_token_in_the_url_of_the_ide_is_not_read_there(world: World, live: bool) -> None:
    """In the IDE's URL a share token is not the gateway's to check, count or make a cookie of: the owner goes on to
    the IDE as without it."""
    _, token = asyncio.run(world.store.create_share(workspace="ws", port=None, audience="anyone", people=[],
                                                    created_by="alice", ttl=600, now=NOW))
    presented = token if live else "chs_not-a-link"
    made = plan(facts(f"/?codehub_share={presented}", host=_IDE, Cookie=world.cookie(ALICE, _IDE)), world)
    assert isinstance(made, Forward)
    assert not [effect for effect in made.effects if isinstance(effect, UseShare)]


def test_a_share_token_presented_wins_over_a_share_cookie(world: World) -> None:
    """The link a request presents is the one that counts: a cookie left by another link (for another port) does
    not replace it."""
    _, token = asyncio.run(world.store.create_share(workspace="ws", port=3000, audience="anyone", people=[],
                                                    created_by="alice", ttl=600, now=NOW))
    cookie = _share_cookie(world, "ws", 4000, PREVIEW)
    made = plan(facts("/", Authorization=f"Bearer {token}", Cookie=cookie), world)
    assert isinstance(made, Forward)
    assert decisions(made) == [(True, Reason.SHARE_LINK)]


@pytest.mark.parametrize(("host", "signed_in", "presented", "reason"), [
    (PREVIEW, True, "bearer", Reason.OWNER),  # the owner, holding a link to another port of theirs
    (PREVIEW, True, "cookie", Reason.OWNER),
    (_PUBLIC, False, "bearer", Reason.PUBLIC_PORT),  # a public port, with a link to a private one
    (_PUBLIC, False, "cookie", Reason.PUBLIC_PORT),
])
def test_a_link_for_elsewhere_takes_nothing_from_who_may_come_in_anyway(world: World, host: str, signed_in: bool,
                                                                         presented: str, reason: Reason) -> None:
    """Only a link in the URL, traded for a cookie, is refused on a host it does not open (the cookie would stand in
    the way there): a bearer token or a cookie of a link to another port goes with its request, and the owner, or
    anyone on a public port, comes in as without it."""
    other = 4000 if host == PREVIEW else 3000
    _, token = asyncio.run(world.store.create_share(workspace="ws", port=other, audience="anyone", people=[],
                                                    created_by="alice", ttl=600, now=NOW))
    cookies = [world.cookie(ALICE, host)] if signed_in else []
    headers = {"Authorization": f"Bearer {token}"} if presented == "bearer" else {}
    if presented == "cookie":
        cookies.append(_share_cookie(world, "ws", other, host))
    if cookies:
        headers["Cookie"] = "; ".join(cookies)
    made = plan(facts("/", host=host, **headers), world)
    assert isinstance(made, Forward), made
    assert decisions(made) == [(True, reason)]


def _shape(made: Plan) -> tuple[object, ...]:
    """What a plan lets through, to where and for whom (a sign-in's state is random: its kind is enough)."""
    if isinstance(made, Refuse):
        return ("refuse", made.error.status, made.error.code)
    if isinstance(made, Redirect):
        return ("redirect", made.error.status, made.error.location.partition("?")[0])
    forward = made.forward if isinstance(made, Hold) else made
    if isinstance(forward, Forward):
        return (type(made).__name__, Granted.of(forward))
    return (type(made).__name__,)


_SLEEPING = {"phase": Phase.WARM}
_JUNK = [("Cookie", "app=1; other=2"), ("X-Anything", "a"), ("Connection", "keep-alive")]


@pytest.mark.parametrize(("name", "method", "headers", "phase"), [
    ("websocket from an origin no rule admits", "GET",
     {"Upgrade": "websocket", "Origin": "http://5000-elsewhere.localhost:8080"}, Phase.RUNNING),
    ("websocket from the port's own origin", "GET", {"Upgrade": "websocket", "Origin": f"http://{PREVIEW}"},
     Phase.RUNNING),
    ("an API token's call", "GET", {"Authorization": "{token}"}, Phase.RUNNING),
    ("a write a browser sent from another site", "POST", {"Sec-Fetch-Site": "cross-site"}, Phase.RUNNING),
    ("a fetch for HTML while asleep", "GET", {"Sec-Fetch-Mode": "cors", "Accept": "text/html"}, Phase.WARM),
    ("a navigation while asleep", "GET", {"Accept": "text/html"}, Phase.WARM),
    ("an XHR for HTML while asleep", "GET", {"Accept": "text/html", "X-Requested-With": "XMLHttpRequest"},
     Phase.WARM),
    ("a prerender another preview asked for while asleep", "GET", {"Sec-Fetch-Site": "same-site",
     "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document", "Sec-Purpose": "prefetch;prerender"}, Phase.WARM),
    ("an older browser's prefetch from another preview while asleep", "GET", {"Sec-Fetch-Site": "same-site",
     "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document", "Purpose": "prefetch"}, Phase.WARM),
    ("the address bar's prerender while asleep", "GET", {"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate",
     "Sec-Fetch-Dest": "document", "Sec-Purpose": "prefetch;prerender"}, Phase.WARM),
    ("an older browser's prefetch of a typed address while asleep", "GET", {"Sec-Fetch-Site": "none",
     "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document", "Purpose": "prefetch"}, Phase.WARM),
    ("a link clicked on another preview while asleep", "GET", {"Sec-Fetch-Site": "same-site",
     "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document", "Sec-Fetch-User": "?1"}, Phase.WARM),
    ("a navigation in a frame, signed out", "GET", {"Accept": "text/html", "Sec-Fetch-Dest": "iframe"},
     Phase.RUNNING),
])
def test_what_an_open_exchange_keeps_plans_as_its_whole_request_did(world: World, name: str, method: str,
                                                                    headers: dict[str, str], phase: Phase) -> None:
    """An open WebSocket or streamed answer is asked again with only the headers kept of its request: whatever
    the request, they plan as the whole of it did (its Upgrade, its token, where a browser says it came from, whether
    it navigates, and in what)."""
    _, token = asyncio.run(world.store.create_api_token(ALICE, name="ci"))
    world.states["ws"] = WorkspaceState(world.states["ws"].spec, phase, address="127.0.0.9")
    signed_out = "signed out" in name or "token" in name
    given = CIMultiDict([("Host", PREVIEW), *_JUNK])
    if not signed_out:
        given.add("Cookie", world.cookie(ALICE))
    given.extend({key: value.format(token=f"Bearer {token}") for key, value in headers.items()})
    full = Facts(method, "/ws", CIMultiDictProxy(given), "127.0.0.1", NOW)
    kept = plan_module.grant_facts(full, world.secure)
    assert _shape(plan(kept, world)) == _shape(plan(full, world)), name


def test_an_open_websocket_holds_while_the_token_store_cannot_be_read(tmp_path: Path) -> None:
    """A store that cannot be read for now says nothing was revoked: what it let in holds until it can be read."""
    path = tmp_path / "tokens.json"
    world = World(FileTokenStore(path))
    host = "4000-ws.localhost:8080"
    spec = WorkspaceSpec(id="ws", owner="alice", ports={4000: "public"}, identity_ports=frozenset({4000}))
    world.states["ws"] = WorkspaceState(spec, Phase.RUNNING, address="127.0.0.9")
    asyncio.run(world.store.record_consent(Consent.answer("bob", "ws", 4000, owner="alice", share=True,
                                                          claims=["user"])))
    bobs = facts("/ws", host=host, Cookie=world.cookie(Identity("bob"), host), Upgrade="websocket",
                 Origin=f"http://{host}")
    made = plan(bobs, world)
    assert isinstance(made, Forward)
    was = Granted.of(made)
    assert was.told is not None
    good = path.read_text()
    path.write_text('{"consents": [')
    assert still_granted(bobs, was, world, NOW)
    path.write_text(good)
    assert still_granted(bobs, was, world, NOW)


@pytest.mark.parametrize(("claims", "holds"), [
    ("[user, email, groups]", True),
    ("[email, groups]", False),
    ("[user, groups]", False),
    ("[user, email]", False),
])
def test_an_open_websocket_ends_when_its_app_would_be_told_less(world: World, claims: str, holds: bool) -> None:
    """The policy reloaded with fewer claims for apps: an open WebSocket told more than that ends."""
    world.policy = parse_policy("identity: {claims: [user, email, groups], groups: [dev]}\n")
    alice = Identity("alice", "alice@example.com", ("dev",))
    alices = facts("/ws", Cookie=world.cookie(alice), Upgrade="websocket", Origin=f"http://{PREVIEW}")
    made = plan(alices, world)
    assert isinstance(made, Forward)
    was = Granted.of(made)
    assert was.told == ("alice", "alice@example.com", "dev")
    world.policy = parse_policy(f"identity: {{claims: {claims}, groups: [dev]}}\n")
    assert still_granted(alices, was, world, NOW) is holds


def test_framing_rules_are_made_once_per_policy_and_few_are_kept(world: World,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan_module, "_FRAMING_RULES", {})
    first, second = (plan(facts("/", host="4000-ws.localhost:8080"), world) for _ in range(2))
    assert isinstance(first, Forward)
    assert isinstance(second, Forward)
    assert first.rules is second.rules
    for number in range(20):
        world.policy = parse_policy(f"embedding: {{frame_ancestors: ['https://{number}.example']}}\n")
        plan(facts("/", host="4000-ws.localhost:8080"), world)
        assert len(plan_module._FRAMING_RULES) <= 8


@pytest.mark.parametrize(("cookie", "status", "challenge"), [
    (None, 401, 'Bearer realm="codehub"'),  # nobody: a script is told how to authenticate
    ("eve", 403, None),  # someone refused: no credentials would help, and none are asked for
])
def test_only_a_caller_who_is_nobody_is_asked_for_credentials(world: World, cookie: str | None, status: int,
                                                               challenge: str | None) -> None:
    headers = {"Cookie": world.cookie(Identity(cookie))} if cookie else {}
    made = plan(facts("/api", Accept="application/json", **headers), world)
    assert isinstance(made, Refuse)
    assert (made.error.status, made.error.headers.get("WWW-Authenticate")) == (status, challenge)


def test_a_visitors_consent_ask_lasts_ten_minutes(opted_in: World) -> None:
    """The ask the consent page is opened with (sealed for the hub) vouches that the app sent this visitor for ten
    minutes: a link to it found later, in a history or a log, asks nothing."""
    keys = KeySet([SigningKey.generate()])
    clock = [NOW]
    opted_in.sessions = Sessions(lambda: keys, f"http://{HUB}", ttl=3600, clock=lambda: clock[0])
    made = plan(facts("/", host=_OPTED, Cookie=opted_in.cookie(Identity("bob"), _OPTED), **NAVIGATE), opted_in)
    assert isinstance(made, Redirect)
    ask = parse_qs(URL(made.error.location).raw_query_string)["ask"][0]
    clock[0] = NOW + 599
    assert opted_in.sessions.open_state(ask, HUB) == {"ask": ["bob", "ws", 4000, "alice"], "typ": "state",
                                                       "exp": int(NOW) + 600}
    clock[0] = NOW + 600
    assert opted_in.sessions.open_state(ask, HUB) is None


# --- a name that passes to another owner ---------------------------------------------------------------------------


def _marked_by(world: World) -> str:
    """The owner's mark the answer to a browser's fetch of a service worker's script sets (its cookie pair)."""
    made = plan(facts("/sw.js", host="4000-ws.localhost:8080", Service_Worker="script",
                      Sec_Fetch_Dest="serviceworker"), world)
    assert isinstance(made, Forward)
    (cookie,) = made.rules.cookies
    assert cookie.startswith("codehub_owner="), cookie
    assert "HttpOnly" in cookie, cookie
    assert "Domain" not in cookie, cookie  # host-only
    assert f"Max-Age={400 * 86400};" in cookie, cookie  # as long as Chromium keeps one: a worker outlives a session
    assert "SameSite=Lax" in cookie, cookie
    return cookie.partition(";")[0]


def test_only_a_service_workers_script_is_answered_with_its_owners_mark(world: World) -> None:
    ordinary = plan(facts("/", host="4000-ws.localhost:8080", **NAVIGATE), world)
    assert isinstance(ordinary, Forward)
    assert ordinary.rules.cookies == ()
    mark = _marked_by(world)
    again = plan(facts("/sw.js", host="4000-ws.localhost:8080", Service_Worker="script", Cookie=mark), world)
    assert isinstance(again, Forward)
    assert again.rules.cookies == ()  # marked already
    # One of its own per host: nobody can tell from marks whether two hosts have one owner.
    assert mark.partition("=")[2] == world.sessions.owner_marks("4000-ws.localhost:8080", "alice")[0]
    assert world.sessions.owner_marks("3000-ws.localhost:8080", "alice")[0] != mark.partition("=")[2]


def test_a_browser_marked_by_another_owner_of_the_name_is_told_to_drop_what_it_kept(world: World) -> None:
    """See ``test_a_service_worker_a_names_former_owner_left_does_not_answer_for_the_new_one`` (real Chromium)."""
    mark = _marked_by(world)
    state = world.states["ws"]
    world.keys = world.keys.rotated(keep_for=3600)
    world.sessions.forget_cached()
    # Marks set from now on are made with the new key (the one kept after the old is dropped from the keys file).
    assert world.sessions.owner_marks("4000-ws.localhost:8080", "alice")[1] == mark.partition("=")[2]
    assert world.sessions.owner_marks("4000-ws.localhost:8080", "alice")[0] != mark.partition("=")[2]
    same = plan(facts("/", host="4000-ws.localhost:8080", Cookie=mark, **NAVIGATE), world)
    assert isinstance(same, Forward), same  # the same owner's, made before the keys rotated
    world.states["ws"] = dataclasses.replace(state, spec=dataclasses.replace(state.spec, owner="bob"))
    for headers in ({"Cookie": mark, **NAVIGATE}, {"Cookie": mark, "Service_Worker": "script"}, {"Cookie": mark},
                    {"Cookie": mark, "Sec_Fetch_Dest": "iframe"}):
        refused = plan(facts("/", host="4000-ws.localhost:8080", **headers), world)
        assert isinstance(refused, Refuse), refused
        assert isinstance(refused.error, NameReused)
        assert refused.error.status == 409
        assert refused.error.headers["Clear-Site-Data"] == '"cache", "storage"'  # never "cookies": the whole site's
        (cookie,) = refused.error.cookies  # the new owner's mark
        assert cookie.startswith(f"codehub_owner={world.sessions.owner_marks('4000-ws.localhost:8080', 'bob')[0]};")
        assert "SameSite=Lax" in cookie, cookie  # in a frame too: in place of the refused one, not partitioned beside
        assert "Partitioned" not in cookie, cookie
    # One set for the shared parent domain (plain HTTP: a page elsewhere can) is refused once, and beside the mark
    # that refusal sets it is no mark: not a refusal for good.
    planted = plan(facts("/", host="4000-ws.localhost:8080", Cookie="codehub_owner=planted"), world)
    assert isinstance(planted, Refuse)
    (cookie,) = planted.error.cookies
    both = f"{cookie.partition(';')[0]}; codehub_owner=planted"
    beside = plan(facts("/", host="4000-ws.localhost:8080", Cookie=both), world)
    assert isinstance(beside, Forward)

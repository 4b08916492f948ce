"""The request plan as a pure function: facts and a world in memory in, a plan and its effects out.

The world here is made of the gateway's own parts (sessions signed with a real key, the file token store, a
parsed policy), with no server, socket or clock behind them: what the lanes do with a plan is tested elsewhere.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.auth.identity import Identity
from gateway.auth.keys import KeySet, SigningKey
from gateway.auth.sessions import Sessions
from gateway.auth.store import Consent, FileTokenStore
from gateway.edge import plan as plan_module
from gateway.edge.plan import (
    Facts,
    Forward,
    GatewayPage,
    Hold,
    Page,
    Plan,
    Preflight,
    RecordDecision,
    Redirect,
    Refuse,
    UseShare,
    UseToken,
    WaitingPage,
    plan,
)
from gateway.edge.policy import Policy, Reason, parse_policy
from gateway.edge.routing import Hosts
from gateway.lifecycle import Phase, WorkspaceSpec, WorkspaceState

HUB = "localhost:8080"
PREVIEW = "3000-ws.localhost:8080"
ALICE = Identity("alice", "alice@example.com")
NOW = time.time()  # JWTs are checked against the real clock too


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
        keys = KeySet([SigningKey.generate()])
        self.sessions = Sessions(lambda: keys, f"http://{HUB}", ttl=3600, clock=lambda: NOW)
        spec = WorkspaceSpec(id="ws", owner="alice", ports={3000: "private", 4000: "public"})
        self.states["ws"] = WorkspaceState(spec, Phase.RUNNING, address="127.0.0.9")

    def workspace(self, name: str) -> WorkspaceState | None:
        return self.states.get(name)

    def waking(self, workspace: str, port: int) -> bool:
        return (workspace, port) in self.busy

    def ide_secret(self, workspace: str) -> str | None:
        return None

    def cookie(self, identity: Identity, host: str = PREVIEW) -> str:
        return f"codehub_session={self.sessions.issue(identity, host)}"


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(FileTokenStore(tmp_path / "tokens.json"))


def facts(target: str = "/", *, method: str = "GET", host: str | None = PREVIEW, **headers: str) -> Facts:
    given = CIMultiDict({name.replace("_", "-"): value for name, value in headers.items()})
    if host is not None:
        given.add("Host", host)
    return Facts(method, target, CIMultiDictProxy(given), "127.0.0.1", NOW)


NAVIGATE = {"Sec_Fetch_Mode": "navigate", "Accept": "text/html"}


def decisions(made: Plan) -> list[tuple[bool, Reason]]:
    return [(e.decision.allow, e.decision.reason) for e in made.effects if isinstance(e, RecordDecision)]


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
    made = plan(facts(target, host=host), world)
    assert isinstance(made, Refuse)
    assert (made.error.status, made.error.code) == (status, code)


def test_the_hub_is_the_routers(world: World) -> None:
    assert plan(facts("/api/v1/workspaces", host=HUB), world) == GatewayPage(page=Page.HUB, target=plan(
        facts("/api/v1/workspaces", host=HUB), world).target)


def test_the_old_ide_address_moves(world: World) -> None:
    made = plan(facts("/w/ws/src?x=1", host=HUB), world)
    assert isinstance(made, Redirect)
    assert made.error.status == 308
    assert made.error.location == "http://ide-ws.localhost:8080/src?x=1"


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
    refused = plan(facts("/", method="OPTIONS", Origin="http://evil.test", Access_Control_Request_Method="POST"),
                   world)
    assert isinstance(refused, Refuse)
    assert refused.error.code == "cors-origin-denied"


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

"""CORS and framing as pure functions: a rule, an origin and the request's headers in, an answer out.

The plan's tests (``test_plan.py``) go through these on a whole request; here each check is a table, so a row
names the one case it is about (a trust boundary between previews of one site: ``DESIGN.md``, security rules).
"""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.edge import cors
from gateway.edge.policy import CorsRule, parse_policy
from gateway.edge.routing import Hosts
from gateway.lifecycle import WorkspaceSpec

HOSTS = Hosts.from_urls("http://localhost:8080", "localhost:8080")
SPEC = WorkspaceSpec(id="ws", owner="alice", ports={3000: "private"})
OWNERS = {"ws": "alice", "other": "alice", "bobs": "bob"}
OWN = "http://3000-ws.localhost:8080"


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


@pytest.mark.parametrize(
    ("method", "given", "preflight"),
    [
        ("OPTIONS", [("Origin", OWN), ("Access-Control-Request-Method", "POST")], True),
        ("OPTIONS", [("origin", OWN), ("access-control-request-method", "PUT")], True),
        ("OPTIONS", [("Access-Control-Request-Method", "POST")], False),
        ("OPTIONS", [("Origin", OWN)], False),
        ("POST", [("Origin", OWN), ("Access-Control-Request-Method", "POST")], False),
    ],
)
def test_a_preflight_is_an_options_with_an_origin_and_a_method(method: str, given: list[tuple[str, str]],
                                                                preflight: bool) -> None:
    """Only a real preflight is answered by the gateway: an ``OPTIONS`` without them is the app's to answer."""
    assert cors.is_preflight(method, headers(*given)) is preflight


@pytest.mark.parametrize(
    ("method", "given", "needs"),
    [
        ("GET", [], False),
        ("HEAD", [], False),
        ("OPTIONS", [], False),
        ("POST", [], True),
        ("PUT", [], True),
        ("DELETE", [], True),
        ("PATCH", [], True),
        ("GET", [("Upgrade", "websocket")], True),
    ],
)
def test_writes_and_websockets_need_their_own_origin(method: str, given: list[tuple[str, str]], needs: bool) -> None:
    assert cors.needs_same_origin(method, headers(*given)) is needs


@pytest.mark.parametrize(
    ("given", "admitted", "allowed"),
    [
        ([("Origin", OWN)], False, True),
        ([("Origin", "http://4000-ws.localhost:8080")], True, True),
        ([("Origin", "http://4000-ws.localhost:8080")], False, False),
        ([("Origin", "null")], True, False),  # a sandboxed frame or a file: no origin a rule can name
        ([("Origin", OWN), ("Origin", OWN)], True, False),  # two are a forgery
        ([], False, True),  # no browser: a script with the cookie it was given
        ([("Sec-Fetch-Site", "same-origin")], False, True),
        ([("Sec-Fetch-Site", "same-site")], True, False),  # a browser, from another preview of the site
        ([("Sec-Fetch-Site", "cross-site")], True, False),
        ([("Upgrade", "websocket")], True, False),  # browsers always send Origin on an upgrade
    ],
)
def test_same_origin_or_admitted(given: list[tuple[str, str]], admitted: bool, allowed: bool) -> None:
    """The cookie vouches for a write or a WebSocket only from the request's own origin or one the rule admits."""
    assert cors.same_origin_or_admitted(headers(*given), OWN, lambda origin: admitted) is allowed


def test_the_first_rule_that_names_the_port_applies_and_a_rule_without_ports_names_every_port() -> None:
    policy = parse_policy("""
cors:
  - ports: [3000]
    allow_origins: ["https://a.test"]
  - ports: [3000, 4000]
    allow_origins: ["https://b.test"]
  - allow_origins: ["https://c.test"]
""")
    assert [(rule.allow_origins if rule else None) for rule in (cors.rule_for(policy, port) for port in
                                                                (3000, 4000, 5000))] == [
        ("https://a.test",), ("https://b.test",), ("https://c.test",)]
    assert cors.rule_for(parse_policy("cors:\n  - ports: [3000]\n"), 4000) is None


@pytest.mark.parametrize(
    ("allow_origins", "origin", "allowed"),
    [
        (("https://review.test",), "https://review.test", True),
        (("https://review.test",), "https://other.test", False),
        (("*",), "https://anyone.test", True),
        # same-workspace: the workspace's other ports, nothing else
        (("same-workspace",), "http://4000-ws.localhost:8080", True),
        (("same-workspace",), "http://4000-ws.localhost:8080/", True),
        (("same-workspace",), "http://4000-other.localhost:8080", False),
        (("same-workspace",), "http://ide-ws.localhost:8080", False),  # the IDE is not a preview
        (("same-workspace",), "http://localhost:8080", False),  # nor is the hub
        (("same-workspace",), "https://4000-ws.localhost:8080", False),  # another scheme is another origin
        (("same-workspace",), "http://4000-ws.localhost:8080/x", False),  # no origin has a path
        (("same-workspace",), "4000-ws.localhost:8080", False),
        (("same-workspace",), "http://4000-ws.localhost:8080.evil.test", False),
        (("same-workspace",), "http://[]@", False),
        (("same-workspace",), "http://evil.test", False),  # routes nowhere
        (("same-workspace",), "http://0-ws.localhost:8080", False),  # no port 0
        (("same-owner",), "http://4000-ws.localhost:8080", True),  # its own workspace is its owner's too
        # same-owner: any port of any workspace of the same owner
        (("same-owner",), "http://5000-other.localhost:8080", True),
        (("same-owner",), "http://5000-bobs.localhost:8080", False),
        (("same-owner",), "http://5000-gone.localhost:8080", False),  # no owner known
        (("same-workspace",), "http://5000-other.localhost:8080", False),
        ((), "http://4000-ws.localhost:8080", False),
    ],
)
def test_origin_allowed(allow_origins: tuple[str, ...], origin: str, allowed: bool) -> None:
    """The keywords are spelt as policy files spell them (not imported), so renaming one fails here."""
    rule = CorsRule(ports=(3000,), allow_origins=allow_origins)
    assert cors.origin_allowed(rule, origin, SPEC, HOSTS, OWNERS.get) is allowed


def test_same_owner_with_an_unknown_owner_on_both_sides_is_no_match() -> None:
    """A workspace whose owner is not known must not match another whose owner is not known either."""
    nobodys = WorkspaceSpec(id="ws", owner="", ports={3000: "private"})
    rule = CorsRule(allow_origins=("same-owner",))
    assert not cors.origin_allowed(rule, "http://5000-gone.localhost:8080", nobodys, HOSTS, lambda name: None)


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (CorsRule(), {"Access-Control-Allow-Origin": OWN, "Vary": "Origin",
                      "Access-Control-Allow-Credentials": "true"}),
        (CorsRule(allow_credentials=False, expose_headers=("X-A", "X-B")),
         {"Access-Control-Allow-Origin": OWN, "Vary": "Origin", "Access-Control-Expose-Headers": "X-A, X-B"}),
    ],
)
def test_response_headers(rule: CorsRule, expected: dict[str, str]) -> None:
    """Credentials are allowed only when the rule says so: ``true`` or absent, never ``false``."""
    assert cors.response_headers(rule, OWN) == expected


VARY = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"


@pytest.mark.parametrize(
    ("rule", "requested", "allow_headers"),
    [
        (CorsRule(), "", None),  # nothing asked, nothing answered
        (CorsRule(), "content-type", "content-type"),
        (CorsRule(allow_headers=("Content-Type", "X-Trace")), "x-other", "Content-Type, X-Trace"),
        (CorsRule(allow_headers=("Content-Type",)), "", None),
        (CorsRule(), "x-a, x-b\r\nSet-Cookie: a=1", None),
    ],
)
def test_preflight_headers(rule: CorsRule, requested: str, allow_headers: str | None) -> None:
    answer = cors.preflight_headers(rule, OWN, requested)
    assert answer.get("Access-Control-Allow-Headers") == allow_headers
    assert answer["Access-Control-Allow-Methods"] == "GET, HEAD, POST, PUT, PATCH, DELETE"
    assert (answer["Access-Control-Max-Age"], answer["Vary"]) == ("600", VARY)
    assert answer["Access-Control-Allow-Origin"] == OWN


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{}", "frame-ancestors 'self'"),
        ("embedding: {frame_ancestors: ['https://review.example', 'https://b.example']}",
         "frame-ancestors 'self' https://review.example https://b.example"),
    ],
)
def test_frame_ancestors(text: str, expected: str) -> None:
    assert cors.frame_ancestors(parse_policy(text)) == expected


def test_the_hub_is_never_framed() -> None:
    """The hub holds the management API's buttons: no site may frame it (clickjacking), in old browsers too."""
    assert cors.HUB_FRAME_HEADERS == {"Content-Security-Policy": "frame-ancestors 'none'", "X-Frame-Options": "DENY"}

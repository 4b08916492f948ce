"""Visitors' identity reaches an app only by policy and consent (README, "Security model": who learns what).

The echo upstream answers with the headers it received, so each test sees exactly what an app learns.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest

from gateway.auth.identity import Identity
from gateway.edge.disclosure import ConsentPage, consent_url
from gateway.edge.policy import IdentityRules
from gateway.edge.routing import Hosts
from gateway.lifecycle import WorkspaceSpec
from tests.auth.browser import Browser, Page
from tests.auth.conftest import MakeBrowser, Serve, Served, seen_headers
from tests.auth.test_security import all_open, open_socket
from tests.auth.test_sessions import sessions

pytestmark = pytest.mark.timeout(60)

HUB = "http://localhost:8080"
APP = "http://3001-ws1.localhost:8080"
WORKSPACES: dict[str, dict[str, Any]] = {
    "ws1": {"owner": "alice", "collaborators": ["carol"], "ports": {3000: "private", 3001: "public"}},
}
IDENTITY_HEADERS = ("x-forwarded-user", "x-forwarded-email", "x-forwarded-groups", "x-codehub-assertion")
NAVIGATE = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
FETCH = {"Accept": "application/json", "Sec-Fetch-Mode": "cors"}


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        ({}, Identity("bob", "bob@x.test")),
        ({"claims": ["user"]}, Identity("bob")),
        ({"claims": ["email", "name"]}, Identity("", "bob@x.test", name="Bob")),
        ({"claims": ["user", "groups"]}, Identity("bob")),  # groups listed, but no group allowed
        ({"claims": ["user", "groups"], "groups": ["team-*", "qa"]}, Identity("bob", groups=("team-a", "qa"))),
        ({"claims": ["groups"], "groups": ["team-a"]}, Identity("", groups=("team-a",))),
    ],
)
def test_policy_decides_what_may_ever_leave(rules: dict[str, Any], expected: Identity) -> None:
    bob = Identity("bob", "bob@x.test", ("secret-project", "team-a", "hr-investigation", "qa"), "Bob",
                   (("department", "legal"),))
    assert IdentityRules.model_validate(rules).disclose(bob) == expected



def test_the_consent_page_is_never_cached_and_answers_to_the_hub() -> None:
    """It names the visitor and the app's owner: no cache keeps it, and its form posts to the hub's consent path
    (where the answer is recorded), whatever the address it was opened at."""
    spec = WorkspaceSpec(id="ws1", owner="alice", ports={3001: "public"}, identity_ports=frozenset({3001}))
    page = ConsentPage(IdentityRules(), spec, 3001, Identity("bob", "bob@x.test"), "/p", "sealed")
    assert (page.status, page.code, page.headers["Cache-Control"], page.action) == (
        200, "identity-consent", "no-store", "/consent")
    assert page.claims == [("user name", "bob"), ("e-mail address", "bob@x.test")]


@pytest.mark.parametrize(("later", "opens"), [(590, True), (610, False)])
def test_the_ask_an_app_sends_a_visitor_with_lasts_ten_minutes(later: float, opens: bool) -> None:
    """The ``ask`` vouches that the app sent this visitor past its access check: a link kept from long ago (a
    history entry, a log) is not still an app's say-so."""
    spec = WorkspaceSpec(id="ws1", owner="alice", ports={3001: "public"}, identity_ports=frozenset({3001}))
    hosts = Hosts.from_urls(HUB, "localhost")
    url = consent_url(hosts, sessions(), Identity("bob"), spec, 3001, "/p")
    ask = parse_qs(urlsplit(url).query)["ask"][0]
    assert (sessions(clock=later).open_state(ask, hosts.hub) is not None) is opens

@pytest.fixture
async def served(serve: Serve, tmp_path: Path) -> Served:
    policy = tmp_path / "policy.yaml"
    policy.write_text("identity:\n  claims: [user, email, groups]\n  groups: [team-*]\n")
    return await serve(WORKSPACES, policy_file=str(policy))


async def signed_in(make_browser: MakeBrowser, served: Served, user: str, groups: str = "") -> Browser:
    browser = await make_browser(served)
    page = await browser.dev_sign_in(served.hub, user, groups=groups)
    assert page.status == 303
    return browser


async def learned(browser: Browser, served: Served, port: int = 3001, headers: dict[str, str] | None = None
                  ) -> dict[str, list[str]]:
    """What the app on ``port`` learned from one fetch by ``browser`` (not a navigation: never a consent page)."""
    page = await browser.navigate(served.preview("ws1", port, "/x"), headers={**FETCH, **(headers or {})})
    assert page.status == 200, page.text
    seen = seen_headers(page.json())
    return {name: seen[name] for name in IDENTITY_HEADERS if name in seen}


def assertion_claims(seen: dict[str, list[str]], audience: str = APP) -> dict[str, Any]:
    """Read without the keys, but for ``audience`` only: PyJWT skips the audience with the signature unless asked."""
    claims: dict[str, Any] = jwt.decode(seen["x-codehub-assertion"][0], audience=audience,
                                        options={"verify_signature": False, "verify_aud": True})
    return claims


def same_in_assertion(seen: dict[str, list[str]]) -> None:
    """The signed assertion says exactly what the headers say, never more."""
    claims = assertion_claims(seen)
    assert claims["sub"] == seen.get("x-forwarded-user", [""])[0]
    assert claims["email"] == seen.get("x-forwarded-email", [""])[0]
    assert ",".join(claims["groups"]) == seen.get("x-forwarded-groups", [""])[0]
    assert claims["name"] == ""
    assert claims["attrs"] == {}


async def opt_in(owner: Browser, port: int = 3001, on: bool = True) -> Page:
    page = await owner.fetch("PUT", f"{HUB}/api/v1/workspaces/ws1/ports/{port}", json_body={"identity": on},
                             headers={"Origin": HUB, "Accept": "application/json"})
    assert page.status == 200, page.text
    return page


async def asked_by_the_app(served: Served, make_browser: MakeBrowser) -> tuple[Browser, str]:
    """bob, signed in on the app of alice's that opted in to know its visitors, and the consent page it sent him
    to."""
    await opt_in(await signed_in(make_browser, served, "alice"))
    bob = await signed_in(make_browser, served, "bob")
    bob.add_cookie(APP, "codehub_session", served.gateway.auth.sessions.issue(Identity("bob"), APP[7:]))
    asked = await bob.navigate_until(served.preview("ws1", 3001, "/x"), lambda url: url.startswith(f"{HUB}/consent?"),
                                     headers=NAVIGATE)
    return bob, asked


async def answer(browser: Browser, choice: str, origin: str = HUB, port: int = 3001) -> Page:
    """The consent page's form, as the hub's page posts it, with the ``ask`` the app's redirect gave."""
    asked = await browser.navigate_until(f"http://{port}-ws1.localhost:8080/x?y=1",
                                         lambda url: url.startswith(f"{HUB}/consent?"), headers=NAVIGATE)
    ask = parse_qs(urlsplit(asked).query)["ask"][0]
    return await browser.fetch("POST", f"{HUB}/consent", data={"workspace": "ws1", "port": str(port),
                                                              "choice": choice, "next": "/x?y=1", "ask": ask},
                               headers={"Origin": origin, "Accept": "text/html"})


async def test_the_owner_is_known_to_every_port_as_far_as_policy_allows(served: Served,
                                                                        make_browser: MakeBrowser) -> None:
    alice = await signed_in(make_browser, served, "alice", "secret-project,team-a")
    assert (await alice.navigate(served.preview("ws1", 3000, "/"))).status == 200  # signs in there
    seen = await learned(alice, served, 3000)
    assert seen["x-forwarded-user"] == ["alice"]
    assert seen["x-forwarded-groups"] == ["team-a"], "a group the policy does not list never leaves"
    claims = assertion_claims(seen, "http://3000-ws1.localhost:8080")
    assert claims["groups"] == ["team-a"]
    assert "secret-project" not in str(seen)


async def test_naming_someone_a_member_does_not_tell_the_apps_who_they_are(served: Served,
                                                                          make_browser: MakeBrowser) -> None:
    """The owner names the members alone, groups too: a collaborator (carol by name, bob through ``group:team-b``)
    is asked like any visitor on an opted-in port, and a port not opted in learns nothing of them."""
    alice = await signed_in(make_browser, served, "alice")
    made = await alice.fetch("PUT", f"{HUB}/api/v1/workspaces/ws1/collaborators",
                             json_body={"collaborators": ["carol", "group:team-b"]},
                             headers={"Origin": HUB, "Accept": "application/json"})
    assert made.status == 200, made.text
    await opt_in(alice)
    for name, groups in (("carol", ""), ("bob", "team-b")):
        member = await signed_in(make_browser, served, name, groups)
        for port in (3000, 3001):
            host = f"http://{port}-ws1.localhost:8080"
            member.add_cookie(host, "codehub_session", served.gateway.auth.sessions.issue(
                Identity(name, f"{name}@example.com", tuple(filter(None, [groups]))), host[7:]))
            assert await learned(member, served, port) == {}, (name, port)
        asked = await member.navigate(served.preview("ws1", 3001, "/x"), headers=NAVIGATE)
        assert asked.url.startswith(f"{HUB}/consent?"), name


async def test_a_port_not_opted_in_learns_nothing_of_visitors(served: Served, make_browser: MakeBrowser) -> None:
    bob = await signed_in(make_browser, served, "bob", "team-b")
    session = served.gateway.auth.sessions.issue(Identity("bob", "bob@example.com", ("team-b",)), APP[7:])
    bob.add_cookie(APP, "codehub_session", session)
    assert await learned(bob, served) == {}
    page = await bob.navigate(served.preview("ws1", 3001, "/x"), headers=NAVIGATE)
    assert page.status == 200
    assert "identity-consent" not in page.text


async def test_a_visitor_who_is_not_signed_in_is_served_by_an_opted_in_app_knowing_nobody(
        served: Served, make_browser: MakeBrowser) -> None:
    """There is nobody to ask, nor to tell about: a navigation and a fetch of the public app both go through."""
    await opt_in(await signed_in(make_browser, served, "alice"))
    anonymous = await make_browser(served)
    page = await anonymous.navigate(served.preview("ws1", 3001, "/x"), headers=NAVIGATE)
    assert page.status == 200, page.text
    assert page.json()["path"] == "/x"
    assert await learned(anonymous, served) == {}


async def test_visitors_consent_once_per_app_and_can_withdraw(served: Served, make_browser: MakeBrowser) -> None:
    alice = await signed_in(make_browser, served, "alice")
    await opt_in(alice)
    bob = await signed_in(make_browser, served, "bob", "team-b,secret-project")
    bob.add_cookie(APP, "codehub_session", served.gateway.auth.sessions.issue(
        Identity("bob", "bob@example.com", ("team-b", "secret-project")), APP[7:]))

    # Before an answer: a navigation is sent to the page, on the hub; nothing reaches the app.
    page = await bob.navigate(served.preview("ws1", 3001, "/x?y=1"), headers=NAVIGATE)
    assert page.status == 200
    assert page.url.startswith(f"{HUB}/consent?"), "never on the app's origin, where the owner's scripts run"
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    assert "Share who you are with this app?" in page.text
    assert '<input type="hidden" name="next" value="/x?y=1">' in page.text, "an answer leads back where bob was going"
    for shown in ("bob", "bob@example.com", "team-b", "alice", "3001"):
        assert shown in page.text
    assert "secret-project" not in page.text
    assert page.headers["Cache-Control"] == "no-store"
    # ... and anything else goes through knowing nobody.
    assert await learned(bob, served) == {}

    # No other origin can answer for the visitor: not another app, and not the app itself, whose owner's
    # scripts run there (they posted the form with the visitor's cookie when it was served on the app's origin).
    for origin in ("http://3000-ws1.localhost:8080", APP):
        forged = await answer(bob, "share", origin=origin)
        assert forged.status == 403
    on_the_app = await bob.fetch("POST", APP + "/_codehub/consent", data={"choice": "share", "next": "/"},
                                 headers={"Origin": APP, "Accept": "text/html"})
    assert on_the_app.status == 404
    assert not served.gateway.auth.store.consents

    shared = await answer(bob, "share")
    assert shared.status == 303
    assert shared.headers["Location"] == APP + "/x?y=1"
    seen = await learned(bob, served)
    assert seen["x-forwarded-user"] == ["bob"]
    assert seen["x-forwarded-email"] == ["bob@example.com"]
    assert seen["x-forwarded-groups"] == ["team-b"]
    same_in_assertion(seen)
    view = (await alice.fetch("GET", f"{HUB}/api/v1/workspaces/ws1", headers={"Accept": "application/json"})).json()
    assert [(p["port"], p["identity"], p["consented"]) for p in view["ports"]] == [(3000, False, 0), (3001, True, 1)]

    # Withdrawn on the hub: the app learns nothing from the next request on, and asks again.
    mine = (await bob.fetch("GET", f"{HUB}/api/v1/consents", headers={"Accept": "application/json"})).json()
    [consent] = mine["consents"]
    assert (consent["workspace"], consent["port"], consent["share"]) == ("ws1", 3001, True)
    assert consent["claims"] == ["user", "email", "groups"]
    other = await signed_in(make_browser, served, "carol")
    refused = await other.fetch("DELETE", f"{HUB}/api/v1/consents/{consent['id']}",
                                headers={"Origin": HUB, "Accept": "application/json"})
    assert refused.status == 404, "nobody withdraws another person's answer"
    withdrawn = await bob.fetch("DELETE", f"{HUB}/api/v1/consents/{consent['id']}",
                                headers={"Origin": HUB, "Accept": "application/json"})
    assert withdrawn.status == 200
    assert await learned(bob, served) == {}
    again = await bob.navigate(served.preview("ws1", 3001, "/x"), headers=NAVIGATE)
    assert "Share who you are with this app?" in again.text

    declined = await answer(bob, "decline")
    assert declined.status == 303
    assert await learned(bob, served) == {}
    page = await bob.navigate(served.preview("ws1", 3001, "/x"), headers=NAVIGATE)
    assert "Share who you are" not in page.text, "a declined visitor is not asked again"
    assert page.json()["path"] == "/x"


async def test_scripts_follow_the_same_rule(served: Served, make_browser: MakeBrowser) -> None:
    alice = await signed_in(make_browser, served, "alice")
    await opt_in(alice)
    bob = await signed_in(make_browser, served, "bob")
    token = (await bob.fetch("POST", f"{HUB}/api/v1/tokens", json_body={"name": "ci"},
                             headers={"Origin": HUB, "Accept": "application/json"})).json()["token"]
    script = await make_browser(served)
    assert await learned(script, served, headers={"Authorization": f"Bearer {token}", "Accept": "text/html"}) == {}
    bob.add_cookie(APP, "codehub_session", served.gateway.auth.sessions.issue(Identity("bob", "bob@example.com"),
                                                                              APP[7:]))
    assert (await answer(bob, "share")).status == 303
    seen = await learned(script, served, headers={"Authorization": f"Bearer {token}"})
    assert seen["x-forwarded-user"] == ["bob"]
    same_in_assertion(seen)


async def test_opting_out_stops_disclosure_at_once(served: Served, make_browser: MakeBrowser) -> None:
    alice = await signed_in(make_browser, served, "alice")
    await opt_in(alice)
    bob = await signed_in(make_browser, served, "bob")
    bob.add_cookie(APP, "codehub_session", served.gateway.auth.sessions.issue(Identity("bob"), APP[7:]))
    assert (await answer(bob, "share")).status == 303
    assert (await learned(bob, served))["x-forwarded-user"] == ["bob"]
    await opt_in(alice, on=False)
    assert await learned(bob, served) == {}
    visitor = await signed_in(make_browser, served, "bob")
    refused = await visitor.fetch("PUT", f"{HUB}/api/v1/workspaces/ws1/ports/3001", json_body={"identity": True},
                                  headers={"Origin": HUB, "Accept": "application/json"})
    assert refused.status == 404, "only the owner opts a port in"


async def test_the_owner_is_never_asked(served: Served, make_browser: MakeBrowser) -> None:
    alice = await signed_in(make_browser, served, "alice")
    await opt_in(alice)
    alice.add_cookie(APP, "codehub_session", served.gateway.auth.sessions.issue(Identity("alice"), APP[7:]))
    page = await alice.navigate(served.preview("ws1", 3001, "/x"), headers=NAVIGATE)
    assert page.url == served.preview("ws1", 3001, "/x")
    assert seen_headers(page.json())["x-forwarded-user"] == ["alice"]


async def test_a_framed_app_is_not_asked_and_learns_nothing(served: Served, make_browser: MakeBrowser) -> None:
    """The hub is never framed, so a preview embedded in a code review goes on knowing nobody until its visitor
    answers with the app open on its own."""
    alice = await signed_in(make_browser, served, "alice")
    await opt_in(alice)
    bob = await signed_in(make_browser, served, "bob", "team-b")
    bob.add_cookie(APP, "codehub_session", served.gateway.auth.sessions.issue(Identity("bob", "bob@example.com"),
                                                                              APP[7:]))
    framed = await bob.navigate(served.preview("ws1", 3001, "/x"), headers={**NAVIGATE, "Sec-Fetch-Dest": "iframe"})
    assert framed.url == served.preview("ws1", 3001, "/x")
    assert not {name: value for name, value in seen_headers(framed.json()).items() if name in IDENTITY_HEADERS}


async def test_the_consent_page_is_only_for_visitors_the_app_sent(served: Served, make_browser: MakeBrowser) -> None:
    """Asked for by hand, the hub's consent page would tell anyone signed in who owns a workspace and which of its
    ports ask, and let them add to its count of visitors who agreed: it answers only with the ``ask`` the app's
    redirect carries, made for this visitor, workspace and port."""
    alice = await signed_in(make_browser, served, "alice")
    await opt_in(alice)
    carol = await signed_in(make_browser, served, "eve")
    bare = await carol.fetch("GET", f"{HUB}/consent?workspace=ws1&port=3001&next=/", headers={"Accept": "text/html"})
    assert bare.status == 404
    assert "alice" not in bare.text
    forged = await carol.fetch("POST", f"{HUB}/consent", data={"workspace": "ws1", "port": "3001", "choice": "share"},
                               headers={"Origin": HUB, "Accept": "text/html"})
    assert forged.status == 404
    assert not served.gateway.auth.store.consents
    bob = await signed_in(make_browser, served, "bob")
    bob.add_cookie(APP, "codehub_session", served.gateway.auth.sessions.issue(Identity("bob"), APP[7:]))
    asked = await bob.navigate(served.preview("ws1", 3001, "/x"), headers=NAVIGATE)
    assert asked.url.startswith(f"{HUB}/consent?")
    stolen = await carol.fetch("GET", asked.url, headers={"Accept": "text/html"})
    assert stolen.status == 404, "made for bob"
    other_port = asked.url.replace("port=3001", "port=3000")
    assert (await bob.fetch("GET", other_port, headers={"Accept": "text/html"})).status == 404


@pytest.mark.parametrize(("content_type", "body"), [
    ("application/x-www-form-urlencoded; charset=bogus", b"workspace=ws1&port=3001&choice=share"),
    ("application/x-www-form-urlencoded", b"workspace=ws1&port=3001&choice=share&next=\xff\xfe"),
    ("multipart/form-data", b"--x\r\n"),
    ("multipart/form-data; boundary=x", b"garbage"),
    ("application/x-www-form-urlencoded", b"workspace=ws1&port=%C2%B2&choice=share"),
    ("application/x-www-form-urlencoded", b"workspace=ws1&port=" + b"1" * 5000 + b"&choice=share"),
], ids=["charset", "not-utf8", "no-boundary", "bad-multipart", "superscript-port", "huge-port"])
async def test_a_consent_form_no_browser_sends_is_a_400(served: Served, make_browser: MakeBrowser,
                                                        content_type: str, body: bytes) -> None:
    bob = await signed_in(make_browser, served, "bob")
    answered = await bob.fetch("POST", f"{HUB}/consent", data=body,
                               headers={"Origin": HUB, "Content-Type": content_type, "Accept": "application/json"})
    assert answered.status in (400, 404), answered.text
    odd = await bob.fetch("GET", f"{HUB}/consent?workspace=ws1&port=%C2%B2", headers={"Accept": "application/json"})
    assert odd.status in (400, 404), odd.text
    dev = await bob.fetch("POST", f"{HUB}/auth/dev", data=body,
                          headers={"Origin": HUB, "Content-Type": content_type, "Accept": "application/json"})
    assert dev.status == 400, dev.text


async def test_the_consent_page_names_each_claim_it_would_send(serve: Serve, tmp_path: Path,
                                                               make_browser: MakeBrowser) -> None:
    """The visitor reads, claim by claim, what the app would learn (groups as the policy lets them out); what they
    agree to is what the app then receives, in the headers and the assertion alike."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("identity:\n  claims: [user, email, name, groups]\n  groups: [team-*]\n")
    served = await serve(WORKSPACES, policy_file=str(policy))
    alice = await signed_in(make_browser, served, "alice")
    await opt_in(alice)
    bob = await signed_in(make_browser, served, "bob", "team-a,secret-project,team-b")  # named bob, too
    bob.add_cookie(APP, "codehub_session", served.gateway.auth.sessions.issue(
        Identity("bob", "bob@example.com", ("team-a", "secret-project", "team-b"), "bob"), APP[7:]))
    page = await bob.navigate(served.preview("ws1", 3001, "/x"), headers=NAVIGATE)
    assert page.url.startswith(f"{HUB}/consent?")
    assert "<h1>Share who you are with this app?</h1>" in page.text
    listed = page.text.partition('<dl id="claims">')[2].partition("</dl>")[0]
    assert re.findall("<dt>(.*?)</dt><dd>(.*?)</dd>", listed) == [
        ("user name", "bob"), ("e-mail address", "bob@example.com"), ("name", "bob"), ("groups", "team-a, team-b")]
    assert (await answer(bob, "share")).status == 303
    seen = await learned(bob, served)
    assert seen["x-forwarded-groups"] == ["team-a,team-b"]
    claims = assertion_claims(seen)
    assert (claims["sub"], claims["name"], claims["groups"]) == ("bob", "bob", ["team-a", "team-b"])


async def test_a_script_asking_for_the_consent_page_is_told_what_it_is_in_json(served: Served,
                                                                               make_browser: MakeBrowser) -> None:
    """Not an error, though it comes in the error document every client that is not a browser gets: a 200 that
    says which app asks, and that only a person can answer it."""
    bob, asked = await asked_by_the_app(served, make_browser)
    page = await bob.fetch("GET", asked, headers={"Accept": "application/json"})
    assert page.status == 200
    assert page.headers["Cache-Control"] == "no-store"
    assert page.json() == {"error": {
        "code": "identity-consent", "status": 200,
        "message": "The app on port 3001 of workspace ws1 (owned by alice) asks to receive your identity."}}


async def test_a_token_names_its_holder_to_apps_never_by_its_own_label(serve: Serve, tmp_path: Path,
                                                                        make_browser: MakeBrowser) -> None:
    """An API token's name is a label its holder types ("ci", or anything printable): it is not who they are. An
    app that the policy tells visitors' names, in headers or the signed assertion, must not be told that label as
    the name of the person calling, or anyone could sign as "Alice Example (CEO)" with a token of their own."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("identity:\n  claims: [user, email, name]\n")
    served = await serve(WORKSPACES, policy_file=str(policy))
    alice = await signed_in(make_browser, served, "alice")
    await opt_in(alice)
    bob = await signed_in(make_browser, served, "bob")
    label = "Alice Example (CEO)"
    token = (await bob.fetch("POST", f"{HUB}/api/v1/tokens", json_body={"name": label},
                             headers={"Origin": HUB, "Accept": "application/json"})).json()["token"]
    bob.add_cookie(APP, "codehub_session", served.gateway.auth.sessions.issue(Identity("bob", "bob@example.com",
                                                                                       name="bob"), APP[7:]))
    assert (await answer(bob, "share")).status == 303
    script = await make_browser(served)
    seen = await learned(script, served, headers={"Authorization": f"Bearer {token}"})
    assert seen["x-forwarded-user"] == ["bob"]
    assert assertion_claims(seen)["name"] == "", "a token knows no name of its holder's"


async def test_a_websocket_that_told_its_app_who_ends_when_that_consent_is_withdrawn(
        serve: Serve, tmp_path: Path, make_browser: MakeBrowser) -> None:
    """A WebSocket opened once bob said "share" told its app who he is; withdrawn, nothing new tells it, and
    the one open must not go on as him (1008). One opened before he answered, which told it nothing, goes on
    whatever he answers."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("identity:\n  claims: [user, email, groups]\n  groups: [team-*]\n")
    served = await serve(WORKSPACES, policy_file=str(policy), timeouts={"websocket_heartbeat": 0.2})
    alice = await signed_in(make_browser, served, "alice")
    await opt_in(alice)
    bob = await signed_in(make_browser, served, "bob", "team-b")
    bob.add_cookie(APP, "codehub_session", served.gateway.auth.sessions.issue(
        Identity("bob", "bob@example.com", ("team-b",)), APP[7:]))
    url = served.preview("ws1", 3001, "/socket")
    before = await open_socket(bob, url)
    assert (await answer(bob, "share")).status == 303
    told = await open_socket(bob, url)
    assert await all_open(before, told)

    consent = (await bob.fetch("GET", f"{HUB}/api/v1/consents", headers={"Accept": "application/json"})
               ).json()["consents"][0]
    withdrawn = await bob.fetch("DELETE", f"{HUB}/api/v1/consents/{consent['id']}",
                                headers={"Origin": HUB, "Accept": "application/json"})
    assert withdrawn.status == 200
    assert await told.ended_for_policy()
    assert await before.still_open()


async def test_an_owner_who_redeems_a_visitors_handoff_code_learns_nothing_from_the_consent_redirect(
        served: Served, make_browser: MakeBrowser) -> None:
    """The owner's page sends its visitor's browser through the hand-off with a state of the owner's choosing and
    redeems the code from their own machine (README, Limits): an opaque session as the visitor on the owner's own
    host. A navigation with it, to a port that asks visitors for their identity, is sent to the consent page, whose
    ``ask`` was a signed JWT naming the visitor in the clear: their user name, before they answered anything."""
    alice = await signed_in(make_browser, served, "alice")
    await opt_in(alice)
    owner = await make_browser(served)
    owner.add_cookie(APP, "codehub_handoff", "owners-state-chosen-here")
    visitor = await signed_in(make_browser, served, "visiting-bob")
    handoff = await visitor.fetch("GET", f"{HUB}/auth/handoff?target={APP}/&state=owners-state-chosen-here")
    assert handoff.status == 302
    assert (await owner.fetch("GET", handoff.location or "")).status == 303
    asked = await owner.fetch("GET", APP + "/x", headers=NAVIGATE)
    assert asked.status == 302
    assert (asked.location or "").startswith(f"{HUB}/consent?")
    ask = parse_qs(urlsplit(asked.location or "").query)["ask"][0]
    readable = asked.location or ""
    for part in ask.split("."):
        readable += base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)).decode("latin-1")
    assert "visiting-bob" not in readable
    visitor.add_cookie(APP, "codehub_handoff", "visitors-own-state-00000")  # the visitor's own hand-off, and answer
    assert (await visitor.navigate(f"{HUB}/auth/handoff?target={APP}/&state=visitors-own-state-00000")).status == 200
    assert (await answer(visitor, "share")).status == 303
    assert (await learned(visitor, served))["x-forwarded-user"] == ["visiting-bob"]


async def test_a_consent_page_reached_signed_out_sends_to_sign_in_and_its_form_is_a_401(
        served: Served, make_browser: MakeBrowser) -> None:
    """A visitor whose hub cookie is gone (signed out in another tab, or it expired) between the app's redirect and
    the page: the page sends them to sign in and back to it, and its form, posted without a sign-in, records
    nothing for anybody."""
    _, asked = await asked_by_the_app(served, make_browser)
    signed_out = await make_browser(served)
    page = await signed_out.fetch("GET", asked, headers=NAVIGATE)
    assert page.status == 302, page.text
    local = asked.removeprefix(HUB)
    assert parse_qs(urlsplit(page.location or "").query) == {"next": [local]}
    assert (page.location or "").startswith(f"{HUB}/auth/login?")
    ask = parse_qs(urlsplit(asked).query)["ask"][0]
    posted = await signed_out.fetch("POST", f"{HUB}/consent", data={"workspace": "ws1", "port": "3001",
                                                                   "choice": "share", "next": "/", "ask": ask},
                                    headers={"Origin": HUB, "Accept": "application/json"})
    assert posted.status == 401, posted.text
    assert posted.json()["error"]["code"] == "user-unauthenticated"
    assert not served.gateway.auth.store.consents


@pytest.mark.parametrize("choice", ["", "Share", "yes", None])
async def test_a_consent_answer_is_share_or_decline_and_nothing_else(served: Served, make_browser: MakeBrowser,
                                                                     choice: str | None) -> None:
    """Anything but the page's two buttons is a 400 and records no answer: not a decline, which the app would then
    never ask again, nor a share."""
    bob, asked = await asked_by_the_app(served, make_browser)
    form = {"workspace": "ws1", "port": "3001", "next": "/", "ask": parse_qs(urlsplit(asked).query)["ask"][0]}
    if choice is not None:
        form["choice"] = choice
    posted = await bob.fetch("POST", f"{HUB}/consent", data=form, headers={"Origin": HUB, "Accept": "application/json"})
    assert posted.status == 400, posted.text
    assert posted.json()["error"]["code"] == "bad-consent"
    assert not served.gateway.auth.store.consents
    again = await bob.navigate(served.preview("ws1", 3001, "/x"), headers=NAVIGATE)
    assert "Share who you are with this app?" in again.text, "still asked"

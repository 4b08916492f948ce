"""Origins are trust boundaries: what a page on one origin can make a signed-in visitor's browser do to another.

Every preview and every IDE is its own origin, but they all share one *site*, so a browser sends a preview's
``SameSite=Lax`` cookie along on requests that other previews' pages make. A cookie therefore vouches for reads
only: a cookie-authenticated write or WebSocket must come from the request's own origin or one the port's CORS
rule admits. Credentials a page cannot make a browser send (a bearer token, a share token in the URL) are not
affected. The scripted browser here sends cookies by host like a real one; the Chromium scenarios are in
``tests/browser/test_isolation.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from gateway.auth.identity import Identity
from gateway.lifecycle import Phase
from tests.auth.browser import Browser, Page
from tests.auth.conftest import MakeBrowser, Serve, Served, oidc_settings, seen_headers
from tests.peers.idp.fixture import IdP

pytestmark = pytest.mark.timeout(60)

HUB = "http://localhost:8080"
OWN = "http://3000-ws1.localhost:8080"
WORKSPACES: dict[str, dict[str, Any]] = {
    "ws1": {"owner": "alice", "ports": {3000: "private", 3001: "public", 3002: "private"}},
    "evil": {"owner": "mallory", "ports": {6000: "public"}},
}
POLICY = "cors:\n  - ports: [3000]\n    allow_origins: [same-workspace]\n"
FOREIGN = [
    {"Origin": "http://6000-evil.localhost:8080"},  # another owner's public preview, same site
    {"Origin": "http://evil.test"},
    {"Origin": "null"},
    {"Origin": HUB},
    {"Origin": "http://ide-ws1.localhost:8080"},
    {"Origin": "http://3000-ws1.localhost:8080.evil.test"},
    {"Sec-Fetch-Site": "same-site"},
    {"Sec-Fetch-Site": "cross-site"},
]
FOREIGN_IDS = ["other-preview", "other-site", "null", "hub", "ide", "suffix", "no-origin-same-site",
               "no-origin-cross-site"]


@pytest.fixture
async def served(serve: Serve, tmp_path: Path) -> Served:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    return await serve(WORKSPACES, policy_file=str(policy), listen={"ws1": [13337]})


async def visitor(make_browser: MakeBrowser, served: Served, *urls: str, user: str = "alice") -> Browser:
    """A browser signed in as ``user`` that has opened ``urls`` (each host then holds its own session)."""
    browser = await make_browser(served)
    assert (await browser.dev_sign_in(served.hub, user)).status == 303
    for url in urls:
        page = await browser.navigate(url)
        assert page.status == 200, page.text
    return browser


def signed_in_on_public_port(browser: Browser, served: Served) -> None:
    """Public ports need no sign-in, but a visitor may hold a session there (the port was private when they
    came): the app would learn who they are from a request another origin made."""
    token = served.gateway.auth.sessions.issue(Identity("alice"), "3001-ws1.localhost:8080")
    browser.add_cookie(served.preview("ws1", 3001), "codehub_session", token)


async def post(browser: Browser, url: str, headers: dict[str, str]) -> Page:
    return await browser.fetch("POST", url, headers={"Accept": "application/json", **headers}, data=b"x=1")


async def socket(browser: Browser, served: Served, host: str, *headers: tuple[str, str],
                 cookie: bool = True) -> aiohttp.ClientWebSocketResponse:
    sent = [("Host", host), *headers]
    if cookie:
        sent.append(("Cookie", "; ".join(f"{k}={v}" for k, v in browser.cookies_for(host.partition(":")[0]).items())))
    return await browser.http.ws_connect(URL(served.base + "/socket"), headers=CIMultiDict(sent))


async def refused(browser: Browser, served: Served, host: str, *headers: tuple[str, str]) -> int:
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await socket(browser, served, host, *headers)
    return caught.value.status


async def echoed(browser: Browser, served: Served, host: str, *headers: tuple[str, str]) -> str:
    ws = await socket(browser, served, host, *headers)
    try:
        await ws.send_str("hi")
        return await ws.receive_str(timeout=5)
    finally:
        await ws.close()


# --- writes ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", FOREIGN, ids=FOREIGN_IDS)
async def test_a_cookie_does_not_vouch_for_a_write_from_elsewhere(served: Served, make_browser: MakeBrowser,
                                                                  headers: dict[str, str]) -> None:
    browser = await visitor(make_browser, served, served.preview("ws1", 3000))
    signed_in_on_public_port(browser, served)
    for port in (3000, 3001):  # private, and public (the visitor's identity would still reach the app)
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            page = await browser.fetch(method, served.preview("ws1", port, "/write"),
                                       headers={"Accept": "application/json", **headers}, data=b"x=1")
            assert page.status == 403, (port, method, page.text)
            assert page.json()["error"]["code"] == "cross-origin-request"


async def test_a_write_from_its_own_origin_or_an_admitted_one_goes_through(served: Served,
                                                                           make_browser: MakeBrowser) -> None:
    browser = await visitor(make_browser, served, served.preview("ws1", 3000), served.preview("ws1", 3002))
    own = await post(browser, served.preview("ws1", 3000, "/write"), {"Origin": OWN, "Sec-Fetch-Site": "same-origin"})
    assert own.status == 200, own.text
    assert seen_headers(own.json())["x-forwarded-user"] == ["alice"]
    # Port 3000's CORS rule admits the workspace's other ports.
    admitted = await post(browser, served.preview("ws1", 3000, "/write"), {"Origin": "http://3002-ws1.localhost:8080"})
    assert admitted.status == 200, admitted.text
    # ... but port 3002 has no rule: 3000 may not write to it.
    assert (await post(browser, served.preview("ws1", 3002, "/write"), {"Origin": OWN})).status == 403
    # A client that is no browser (no Origin, no Fetch Metadata) still can.
    assert (await post(browser, served.preview("ws1", 3000, "/write"), {})).status == 200
    # Reads stay readable from anywhere the browser sends them (the app decides what a GET does).
    page = await browser.fetch("GET", served.preview("ws1", 3000, "/read"), headers={"Origin": "http://evil.test"})
    assert page.status == 200


async def test_a_rule_without_credentials_admits_no_cookie(serve: Serve, tmp_path: Path,
                                                           make_browser: MakeBrowser) -> None:
    """Other origins may call such a port without credentials; with the visitor's cookie they may not."""
    policy = tmp_path / "open.yaml"
    policy.write_text("cors:\n  - ports: [3000]\n    allow_origins: ['*']\n    allow_credentials: false\n")
    served = await serve(WORKSPACES, policy_file=str(policy))
    browser = await visitor(make_browser, served, served.preview("ws1", 3000))
    page = await post(browser, served.preview("ws1", 3000, "/write"), {"Origin": "http://3002-ws1.localhost:8080"})
    assert page.status == 403
    assert page.json()["error"]["code"] == "cross-origin-request"
    assert await refused(browser, served, "3000-ws1.localhost:8080", ("Origin", "http://evil.test")) == 403
    assert (await post(browser, served.preview("ws1", 3000, "/write"), {"Origin": OWN})).status == 200


async def test_credentials_a_page_cannot_make_a_browser_send_are_not_affected(served: Served,
                                                                             make_browser: MakeBrowser) -> None:
    owner = await visitor(make_browser, served)
    token = (await owner.fetch("POST", HUB + "/api/v1/tokens", headers={"Origin": HUB, "Accept": "application/json"},
                               json_body={"name": "ci"})).json()["token"]
    script = await make_browser(served)
    page = await post(script, served.preview("ws1", 3000, "/write"),
                      {"Origin": "http://evil.test", "Authorization": f"Bearer {token}"})
    assert page.status == 200, page.text
    share = (await owner.fetch("POST", HUB + "/api/v1/workspaces/ws1/shares", json_body={"port": 3000},
                               headers={"Origin": HUB, "Accept": "application/json"})).json()
    page = await post(script, served.preview("ws1", 3000, f"/write?codehub_share={share['token']}"),
                      {"Origin": "http://evil.test"})
    assert page.status == 200, page.text
    # Anonymous visitors of a public port carry nothing to abuse.
    assert (await post(script, served.preview("ws1", 3001, "/write"), {"Origin": "http://evil.test"})).status == 200


async def test_a_share_cookie_does_not_vouch_for_a_write_from_elsewhere(served: Served,
                                                                        make_browser: MakeBrowser) -> None:
    owner = await visitor(make_browser, served)
    share = (await owner.fetch("POST", HUB + "/api/v1/workspaces/ws1/shares", json_body={"port": 3000},
                               headers={"Origin": HUB, "Accept": "application/json"})).json()
    holder = await make_browser(served)
    assert (await holder.navigate(served.preview("ws1", 3000, f"/?codehub_share={share['token']}"))).status == 200
    page = await post(holder, served.preview("ws1", 3000, "/write"), {"Origin": "http://6000-evil.localhost:8080"})
    assert page.status == 403
    assert page.json()["error"]["code"] == "cross-origin-request"
    assert (await post(holder, served.preview("ws1", 3000, "/write"), {"Origin": OWN})).status == 200


# --- WebSockets --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "origins",
    [("http://6000-evil.localhost:8080",), ("http://evil.test",), ("null",), (HUB,), (), (OWN, OWN),
     (OWN, "http://evil.test")],
    ids=["other-preview", "other-site", "null", "hub", "none", "twice", "two-different"],
)
async def test_a_cookie_does_not_open_a_websocket_from_elsewhere(served: Served, make_browser: MakeBrowser,
                                                                 origins: tuple[str, ...]) -> None:
    browser = await visitor(make_browser, served, served.preview("ws1", 3000))
    signed_in_on_public_port(browser, served)
    for host in ("3000-ws1.localhost:8080", "3001-ws1.localhost:8080"):
        assert await refused(browser, served, host, *(("Origin", origin) for origin in origins)) == 403


async def test_a_websocket_from_its_own_origin_or_an_admitted_one_is_relayed(served: Served,
                                                                             make_browser: MakeBrowser) -> None:
    browser = await visitor(make_browser, served, served.preview("ws1", 3000))
    assert await echoed(browser, served, "3000-ws1.localhost:8080", ("Origin", OWN)) == "echo:hi"
    assert await echoed(browser, served, "3000-ws1.localhost:8080",
                        ("Origin", "http://3002-ws1.localhost:8080")) == "echo:hi"
    # Without a cookie nothing vouches, nothing is checked: a public port's anonymous WebSocket from anywhere.
    ws = await socket(browser, served, "3001-ws1.localhost:8080", ("Origin", "http://evil.test"), cookie=False)
    await ws.close()


# --- the IDE -----------------------------------------------------------------------------------------------------


async def test_the_ide_takes_writes_from_its_own_origin_only(served: Served, make_browser: MakeBrowser) -> None:
    ide = served.ide("ws1")
    browser = await visitor(make_browser, served, ide)
    for headers in [*FOREIGN, {"Origin": OWN}]:
        if headers.get("Origin") == "http://ide-ws1.localhost:8080":
            continue
        page = await post(browser, served.ide("ws1", "/write"), headers)
        assert page.status == 403, (headers, page.text)
    assert (await post(browser, served.ide("ws1", "/write"), {"Origin": "http://ide-ws1.localhost:8080"})).status == 200


async def test_a_gateway_token_never_reaches_the_ide(served: Served, make_browser: MakeBrowser) -> None:
    owner = await visitor(make_browser, served, served.ide("ws1"))
    share = (await owner.fetch("POST", HUB + "/api/v1/workspaces/ws1/shares", json_body={"port": 3000},
                               headers={"Origin": HUB, "Accept": "application/json"})).json()
    page = await owner.fetch("GET", served.ide("ws1", "/x"), headers={"Authorization": f"Bearer {share['token']}"})
    assert page.status == 200, page.text
    assert "authorization" not in seen_headers(page.json())
    assert share["token"] not in page.text


async def test_the_hub_origin_serves_nothing_of_a_workspace(served: Served, make_browser: MakeBrowser) -> None:
    browser = await visitor(make_browser, served)
    for path in ("/w/ws1/", "/w/ws1/index.html", "/w/ws1", "/w/ws1/?folder=/x"):
        page = await browser.fetch("GET", HUB + path, headers={"Accept": "text/html"})
        assert page.status == 308, path
        assert URL(page.location or "").host == "ide-ws1.localhost"
        assert page.text == ""


# --- identity values ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "form",
    [{"user": "eve", "email": "eve@x.test\r\nX-Forwarded-User: alice"}, {"user": "eve", "groups": "ops\nadmins"},
     {"user": "eve", "groups": "a\x00b"}, {"user": "eve\u2028x"}, {"user": "eve", "email": "e\x1b[31m@x.test"}],
    ids=["crlf-email", "lf-group", "nul-group", "line-separator-name", "escape-email"],
)
async def test_dev_sign_in_refuses_control_characters(served: Served, make_browser: MakeBrowser,
                                                      form: dict[str, str]) -> None:
    browser = await make_browser(served)
    page = await browser.fetch("POST", HUB + "/auth/dev", headers={"Origin": HUB, "Accept": "text/html"},
                               data={"next": "/", **form})
    assert page.status == 400
    assert "control characters" in page.text or "without spaces" in page.text
    assert not [cookie for cookie in browser.jar if cookie.name == "codehub_session"]


async def test_an_idp_identity_with_a_line_break_is_refused(serve: Serve, idp: IdP, gateway_port: int,
                                                            make_browser: MakeBrowser) -> None:
    """The IdP's groups for this login are ``ops\\r\\nX-Forwarded-User: alice`` (see tests/peers/idp)."""
    served = await serve(WORKSPACES, port=gateway_port, **oidc_settings(idp, gateway_port))
    browser = await make_browser(served, login="eve+ops\r\nX-Forwarded-User: alice", idp=idp)
    page = await browser.navigate(served.preview("ws1", 3001))  # a public port: only its sign-in is asked
    assert page.status == 200
    page = await browser.navigate(served.hub + "/auth/login?next=/")
    assert page.status == 401, page.text
    assert "sign-in-failed" in page.text
    assert "control characters" in page.text
    assert not [cookie for cookie in browser.jar if cookie.name == "codehub_session"]


async def test_a_head_with_a_line_break_is_never_written(served: Served, make_browser: MakeBrowser) -> None:
    """A session from before sign-in checked names (or any other source of a line break) cannot smuggle: the
    gateway refuses to write the head, in both lanes."""
    forged = served.gateway.auth.sessions.issue(Identity("alice", "alice@x.test\r\nX-Forwarded-User: root"),
                                                "3001-ws1.localhost:8080")
    browser = await make_browser(served)
    browser.add_cookie(served.preview("ws1", 3001), "codehub_session", forged)
    for method in ("GET", "POST"):  # the fast lane and aiohttp's
        page = await browser.fetch(method, served.preview("ws1", 3001, "/"), headers={"Accept": "application/json",
                                                                                     "Origin": "http://3001-ws1.localhost:8080"})
        assert page.status == 502, page.text
        assert page.json()["error"]["code"] == "unsafe-header"


async def test_names_are_escaped_in_the_policy_log(served: Served, make_browser: MakeBrowser,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    browser = await make_browser(served)
    token = served.gateway.auth.sessions.issue(Identity("eve\x1b[2J\x1b]0;pwned\x07"), "3000-ws1.localhost:8080")
    browser.add_cookie(served.preview("ws1", 3000), "codehub_session", token)
    with caplog.at_level(logging.INFO, logger="codehub.policy"):
        page = await browser.fetch("GET", served.preview("ws1", 3000), headers={"Accept": "application/json"})
    assert page.status == 403
    lines = [record.getMessage() for record in caplog.records if record.name == "codehub.policy"]
    assert lines
    assert not any("\x1b" in line or "\x07" in line for line in lines), lines
    assert any("eve\\u001b[2J" in line for line in lines), lines


# --- found by attacking the fix (issue 11) -----------------------------------------------------------------------


async def test_a_passthru_preflight_never_reaches_the_ide_port_or_a_denied_port(serve: Serve, tmp_path: Path,
                                                                                make_browser: MakeBrowser) -> None:
    """A passthru rule lets the app answer preflights, which carry no credentials; that must not open ports the
    policy shuts for everyone: the IDE port on a preview host (its only address is ``ide-{workspace}``) and
    ``ports.denied``. Anyone on the internet could otherwise send OPTIONS to code-server through a preview host."""
    policy = tmp_path / "passthru.yaml"
    policy.write_text("ports:\n  denied: [3002]\ncors:\n  - mode: passthru\n")
    served = await serve(WORKSPACES, policy_file=str(policy), listen={"ws1": [13337]})
    anyone = await make_browser(served)
    preflight = {"Origin": "http://evil.test", "Access-Control-Request-Method": "PUT", "Accept": "application/json"}
    for port in (13337, 3002):
        page = await anyone.fetch("OPTIONS", served.preview("ws1", port, "/x"), headers=preflight)
        assert page.status == 403, (port, page.text)
        assert page.json()["error"]["code"] == "port-denied"
    # The app still answers the preflights of its shareable ports itself.
    page = await anyone.fetch("OPTIONS", served.preview("ws1", 3000, "/x"), headers=preflight)
    assert page.status == 200, page.text
    assert page.json()["method"] == "OPTIONS"


async def test_a_second_authorization_header_does_not_carry_a_gateway_token_upstream(served: Served,
                                                                                     make_browser: MakeBrowser) -> None:
    """Only the first ``Authorization`` was read, so a gateway token in a second one was neither consumed nor
    stripped and reached the workspace. The header is a singleton: two are a 400, in both lanes (GET and POST)."""
    owner = await visitor(make_browser, served, served.preview("ws1", 3000))
    token = (await owner.fetch("POST", HUB + "/api/v1/tokens", headers={"Origin": HUB, "Accept": "application/json"},
                               json_body={"name": "ci"})).json()["token"]
    for method in ("GET", "POST"):
        page = await owner.fetch(method, served.preview("ws1", 3000, "/x"), headers=CIMultiDict(
            [("Accept", "application/json"), ("Origin", OWN), ("Authorization", "Basic YTpi"),
             ("Authorization", f"Bearer {token}")]))
        assert token not in page.text, method
        assert page.status == 400, (method, page.text)
        assert page.json()["error"]["code"] == "bad-authorization"


async def test_an_anonymous_passthru_preflight_does_not_wake_a_workspace(serve: Serve, tmp_path: Path,
                                                                         make_browser: MakeBrowser) -> None:
    """Who may wake what is a policy decision: a preflight carries no credentials, so it may wake only what an
    anonymous visitor may (here nothing: the port is private and only members wake the workspace)."""
    policy = tmp_path / "passthru.yaml"
    policy.write_text("wake:\n  who: owner-and-collaborators\ncors:\n  - mode: passthru\n")
    served = await serve(WORKSPACES, policy_file=str(policy))
    await served.gateway.runtime.stop("ws1")
    anyone = await make_browser(served)
    for port, status in ((3000, 401), (3001, 403)):  # private; public, but anonymous visitors do not wake it
        page = await anyone.fetch("OPTIONS", served.preview("ws1", port, "/x"), headers={
            "Origin": "http://evil.test", "Access-Control-Request-Method": "PUT", "Accept": "application/json"})
        assert page.status == status, (port, page.text)
    state = served.gateway.runtime.get("ws1")
    assert state is not None
    assert state.phase is Phase.WARM


@pytest.mark.parametrize("identity", [Identity("eve\ud800"), Identity("eve", "e\udc0a@x.test"),
                                      Identity("eve", groups=("ops\udfff",)), Identity("eve", name="\udc0d")],
                         ids=["name", "email", "group", "display-name"])
def test_identity_values_with_lone_surrogates_are_refused_at_sign_in(identity: Identity) -> None:
    """A JSON claim can hold a lone surrogate (``"\\ud800"``); no header can carry it, so sign-in refuses it like a
    control character instead of every later request failing with a 500."""
    assert identity.unsendable() is not None


async def test_a_head_that_cannot_be_encoded_is_refused_like_a_line_break(served: Served,
                                                                          make_browser: MakeBrowser) -> None:
    forged = served.gateway.auth.sessions.issue(Identity("alice", "a\udc0d\udc0a@x.test"), "3001-ws1.localhost:8080")
    browser = await make_browser(served)
    browser.add_cookie(served.preview("ws1", 3001), "codehub_session", forged)
    for method in ("GET", "POST"):  # the fast lane and aiohttp's
        page = await browser.fetch(method, served.preview("ws1", 3001, "/"), headers={
            "Accept": "application/json", "Origin": "http://3001-ws1.localhost:8080"})
        assert page.status == 502, page.text
        assert page.json()["error"]["code"] == "unsafe-header"


async def test_the_ide_origin_serves_no_workspace_port(served: Served, make_browser: MakeBrowser) -> None:
    """code-server serves any workspace port at ``/proxy/{port}/`` and ``/absproxy/{port}/`` (case-blind) on its own
    origin: a page a dev server shows (a reviewed branch's HTML, say) would run where the IDE's terminal
    WebSocket is same-origin. Ports have their own origins; on the IDE's, those paths never reach code-server."""
    owner = await visitor(make_browser, served, served.ide("ws1"))
    for path in ("/proxy/3000/", "/PROXY/3000/x", "/absproxy/3000/x?y=1", "/proxy/3000"):
        page = await owner.fetch("GET", served.ide("ws1", path), headers={"Accept": "application/json"})
        assert page.status == 404, (path, page.text)
        assert page.json()["error"]["code"] == "ide-proxy-off"
        assert "3000-ws1" in page.json()["error"]["message"] or "{port}-ws1" in page.json()["error"]["message"]
    assert (await owner.fetch("GET", served.ide("ws1", "/proxyish"))).status == 200


async def test_an_idp_group_with_a_comma_is_refused(serve: Serve, idp: IdP, gateway_port: int,
                                                    make_browser: MakeBrowser) -> None:
    """``X-Forwarded-Groups`` joins groups with commas, so an IdP group named ``ops,admins`` would reach every app
    as two groups, ``ops`` and ``admins``. The IdP's groups for this login are ``["ops,admins"]``."""
    served = await serve(WORKSPACES, port=gateway_port, **oidc_settings(idp, gateway_port))
    browser = await make_browser(served, login="eve+ops,admins", idp=idp)
    page = await browser.navigate(served.hub + "/auth/login?next=/")
    assert page.status == 401, page.text
    assert "sign-in-failed" in page.text
    assert "comma" in page.text
    assert not [cookie for cookie in browser.jar if cookie.name == "codehub_session"]

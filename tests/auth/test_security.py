"""The security rules of DESIGN.md, each one a test against a running gateway (dev sign-in; no IdP needed)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import html
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urljoin, urlsplit

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.auth.identity import Identity
from gateway.auth.sessions import HAND_OFFS_PER_MINUTE, SIGN_INS_PER_HOUR, Ended, SignIn
from gateway.config import ConfigError, load_config
from gateway.edge.routing import local_path
from gateway.lifecycle import Phase
from gateway.proxy.wsrelay import POLICY_VIOLATION
from tests.auth.browser import Browser, Page
from tests.auth.conftest import MakeBrowser, Serve, Served, seen_headers
from tests.conftest import MakeUpstream

pytestmark = pytest.mark.timeout(60)

HUB = "http://localhost:8080"
WORKSPACES: dict[str, dict[str, Any]] = {
    "ws1": {"owner": "alice", "ports": {3000: "private", 3001: "public"}},
    "ws2": {"owner": "alice", "ports": {4000: "private"}},
}
EVIL_NEXT = ["//evil.test", "//evil.test/path", "/\\evil.test", "\\\\evil.test", "\\/evil.test", "https://evil.test",
             "http:evil.test", "%2F%2Fevil.test", "/%09/evil.test", "/\t/evil.test", "%2F%5Cevil.test",
             "https:%2F%2Fevil.test", "javascript:alert(1)", " //evil.test", "/\r\nLocation: http://evil.test"]


@pytest.fixture
async def served(serve: Serve) -> Served:
    return await serve(WORKSPACES, listen={"ws1": [13337]})


async def signed_in(make_browser: MakeBrowser, served: Served, user: str = "alice") -> Browser:
    browser = await make_browser(served)
    page = await browser.dev_sign_in(served.hub, user)
    assert page.status == 303, page.text
    return browser


async def api(browser: Browser, method: str, path: str, body: Any = None, *, origin: str | None = HUB,
              headers: dict[str, str] | None = None) -> Page:
    sent = {"Accept": "application/json", **({"Origin": origin} if origin else {}), **(headers or {})}
    return await browser.fetch(method, HUB + path, headers=sent, json_body=body)


def attributes(set_cookie: str) -> dict[str, str]:
    out = {}
    for part in set_cookie.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        out[key.lower()] = value
    return out


def assert_same_host(location: str | None, origin: str) -> None:
    assert location is not None
    assert location.startswith("/"), location
    assert not location.startswith(("//", "/\\")), location
    assert not any(ch in location for ch in "\\\r\n\t"), location
    assert urlsplit(urljoin(origin + "/a/b", location)).netloc == urlsplit(origin).netloc


# --- cookies -----------------------------------------------------------------------------------------------------


async def test_cookies_are_host_only_httponly_samesite(served: Served, make_browser: MakeBrowser) -> None:
    browser = await signed_in(make_browser, served)
    page = await browser.navigate(served.preview("ws1", 3000, "/"))
    assert page.status == 200
    ours = [cookie for cookie in browser.jar if cookie.name.startswith("codehub_")]
    assert {(c.name, c.host) for c in ours} >= {("codehub_session", "localhost"),
                                                ("codehub_session", "3000-ws1.localhost")}
    for cookie in ours:
        attrs = attributes(cookie.raw)
        assert "domain" not in attrs, cookie.raw
        assert "httponly" in attrs
        assert attrs["samesite"] in ("Lax", "Strict")
        assert attrs["path"] == "/"
        assert "secure" not in attrs  # plain HTTP: a Secure cookie would be dropped by browsers
    # The preview host's session is not the hub's: it is a different token, for a different audience.
    assert browser.cookie(served.hub, "codehub_session") != browser.cookie(served.preview("ws1", 3000),
                                                                           "codehub_session")


async def test_hub_answers_made_for_a_person_are_never_stored_by_a_cache(served: Served,
                                                                        make_browser: MakeBrowser) -> None:
    """A shared cache in front of the hub (a CDN, a corporate proxy) must not keep one person's hub page or API
    answer for the next: they say ``no-store``. Versioned static files stay cacheable, and so, for five minutes,
    do the public keys apps verify assertions with (else an app fetches them again for every request it checks)."""
    browser = await signed_in(make_browser, served)
    for path in ("/", "/tokens", "/api/v1/workspaces", "/api/v1/me"):
        page = await browser.fetch("GET", HUB + path, headers={"Accept": "application/json" if "api" in path
                                                                else "text/html"})
        assert page.status == 200, (path, page.text)
        assert page.headers.get("Cache-Control") == "no-store", path
    home = await browser.navigate(HUB + "/")
    script = re.search(r'src="(/static/[^"]+)"', home.text)
    assert script is not None, home.text
    assert "?v=" in script.group(1), "versioned: the next release's file is fetched anew, not taken from a cache"
    static = await browser.fetch("GET", HUB + script.group(1))
    assert static.status == 200
    assert "no-store" not in static.headers.get("Cache-Control", "")
    keys = await browser.fetch("GET", HUB + "/.well-known/jwks.json")
    assert keys.status == 200
    assert keys.headers.get("Cache-Control") == "max-age=300"


async def test_https_cookies_use_the_host_prefix_and_secure(serve: Serve, make_browser: MakeBrowser) -> None:
    served = await serve(WORKSPACES, hub_url="https://hub.test", preview_domain="preview.test")
    browser = await make_browser(served)
    page = await browser.fetch("POST", "https://hub.test/auth/dev", headers={"Origin": "https://hub.test"},
                               data={"user": "alice", "next": "/"})
    assert page.status == 303
    page = await browser.navigate("https://3000-ws1.preview.test/x")
    assert page.status == 200, page.text
    raw = [cookie.raw for cookie in browser.jar]
    assert {cookie.name for cookie in browser.jar} >= {"__Host-codehub_session"}
    for set_cookie in raw:
        assert set_cookie.startswith("__Host-codehub_")
        attrs = attributes(set_cookie)
        assert "secure" in attrs
        assert "httponly" in attrs
        assert attrs["path"] == "/"
        assert "domain" not in attrs
    assert "codehub" not in " ".join(seen_headers(page.json()).get("cookie", []))
    # The plain-HTTP cookie name is not honoured under HTTPS (it could be planted without Secure).
    planted = await make_browser(served)
    planted.add_cookie("https://3000-ws1.preview.test/", "codehub_session",
                       browser.cookie("https://3000-ws1.preview.test/", "__Host-codehub_session") or "")
    assert (await planted.fetch("GET", "https://3000-ws1.preview.test/", headers={"Accept": "*/*"})).status == 401


async def test_upstream_cannot_set_cookies_for_the_parent_domain_or_ours(served: Served,
                                                                         make_browser: MakeBrowser) -> None:
    browser = await make_browser(served)
    offered = ["app=1; Path=/", "own=1; Domain=3001-ws1.localhost; Path=/", "wide=1; Domain=localhost",
               "dotwide=1; Domain=.localhost", "upper=1; Domain=LOCALHOST", "codehub_session=evil; Path=/",
               "__Host-codehub_session=evil; Path=/; Secure", "codehub_share=x", "codehub_handoff=x",
               "other=1; Domain=3000-ws1.localhost", "=codehub_session=evil; Path=/deep",
               "=__Host-codehub_session=evil; Path=/; Secure"]
    query = urlencode([("set_cookie", value) for value in offered])
    page = await browser.fetch("GET", served.preview("ws1", 3001, f"/?{query}"))
    assert page.status == 200
    names = sorted(value.partition("=")[0] for value in page.set_cookies)
    assert names == ["app", "own"]


# --- redirects ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [*EVIL_NEXT, "///evil.test/", "/\\/evil.test", "//\\evil.test", "/\\\\evil.test",
                                   "\\evil.test", "/\x00/evil.test", "/\x7f/evil.test", "/\n/evil.test", None])
def test_local_path_only_allows_same_host_paths(value: str | None) -> None:
    assert_same_host(local_path(value), HUB)


@pytest.mark.parametrize("value", ["/", "/a/b?c=d&e=%2F%2Fx", "/w/ws1/?folder=/home", "/%2F%2Fevil.test",
                                   "/a//b", "/caf\u00e9"])
def test_local_path_keeps_ordinary_paths(value: str) -> None:
    assert local_path(value) == value


@pytest.mark.parametrize(("value", "expected"), [("//evil.test/x?y=1", "/evil.test/x?y=1"),
                                                 ("/\\evil.test/", "/evil.test/"), ("///evil.test/", "/evil.test/")])
def test_local_path_keeps_the_path_of_a_host_spelling(value: str, expected: str) -> None:
    assert local_path(value) == expected


@pytest.mark.parametrize("path", ["//evil.test/", "/\\evil.test/", "///evil.test/", "/%2F/evil.test/",
                                  "//evil.test/a?b=1"])
async def test_no_open_redirect_after_a_share_link(served: Served, make_browser: MakeBrowser, path: str) -> None:
    owner = await signed_in(make_browser, served)
    share = await make_share(owner)
    visitor = await make_browser(served)
    mark = "&" if "?" in path else "?"
    url = URL(served.base + path + f"{mark}codehub_share={share['token']}", encoded=True)
    async with visitor.http.get(url, headers={"Host": "3000-ws1.localhost:8080", "Accept": "text/html"},
                                allow_redirects=False) as page:
        assert page.status == 303
        assert_same_host(page.headers.get("Location"), served.preview("ws1", 3000).rstrip("/"))


@pytest.mark.parametrize("value", EVIL_NEXT)
async def test_no_open_redirect_after_dev_sign_in(served: Served, make_browser: MakeBrowser, value: str) -> None:
    browser = await make_browser(served)
    login = await browser.fetch("GET", f"{HUB}/auth/login?next={quote(value, safe='/:%')}")
    assert login.status == 302
    assert_same_host(parse_qs(urlsplit(login.location or "").query).get("next", ["/"])[0], HUB)
    page = await browser.dev_sign_in(served.hub, "alice", next_path=value)
    assert page.status == 303
    assert_same_host(page.headers.get("Location"), HUB)


@pytest.mark.parametrize("value", ["//evil.test", "/\\evil.test", "%2F%2Fevil.test", "/%09/evil.test",
                                   "https://evil.test"])
async def test_no_open_redirect_from_the_preview_callback(served: Served, make_browser: MakeBrowser,
                                                          value: str) -> None:
    browser = await signed_in(make_browser, served)
    preview = served.preview("ws1", 3000)
    callback = await browser.navigate_until(preview, lambda url: "/_codehub/auth/callback" in url)
    code = parse_qs(urlsplit(callback).query)["code"][0]
    page = await browser.fetch("GET", served.preview("ws1", 3000, f"/_codehub/auth/callback?code={code}&next=")
                               + quote(value, safe="/:%\\"))
    assert page.status == 303
    assert_same_host(page.headers.get("Location"), preview.rstrip("/"))


@pytest.mark.parametrize(
    "target",
    ["http://evil.test/", "http://localhost:8080/", "http://localhost:8080/w/ws1/", "https://3000-ws1.localhost:8080/",
     "https://ide-ws1.localhost:8080/", "http://ide-ws1.localhost:8080.evil.test/",
     "http://3000-ws1.localhost:8080.evil.test/", "http://user@evil.test@3000-ws1.localhost:8080/",
     "//3000-ws1.localhost:8080/", "/relative", "http://3000-ws1.localhost:9999/", "javascript:alert(1)", ""],
)
async def test_handoff_only_targets_this_gateways_previews(served: Served, make_browser: MakeBrowser,
                                                           target: str) -> None:
    browser = await signed_in(make_browser, served)
    page = await browser.fetch("GET", f"{HUB}/auth/handoff?" + urlencode({"target": target, "state": "s"}),
                               headers={"Accept": "text/html"})
    assert page.status == 400, page.headers.get("Location")
    assert "Location" not in page.headers
    assert "bad-handoff" in page.text


async def test_handoff_without_a_state_mints_no_code(served: Served, make_browser: MakeBrowser) -> None:
    """The code is bound to the preview tab's state: one asked for with none would be bound to nothing the tab
    holds, so a page that sends a visitor here without it gets a refusal, not a code."""
    browser = await signed_in(make_browser, served)
    page = await browser.fetch("GET", f"{HUB}/auth/handoff?" + urlencode({"target": served.preview("ws1", 3000)}),
                               headers={"Accept": "text/html"})
    assert page.status == 400, page.headers.get("Location")
    assert "bad-handoff" in page.text


async def test_handoff_signed_out_sends_to_sign_in_for_now_only(served: Served, make_browser: MakeBrowser) -> None:
    """A 302, never a permanent redirect: a browser keeps a 301 and would send every later hand-off, signed in
    by then, to sign-in again."""
    browser = await make_browser(served)
    asked = "/auth/handoff?" + urlencode({"target": served.preview("ws1", 3000), "state": "s"})
    page = await browser.fetch("GET", HUB + asked, headers={"Accept": "text/html"})
    location = URL(page.location or "")
    assert (page.status, location.path, location.query.get("next")) == (302, "/auth/login", asked)


async def test_handoff_to_a_preview_goes_to_its_callback(served: Served, make_browser: MakeBrowser) -> None:
    browser = await signed_in(make_browser, served)
    target = served.preview("ws1", 3000, "/a?b=c")
    page = await browser.fetch("GET", f"{HUB}/auth/handoff?" + urlencode({"target": target, "state": "s"}))
    assert page.status == 302
    location = URL(page.location or "")
    assert (location.host, location.port, location.path) == ("3000-ws1.localhost", 8080, "/_codehub/auth/callback")
    assert location.query["next"] == "/a?b=c"


# --- the hand-off code -------------------------------------------------------------------------------------------


async def test_handoff_code_is_bound_to_host_state_and_single_use(served: Served, make_browser: MakeBrowser) -> None:
    browser = await signed_in(make_browser, served)
    callback = await browser.navigate_until(served.preview("ws1", 3000, "/p?q=1"),
                                            lambda url: "/_codehub/auth/callback" in url)
    query = urlsplit(callback).query
    assert urlsplit(callback).netloc == "3000-ws1.localhost:8080"

    # The same code on another preview host (even one this browser holds a state cookie for) is refused.
    other = served.preview("ws2", 4000, "/_codehub/auth/callback?" + query)
    await browser.navigate_until(served.preview("ws2", 4000, "/"), lambda url: "/_codehub/auth/callback" in url)
    refused = await browser.fetch("GET", other, headers={"Accept": "text/html"})
    assert refused.status == 400
    assert "handoff-invalid" in refused.text
    assert "Traceback" not in refused.text

    # Another browser (no state cookie for it) cannot use it.
    thief = await make_browser(served)
    stolen = await thief.fetch("GET", callback, headers={"Accept": "application/json"})
    assert stolen.status == 400
    assert stolen.json()["error"]["code"] == "handoff-state-mismatch"

    page = await browser.fetch("GET", callback)
    assert page.status == 303
    assert page.headers["Location"] == "/p?q=1"
    # Used, and its state gone with it: the browser, signed in here by now, is sent on to its page (as a tab that
    # set out with the same state would be), with no new session.
    replay = await browser.fetch("GET", callback, headers={"Accept": "application/json"})
    assert (replay.status, replay.headers.get("Location"), replay.set_cookies) == (303, "/p?q=1", [])
    landed = await browser.navigate(served.preview("ws1", 3000, "/p?q=1"))
    assert landed.json()["path"] == "/p?q=1"


async def test_an_owner_who_starts_the_handoff_learns_nothing_from_the_code_or_the_session(
        served: Served, make_browser: MakeBrowser) -> None:
    """The owner's page sends the visitor's browser to the hand-off with a state the owner picked (their own, from
    an anonymous visit), reads the code off the callback URL on their origin (a service worker of theirs sees it),
    and redeems it from their own machine. The session that buys them is opaque: it names nobody, and it opens
    their own port only (they own it anyway). As a signed JWT it carried the visitor's every claim, past consent."""
    owner = await make_browser(served)
    app = served.preview("ws1", 3000, "/")
    await owner.navigate_until(app, lambda url: "/auth/handoff" in url)
    state = owner.cookie(app, "codehub_handoff")
    assert state
    visitor = await make_browser(served)
    assert (await visitor.dev_sign_in(served.hub, "visiting-bob", groups="secret-project")).status == 303
    handoff = await visitor.fetch("GET", f"{HUB}/auth/handoff?" + urlencode({"target": app, "state": state}))
    assert handoff.status == 302
    redeemed = await owner.fetch("GET", handoff.location or "")
    assert redeemed.status == 303
    session = owner.cookie(app, "codehub_session")
    assert session
    readable = session
    for part in re.split(r"[.]", session):  # whatever base64 it holds, read as text
        with contextlib.suppress(ValueError):
            readable += base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)).decode("latin-1")
    assert "visiting-bob" not in readable
    assert "secret-project" not in readable
    for accept in ("text/html", "application/json"):  # nor do the gateway's own answers on that host tell
        answer = await owner.fetch("GET", app, headers={"Accept": accept})
        assert answer.status == 403
        assert "visiting-bob" not in answer.text
        assert "secret-project" not in answer.text


async def test_a_framed_preview_offers_sign_in_in_a_popup(served: Served, make_browser: MakeBrowser) -> None:
    """In a frame a redirect to the hub would loop (the hub's cookie is third-party there): the visitor gets a page
    with a button that signs in in a popup, through a hand-off bound to this browser's state cookie."""
    browser = await make_browser(served)
    preview = served.preview("ws1", 3000, "/p")
    page = await browser.fetch("GET", preview, headers={"Accept": "text/html", "Sec-Fetch-Mode": "navigate",
                                                        "Sec-Fetch-Dest": "iframe"})
    assert page.status == 401
    assert 'id="sign-in"' in page.text
    handoff = URL(json.loads(page.text.split("const handoff = ", 1)[1].split(";", 1)[0]))
    assert (handoff.host, handoff.path) == ("localhost", "/auth/handoff")
    assert handoff.query["popup"] == "1"
    assert handoff.query["state"] == browser.cookie(preview, "codehub_handoff")


# --- WebSockets to the IDE ---------------------------------------------------------------------------------------


async def _ide_socket(browser: Browser, served: Served, *origins: str) -> aiohttp.ClientWebSocketResponse:
    session = browser.cookie(served.ide("ws1"), "codehub_session")
    headers = [("Host", "ide-ws1.localhost:8080"), ("Cookie", f"codehub_session={session}"),
               *(("Origin", origin) for origin in origins)]
    return await browser.http.ws_connect(URL(served.base + "/socket"), headers=CIMultiDict(headers))


async def signed_in_ide(make_browser: MakeBrowser, served: Served) -> Browser:
    browser = await signed_in(make_browser, served)
    page = await browser.navigate(served.ide("ws1", "/"))
    assert page.status == 200, page.text
    return browser


@pytest.mark.parametrize("origins", [("http://evil.test",), ("http://3000-ws1.localhost:8080",), ("null",),
                                     ("http://localhost:8080",), ("http://ide-ws1.localhost:8080.evil.test",),
                                     ("http://ide-ws2.localhost:8080",), (),
                                     ("http://ide-ws1.localhost:8080", "http://ide-ws1.localhost:8080"),
                                     ("http://ide-ws1.localhost:8080", "http://evil.test")],
                         ids=["foreign", "a-preview", "null", "the-hub", "suffix", "another-ide", "none", "twice",
                              "two-different"])
async def test_ide_websocket_from_anywhere_but_the_ide_is_refused(served: Served, make_browser: MakeBrowser,
                                                                  origins: tuple[str, ...]) -> None:
    browser = await signed_in_ide(make_browser, served)
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await _ide_socket(browser, served, *origins)
    assert caught.value.status == 403


async def test_ide_websocket_from_the_ide_itself_is_relayed(served: Served, make_browser: MakeBrowser) -> None:
    browser = await signed_in_ide(make_browser, served)
    socket = await _ide_socket(browser, served, "http://ide-ws1.localhost:8080")
    await socket.send_str("hi")
    assert (await socket.receive_str(timeout=5)) == "echo:hi"
    await socket.close()


async def test_cross_site_websocket_does_not_wake_the_workspace(served: Served, make_browser: MakeBrowser) -> None:
    browser = await signed_in_ide(make_browser, served)
    await served.gateway.runtime.stop("ws1")
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await _ide_socket(browser, served, "http://evil.test")
    assert caught.value.status == 403
    state = served.gateway.runtime.get("ws1")
    assert state is not None
    assert state.phase is Phase.WARM


# --- share links -------------------------------------------------------------------------------------------------


async def make_share(owner: Browser, **body: Any) -> dict[str, Any]:
    page = await api(owner, "POST", "/api/v1/workspaces/ws1/shares", {"port": 3000, **body})
    assert page.status == 201, page.text
    share: dict[str, Any] = page.json()
    return share


async def test_share_token_in_url_is_swapped_for_a_cookie(served: Served, make_browser: MakeBrowser) -> None:
    owner = await signed_in(make_browser, served)
    share = await make_share(owner)
    visitor = await make_browser(served)
    url = served.preview("ws1", 3000, f"/page?a=1&codehub_share={share['token']}&b=%2F")
    first = await visitor.fetch("GET", url, headers={"Accept": "text/html"})
    assert first.status == 303
    assert first.headers["Location"] == "/page?a=1&b=%2F"
    assert share["token"] not in first.headers["Location"]
    cookie = next(c for c in visitor.jar if c.name == "codehub_share")
    assert cookie.host == "3000-ws1.localhost"
    assert cookie.host_only
    assert "httponly" in attributes(cookie.raw)
    assert share["token"] not in cookie.value, "the cookie names the link, it is not the token itself"

    page = await visitor.navigate(served.preview("ws1", 3000, "/page?a=1&b=%2F"))
    assert page.status == 200
    body = page.json()
    assert body["path"] == "/page?a=1&b=%2F"
    assert share["token"] not in str(body)
    assert "codehub" not in " ".join(seen_headers(body).get("cookie", []))
    # The cookie is good for this port only.
    assert (await visitor.fetch("GET", served.preview("ws2", 4000, "/"))).status == 401


async def test_share_token_in_a_non_get_url_never_reaches_the_upstream(served: Served,
                                                                       make_browser: MakeBrowser) -> None:
    owner = await signed_in(make_browser, served)
    share = await make_share(owner)
    script = await make_browser(served)
    page = await script.fetch("POST", served.preview("ws1", 3000, f"/submit?codehub_share={share['token']}&x=1"),
                              data=b"payload")
    assert page.status == 200
    assert page.json()["path"] == "/submit?x=1"


async def test_bearer_share_token_for_scripts(served: Served, make_browser: MakeBrowser) -> None:
    owner = await signed_in(make_browser, served)
    share = await make_share(owner)
    script = await make_browser(served)
    for method in ("GET", "POST"):
        page = await script.fetch(method, served.preview("ws1", 3000, "/api/data"),
                                  headers={"Authorization": f"Bearer {share['token']}"})
        assert page.status == 200, page.text
        seen = seen_headers(page.json())
        assert "authorization" not in seen
        assert share["token"] not in str(page.json())
    other_port = await script.fetch("GET", served.preview("ws2", 4000, "/"),
                                    headers={"Authorization": f"Bearer {share['token']}"})
    assert other_port.status == 403
    assert other_port.json()["error"]["code"] == "share-other-target"
    for token, status in [("chs_nope", 401), ("chk_nope", 401)]:
        # Scripts get JSON even when they claim to accept HTML: never a sign-in page.
        bogus = await script.fetch("GET", served.preview("ws1", 3000, "/"),
                                   headers={"Authorization": f"Bearer {token}", "Accept": "text/html"})
        assert bogus.status == status
        assert bogus.content_type == "application/json"
        assert "Location" not in bogus.headers
    eve = await signed_in(make_browser, served, "eve")
    eve_token = (await api(eve, "POST", "/api/v1/tokens", {"name": "x"})).json()["token"]
    page = await script.fetch("GET", served.preview("ws1", 3000, "/"),
                              headers={"Authorization": f"Bearer {eve_token}", "Accept": "text/html"})
    assert page.status == 403
    assert page.json()["error"]["code"] == "not-shared-with-user"


@pytest.mark.parametrize("how", ["revoked", "expired"])
async def test_dead_share_links_get_a_clear_page(served: Served, make_browser: MakeBrowser, how: str) -> None:
    owner = await signed_in(make_browser, served)
    share = await make_share(owner)
    holder = await make_browser(served)
    assert (await holder.navigate(served.preview("ws1", 3000, f"/?codehub_share={share['token']}"))).status == 200

    if how == "revoked":
        assert (await api(owner, "DELETE", f"/api/v1/workspaces/ws1/shares/{share['id']}")).status == 200
    else:
        served.gateway.auth.store.shares[share["id"]].expires = time.time() - 1

    browser = await make_browser(served)
    page = await browser.navigate(served.preview("ws1", 3000, f"/?codehub_share={share['token']}"))
    assert page.status == 403
    assert page.content_type == "text/html"
    assert f"share-{how}" in page.text
    assert how in page.text
    assert "Traceback" not in page.text
    script = await make_browser(served)
    page = await script.fetch("GET", served.preview("ws1", 3000, "/"),
                              headers={"Authorization": f"Bearer {share['token']}"})
    assert page.status == 403
    assert page.json()["error"]["code"] == f"share-{how}"
    # The browser that already swapped the token for a cookie is refused at once, with the same clear page.
    page = await holder.navigate(served.preview("ws1", 3000, "/again"))
    assert page.status == 403
    assert f"share-{how}" in page.text


# --- identity and credentials never leak upstream ----------------------------------------------------------------


async def test_consumed_credentials_never_reach_the_upstream(served: Served, make_browser: MakeBrowser) -> None:
    owner = await signed_in(make_browser, served)
    token = (await api(owner, "POST", "/api/v1/tokens", {"name": "ci"})).json()["token"]
    script = await make_browser(served)
    page = await script.fetch("GET", served.preview("ws1", 3000, "/"),
                              headers={"Authorization": f"Bearer {token}", "X-Forwarded-User": "root",
                                       "Cookie": "codehub_session=forged; app=1"})
    assert page.status == 200, page.text
    seen = seen_headers(page.json())
    assert "authorization" not in seen
    assert seen["cookie"] == ["app=1"]
    assert seen["x-forwarded-user"] == ["alice"]

    # A credential the gateway did not consume belongs to the app and passes through.
    browser = await signed_in(make_browser, served)
    page = await browser.navigate(served.preview("ws1", 3000, "/"), headers={"Authorization": "Basic YXBwOmFwcA=="})
    assert seen_headers(page.json())["authorization"] == ["Basic YXBwOmFwcA=="]


async def test_an_api_token_speaks_for_its_holder_whoever_is_signed_in_in_the_browser(
        served: Served, make_browser: MakeBrowser) -> None:
    """A script in a browser signed in as someone else calls with the token it was given: the app learns the token's
    holder, not the browser's person, and the write is the token's, which no page elsewhere can make a browser send
    (the browser's cookie vouches for nothing here)."""
    owner = await signed_in(make_browser, served)
    token = (await api(owner, "POST", "/api/v1/tokens", {"name": "ci"})).json()["token"]
    browser = await signed_in(make_browser, served, "eve")
    app = served.preview("ws1", 3000, "/")
    assert (await browser.navigate(app)).status == 403, "eve is not let in by her own sign-in"
    page = await browser.fetch("POST", app, headers={"Authorization": f"Bearer {token}", "Origin": "http://evil.test"},
                               data=b"x")
    assert page.status == 200, page.text
    assert seen_headers(page.json())["x-forwarded-user"] == ["alice"]


async def test_a_session_cookie_the_gateway_did_not_seal_is_no_sign_in(served: Served,
                                                                       make_browser: MakeBrowser) -> None:
    """A forged or stale session cookie is as good as none: a private port sends the browser to sign in, a public one
    serves it with no identity, and neither fails."""
    browser = await make_browser(served)
    for port in (3000, 3001):
        browser.add_cookie(served.preview("ws1", port, "/"), "codehub_session", "forged")
    private = await browser.fetch("GET", served.preview("ws1", 3000, "/"), headers={"Accept": "text/html"})
    assert private.status == 302, private.text
    assert (private.location or "").startswith(HUB + "/auth/handoff?")
    public = await browser.fetch("GET", served.preview("ws1", 3001, "/"))
    assert public.status == 200, public.text
    assert "x-forwarded-user" not in seen_headers(public.json())


@pytest.mark.parametrize(("host", "path", "status"), [
    ("3000-nope.localhost:8080", "/", 404), ("ide-nope.localhost:8080", "/", 404), ("evil.test", "/", 404),
    ("localhost:8080", "/auth/nothing", 404),
])
async def test_unknown_things_are_denied_with_a_page(served: Served, make_browser: MakeBrowser, host: str,
                                                     path: str, status: int) -> None:
    browser = await make_browser(served)
    browser.domains = (*browser.domains, "evil.test")
    page = await browser.fetch("GET", f"http://{host}{path}", headers={"Accept": "text/html"})
    assert page.status == status
    assert page.content_type == "text/html"
    assert "Traceback" not in page.text


# --- CSRF and dev sign-in ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{"Origin": "http://evil.test"}, {"Origin": "http://3000-ws1.localhost:8080"}, {"Origin": "null"},
     {"Origin": "http://localhost:8080.evil.test"}, {}, {"Sec-Fetch-Site": "cross-site"},
     {"Sec-Fetch-Site": "same-site"}],
    ids=["foreign", "a-preview", "null", "suffix", "no-origin", "cross-site", "same-site-preview"],
)
async def test_cookie_api_calls_from_elsewhere_are_refused(served: Served, make_browser: MakeBrowser,
                                                           headers: dict[str, str]) -> None:
    browser = await signed_in(make_browser, served)
    for method, path, body in [("POST", "/api/v1/tokens", {"name": "x"}),
                               ("PUT", "/api/v1/workspaces/ws1/ports/3000", {"visibility": "public"}),
                               ("POST", "/api/v1/workspaces/ws1/shares", {"port": 3000}),
                               ("POST", "/auth/logout", None)]:
        page = await api(browser, method, path, body, origin=None, headers=headers)
        assert page.status == 403, (method, path, page.text)
        assert page.json()["error"]["code"] == "cross-site-request"
    spec = served.gateway.runtime.get("ws1")
    assert spec is not None
    assert spec.spec.ports[3000] == "private"
    assert not served.gateway.auth.store.shares
    assert not served.gateway.auth.store.api_tokens


@pytest.mark.parametrize("headers", [{"Origin": HUB}, {"Origin": HUB + "/"}, {"Sec-Fetch-Site": "same-origin"}],
                         ids=["origin", "origin-slash", "same-origin-without-origin"])
async def test_cookie_calls_from_the_hubs_own_pages_are_taken(served: Served, make_browser: MakeBrowser,
                                                              headers: dict[str, str]) -> None:
    """The other side of the refusal above: the hub's own pages are known by their Origin, or, where a browser sent
    none, by its Sec-Fetch-Site saying same-origin (never same-site: every preview is on the hub's site)."""
    browser = await signed_in(make_browser, served)
    made = await api(browser, "POST", "/api/v1/tokens", {"name": "x"}, origin=None, headers=headers)
    assert made.status == 201, made.text
    out = await api(browser, "POST", "/auth/logout", origin=None, headers=headers)
    assert (out.status, out.location) == (303, HUB + "/"), out.text
    assert (await api(browser, "GET", "/api/v1/me")).status == 401


async def test_bearer_api_calls_need_no_origin(served: Served, make_browser: MakeBrowser) -> None:
    owner = await signed_in(make_browser, served)
    token = (await api(owner, "POST", "/api/v1/tokens", {"name": "ci"})).json()["token"]
    script = await make_browser(served)
    page = await api(script, "PUT", "/api/v1/workspaces/ws1/ports/3000", {"visibility": "org"},
                     origin="http://evil.test", headers={"Authorization": f"Bearer {token}"})
    assert page.status == 200, page.text


async def test_sign_out_ends_the_sign_in_on_every_preview_and_ide_it_reached(served: Served,
                                                                           make_browser: MakeBrowser) -> None:
    """The hub cannot touch cookies of other hosts, so Sign out ends the sign-in itself: the sessions a hand-off gave
    a preview and the IDE stop opening, in this browser and in any copy of their cookies; another sign-in of the
    same person goes on, and signing in again opens them again."""
    browser, elsewhere = await signed_in(make_browser, served), await signed_in(make_browser, served)
    app, ide = served.preview("ws1", 3000, "/x"), served.ide("ws1", "/")
    for opened in (browser, elsewhere):
        assert (await opened.navigate(app)).status == 200
        assert (await opened.navigate(ide)).status == 200
    copy = await make_browser(served)
    for url in (app, ide, HUB + "/api/v1/me"):
        copy.add_cookie(url, "codehub_session", browser.cookie(url, "codehub_session") or "")
        assert (await copy.fetch("GET", url, headers={"Accept": "application/json"})).status == 200

    page = await api(browser, "POST", "/auth/logout")
    assert (page.status, page.location) == (303, HUB + "/"), page.text
    for url in (app, ide, HUB + "/api/v1/me"):
        for who in (browser, copy):
            refused = await who.fetch("GET", url, headers={"Accept": "application/json"})
            assert refused.status == 401, (url, refused.text)
            assert refused.json()["error"]["code"] == "user-unauthenticated"
        assert (await elsewhere.fetch("GET", url)).status == 200
    bounced = await browser.navigate_until(app, lambda url: url.startswith(HUB + "/auth/"))
    assert bounced.startswith(HUB + "/auth/handoff"), bounced
    assert (await browser.navigate(HUB + "/auth/handoff")).url.startswith(HUB + "/auth/dev")

    assert (await browser.dev_sign_in(served.hub, "alice")).status == 303
    assert (await browser.navigate(app)).json()["path"] == "/x"


async def test_a_preview_session_ends_when_its_sign_in_does(served: Served, make_browser: MakeBrowser) -> None:
    """Not a whole ``session_ttl`` after the hand-off: a sign-in 100 s from its end gives a preview 100 s."""
    browser = await make_browser(served)
    sessions = served.gateway.auth.sessions
    sign_in = SignIn("c" * 32, int(time.time()) + 100)
    browser.add_cookie(HUB, "codehub_session", sessions.issue(Identity("alice"), served.gateway.hosts.hub, sign_in))
    app = served.preview("ws1", 3000, "/")
    callback = await browser.navigate_until(app, lambda url: "/_codehub/auth/callback" in url)
    page = await browser.fetch("GET", callback)
    assert page.status == 303
    (session,) = [cookie for cookie in page.set_cookies if cookie.startswith("codehub_session=")]
    assert 95 <= int(attributes(session)["max-age"]) <= 100
    opened = sessions.read(browser.cookie(app, "codehub_session") or "", app[7:-1], Ended())
    assert opened == (Identity("alice"), sign_in)


async def test_a_sign_out_that_cannot_be_recorded_says_so_and_can_be_tried_again(served: Served,
                                                                                   make_browser: MakeBrowser) -> None:
    """The used-keys file cannot be written: the sign-in is not ended anywhere, so the page says that, in words
    about signing out (not about share links), and keeps the hub's cookie, which is what a second try needs; nobody
    else is signed out by it. Once the file can be written, the same click ends it everywhere."""
    browser, bob = await signed_in(make_browser, served), await signed_in(make_browser, served, "bob")
    app = served.preview("ws1", 3000, "/")
    assert (await browser.navigate(app)).status == 200
    used = served.gateway.config.store_file.with_name("tokens.used.json")
    used.unlink(missing_ok=True)
    used.mkdir()  # cannot be read, nor replaced
    page = await browser.fetch("POST", HUB + "/auth/logout", headers={"Origin": HUB, "Sec-Fetch-Mode": "navigate",
                                                                      "Accept": "text/html"})
    assert page.status == 503, page.text
    assert "text/html" in page.content_type
    assert "still signed in" in page.text, page.text
    assert "Share links" not in page.text
    assert 'http-equiv="refresh"' not in page.text  # a reload would be a GET of /auth/logout: 405, not a sign-out
    assert (await browser.fetch("GET", HUB + "/auth/logout")).status == 405
    assert not [cookie for cookie in page.set_cookies if cookie.startswith("codehub_session=")]
    for who in (browser, bob):
        assert (await api(who, "GET", "/api/v1/me")).status == 200
    assert (await browser.fetch("GET", app)).status == 200
    failed = await api(browser, "POST", "/auth/logout")
    assert (failed.status, failed.json()["error"]["code"]) == (503, "sign-out-not-recorded"), failed.text

    used.rmdir()
    assert (await api(browser, "POST", "/auth/logout")).status == 303
    assert (await browser.fetch("GET", app, headers={"Accept": "application/json"})).status == 401
    assert (await api(bob, "GET", "/api/v1/me")).status == 200


async def test_a_loop_of_sign_in_and_sign_out_cannot_grow_the_sign_outs_without_bound(
        served: Served, make_browser: MakeBrowser) -> None:
    """Every sign-out is kept until its sign-in would have expired (12 h), in every worker's memory and in the
    used-keys file that every hand-off rewrites: a signed-in person looping sign-in and sign-out would make that
    file, and every sign-in to a preview of everyone, grow without bound. A person signs in at most
    SIGN_INS_PER_HOUR times an hour (per process); others are not held up by it."""
    browser = await make_browser(served)
    for _ in range(SIGN_INS_PER_HOUR):
        assert (await browser.dev_sign_in(served.hub, "mallory")).status == 303
        assert (await api(browser, "POST", "/auth/logout")).status == 303
    refused = await browser.fetch("POST", HUB + "/auth/dev", data={"user": "mallory", "next": "/"},
                                  headers={"Origin": HUB, "Accept": "application/json"})
    assert refused.status == 429, refused.text
    assert refused.json()["error"]["code"] == "too-many-sign-ins"
    assert 0 < int(refused.headers["Retry-After"]) <= 3600
    assert browser.cookie(HUB, "codehub_session") is None
    used = json.loads(served.gateway.config.store_file.with_name("tokens.used.json").read_text())
    assert len([key for key in used if key.startswith("sign-out-")]) == SIGN_INS_PER_HOUR
    assert (await (await make_browser(served)).dev_sign_in(served.hub, "alice")).status == 303


async def test_signing_in_as_someone_else_ends_the_sign_in_it_replaces(served: Served,
                                                                      make_browser: MakeBrowser) -> None:
    """On a shared computer bob signs in over alice's sign-in: the hub's cookie was the only handle Sign out had on
    it, so it ends now, or alice's preview sessions in that browser would go on acting as her for bob (and for
    any copy) until they expire. Signing in as the same person again keeps the sign-in instead."""
    browser = await signed_in(make_browser, served)
    app = served.preview("ws1", 3000, "/")
    assert (await browser.navigate(app)).status == 200
    copy = await make_browser(served)
    copy.add_cookie(app, "codehub_session", browser.cookie(app, "codehub_session") or "")
    assert (await browser.dev_sign_in(served.hub, "alice")).status == 303  # the same person: kept
    assert (await copy.fetch("GET", app)).status == 200

    assert (await browser.dev_sign_in(served.hub, "bob")).status == 303
    for who in (browser, copy):
        page = await who.fetch("GET", app, headers={"Accept": "application/json"})
        assert (page.status, page.json()["error"]["code"]) == (401, "user-unauthenticated"), page.text
    page = await browser.navigate(app)  # through the hand-off again, as bob
    assert page.status == 403, page.text
    assert "not-shared-with-user" in page.text
    assert (await api(browser, "GET", "/api/v1/me")).json()["user"] == "bob"


async def test_signing_in_over_someone_elses_sign_in_that_cannot_be_ended_changes_nothing(
        served: Served, make_browser: MakeBrowser) -> None:
    browser = await signed_in(make_browser, served)
    used = served.gateway.config.store_file.with_name("tokens.used.json")
    used.unlink(missing_ok=True)
    used.mkdir()  # cannot be read, nor replaced
    page = await browser.dev_sign_in(served.hub, "bob")
    assert (page.status, page.json()["error"]["code"]) == (503, "sign-out-not-recorded"), page.text
    assert (await api(browser, "GET", "/api/v1/me")).json()["user"] == "alice"


async def test_a_loop_of_hand_offs_is_refused_with_a_page_that_says_when_to_come_back(
        served: Served, make_browser: MakeBrowser) -> None:
    """Every hand-off code redeemed is kept for a minute where every worker reads it; a person gets
    ``HAND_OFFS_PER_MINUTE`` a minute (per process), then a clear 429, a page for a browser, JSON for a script."""
    alice, bob = await signed_in(make_browser, served), await signed_in(make_browser, served, "bob")
    query = urlencode({"target": served.preview("ws1", 3000, "/"), "state": "s"})
    for _ in range(HAND_OFFS_PER_MINUTE):
        assert (await alice.fetch("GET", f"{HUB}/auth/handoff?{query}")).status == 302
    page = await alice.fetch("GET", f"{HUB}/auth/handoff?{query}", headers={"Accept": "text/html"})
    assert (page.status, page.content_type) == (429, "text/html"), page.text
    assert "Open the page again in" in page.text
    assert 0 < int(page.headers["Retry-After"]) <= 60
    script = await alice.fetch("GET", f"{HUB}/auth/handoff?{query}", headers={"Accept": "application/json"})
    assert (script.status, script.json()["error"]["code"]) == (429, "too-many-hand-offs")
    assert (await bob.fetch("GET", f"{HUB}/auth/handoff?{query}")).status == 302


async def test_the_hub_feed_ends_with_its_sign_in(served: Served, make_browser: MakeBrowser) -> None:
    """The hub's live feed is one long answer: opened before Sign out (in another tab, or with a copied cookie) it
    must not go on sending the person's workspaces after it. It ends, and the browser's reconnect is refused."""
    browser = await signed_in(make_browser, served)
    copy = await make_browser(served)
    copy.add_cookie(HUB, "codehub_session", browser.cookie(HUB, "codehub_session") or "")
    feeds = []
    async with contextlib.AsyncExitStack() as stack:
        for who in (browser, copy):
            cookie = "; ".join(f"{k}={v}" for k, v in who.cookies_for("localhost").items())
            feed = await stack.enter_async_context(who.http.get(
                who.gateway + "/api/v1/hub/events", headers={"Host": HUB[7:], "Cookie": cookie,
                                                              "Accept": "text/event-stream"}))
            assert feed.status == 200
            assert (await asyncio.wait_for(feed.content.readuntil(b"\n\n"), 10)).startswith(b"event: snapshot")
            feeds.append(feed)
        assert (await api(browser, "POST", "/auth/logout")).status == 303
        for feed in feeds:
            rest = await asyncio.wait_for(feed.content.read(), 10)  # ends: no timeout, no snapshot after
            assert b"event: snapshot" not in rest, rest
    again = await copy.fetch("GET", HUB + "/api/v1/hub/events", headers={"Accept": "text/event-stream"})
    assert again.status == 401


async def test_a_scripts_hub_feed_ends_when_its_api_token_is_revoked(served: Served, make_browser: MakeBrowser) -> None:
    """A feed opened with an API token (a script watching its workspaces) is the token's to keep open: revoked
    because it leaked, the thief's feed must not go on sending the owner's workspaces and share links."""
    owner = await signed_in(make_browser, served)
    made = (await api(owner, "POST", "/api/v1/tokens", {"name": "watcher"})).json()
    thief = await make_browser(served)
    bearer = {"Host": HUB[7:], "Authorization": f"Bearer {made['token']}", "Accept": "text/event-stream"}
    async with thief.http.get(thief.gateway + "/api/v1/hub/events", headers=bearer) as feed:
        assert feed.status == 200
        assert (await asyncio.wait_for(feed.content.readuntil(b"\n\n"), 10)).startswith(b"event: snapshot")
        assert (await api(owner, "DELETE", f"/api/v1/tokens/{made['id']}")).status == 200
        rest = await asyncio.wait_for(feed.content.read(), 10)  # ends: no timeout, no snapshot after
        assert b"event: snapshot" not in rest, rest
    again = await thief.fetch("GET", HUB + "/api/v1/hub/events", headers={"Accept": "text/event-stream",
                                                                          "Authorization": bearer["Authorization"]})
    assert again.status == 401


# --- what is open ends with what let it in -----------------------------------------------------------------------


@pytest.fixture
async def watched(serve: Serve) -> Served:
    """A heartbeat tick every 0.1 s: an open WebSocket's grant is asked again on each."""
    return await serve(WORKSPACES, listen={"ws1": [13337]}, timeouts={"websocket_heartbeat": 0.2})


class Socket:
    """A test browser's WebSocket, read all along as a page's would be (so the heartbeat's pings are answered)."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self.socket = socket
        self.messages: asyncio.Queue[aiohttp.WSMessage] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            message = await self.socket.receive()
            await self.messages.put(message)
            if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                return

    async def still_open(self) -> bool:
        """Whether it still relays, after several of the gateway's ticks (each would have ended it)."""
        await asyncio.sleep(0.5)
        await self.socket.send_str("still?")
        message = await asyncio.wait_for(self.messages.get(), 5)
        return message.type is aiohttp.WSMsgType.TEXT and message.data == "echo:still?"

    async def ended_for_policy(self) -> bool:
        message = await asyncio.wait_for(self.messages.get(), 5)
        return message.type is aiohttp.WSMsgType.CLOSE and message.data == POLICY_VIOLATION


async def open_socket(browser: Browser, url: str, *, headers: dict[str, str] | None = None) -> Socket:
    """A WebSocket to ``url`` from its own page, with the browser's cookies for its host."""
    parts = urlsplit(url)
    cookies = "; ".join(f"{k}={v}" for k, v in browser.cookies_for(parts.hostname or "").items())
    sent = {"Host": parts.netloc, "Origin": f"http://{parts.netloc}", **({"Cookie": cookies} if cookies else {}),
            **(headers or {})}
    return Socket(await browser.http.ws_connect(URL(browser.gateway + parts.path), headers=CIMultiDict(sent)))


async def all_open(*sockets: Socket) -> bool:
    return all(await asyncio.gather(*(socket.still_open() for socket in sockets)))


async def test_websockets_opened_before_sign_out_end_with_it(watched: Served, make_browser: MakeBrowser) -> None:
    """A WebSocket lives for hours (the IDE's terminal is one): opened with a session, or a copy of its cookie,
    it must not outlive Sign out. Each ends with 1008 (policy violation); one of another sign-in goes on."""
    browser, elsewhere = await signed_in(make_browser, watched), await signed_in(make_browser, watched)
    app, ide = watched.preview("ws1", 3000, "/socket"), watched.ide("ws1", "/socket")
    copy = await make_browser(watched)
    for opened in (browser, elsewhere):
        for url in (app, ide):
            assert (await opened.navigate(url)).status == 200
    for url in (app, ide):
        copy.add_cookie(url, "codehub_session", browser.cookie(url, "codehub_session") or "")
    sockets = [await open_socket(who, url) for who in (browser, copy) for url in (app, ide)]
    others = [await open_socket(elsewhere, url) for url in (app, ide)]
    assert await all_open(*sockets, *others)

    assert (await api(browser, "POST", "/auth/logout")).status == 303
    assert [await socket.ended_for_policy() for socket in sockets] == [True] * 4
    assert await all_open(*others)


async def test_a_websocket_ends_when_its_share_link_is_revoked(watched: Served, make_browser: MakeBrowser) -> None:
    owner = await signed_in(make_browser, watched)
    share = await make_share(owner)
    holder = await make_browser(watched)
    assert (await holder.navigate(watched.preview("ws1", 3000, f"/?codehub_share={share['token']}"))).status == 200
    script = await make_browser(watched)
    url = watched.preview("ws1", 3000, "/socket")
    sockets = [await open_socket(holder, url),
               await open_socket(script, url, headers={"Authorization": f"Bearer {share['token']}"})]
    own = await open_socket(owner, url) if (await owner.navigate(url)).status == 200 else None
    assert own is not None
    assert await all_open(*sockets, own)

    assert (await api(owner, "DELETE", f"/api/v1/workspaces/ws1/shares/{share['id']}")).status == 200
    assert [await socket.ended_for_policy() for socket in sockets] == [True, True]
    assert await own.still_open()


async def test_a_websocket_ends_when_its_port_is_no_longer_shared_with_its_user(watched: Served,
                                                                                 make_browser: MakeBrowser) -> None:
    """bob opened a public port; its owner makes it private: bob's WebSocket ends, the owner's (signed in on the
    preview while it was private) goes on."""
    owner, bob = await signed_in(make_browser, watched), await signed_in(make_browser, watched, "bob")
    url = watched.preview("ws1", 3001, "/socket")

    async def visibility(value: str) -> None:
        page = await api(owner, "PUT", "/api/v1/workspaces/ws1/ports/3001", {"visibility": value})
        assert page.status == 200, page.text

    await visibility("private")
    assert (await owner.navigate(url)).status == 200
    await visibility("public")
    assert (await bob.navigate(url)).status == 200
    own, bobs = await open_socket(owner, url), await open_socket(bob, url)
    assert await all_open(own, bobs)

    await visibility("private")
    assert await bobs.ended_for_policy()
    assert await own.still_open()


async def test_a_websocket_relayed_after_a_wake_ends_with_its_sign_in_too(watched: Served,
                                                                          make_browser: MakeBrowser) -> None:
    """A WebSocket that woke its workspace is relayed by aiohttp's lane, not the fast lane: the same rule holds."""
    browser = await signed_in_ide(make_browser, watched)
    await watched.gateway.runtime.stop("ws1")
    socket = await open_socket(browser, watched.ide("ws1", "/socket"))
    assert await socket.still_open()
    assert (await api(browser, "POST", "/auth/logout")).status == 303
    assert await socket.ended_for_policy()


async def test_a_request_held_through_a_wake_is_asked_again_once_awake(served: Served, make_browser: MakeBrowser,
                                                                      make_upstream: MakeUpstream,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A request held while its workspace wakes waits seconds, up to ``start_timeout``: signed out meanwhile, it is
    answered as it would be if sent now (and logged so: by nobody), and never reaches the app; still signed in, it
    does."""
    caplog.set_level(logging.INFO, logger="codehub.access")
    reached: list[str] = []

    async def app(request: web.Request) -> web.Response:
        reached.append(request.path)
        return web.Response(text="app")

    upstream = web.Application()
    upstream.router.add_get("/{tail:.*}", app)
    browser, other = await signed_in(make_browser, served), await signed_in(make_browser, served)
    url = served.preview("ws1", 3005, "/held")  # nothing listens there yet
    for who in (browser, other):
        assert (await who.navigate(url)).status == 502  # signed in on the preview
    await served.gateway.runtime.stop("ws1")
    held = [asyncio.create_task(who.fetch("GET", url, headers={"Accept": "*/*"})) for who in (browser, other)]
    async with asyncio.timeout(10):
        while served.gateway.metrics.registry.get_sample_value("codehub_held_requests") != 2:  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # (a gauge: nothing to wait on)
    caplog.clear()
    assert (await api(browser, "POST", "/auth/logout")).status == 303
    await make_upstream(upstream, served.config.local.workspaces["ws1"].address or "", 3005)

    refused, let_in = await asyncio.gather(*held)
    assert (refused.status, refused.location) == ((again := await browser.fetch(
        "GET", url, headers={"Accept": "*/*"})).status, again.location)
    assert refused.status in (302, 401)
    assert (let_in.status, let_in.text) == (200, "app")
    assert reached == ["/held"]
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "codehub.access"]
    assert sorted((line["status"], line["user"]) for line in logged if line["path"] == "/held") == [
        (200, "alice"), (refused.status, None), (refused.status, None)]  # the held two, and the one sent after


async def test_the_gateways_own_errors_on_a_port_tell_an_admitted_front_end_why(serve: Serve, tmp_path: Path,
                                                                                  make_browser: MakeBrowser) -> None:
    """A front end on an origin the port's CORS rule admits reads the gateway's error (nothing listening, a wake
    that timed out) instead of an opaque network error, from either lane and after a hold alike."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("cors: [{ports: [3007], allow_origins: ['http://front.test']}]\nwake: {warm_timeout: 1}\n")
    served = await serve(WORKSPACES, policy_file=str(policy))
    browser = await signed_in(make_browser, served)
    url = served.preview("ws1", 3007, "/api")  # nothing listens there
    assert (await browser.navigate(url)).status == 502  # signed in on the preview
    sent = {"Origin": "http://front.test", "Accept": "application/json"}
    answers = [await browser.fetch("GET", url, headers=sent), await browser.fetch("POST", url, headers=sent)]
    await served.gateway.runtime.stop("ws1")
    answers.append(await browser.fetch("GET", url, headers=sent))  # held, until warm_timeout
    assert [(page.status, page.json()["error"]["code"], page.headers.get("Access-Control-Allow-Origin"))
            for page in answers] == [(502, "port-not-listening", "http://front.test")] * 2 + [
        (503, "wake-timeout", "http://front.test")]


async def open_stream(browser: Browser, url: str, stack: contextlib.AsyncExitStack, *,
                      method: str = "GET") -> aiohttp.ClientResponse:
    """An event stream from ``url``'s own page; a POST (with a body) is served by aiohttp's lane, a GET by the
    fast lane."""
    parts = urlsplit(url)
    cookies = "; ".join(f"{k}={v}" for k, v in browser.cookies_for(parts.hostname or "").items())
    headers = {"Host": parts.netloc, "Origin": f"http://{parts.netloc}", "Accept": "text/event-stream",
               "Cookie": cookies}
    response = await stack.enter_async_context(browser.http.request(
        method, URL(browser.gateway + parts.path), headers=headers, data=b"{}" if method == "POST" else None))
    assert response.status == 200
    return response


async def streaming(response: aiohttp.ClientResponse, seconds: float = 0.5) -> bool:
    """Whether events keep coming for ``seconds`` (several of the gateway's checks)."""
    try:
        async with asyncio.timeout(seconds):
            while await response.content.readuntil(b"\n\n"):
                pass
    except TimeoutError:
        return True
    except aiohttp.ClientError:
        return False
    return False


async def test_streams_opened_before_sign_out_end_with_it(watched: Served, make_browser: MakeBrowser) -> None:
    """An event stream never ends by itself: one opened with a session, or a copy of its cookie, is cut at its
    next event after Sign out, in either lane; one of another sign-in goes on."""
    browser, elsewhere = await signed_in(make_browser, watched), await signed_in(make_browser, watched)
    url = watched.preview("ws1", 3000, "/events")
    copy = await make_browser(watched)
    for opened in (browser, elsewhere):
        assert (await opened.navigate(url.replace("/events", "/"))).status == 200
    copy.add_cookie(url, "codehub_session", browser.cookie(url, "codehub_session") or "")
    async with contextlib.AsyncExitStack() as stack:
        streams = [await open_stream(who, url, stack, method=method) for who in (browser, copy)
                   for method in ("GET", "POST")]
        others = [await open_stream(elsewhere, url, stack, method=method) for method in ("GET", "POST")]
        assert [await streaming(stream) for stream in streams + others] == [True] * 6

        assert (await api(browser, "POST", "/auth/logout")).status == 303
        assert [await streaming(stream, 2) for stream in streams] == [False] * 4  # checked every 0.1 s
        assert [await streaming(stream) for stream in others] == [True] * 2


async def test_a_stream_ends_when_its_share_link_is_revoked(watched: Served, make_browser: MakeBrowser) -> None:
    owner = await signed_in(make_browser, watched)
    share = await make_share(owner)
    holder = await make_browser(watched)
    assert (await holder.navigate(watched.preview("ws1", 3000, f"/?codehub_share={share['token']}"))).status == 200
    url = watched.preview("ws1", 3000, "/events")
    assert (await owner.navigate(url.replace("/events", "/"))).status == 200
    async with contextlib.AsyncExitStack() as stack:
        held, own = await open_stream(holder, url, stack), await open_stream(owner, url, stack)
        assert (await streaming(held), await streaming(own)) == (True, True)
        assert (await api(owner, "DELETE", f"/api/v1/workspaces/ws1/shares/{share['id']}")).status == 200
        assert (await streaming(held, 2), await streaming(own)) == (False, True)

async def test_a_websocket_on_a_public_port_ends_with_the_sign_in_it_was_opened_with(
        watched: Served, make_browser: MakeBrowser) -> None:
    """On a public port anyone may open a WebSocket, but one opened signed in told its app who (the owner is known
    to every port of theirs): after Sign out, a copy of the cookie must not go on speaking as them. Planned again,
    it still goes to the same port, anonymously: it ends all the same. An anonymous visitor's goes on."""
    browser = await signed_in(make_browser, watched)
    url = watched.preview("ws1", 3001, "/socket")
    for visibility in ("private", "public"):  # signed in on the preview while it was private
        page = await api(browser, "PUT", "/api/v1/workspaces/ws1/ports/3001", {"visibility": visibility})
        assert page.status == 200, page.text
        assert (await browser.navigate(url)).status == 200
    assert browser.cookie(url, "codehub_session")
    copy, anonymous = await make_browser(watched), await make_browser(watched)
    copy.add_cookie(url, "codehub_session", browser.cookie(url, "codehub_session") or "")
    sockets = [await open_socket(browser, url), await open_socket(copy, url)]
    theirs = await open_socket(anonymous, url)
    assert await all_open(*sockets, theirs)

    assert (await api(browser, "POST", "/auth/logout")).status == 303
    assert [await socket.ended_for_policy() for socket in sockets] == [True, True]
    assert await theirs.still_open()


async def test_websockets_go_on_while_the_token_store_cannot_be_read(watched: Served,
                                                                     make_browser: MakeBrowser) -> None:
    """A store that cannot be read for a while (503 to anything new) does not say a token or link was revoked:
    WebSockets they opened go on (as the hub's feed does), and end once it reads again and says so."""
    owner = await signed_in(make_browser, watched)
    token = (await api(owner, "POST", "/api/v1/tokens", {"name": "terminal"})).json()["token"]
    share = await make_share(owner)
    script = await make_browser(watched)
    url = watched.preview("ws1", 3000, "/socket")
    sockets = [await open_socket(script, url, headers={"Authorization": f"Bearer {token}"}),
               await open_socket(script, url, headers={"Authorization": f"Bearer {share['token']}"})]
    assert await all_open(*sockets)

    store = watched.gateway.config.store_file
    good, mended_at = store.read_bytes(), store.stat()
    with store.open("r+b") as broken:
        broken.write(b"[")
    assert await all_open(*sockets)
    store.write_bytes(good)
    os.utime(store, ns=(mended_at.st_atime_ns, mended_at.st_mtime_ns))
    assert await all_open(*sockets)
    assert (await api(owner, "DELETE", f"/api/v1/workspaces/ws1/shares/{share['id']}")).status == 200
    assert await sockets[1].ended_for_policy()
    assert await sockets[0].still_open()


async def test_dev_sign_in_from_another_site_is_refused(served: Served, make_browser: MakeBrowser) -> None:
    browser = await make_browser(served)
    page = await browser.fetch("POST", HUB + "/auth/dev", headers={"Origin": "http://evil.test",
                                                                   "Accept": "application/json"},
                               data={"user": "mallory"})
    assert page.status == 403
    assert not browser.jar


@pytest.mark.parametrize(("content_type", "body"), [
    ("multipart/form-data", b"--x\r\n"),
    ("application/x-www-form-urlencoded; charset=no-such-codec", b"user=alice&next=/"),
], ids=["no-boundary", "unknown-charset"])
async def test_a_dev_sign_in_form_no_browser_sends_is_a_400_that_says_so(served: Served, make_browser: MakeBrowser,
                                                                       content_type: str, body: bytes) -> None:
    """A script's mistake, told as one (not a 500 logged as the gateway's bug), and it signs nobody in."""
    browser = await make_browser(served)
    page = await browser.fetch("POST", HUB + "/auth/dev", data=body, headers={
        "Origin": HUB, "Content-Type": content_type, "Accept": "application/json"})
    assert page.status == 400, page.text
    assert page.json()["error"]["code"] == "bad-form"
    assert not browser.jar


@pytest.mark.parametrize(
    ("host", "env", "ok"),
    [
        ("0.0.0.0", {}, False),
        ("10.1.2.3", {}, False),
        ("::", {}, False),
        ("gateway.example.com", {}, False),
        ("0.0.0.0", {"CODEHUB_AUTH__ALLOW_DEV_ON_NETWORK": "true"}, True),
        ("127.0.0.1", {}, True),
        ("127.0.0.5", {}, True),
        ("::1", {}, True),
        ("localhost", {}, True),
        ("0.0.0.0", {"CODEHUB_AUTH__MODE": "oidc", "CODEHUB_AUTH__OIDC__ISSUER": "https://sso.example.com",
                     "CODEHUB_AUTH__OIDC__CLIENT_ID": "gw"}, True),
    ],
)
def test_dev_sign_in_refuses_a_network_address(tmp_path: Path, host: str, env: dict[str, str], ok: bool) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(f'hub_url: http://localhost:8080\npreview_domain: localhost:8080\nlisten:\n  host: "{host}"\n')
    if ok:
        load_config(config, env)
        return
    with pytest.raises(ConfigError, match="allow_dev_on_network"):
        load_config(config, env)


async def test_dev_sign_in_is_off_in_oidc_mode(serve: Serve, make_browser: MakeBrowser) -> None:
    served = await serve(WORKSPACES, auth={"mode": "oidc", "oidc": {"issuer": "http://127.0.0.1:9",
                                                                    "client_id": "gw"}})
    browser = await make_browser(served)
    page = await browser.fetch("POST", HUB + "/auth/dev", headers={"Origin": HUB, "Accept": "application/json"},
                               data={"user": "alice"})
    assert page.status == 403
    assert page.json()["error"]["code"] == "dev-sign-in-off"
    assert not browser.jar
    form = await browser.fetch("GET", HUB + "/auth/dev?next=/tokens", headers={"Accept": "text/html"})
    assert (form.status, form.location) == (302, HUB + "/auth/login?next=/tokens"), "the SSO's sign-in instead"


async def test_signing_in_on_a_dev_gateway_is_its_form_and_keeps_where_the_visitor_was_going(
        served: Served, make_browser: MakeBrowser) -> None:
    """The other side of the test above: every "Sign in" link (``/auth/login``) leads to the development form."""
    browser = await make_browser(served)
    login = await browser.fetch("GET", HUB + "/auth/login?next=/tokens", headers={"Accept": "text/html"})
    assert (login.status, login.location) == (302, HUB + "/auth/dev?next=/tokens")


@pytest.mark.parametrize(("asked", "kept"), [
    ("/tokens?x=1", "/tokens?x=1"), ("//evil.test", "/evil.test"), ("https://evil.test", "/"), (None, "/")])
async def test_the_dev_sign_in_form_keeps_where_the_visitor_was_going(served: Served, make_browser: MakeBrowser,
                                                                     asked: str | None, kept: str) -> None:
    """The form's ``next`` is where the sign-in lands: a local path of the hub's, never another site."""
    browser = await make_browser(served)
    query = f"?next={quote(asked, safe='')}" if asked is not None else ""
    form = await browser.fetch("GET", HUB + "/auth/dev" + query, headers={"Accept": "text/html"})
    assert form.status == 200, form.text
    assert f'<input type="hidden" name="next" value="{html.escape(kept)}">' in form.text
    assert "Signed in as" not in form.text
    assert (await browser.dev_sign_in(served.hub, "alice")).status == 303
    again = await browser.fetch("GET", HUB + "/auth/dev", headers={"Accept": "text/html"})
    assert "Signed in as <strong>alice</strong>" in again.text


@pytest.mark.parametrize(("form", "code"), [
    ({}, "bad-user-name"),
    ({"user": ""}, "bad-user-name"),
    ({"user": "   "}, "bad-user-name"),
    ({"user": "al ice"}, "bad-user-name"),
    ({"user": "x" * 65}, "bad-user-name"),
    ({"user": "al\x01ice"}, "bad-identity"),  # not a space, yet no header may carry it
    ({"user": "alice", "email": "alice@x.test\x7f"}, "bad-identity"),
    ({"user": "alice", "groups": "dev,q\x00a"}, "bad-identity"),
])
async def test_dev_sign_in_refuses_names_no_header_could_carry(served: Served, make_browser: MakeBrowser,
                                                               form: dict[str, str], code: str) -> None:
    """The dev form is a sign-in like the SSO's: what it would make an identity of is checked the same way, and a
    refused one signs nobody in."""
    browser = await make_browser(served)
    page = await browser.fetch("POST", HUB + "/auth/dev", headers={"Origin": HUB, "Accept": "application/json"},
                               data={"next": "/", **form})
    assert page.status == 400, page.text
    assert page.json()["error"]["code"] == code
    assert not browser.jar
    longest = await browser.fetch("POST", HUB + "/auth/dev", headers={"Origin": HUB}, data={"user": "x" * 64})
    assert longest.status == 303


async def test_signing_out_without_a_sign_in_just_lands_on_the_hub(served: Served, make_browser: MakeBrowser) -> None:
    """A second click on Sign out (another tab did it already), or a browser whose cookie expired: nothing to end,
    and no error page either."""
    browser = await make_browser(served)
    page = await api(browser, "POST", "/auth/logout")
    assert (page.status, page.location) == (303, HUB + "/"), page.text
    assert page.text == ""  # a redirect, not an error document that happens to carry a Location
    (expired,) = page.set_cookies
    assert expired.startswith("codehub_session=;")
    assert attributes(expired)["max-age"] == "0"


async def test_the_sign_in_popup_hands_its_code_to_the_framed_preview_and_leaks_it_nowhere(
        served: Served, make_browser: MakeBrowser) -> None:
    """The popup lands on the preview's own origin with a one-minute code in its URL: the page passes it on to the
    frame that opened it (or to the callback), with a local ``next``, and is neither cached nor a Referer's source."""
    browser = await signed_in(make_browser, served)
    preview = served.preview("ws1", 3000, "/p")
    framed = await browser.fetch("GET", preview, headers={"Accept": "text/html", "Sec-Fetch-Mode": "navigate",
                                                          "Sec-Fetch-Dest": "iframe"})
    handoff = json.loads(framed.text.split("const handoff = ", 1)[1].split(";", 1)[0])
    sent = await browser.fetch("GET", handoff)
    assert sent.status == 302, sent.text
    landing = URL(sent.location or "")
    assert (landing.host, landing.path, landing.query["next"]) == ("3000-ws1.localhost", "/_codehub/auth/popup", "/p")
    popup = await browser.fetch("GET", str(landing), headers={"Accept": "text/html"})
    assert popup.status == 200, popup.text
    assert popup.headers["Cache-Control"] == "no-store"
    assert popup.headers["Referrer-Policy"] == "no-referrer"
    assert f'code: {json.dumps(landing.query["code"])}, next: "/p"' in popup.text
    forged = await browser.fetch("GET", served.preview("ws1", 3000, "/_codehub/auth/popup?code=x&next=https://evil.test"),
                                 headers={"Accept": "text/html"})
    assert 'next: "/"' in forged.text


async def test_a_handoff_code_replayed_with_its_state_cookie_is_refused(served: Served,
                                                                        make_browser: MakeBrowser) -> None:
    """The state cookie binds a code to a browser, and the token store makes it good once: a copy of the browser
    taken before the code was used (its state cookie and the code's URL) gets no second session."""
    browser = await signed_in(make_browser, served)
    app = served.preview("ws1", 3000, "/p")
    callback = await browser.navigate_until(app, lambda url: "/_codehub/auth/callback" in url)
    state = browser.cookie(app, "codehub_handoff")
    assert state
    used = await browser.fetch("GET", callback)
    assert used.status == 303
    (ended,) = [cookie for cookie in used.set_cookies if cookie.startswith("codehub_handoff=")]
    assert attributes(ended)["max-age"] == "0", "the state cookie goes with the code it bound"
    copy = await make_browser(served)
    copy.add_cookie(app, "codehub_handoff", state)
    replay = await copy.fetch("GET", callback, headers={"Accept": "application/json"})
    assert replay.status == 400, replay.text
    assert replay.json()["error"]["code"] == "handoff-replayed"
    assert copy.cookie(app, "codehub_session") is None


async def test_tabs_of_one_preview_that_set_out_together_each_reach_it(served: Served,
                                                                       make_browser: MakeBrowser) -> None:
    """Two tabs of one preview host sent to sign in at the same moment each set a state cookie before either came
    back: the first tab's code is bound to a state the browser no longer holds. It is not used: that tab starts
    again from its page, with the state that stayed, and lands there; the other tab's code works as it is."""
    browser = await signed_in(make_browser, served)
    first, second = served.preview("ws1", 3000, "/one?a=1"), served.preview("ws1", 3000, "/two")
    nav = {"Accept": "text/html"}
    sent = [await browser.fetch("GET", tab, headers=nav, send_cookies=False) for tab in (first, second)]
    assert [page.status for page in sent] == [302, 302]
    state = browser.cookie(first, "codehub_handoff")
    assert state
    assert state in (sent[1].location or "")
    assert state not in (sent[0].location or "")

    code = await browser.fetch("GET", sent[0].location or "", headers=nav)  # the hub hands off at once
    again = await browser.fetch("GET", code.location or "", headers=nav)
    assert (again.status, again.location, again.set_cookies) == (303, first, [])
    page = await browser.navigate(first)
    assert (page.status, page.json()["path"]) == (200, "/one?a=1")
    page = await browser.navigate(sent[1].location or "")
    assert (page.status, page.url, page.json()["path"]) == (200, second, "/two")


async def test_a_hand_off_state_cookie_is_kept_for_the_next_tab_only_in_the_shape_the_gateway_gives_it(
        served: Served, make_browser: MakeBrowser) -> None:
    """A state this gateway could have set (24 URL-safe characters) is kept for the next tab's sign-in. Any other
    value (planted over plain HTTP by a page on the shared parent domain, say) is replaced at the next sign-in and,
    at a callback, is the plain mismatch page rather than a reason to start again (a loop of redirects)."""
    browser = await signed_in(make_browser, served)
    app = served.preview("ws1", 3000, "/p")
    browser.add_cookie(app, "codehub_handoff", "A-_z" * 6)
    sent = await browser.fetch("GET", app, headers={"Accept": "text/html"})
    assert "state=" + "A-_z" * 6 in (sent.location or "")
    assert not sent.set_cookies, "not set again: it lasts five minutes from the first sign-in that set it"
    browser.add_cookie(app, "codehub_handoff", "planted")
    sent = await browser.fetch("GET", app, headers={"Accept": "text/html"})
    state = browser.cookie(app, "codehub_handoff")
    assert state != "planted"
    (set_state,) = [cookie for cookie in sent.set_cookies if cookie.startswith("codehub_handoff=")]
    assert attributes(set_state)["max-age"] == "300", "five minutes from the sign-in that sets it"
    assert f"state={state}" in (sent.location or "")
    code = await browser.fetch("GET", sent.location or "", headers={"Accept": "text/html"})
    browser.add_cookie(app, "codehub_handoff", "x" * 23)
    refused = await browser.fetch("GET", code.location or "", headers={"Accept": "application/json"})
    assert (refused.status, refused.json()["error"]["code"]) == (400, "handoff-state-mismatch")


@pytest.mark.parametrize(("form", "email"), [({"user": "bob"}, "bob@example.com"),
                                             ({"user": "bob@corp.test"}, "bob@corp.test"),
                                             ({"user": "bob", "email": " b@x.test "}, "b@x.test")])
async def test_the_dev_sign_in_makes_an_email_address_for_a_user_name(served: Served, make_browser: MakeBrowser,
                                                                      form: dict[str, str], email: str) -> None:
    browser = await make_browser(served)
    assert (await browser.fetch("POST", HUB + "/auth/dev", headers={"Origin": HUB}, data=form)).status == 303
    assert (await api(browser, "GET", "/api/v1/me")).json()["email"] == email


@pytest.mark.parametrize(("form", "groups", "lands"), [
    ({"user": "bob"}, [], "/"),
    ({"user": "bob", "groups": " qa, dev ,", "next": "/tokens"}, ["qa", "dev"], "/tokens"),
])
async def test_the_dev_sign_in_gives_the_groups_listed_and_lands_where_it_was_going(
        served: Served, make_browser: MakeBrowser, form: dict[str, str], groups: list[str], lands: str) -> None:
    """Groups decide who sees what (``group:NAME`` in a workspace's members and the policy): a form that lists none
    makes a member of none, and a comma-separated list makes one group of each name."""
    browser = await make_browser(served)
    page = await browser.fetch("POST", HUB + "/auth/dev", headers={"Origin": HUB}, data=form)
    assert (page.status, page.location) == (303, HUB + lands)
    assert (await api(browser, "GET", "/api/v1/me")).json()["groups"] == groups

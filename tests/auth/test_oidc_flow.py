"""Sign-in through a real OpenID Connect provider (oidc-provider), driven like a browser through the gateway."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from yarl import URL

from gateway.auth import oidc
from gateway.auth.oidc import IdpUnavailable, OidcClient, Pkce, SignInFailed
from gateway.auth.sessions import SIGN_INS_PER_HOUR
from gateway.config import Oidc
from gateway.web import auth_routes
from tests.auth.browser import Browser, Page
from tests.auth.conftest import MakeBrowser, Serve, Served, oidc_settings, seen_headers
from tests.peers.idp.fixture import IdP, login_via_idp, start_idp

pytestmark = pytest.mark.timeout(90)

WORKSPACES: dict[str, dict[str, Any]] = {
    "ws1": {"owner": "alice", "ports": {3000: "private", 3001: "public", 3002: "org"}},
    "ws2": {"owner": "admin-x", "collaborators": ["alice@example.com"], "ports": {4000: "private"}},
}
CLICKED = "/deep/a%20b/?x=1&y=a%2Bb+c&z=%26amp&e=%C3%A9"


@pytest.fixture
async def served(serve: Serve, idp: IdP, gateway_port: int, tmp_path: Path) -> Served:
    return await serve(WORKSPACES, port=gateway_port, **oidc_settings(idp, gateway_port))


async def test_private_preview_signs_in_once_and_lands_on_the_clicked_url(
    served: Served, idp: IdP, make_browser: MakeBrowser
) -> None:
    browser = await make_browser(served, login="alice", idp=idp)
    page = await browser.navigate(served.preview("ws1", 3000, CLICKED))
    assert page.status == 200, page.text
    assert page.url == served.preview("ws1", 3000, CLICKED)
    assert page.json()["path"] == CLICKED
    assert browser.idp_visits == 1
    hub_steps = [url for url in browser.visited if url.startswith(served.hub + "/auth/")]
    assert any(url.startswith(served.hub + "/auth/handoff") for url in hub_steps)
    assert any(url.startswith(served.hub + "/auth/callback") for url in hub_steps)

    # Another workspace, another port: the hub session is reused through the hand-off, no IdP login.
    visited = len(browser.visited)
    other = await browser.navigate(served.preview("ws2", 4000, "/other?q=1"))
    assert other.status == 200, other.text
    assert other.json()["path"] == "/other?q=1"
    assert browser.idp_visits == 1
    assert not any("/auth/login" in url for url in browser.visited[visited:])

    # The preview host now has its own session: no redirect at all.
    visited = len(browser.visited)
    again = await browser.navigate(served.preview("ws1", 3000, "/again"))
    assert again.status == 200
    assert browser.visited[visited:] == [served.preview("ws1", 3000, "/again")]


async def test_tabs_that_start_signing_in_together_each_land_where_they_were_going(
    served: Served, idp: IdP, make_browser: MakeBrowser
) -> None:
    """A browser that restores its tabs, or someone opening several links from a chat while signed out, starts
    several sign-ins at once in one browser, two of them on the same preview: each lands on its own page, not
    only the one started last (whose state cookies, on the hub and on the preview, replaced the others')."""
    browser = await make_browser(served, login="alice", idp=idp)
    tabs = [served.preview("ws1", 3000, "/first"), served.preview("ws1", 3000, "/second?q=2"),
            served.preview("ws2", 4000, "/third")]
    at_idp = [await browser.navigate_until(tab, lambda url: url.startswith(idp.issuer)) for tab in tabs]
    for tab, authorize in zip(tabs, at_idp, strict=True):
        page = await browser.navigate(authorize)
        assert (page.status, page.url) == (200, tab), page.text
    assert browser.idp_visits == 3


async def test_a_sign_in_pushed_out_of_the_cookie_goes_on_without_its_code(
    served: Served, idp: IdP, make_browser: MakeBrowser
) -> None:
    """The login cookie keeps the four newest sign-ins under way. A callback for one it no longer holds (a fifth
    start pushed it out, or tabs that started at the same moment each wrote the cookie) never uses its code: while
    others are under way it starts again (its cookies work), once the browser is signed in it goes on to where it
    was going, and with neither it is the stale sign-in's 400. Each callback takes only its own sign-in away."""
    browser = await make_browser(served, login="alice", idp=idp)

    async def start(next_path: str) -> str:
        login = await browser.fetch("GET", served.hub + "/auth/login?" + urlencode({"next": next_path}))
        assert login.status == 302
        return login.location or ""

    async def finish(authorize: str) -> Page:
        back = await login_via_idp(browser.idp_http, authorize, "alice", issuer=idp.issuer)  # type: ignore[arg-type]
        return await browser.fetch("GET", back, headers={"Accept": "text/html"})

    started = [await start(f"/api/v1/me?n={n}") for n in range(5)]
    again = await finish(started[0])
    assert again.status == 303
    assert (again.location or "").startswith(served.hub + "/auth/login?")
    assert parse_qs(urlsplit(again.location or "").query) == {"next": ["/api/v1/me?n=0"]}
    assert not again.set_cookies, "no session from a sign-in this browser no longer holds"
    for n in (4, 2, 1, 3):
        landed = await finish(started[n])
        assert (landed.status, landed.location) == (303, served.hub + f"/api/v1/me?n={n}")
        assert landed.set_cookies
    assert browser.cookie(served.hub, "codehub_login") is None  # the last one took the cookie with it
    on = await finish(started[0])
    assert (on.status, on.location, on.set_cookies) == (303, served.hub + "/api/v1/me?n=0", [])

    stranger = await make_browser(served, login="alice", idp=idp)  # no sign-in under way, none done
    back = await login_via_idp(browser.idp_http, await start("/x"), "alice", issuer=idp.issuer)  # type: ignore[arg-type]
    refused = await stranger.fetch("GET", back, headers={"Accept": "application/json"})
    assert (refused.status, refused.json()["error"]["code"]) == (400, "sign-in-state-mismatch")


@pytest.mark.parametrize(("going", "lands"), [
    ("//evil.test/x", "/evil.test/x"), ("https://evil.test/", "/"), ("/\\evil.test", "/evil.test"),
    ("/a\nb", "/"), (None, None), ("not sealed", None), ("", None),
])
async def test_a_callback_state_the_browser_does_not_hold_sends_nowhere_but_this_hub(
    served: Served, idp: IdP, make_browser: MakeBrowser, going: str | None, lands: str | None
) -> None:
    """Where a state says it was going is read only when this gateway sealed it for a sign-in, and then as every
    ``next`` is: a path on the hub. A state with nothing after its secret, or anything else there, is the stale
    sign-in's 400 (``going`` None: no dot at all; the other refused ones stand after the dot as they are)."""
    browser = await make_browser(served, login="alice", idp=idp)
    assert (await browser.navigate(served.preview("ws1", 3000, "/"))).status == 200  # signed in at the hub
    state = "s" * 24
    if going is not None:
        sealed = served.gateway.auth.sessions.seal_state({"next": going}, f"sign-in {served.gateway.hosts.hub}", 600)
        state += "." + (sealed if lands is not None else going)
    page = await browser.fetch("GET", served.hub + "/auth/callback?" + urlencode({"code": "x", "state": state}))
    assert (page.status, page.location) == ((303, served.hub + lands) if lands is not None else (400, None))
    assert not page.set_cookies


async def test_the_login_cookie_stays_small_whatever_a_page_sends_to_sign_in(
    served: Served, idp: IdP, make_browser: MakeBrowser
) -> None:
    """Any page can send a visitor to ``/auth/login`` with a ``next`` of its choosing: the login cookie does not
    keep it (the sealed state does), so four sign-ins under way fit in 1.3 KB and cannot push the hub's Cookie
    header past what the gateway reads. Each lands on its own ``next``."""
    browser = await make_browser(served, login="alice", idp=idp)
    starts = []
    for n in range(4):
        login = await browser.fetch("GET", served.hub + "/auth/login?" + urlencode({"next": f"/{n}?" + "x" * 990}))
        (kept,) = login.set_cookies
        assert len(kept.partition(";")[0]) <= 1300
        starts.append(login.location or "")
    for n in (3, 0, 2, 1):
        back = await login_via_idp(browser.idp_http, starts[n], "alice", issuer=idp.issuer)  # type: ignore[arg-type]
        landed = await browser.fetch("GET", back)
        assert (landed.status, landed.location) == (303, served.hub + f"/{n}?" + "x" * 990)


async def test_a_sign_in_under_way_is_held_ten_minutes_from_its_own_start(
    served: Served, idp: IdP, make_browser: MakeBrowser, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each start writes the login cookie again, for ten minutes: the sign-ins it holds each keep their own ten
    minutes all the same, so one abandoned at the IdP (its state is in the IdP's logs) does not live on while
    others begin: its callback is a lost one's, which never uses the code."""
    browser = await make_browser(served, login="alice", idp=idp)
    first = await browser.fetch("GET", served.hub + "/auth/login?next=/first")
    real = time.time
    monkeypatch.setattr(auth_routes, "time", SimpleNamespace(time=lambda: real() + 590))
    second = await browser.fetch("GET", served.hub + "/auth/login?next=/second")
    monkeypatch.setattr(auth_routes, "time", SimpleNamespace(time=lambda: real() + 601))
    back = await login_via_idp(browser.idp_http, first.location or "", "alice", issuer=idp.issuer)  # type: ignore[arg-type]
    page = await browser.fetch("GET", back)  # not signed in with: started again
    assert (page.status, page.set_cookies) == (303, [])
    assert (page.location or "").startswith(served.hub + "/auth/login?next=")
    back = await login_via_idp(browser.idp_http, second.location or "", "alice", issuer=idp.issuer)  # type: ignore[arg-type]
    page = await browser.fetch("GET", back)
    assert (page.status, page.location) == (303, served.hub + "/second")


async def test_the_state_carries_where_a_sign_in_goes_up_to_about_1000_characters(
    served: Served, idp: IdP, make_browser: MakeBrowser
) -> None:
    """The state travels in the IdP's address, so a ``next`` whose sealed form would pass 1.5 KB (about 1,000
    ASCII characters; a non-ASCII one takes six as JSON) is not put in it: that sign-in lands on the hub's page."""
    browser = await make_browser(served, login="alice", idp=idp)
    kept = "/api/v1/me?pad=" + "x" * (1000 - len("/api/v1/me?pad="))
    for next_path, lands in ((kept, kept), (kept + "x" * 200, "/"), ("/api/v1/me?pad=" + "é" * 300, "/")):
        login = await browser.fetch("GET", served.hub + "/auth/login?" + urlencode({"next": next_path}))
        assert len(parse_qs(urlsplit(login.location or "").query)["state"][0]) <= 1600
        back = await login_via_idp(browser.idp_http, login.location or "", "alice", issuer=idp.issuer)  # type: ignore[arg-type]
        landed = await browser.fetch("GET", back)
        assert (landed.status, landed.location) == (303, served.hub + lands)


async def test_signed_out_the_hub_offers_the_sso_sign_in_with_no_word_of_development(
    served: Served, make_browser: MakeBrowser
) -> None:
    """"(development)" on the sign-in button is for a gateway where anyone may name themselves; with an IdP the
    hub's pages offer its sign-in as it is."""
    browser = await make_browser(served)
    for path in ("/", "/tokens"):
        page = await browser.navigate(served.hub + path)
        assert page.status == 200, page.text
        assert f'href="/auth/login?next={path}">Sign in</a>' in page.text


async def test_upstream_learns_who_calls_and_nothing_of_ours(
    served: Served, idp: IdP, make_browser: MakeBrowser
) -> None:
    browser = await make_browser(served, login="alice", idp=idp)
    url = served.preview("ws1", 3000, "/whoami")
    browser.add_cookie(url, "theme", "dark")
    forged = {"X-Forwarded-User": "mallory", "X-Forwarded-Email": "mallory@evil.test",
              "X-Forwarded-Groups": "admins", "X-Codehub-Assertion": "forged.token.here"}
    page = await browser.navigate(url, headers=forged)
    assert page.status == 200, page.text
    seen = seen_headers(page.json())
    assert seen["x-forwarded-user"] == ["alice"]
    assert seen["x-forwarded-email"] == ["alice@example.com"]
    assert "x-forwarded-groups" not in seen, "groups leave only when the policy lists them"
    assert seen["cookie"] == ["theme=dark"]
    assert "authorization" not in seen

    jwks = (await browser.fetch("GET", served.hub + "/.well-known/jwks.json")).json()
    assertion = seen["x-codehub-assertion"][0]
    key = jwt.PyJWKSet.from_dict(jwks)[jwt.get_unverified_header(assertion)["kid"]]
    claims = jwt.decode(assertion, key.key, algorithms=["EdDSA"], audience=served.preview("ws1", 3000, ""),
                        issuer=served.hub)
    assert (claims["sub"], claims["email"], claims["groups"]) == ("alice", "alice@example.com", [])
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(assertion, key.key, algorithms=["EdDSA"], audience=served.preview("ws2", 4000, ""),
                   issuer=served.hub)

    # Anonymous on a public port: forged identity headers are removed, none are added.
    public = await browser.navigate(served.preview("ws1", 3001, "/"), headers=forged)
    seen = seen_headers(public.json())
    assert not {"x-forwarded-user", "x-forwarded-email", "x-forwarded-groups", "x-codehub-assertion"} & set(seen)


@pytest.mark.parametrize("path", ["/api/data", "/"])
async def test_api_client_without_credentials_gets_json_401(served: Served, make_browser: MakeBrowser,
                                                            path: str) -> None:
    browser = await make_browser(served)
    for headers in ({"Accept": "application/json"}, {"Accept": "text/html", "X-Requested-With": "XMLHttpRequest"},
                    {"Accept": "*/*", "Sec-Fetch-Mode": "cors"}):
        page = await browser.fetch("GET", served.preview("ws1", 3000, path), headers=headers)
        assert page.status == 401
        assert page.content_type == "application/json"
        assert "Location" not in page.headers
        assert page.json()["error"]["code"] == "user-unauthenticated"
        assert page.headers["WWW-Authenticate"].startswith("Bearer")
    api = await browser.fetch("GET", served.hub + "/api/v1/workspaces", headers={"Accept": "text/html"})
    assert api.status == 401
    assert api.content_type == "application/json"


async def test_signed_in_but_not_shared_gets_a_403_page_not_another_sign_in(
    served: Served, idp: IdP, make_browser: MakeBrowser
) -> None:
    browser = await make_browser(served, login="guest-x", idp=idp)
    page = await browser.navigate(served.preview("ws1", 3000, "/"))
    assert page.status == 403
    assert page.content_type == "text/html"
    assert "not been shared with you" in page.text
    assert browser.idp_visits == 1


@pytest.mark.parametrize(
    ("policy", "admitted", "refused"),
    [
        ("org:\n  groups: [qa]\n", "bob+qa+ops", "guest-x"),
        ("org:\n  email_domains: [corp.test]\n", "carol@corp.test", "carol@corp.test.evil"),
        ("org:\n  claims:\n    email_verified: true\n    preferred_username: guest-y\n", "guest-y", "guest-x"),
        ("org:\n  users: [guest-z]\n", "guest-z", "guest-x"),
    ],
    ids=["group", "email-domain", "claims", "user"],
)
async def test_org_port_admits_by_policy(serve: Serve, idp: IdP, gateway_port: int, tmp_path: Path,
                                         make_browser: MakeBrowser, policy: str, admitted: str,
                                         refused: str) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(policy)
    served = await serve(WORKSPACES, port=gateway_port, policy_file=str(policy_file),
                         **oidc_settings(idp, gateway_port))
    member = await make_browser(served, login=admitted, idp=idp)
    page = await member.navigate(served.preview("ws1", 3002, "/"))
    assert page.status == 200, page.text
    assert "x-forwarded-user" not in seen_headers(page.json()), "admitted, but the app learns nothing of a visitor"
    outsider = await make_browser(served, login=refused, idp=idp)
    page = await outsider.navigate(served.preview("ws1", 3002, "/"))
    assert page.status == 403, page.text
    assert "not admitted" in page.text


async def test_idp_down_gives_a_clear_page_and_nothing_else_breaks(
    served: Served, idp: IdP, make_browser: MakeBrowser
) -> None:
    signed_in = await make_browser(served, login="alice", idp=idp)
    assert (await signed_in.navigate(served.preview("ws1", 3000, "/"))).status == 200
    await idp.stop()

    for browser in (await make_browser(served, idp=idp), await make_browser(served, idp=idp)):
        page = await browser.navigate(served.preview("ws1", 3000, "/x"))
        assert page.status == 502, page.text
        assert page.content_type == "text/html"
        assert "Sign-in is unavailable" in page.text
        assert "Traceback" not in page.text
        assert browser.idp_visits == 0, "the browser was sent to an IdP that is down"
        public = await browser.navigate(served.preview("ws1", 3001, "/"))
        assert public.status == 200

    # People already signed in keep working: previews, other previews via the hand-off, the API.
    assert (await signed_in.navigate(served.preview("ws1", 3000, "/still"))).status == 200
    assert (await signed_in.navigate(served.preview("ws2", 4000, "/"))).status == 200

    await idp.start()
    browser = await make_browser(served, login="alice", idp=idp)
    assert (await browser.navigate(served.preview("ws1", 3000, "/back"))).status == 200


async def _sign_out(browser: Browser, served: Served) -> Page:
    page = await browser.fetch("POST", served.hub + "/auth/logout", headers={"Origin": served.hub})
    assert page.status == 303, page.text
    return page


async def test_sign_out_sends_the_browser_to_end_the_idps_session_too(
    served: Served, idp: IdP, make_browser: MakeBrowser
) -> None:
    """RP-initiated logout at the endpoint the IdP's discovery names, back to the hub; with the IdP down the gateway's
    own sign-out still happens and the browser stays on the hub instead of a dead address."""
    app = served.preview("ws1", 3000, "/")
    browser = await make_browser(served, login="alice", idp=idp)
    assert (await browser.navigate(app)).status == 200
    async with aiohttp.ClientSession() as http, http.get(f"{idp.issuer}/.well-known/openid-configuration") as found:
        endpoint = (await found.json())["end_session_endpoint"]
    location = URL((await _sign_out(browser, served)).location or "")
    assert str(location.with_query(None)) == endpoint
    assert {**location.query, "id_token_hint": "…"} == {"client_id": idp.client_id, "id_token_hint": "…",
                                                         "post_logout_redirect_uri": served.hub + "/"}
    assert (await browser.fetch("GET", app, headers={"Accept": "application/json"})).status == 401

    other = await make_browser(served, login="alice", idp=idp)
    assert (await other.navigate(app)).status == 200
    await idp.stop()
    assert (await _sign_out(other, served)).location == served.hub + "/"
    assert (await other.fetch("GET", app, headers={"Accept": "application/json"})).status == 401


async def test_sign_out_hands_the_idp_the_id_token_it_issued_and_its_session_ends(
    served: Served, idp: IdP, make_browser: MakeBrowser
) -> None:
    """Some IdPs (Okta) end their session at RP-initiated logout only for an ``id_token_hint``: the ID token of the
    sign-in, which the hub keeps sealed in a cookie of its own for that. oidc-provider checks the hint (its
    signature, that it was issued to this client) before it offers to end its session; after that, a sign-in asks
    for a password again."""
    browser = await make_browser(served, login="alice", idp=idp)
    assert (await browser.navigate(served.preview("ws1", 3000, "/"))).status == 200
    assert "alice" not in (browser.cookie(served.hub, "codehub_idtoken") or "alice"), "kept sealed"
    assert browser.idp_http is not None
    assert not await _idp_asks_for_a_password(browser, served, idp)
    location = URL((await _sign_out(browser, served)).location or "")
    hint = jwt.decode(location.query["id_token_hint"], options={"verify_signature": False})
    assert (hint["sub"], hint["aud"], hint["iss"]) == ("alice", idp.client_id, idp.issuer)
    assert browser.cookie(served.hub, "codehub_idtoken") is None

    async with browser.idp_http.get(str(location), allow_redirects=False) as asked:
        page = await asked.text()
        assert asked.status == 200, page + idp.log_tail(3000)
    xsrf = re.search(r'name="xsrf" value="([^"]+)"', page)
    action = re.search(r'<form[^>]+action="([^"]+)"', page)
    assert xsrf, page
    assert action, page
    async with browser.idp_http.post(urljoin(str(location), action[1]), data={"xsrf": xsrf[1], "logout": "yes"},
                                     allow_redirects=False) as ended:
        assert (ended.status, ended.headers.get("Location")) == (303, served.hub + "/")
    assert await _idp_asks_for_a_password(browser, served, idp)


async def _idp_asks_for_a_password(browser: Browser, served: Served, idp: IdP) -> bool:
    """Whether a sign-in started now stops at the IdP's login form, rather than coming straight back."""
    url = await browser.navigate_until(served.hub + "/auth/login", lambda url: url.startswith(idp.issuer))
    assert browser.idp_http is not None
    for _ in range(10):
        async with browser.idp_http.get(url, allow_redirects=False) as answer:
            if answer.status not in (302, 303):
                return 'name="password"' in await answer.text()
            url = urljoin(url, answer.headers["Location"])
        if not url.startswith(idp.issuer):
            return False
    raise AssertionError("the IdP kept redirecting")


async def test_an_id_token_cookie_that_does_not_open_is_not_sent_to_the_idp(
    served: Served, idp: IdP, make_browser: MakeBrowser
) -> None:
    """A cookie of that name planted on the hub's host (over plain HTTP, from a page on the parent domain) or cut
    short does not open: the sign-out goes to the IdP without a hint, as for a sign-in from before it was kept."""
    browser = await make_browser(served, login="alice", idp=idp)
    assert (await browser.navigate(served.preview("ws1", 3000, "/"))).status == 200
    kept = browser.cookie(served.hub, "codehub_idtoken") or ""
    sealed_elsewhere = served.gateway.auth.sessions.seal_state({"id_token": "x.y.z"}, served.gateway.hosts.hub, 600)
    for planted in (kept[:-2], sealed_elsewhere):  # cut short; sealed by the gateway, but for another use
        browser.add_cookie(served.hub, "codehub_idtoken", planted)
        location = URL((await _sign_out(browser, served)).location or "")
        assert set(location.query) == {"client_id", "post_logout_redirect_uri"}
    assert browser.cookie(served.hub, "codehub_idtoken") is None  # none at all, as before it was kept
    location = URL((await _sign_out(browser, served)).location or "")
    assert set(location.query) == {"client_id", "post_logout_redirect_uri"}


async def test_sign_out_can_leave_the_idps_session_alone(serve: Serve, idp: IdP, gateway_port: int,
                                                        make_browser: MakeBrowser) -> None:
    settings = oidc_settings(idp, gateway_port)
    settings["auth"]["oidc"]["sign_out_at_idp"] = False
    served = await serve(WORKSPACES, port=gateway_port, **settings)
    browser = await make_browser(served, login="alice", idp=idp)
    assert (await browser.navigate(served.preview("ws1", 3000, "/"))).status == 200
    assert browser.cookie(served.hub, "codehub_idtoken") is None  # kept only to hand to the IdP
    assert (await _sign_out(browser, served)).location == served.hub + "/"


async def test_idp_down_before_first_sign_in(served: Served, idp: IdP, make_browser: MakeBrowser,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """The visitor gets a page; the operator gets a line in the log saying which of the IdP's addresses failed."""
    await idp.stop()
    browser = await make_browser(served, idp=idp)
    page = await browser.navigate(served.hub + "/auth/login?next=/")
    assert page.status == 502
    assert "Sign-in is unavailable" in page.text
    assert [record for record in caplog.records if record.name == oidc.log.name
            and record.getMessage().startswith("IdP discovery unreachable: ")], caplog.text
    assert (await browser.navigate(served.preview("ws1", 3001, "/"))).status == 200


async def test_idp_down_at_the_callback(served: Served, idp: IdP, make_browser: MakeBrowser) -> None:
    browser = await make_browser(served, login="alice", idp=idp)
    callback = await browser.navigate_until(served.preview("ws1", 3000, "/"),
                                            lambda url: url.startswith(served.hub + "/auth/callback"))
    await idp.stop()
    page = await browser.navigate(callback)
    assert page.status == 502
    assert page.content_type == "text/html"
    assert "Traceback" not in page.text


async def test_a_client_secret_file_gone_after_start_fails_sign_ins_with_a_page_until_it_is_back(
        serve: Serve, idp: IdP, gateway_port: int, tmp_path: Path, make_browser: MakeBrowser,
        caplog: pytest.LogCaptureFixture) -> None:
    """The secret file is read at each sign-in, so a rotated Secret takes effect; a mounted Secret can also vanish
    or turn unreadable while the gateway runs. That is the gateway's own fault, not the IdP's or the visitor's: a
    page that says so (503, no traceback), one line for the operator, and sign-in works again once it is back."""
    secret = tmp_path / "oidc-secret"
    secret.write_text(idp.client_secret + "\n")
    settings = oidc_settings(idp, gateway_port)
    settings["auth"]["oidc"] = {**settings["auth"]["oidc"], "client_secret": None, "client_secret_file": str(secret)}
    served = await serve(WORKSPACES, port=gateway_port, **settings)
    secret.unlink()
    browser = await make_browser(served, login="alice", idp=idp)
    caplog.clear()
    page = await browser.navigate(served.preview("ws1", 3000, "/"))
    assert (page.status, page.content_type) == (503, "text/html"), page.text
    assert "sign-in-misconfigured" in page.text
    assert "Traceback" not in page.text
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert said == ["sign-in failed: config error: auth.oidc.client_secret_file: No such file or directory"]

    secret.write_text(idp.client_secret)
    assert (await browser.navigate(served.preview("ws1", 3000, "/"))).status == 200


@pytest.mark.parametrize("keep_old", [True, False])
async def test_idp_key_rotation_lands_on_next_sign_in(
    served: Served, idp: IdP, make_browser: MakeBrowser, keep_old: bool
) -> None:
    first = await make_browser(served, login="alice", idp=idp)
    assert (await first.navigate(served.preview("ws1", 3000, "/"))).status == 200
    old_kid = idp.kids[0]
    new_kid = await idp.rotate_keys(keep_old=keep_old)
    assert new_kid != old_kid
    second = await make_browser(served, login="alice", idp=idp)
    page = await second.navigate(served.preview("ws1", 3000, "/after-rotation"))
    assert page.status == 200, page.text
    assert second.idp_visits == 1
    # The first browser was never logged out by the IdP's rotation.
    assert (await first.navigate(served.preview("ws2", 4000, "/"))).status == 200


async def test_idp_error_reply_is_a_clear_page(served: Served, idp: IdP, make_browser: MakeBrowser) -> None:
    """A callback with a wrong state, or the IdP saying no, is refused with a page, never a stack trace."""
    browser = await make_browser(served, idp=idp)
    page = await browser.navigate(served.hub + "/auth/callback?code=x&state=forged")
    assert page.status == 400
    assert "sign-in-state-mismatch" in page.text
    await browser.navigate_until(served.preview("ws1", 3000, "/"), lambda url: url.startswith(idp.issuer))
    page = await browser.navigate(served.hub + "/auth/callback?code=x&state=%C3%A9t%C3%A9")  # not ASCII: no 500
    assert page.status == 400
    assert "sign-in-state-mismatch" in page.text

    authorize = await browser.navigate_until(served.preview("ws1", 3000, "/"),
                                             lambda url: url.startswith(idp.issuer))
    state = parse_qs(urlsplit(authorize).query)["state"][0]
    said = "<b>user cancelled</b>"
    page = await browser.navigate(served.hub + "/auth/callback?" + urlencode(
        {"error": "access_denied", "error_description": said, "state": state}))
    assert page.status == 401
    assert "sign-in-failed" in page.text
    assert "<title>Sign-in failed" in page.text
    assert "&lt;b&gt;user cancelled&lt;/b&gt;" in page.text
    assert said not in page.text
    bare = await browser.navigate(served.hub + "/auth/callback?" + urlencode({"error": "access_denied",
                                                                              "state": state}))
    assert bare.status == 401, "an error without its optional description is still the IdP's no, not our 500"
    assert "The sign-in service said: access_denied." in bare.text
    assert browser.idp_visits == 0


async def test_ide_sign_in_lands_in_the_ide_and_is_owner_only(
    serve: Serve, idp: IdP, gateway_port: int, make_browser: MakeBrowser
) -> None:
    served = await serve(WORKSPACES, port=gateway_port, listen={"ws1": [13337], "ws2": [13337]},
                         **oidc_settings(idp, gateway_port))
    alice = await make_browser(served, login="alice", idp=idp)
    # An old bookmark on the hub moves to the IDE's own origin, which signs in through the hub's hand-off.
    page = await alice.navigate(served.hub + "/w/ws1/?folder=/home/a%20b")
    assert page.status == 200, page.text
    assert page.url == served.ide("ws1", "/?folder=/home/a%20b")
    assert page.json()["path"] == "/?folder=/home/a%20b"
    assert any("/_codehub/auth/callback" in url for url in alice.visited)
    # A collaborator named by e-mail: same hub session, no second IdP visit.
    assert (await alice.navigate(served.ide("ws2"))).status == 200
    assert alice.idp_visits == 1
    # admin-x owns ws2 but is nobody in ws1; ws1's ports being public would not open its IDE either.
    admin = await make_browser(served, login="admin-x", idp=idp)
    page = await admin.navigate(served.ide("ws1"))
    assert page.status == 403
    assert "ide-owner-only" in page.text


@pytest.mark.parametrize(("audience", "people", "admitted", "refused"), [
    ("org", [], "bob+qa+ops", "guest-x"),
    ("people", ["group:ops", "carol@corp.test"], "carol@corp.test", "bob+qa"),
])
async def test_share_link_for_signed_in_people_goes_through_sign_in(
    serve: Serve, idp: IdP, gateway_port: int, tmp_path: Path, make_browser: MakeBrowser, audience: str,
    people: list[str], admitted: str, refused: str
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("org:\n  groups: [qa]\n")
    served = await serve(WORKSPACES, port=gateway_port, policy_file=str(policy), **oidc_settings(idp, gateway_port))
    link, token = await served.gateway.auth.store.create_share(workspace="ws1", port=3000, audience=audience,
                                                         people=people, created_by="alice", ttl=600)
    member = await make_browser(served, login=admitted, idp=idp)
    page = await member.navigate(served.preview("ws1", 3000, f"/doc?codehub_share={token}&v=2"))
    assert page.status == 200, page.text
    assert page.url == served.preview("ws1", 3000, "/doc?v=2")
    assert page.json()["path"] == "/doc?v=2"
    assert member.idp_visits == 1
    assert not any(token in url for url in member.visited[1:]), "the token must leave the URL at once"
    assert link.uses == 1

    outsider = await make_browser(served, login=refused, idp=idp)
    page = await outsider.navigate(served.preview("ws1", 3000, f"/doc?codehub_share={token}"))
    assert page.status == 403
    assert "not-shared-with-user" in page.text


async def test_a_token_without_the_user_name_claim_does_not_sign_in(
        serve: Serve, idp: IdP, gateway_port: int, make_browser: MakeBrowser) -> None:
    """``username_claim`` names a claim this IdP never sends: sign-in is refused with a page that says why, instead
    of naming the person by their ``sub``, which another person's chosen user name could equal."""
    settings = oidc_settings(idp, gateway_port)
    settings["auth"]["oidc"]["username_claim"] = "nickname"
    served = await serve(WORKSPACES, port=gateway_port, **settings)
    browser = await make_browser(served, login="alice", idp=idp)
    page = await browser.navigate(served.preview("ws1", 3000, "/"))
    assert page.status == 401, page.text
    assert "sign-in-failed" in page.text
    assert "no user name" in page.text
    again = await browser.navigate(served.preview("ws1", 3000, "/"))
    assert again.status == 401, "no session was set: the app is never reached"


# The gateway's relying party on its own, against the real IdP's discovery and JWKS: what a hostile IdP response or
# a forged ID token would meet. Tokens are signed here, with the IdP's own private key (from its jwks file) when the
# test wants a genuine signature.

def idp_private_key(idp: IdP, index: int = 0) -> Any:
    return jwt.PyJWK(json.loads(idp.jwks_path.read_text())["keys"][index]).key


def id_token_claims(idp: IdP, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"iss": idp.issuer, "aud": idp.client_id, "sub": "alice", "iat": now, "exp": now + 300,
                              "nonce": "n0nce"}
    claims.update(changes)
    return {key: value for key, value in claims.items() if value is not None}


def signed_by_idp(idp: IdP, headers: dict[str, Any] | None = None, **changes: Any) -> str:
    return jwt.encode(id_token_claims(idp, **changes), idp_private_key(idp), algorithm="RS256",
                      headers={"kid": idp.kids[0]} if headers is None else headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"


@contextlib.asynccontextmanager
async def relying_party(idp: IdP, issuer: str | None = None) -> AsyncIterator[OidcClient]:
    settings = Oidc(issuer=issuer or idp.issuer, client_id=idp.client_id, client_secret=idp.client_secret)
    async with aiohttp.ClientSession() as http:
        yield OidcClient(settings, http)


def forgeries(idp: IdP) -> list[tuple[str, str, str]]:
    """(what, token, what the refusal says) for tokens a hostile IdP response or a forger could hand over."""
    kid = idp.kids[0]
    foreign_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    foreign_ec = ec.generate_private_key(ec.SECP256R1())
    head = unsigned_token({"alg": "none", "kid": kid}, id_token_claims(idp))
    public_n = json.loads(idp.jwks_path.read_text())["keys"][0]["n"].encode()
    hs_head = unsigned_token({"alg": "HS256", "kid": kid}, id_token_claims(idp))
    now = int(time.time())
    return [
        ("not a JWT", "not-a-token", "malformed"),
        ("alg none", head + ".", "algorithm 'none'"),
        ("HS256 keyed with the public modulus",
         hs_head + "." + b64(hmac.new(public_n, hs_head.encode(), hashlib.sha256).digest()), "algorithm 'HS256'"),
        ("RS256 from another key under the IdP's kid",
         jwt.encode(id_token_claims(idp), foreign_rsa, algorithm="RS256", headers={"kid": kid}), "did not verify"),
        ("ES256 under the IdP's RSA kid",
         jwt.encode(id_token_claims(idp), foreign_ec, algorithm="ES256", headers={"kid": kid}), "does not publish"),
        ("a kid the IdP does not publish",
         jwt.encode(id_token_claims(idp), foreign_rsa, algorithm="RS256", headers={"kid": "forged"}),
         "does not publish"),
        ("another audience", signed_by_idp(idp, aud="someone-else"), "did not verify"),
        ("another issuer", signed_by_idp(idp, iss="http://evil.test"), "did not verify"),
        ("expired beyond the leeway", signed_by_idp(idp, iat=now - 600, exp=now - 60),
         "did not verify: Signature has expired."),
        ("issued in the future", signed_by_idp(idp, iat=now + 300, exp=now + 900), "did not verify"),
        ("not valid yet", signed_by_idp(idp, nbf=now + 300), "did not verify"),
        ("no sub", signed_by_idp(idp, sub=None), "did not verify"),
        ("no exp", signed_by_idp(idp, exp=None), "did not verify"),
        ("no iat", signed_by_idp(idp, iat=None), "did not verify"),  # OpenID Connect Core §2: required
        ("no iss", signed_by_idp(idp, iss=None), "did not verify"),
        ("no aud", signed_by_idp(idp, aud=None), "did not verify"),
        ("no nonce", signed_by_idp(idp, nonce=None), "nonce does not match"),
        ("another sign-in's nonce", signed_by_idp(idp, nonce="other"), "nonce does not match"),
        ("a nonce that only starts alike", signed_by_idp(idp, nonce="n0nce-and-more"), "nonce does not match"),
        ("a nonce that is not ASCII", signed_by_idp(idp, nonce="n0nc\u00e9"), "nonce does not match"),
    ]


async def test_forged_or_hostile_id_tokens_are_refused(idp: IdP) -> None:
    async with relying_party(idp) as client:
        for what, token, refusal in forgeries(idp):
            with pytest.raises(SignInFailed) as refused:
                await client.verify_id_token(token, "n0nce")
            assert refusal in str(refused.value), what
            assert (refused.value.status, refused.value.code) == (401, "sign-in-failed"), what
        now = int(time.time())
        with pytest.raises(SignInFailed, match="did not verify"):  # expired as long ago as the leeway
            await client.verify_id_token(signed_by_idp(idp, iat=now - 600, exp=now - 30), "n0nce")
        # A genuine token, a little past its expiry but within the leeway, and one without a kid while the IdP
        # publishes exactly one key, are accepted.
        claims = await client.verify_id_token(signed_by_idp(idp, iat=now - 600, exp=now - 10), "n0nce")
        assert claims["sub"] == "alice"
        assert (await client.verify_id_token(signed_by_idp(idp, headers={}), "n0nce"))["sub"] == "alice"


async def test_id_token_keys_follow_idp_rotation(idp: IdP) -> None:
    async with relying_party(idp) as client:
        old = signed_by_idp(idp)
        assert (await client.verify_id_token(old, "n0nce"))["sub"] == "alice"
        await idp.rotate_keys(keep_old=True)  # the client still holds the old JWKS: the new kid makes it refresh
        assert (await client.verify_id_token(signed_by_idp(idp, sub="bob"), "n0nce"))["sub"] == "bob"
        assert (await client.verify_id_token(old, "n0nce"))["sub"] == "alice"
        with pytest.raises(SignInFailed, match="does not publish"):  # two keys now: no kid names none of them
            await client.verify_id_token(signed_by_idp(idp, headers={}), "n0nce")
        await idp.rotate_keys(keep_old=False)
        assert (await client.verify_id_token(signed_by_idp(idp, sub="carol"), "n0nce"))["sub"] == "carol"
        with pytest.raises(SignInFailed, match="does not publish"):
            await client.verify_id_token(old, "n0nce")


async def test_authorize_url_carries_pkce_and_refuses_a_discovery_naming_another_issuer(idp: IdP) -> None:
    pkce = Pkce.new()
    assert pkce.challenge == b64(hashlib.sha256(pkce.verifier.encode()).digest())
    assert pkce != Pkce.new()
    async with relying_party(idp) as client:
        url = await client.authorize_url(redirect_uri=idp.redirect_uri, state="st", nonce="nn", pkce=pkce)
    query = parse_qs(urlsplit(url).query)
    assert url.startswith(f"{idp.issuer}/")
    assert query == {"response_type": ["code"], "client_id": [idp.client_id], "redirect_uri": [idp.redirect_uri],
                     "scope": ["openid email profile groups"], "state": ["st"], "nonce": ["nn"],
                     "code_challenge": [pkce.challenge], "code_challenge_method": ["S256"]}
    # Same server, reached under another name: its discovery names its real issuer, which is not the configured one.
    other_name = idp.issuer.replace("127.0.0.1", "localhost")
    async with relying_party(idp, issuer=other_name) as client:
        with pytest.raises(IdpUnavailable, match="names another issuer") as refused:
            await client.authorize_url(redirect_uri=idp.redirect_uri, state="st", nonce="nn", pkce=pkce)
    assert (refused.value.status, refused.value.code) == (502, "idp-unavailable")
    async with relying_party(idp, issuer=f"{idp.issuer}/elsewhere") as client:  # no discovery there
        with pytest.raises(IdpUnavailable, match=r"answered 404 for its discovery\."):
            await client.authorize_url(redirect_uri=idp.redirect_uri, state="st", nonce="nn", pkce=pkce)


@pytest.mark.parametrize("published", [{}, {"end_session_endpoint": None}, {"end_session_endpoint": 5}])
async def test_an_idp_that_publishes_no_end_session_endpoint_is_not_visited_on_sign_out(
        aiohttp_server: Any, published: dict[str, Any]) -> None:
    async def discovery(request: web.Request) -> web.Response:
        return web.json_response({"issuer": f"http://{request.host}", **published})

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", discovery)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as http:
        client = OidcClient(Oidc(issuer=str(server.make_url("")), client_id="c"), http)
        assert await client.end_session_url(post_logout_redirect_uri="http://localhost:8080/",
                                             id_token_hint=None) is None


async def hostile_idp(aiohttp_server: Any, discovery: Any, jwks: Any = None) -> str:
    """An issuer on loopback whose discovery document (``{origin}`` replaced by its own origin) and JWKS are the
    test's: what oidc-provider cannot be made to publish."""
    def filled(value: Any, origin: str) -> Any:
        return json.loads(json.dumps(value).replace("{origin}", origin))

    async def answer(request: web.Request) -> web.Response:
        document = discovery if request.path.endswith("/openid-configuration") else jwks
        return web.json_response(filled(document, str(request.url.origin())))

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", answer)
    app.router.add_get("/jwks", answer)
    return str((await aiohttp_server(app)).make_url("")).rstrip("/")


ENDPOINTS = {"issuer": "{origin}", "authorization_endpoint": "{origin}/authorize", "token_endpoint": "{origin}/token",
             "jwks_uri": "{origin}/jwks", "end_session_endpoint": "{origin}/logout"}


@pytest.mark.parametrize("discovery", [
    [ENDPOINTS], "discovery", None,  # not an object
    {**ENDPOINTS, "issuer": 42},
    *({key: value for key, value in ENDPOINTS.items() if key != missing} for missing in ENDPOINTS
      if missing != "end_session_endpoint"),  # (optional: tested below)
    *({**ENDPOINTS, name: bad} for name in ("authorization_endpoint", "token_endpoint", "jwks_uri")
      for bad in (42, ["{origin}/x"], "javascript:alert(1)", "javascript://idp.test/%0aalert(1)", "/authorize",
                  "data:,x", "ftp://idp.test/x", "http://", "http://[::1")),
])
async def test_a_discovery_document_that_is_not_usable_is_an_unavailable_idp(aiohttp_server: Any,
                                                                            discovery: Any) -> None:
    """Whatever answers at the issuer's address is read as a document from outside: one without a usable
    (http or https) address for each step of a sign-in makes each step a clear 502 page, never a traceback, and a
    sign-out that ends at the gateway."""
    issuer = await hostile_idp(aiohttp_server, discovery)
    async with aiohttp.ClientSession() as http:
        client = OidcClient(Oidc(issuer=issuer, client_id="c", client_secret="s"), http)
        for step in (client.authorize_url(redirect_uri="http://localhost:8080/auth/callback", state="st", nonce="n",
                                          pkce=Pkce.new()),
                     client.exchange(code="c", redirect_uri="http://localhost:8080/auth/callback", verifier="v" * 43),
                     client.verify_id_token(unsigned_token({"alg": "RS256", "kid": "k"}, {}) + ".c2ln", "n")):
            with pytest.raises(IdpUnavailable):
                await step
        assert await client.end_session_url(post_logout_redirect_uri="http://localhost:8080/",
                                             id_token_hint=None) is None


async def test_an_idp_that_never_answers_fails_the_sign_in_instead_of_holding_it(aiohttp_server: Any) -> None:
    """An IdP that takes the connection and never answers (hung, or a load balancer with nothing behind it) fails
    the sign-in with the gateway's 502 page once the gateway stops waiting (10 s), instead of holding the visitor's
    request, and a connection, for as long as the IdP stays silent. The 30 s here only keeps the test bounded."""
    async def silent(request: web.Request) -> web.Response:
        await asyncio.Event().wait()
        raise AssertionError("never answered")

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", silent)
    issuer = str((await aiohttp_server(app)).make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as http:
        client = OidcClient(Oidc(issuer=issuer, client_id="c", client_secret="s"), http)
        async with asyncio.timeout(30):
            with pytest.raises(IdpUnavailable, match="cannot be reached"):
                await client.authorize_url(redirect_uri="http://localhost:8080/auth/callback", state="st",
                                           nonce="n", pkce=Pkce.new())


@pytest.mark.parametrize(("discovery", "jwks", "what", "path"), [
    ([ENDPOINTS], None, "discovery", "/.well-known/openid-configuration"),
    ("discovery", None, "discovery", "/.well-known/openid-configuration"),
    (ENDPOINTS, [{"keys": []}], "signing keys", "/jwks"),
])
async def test_an_idp_document_that_is_no_json_object_is_named_on_the_page_and_in_the_log(
        aiohttp_server: Any, caplog: pytest.LogCaptureFixture, discovery: Any, jwks: Any, what: str,
        path: str) -> None:
    """JSON, but not an object: the 502 page says which of the IdP's documents cannot be read, and the log also
    where it was fetched from, which is what the IdP's administrators need to find it."""
    issuer = await hostile_idp(aiohttp_server, discovery, jwks)
    async with aiohttp.ClientSession() as http:
        client = OidcClient(Oidc(issuer=issuer, client_id="c", client_secret="s"), http)
        with pytest.raises(IdpUnavailable, match=re.escape(f"The sign-in service's {what} is not readable.")):
            await client.verify_id_token(unsigned_token({"alg": "RS256", "kid": "k"}, {}) + ".c2ln", "n")
    assert [record.getMessage() for record in caplog.records if record.name == oidc.log.name] == [
        f'IdP {what} at "{issuer}{path}" is not a JSON object']


@pytest.mark.parametrize("steps", [("authorization_endpoint",), ("token_endpoint",), ("jwks_uri",),
                                   ("authorization_endpoint", "token_endpoint", "jwks_uri")])
async def test_an_unusable_discovery_document_says_which_address_it_lacks(aiohttp_server: Any, steps: tuple[str, ...],
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """The 502 page names the first step whose address is missing and the log all of them: what the IdP's
    administrators must fix."""
    issuer = await hostile_idp(aiohttp_server, {**ENDPOINTS, **dict.fromkeys(steps, "javascript:alert(1)")})
    async with aiohttp.ClientSession() as http:
        client = OidcClient(Oidc(issuer=issuer, client_id="c", client_secret="s"), http)
        with pytest.raises(IdpUnavailable, match=re.escape(f"discovery document gives no address for {steps[0]}.")):
            await client.authorize_url(redirect_uri="http://localhost:8080/auth/callback", state="st", nonce="n",
                                       pkce=Pkce.new())
    assert [record.getMessage() for record in caplog.records if record.name == oidc.log.name] == [
        f"IdP discovery has no http(s) address for {', '.join(steps)}"]


@pytest.mark.parametrize("end_session", ["javascript:alert(1)", "javascript://idp.test/%0aalert(1)",
                                         "data:text/html,x", "/logout", "http://", 42])
async def test_an_end_session_endpoint_that_is_no_web_address_is_not_followed(
        aiohttp_server: Any, caplog: pytest.LogCaptureFixture, end_session: Any) -> None:
    """Only an http(s) address goes into the ``Location`` of a sign-out; the rest of the IdP stays usable, and
    the log says why sign-out leaves the IdP's session alone."""
    issuer = await hostile_idp(aiohttp_server, {**ENDPOINTS, "end_session_endpoint": end_session})
    async with aiohttp.ClientSession() as http:
        client = OidcClient(Oidc(issuer=issuer, client_id="c", client_secret="s"), http)
        assert await client.end_session_url(post_logout_redirect_uri="http://localhost:8080/",
                                             id_token_hint=None) is None
        sent_to = await client.authorize_url(redirect_uri="http://localhost:8080/auth/callback", state="st",
                                             nonce="n", pkce=Pkce.new())
        assert sent_to.startswith(f"{issuer}/authorize?")
    assert "IdP discovery's end_session_endpoint is no http(s) address: not followed" in [
        record.getMessage() for record in caplog.records if record.name == oidc.log.name]


async def test_an_idp_at_https_addresses_sends_browsers_to_them(aiohttp_server: Any) -> None:
    """What an IdP in production publishes: https addresses, where sign-in and sign-out send the browser."""
    issuer = await hostile_idp(aiohttp_server, {**ENDPOINTS, "authorization_endpoint": "https://sso.example/authorize",
                                                "end_session_endpoint": "https://sso.example/logout"})
    async with aiohttp.ClientSession() as http:
        client = OidcClient(Oidc(issuer=issuer, client_id="c", client_secret="s"), http)
        sent_to = await client.authorize_url(redirect_uri="http://localhost:8080/auth/callback", state="st",
                                             nonce="n", pkce=Pkce.new())
        assert sent_to.startswith("https://sso.example/authorize?")
        signed_out = await client.end_session_url(post_logout_redirect_uri="http://localhost:8080/",
                                                  id_token_hint=None)
        assert (signed_out or "").startswith("https://sso.example/logout?")


async def test_an_idp_whose_issuer_ends_in_a_slash_signs_people_in(aiohttp_server: Any) -> None:
    """Some IdPs (Auth0) spell their issuer with a final ``/``, in discovery and in every ID token's ``iss``; the
    setting is read without it. Tokens verify against the issuer as the IdP spells it, and only so (OpenID
    Connect compares it exactly). The oidc-provider peer names itself without one, so a hostile IdP stands in."""
    key = ec.generate_private_key(ec.SECP256R1())
    jwks = {"keys": [{**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key)), "kid": "k"}]}
    issuer = await hostile_idp(aiohttp_server, {**ENDPOINTS, "issuer": "{origin}/"}, jwks)
    now = int(time.time())
    claims = {"iss": f"{issuer}/", "aud": "c", "sub": "alice", "iat": now, "exp": now + 300, "nonce": "n"}
    async with aiohttp.ClientSession() as http:
        for configured in (issuer, f"{issuer}/"):
            client = OidcClient(Oidc(issuer=configured, client_id="c", client_secret="s"), http)
            token = jwt.encode(claims, key, algorithm="ES256", headers={"kid": "k"})
            assert (await client.verify_id_token(token, "n"))["sub"] == "alice"
            unslashed = jwt.encode({**claims, "iss": issuer}, key, algorithm="ES256", headers={"kid": "k"})
            with pytest.raises(SignInFailed, match="did not verify"):
                await client.verify_id_token(unslashed, "n")


@pytest.mark.parametrize(("jwks", "alg"), [
    ([1], "RS256"), ({"keys": "ab"}, "RS256"), ({"keys": [1, "k"]}, "RS256"), (None, "RS256"),
    ({"keys": [{"kty": "RSA", "kid": "k"}]}, "RS256"),
    ({"keys": [{"kty": "RSA", "kid": "k", "n": 1, "e": 2}]}, "RS256"),
    ({"keys": [{"kty": "RSA", "kid": "k", "n": "AQAB", "e": "AQAB"}]}, "RS256"),
    ({"keys": [{"kty": "EC", "kid": "k", "crv": "P-999", "x": "AA", "y": "AA"}]}, "ES256"),
    ({"keys": [{"kty": "EC", "kid": "k", "crv": "P-256", "x": 5, "y": "AA"}]}, "ES256"),
    ({"keys": [{"kty": "OKP", "kid": "k", "crv": "Ed25519", "x": "AA"}]}, "EdDSA"),
])
async def test_signing_keys_that_cannot_be_read_fail_the_sign_in_with_a_page(aiohttp_server: Any, jwks: Any,
                                                                             alg: str) -> None:
    """A JWKS that is no list of keys, or a key of the token's ``kid`` that cannot be made into one: the sign-in
    fails with the gateway's page (502: the IdP's fault), not a traceback. What is not a key in the list is not
    one: a token naming it names a key the IdP does not publish (401)."""
    issuer = await hostile_idp(aiohttp_server, ENDPOINTS, jwks)
    async with aiohttp.ClientSession() as http:
        client = OidcClient(Oidc(issuer=issuer, client_id="c", client_secret="s"), http)
        with pytest.raises((IdpUnavailable, SignInFailed)) as refused:
            await client.verify_id_token(unsigned_token({"alg": alg, "kid": "k"}, {"sub": "alice"}) + ".c2ln", "n")
        assert refused.type is (SignInFailed if jwks == {"keys": [1, "k"]} else IdpUnavailable)  # (no key "k")


async def test_what_an_idp_sends_reaches_the_log_on_one_line(aiohttp_server: Any,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A key's id and curve in a warning are the IdP's words, escaped: none can write a line that looks like the
    gateway's own."""
    issuer = await hostile_idp(aiohttp_server, ENDPOINTS,
                               {"keys": [{"kty": "EC", "kid": "k\nkid", "crv": "P-1\nFAKE: signed in as admin",
                                          "x": "AA", "y": "AA"}]})
    async with aiohttp.ClientSession() as http:
        client = OidcClient(Oidc(issuer=issuer, client_id="c", client_secret="s"), http)
        with pytest.raises(IdpUnavailable):
            await client.verify_id_token(unsigned_token({"alg": "ES256", "kid": "k\nkid"}, {}) + ".c2ln", "n")
    warnings = [record.getMessage() for record in caplog.records if record.name == oidc.log.name]
    assert len(warnings) == 1, warnings
    assert "FAKE" in warnings[0]
    assert "\n" not in warnings[0]


async def test_every_listed_asymmetric_algorithm_verifies_with_a_key_of_its_own_type(idp: IdP) -> None:
    """An IdP may sign with any algorithm of the list; each is taken only from a published key of its type."""
    curves = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1()}
    private: dict[str, Any] = {kid: ec.generate_private_key(curve) for kid, curve in curves.items()}
    private["EdDSA"] = Ed25519PrivateKey.generate()
    keys = json.loads(idp.jwks_path.read_text())["keys"]
    for kid, key in private.items():
        family = jwt.algorithms.OKPAlgorithm if kid == "EdDSA" else jwt.algorithms.ECAlgorithm
        keys.append({**json.loads(family.to_jwk(key)), "kid": kid, "use": "sig", "alg": kid})
    idp.jwks_path.write_text(json.dumps({"keys": keys}))
    async with aiohttp.ClientSession() as http, http.post(f"{idp.issuer}/__test/rotate") as response:
        assert response.status == 200, await response.text()
    rsa_kid = idp.kids[0]
    async with relying_party(idp) as client:
        for algorithm in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"):
            token = jwt.encode(id_token_claims(idp), idp_private_key(idp), algorithm=algorithm,
                               headers={"kid": rsa_kid})
            assert (await client.verify_id_token(token, "n0nce"))["sub"] == "alice", algorithm
        for algorithm, key in private.items():
            token = jwt.encode(id_token_claims(idp), key, algorithm=algorithm, headers={"kid": algorithm})
            assert (await client.verify_id_token(token, "n0nce"))["sub"] == "alice", algorithm
        for algorithm, kid in (("RS256", "ES256"), ("ES256", "EdDSA"), ("EdDSA", rsa_kid), ("ES384", rsa_kid)):
            forged = unsigned_token({"alg": algorithm, "kid": kid}, id_token_claims(idp)) + ".c2ln"
            with pytest.raises(SignInFailed, match="does not publish"):
                await client.verify_id_token(forged, "n0nce")


async def test_discovery_is_read_once_an_hour_and_afresh_for_each_browser_sent_to_sign_in(
        idp: IdP, monkeypatch: pytest.MonkeyPatch) -> None:
    """Verifying tokens does not hammer the IdP: its discovery document is kept an hour and its JWKS until a
    token names a kid it does not hold; sending a browser to sign in reads discovery afresh."""
    fetched: list[str] = []

    async def on_request_start(_: Any, __: Any, params: aiohttp.TraceRequestStartParams) -> None:
        fetched.append(str(params.url).removeprefix(idp.issuer))

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_request_start)
    discovery = "/.well-known/openid-configuration"
    settings = Oidc(issuer=idp.issuer, client_id=idp.client_id, client_secret=idp.client_secret)
    async with aiohttp.ClientSession(trace_configs=[trace]) as http:
        client = OidcClient(settings, http)
        for _ in range(3):
            await client.verify_id_token(signed_by_idp(idp), "n0nce")
        assert fetched == [discovery, "/jwks"]
        await idp.rotate_keys()
        await client.verify_id_token(signed_by_idp(idp), "n0nce")
        assert fetched == [discovery, "/jwks", "/jwks"]
        await client.authorize_url(redirect_uri=idp.redirect_uri, state="st", nonce="nn", pkce=Pkce.new())
        await client.verify_id_token(signed_by_idp(idp), "n0nce")
        assert fetched == [discovery, "/jwks", "/jwks", discovery]

        real = time.monotonic
        monkeypatch.setattr(oidc, "time", SimpleNamespace(monotonic=lambda: real() + 3601))  # an hour later
        await idp.rotate_keys()
        await client.verify_id_token(signed_by_idp(idp), "n0nce")
        assert fetched == [discovery, "/jwks", "/jwks", discovery, discovery, "/jwks"]


async def test_a_gateway_started_within_an_hour_of_its_host_booting_reads_discovery(
        idp: IdP, monkeypatch: pytest.MonkeyPatch) -> None:
    """The monotonic clock counts from an unspecified point (on Linux, the host's boot): on a fresh node it may
    read less than the hour discovery is kept, and a client that never read discovery must read it all the same."""
    monkeypatch.setattr(oidc, "time", SimpleNamespace(monotonic=lambda: 5.0))
    async with relying_party(idp) as client:
        assert (await client.verify_id_token(signed_by_idp(idp), "n0nce"))["sub"] == "alice"


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
async def test_code_exchange_with_either_client_authentication(tmp_path: Path, method: str) -> None:
    """The whole relying-party side against an IdP that accepts only the registered method, with a secret that
    needs form-encoding: authorize with PKCE, exchange the code, verify the ID token and its nonce."""
    redirect_uri = "http://127.0.0.1:9/auth/callback"
    async with (start_idp(tmp_path, [redirect_uri, "http://127.0.0.1:9/other"], client_id="gw:1",
                          client_secret="s3cret+/:%&=x", token_endpoint_auth_method=method) as idp,
                aiohttp.ClientSession() as http,
                aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser):
        settings = Oidc(issuer=idp.issuer, client_id=idp.client_id, client_secret=idp.client_secret,
                        token_auth_method=method)  # type: ignore[arg-type]
        client, pkce = OidcClient(settings, http), Pkce.new()
        url = await client.authorize_url(redirect_uri=redirect_uri, state="st", nonce="nn", pkce=pkce)
        code = parse_qs(urlsplit(await login_via_idp(browser, url, "alice")).query)["code"][0]
        with pytest.raises(SignInFailed, match="refused this sign-in"):  # PKCE: the verifier must match
            await client.exchange(code=code, redirect_uri=redirect_uri, verifier=Pkce.new().verifier)
        url = await client.authorize_url(redirect_uri=redirect_uri, state="st", nonce="nn", pkce=pkce)
        code = parse_qs(urlsplit(await login_via_idp(browser, url, "alice")).query)["code"][0]
        tokens = await client.exchange(code=code, redirect_uri=redirect_uri, verifier=pkce.verifier)
        assert (await client.verify_id_token(tokens["id_token"], "nn"))["sub"] == "alice"
        with pytest.raises(SignInFailed, match="refused this sign-in"):  # a code is good once
            await client.exchange(code=code, redirect_uri=redirect_uri, verifier=pkce.verifier)
        wrong = OidcClient(settings.model_copy(update={"client_secret": "guessed"}), http)
        url = await client.authorize_url(redirect_uri=redirect_uri, state="st", nonce="nn", pkce=pkce)
        code = parse_qs(urlsplit(await login_via_idp(browser, url, "alice")).query)["code"][0]
        with pytest.raises(SignInFailed, match="refused this sign-in"):
            await wrong.exchange(code=code, redirect_uri=redirect_uri, verifier=pkce.verifier)


@pytest.mark.parametrize(("status", "body", "refusal", "logged"), [
    (200, '{"access_token": "x"}', SignInFailed, "IdP refused the code: 200"),  # no ID token
    (200, '["id_token"]', SignInFailed, "IdP refused the code: 200"),  # not an object
    (200, '{"id_token": 42}', SignInFailed, "IdP refused the code: 200"),  # not a token
    (200, '{"id_token": ""}', SignInFailed, "IdP refused the code: 200"),
    (400, '{"error": "invalid_grant", "error_description": "code expired"}', SignInFailed,
     'IdP refused the code: 400 "invalid_grant" "code expired"'),
    (400, '{"id_token": "a.b.c", "error": "invalid_grant"}', SignInFailed,  # an error status, whatever the body holds
     'IdP refused the code: 400 "invalid_grant"'),
    (200, "<html>", IdpUnavailable, "IdP token endpoint unreachable"),
])
async def test_a_token_reply_that_carries_no_id_token_is_a_refused_sign_in(
        aiohttp_server: Any, caplog: pytest.LogCaptureFixture, status: int, body: str, refusal: type[Exception],
        logged: str) -> None:
    """What the token endpoint answers is the IdP's (or whatever answers at its address): anything but a 200 with
    an object with an ID token in it is a sign-in refused with a page, never a traceback further on, and the log
    says what the IdP said. oidc-provider cannot be made to answer so, so a hostile one on loopback does. The
    gateway asks for JSON: some token endpoints answer in a form otherwise."""
    asked_for: list[str | None] = []
    async def discovery(request: web.Request) -> web.Response:
        origin = str(request.url.origin())
        return web.json_response({"issuer": origin, "authorization_endpoint": f"{origin}/authorize",
                                  "token_endpoint": f"{origin}/token", "jwks_uri": f"{origin}/jwks"})

    async def token(request: web.Request) -> web.Response:
        asked_for.append(request.headers.get("Accept"))
        return web.Response(status=status, text=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", discovery)
    app.router.add_post("/token", token)
    server = await aiohttp_server(app)
    issuer = str(server.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as session:
        client = OidcClient(Oidc(issuer=issuer, client_id="codehub", client_secret="s"), session)
        with pytest.raises(refusal):
            await client.exchange(code="c", redirect_uri="http://localhost:8080/auth/callback", verifier="v" * 43)
    assert asked_for == ["application/json"]
    assert [record.getMessage() for record in caplog.records if record.name == oidc.log.name
            and record.getMessage().startswith(logged)], caplog.text


async def test_sending_a_signed_in_browser_through_sign_in_again_keeps_its_sign_in(
    served: Served, idp: IdP, make_browser: MakeBrowser
) -> None:
    """Any page (a hostile preview's) can navigate its visitor to ``/auth/login``: with the IdP's session it comes
    back without a password, at once. Each round trip was a new sign-in at the hub, whose cookie replaced the one
    before: the sessions that sign-in had given previews outlived Sign out (which ends the hub cookie's sign-in
    only), and 30 of them left the visitor unable to sign in for an hour (429). A browser signed in keeps its
    sign-in."""
    browser = await make_browser(served, login="alice", idp=idp)
    app = served.preview("ws1", 3000, "/")
    assert (await browser.navigate(app)).status == 200
    for _ in range(SIGN_INS_PER_HOUR + 1):
        page = await browser.navigate(served.hub + "/auth/login?next=/api/v1/me")
        assert page.status == 200, page.text
    await _sign_out(browser, served)
    refused = await browser.fetch("GET", app, headers={"Accept": "application/json"})
    assert refused.status == 401, refused.text
    again = await browser.navigate(app)
    assert again.status == 200, again.text


async def test_the_sign_in_round_trip_keeps_its_state_in_a_ten_minute_cookie_that_the_callback_ends(
        served: Served, idp: IdP, make_browser: MakeBrowser) -> None:
    """``/auth/login`` sends the browser to the IdP (302) with a fresh state (18 random bytes, then ``next``
    sealed) and nonce (18 random bytes) and keeps the state's secret, the nonce, the PKCE verifier and ``next`` in
    a host-only cookie that lasts ten minutes; the callback lands on ``next`` (303) and ends that cookie."""
    browser = await make_browser(served, login="alice", idp=idp)
    login = await browser.fetch("GET", served.hub + "/auth/login?next=/api/v1/me", headers={"Accept": "text/html"})
    assert login.status == 302
    asked = parse_qs(urlsplit(login.location or "").query)
    secret, _, going = asked["state"][0].partition(".")
    assert (len(secret), len(asked["nonce"][0])) == (24, 24)
    assert going, "where it goes, sealed"
    assert "/api/v1/me" not in asked["state"][0]
    (kept,) = login.set_cookies
    assert kept.startswith("codehub_login=")
    assert "Max-Age=600" in [part.strip() for part in kept.split(";")]
    back = await login_via_idp(browser.idp_http, login.location or "", "alice", issuer=idp.issuer)  # type: ignore[arg-type]
    landed = await browser.fetch("GET", back, headers={"Accept": "text/html"})
    assert (landed.status, landed.location) == (303, served.hub + "/api/v1/me")
    ended = [cookie for cookie in landed.set_cookies if cookie.startswith("codehub_login=")]
    assert len(ended) == 1
    assert "Max-Age=0" in [part.strip() for part in ended[0].split(";")]

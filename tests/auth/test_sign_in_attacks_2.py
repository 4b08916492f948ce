"""Attacks on the multi-tab sign-in and the ID token the hub keeps for sign-out, from a second attacker pass: each
proved a hole in the version before it, and holds now."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest
from yarl import URL

from tests.auth.browser import Browser, Cookie
from tests.auth.conftest import MakeBrowser, Serve, Served, oidc_settings
from tests.peers.idp.fixture import IdP

pytestmark = pytest.mark.timeout(90)

WORKSPACES: dict[str, dict[str, Any]] = {
    "ws1": {"owner": "alice", "ports": {3000: "private", 3002: "org"}},
    "evil": {"owner": "mallory", "ports": {8080: "public"}},
}
BROWSER_COOKIE_BYTES = 4096  # what Chromium, Firefox and Safari keep of one cookie's name and value, at most


@pytest.fixture
async def dev_served(serve: Serve) -> Served:
    return await serve(WORKSPACES)


@pytest.fixture
async def oidc_served(serve: Serve, idp: IdP, gateway_port: int, tmp_path: Path) -> Served:
    return await serve(WORKSPACES, port=gateway_port, **oidc_settings(idp, gateway_port))


def with_groups(name: str, count: int) -> str:
    """A login the test IdP answers with ``count`` groups (the fixture also puts them in ``sub`` and ``email``,
    so a few dozen stand for a real IdP's longer list of group names or ids)."""
    return name + "+" + "+".join(f"team-{i:02d}-platform-eng" for i in range(count))


def like_a_browser(browser: Browser) -> Browser:
    """A browser that ignores a ``Set-Cookie`` whose name and value pass 4,096 bytes, as real ones do: the
    cookie it had of that name stays."""
    store = browser._store

    def kept(cookie: Cookie, max_age: int | None) -> None:
        if len(cookie.name) + len(cookie.value) <= BROWSER_COOKIE_BYTES:
            store(cookie, max_age)

    browser._store = kept  # type: ignore[method-assign]
    return browser


async def test_one_link_to_the_hubs_sign_in_does_not_lock_a_visitor_out_of_the_hub(
    oidc_served: Served, idp: IdP, make_browser: MakeBrowser
) -> None:
    """Carol is signed in at the hub; her IdP lists a couple of dozen groups (a session cookie of 2.1 KB, the
    sealed ID token kept for sign-out 3.5 KB: each well within what a browser keeps). Any page (another site by
    a link or ``window.open``, or a preview by a same-site ``fetch(..., {mode: "no-cors", credentials:
    "include"})``) sends her browser once to ``/auth/login?next=/aaaa…`` with a ``next`` just under 2,000
    characters. A version that kept it in the login cookie (3.2 KB, ten minutes) beside a kept ID token of 3.5 KB
    made her browser's Cookie header to the hub 8.8 KB, past ``limits.header_size`` (8,190): the sign-in's own
    callback, the hub's page, Sign out and every hand-off to a preview answered 431 for ten minutes, renewable.
    Now ``next`` rides only in the (sealed) state, and an ID token is kept only up to 2,500 bytes sealed."""
    served = oidc_served
    carol = like_a_browser(await make_browser(served, login=with_groups("carol", 18), idp=idp))
    assert (await carol.navigate(served.hub + "/auth/login?next=/")).status == 200
    assert (await carol.fetch("GET", served.hub + "/", headers={"Accept": "text/html"})).status == 200

    sent = await carol.navigate(served.hub + "/auth/login?" + urlencode({"next": "/" + "a" * 1990}))
    assert sent.status in (200, 404), f"{sent.status} at {sent.url[:60]}: {sent.text[:160]}"
    hub = await carol.fetch("GET", served.hub + "/", headers={"Accept": "text/html"})
    assert hub.status == 200, f"the hub answers {hub.status}: {hub.text[:160]}"
    out = await carol.fetch("POST", served.hub + "/auth/logout", headers={"Origin": served.hub})
    assert out.status == 303, f"Sign out answers {out.status}"


async def test_sign_out_never_hands_the_idp_the_last_persons_id_token(
    oidc_served: Served, idp: IdP, make_browser: MakeBrowser
) -> None:
    """A shared computer. Alice signs in (her ID token is kept sealed in ``codehub_idtoken``, for the
    ``sessions.ttl``) and leaves without signing out; the browser restarts, which ends the IdP's session cookie
    but not the gateway's persistent ones. Bob signs in: Alice's sign-in ends, Bob gets the hub's session. His ID
    token, with his longer list of groups, seals to more than the 4,096 bytes a browser keeps of a cookie (his
    session cookie, 2.6 KB, is kept): the browser ignores that ``Set-Cookie`` and keeps Alice's. When Bob signs
    out the hub sends his browser to the IdP with ``id_token_hint=<Alice's ID token>``: Bob reads Alice's signed
    ID token (her e-mail, groups) off his address bar, and an IdP that checks the hint against its session (as
    Okta does) does not end Bob's, so the next person at the computer is Bob at the IdP without a password. Now
    the kept token names its sign-in and is handed on only at the sign-out of that sign-in (and one too big to
    keep is not set: the one there is ended instead)."""
    served = oidc_served
    shared = like_a_browser(await make_browser(served, login="alice", idp=idp))
    assert (await shared.navigate(served.preview("ws1", 3000, "/"))).status == 200
    assert shared.cookie(served.hub, "codehub_idtoken")

    assert shared.idp_http is not None
    shared.idp_http.cookie_jar.clear()  # the browser restarts: the IdP's session cookie goes, ours stay
    shared.login = bob = with_groups("bob", 24)
    assert (await shared.navigate(served.hub + "/auth/login?next=/")).status == 200
    signed_in = await shared.fetch("GET", served.hub + "/api/v1/me", headers={"Accept": "application/json"})
    assert bob in signed_in.text, signed_in.text[:200]  # Bob is signed in at the hub

    out = await shared.fetch("POST", served.hub + "/auth/logout", headers={"Origin": served.hub})
    hint = URL(out.location or "").query.get("id_token_hint")
    whose = jwt.decode(hint, options={"verify_signature": False})["sub"] if hint else None
    assert whose in (None, bob), f"Bob's sign-out hands the IdP (and Bob) {whose}'s ID token"


async def test_a_hostile_preview_cannot_spend_its_visitors_hand_offs_in_the_background(
    dev_served: Served, make_browser: MakeBrowser
) -> None:
    """Alice, signed in at the hub, opens Mallory's public preview. Its page (same site as the hub) runs 60 times
    ``fetch(hub + "/auth/handoff?target=<its own address>&state=x", {mode: "no-cors", credentials: "include"})``:
    each carries the hub's SameSite=Lax cookie, and the hub mints a hand-off code for each, counting it against
    Alice's ``HAND_OFFS_PER_MINUTE``. The page needs none of the codes; kept open in a background tab it does it
    again every minute. Meanwhile every preview and IDE Alice opens (her own private port here) answers 429
    ``too-many-hand-offs`` instead of signing her in (the same with frames, or speculation rules that prefetch
    the hand-off, dest ``document`` with ``Sec-Purpose: prefetch``, or ``Purpose: prefetch`` from browsers before
    it). Now the hub mints a code only for a page the
    browser opens (Fetch Metadata: a navigation to a document, not a prefetch)."""
    served = dev_served
    alice = await make_browser(served)
    assert (await alice.dev_sign_in(served.hub, "alice")).status == 303
    hostile = served.preview("evil", 8080, "/")
    fetched = {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "empty",
               "Referer": hostile}
    framed = {**fetched, "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "iframe"}
    prefetched = {**fetched, "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document", "Sec-Purpose": "prefetch"}
    legacy = {**fetched, "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document", "Purpose": "prefetch"}  # older
    for background in [fetched] * 15 + [framed] * 15 + [prefetched] * 15 + [legacy] * 15:
        minted = await alice.fetch("GET", served.hub + "/auth/handoff?" + urlencode({"target": hostile,
                                                                                    "state": "x" * 24}),
                                   headers=background)
        assert minted.status == 403, (minted.status, minted.text[:300])
        assert "handoff-not-a-page" in minted.text  # JSON for the fetch, the page for the frame
    page = await alice.navigate(served.preview("ws1", 3000, "/mine"))
    assert page.status == 200, f"Alice's own preview answers {page.status}: {page.text[:160]}"


async def test_an_id_token_too_big_to_keep_beside_the_session_is_not_kept(
    oidc_served: Served, idp: IdP, make_browser: MakeBrowser
) -> None:
    """A kept ID token of more than 2,500 bytes sealed (a long list of groups) would leave too little of the hub's
    8 KB Cookie header for a session cookie of up to 4 KB and the login cookie: it is not kept, and one kept
    before in this browser ends, so that sign-out hands the IdP no hint rather than the wrong one."""
    served = oidc_served
    browser = like_a_browser(await make_browser(served, login="dana", idp=idp))
    assert (await browser.navigate(served.hub + "/auth/login?next=/")).status == 200
    assert browser.cookie(served.hub, "codehub_idtoken")
    browser.login = with_groups("dana", 14)
    assert browser.idp_http is not None
    browser.idp_http.cookie_jar.clear()
    assert (await browser.navigate(served.hub + "/auth/login?next=/")).status == 200
    assert browser.cookie(served.hub, "codehub_idtoken") is None
    out = await browser.fetch("POST", served.hub + "/auth/logout", headers={"Origin": served.hub})
    assert "id_token_hint" not in URL(out.location or "").query


async def test_sign_out_hands_the_idp_only_the_id_token_of_the_sign_in_it_ends(
    oidc_served: Served, idp: IdP, make_browser: MakeBrowser
) -> None:
    """The kept ID token names its sign-in: another sign-in's (copied over, or left by a browser that could not
    keep the next one) is not handed to the IdP at this one's sign-out."""
    served = oidc_served
    alice = await make_browser(served, login="alice", idp=idp)
    bob = await make_browser(served, login="bob", idp=idp)
    for browser in (alice, bob):
        assert (await browser.navigate(served.hub + "/auth/login?next=/")).status == 200
    bob.add_cookie(served.hub, "codehub_idtoken", alice.cookie(served.hub, "codehub_idtoken") or "")
    out = await bob.fetch("POST", served.hub + "/auth/logout", headers={"Origin": served.hub})
    assert "id_token_hint" not in URL(out.location or "").query

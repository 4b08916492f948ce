"""Attacks on the sign-ins that several tabs make at once: the hub's login cookie with up to four sign-ins, the
OAuth state that carries ``next`` (sealed), and the preview host's hand-off state cookie that tabs share while a
sign-in is under way. Each was a hole in a first version (an attacker pass proved them) and holds now."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit

import pytest

from tests.auth.browser import REDIRECTS, Page
from tests.auth.conftest import MakeBrowser, Serve, Served, oidc_settings
from tests.peers.idp.fixture import IdP

pytestmark = pytest.mark.timeout(90)

WORKSPACES: dict[str, dict[str, Any]] = {
    "ws1": {"owner": "alice", "ports": {3000: "private", 3002: "org"}},
}
NAV = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}


@pytest.fixture
async def oidc_served(serve: Serve, idp: IdP, gateway_port: int, tmp_path: Path) -> Served:
    return await serve(WORKSPACES, port=gateway_port, **oidc_settings(idp, gateway_port))


@pytest.fixture
async def dev_served(serve: Serve) -> Served:
    return await serve(WORKSPACES)


async def test_a_hand_off_state_the_idp_saw_cannot_sign_the_visitor_in_as_someone_else(
    oidc_served: Served, idp: IdP, make_browser: MakeBrowser
) -> None:
    """Alice, signed out, opens her private preview. Its hand-off state S goes into ``/auth/handoff?...&state=S``,
    the ``next`` of the hub's sign-in, which the OAuth state carries to the IdP: in base64, a first version told
    whoever reads the IdP's request log (or any hop before it that logs URLs) S and the preview's address. Sealed,
    it tells neither. And S dies with the callback that used it, so a code Mallory mints for it afterwards (the
    hub hands a code for any preview to anyone signed in, with the state they name) is not taken: Alice stays
    herself on her own private port."""
    served = oidc_served
    app = served.preview("ws1", 3000, "/notes?id=7")
    alice = await make_browser(served, login="alice", idp=idp)
    authorize = await alice.navigate_until(app, lambda url: url.startswith(idp.issuer))
    state = alice.cookie(app, "codehub_handoff")
    assert state
    told = unquote(authorize)  # what the IdP is told (and logs)
    assert state not in told, "the IdP is told the preview's hand-off state"
    assert "/notes" not in told, "the IdP is told which page of which preview"

    page = await alice.navigate(authorize)  # Alice signs in and lands on her page
    assert (page.status, page.url) == (200, app), page.text

    # Even knowing it (from anywhere), Mallory's code bound to it is not taken once Alice's sign-in used it.
    mallory = await make_browser(served, login="mallory", idp=idp)
    assert (await mallory.navigate(served.hub + "/auth/login?next=/")).status == 200
    minted = await mallory.fetch("GET", served.hub + "/auth/handoff?" + urlencode({"target": app, "state": state}))
    assert "code=" in (minted.location or "")
    taken = await alice.fetch("GET", minted.location or "", headers={"Accept": "application/json"})
    assert not [cookie for cookie in taken.set_cookies if cookie.startswith("codehub_session=")]
    again = await alice.navigate(app)
    assert (again.status, again.json()["path"]) == (200, "/notes?id=7"), "Alice is still herself on her preview"


async def test_a_hand_off_state_dies_with_the_sign_in_it_was_made_for(
    dev_served: Served, make_browser: MakeBrowser
) -> None:
    """Whoever learns a preview's hand-off state while a sign-in is under way (it is in the hub's hand-off URL:
    browser history, a proxy's log) can do nothing with it once that sign-in is done: the callback ends the
    cookie. A first version kept it five minutes, renewed by every later sign-in on that host, so a code someone
    else minted for it afterwards signed the visitor in as them (login CSRF on that preview)."""
    served = dev_served
    app = served.preview("ws1", 3000, "/x")
    alice = await make_browser(served)
    assert (await alice.dev_sign_in(served.hub, "alice")).status == 303
    sent = await alice.fetch("GET", app, headers=NAV)
    known = alice.cookie(app, "codehub_handoff")
    assert sent.status == 302
    assert known
    assert (await alice.navigate(sent.location or "")).status == 200  # signed in on the preview, as herself

    mallory = await make_browser(served)
    assert (await mallory.dev_sign_in(served.hub, "mallory")).status == 303
    minted = await mallory.fetch("GET", served.hub + "/auth/handoff?" + urlencode({"target": app, "state": known}))
    assert minted.status == 302
    taken = await alice.fetch("GET", minted.location or "", headers={"Accept": "application/json"})
    assert not [cookie for cookie in taken.set_cookies if cookie.startswith("codehub_session=")], \
        "Mallory's code was taken"
    assert (await alice.navigate(app)).status == 200, "Alice is still herself on her own preview"


async def test_a_planted_state_cookie_on_the_callback_path_is_no_loop(
    dev_served: Served, make_browser: MakeBrowser
) -> None:
    """Over plain HTTP a page on any sibling preview may set ``codehub_handoff=<24 URL-safe characters>;
    Domain=<parent>; Path=/_codehub/auth`` (README, Limits: it "could plant a hand-off state cookie"). Browsers
    send the cookie with the longer path first, and only to that path: the preview's pages read the gateway's
    own state S, its callback reads the planted P first. A first version sent a mismatch with a well-formed state
    back to the page, which signed in again with S, whose code met P at the callback again: a redirect loop, each
    round minting a hand-off code, until the visitor's 60 hand-offs a minute were spent and every preview refused
    them with 429 for a minute. Two cookies of that name at the callback are the mismatch page (400)."""
    served = dev_served
    alice = await make_browser(served)
    assert (await alice.dev_sign_in(served.hub, "alice")).status == 303
    app = served.preview("ws1", 3000, "/x")
    planted = "P" * 24

    async def fetch(url: str) -> Page:
        """As a browser holding the planted cookie sends it: first, and only under its path."""
        host, path = urlsplit(url).hostname or "", urlsplit(url).path
        jar = alice.cookies_for(host)
        pairs = [f"{name}={value}" for name, value in jar.items()]
        if host != urlsplit(served.hub).hostname and path.startswith("/_codehub/auth"):
            pairs.insert(0, f"codehub_handoff={planted}")
        return await alice.fetch("GET", url, headers={**NAV, **({"Cookie": "; ".join(pairs)} if pairs else {})})

    url, hops, page = app, 0, None
    while hops < 200:
        page = await fetch(url)
        if page.status not in REDIRECTS or not page.location:
            break
        url, hops = page.location, hops + 1
    assert page is not None
    assert (hops <= 6, page.status) == (True, 400), f"{hops} redirects, ending {page.status} {page.text[:120]}"

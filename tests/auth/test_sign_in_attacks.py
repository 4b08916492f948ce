"""Attacks on the sign-ins that several tabs make at once (commits 3325e5e and ef36199): the hub's login cookie with
up to four sign-ins, the OAuth state that carries ``next``, and the preview host's hand-off state cookie that is
reused and kept after a sign-in. Each test states the behaviour a fix should give; the ones marked ``xfail`` show
what the gateway does now."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

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


def _state_next(authorize: str) -> str:
    """Where the hub's OAuth state (``secret.b64(next)``) in an authorize URL says the sign-in goes."""
    state = parse_qs(urlsplit(authorize).query)["state"][0]
    _, _, encoded = state.partition(".")
    return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()


@pytest.mark.xfail(strict=True, reason="the preview's hand-off state rides to the IdP inside the OAuth state, and "
                                       "the state cookie outlives the sign-in: a code minted for it by someone else "
                                       "signs the visitor in to the preview as them")
async def test_a_hand_off_state_the_idp_saw_cannot_sign_the_visitor_in_as_someone_else(
    oidc_served: Served, idp: IdP, make_browser: MakeBrowser
) -> None:
    """Alice, signed out, opens her private preview. Its hand-off state goes into ``/auth/handoff?...&state=S``,
    which is the ``next`` of the hub's sign-in, which the OAuth state now carries, base64, to the IdP: whoever
    reads the IdP's request log (or any hop before it that logs URLs) learns S. S used to die with the callback;
    now the preview keeps it for five minutes after Alice signed in, and reuses it. Mallory, signed in as herself,
    mints a hand-off code for Alice's preview bound to S (the hub hands a code for any preview to anyone signed
    in, with the state they name) and sends Alice's browser the callback link: it is taken, and Alice is now
    Mallory on her own preview (here: refused by her own private port)."""
    served = oidc_served
    app = served.preview("ws1", 3000, "/notes?id=7")
    alice = await make_browser(served, login="alice", idp=idp)
    authorize = await alice.navigate_until(app, lambda url: url.startswith(idp.issuer))
    state = alice.cookie(app, "codehub_handoff")
    assert state
    going = _state_next(authorize)  # what the IdP is told (and logs)
    leaked = parse_qs(urlsplit(going).query).get("state", [""])[0]

    page = await alice.navigate(authorize)  # Alice signs in and lands on her page
    assert (page.status, page.url) == (200, app), page.text

    if leaked:  # the IdP learnt it: Mallory, signed in as herself, mints a code for Alice's preview bound to it
        mallory = await make_browser(served, login="mallory", idp=idp)
        assert (await mallory.navigate(served.hub + "/auth/login?next=/")).status == 200
        minted = await mallory.fetch("GET", served.hub + "/auth/handoff?" + urlencode({"target": app, "state": leaked}))
        assert minted.status == 302
        assert "code=" in (minted.location or "")
        taken = await alice.fetch("GET", minted.location or "", headers={"Accept": "application/json"})
        again = await alice.navigate(app)
        # What should hold: a state used once is gone, so Mallory's code is refused and Alice stays herself.
        assert (taken.status, again.status) == (400, 200), \
            f"Mallory's code was taken ({taken.status}); Alice's own preview now answers her {again.status}"
    assert leaked != state, "the IdP is told the preview's hand-off state"


@pytest.mark.xfail(strict=True, reason="the hand-off state cookie outlives the sign-in it was made for: a code "
                                       "bound to it, minted by someone else afterwards, is taken")
async def test_a_hand_off_state_dies_with_the_sign_in_it_was_made_for(
    dev_served: Served, make_browser: MakeBrowser
) -> None:
    """Whoever learns a preview's hand-off state while a sign-in is under way (it is in the hub's hand-off URL:
    the IdP's logs since ef36199, see above; browser history; a proxy's log) could before 3325e5e do nothing
    with it once that sign-in was done: the callback ended the cookie. Now the cookie stays (five minutes, renewed
    by every later sign-in on that host), so a code that someone else mints for the state afterwards signs the
    visitor in as them: login CSRF on that preview, for minutes instead of the seconds a sign-in takes."""
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
    again = await alice.navigate(app)
    assert (taken.status, again.status) == (400, 200), \
        f"Mallory's code was taken ({taken.status}); Alice's own preview now answers her {again.status}"


@pytest.mark.xfail(strict=True, reason="a well-formed hand-off state cookie that only the callback path receives "
                                       "sends every sign-in of that preview round in a loop until the visitor's "
                                       "hand-offs of the minute are spent")
async def test_a_planted_state_cookie_on_the_callback_path_is_no_loop(
    dev_served: Served, make_browser: MakeBrowser
) -> None:
    """Over plain HTTP a page on any sibling preview may set ``codehub_handoff=<24 URL-safe characters>;
    Domain=<parent>; Path=/_codehub/auth`` (README, Limits: it "could plant a hand-off state cookie"). Browsers
    send the cookie with the longer path first, and only to that path: the preview's pages read the gateway's
    own state S, its callback reads the planted P first. Before ef36199 that was the mismatch page (400); now a
    mismatch with a well-formed state redirects back to the page, which signs in again with S, whose code meets P
    at the callback again: a redirect loop (the commit says a planted state is "never a loop of redirects"),
    each round minting a hand-off code, until the visitor's 60 hand-offs a minute are spent and every preview
    refuses them with 429 for a minute."""
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

"""Attacks on the third sign-in fix (hand-off codes only for a page, by Fetch Metadata), from a third attacker
pass: the first two hold now (hand-offs are counted per host). The third, cookies a preview's script sets for the
site it shares with the hub, past the head limit: ``tests/browser/test_cookie_bomb.py`` (this file's test browser
keeps no cookies for a parent domain)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest

from tests.auth.conftest import MakeBrowser, Serve, Served

pytestmark = pytest.mark.timeout(90)

WORKSPACES: dict[str, dict[str, Any]] = {
    "ws1": {"owner": "alice", "ports": {3000: "private"}},
    "evil": {"owner": "mallory", "ports": {8080: "public"}},
}
STATE = "S" * 24  # a well-formed hand-off state of the hostile page's choosing


@pytest.fixture
async def dev_served(serve: Serve) -> Served:
    return await serve(WORKSPACES)


async def test_a_hostile_preview_cannot_spend_hand_offs_by_navigating_its_own_tab(
    dev_served: Served, make_browser: MakeBrowser
) -> None:
    """Alice, signed in at the hub, has Mallory's public preview open. Its script sets a hand-off state cookie on
    its own host (``document.cookie = "codehub_handoff=SSS…"``, or ``__Host-codehub_handoff=…; Secure; Path=/``
    over HTTPS) and then, without any click, sets ``location`` to ``/auth/handoff?target=<its own
    host>/nothing&state=SSS…``. That is a top-level navigation (``Sec-Fetch-Dest: document``, mode ``navigate``,
    same-site: exactly what the gateway's own redirect to the hub looks like), so the hub mints a code, spending
    one of Alice's hand-offs. The code comes back to Mallory's host, whose callback (the gateway's) sends the tab on
    to ``/nothing``, which Mallory's app answers ``204``: the browser aborts a navigation that ends in 204, the
    page stays where it is and does it again (60 in a second or two, again every minute while the tab is open).
    Meanwhile Alice's own private preview answers 429 ``too-many-hand-offs``. (A speculation-rules prefetch of the
    hand-off URL, same-site so credentialed, is dest ``document`` too, with ``Sec-Purpose: prefetch``; and one
    click buys a popup the page can navigate to the hub over and over.) Now the hand-offs are counted per host:
    the loop spends Mallory's host's minute (``HAND_OFFS_PER_MINUTE``), and Alice's own preview opens."""
    served = dev_served
    alice = await make_browser(served)
    assert (await alice.dev_sign_in(served.hub, "alice")).status == 303
    hostile = served.preview("evil", 8080, "/")
    alice.add_cookie(hostile, "codehub_handoff", STATE)  # the page's own script, on its own origin
    navigation = {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document",
                  "Accept": "text/html,application/xhtml+xml", "Referer": hostile}
    for n in range(60):
        minted = await alice.fetch("GET", served.hub + "/auth/handoff?" + urlencode(
            {"target": served.preview("evil", 8080, "/nothing"), "state": STATE}), headers=navigation)
        if minted.status != 302:
            break
        back = await alice.fetch("GET", minted.location or "", headers=navigation)
        assert back.status in (302, 303, 307), (n, back.status, back.text[:200])
        assert urlsplit(back.location or "").path == "/nothing", back.location  # the app's 204: the tab stays
        alice.add_cookie(hostile, "codehub_handoff", STATE)  # the callback ended it: the script sets it again
    page = await alice.navigate(served.preview("ws1", 3000, "/mine"))
    assert page.status == 200, f"Alice's own preview answers {page.status}: {page.text[:160]}"


async def test_over_plain_http_a_hostile_preview_cannot_spend_hand_offs_in_the_background(
    dev_served: Served, make_browser: MakeBrowser
) -> None:
    """Browsers send ``Sec-Fetch-*`` only to potentially trustworthy URLs (HTTPS, localhost): to a gateway on
    ``http://`` with a real domain (``secure`` off, as this test's gateway; a supported set-up) a preview's
    background ``fetch(hub + "/auth/handoff?…", {mode: "no-cors", credentials: "include"})`` or ``<img src>``
    carries the hub's Lax cookie (same-site) and no ``Sec-Fetch-Dest``, which the hub lets through "as before": 60
    of them spend Alice's hand-offs of the minute, as in
    ``test_a_hostile_preview_cannot_spend_its_visitors_hand_offs_in_the_background``, and her own preview answers
    429. Now the per-host count holds it there too: only the hostile host's minute is spent."""
    served = dev_served
    alice = await make_browser(served)
    assert (await alice.dev_sign_in(served.hub, "alice")).status == 303
    hostile = served.preview("evil", 8080, "/")
    over_http = {"Accept": "*/*", "Referer": hostile}  # what a fetch or an <img> sends to an http:// address
    for _ in range(60):
        minted = await alice.fetch("GET", served.hub + "/auth/handoff?" + urlencode(
            {"target": hostile, "state": STATE}), headers=over_http)
        if minted.status != 302:
            break
    page = await alice.navigate(served.preview("ws1", 3000, "/mine"))
    assert page.status == 200, f"Alice's own preview answers {page.status}: {page.text[:160]}"

"""Over HTTPS the gateway's cookies are ``__Host-`` cookies, which a sibling host cannot set: that is what stops a
page on one preview from planting a session or a hand-off state for the hub or another preview (README, Limits).

Chromium keeps the prefix rule for names that *begin* with ``__Host-``, but it accepts and sends a name that begins
with a Unicode space (U+2000, U+00A0, U+3000…) and a ``Domain=`` on the shared parent. The gateway must not read
such a cookie as its own: if it trimmed Unicode white space off cookie names (Python's ``str.strip``), a hostile
preview could sign its visitors in to the hub as its owner (login CSRF), or shadow their own session on chosen paths.

Real Chromium, real TLS (a self-signed certificate for ``*.codehub.test``), under one site as in production.
"""

from __future__ import annotations

import json

from gateway.auth.identity import Identity
from tests.browser.conftest import SITE, Browser, TlsStack

SPACES = ["\u2000", "\u00a0", "\u3000"]


async def test_a_preview_cannot_plant_a_session_under_a_unicode_spaced_host_prefix(browser: Browser,
                                                                                   tls_stack: TlsStack) -> None:
    stack = tls_stack
    sessions = stack.gateway.auth.sessions
    mallory = Identity("mallory", "mallory@example.com", (), "mallory")
    # What mallory holds after signing in herself: her own hub session, and her own session for alice's preview
    # (the hand-off gives any signed-in person a session cookie for any preview host; access is checked after).
    hub_session = sessions.issue(mallory, f"hub.{SITE}:{stack.port}")
    preview_session = sessions.issue(mallory, f"8000-vic.{SITE}:{stack.port}")

    context = await browser.launch(third_party_cookies=False, extra_args=("--ignore-certificate-errors",))
    page = await context.new_page()
    # Mallory's public preview: its script plants cookies for the whole site (codehub.test).
    await page.goto(stack.share_url("mal", 3000))
    await page.locator("#app").wait_for()
    plant = """([names, value, path]) => { for (const name of names)
        document.cookie = `${name}=${value}; Domain=codehub.test; Path=${path}; Secure; SameSite=Lax`; }"""
    # The real prefix is refused by Chromium with a Domain (control)...
    await page.evaluate(plant, [["__Host-codehub_session"], hub_session, "/"])
    assert "__Host-codehub_session" not in [c["name"] for c in await context.cookies()]
    # ...but a Unicode space in front is an ordinary name to it, kept for the whole site and sent to the hub.
    await page.evaluate(plant, [[f"{space}__Host-codehub_session" for space in SPACES], hub_session, "/"])
    planted = [c["name"] for c in await context.cookies() if c["domain"] == f".{SITE}"]
    assert len(planted) == len(SPACES), planted

    # Alice, never signed in on the hub, opens it: she must not be mallory there.
    hub = await context.new_page()
    await hub.goto(stack.hub + "/api/v1/me")
    me = await hub.locator("body").text_content() or ""
    assert "mallory" not in me, f"the hub took a planted cookie for its own: {me}"

    # Nor on a preview: mallory's session for alice's private port does not make alice mallory there (locked out
    # of her own app, or, on someone else's, filling in mallory's account).
    await page.evaluate(plant, [[f"{SPACES[0]}__Host-codehub_session"], preview_session, "/"])
    response = await hub.goto(stack.share_url("vic", 8000))
    assert response is not None
    # Anonymous there, she is sent to sign in (the dev form on the hub); as mallory she would get a 403.
    assert response.url.startswith(stack.hub + "/auth/dev"), (response.status, response.url)

    # Signed in for real, alice keeps her own identity, even on paths where a planted cookie with a longer Path
    # comes first in the Cookie header (Chromium orders cookies by path length).
    await hub.goto(stack.hub + "/auth/dev?next=/")
    await hub.locator("#user").fill("alice")
    async with hub.expect_navigation():
        await hub.locator("button[type=submit]").click()
    await page.evaluate(plant, [[f"{SPACES[0]}__Host-codehub_session"], hub_session, "/api/v1"])
    await hub.goto(stack.hub + "/api/v1/me")
    assert json.loads(await hub.locator("body").text_content() or "")["user"] == "alice"

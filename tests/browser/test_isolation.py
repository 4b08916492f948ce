"""Scenarios 9 and 10: what a hostile page in one origin can make a signed-in visitor's Chromium do to another.

Both run under ``*.codehub.test`` (mapped to loopback), where the hub (``hub.codehub.test``), the IDEs and the
previews are one *site*, as under a real domain: Chromium sends their ``SameSite=Lax`` cookies along on requests
between them, which ``*.localhost`` (every host a site of its own) would hide.

9. A workspace owner serves a page on their IDE port. A collaborator who opens the IDE gets it on the IDE's own
   origin, and from there it can neither mint an API token on the hub nor read the hub's API as them.
10. Another owner's public preview page, opened by a signed-in visitor, cannot open a WebSocket to (nor write to)
   the visitor's private app as the visitor; the app's own page and a page the port's CORS rule admits can.
"""

from __future__ import annotations

from tests.browser.conftest import SITE, Browser, MakeStack, app_command, idp_sign_in, screenshot, ws_app


async def test_a_page_under_a_collaborators_ide_cannot_reach_the_hub_api(browser: Browser,
                                                                         make_stack: MakeStack) -> None:
    stack = await make_stack({"ws1": {"owner": "mallory", "collaborators": ["alice"],
                                      "command": ws_app("{ide_port}")}}, domain=SITE)
    context = await browser.launch(third_party_cookies=False)
    page = await context.new_page()
    # An old bookmark of the IDE on the hub: it moves to the IDE's own origin and signs in through the hub.
    await page.goto(f"{stack.hub}/w/ws1/")
    await idp_sign_in(page, stack.idp, "alice")
    await page.wait_for_url(stack.ide_url("ws1"))
    await page.locator("#app").wait_for()  # the IDE's page, after the waiting page
    assert await page.evaluate("location.origin") == stack.ide_url("ws1").rstrip("/")

    minted = await page.evaluate(f"mintToken({stack.hub!r})")
    assert minted.startswith("rejected"), minted  # the preflight to the hub finds no CORS answer
    assert (await page.evaluate(f"tryPost({stack.hub + '/api/v1/tokens'!r})")) == "sent"  # opaque, refused there
    read = await page.evaluate(f"readHub({stack.hub!r})")
    assert read.startswith("rejected"), read
    assert not stack.gateway.auth.store.api_tokens, "no token was minted for the collaborator"
    assert ("POST", f"hub.{SITE}:{stack.port}", "/api/v1/tokens", 403) in stack.responses
    # The hub itself still works for her: the same request from the hub's own page goes through.
    hub = await context.new_page()
    await hub.goto(stack.hub + "/")
    created = await hub.evaluate("""async () => (await fetch("/api/v1/tokens", {method: "POST",
        headers: {"Content-Type": "application/json"}, body: JSON.stringify({name: "mine"})})).status""")
    assert created == 201
    await screenshot(page, "9-ide-page-cannot-reach-the-hub")


async def test_a_preview_cannot_act_as_its_visitor_on_another(browser: Browser, make_stack: MakeStack) -> None:
    stack = await make_stack(
        {"vic": {"owner": "alice", "command": ws_app("8000", "5000"), "ports": {8000: "private", 5000: "private"}},
         "mal": {"owner": "mallory", "command": ws_app("3000"), "ports": {3000: "public"}}},
        # passthru: a credentialed `replace` rule makes the port's cookie SameSite=None and Secure, which plain HTTP
        # cannot hold; admitting same-workspace origins with credentials is the same either way.
        policy={"cors": [{"ports": [8000], "allow_origins": ["same-workspace"], "mode": "passthru"}]},
        domain=SITE,
    )
    app_socket = stack.share_url("vic", 8000, "/ws").replace("http:", "ws:")
    writes = stack.home("vic") / "writes.txt"
    context = await browser.launch(third_party_cookies=False)
    page = await context.new_page()

    # The app's own page: a same-origin WebSocket and write carry the visitor.
    await page.goto(stack.share_url("vic", 8000))
    await idp_sign_in(page, stack.idp, "alice")
    await page.wait_for_url(stack.share_url("vic", 8000))
    await page.locator("#app").wait_for()
    assert await page.evaluate(f"tryWs({app_socket!r})") == "open user:alice"
    assert await page.evaluate("tryPost('/write')") == "sent"
    # A page the port's CORS rule admits (another port of the same workspace).
    await page.goto(stack.share_url("vic", 5000))
    await page.wait_for_url(stack.share_url("vic", 5000))
    await page.locator("#app").wait_for()
    assert await page.evaluate(f"tryWs({app_socket!r})") == "open user:alice"

    # Another owner's public preview, same site: the visitor's cookie for port 8000 rides along, and is refused.
    await page.goto(stack.share_url("mal", 3000))
    await page.locator("#app").wait_for()
    assert await page.evaluate(f"tryWs({app_socket!r})") == "refused"
    assert await page.evaluate(f"tryPost({stack.share_url('vic', 8000, '/write')!r})") == "sent"
    host = f"8000-vic.{SITE}:{stack.port}"
    assert ("GET", host, "/ws", 403) in stack.responses
    assert ("POST", host, "/write", 403) in stack.responses
    assert writes.read_text().splitlines() == ["8000 alice"], "only the app's own write arrived"
    await screenshot(page, "10-cross-preview-websocket-refused")


async def test_a_preview_cannot_plant_its_share_link_on_another(browser: Browser, make_stack: MakeStack) -> None:
    """A share link is traded for a cookie only on a host it grants. A page on mallory's preview makes its visitor's
    browser open alice's private preview with mallory's own (valid) link in the URL, in a request of its own (the
    same site: the cookie is set): were the cookie kept, alice's visits there would get "this share link is for
    another port or workspace" (403) instead of a sign-in, for as long as mallory's link lives."""
    stack = await make_stack(
        {"vic": {"owner": "alice", "command": app_command(8000), "ports": {8000: "private"}},
         "mal": {"owner": "mallory", "command": app_command(3000), "ports": {3000: "public"}}},
        domain=SITE,
    )
    _link, token = await stack.gateway.auth.store.create_share(
        workspace="mal", port=3000, audience="anyone", people=[], created_by="mallory", ttl=3600)
    context = await browser.launch(third_party_cookies=False)
    page = await context.new_page()
    await page.goto(stack.share_url("mal", 3000))
    await page.locator("#app").wait_for()
    planted = stack.share_url("vic", 8000, f"/?codehub_share={token}")
    await page.evaluate("url => fetch(url, {mode: 'no-cors', credentials: 'include'}).catch(() => null)", planted)
    host = f"8000-vic.{SITE}:{stack.port}"
    assert [status for _m, seen, path, status in stack.responses if seen == host and path == "/"] == [403]
    assert not [c for c in await context.cookies() if c["domain"] == f"8000-vic.{SITE}"], "no cookie there"

    # Alice opens her preview: she is sent to sign in, and lands on her app.
    await page.goto(stack.share_url("vic", 8000))
    await idp_sign_in(page, stack.idp, "alice")
    await page.wait_for_url(stack.share_url("vic", 8000))
    assert await page.locator("#user").text_content() == "alice"

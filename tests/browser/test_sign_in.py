"""Scenario 1: signed out, click a private share URL pasted in chat → real OIDC sign-in in the browser → back on
exactly the clicked URL (path and query) showing the app, as the signed-in owner.

The workspace is asleep (WARM) when the link is clicked, so the route also passes the waiting page once."""

from __future__ import annotations

import asyncio

from playwright.async_api import Page

from tests.browser.conftest import (
    Browser,
    MakeStack,
    OtherOrigin,
    Stack,
    app_command,
    idp_sign_in,
    screenshot,
    ws_app,
)


async def test_click_private_share_url_signs_in_and_lands_on_it(
    browser: Browser, make_stack: MakeStack, other_origin: OtherOrigin
) -> None:
    stack = await make_stack({"ws1": {"owner": "alice", "command": app_command(3000), "ports": {3000: "private"}}})
    clicked = stack.share_url("ws1", 3000, "/reports/q3?sort=desc&filter=a%20b#top")
    context = await browser.launch(third_party_cookies=False)
    page = await context.new_page()

    await page.goto(other_origin.url("chat", f"/link?href={_quote(clicked)}"))
    async with page.expect_navigation():
        await page.locator("#link").click()
    # Signed out: the preview host sends the browser to the hub, the hub to the IdP's login form.
    await idp_sign_in(page, stack.idp, "alice")

    await page.wait_for_url(clicked.partition("#")[0] + "*")
    await page.locator("#app").wait_for()
    # Path and query survive the round trip byte for byte. The fragment does not: browsers carry it across
    # redirects but drop it at the IdP's form POST, and no server ever sees it.
    assert page.url == clicked.partition("#")[0]
    assert await page.locator("#path").text_content() == "/reports/q3?sort=desc&filter=a%20b"
    assert await page.locator("#app").text_content() == "App of ws1 on port 3000"
    assert await page.locator("#user").text_content() == "alice"
    # The hand-off left nothing in the URL and the session is a host-only cookie on the preview host.
    cookies = {(c["name"], c["domain"]) for c in await context.cookies()}
    assert ("codehub_session", "3000-ws1.localhost") in cookies
    assert ("codehub_session", "localhost") in cookies
    await screenshot(page, "1-sign-in-back-on-clicked-url")

    # The gateway's error pages, as a signed-in user meets them: no such workspace (404), light and dark.
    response = await page.goto(stack.share_url("nope", 3000, "/"))
    assert response is not None
    assert response.status == 404
    assert await page.locator("h1").text_content() == "Not found"
    await screenshot(page, "1-error-page-404-light")
    await page.emulate_media(color_scheme="dark")
    await screenshot(page, "1-error-page-404-dark")


async def test_tabs_restored_together_while_signed_out_each_land_on_their_own_page(
    browser: Browser, make_stack: MakeStack
) -> None:
    """A browser restoring its preview tabs after a night (or three links opened at once from a chat) sends all
    three to sign in before any has finished: each tab, once its IdP form is filled, lands on its own page, two of
    them on the same preview host."""
    stack = await make_stack({"ws1": {"owner": "alice", "command": app_command(3000), "ports": {3000: "private"}},
                              "ws2": {"owner": "alice", "command": app_command(4000), "ports": {4000: "private"}}})
    context = await browser.launch(third_party_cookies=False)
    tabs = {stack.share_url("ws1", 3000, "/tab/1?a=1"): "/tab/1?a=1",
            stack.share_url("ws1", 3000, "/tab/2"): "/tab/2",
            stack.share_url("ws2", 4000, "/tab/3"): "/tab/3"}
    pages = [await context.new_page() for _ in tabs]
    await asyncio.gather(*(page.goto(url) for page, url in zip(pages, tabs, strict=True)))
    for page, (url, path) in zip(pages, tabs.items(), strict=True):
        await idp_sign_in(page, stack.idp, "alice")
        await page.wait_for_url(url)
        await page.locator("#app").wait_for()
        assert await page.locator("#path").text_content() == path


def _quote(url: str) -> str:
    from urllib.parse import quote

    return quote(url, safe="")


async def signed_in_and_copied(browser: Browser, stack: Stack, app: str) -> tuple[Page, Page]:
    """A page signed in to ``app`` through the IdP, and a page of another profile that holds a copy of its cookies
    for ``app`` (a shared computer, a leaked HAR file), both on ``app``."""
    context = await browser.launch(third_party_cookies=False)
    page = await context.new_page()
    await page.goto(app)
    await idp_sign_in(page, stack.idp, "alice")
    await page.locator("#app").wait_for()
    copy = await browser.launch(third_party_cookies=False)
    await copy.add_cookies([{"name": c["name"], "value": c["value"], "url": app} for c in await context.cookies(app)])
    other = await copy.new_page()
    await other.goto(app)
    return page, other


async def test_sign_out_on_the_hub_ends_the_previews_session_in_every_copy(
    browser: Browser, make_stack: MakeStack
) -> None:
    """Sign out is a click on the hub, whose cookie is the only one it can touch: the preview's session cookie, copied
    into another browser profile (a shared computer, a leaked HAR file), opens the app until that click and is
    sent to sign in after it; and the IdP's session ends too, so signing in again takes a password."""
    stack = await make_stack({"ws1": {"owner": "alice", "command": app_command(3000), "ports": {3000: "private"}}})
    app = stack.share_url("ws1", 3000, "/")
    page, other = await signed_in_and_copied(browser, stack, app)
    assert await other.locator("#user").text_content() == "alice"

    await page.goto(stack.hub)
    async with page.expect_navigation():
        await page.get_by_role("button", name="Sign out").click()
    # The IdP's own sign-out (RP-initiated logout) asks to confirm, then sends the browser back to the hub.
    await page.wait_for_url(f"{stack.idp.issuer}/**")
    async with page.expect_navigation():
        await page.get_by_role("button", name="Yes, sign me out").click()
    await page.wait_for_url(stack.hub + "/")
    assert await page.get_by_role("button", name="Sign out").count() == 0

    await other.goto(app)
    await other.wait_for_url(f"{stack.idp.issuer}/**")
    assert await other.locator("input[name=login]").count() == 1
    # The IdP's session ended too: the next sign-in in the first browser asks for a password again.
    await page.goto(app)
    await page.wait_for_url(f"{stack.idp.issuer}/**")
    await page.locator("input[name=login]").wait_for()
    await idp_sign_in(page, stack.idp, "alice")
    await page.locator("#app").wait_for()


async def test_sign_out_ends_a_websocket_a_copied_cookie_opened(browser: Browser, make_stack: MakeStack) -> None:
    """A WebSocket lives on after the page that opened it is done with sign-in (an IDE's terminal, an app's HMR):
    opened in another profile with a copy of the preview's cookies, Chromium sees it closed with 1008 (policy
    violation) once the owner clicks Sign out on the hub, within the heartbeat's half period (0.5 s here)."""
    stack = await make_stack({"ws1": {"owner": "alice", "command": ws_app("3000"), "ports": {3000: "private"}}},
                             timeouts={"websocket_heartbeat": 1.0})
    app = stack.share_url("ws1", 3000, "/")
    page, other = await signed_in_and_copied(browser, stack, app)
    first = await other.evaluate("""(url) => new Promise((resolve) => {
        window.held = new WebSocket(url);
        window.held.onmessage = (event) => resolve(event.data);
        window.held.onclose = (event) => { window.closedWith = event.code; };
    })""", app.replace("http://", "ws://") + "ws")
    assert first == "user:alice"

    await page.goto(stack.hub)
    async with page.expect_navigation():
        await page.get_by_role("button", name="Sign out").click()
    await page.wait_for_url(f"{stack.idp.issuer}/**")
    await other.wait_for_function("window.closedWith === 1008", timeout=10_000)

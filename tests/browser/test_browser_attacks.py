"""An attack pass on what a hostile preview's page can make its visitor's browser do to other origins, through the
gateway's own pages on them. Real Chromium over real TLS (``tls_stack``): mallory's public preview, alice's private
app; Chromium tells where a request came from (Fetch Metadata) only to HTTPS origins, as in production.
"""

from __future__ import annotations

import asyncio

from playwright.async_api import Page

from gateway.lifecycle import Phase
from tests.browser.conftest import Browser, TlsStack, screenshot
from tests.kube.support import until


async def _alice_on_her_app(browser: Browser, stack: TlsStack) -> Page:
    """Alice signed in and opened her private app, so she holds its cookie; it is running."""
    app = stack.share_url("vic", 8000)
    context = await browser.launch(third_party_cookies=False, extra_args=("--ignore-certificate-errors",))
    page = await context.new_page()
    await page.goto(app)
    await page.locator("#user").fill("alice")
    async with page.expect_navigation():
        await page.locator("button[type=submit]").click()
    await page.locator("#app").wait_for()
    return page


async def test_a_page_a_preview_sent_its_visitor_to_does_not_wake_their_workspace_by_itself(
        browser: Browser, tls_stack: TlsStack) -> None:
    """Mallory's script (no click) sends alice's tab to a port of her running workspace where nothing listens. The
    gateway's 502 page there tried again by itself every 3 s (``<meta http-equiv="refresh">``): each reload a
    navigation from the app's own origin, which the wake rule lets wake, with her cookie. So her tab, long after
    mallory's page was gone, kept the workspace awake (each reload is a request to it) and, once it went to sleep
    anyway (alice's Stop, the idle reaper where visitors do not keep it awake), woke it again within 3 s, for as
    long as the tab stayed open. The page tries by itself only when the visitor's own navigation brought it, as
    the 431 page does; else its button is the visitor's to click."""
    stack = tls_stack
    runtime = stack.gateway.runtime
    page = await _alice_on_her_app(browser, stack)
    nothing = stack.share_url("vic", 8001)  # her workspace's, where no dev server listens (yet)

    await page.context.add_init_script(f"if (location.hash === '#away') location.href = {nothing + '?script'!r};")
    await page.goto(stack.share_url("mal", 3000, "/elsewhere#away"), wait_until="commit")
    await page.get_by_role("link", name="Try again now").wait_for()
    assert page.url == nothing + "?script"
    assert await page.locator("h1").text_content() == "Nothing is answering"
    assert await page.locator('meta[http-equiv="refresh"]').count() == 0
    await screenshot(page, "attack-a-502-page-a-script-brought-does-not-reload-itself")

    await runtime.stop("vic")  # alice stops it from the hub, or it goes to sleep
    await asyncio.sleep(3.5)  # past the 3 s a reload by itself came after
    assert not stack.gateway.waker.waking("vic")
    state = runtime.get("vic")
    assert state is not None
    assert state.phase is Phase.WARM, state

    # Her own click on the page's button wakes it (a navigation of hers, from its own origin).
    def woken() -> bool:
        now = runtime.get("vic")
        return stack.gateway.waker.waking("vic") or (now is not None and now.phase is not Phase.WARM)

    await page.get_by_role("link", name="Try again now").click()
    await until(woken, 10)


async def test_a_502_page_the_visitor_opened_themselves_still_tries_again_by_itself(
        browser: Browser, tls_stack: TlsStack) -> None:
    """The page a visitor's own navigation brought (typed, a bookmark) keeps trying by itself, as before: a dev
    server being started shows up without a click."""
    stack = tls_stack
    page = await _alice_on_her_app(browser, stack)
    await page.goto(stack.share_url("vic", 8001))
    await page.get_by_role("link", name="Try again now").wait_for()
    assert await page.locator('meta[http-equiv="refresh"]').count() == 1

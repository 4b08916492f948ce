"""Scenario 12: a hostile preview cannot make its visitor's browser wake the visitor's sleeping workspaces.

Previews are one site, so a page on mallory's public preview makes a signed-in visitor's Chromium send the visitor's
cookie for alice's app along with frames, images, fetches, event streams, prefetches and prerenders (its speculation
rules), and navigations its scripts start; each would wake alice's workspace (what sleeping saves, a COLD one
restored from its archive). Only alice's own navigation to it may: typed, or a link she clicked.

Real Chromium over real TLS: Chromium tells where a request came from (Fetch Metadata) only to HTTPS origins (and
``localhost``), as in production.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlencode

from playwright.async_api import Page

from gateway.lifecycle import Phase
from tests.browser.conftest import SITE, Browser, TlsStack, screenshot
from tests.kube.support import until

# Every way a page loads something in the background that does not need the other origin's consent.
_BACKGROUND = """([url, events]) => {
  const add = (tag, attrs) => document.body.append(Object.assign(document.createElement(tag), attrs));
  add("img", {src: url + "img"});
  add("iframe", {src: url + "frame"});
  add("link", {rel: "prefetch", href: url + "prefetch"});
  add("script", {type: "speculationrules", textContent: JSON.stringify({  // Chromium says "Sec-Fetch-Site: none"
    prefetch: [{source: "list", urls: [url + "speculated"]}],
    prerender: [{source: "list", urls: [url + "prerendered"]}]})});
  fetch(url + "fetch", {mode: "no-cors", credentials: "include"}).catch(() => null);
  new EventSource(events, {withCredentials: true});
}"""


async def alice_on_her_app(browser: Browser, stack: TlsStack) -> Page:
    """Alice signed in and opened her private app (its waiting page woke it), so she holds its cookie."""
    app = stack.share_url("vic", 8000)
    context = await browser.launch(third_party_cookies=False, extra_args=("--ignore-certificate-errors",))
    page = await context.new_page()
    await page.goto(app)
    await page.locator("#user").fill("alice")
    async with page.expect_navigation():
        await page.locator("button[type=submit]").click()
    await page.locator("#app").wait_for()
    assert page.url == app
    return page


async def _alice_left_her_app(browser: Browser, stack: TlsStack) -> Page:
    """Then she left it, and it went to sleep."""
    page = await alice_on_her_app(browser, stack)
    await stack.gateway.runtime.stop("vic")
    return page


async def test_a_preview_cannot_wake_its_visitors_workspace(browser: Browser, tls_stack: TlsStack) -> None:
    stack = tls_stack
    runtime = stack.gateway.runtime
    app = stack.share_url("vic", 8000)
    host = f"8000-vic.{SITE}:{stack.port}"
    page = await _alice_left_her_app(browser, stack)

    # Mallory's public preview loads alice's app every way a page can without asking.
    await page.goto(stack.share_url("mal", 3000))
    await page.locator("#app").wait_for()
    stack.responses.clear()
    await page.evaluate(_BACKGROUND, [app, stack.share_url("vic", 8000, "/_codehub/wake/events")])
    expected = {"/img", "/frame", "/fetch", "/_codehub/wake/events", "/speculated", "/prerendered"}
    with contextlib.suppress(TimeoutError):  # each reaches the gateway (`<link rel=prefetch>` may, or may not, be sent)
        await until(lambda: expected <= {path for _method, at, path, _status in stack.responses if at == host}, 10)
    seen = [(path, status) for _method, at, path, status in stack.responses if at == host]
    assert expected <= {path for path, _status in seen}, seen
    assert {status for _path, status in seen} == {403}, seen
    await asyncio.sleep(0.5)  # a wake begun would be under way by now
    assert not stack.gateway.waker.waking("vic")
    state = runtime.get("vic")
    assert state is not None
    assert state.phase is Phase.WARM, state

    # A script's own navigation there (no click: Playwright's `evaluate` would count as one) gets a page that says
    # so, at the top, and its button wakes it.
    await page.context.add_init_script(f"if (location.hash === '#away') location.href = {app + '?script'!r};")
    await page.goto(stack.share_url("mal", 3000, "/elsewhere#away"), wait_until="commit")
    await page.locator("#wake").wait_for()
    assert page.url == app + "?script"
    assert (await page.locator("h1").text_content()) == "This workspace is asleep"
    assert not stack.gateway.waker.waking("vic")
    await screenshot(page, "12-a-script-navigation-does-not-wake")
    await page.locator("#wake").click()
    await page.locator("#app").wait_for()
    assert await page.locator("#user").text_content() == "alice"
    await screenshot(page, "12-app-woken-by-its-visitor-only")


async def test_a_link_clicked_elsewhere_wakes_through_the_sign_in(browser: Browser, tls_stack: TlsStack) -> None:
    """The usual way there: alice, signed in at the hub but not yet on this preview, clicks a link to it on another
    page. The click's navigation goes through the hand-off (the preview, the hub, the preview's callback) and arrives
    with her cookie, still her click: it wakes the workspace."""
    stack = tls_stack
    app = stack.share_url("vic", 8000)
    page = await _alice_left_her_app(browser, stack)
    await page.context.clear_cookies(domain=f"8000-vic.{SITE}")
    await page.goto(stack.share_url("mal", 3000))
    await page.locator("#app").wait_for()
    await page.evaluate("""href => document.body.append(Object.assign(document.createElement("a"),
        {href, id: "to-app", textContent: "alice's app"}))""", app + "?from-chat")
    stack.responses.clear()
    await page.locator("#to-app").click()
    await page.locator("#app").wait_for()
    assert page.url == app + "?from-chat"
    assert await page.locator("#user").text_content() == "alice"
    host = f"8000-vic.{SITE}:{stack.port}"
    # The app's own answer may come by the fast lane (a connection of its own), which `responses` does not see.
    statuses = [status for _m, at, path, status in stack.responses if at == host and path == "/"]
    assert statuses[:2] == [302, 503], "sent to sign in, then the waiting page"
    assert set(statuses[2:]) <= {200}, statuses


async def test_a_frame_elsewhere_offers_its_visitor_a_wake(browser: Browser, tls_stack: TlsStack) -> None:
    """In a frame on another origin (a review tool that may frame previews) a sleeping app shows a button, and the
    click wakes it: a navigation of the frame from the app's own origin."""
    stack = tls_stack
    stack.set_policy({"embedding": {"frame_ancestors": [stack.share_url("mal", 3000).rstrip("/")]}})
    app = stack.share_url("vic", 8000)
    page = await _alice_left_her_app(browser, stack)

    await page.goto(stack.share_url("mal", 3000))
    await page.locator("#app").wait_for()
    await page.evaluate("""src => document.body.append(Object.assign(document.createElement("iframe"),
        {src, id: "frame", style: "width: 100%; height: 420px"}))""", app + "?in-review")
    frame = page.frame_locator("#frame")
    await frame.locator("#wake").wait_for()
    assert await frame.locator("h1").text_content() == "This workspace is asleep"
    state = stack.gateway.runtime.get("vic")
    assert state is not None
    assert state.phase is Phase.WARM
    await screenshot(page, "12-frame-offers-a-wake")
    await frame.locator("#wake").click()
    await frame.locator("#app").wait_for()
    assert await frame.locator("#path").text_content() == "/?in-review"
    assert await frame.locator("#user").text_content() == "alice"


async def test_the_sign_in_popups_page_alone_does_not_go_on_by_itself(browser: Browser, tls_stack: TlsStack) -> None:
    """A helper's attack: mallory's script (no click) sent the tab to the hub's hand-off in popup mode; the popup's
    landing page on alice's app, with no frame that opened it, went on to the callback by script — a navigation from
    the app's own origin, which the wake rule lets wake — and the callback, alice holding a session there, sent it
    on to her app: woken. Alone, the page now offers a link, which is the visitor's to click."""
    stack = tls_stack
    app = stack.share_url("vic", 8000)
    page = await _alice_left_her_app(browser, stack)
    handoff = stack.hub + "/auth/handoff?" + urlencode({"target": app + "?popup", "state": "mallory", "popup": "1"})
    await page.context.add_init_script(f"if (location.hash === '#away') location.href = {handoff!r};")
    await page.goto(stack.share_url("mal", 3000, "/elsewhere#away"), wait_until="commit")
    await page.get_by_role("link", name="Continue to the preview").wait_for()
    assert page.url.startswith(stack.share_url("vic", 8000, "/_codehub/auth/popup?"))
    await asyncio.sleep(1)
    assert not stack.gateway.waker.waking("vic")
    state = stack.gateway.runtime.get("vic")
    assert state is not None
    assert state.phase is Phase.WARM, state

    await page.get_by_role("link", name="Continue to the preview").click()  # alice's click: her app wakes
    await page.locator("#app").wait_for()

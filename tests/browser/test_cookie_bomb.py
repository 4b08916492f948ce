"""A hostile preview cannot lock its visitors out of the hub and every preview with cookies of its own.

A preview's script may set cookies for the parent domain it shares with the hub and every other preview (only
``__Host-`` names are out of its reach): three of 3 KB, kept for a year, make every request of its visitor's
Chromium to the whole site carry 9 KB of ``Cookie`` header, past ``limits.header_size``. The gateway reads such a
head to its end all the same, and answers the first request 431 with ``Set-Cookie`` that clear the largest cookies
that are not its own; the visitor stays signed in, and the page tries again by itself.

Real Chromium over real TLS (``Secure`` cookies for the site ``codehub.test``), as in production.
"""

from __future__ import annotations

import contextlib
from urllib.parse import quote

import pytest
from playwright.async_api import BrowserContext, Page

from gateway.lifecycle import Phase
from tests.browser.conftest import SITE, Browser, OtherOrigin, TlsStack
from tests.browser.test_wake_elsewhere import _alice_left_her_app
from tests.kube.support import until

_BOMB = """() => { for (const n of [1, 2, 3])
  document.cookie = `pad${n}=${"x".repeat(3000)}; Domain=codehub.test; Path=/; Secure; Max-Age=31536000`; }"""


async def _alice_on_mallorys_preview(browser: Browser, stack: TlsStack) -> tuple[BrowserContext, Page]:
    """Alice signed in at the hub, then opened mallory's public preview."""
    context = await browser.launch(third_party_cookies=False, extra_args=("--ignore-certificate-errors",))
    page = await context.new_page()
    await page.goto(stack.hub + "/auth/dev?next=/")
    await page.locator("#user").fill("alice")
    async with page.expect_navigation():
        await page.locator("button[type=submit]").click()
    await page.get_by_role("heading", name="Your workspaces").wait_for()
    await page.goto(stack.share_url("mal", 3000))
    await page.locator("#app").wait_for()
    return context, page


async def test_a_preview_cannot_lock_its_visitor_out_with_cookies_for_the_site(browser: Browser,
                                                                               tls_stack: TlsStack) -> None:
    stack = tls_stack
    context, page = await _alice_on_mallorys_preview(browser, stack)

    # Mallory's page, opened by alice: its script sets the cookies for the whole site.
    await page.evaluate(_BOMB)
    planted = sorted(c["name"] for c in await context.cookies() if c["domain"] == f".{SITE}")
    assert planted == ["pad1", "pad2", "pad3"], planted

    # Back to the hub (a kept-alive connection that aiohttp's lane serves, or a new one: either): refused once,
    # with the cookies cleared, and the page tries again by itself.
    stack.responses.clear()
    refused = await page.goto(stack.hub + "/")
    assert refused is not None
    assert refused.status == 431, refused.status
    assert "more cookies than this gateway accepts" in (await page.locator("main").text_content() or "")
    await page.get_by_role("heading", name="Your workspaces").wait_for()
    assert "alice" in (await page.locator("nav.top").text_content() or "")
    left = sorted(c["name"] for c in await context.cookies() if c["name"].startswith("pad"))
    assert left == ["pad3"], left  # what is left (3 KB) is under half the limit

    # Her own private app opens too (its hand-off through the hub, the cookies gone for every host).
    response = await page.goto(stack.share_url("vic", 8000))
    assert response is not None
    await page.locator("#app").wait_for()
    assert page.url == stack.share_url("vic", 8000)


_ATTRIBUTES = "Domain=codehub.test; Secure; Max-Age=31536000"
_BOMBS = {  # name → (the cookies' names and values as the page sets them, their attributes, the hub path alice opens)
    "partitioned": ("pad${n}=${'x'.repeat(3000)}", f"Path=/; {_ATTRIBUTES}; SameSite=None; Partitioned", "/"),
    "space": ("a b${n}=${'x'.repeat(3000)}", f"Path=/; {_ATTRIBUTES}", "/"),
    "non-ascii": ("\u00e9${n}=${'x'.repeat(3000)}", f"Path=/; {_ATTRIBUTES}", "/"),
    "comma": ("a,${n}=${'x'.repeat(3000)}", f"Path=/; {_ATTRIBUTES}", "/"),
    "deep-path": ("pad${n}=${'x'.repeat(3000)}", f"Path=/a/b/c/d/e/f/g/; {_ATTRIBUTES}", "/a/b/c/d/e/f/g/h"),
    "semicolon-in-url": ("pad${n}=${'x'.repeat(3000)}", f"Path=/a/; {_ATTRIBUTES}", "/a/b;c"),
    "two-byte-value": ("pad${n}=${'\u00e9'.repeat(1500)}", f"Path=/; {_ATTRIBUTES}", "/"),  # 9 KB, 4.5 K characters
}


@pytest.mark.parametrize("bomb", list(_BOMBS))
async def test_cookies_chromium_keeps_however_set_are_cleared(browser: Browser, tls_stack: TlsStack,
                                                               bomb: str) -> None:
    """Kinds of cookies Chromium keeps for the site that first cuts of the clearing missed (two helpers' attacks):
    ``Partitioned`` ones (cleared only by a ``Partitioned`` line), names with a space, a comma or ``é``, a path
    deeper than it looked, a path cut by a ``;`` in the URL, and values over the limit in bytes but not in
    characters. Each was a lock-out (for most, with the page's reloads going on for ever)."""
    stack = tls_stack
    cookie, attributes, path = _BOMBS[bomb]
    _context, page = await _alice_on_mallorys_preview(browser, stack)
    await page.evaluate(f"() => {{ for (const n of [1, 2, 3]) document.cookie = `{cookie}; {attributes}`; }}")
    url = stack.hub + path
    async with page.expect_response(lambda response: response.url == url and response.status != 431,
                                    timeout=15_000) as later:
        refused = await page.goto(url)
        assert refused is not None
        assert refused.status == 431, refused.status
    assert (await later.value).status in (200, 404)  # a hub path that names nothing is a 404 page


async def test_cookies_set_in_a_frame_on_another_site_are_cleared_there(browser: Browser, tls_stack: TlsStack,
                                                                        other_origin: OtherOrigin) -> None:
    """Mallory's preview embedded in a review tool (another site) sets ``Partitioned`` cookies for the site in its
    frame: kept for that review site only, so the frames of the hub and of every preview under it are refused. The
    frame's answer clears them as ``SameSite=None`` lines (a helper's attack: ``Lax`` ones are not taken in a frame of
    another site, and the frame reloaded for good)."""
    stack = tls_stack
    stack.set_policy({"embedding": {"frame_ancestors": [other_origin.review_origin]}})
    context = await browser.launch(third_party_cookies=False, extra_args=("--ignore-certificate-errors",))
    page = await context.new_page()
    await page.goto(other_origin.url("review", f"/frame?src={quote(stack.share_url('mal', 3000), safe='')}"))
    await page.frame_locator("#preview").locator("#app").wait_for()
    await page.frames[1].evaluate(f"() => {{ for (const n of [1, 2, 3]) document.cookie = "
                                  f"`pad${{n}}=${{'x'.repeat(3000)}}; Path=/; {_ATTRIBUTES}; SameSite=None; "
                                  f"Partitioned`; }}")

    async def left() -> list[str]:
        return sorted(c["name"] for c in await context.cookies() if c["name"].startswith("pad"))

    assert await left() == ["pad1", "pad2", "pad3"]
    statuses: list[int] = []
    frame = stack.share_url("mal", 3000)
    page.on("response", lambda response: statuses.append(response.status) if response.url == frame else None)
    await page.reload()
    await page.frame_locator("#preview").get_by_role("link", name="Try again now").click()  # a frame: no reload
    await until(lambda: 200 in statuses, 15)
    assert statuses == [431, 200], statuses
    assert await left() == ["pad3"]
    await page.frame_locator("#preview").locator("#app").wait_for()


_LOAD_IN_A_HIDDEN_FRAME = """src => document.body.append(Object.assign(document.createElement("iframe"),
  {src, style: "width: 1px; height: 1px; opacity: 0"}))"""


@pytest.mark.parametrize("how", ["hidden-frame", "script-navigation"])
async def test_cookies_over_the_limit_do_not_let_a_preview_wake_its_visitors_workspace(
        browser: Browser, tls_stack: TlsStack, how: str) -> None:
    """A helper's attack: the refusal page's reload came from the sleeping workspace's own origin, which may wake
    it, so mallory's cookies turned a frame or a navigation of her script (each refused 403 ``wake-from-elsewhere``
    without them) into a wake of alice's workspace. The page now reloads by itself only for the visitor's own
    navigation (``tests/browser/test_wake_elsewhere.py``)."""
    stack = tls_stack
    app = stack.share_url("vic", 8000)
    page = await _alice_left_her_app(browser, stack)  # she holds its cookie; it went to sleep (WARM)
    await page.goto(stack.share_url("mal", 3000))
    await page.locator("#app").wait_for()
    if how == "hidden-frame":
        await page.evaluate(_BOMB)
        await page.evaluate(_LOAD_IN_A_HIDDEN_FRAME, app + "?hidden-frame")
    else:  # no click: an init script has no user activation (Playwright's `evaluate` would count as one)
        await page.context.add_init_script(f"if (location.hash === '#away') {{ ({_BOMB})(); "
                                           f"location.href = {app + '?script'!r}; }}")
        await page.goto(stack.share_url("mal", 3000, "/elsewhere#away"), wait_until="commit")
    with contextlib.suppress(TimeoutError):  # a reload would come 3 s after the refusal
        await until(lambda: stack.gateway.waker.waking("vic"), 6)
    state = stack.gateway.runtime.get("vic")
    assert state is not None
    assert state.phase is Phase.WARM, state

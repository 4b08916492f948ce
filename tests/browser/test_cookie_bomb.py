"""A hostile preview cannot lock its visitors out of the hub and every preview with cookies of its own.

A preview's script may set cookies for the parent domain it shares with the hub and every other preview (only
``__Host-`` names are out of its reach): three of 3 KB, kept for a year, make every request of its visitor's
Chromium to the whole site carry 9 KB of ``Cookie`` header, past ``limits.header_size``. The gateway reads such a
head to its end all the same, and answers the first request 431 with ``Set-Cookie`` that clear the largest cookies
that are not its own; the visitor stays signed in, and the page tries again by itself.

Real Chromium over real TLS (``Secure`` cookies for the site ``codehub.test``), as in production.
"""

from __future__ import annotations

from tests.browser.conftest import SITE, Browser, TlsStack

_BOMB = """() => { for (const n of [1, 2, 3])
  document.cookie = `pad${n}=${"x".repeat(3000)}; Domain=codehub.test; Path=/; Secure; Max-Age=31536000`; }"""


async def test_a_preview_cannot_lock_its_visitor_out_with_cookies_for_the_site(browser: Browser,
                                                                               tls_stack: TlsStack) -> None:
    stack = tls_stack
    context = await browser.launch(third_party_cookies=False, extra_args=("--ignore-certificate-errors",))
    page = await context.new_page()
    await page.goto(stack.hub + "/auth/dev?next=/")
    await page.locator("#user").fill("alice")
    async with page.expect_navigation():
        await page.locator("button[type=submit]").click()
    await page.get_by_role("heading", name="Your workspaces").wait_for()

    # Mallory's public preview, opened by alice: its script sets the cookies for the whole site.
    await page.goto(stack.share_url("mal", 3000))
    await page.locator("#app").wait_for()
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

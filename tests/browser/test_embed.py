"""Scenario 4: a review tool on another site frames a private preview.

- Control: this browser really blocks third-party cookies (an unpartitioned ``SameSite=None`` cookie set inside
  a cross-site iframe is not kept; a partitioned one is).
- Inside the review page's iframe the preview offers sign-in in a popup (no redirect loop through the hub,
  whose cookie is third-party there); after the IdP login in the popup the iframe shows the app, and keeps
  showing it after a reload (partitioned session cookie, keyed to the review site).
- A site not in ``embedding.frame_ancestors`` cannot frame it, not even with a share link (CSP blocks it).
- The share API's iframe snippet, pasted into the review page, renders for a browser that never signed in.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit

import aiohttp
from playwright.async_api import Page, Response

from gateway.auth.identity import Identity
from gateway.lifecycle import Phase
from tests.browser.conftest import Browser, MakeStack, OtherOrigin, Stack, app_command, idp_sign_in, screenshot


async def test_review_tool_embeds_private_preview(browser: Browser, make_stack: MakeStack,
                                                  other_origin: OtherOrigin) -> None:
    stack = await make_stack(
        {"ws4": {"owner": "alice", "command": app_command(3000), "ports": {3000: "private"}}},
        policy={"embedding": {"frame_ancestors": [other_origin.review_origin]}},
    )
    context = await browser.launch(third_party_cookies=False)
    page = await context.new_page()
    await _third_party_cookies_are_blocked(page, other_origin)

    preview = stack.share_url("ws4", 3000, "/review?mr=42")
    documents: list[tuple[int, str]] = []  # every document the preview host served, in any frame or popup

    def on_response(response: Response) -> None:
        if urlsplit(response.url).hostname == "3000-ws4.localhost" and response.request.resource_type == "document":
            documents.append((response.status, response.url.split("?")[0]))

    context.on("response", on_response)
    await page.goto(other_origin.url("review", f"/frame?src={quote(preview, safe='')}"))
    frame = page.frame_locator("#preview")
    await frame.locator("#sign-in").wait_for()
    assert await frame.locator("h1").text_content() == "Sign in to see this preview"
    await screenshot(page, "4-embed-sign-in-offered")

    async with context.expect_page() as opened:
        await frame.locator("#sign-in").click()
    popup = await opened.value
    await idp_sign_in(popup, stack.idp, "alice")
    if not popup.is_closed():  # it hands the code to the frame and closes itself
        await popup.wait_for_event("close", timeout=20_000)

    await frame.locator("#app").wait_for()
    assert await frame.locator("#path").text_content() == "/review?mr=42"
    assert await frame.locator("#user").text_content() == "alice"
    # No loop: the sign-in page was shown once; then the code landed, the waiting page woke the workspace
    # (it was WARM) and the app came.
    statuses = [status for status, _url in documents]
    assert statuses.count(401) == 1, documents
    assert len(documents) <= 6, documents
    sessions = [c for c in await context.cookies() if c["name"] == "codehub_session"]
    preview_session = [c for c in sessions if c["domain"] == "3000-ws4.localhost"]
    assert [c.get("partitionKey") for c in preview_session] == [other_origin.review_origin.rsplit(":", 1)[0]]

    # Signed in for good inside this review site: a reload shows the app straight away.
    documents.clear()
    await page.reload()
    await frame.locator("#app").wait_for()
    assert documents == [(200, preview.split("?")[0])]
    await screenshot(page, "4-embed-signed-in-in-iframe")

    # Asleep, it is not woken by the review page that frames it (with the partitioned cookie, from another site),
    # but by a click in the frame.
    await stack.gateway.runtime.stop("ws4")
    documents.clear()
    await page.reload()
    await frame.locator("#wake").wait_for()
    assert documents == [(403, preview.split("?")[0])]
    state = stack.gateway.runtime.get("ws4")
    assert state is not None
    assert state.phase is Phase.WARM
    await frame.locator("#wake").click()
    await frame.locator("#app").wait_for()
    assert await frame.locator("#path").text_content() == "/review?mr=42"

    await _other_site_cannot_frame(stack, context.new_page, other_origin, preview)
    await _share_snippet_renders(stack, browser, other_origin)


async def _third_party_cookies_are_blocked(page: Page, other_origin: OtherOrigin) -> None:
    await page.goto(other_origin.url("review", "/frame?src=" + quote(other_origin.url("cookies", "/cookie/set"))))
    await page.frame_locator("#preview").locator("body").wait_for()
    await page.goto(other_origin.url("review", "/frame?src=" + quote(other_origin.url("cookies", "/cookie/read"))))
    cookies = await page.frame_locator("#preview").locator("#cookies").text_content()
    assert cookies == "control_chips=partitioned", f"third-party cookies must be blocked here, saw {cookies!r}"


async def _other_site_cannot_frame(stack: Stack, new_page: object, other_origin: OtherOrigin, preview: str) -> None:
    _link, token = await stack.gateway.auth.store.create_share(
        workspace="ws4", port=3000, audience="anyone", people=[], created_by="alice", ttl=3600)
    for name, src in (("private", preview), ("share-link", stack.share_url("ws4", 3000, f"/?codehub_share={token}"))):
        page: Page = await new_page()  # type: ignore[operator]
        async with page.expect_console_message(lambda m: "frame-ancestors" in m.text, timeout=10_000) as refused:
            await page.goto(other_origin.url("evil", f"/frame?src={quote(src, safe='')}"))
        message = await refused.value
        assert f"frame-ancestors 'self' {other_origin.review_origin}" in message.text, message.text
        inner = page.frame_locator("#preview")
        assert await inner.locator("#app").count() == 0
        assert await inner.locator("#sign-in").count() == 0
        await screenshot(page, f"4-embed-refused-on-other-site-{name}")
        await page.close()


async def _share_snippet_renders(stack: Stack, browser: Browser, other_origin: OtherOrigin) -> None:
    """The owner creates a share link through the API; its iframe snippet works for someone never signed in."""
    alice = Identity("alice", "alice@example.com", (), "alice")
    _record, api_token = await stack.gateway.auth.store.create_api_token(alice, name="e2e")
    async with aiohttp.ClientSession() as http, http.post(
        f"http://127.0.0.1:{stack.port}/api/v1/workspaces/ws4/shares",
        json={"port": 3000, "audience": "anyone", "ttl": "1h"},
        headers={"Host": f"localhost:{stack.port}", "Authorization": f"Bearer {api_token}"},
    ) as response:
        assert response.status == 201, await response.text()
        share = await response.json()
    snippet = share["embed"]["iframe"]
    assert snippet.startswith(f'<iframe src="{stack.share_url("ws4", 3000)}?codehub_share=')
    stranger = await (await browser.launch(third_party_cookies=False)).new_page()
    await stranger.goto(other_origin.url("review", f"/snippet?html={quote(snippet, safe='')}"))
    frame = stranger.frame_locator("iframe")
    await frame.locator("#app").wait_for()
    assert await frame.locator("#user").text_content() == ""  # anonymous, admitted by the share link
    assert "codehub_share" not in (await frame.locator("#path").text_content() or "")
    await screenshot(stranger, "4-embed-share-snippet")

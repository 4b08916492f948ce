"""Scenario 11: a visitor decides what an app learns about them, in Chromium.

Alice's app on port 8000 (an ``org`` port) is opted in to receive visitors' identity. Bob, an org member, opens
it: before the app sees anything he is sent to the consent page on the hub (never on the app's origin, where the
owner's scripts run), naming the app, its owner and exactly the claims it would receive. He continues and the
app greets him; he withdraws on the hub and the app forgets him; asked again, he continues without sharing and
the app sees nobody.
"""

from __future__ import annotations

from tests.browser.conftest import Browser, MakeStack, app_command, idp_sign_in, screenshot


async def test_consent_page_continue_withdraw_and_decline(browser: Browser, make_stack: MakeStack) -> None:
    stack = await make_stack({"ws7": {"owner": "alice", "command": app_command(8000), "ports": {8000: "org"}}},
                             policy={"org": {"email_domains": ["example.com"]}})
    await stack.gateway.runtime.update("ws7", identity_ports=frozenset({8000}))
    app = stack.share_url("ws7", 8000, "/hello?x=1")
    context = await browser.launch(third_party_cookies=False)
    page = await context.new_page()

    await page.goto(app)
    await idp_sign_in(page, stack.idp, "bob")
    await page.locator("#share").wait_for()
    assert page.url.startswith(stack.hub + "/consent?"), "on the hub, not on the app's origin"
    claims = await page.locator("#claims").inner_text()
    assert "bob" in claims
    assert "bob@example.com" in claims
    assert "dev" not in claims, "groups are not passed unless the policy lists them"
    heading = await page.locator("h1").inner_text()
    assert heading == "Share who you are with this app?"
    assert "alice" in await page.locator("main").inner_text()
    await screenshot(page, "11-consent-page")

    await page.locator("#share").click()
    await page.wait_for_url(app)
    await page.locator("#app").wait_for()
    assert await page.locator("#user").inner_text() == "bob"
    assert await page.locator("#path").inner_text() == "/hello?x=1"

    # Withdrawn on the hub: the app no longer learns who he is, and asks again.
    await page.goto(stack.hub + "/")
    await page.get_by_role("button", name="withdraw your answer for port 8000 of ws7").click()
    await page.wait_for_load_state()
    await page.get_by_text("No app has asked you yet.").wait_for()
    await page.goto(app)
    await page.locator("#decline").click()
    await page.wait_for_url(app)
    await page.locator("#app").wait_for()
    assert await page.locator("#user").inner_text() == ""
    await page.reload()
    await page.locator("#app").wait_for()
    assert await page.locator("#user").inner_text() == "", "a declined visitor is not asked again"
    await screenshot(page, "11-consent-declined")

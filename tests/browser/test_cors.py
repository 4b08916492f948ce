"""Scenario 5: a front end on port 5173 calls an API on port 8000 of the same workspace with credentials
(a JSON POST with a custom header, so the browser sends a preflight first). Both ports are private.

With ``cors: [{ports: [8000], allow_origins: [same-workspace]}]`` the gateway answers the preflight without
credentials and the call carries the user's session on the API host; without the rule the call is rejected.

Flow: the user signs in on each host once (visiting the front end, then the API host; the second sign-in is
only redirects, the hub session already exists). On ``*.localhost`` every preview host is its own *site*
(Chromium keys cookies by full host when the suffix is not a registrable domain), so the API host's cookie is a
third-party cookie inside the front end's page: this test uses a browser profile that allows third-party
cookies. Under a real preview domain (``5173-ws.preview.example.com`` and ``8000-ws.preview.example.com`` share
the site ``example.com``) the call is same-site and works with third-party cookies blocked too.
"""

from __future__ import annotations

from playwright.async_api import Page

from tests.browser.conftest import Browser, MakeStack, Stack, app_command, idp_sign_in, screenshot

CORS = {"cors": [{"ports": [8000], "allow_origins": ["same-workspace"]}]}


async def test_front_end_calls_api_on_other_port(browser: Browser, make_stack: MakeStack) -> None:
    stack = await make_stack(
        {"ws5": {"owner": "alice", "command": app_command(5173, 8000), "ports": {5173: "private", 8000: "private"}}},
        policy=CORS,
    )
    context = await browser.launch(third_party_cookies=True)
    page = await context.new_page()
    front = stack.share_url("ws5", 5173, "/front")

    # Sign in on the front end's host (through the IdP) ...
    await page.goto(front)
    await idp_sign_in(page, stack.idp, "alice")
    await page.wait_for_url(front)
    await page.locator("#app").wait_for()  # after the waiting page: the workspace was asleep
    # ... before the API host knows the user, the gateway's 401 is readable by the front end (CORS headers on
    # the refusal), so it can send the user to sign in there instead of failing blind.
    assert await page.evaluate("callApi()") == (
        'ok 401 {"error":{"code":"user-unauthenticated","message":"Sign in to see this page.","status":401}}')
    # ... then on the API host: only redirects now, the hub remembers the user.
    api = stack.share_url("ws5", 8000, "/api/whoami")
    await page.goto(api)
    await page.wait_for_url(api)
    assert '"user": "alice"' in (await page.locator("body").text_content() or "")

    await page.goto(front)
    await page.locator("#app").wait_for()
    assert await page.evaluate("callApi()") == 'ok 200 {"user":"alice","port":8000,"method":"POST"}'
    api_host = f"8000-ws5.localhost:{stack.port}"
    assert [r for r in stack.responses if r[0] == "OPTIONS"][-1] == ("OPTIONS", api_host, "/api/whoami", 204)
    await screenshot(page, "5-cors-with-policy")

    # Without the rule the same call is rejected by the browser; the preflight never reaches the private app.
    stack.set_policy({})
    stack.responses.clear()
    await page.reload()
    await page.locator("#app").wait_for()
    result = await page.evaluate("callApi('2')")
    assert result.startswith("rejected TypeError"), result
    assert [r for r in stack.responses if r[1] == api_host] == [("OPTIONS", api_host, "/api/whoami", 401)]
    await screenshot(page, "5-cors-without-policy")
    await _origin_outside_the_workspace_refused(stack, page)


async def _origin_outside_the_workspace_refused(stack: Stack, page: Page) -> None:
    """With the rule back, an origin outside the workspace (here the hub) gets a 403 preflight."""
    stack.set_policy(CORS)
    stack.responses.clear()
    await page.goto(stack.hub + "/healthz")
    result = await page.evaluate(
        """async (api) => { try { await fetch(api, {method: "POST", credentials: "include",
             headers: {"Content-Type": "application/json"}, body: "{}"}); return "ok"; }
           catch (error) { return "rejected " + error; } }""",
        stack.share_url("ws5", 8000, "/api/whoami"),
    )
    assert result.startswith("rejected TypeError"), result
    assert ("OPTIONS", f"8000-ws5.localhost:{stack.port}", "/api/whoami", 403) in stack.responses

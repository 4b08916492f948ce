"""Scenario 2: a COLD workspace (home archived through the runtime) → the waiting page shows live progress
(the active step moves on, pushed over SSE) → the app appears by itself, with the restored home's content.

The workspace's command boots a real HTTP server only after a delay, so "waiting for port" is visibly a step.
"""

from __future__ import annotations

import json

from gateway.lifecycle import Phase
from tests.browser.conftest import Browser, MakeStack, app_command, screenshot


async def test_cold_workspace_waiting_page_then_app(browser: Browser, make_stack: MakeStack) -> None:
    stack = await make_stack({"ws2": {"owner": "alice", "command": app_command(3000, delay=3.0),
                                      "ports": {3000: "public"}}})
    runtime = stack.gateway.runtime
    home = stack.home("ws2")
    home.mkdir(parents=True, exist_ok=True)
    (home / "message.txt").write_text("restored from the archive\n")
    state = await runtime.archive("ws2")
    assert state.phase is Phase.COLD
    assert not home.exists()

    context = await browser.launch(third_party_cookies=False)
    page = await context.new_page()
    await page.add_init_script(_RECORD_STEPS)
    navigations: list[str] = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url) if frame == page.main_frame else None)
    url = stack.share_url("ws2", 3000, "/dashboard?tab=2")
    response = await page.goto(url)
    assert response is not None
    assert response.status == 503
    assert response.headers.get("retry-after") == "2"
    assert await page.locator("h1#title").text_content() == "Waking up ws2"
    served = await response.text()
    assert 'class="active"' in served
    assert await page.locator("#steps li").evaluate_all("items => items.map(li => li.dataset.step)") == [
        "restoring", "starting", "waiting-for-port"]

    # Progress arrives over SSE while the page stays put: the active step moves to "waiting for port" and
    # the earlier steps are ticked off.
    await page.wait_for_selector('#steps li[data-step="waiting-for-port"].active', timeout=15_000)
    assert await page.locator("#steps li.done").evaluate_all("items => items.map(li => li.dataset.step)") == [
        "restoring", "starting"]
    assert int(await page.locator("#elapsed").text_content() or "0") >= 0
    await screenshot(page, "2-waiting-page-light")
    await page.emulate_media(color_scheme="dark")
    await screenshot(page, "2-waiting-page-dark")
    await page.emulate_media(color_scheme="light")

    # The app appears by itself: the page reloads on "ready", nobody presses anything.
    await page.locator("#app").wait_for(timeout=20_000)
    assert await page.locator("#app").text_content() == "App of ws2 on port 3000"
    assert await page.locator("#message").text_content() == "restored from the archive"
    assert await page.locator("#path").text_content() == "/dashboard?tab=2"
    assert navigations == [url, url], "one page load, then exactly one automatic reload"
    final = runtime.get("ws2")
    assert final is not None
    assert final.phase is Phase.RUNNING
    seen = json.loads(await page.evaluate("sessionStorage.getItem('steps') || '[]'"))
    assert len(seen) >= 2, f"the active step changed live: {seen}"
    assert seen[-1] == "waiting-for-port"
    assert seen == sorted(seen, key=["restoring", "starting", "waiting-for-port"].index), f"never backwards: {seen}"
    await screenshot(page, "2-cold-wake-app-appeared")


# Records every active step the waiting page shows, in sessionStorage (it survives the automatic reload).
_RECORD_STEPS = """
document.addEventListener("DOMContentLoaded", () => {
  const steps = document.getElementById("steps");
  if (!steps) return;
  const record = () => {
    const active = steps.querySelector("li.active");
    const seen = JSON.parse(sessionStorage.getItem("steps") || "[]");
    if (active && seen[seen.length - 1] !== active.dataset.step) {
      seen.push(active.dataset.step);
      sessionStorage.setItem("steps", JSON.stringify(seen));
    }
  };
  record();
  new MutationObserver(record).observe(steps, { subtree: true, attributes: true, attributeFilter: ["class"] });
});
"""

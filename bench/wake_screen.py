"""Wake to screen: a click on the preview of a sleeping (WARM) or archived (COLD) workspace, until the app is on
screen, in Chromium through the gateway, broken into the steps the waiting page shows.

The workspace ``screen`` runs Vite from its own home (the generated 800-module app in ``~/app``), so COLD
means that home is archived and restored first. The page records, in ``sessionStorage`` (which outlives the
waiting page's reload into the app), when each document started and when each progress event arrived; the app
adds its first paint. All times are milliseconds after the click.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from playwright.async_api import Browser

from bench.chromium import chromium, fresh_context
from bench.servers import Layout, SignIn
from bench.viteapp import generate

RECORDER = """
(() => {
  if (location.protocol !== "http:") return;  // the blank page the click starts from
  const log = (entry) => {
    const all = JSON.parse(sessionStorage.getItem("wake") || "[]");
    all.push({ ...entry, at: Date.now() });
    sessionStorage.setItem("wake", JSON.stringify(all));
  };
  document.addEventListener("DOMContentLoaded", () => log({ kind: "document", title: document.title }));
  const Original = window.EventSource;
  window.EventSource = class extends Original {
    constructor(...args) {
      super(...args);
      this.addEventListener("progress", (e) => log({ kind: "progress", step: JSON.parse(e.data).step }));
      this.addEventListener("ready", () => log({ kind: "ready" }));
    }
  };
})();
"""
PHASES = ("WARM", "COLD")


def _timeline(entries: list[dict[str, Any]], clicked: float, painted_at: float) -> dict[str, float]:
    """Milliseconds after the click: the waiting page shown (its DOM ready), each step's first progress event,
    the ready event, the app's document (DOM ready) and its first paint."""
    out: dict[str, float] = {}
    documents = [entry["at"] for entry in entries if entry["kind"] == "document"]
    if documents:
        out["waiting page"] = documents[0] - clicked
    for entry in entries:
        if entry["kind"] == "progress":
            out.setdefault(f"step {entry['step']}", entry["at"] - clicked)
        elif entry["kind"] == "ready":
            out.setdefault("ready event", entry["at"] - clicked)
    if len(documents) > 1:
        out["app document"] = documents[-1] - clicked
    out["app painted"] = painted_at - clicked
    return out


async def _one(browser: Browser, sign_in: SignIn, url: str, cookie: str, expected: str) -> dict[str, float]:
    context = await fresh_context(browser, url, cookie)
    try:
        await context.add_init_script(RECORDER)
        page = await context.new_page()
        await page.set_content(f'<a id="open" href="{url}">open the preview</a>')
        clicked = time.time() * 1000
        await page.click("#open")
        await page.wait_for_function("window.__painted !== undefined", timeout=300_000)
        if await page.text_content("#app") != expected:
            raise RuntimeError(f"the woken app shows {await page.text_content('#app')!r}")
        painted_at = float(await page.evaluate("performance.timeOrigin + window.__painted"))
        entries = await page.evaluate("JSON.parse(sessionStorage.getItem('wake') || '[]')")
        return _timeline(entries, clicked, painted_at)
    finally:
        await context.close()


async def wakes_to_screen(layout: Layout, sign_in: SignIn, gateway_name: str, rounds: int,
                          say: Any = print) -> dict[str, Any]:
    home = layout.tmp / f"{gateway_name}-state" / "workspaces" / "screen" / "home"
    app = generate(home / "app") if not (home / "app").exists() else None
    expected = app.expected if app is not None else generate(layout.tmp / "expected-app").expected
    host = layout.preview(sign_in.port, layout.screen_port, "screen")
    cookie = await sign_in.preview(host)
    url = f"http://{host}/"
    timelines: dict[str, list[dict[str, float]]] = {phase: [] for phase in PHASES}
    async with chromium() as browser:
        await sign_in.lifecycle("screen", "wake")  # once, uncounted: Vite's first start in this home
        await _one(browser, sign_in, url, cookie, expected)
        for round_ in range(rounds):
            for phase in PHASES:
                await sign_in.lifecycle("screen", "stop" if phase == "WARM" else "archive")
                timeline = await _one(browser, sign_in, url, cookie, expected)
                timelines[phase].append(timeline)
                say(f"screen {gateway_name} {phase} round {round_ + 1}: "
                    + ", ".join(f"{key} {value:.0f}" for key, value in timeline.items()) + " ms")
    await sign_in.lifecycle("screen", "stop")
    medians: dict[str, dict[str, float]] = {}
    for phase, runs in timelines.items():
        keys = [key for key in runs[0]] if runs else []
        medians[phase] = {key: statistics.median(run[key] for run in runs if key in run) for key in keys}
    return {"target": gateway_name, "rounds": rounds, "runs": timelines, "medians": medians}

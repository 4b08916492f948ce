"""Page load and HMR as a developer feels them: a generated Vite app (``viteapp``: 800 ES modules, 13 levels of
imports) in Chromium, straight from the dev server and through each proxy.

Per round and proxy (the proxies' order rotates every round, after one warm-up round that is not counted):
- **cold**: a new browser context (empty cache) opens the app; the time is the page's own ``performance.now()``
  two animation frames after the root module ran: navigation, 800 module requests, painted;
- **reload**: the same page reloaded: every module revalidated (Vite answers ``no-cache`` with an ETag: 304s);
- **HMR**: a self-accepting module is rewritten on disk; the time from just before the write to the page running
  the new version (``Date.now()`` in both: one clock), through the proxied HMR WebSocket and module fetch.

The gateway is measured on its real path: a private port, the preview host's session cookie from a dev sign-in.
``relay`` (``bench.relay``) is the floor for any proxy: bytes copied between two sockets, nothing decided.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from playwright.async_api import Browser, ConsoleMessage

from bench.chromium import chromium, fresh_context
from bench.client import fetch
from bench.procs import Procs, free_port, wait_for_port
from bench.servers import ROOT, Layout, SignIn, start_chp_for, start_vite, start_vite_nginx
from bench.viteapp import App, generate


@dataclass
class PageTarget:
    name: str
    url: str
    cookie: str = ""


@dataclass
class PageResult:
    target: str
    cold_ms: list[float] = field(default_factory=list)
    reload_ms: list[float] = field(default_factory=list)
    hmr_ms: list[float] = field(default_factory=list)

    def medians(self) -> dict[str, float | None]:
        return {key: statistics.median(values) if values else None
                for key, values in (("cold_ms", self.cold_ms), ("reload_ms", self.reload_ms),
                                    ("hmr_ms", self.hmr_ms))}


async def _targets(procs: Procs, layout: Layout, sign_ins: dict[str, SignIn], wanted: set[str]) -> list[PageTarget]:
    targets = [PageTarget("direct", f"http://{layout.vite_host}:{layout.vite_port}/")]
    for name, sign_in in sign_ins.items():
        host = layout.preview(sign_in.port, layout.vite_port, "vite")
        cookie = await sign_in.preview(host)
        woken = await fetch(sign_in.address, host, "/", {"Cookie": cookie, "Accept": "*/*"})  # held until awake
        if woken.status != 200:
            raise RuntimeError(f"{name} did not serve the Vite app: {woken.status} {woken.body[:200]!r}")
        targets.append(PageTarget(name, f"http://{host}/", cookie))
    if "nginx" in wanted:
        port = free_port("127.0.0.1")
        proc = start_vite_nginx(procs, layout, port)
        await wait_for_port("127.0.0.1", port, proc)
        targets.append(PageTarget("nginx", f"http://localhost:{port}/"))
    if "chp" in wanted:
        port, api_port = free_port("127.0.0.1"), free_port("127.0.0.1")
        await start_chp_for(procs, "chp-vite", port, api_port, f"http://{layout.vite_host}:{layout.vite_port}")
        targets.append(PageTarget("chp", f"http://localhost:{port}/"))
    if "relay" in wanted:
        port = free_port("127.0.0.1")
        proc = procs.start("relay", [sys.executable, "-m", "bench.relay", str(port), layout.vite_host,
                                     str(layout.vite_port)], env={"PYTHONPATH": str(ROOT)})
        await wait_for_port("127.0.0.1", port, proc)
        targets.append(PageTarget("relay", f"http://localhost:{port}/"))
    return targets


async def _painted(page: Any) -> float:
    await page.wait_for_function("window.__painted !== undefined")
    return float(await page.evaluate("window.__painted"))


async def _one(browser: Browser, app: App, target: PageTarget, tag: str) -> tuple[float, float, float]:
    """Cold load, reload and one HMR round trip through ``target``, in ms."""
    context = await fresh_context(browser, target.url, target.cookie)
    try:
        page = await context.new_page()
        connected = 0
        hello = asyncio.Event()

        def console(message: ConsoleMessage) -> None:
            nonlocal connected
            if "[vite] connected" in message.text:
                connected += 1
                hello.set()

        page.on("console", console)
        await page.goto(target.url, wait_until="commit")
        cold = await _painted(page)
        text = await page.text_content("#app")
        if text != app.expected:
            raise RuntimeError(f"{target.name}: the app shows {text!r}, not {app.expected!r}")
        await page.reload(wait_until="commit")
        reload = await _painted(page)
        while connected < 2:  # the reloaded page's HMR socket is open
            hello.clear()
            await asyncio.wait_for(hello.wait(), 60)
        wanted = f"hmr {tag}"
        before = time.time() * 1000
        app.write_hmr(wanted)
        await page.wait_for_function(f"window.__hmr && window.__hmr.text === {json.dumps(wanted)}")
        applied = float(await page.evaluate("window.__hmr.at"))
        return cold, reload, applied - before
    finally:
        await context.close()


async def page_loads(procs: Procs, layout: Layout, sign_ins: dict[str, SignIn], wanted: set[str], rounds: int,
                     say: Any = print) -> dict[str, Any]:
    app = generate(layout.tmp / "vite-app")
    vite = start_vite(procs, "vite", app.root, layout.vite_host, layout.vite_port)
    await wait_for_port(layout.vite_host, layout.vite_port, vite, within=60)
    targets = await _targets(procs, layout, sign_ins, wanted)
    results = {target.name: PageResult(target.name) for target in targets}
    async with chromium() as browser:
        for round_ in range(rounds + 1):  # round 0 warms Vite's transform cache and every proxy's connections
            shift = round_ % len(targets)
            for target in targets[shift:] + targets[:shift]:
                cold, reload, hmr = await _one(browser, app, target, f"{round_}-{target.name}")
                if round_ == 0:
                    continue
                result = results[target.name]
                result.cold_ms.append(cold)
                result.reload_ms.append(reload)
                result.hmr_ms.append(hmr)
                say(f"page {target.name:10} round {round_}: cold {cold:7.1f} ms reload {reload:7.1f} ms "
                    f"HMR {hmr:6.1f} ms")
    return {"modules": app.modules, "depth": app.depth, "rounds": rounds,
            "targets": {name: {**vars(result), **result.medians()} for name, result in results.items()}}

"""Scenario 3: a real Vite dev server in a workspace, opened through a share link; editing a source file updates
the page through HMR over the gateway's WebSocket relay, without a reload."""

from __future__ import annotations

import asyncio
from pathlib import Path

from playwright.async_api import WebSocket

from tests.browser.conftest import VITE, Browser, MakeStack, require_peer, screenshot

INDEX = """<!doctype html>
<html><head><meta charset="utf-8"><title>vite app</title></head>
<body style="font: 20px sans-serif; padding: 1rem; background: #f3efff">
<h1 id="msg">loading</h1>
<p>Served by Vite through the code-hub gateway.</p>
<script type="module" src="/main.js"></script>
</body></html>
"""
MAIN = """import { message } from "./message.js";
const show = (text) => { document.getElementById("msg").textContent = text; };
show(message);
if (import.meta.hot) {
  import.meta.hot.accept("./message.js", (module) => show(module.message));
}
"""


async def test_vite_hmr_through_share_url(browser: Browser, make_stack: MakeStack, tmp_path: Path) -> None:
    require_peer(VITE, "run `npm ci`")
    project = tmp_path / "vite-app"
    project.mkdir()
    (project / "index.html").write_text(INDEX)
    (project / "main.js").write_text(MAIN)
    (project / "message.js").write_text('export const message = "Hello from Vite, version 1";\n')
    command = [str(VITE), str(project), "--host", "{host}", "--port", "5173", "--strictPort", "--clearScreen", "false"]
    stack = await make_stack({"ws3": {"owner": "alice", "command": command, "ports": {5173: "private"}}})
    _link, token = await stack.gateway.auth.store.create_share(
        workspace="ws3", port=5173, audience="anyone", people=[], created_by="alice", ttl=3600)

    context = await browser.launch(third_party_cookies=False)
    page = await context.new_page()
    sockets: list[WebSocket] = []
    received: list[str] = []
    connected = asyncio.Event()

    def on_frame(payload: str | bytes) -> None:
        received.append(str(payload))
        if '"type":"connected"' in str(payload):
            connected.set()

    def on_socket(socket: WebSocket) -> None:
        sockets.append(socket)
        socket.on("framereceived", on_frame)

    page.on("websocket", on_socket)
    await page.goto(stack.share_url("ws3", 5173, f"/?codehub_share={token}"))
    await page.wait_for_url(stack.share_url("ws3", 5173, "/"))  # the token is gone from the URL
    await page.wait_for_function("document.getElementById('msg')?.textContent === 'Hello from Vite, version 1'",
                                 timeout=30_000)
    await asyncio.wait_for(connected.wait(), 15)  # vite's client said hello over the relayed WebSocket
    hmr = [s for s in sockets if s.url.startswith("ws://5173-ws3.localhost:")]
    assert hmr, [s.url for s in sockets]
    await page.evaluate("window.__marker = 'same page'")
    loads: list[str] = []
    page.on("load", lambda _: loads.append(page.url))

    (project / "message.js").write_text('export const message = "Hello from Vite, version 2 (hot)";\n')
    await page.wait_for_function(
        "document.getElementById('msg').textContent === 'Hello from Vite, version 2 (hot)'", timeout=15_000)
    assert await page.evaluate("window.__marker") == "same page", "updated in place, not reloaded"
    assert loads == []
    assert any('"type":"update"' in frame for frame in received), received
    assert not hmr[0].is_closed()
    await screenshot(page, "3-vite-hmr-updated")

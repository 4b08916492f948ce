"""Scenario 6: the real code-server workbench loads on the IDE's own origin (``ide-{workspace}.{preview}``, reached
here from an old ``{hub}/w/{workspace}/`` bookmark) for its signed-in owner, and its WebSockets (the remote
extension host / file system channel) connect through the gateway, pass its origin check, and carry frames."""

from __future__ import annotations

import asyncio

import pytest
from playwright.async_api import WebSocket

from tests.browser.conftest import CODE_SERVER, Browser, MakeStack, idp_sign_in, require_peer, screenshot

COMMAND = [str(CODE_SERVER), "--auth", "none", "--bind-addr", "{host}:{ide_port}", "--disable-telemetry",
           "--disable-update-check", "--disable-workspace-trust", "--disable-getting-started-override",
           "--user-data-dir", "{home}/.cs", "{home}"]


@pytest.mark.slow
async def test_code_server_workbench_on_the_ide_origin(browser: Browser, make_stack: MakeStack) -> None:
    require_peer(CODE_SERVER, "run .ci/install-code-server.sh")
    stack = await make_stack({"ws6": {"owner": "alice", "command": COMMAND}})
    (stack.home("ws6")).mkdir(parents=True, exist_ok=True)
    (stack.home("ws6") / "README.md").write_text("# hello from ws6\n")
    context = await browser.launch(third_party_cookies=False)
    page = await context.new_page()
    sockets: list[WebSocket] = []
    talking = asyncio.Event()

    def on_socket(socket: WebSocket) -> None:
        sockets.append(socket)
        socket.on("framereceived", lambda _payload: talking.set())

    page.on("websocket", on_socket)
    ide = stack.ide_url("ws6")
    await page.goto(f"{stack.hub}/w/ws6/")
    await idp_sign_in(page, stack.idp, "alice")  # the IDE is only for its owner: sign in on the hub first
    await page.wait_for_url(f"{ide}**")
    await page.locator(".monaco-workbench").wait_for(timeout=90_000)  # after the waiting page
    await asyncio.wait_for(talking.wait(), 60)
    workbench_sockets = [s for s in sockets if s.url.startswith(ide.replace("http:", "ws:"))]
    assert workbench_sockets, [s.url for s in sockets]
    assert any(not s.is_closed() for s in workbench_sockets)
    # The file explorer lists the workspace's home, read over the remote connection.
    await page.get_by_role("treeitem", name="README.md").wait_for(timeout=60_000)
    assert page.url.startswith(ide)
    await screenshot(page, "6-code-server-workbench")

"""Scenario 6b: a developer starts a dev server in code-server's terminal and opens it from the IDE, through the
gateway. code-server runs as a local workspace behind the gateway on the IDE's origin; the runtime gave it
``VSCODE_PROXY_URI`` (so its forwarded-port links are the workspace's share URLs) and port detection from terminal
output (``tests/lifecycle/test_code_server_settings.py`` says why).

code-server announces only servers whose printed URL names localhost or a wildcard address, and the gateway reaches
a local workspace's ports on its own address: so the announced server binds the wildcard (briefly listening on every
interface; it serves one static page), and one bound to the workspace's own address (``$HOST``) is opened from the
Ports view after "Add Port". Both open a new tab on ``{port}-{workspace}.codehub.test`` that the gateway serves only
to the signed-in owner.
"""

from __future__ import annotations

import contextlib
import random
import re
import socket
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import BrowserContext, Locator, Page, expect
from playwright.async_api import TimeoutError as PlaywrightTimeoutError

from tests.browser.conftest import CODE_SERVER, SITE, Browser, MakeStack, Stack, idp_sign_in, require_peer, screenshot
from tests.browser.test_code_server import COMMAND

pytestmark = pytest.mark.timeout(480)  # two IDE round trips on a loaded 2-core machine
WORKBENCH_MS = 120_000
"""The workbench, its remote extension host and the terminal start slowly when other tests load the machine."""
OWN_PORT = 4321
"""On the workspace's own address, which no other test uses: any port will do."""


def free_wildcard_port() -> int:
    """A port below 10000 free on every address: code-server holds back a port at or above 10000 (unless a
    multiple of 1000) for a "better" one and then never announces it; dev servers' usual ports are lower."""
    for port in random.sample(range(8100, 9900), 200):
        with socket.socket() as probe, contextlib.suppress(OSError):
            probe.bind(("0.0.0.0", port))
            return port
    raise AssertionError("no free port between 8100 and 9900")


def write_site(home: Path, folder: str, heading: str) -> None:
    (home / folder).mkdir(parents=True, exist_ok=True)
    (home / folder / "index.html").write_text(f"<!doctype html><title>{heading}</title><h1>{heading}</h1>\n")


def terminal(page: Page) -> Locator:
    """The active terminal (its sticky-scroll header is an ``.xterm`` too, after it)."""
    return page.locator(".terminal-wrapper.active .xterm").first


async def run_in_terminal(page: Page, command: str, *, interrupt: bool = False) -> None:
    """Type ``command`` into the IDE's terminal as a person would (opening the panel if needed); ``interrupt``
    stops what runs there first (Control+C)."""
    if not await terminal(page).count():
        await page.keyboard.press("Control+Backquote")
    await terminal(page).wait_for(timeout=WORKBENCH_MS)
    await terminal(page).click()
    if interrupt:
        await page.keyboard.press("Control+C")
    await page.keyboard.type(command)
    await page.keyboard.press("Enter")


async def ide_ready(page: Page) -> None:
    """Wait for the IDE's workbench and its Ports status item, which shows once the remote extension host is up
    (earlier, port actions do nothing)."""
    await page.locator(".monaco-workbench").wait_for(timeout=WORKBENCH_MS)
    await page.locator("[id='status.forwardedPorts']").wait_for(timeout=WORKBENCH_MS)


async def announced_server(context: BrowserContext, stack: Stack, page: Page) -> tuple[Page, int, Locator]:
    """Start a server that prints a wildcard URL in the IDE's terminal; returns the IDE window, the server's port
    and code-server's notification of it.

    code-server reads printed URLs only once its remote extension host has set up port forwarding, which on a
    loaded machine can come well after the Ports status item, and it never looks back at what was printed
    earlier; once, in CI, the window also lost its extension host for good. So a miss is answered as a person
    would: start the server again (on another port), and the third time in a window opened again. Each miss prints
    what the workspace's log and the gateway's answers say; the last one fails with that."""
    attempts = 4
    for attempt in range(1, attempts + 1):
        port = free_wildcard_port()
        await run_in_terminal(page, f"python3 -m http.server {port} --bind 0.0.0.0 --directory announced",
                              interrupt=attempt > 1)
        toast = page.locator(".notification-toast", has_text=re.compile(rf"\bport {port}\b"))
        try:
            await toast.wait_for(timeout=30_000)
        except PlaywrightTimeoutError:
            diagnosis = await stack.diagnosis("ws14")
            if attempt == attempts:
                raise AssertionError(f"code-server never announced a server ({attempts} tries)\n{diagnosis}") from None
            print(f"try {attempt}: code-server did not announce port {port}\n{diagnosis}")
            if attempt == 2:
                await page.close(run_before_unload=False)
                page = await context.new_page()
                await page.goto(stack.ide_url("ws14"))
                await ide_ready(page)
        else:
            return page, port, toast
    raise AssertionError("unreachable")


async def opened_preview(context: BrowserContext, click: Locator, stack: Stack, port: int, heading: str) -> Page:
    """Click ``click``; the new tab must end on the port's share URL showing the dev server's page."""
    async with context.expect_page(timeout=60_000) as new_tab:
        await click.click()
    preview = await new_tab.value
    await expect(preview.locator("h1")).to_have_text(heading, timeout=60_000)  # after the hand-off via the hub
    assert preview.url == stack.share_url("ws14", port)
    return preview


async def refused_to_strangers(stack: Stack, port: int) -> int:
    """The status a visitor without the owner's session gets for the same URL (sent to loopback, named by Host)."""
    headers = {"Host": f"{port}-ws14.{SITE}:{stack.port}", "Accept": "application/json"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client, client.get(
        f"http://127.0.0.1:{stack.port}/", headers=headers, allow_redirects=False,
    ) as response:
        return response.status


@pytest.mark.slow
async def test_dev_server_from_the_ide_terminal_opens_through_the_gateway(
    browser: Browser, make_stack: MakeStack
) -> None:
    require_peer(CODE_SERVER, "run .ci/install-code-server.sh")
    stack = await make_stack({"ws14": {"owner": "alice", "command": COMMAND}}, domain=SITE)
    home = stack.home("ws14")
    write_site(home, "announced", "Announced by code-server")
    write_site(home, "forwarded", "Forwarded from the Ports view")
    context = await browser.launch(third_party_cookies=False)
    page = await context.new_page()
    ide = stack.ide_url("ws14")
    await page.goto(ide)
    await idp_sign_in(page, stack.idp, "alice")
    await page.wait_for_url(f"{ide}**")
    await ide_ready(page)

    # 1. A server that prints a wildcard URL: code-server announces it; "Open in Browser" opens its share URL.
    page, port, toast = await announced_server(context, stack, page)
    preview = await opened_preview(context, toast.get_by_role("button", name="Open in Browser"), stack, port,
                                   "Announced by code-server")
    await screenshot(preview, "6b-announced-port-preview")
    await preview.close()
    assert await refused_to_strangers(stack, port) == 401

    # 2. A server on the workspace's own address, stopped and started in the same terminal: forwarded by hand.
    await run_in_terminal(page, f'python3 -m http.server {OWN_PORT} --bind "$HOST" --directory forwarded',
                          interrupt=True)
    await page.locator("[id='status.forwardedPorts']").click()
    await page.get_by_role("button", name="Add Port").click()  # "Forward a Port" while the list is empty
    await page.keyboard.type(str(OWN_PORT))
    await page.keyboard.press("Enter")
    row = page.get_by_role("listitem", name=re.compile(rf"^Remote port \S+:{OWN_PORT} forwarded to"))
    await expect(row).to_contain_text(stack.share_url("ws14", OWN_PORT))  # VSCODE_PROXY_URI, filled in
    await row.hover()
    await opened_preview(context, row.get_by_role("button", name="Open in Browser"), stack, OWN_PORT,
                         "Forwarded from the Ports view")
    await screenshot(page, "6b-ide-ports-view")
    assert await refused_to_strangers(stack, OWN_PORT) == 401

"""The hub page in Chromium as a newcomer uses it: the live ports panel (a dev server appears without a reload, with
its devcontainer.json label), workspace controls, sharing (copy, per-port links, undoable revoke), visibility
changes that need an explicit Save, the API tokens page, and an axe-core accessibility check in light and dark.

The gateway signs in with development sign-in (these tests are about the hub, tests/browser/test_sign_in.py is
about OIDC) and listens on a real loopback port, so Chromium reaches hub and previews natively.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from playwright.async_api import BrowserContext, Page, expect

from gateway.config import Config
from gateway.server.app import build_app
from gateway.server.context import GATEWAY, Gateway
from gateway.web import hub as hub_module
from tests.browser.conftest import REPO, Browser, app_command, next_address, require_peer, screenshot
from tests.peers.idp.fixture import free_loopback_port
from tests.test_cli import urls_in

pytestmark = pytest.mark.timeout(120)
AXE = REPO / "node_modules" / "axe-core" / "axe.min.js"
POLICY = {"share_links": {"max_ttl": "1d"}}


class Hub:
    def __init__(self, port: int, app: web.Application) -> None:
        self.port = port
        self.app = app

    @property
    def gateway(self) -> Gateway:
        return self.app[GATEWAY]

    @property
    def url(self) -> str:
        return f"http://localhost:{self.port}"

    def address(self, workspace: str) -> str:
        address = self.gateway.config.local.workspaces[workspace].address
        assert address is not None
        return address

    def home(self, workspace: str) -> Path:
        return self.gateway.config.state_dir.resolve() / "workspaces" / workspace / "home"


MakeHub = Callable[[Mapping[str, Mapping[str, Any]]], Awaitable[Hub]]


@pytest.fixture
async def make_hub(tmp_path: Path) -> AsyncIterator[MakeHub]:
    runners: list[web.AppRunner] = []

    async def make(workspaces: Mapping[str, Mapping[str, Any]]) -> Hub:
        port = free_loopback_port()
        root = tmp_path / f"hub-{port}"
        root.mkdir()
        (root / "policy.yaml").write_text(yaml.safe_dump(POLICY))
        config = Config.model_validate({
            "listen": {"host": "127.0.0.1", "port": port}, "policy_file": str(root / "policy.yaml"),
            "local": {"state_dir": str(root / "state"),
                      "workspaces": {name: {"address": next_address(), **ws} for name, ws in workspaces.items()}},
        })
        app = build_app(config)
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=2.0)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return Hub(port, app)

    yield make
    for runner in reversed(runners):
        await runner.cleanup()


async def signed_in(browser: Browser, hub: Hub, user: str, *, dark: bool = False) -> tuple[BrowserContext, Page]:
    context = await browser.launch(third_party_cookies=True)
    await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=hub.url)
    page = await context.new_page()
    if dark:
        await page.emulate_media(color_scheme="dark")
    await page.goto(f"{hub.url}/auth/dev?next=/")
    await page.locator("#user").fill(user)
    async with page.expect_navigation():
        await page.locator("button[type=submit]").click()
    await page.locator("section.ws").first.wait_for()
    await page.evaluate("window.__sameDocument = true")  # gone if anything reloads the page
    return context, page


async def clipboard(page: Page) -> str:
    text: str = await page.evaluate("navigator.clipboard.readText()")
    return text


def port_row(page: Page, workspace: str, port: int) -> Any:
    return page.locator(f'section[data-ws="{workspace}"] table.ports tr[data-port="{port}"]')


@contextlib.contextmanager
def listening(address: str, port: int) -> Any:
    """A dev server's listening socket on the workspace's own address (all the panel looks at)."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((address, port))
    server.listen()
    try:
        yield server
    finally:
        server.close()


async def test_ports_panel_follows_dev_servers_live(browser: Browser, make_hub: MakeHub) -> None:
    hub = await make_hub({"ws1": {"owner": "alice", "command": ["sleep", "3600"], "ports": {3000: "private"}}})
    devcontainer = hub.home("ws1") / ".devcontainer"
    devcontainer.mkdir(parents=True)
    (devcontainer / "devcontainer.json").write_text(
        '// as Codespaces reads it\n{"portsAttributes": {"4000": {"label": "Web app"},}}')
    _, page = await signed_in(browser, hub, "alice")
    section = page.locator('section[data-ws="ws1"]')
    await expect(section.locator(".phase")).to_have_text("Sleeping (wakes in seconds)")
    await expect(port_row(page, "ws1", 4000)).to_have_count(0)

    await section.get_by_role("button", name="Start workspace ws1").click()
    await expect(section.locator(".phase")).to_have_text("Running")
    with listening(hub.address("ws1"), 4000):
        row = port_row(page, "ws1", 4000)
        await expect(row.get_by_label("Label of port 4000")).to_have_value("Web app")
        await expect(row).to_contain_text("listening")
        await expect(row.locator("a.url")).to_have_attribute("href", f"http://4000-ws1.localhost:{hub.port}/")
        await screenshot(page, "hub-ports-live")
    await expect(port_row(page, "ws1", 4000)).to_have_count(0)  # stopped, and never configured: gone again
    await expect(port_row(page, "ws1", 3000)).to_contain_text("not listening")  # configured: stays

    await port_row(page, "ws1", 3000).get_by_role("button", name="Copy the URL of port 3000").click()
    await expect(page.locator("#toast")).to_have_text("Copied URL of port 3000")
    assert await clipboard(page) == f"http://3000-ws1.localhost:{hub.port}/"
    await port_row(page, "ws1", 3000).get_by_role("button", name="Show a QR code for port 3000").click()
    qr = port_row(page, "ws1", 3000).locator(".qr img")
    await expect(qr).to_be_visible()
    assert await qr.evaluate("img => img.decode().then(() => img.naturalWidth)") > 0

    await section.get_by_role("button", name="Stop workspace ws1").click()
    await expect(section.locator(".phase")).to_have_text("Sleeping (wakes in seconds)")
    await expect(section.get_by_role("button", name="Archive workspace ws1")).to_be_visible()
    assert await page.evaluate("window.__sameDocument") is True


async def test_many_workspaces_come_in_pages_that_stay_live(browser: Browser, make_hub: MakeHub,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Next and First page links walk the workspaces in id order; the second page follows its own workspaces
    live (a link made elsewhere appears there) and the first page does not list them."""
    monkeypatch.setattr(hub_module, "HUB_PAGE", 2)
    hub = await make_hub({name: {"owner": "alice", "command": ["sleep", "3600"], "ports": {3000: "private"}}
                          for name in ("a1", "b2", "c3")})
    _, page = await signed_in(browser, hub, "alice")
    await expect(page.locator("section.ws")).to_have_count(2)
    assert await page.locator("section.ws").evaluate_all("all => all.map(s => s.dataset.ws)") == ["a1", "b2"]
    await page.get_by_role("link", name="Next page").click()
    await expect(page.locator("section.ws")).to_have_count(1)
    await expect(page.locator('section[data-ws="c3"]')).to_be_visible()
    await expect(page.get_by_role("link", name="Next page")).to_be_hidden()

    await page.evaluate("window.__sameDocument = true")
    link, _ = await hub.gateway.auth.store.create_share(workspace="c3", port=3000, audience="anyone", people=[],
                                                      created_by="alice", ttl=3600)
    await expect(page.locator(f'section[data-ws="c3"] [data-share="{link.id}"]')).to_have_count(1)
    assert await page.evaluate("window.__sameDocument") is True  # the page's feed, not a reload

    await page.get_by_role("link", name="First page").click()
    await expect(page.locator("section.ws")).to_have_count(2)
    await expect(page.locator('section[data-ws="c3"]')).to_have_count(0)


async def test_sharing_from_the_hub(browser: Browser, make_hub: MakeHub) -> None:
    hub = await make_hub({"ws1": {"owner": "alice", "command": app_command(3000, 3001),
                                  "ports": {3000: "private", 3001: "private"}}})
    context, page = await signed_in(browser, hub, "alice")
    section = page.locator('section[data-ws="ws1"]')
    box = section.locator(".linkbox")
    await expect(box).to_be_hidden()  # no link yet, no Copy button

    # Names typed for "named people" are not kept when the audience goes back to "anyone".
    await section.get_by_label("Who can open it", exact=True).select_option("people")
    await section.get_by_label("People (user, e-mail, group:NAME)", exact=True).fill("bob")
    await section.get_by_label("Who can open it", exact=True).select_option("anyone")
    await expect(section.get_by_label("People (user, e-mail, group:NAME)", exact=True)).to_be_hidden()
    await section.get_by_label("Port to share", exact=True).select_option("3000")
    await section.get_by_role("button", name="Create link").click()
    await expect(box).to_be_visible()
    link_url = await box.locator("input").input_value()
    assert link_url.startswith(f"http://3000-ws1.localhost:{hub.port}/?codehub_share=chs_")
    [link] = hub.gateway.auth.store.shares.values()
    assert (link.audience, link.people, link.port) == ("anyone", [], 3000)
    rows = section.locator("table.shares tbody tr")
    await expect(rows.first).to_contain_text(f"{link.id} · port 3000")  # listed without a reload
    await expect(rows.first).to_contain_text("in 1 d")
    await box.get_by_role("button", name="Copy link").click()
    assert await clipboard(page) == link_url

    # A failed create leaves no old link behind in the box.
    await section.get_by_label("Expires after", exact=True).select_option("7d")
    await section.get_by_role("button", name="Create link").click()
    await expect(page.locator("#toast")).to_have_text("ttl: the policy allows at most 1 day.")
    await expect(box).to_be_hidden()
    assert await box.locator("input").input_value() == ""

    # An all-ports link offers one working URL per port, never a {port} template.
    await section.get_by_label("Expires after", exact=True).select_option("1h")
    await section.get_by_label("Port to share", exact=True).select_option("")
    await section.get_by_role("button", name="Create link").click()
    await expect(box).to_be_visible()
    assert "{port}" not in await box.locator("input").input_value()
    await box.get_by_label("Port of the new link").select_option(label="port 3001")
    url = await box.locator("input").input_value()
    assert url.startswith(f"http://3001-ws1.localhost:{hub.port}/?codehub_share=chs_")
    stranger = await browser.launch(third_party_cookies=True)
    preview = await stranger.new_page()
    await preview.goto(url)
    await expect(preview.locator("#app")).to_have_text("App of ws1 on port 3001")
    await expect(rows).to_have_count(2)

    # Revoke can be undone for a few seconds; then it happens.
    revoke = section.get_by_role("button", name=f"Revoke link {link.id} (port 3000, anyone with the link)")
    await revoke.click()
    await section.get_by_role("button", name=f"Undo revoking link {link.id}").click()
    await expect(revoke).to_be_visible()
    await page.wait_for_timeout(5500)
    assert link.revoked is None
    await revoke.click()
    await expect(section.locator(f'tr[data-share="{link.id}"]')).to_contain_text("revoked", timeout=10_000)
    assert hub.gateway.auth.store.shares[link.id].revoked is not None
    await screenshot(page, "hub-sharing")
    assert await page.evaluate("window.__sameDocument") is True
    await context.close()


async def test_visibility_changes_only_on_save_and_public_asks_once(browser: Browser, make_hub: MakeHub) -> None:
    hub = await make_hub({"ws1": {"owner": "alice", "command": ["sleep", "3600"], "ports": {3000: "private"}}})
    _, page = await signed_in(browser, hub, "alice")
    select = page.get_by_label("Who can see port 3000", exact=True)
    save = page.get_by_role("button", name="Save changes to port 3000")
    await select.focus()
    await page.keyboard.press("ArrowDown")
    await page.keyboard.press("ArrowDown")
    await expect(select).to_have_value("public")
    await page.wait_for_timeout(300)
    state = hub.gateway.runtime.get("ws1")
    assert state is not None
    assert state.spec.ports[3000] == "private", "arrow keys alone must not save"
    dialogs: list[str] = []

    async def answer(dialog: Any) -> None:
        dialogs.append(dialog.message)
        await (dialog.dismiss() if len(dialogs) == 1 else dialog.accept())

    page.on("dialog", answer)
    await save.click()
    await expect(save).to_be_enabled()
    assert hub.gateway.runtime.get("ws1").spec.ports[3000] == "private"  # type: ignore[union-attr]
    await save.click()
    await expect(page.locator("#toast")).to_have_text("Port 3000 is now public")
    assert hub.gateway.runtime.get("ws1").spec.ports[3000] == "public"  # type: ignore[union-attr]
    assert len(dialogs) == 2
    assert "public" in dialogs[0]
    await select.select_option("org")
    await page.get_by_role("button", name="Save changes to port 3000").click()
    await expect(page.locator("#toast")).to_have_text("Port 3000 is now org")
    assert len(dialogs) == 2  # only making it public asks
    await page.get_by_label("Protocol of port 3000", exact=True).select_option("https")
    await page.get_by_role("button", name="Save changes to port 3000").click()
    await expect(page.locator("#toast")).to_have_text("Port 3000 is reached over HTTPS")
    assert hub.gateway.runtime.get("ws1").spec.https_ports == {3000}  # type: ignore[union-attr]
    await page.get_by_label("Label of port 3000", exact=True).fill("Shop front")
    await page.keyboard.press("Enter")
    await expect(page.locator("#toast")).to_have_text("Port 3000 is now called Shop front")
    assert hub.gateway.runtime.get("ws1").spec.labels == {3000: "Shop front"}  # type: ignore[union-attr]


async def test_api_tokens_page(browser: Browser, make_hub: MakeHub) -> None:
    hub = await make_hub({"ws1": {"owner": "alice", "command": ["sleep", "3600"]}})
    _, page = await signed_in(browser, hub, "alice")
    await page.get_by_role("link", name="API tokens").click()
    await page.get_by_label("Name").fill("laptop")
    await page.get_by_role("button", name="Create token").click()
    await expect(page.get_by_text("Copy this token now: it is shown only once.")).to_be_visible()
    token = await page.get_by_label("Token", exact=True).input_value()
    assert token.startswith("chk_")
    record = hub.gateway.auth.store.find_api_token(token)
    assert record is not None
    await expect(page.locator(f'tr[data-token="{record.id}"]')).to_contain_text("laptop")
    await page.get_by_role("button", name="Copy token").click()
    assert await clipboard(page) == token
    await page.reload()
    assert token not in await page.content()  # shown once
    await page.get_by_role("button", name=f"Revoke token laptop ({record.id})").click()
    await expect(page.locator(f'tr[data-token="{record.id}"]')).to_have_count(0)
    assert hub.gateway.auth.store.find_api_token(token) is None


@pytest.mark.parametrize("dark", [False, True], ids=["light", "dark"])
async def test_hub_pages_pass_axe(browser: Browser, make_hub: MakeHub, dark: bool) -> None:
    """WCAG 2 A/AA in Chromium: contrast of every text (revoked rows and buttons included), labels, names."""
    require_peer(AXE, f"run `npm ci` in {REPO}")
    hub = await make_hub({"ws1": {"owner": "alice", "command": ["sleep", "3600"], "ports": {3000: "private"}}})
    store = hub.gateway.auth.store
    revoked, _ = await store.create_share(workspace="ws1", port=3000, audience="anyone", people=[], created_by="alice",
                                          ttl=3600)
    await store.revoke_share(revoked)
    await store.create_share(workspace="ws1", port=None, audience="people", people=["bob"], created_by="alice",
                             ttl=3600)
    _, page = await signed_in(browser, hub, "alice", dark=dark)
    await expect(page.locator("table.shares tbody tr")).to_have_count(2)
    scheme = "dark" if dark else "light"
    for path in ("/", "/tokens", "/auth/dev"):
        await page.goto(hub.url + path)
        await page.add_script_tag(path=str(AXE))
        result = await page.evaluate(
            "axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21aa']}})")
        violations = [(v["id"], [node["target"] for node in v["nodes"]][:5]) for v in result["violations"]]
        assert violations == [], f"{path} ({scheme}): {json.dumps(violations)}"
    await page.goto(hub.url + "/")
    await screenshot(page, f"hub-{scheme}")


async def test_signed_out_hub_is_a_sign_in_page_and_its_feed_refuses(browser: Browser, make_hub: MakeHub) -> None:
    hub = await make_hub({"ws1": {"owner": "alice", "command": ["sleep", "3600"]}})
    context = await browser.launch(third_party_cookies=True)
    page = await context.new_page()
    await page.goto(hub.url + "/")
    await expect(page.get_by_role("link", name="Sign in (development)")).to_be_visible()
    answer = await page.evaluate("fetch('/api/v1/hub/events').then(r => r.status)")
    assert answer == 401


async def test_serve_on_another_port_opens_in_chromium(browser: Browser, tmp_path: Path) -> None:
    """``serve --port P`` on the embedded default: the hub and the demo preview it prints work in a browser."""
    port = free_loopback_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("CODEHUB_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--port", str(port), cwd=tmp_path, env=env,
            stdin=subprocess.DEVNULL, stdout=output, stderr=output)
    try:
        urls = None
        for _ in range(400):  # at most twenty seconds
            assert process.returncode is None, log.read_text()
            urls = urls_in(log.read_text())
            if urls is not None:
                break
            await asyncio.sleep(0.05)
        assert urls is not None, log.read_text()
        context = await browser.launch(third_party_cookies=True)
        page = await context.new_page()
        await page.goto(urls["hub"])
        await page.get_by_role("link", name="Sign in (development)").click()
        async with page.expect_navigation():
            await page.get_by_role("button", name="Sign in").click()
        assert page.url == urls["hub"]
        await expect(page.locator('section[data-ws="demo"] tr[data-port="8000"] a.url')).to_have_attribute(
            "href", urls["demo"])
        await page.goto(urls["demo"])
        await expect(page.locator("h1")).to_contain_text("Hello from workspace demo", timeout=30_000)
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            await process.wait()

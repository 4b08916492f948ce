"""An attack pass on what a hostile preview's page can make its visitor's browser do to other origins, through the
gateway's own pages on them. Real Chromium over real TLS (``tls_stack``): mallory's public preview, alice's private
app; Chromium tells where a request came from (Fetch Metadata) only to HTTPS origins, as in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web
from playwright.async_api import Request

from gateway.auth.keys import load_or_create
from gateway.config import Config
from gateway.lifecycle import Phase
from gateway.server.app import build_app
from gateway.server.fastlane import GatewayRunner
from tests.browser.conftest import SITE, Browser, MakeStack, TlsStack, app_command, next_address, screenshot
from tests.browser.test_wake_elsewhere import alice_on_her_app
from tests.kube.support import until
from tests.peers.idp.fixture import free_loopback_port

WORKER_APP = Path(__file__).resolve().with_name("apps") / "worker_app.py"
_IN_A_FRAME = """async ([url]) => {
    const frame = document.createElement("iframe");
    const loaded = new Promise((done) => { frame.onload = done; });
    frame.src = url;
    document.body.append(frame);
    await loaded;
    frame.remove(); }"""
"""A page's script that loads ``url`` in a frame of its own, then takes the frame away."""


async def test_a_page_a_preview_sent_its_visitor_to_does_not_wake_their_workspace_by_itself(
        browser: Browser, tls_stack: TlsStack) -> None:
    """Mallory's script (no click) sends alice's tab to a port of her running workspace where nothing listens. The
    gateway's 502 page there tried again by itself every 3 s (``<meta http-equiv="refresh">``): each reload a
    navigation from the app's own origin, which the wake rule lets wake, with her cookie. So her tab, long after
    mallory's page was gone, kept the workspace awake (each reload is a request to it) and, once it went to sleep
    anyway (alice's Stop, the idle reaper where visitors do not keep it awake), woke it again within 3 s, for as
    long as the tab stayed open. The page tries by itself only when the visitor's own navigation brought it, as
    the 431 page does; else its button is the visitor's to click."""
    stack = tls_stack
    runtime = stack.gateway.runtime
    page = await alice_on_her_app(browser, stack)
    nothing = stack.share_url("vic", 8001)  # her workspace's, where no dev server listens (yet)

    await page.context.add_init_script(f"if (location.hash === '#away') location.href = {nothing + '?script'!r};")
    await page.goto(stack.share_url("mal", 3000, "/elsewhere#away"), wait_until="commit")
    await page.get_by_role("link", name="Try again now").wait_for()
    assert page.url == nothing + "?script"
    assert await page.locator("h1").text_content() == "Nothing is answering"
    assert await page.locator('meta[http-equiv="refresh"]').count() == 0
    await screenshot(page, "attack-a-502-page-a-script-brought-does-not-reload-itself")

    await runtime.stop("vic")  # alice stops it from the hub, or it goes to sleep
    await asyncio.sleep(3.5)  # past the 3 s a reload by itself came after
    assert not stack.gateway.waker.waking("vic")
    state = runtime.get("vic")
    assert state is not None
    assert state.phase is Phase.WARM, state

    # Her own click on the page's button wakes it (a navigation of hers, from its own origin).
    def woken() -> bool:
        now = runtime.get("vic")
        return stack.gateway.waker.waking("vic") or (now is not None and now.phase is not Phase.WARM)

    await page.get_by_role("link", name="Try again now").click()
    await until(woken, 10)


async def test_a_502_page_the_visitor_opened_themselves_still_tries_again_by_itself(
        browser: Browser, tls_stack: TlsStack) -> None:
    """The page a visitor's own navigation brought (typed, a bookmark) keeps trying by itself, as before: a dev
    server being started shows up without a click."""
    stack = tls_stack
    page = await alice_on_her_app(browser, stack)
    await page.goto(stack.share_url("vic", 8001))
    await page.get_by_role("link", name="Try again now").wait_for()
    assert await page.locator('meta[http-equiv="refresh"]').count() == 1


@contextlib.asynccontextmanager
async def _gateway(tmp_path: Path, port: int, generation: str,
                   workspaces: Mapping[str, Mapping[str, Any]]) -> AsyncIterator[web.Application]:
    """The gateway on ``localhost:port`` (``*.localhost`` previews: a secure context, where service workers run),
    dev sign-in, with the signing keys every generation of it shares; its workspaces as configured for this
    generation."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("{}\n")
    config = Config.model_validate({
        "listen": {"host": "127.0.0.1", "port": port},
        "hub_url": f"http://localhost:{port}",
        "preview_domain": f"localhost:{port}",
        "policy_file": str(policy),
        "auth": {"mode": "dev", "keys_file": str(tmp_path / "signing-keys.json")},
        "local": {"state_dir": str(tmp_path / generation), "workspaces": {
            name: {"address": next_address(), **ws} for name, ws in workspaces.items()}},
    })
    runner = GatewayRunner(build_app(config), handler_cancellation=True, shutdown_timeout=5.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield runner.app
    finally:
        await runner.cleanup()


async def test_a_service_worker_a_names_former_owner_left_does_not_answer_for_the_new_one(
        browser: Browser, tmp_path: Path) -> None:
    """Mallory's workspace ``demo`` registered a service worker for its whole origin in its visitors' browsers
    (any page may). The name then passed to alice (mallory's deleted, one of that name made by alice; locally, the
    operator declaring it for her). The worker stayed in alice's browser, and the gateway, which routes by name,
    let it answer alice's pages: it fetched them with her cookie through the sign-in and showed what it read under
    its own heading (it could as well send it to mallory, or write as alice). Now the fetch of a worker's script is
    answered with a mark of whose workspace it was, and a browser coming back with another owner's mark gets
    ``Clear-Site-Data`` (the worker ends) and nothing of the app's; opened again, the page is alice's."""
    port = free_loopback_port()
    load_or_create(tmp_path / "signing-keys.json", create=True)
    demo = f"http://3000-demo.localhost:{port}/"
    context = await browser.launch(third_party_cookies=False)
    page = await context.new_page()
    mallorys = {"owner": "mallory", "ports": {3000: "public"},
                  "command": [sys.executable, str(WORKER_APP), "--host", "{host}", "--port", "3000"]}
    async with _gateway(tmp_path, port, "before", {"demo": mallorys}):
        await page.goto(demo)  # its waiting page, then the app
        await page.wait_for_function("document.title === 'worker ready'")

    async with _gateway(tmp_path, port, "after", {"demo": {"owner": "alice", "ports": {3000: "private"},
                                                           "command": app_command(3000)}}):
        await page.goto(demo)
        await page.get_by_role("heading", name="This address has a new owner").wait_for()
        assert await page.evaluate("navigator.serviceWorker.getRegistrations().then((found) => found.length)") == 0
        await page.get_by_role("link", name="Try again now").click()
        await page.locator("#user").fill("alice")  # her sign-in
        async with page.expect_navigation():
            await page.locator("button[type=submit]").click()
        await page.locator("#app").wait_for()
        assert await page.locator("#hijacked").count() == 0
        assert await page.locator("#user").text_content() == "alice"
        await screenshot(page, "attack-a-former-owners-service-worker-is-gone")


async def test_a_mark_planted_for_the_site_over_plain_http_is_refused_once_in_a_frame_too(
        browser: Browser, make_stack: MakeStack) -> None:
    """Over plain HTTP a preview's script can set an owner's mark for the shared parent domain (here ``codehub.test``,
    one site, as under a real preview domain, and not a secure context as ``*.localhost`` is). The README says each
    other preview its visitor opens then answers once with ``409 name-reused``, and after it (the refusal sets the
    host's own mark) the two marks count as none. So it is in a frame (mallory's page framing alice's preview, same
    site): the refusal's mark is the host's ordinary cookie, which Chromium keeps from a plain HTTP origin (a
    ``SameSite=None; Secure`` one it would refuse, leaving the planted mark alone, refused at every load). Chromium
    ignores the ``Clear-Site-Data`` there: no service worker can be registered outside a secure context either."""
    stack = await make_stack({"demo": {"owner": "alice", "ports": {3000: "public"}, "command": app_command(3000)},
                              "evil": {"owner": "mallory", "ports": {3000: "public"}, "command": app_command(3000)}},
                             domain=SITE)
    context = await browser.launch(third_party_cookies=False)
    page = await context.new_page()
    demo = stack.share_url("demo", 3000)
    await page.goto(demo)  # the visitor has used alice's preview (it is awake)
    await page.locator("#app").wait_for()
    await page.goto(stack.share_url("evil", 3000))
    await page.locator("#app").wait_for()
    await page.evaluate(f"document.cookie = 'codehub_owner=planted; Domain={SITE}; Path=/'")
    host = f"3000-demo.{SITE}:{stack.port}"
    for _ in range(3):
        await page.evaluate(_IN_A_FRAME, [demo])
    answers = [status for method, seen, path, status in stack.responses if seen == host and path == "/"]
    assert answers[-4:] == [200, 409, 200, 200], answers  # refused once, not at every load
    marks = [cookie for cookie in await context.cookies() if cookie["name"] == "codehub_owner"]
    assert sorted(cookie["domain"] for cookie in marks) == sorted([f".{SITE}", f"3000-demo.{SITE}"]), marks


async def test_a_former_owners_mark_met_in_a_frame_is_replaced_not_joined(browser: Browser,
                                                                          tls_stack: TlsStack) -> None:
    """A visitor's browser holds the mark of ``vic``'s former owner (a worker their page registered when the name
    was theirs). The first time it meets ``vic`` is in a frame on another preview of the site (mallory's page, or an
    IDE's preview pane): the refusal there set the new owner's mark as a frame's cookie (``SameSite=None;
    Partitioned``), which Chromium keeps beside the former owner's rather than in its place. From then on the
    browser sent two marks, which count as none: that host's owner could change again and a worker left there would
    answer the next owner's pages, unseen. The refusal's mark takes the place of the one it refused (a frame on the
    same site is sent and may set the host's ordinary cookies; one on another site was sent no mark to refuse)."""
    stack = tls_stack
    vic = stack.share_url("vic", 8000)
    context = await browser.launch(third_party_cookies=False, extra_args=("--ignore-certificate-errors",))
    await context.add_cookies([{"name": "__Host-codehub_owner", "value": "former", "url": vic, "secure": True,
                                "httpOnly": True, "sameSite": "Lax"}])
    page = await context.new_page()
    await page.goto(stack.share_url("mal", 3000))
    await page.locator("#app").wait_for()
    await page.evaluate(_IN_A_FRAME, [vic])
    host = f"8000-vic.{SITE}:{stack.port}"
    assert [status for _method, seen, path, status in stack.responses if seen == host and path == "/"] == [409]
    sent: list[str] = []

    async def note(request: Request) -> None:
        if request.url == vic:
            sent.append((await request.all_headers()).get("cookie", ""))

    page.on("request", note)
    await page.goto(vic)  # opened by the visitor now: what its requests carry
    mark = stack.gateway.auth.sessions.owner_marks(host, "alice")[0]
    assert sent == [f"__Host-codehub_owner={mark}"], sent  # not the former owner's beside it: two, no mark

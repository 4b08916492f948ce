"""Real-browser fixtures: Debian's Chromium driven by Playwright, the real oidc-provider IdP, and the gateway
listening on a real loopback port, so Chromium reaches ``http://localhost:PORT`` (hub) and
``http://{port}-{workspace}.localhost:PORT`` (previews) natively (Chromium maps ``*.localhost`` to loopback).

Nothing here leaves loopback: the host-resolver rule makes every other name fail at once. Every wait has a
timeout; every process started here is stopped at teardown (workspace processes by the gateway's runtime, the
IdP by its fixture, Chromium by Playwright). Screenshots go to ``artifacts/screenshots/`` (gitignored); a
failing test also gets a screenshot of every page it had open, and the browser console is printed.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import itertools
import json
import os
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from playwright.async_api import BrowserContext, ConsoleMessage, Page, Playwright, async_playwright

from gateway.config import Config
from gateway.edge.policy import parse_policy
from gateway.server.app import build_app
from gateway.server.context import GATEWAY, Gateway
from gateway.server.fastlane import GatewayRunner
from tests.peers.idp.fixture import IdP, free_loopback_port, start_idp

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
APP_SCRIPT = Path(__file__).resolve().with_name("apps") / "preview_app.py"
WS_APP_SCRIPT = Path(__file__).resolve().with_name("apps") / "ws_app.py"
CODE_SERVER = Path(os.environ.get("CODEHUB_PEERS", "/opt/codehub-peers")) / "bin" / "code-server"
VITE = REPO / "node_modules" / ".bin" / "vite"
TIMEOUT_MS = 20_000
# Starting Chromium is not what any scenario tests; on a loaded 2-core CI machine it has taken over 20 s.
LAUNCH_TIMEOUT_MS = 90_000
SITE = "codehub.test"
# Flags from shared/COMPONENTS.md; the resolver rule is one argv element (no shell quotes).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # *.codehub.test: a preview domain whose hosts are one *site* (as under a real domain), on loopback.
    f"--host-resolver-rules=MAP *.{SITE} 127.0.0.1, MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE *.localhost, "
    "EXCLUDE 127.0.0.1",
]
_addresses = itertools.count(2)


def next_address() -> str:
    """Workspace loopback addresses of their own (127.7.P.x), apart from those the other tests use (127.10-249.…);
    the third octet follows the process id, so two test runs side by side never share an address (and so never
    reach each other's code-server on the same port)."""
    return f"127.7.{os.getpid() % 250}.{next(_addresses) % 250 + 2}"


def app_command(*ports: int, delay: float = 0.0) -> list[str]:
    """The workspace command that runs ``apps/preview_app.py`` on ``ports``."""
    command = [sys.executable, str(APP_SCRIPT), "--host", "{host}", "--home", "{home}"]
    for port in ports:
        command += ["--port", str(port)]
    return [*command, "--delay", str(delay)] if delay else command


def ws_app(*ports: str) -> list[str]:
    """The workspace command that runs ``apps/ws_app.py`` (a page and a WebSocket) on ``ports``."""
    command = [sys.executable, str(WS_APP_SCRIPT), "--host", "{host}", "--home", "{home}"]
    for port in ports:
        command += ["--port", port]
    return command


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    """Remember each phase's report on the test item, so fixtures can tell at teardown whether the test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def _failed(node: pytest.Item) -> bool:
    report = getattr(node, "report_call", None)
    return report is None or bool(report.failed)


# ---------------------------------------------------------------------------------------------------- browser


@dataclass
class Browser:
    """Launches Chromium profiles; each context gets a fresh profile directory and a temp HOME."""

    playwright: Playwright
    root: Path
    contexts: list[BrowserContext] = field(default_factory=list)
    console: list[str] = field(default_factory=list)

    async def launch(self, *, third_party_cookies: bool, extra_args: tuple[str, ...] = ()) -> BrowserContext:
        """A persistent profile whose third-party cookie setting is explicit (``profile.cookie_controls_mode``:
        0 allows them, 1 blocks them) rather than left to the build's default."""
        profile = self.root / f"profile-{len(self.contexts)}"
        home = self.root / f"home-{len(self.contexts)}"
        (profile / "Default").mkdir(parents=True)
        home.mkdir()
        prefs = {"profile": {"cookie_controls_mode": 0 if third_party_cookies else 1,
                             "block_third_party_cookies": not third_party_cookies}}
        (profile / "Default" / "Preferences").write_text(json.dumps(prefs))
        args = [*CHROMIUM_ARGS, *extra_args]
        if not third_party_cookies:
            args.append("--test-third-party-cookie-phaseout")
        context = await self.playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=args,
            env={**os.environ, "HOME": str(home)}, viewport={"width": 1100, "height": 760},
            timeout=LAUNCH_TIMEOUT_MS,
        )
        context.set_default_timeout(TIMEOUT_MS)
        context.set_default_navigation_timeout(TIMEOUT_MS)
        context.on("page", self._watch)
        for page in context.pages:
            self._watch(page)
        self.contexts.append(context)
        return context

    def _watch(self, page: Page) -> None:
        def log(message: ConsoleMessage) -> None:
            self.console.append(f"[{message.type}] {page.url}: {message.text}")

        page.on("console", log)
        page.on("pageerror", lambda error: self.console.append(f"[pageerror] {page.url}: {error}"))


@pytest.fixture
async def browser(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Browser]:
    require_peer(Path(CHROMIUM), "run .ci/install-browser.sh")
    async with async_playwright() as playwright:
        launcher = Browser(playwright, tmp_path / "chromium")
        try:
            yield launcher
        finally:
            if _failed(request.node):
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                pages = [page for context in launcher.contexts for page in context.pages if page.url != "about:blank"]
                for index, page in enumerate(pages):
                    with contextlib.suppress(Exception):
                        await page.screenshot(path=str(ARTIFACTS / f"{request.node.name}-failed-{index}.png"),
                                              timeout=5_000)
                print("\n".join(["browser console:", *_collapsed(launcher.console)[-60:]]))
            for context in launcher.contexts:
                with contextlib.suppress(Exception):
                    await context.close()


def _collapsed(lines: list[str]) -> list[str]:
    """Each message once, at its first place, with how often it came (code-server repeats some every second),
    and at most 400 characters of it."""
    counts = collections.Counter(lines)
    return [line[:400] + (f"  (x{counts[line]})" if counts[line] > 1 else "") for line in dict.fromkeys(lines)]


async def screenshot(page: Page, name: str) -> Path:
    """Save the page as ``artifacts/screenshots/{name}.png`` (the final state of a scenario)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path


async def idp_sign_in(page: Page, idp: IdP, login: str) -> None:
    """Fill oidc-provider's development login form in the browser, then its consent form if it asks."""
    await page.wait_for_url(f"{idp.issuer}/**")
    await page.locator("input[name=login]").fill(login)
    await page.locator("input[name=password]").fill("secret")
    async with page.expect_navigation():
        await page.locator("button[type=submit]").click()
    if page.url.startswith(idp.issuer) and await page.locator("input[name=prompt][value=consent]").count():
        # No waiting for a load here: a sign-in popup may close itself as soon as the IdP lets it go.
        await page.locator("button[type=submit]").click()


# ---------------------------------------------------------------------------------------------------- gateway


@dataclass
class Stack:
    """A gateway on ``127.0.0.1:port`` (hub ``http://localhost:port``) signing in through a real IdP."""

    port: int
    idp: IdP
    app: web.Application
    policy_file: Path
    responses: list[tuple[str, str, str, int]] = field(default_factory=list)
    """(method, host, path, status) of every response the gateway sent, in order."""
    domain: str = "localhost"
    """``localhost``: every preview is a site of its own in Chromium; ``codehub.test``: all are one site (the hub
    at ``hub.codehub.test``), as under a real preview domain."""

    @property
    def gateway(self) -> Gateway:
        return self.app[GATEWAY]

    @property
    def hub(self) -> str:
        return hub_url(self.domain, self.port)

    def share_url(self, workspace: str, port: int, path: str = "/") -> str:
        return f"http://{port}-{workspace}.{self.domain}:{self.port}{path}"

    def ide_url(self, workspace: str, path: str = "/") -> str:
        return f"http://ide-{workspace}.{self.domain}:{self.port}{path}"

    def home(self, workspace: str) -> Path:
        return self.gateway.config.state_dir.resolve() / "workspaces" / workspace / "home"

    async def diagnosis(self, workspace: str) -> str:
        """What to read when a scenario with a real IDE fails: the workspace's state, the end of its own log
        (code-server's, which says when a connection or its extension host went away) and every answer on its
        IDE origin that was not a plain 200."""
        state = await self.gateway.runtime.status(workspace)
        log_file = self.home(workspace).parent / "output.log"
        lines = log_file.read_text(errors="replace").splitlines()[-40:] if log_file.exists() else ["(no log)"]
        host = f"ide-{workspace}."
        answers = [f"{method} {path[:80]} {status}" for method, seen, path, status in self.responses
                   if seen.startswith(host) and status != 200]
        return "\n".join([f"workspace {workspace}: {state.phase.value} {state.message}", "its log, last lines:", *lines,
                          "IDE answers other than 200:", *answers[-30:]])

    def set_policy(self, policy: Mapping[str, Any]) -> None:
        set_policy(self.gateway, self.policy_file, policy)


def set_policy(gateway: Gateway, policy_file: Path, policy: Mapping[str, Any]) -> None:
    """Rewrite the policy file and load it now (the gateway's file watcher would within two seconds)."""
    text = yaml.safe_dump(dict(policy))
    policy_file.write_text(text)
    holder = gateway.policies
    holder.reload_if_changed()
    assert holder.current == parse_policy(text), holder.last_error


MakeStack = Callable[..., Awaitable[Stack]]


def hub_url(domain: str, port: int) -> str:
    return f"http://{'localhost' if domain == 'localhost' else 'hub.' + domain}:{port}"


@pytest.fixture
async def make_stack(tmp_path: Path) -> AsyncIterator[MakeStack]:
    require_peer(REPO / "node_modules" / "oidc-provider", f"run `npm ci` in {REPO}")
    stacks: list[tuple[Stack, web.AppRunner, contextlib.AsyncExitStack]] = []

    async def make(workspaces: Mapping[str, Mapping[str, Any]], policy: Mapping[str, Any] | None = None, *,
                   domain: str = "localhost", timeouts: Mapping[str, float] | None = None) -> Stack:
        exits = contextlib.AsyncExitStack()
        port = free_loopback_port()
        hub = hub_url(domain, port)
        root = tmp_path / f"gateway-{port}"
        root.mkdir()
        idp = await exits.enter_async_context(start_idp(root, [f"{hub}/auth/callback"]))
        policy_file = root / "policy.yaml"
        policy_file.write_text(yaml.safe_dump(dict(policy or {})))
        config = Config.model_validate({
            "listen": {"host": "127.0.0.1", "port": port},
            "hub_url": hub,
            "preview_domain": f"{domain}:{port}",
            "policy_file": str(policy_file),
            "auth": {"mode": "oidc",
                     "oidc": {"issuer": idp.issuer, "client_id": idp.client_id, "client_secret": idp.client_secret}},
            "local": {"state_dir": str(root / "state"),
                      "workspaces": {name: {"address": next_address(), **ws} for name, ws in workspaces.items()}},
            "timeouts": dict(timeouts or {}),
        })
        app = build_app(config)
        responses: list[tuple[str, str, str, int]] = []

        async def record(request: web.Request, response: web.StreamResponse) -> None:
            responses.append((request.method, request.host, request.path, response.status))

        app.on_response_prepare.append(record)
        runner = GatewayRunner(app, handler_cancellation=True, shutdown_timeout=5.0)  # as `serve`: the fast lane too
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", port).start()
        except BaseException:
            await runner.cleanup()
            await exits.aclose()
            raise
        stack = Stack(port, idp, app, policy_file, responses, domain)
        stacks.append((stack, runner, exits))
        return stack

    yield make
    for _stack, runner, exits in reversed(stacks):
        try:
            await runner.cleanup()
        finally:
            await exits.aclose()


# ------------------------------------------------------------------------------------------ over HTTPS


def _certificate(folder: Path) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SITE)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(SITE), x509.DNSName(f"*.{SITE}")]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return context


@dataclass
class TlsStack:
    """The gateway over HTTPS under one site, as in production (Chromium sends Fetch Metadata only to HTTPS and
    ``localhost`` origins, and keeps ``__Host-`` cookies only from HTTPS ones): dev sign-in, mallory's public
    preview and alice's private app."""

    port: int
    app: web.Application
    responses: list[tuple[str, str, str, int]]
    policy_file: Path

    @property
    def gateway(self) -> Gateway:
        return self.app[GATEWAY]

    @property
    def hub(self) -> str:
        return f"https://hub.{SITE}:{self.port}"

    def share_url(self, workspace: str, port: int, path: str = "/") -> str:
        return f"https://{port}-{workspace}.{SITE}:{self.port}{path}"

    def set_policy(self, policy: Mapping[str, Any]) -> None:
        set_policy(self.gateway, self.policy_file, policy)


@pytest.fixture
async def tls_stack(tmp_path: Path) -> AsyncIterator[TlsStack]:
    port = free_loopback_port()
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({}))
    config = Config.model_validate({
        "listen": {"host": "127.0.0.1", "port": port},
        "hub_url": f"https://hub.{SITE}:{port}",
        "preview_domain": f"{SITE}:{port}",
        "policy_file": str(policy),
        "auth": {"mode": "dev"},
        "local": {"state_dir": str(tmp_path / "state"), "workspaces": {
            "mal": {"owner": "mallory", "address": next_address(), "command": app_command(3000),
                    "ports": {3000: "public"}},
            "vic": {"owner": "alice", "address": next_address(), "command": app_command(8000),
                    "ports": {8000: "private"}},
        }},
    })
    app = build_app(config)
    responses: list[tuple[str, str, str, int]] = []

    async def record(request: web.Request, response: web.StreamResponse) -> None:
        responses.append((request.method, request.host, request.path, response.status))

    app.on_response_prepare.append(record)
    runner = GatewayRunner(app, handler_cancellation=True, shutdown_timeout=5.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=_certificate(tmp_path)).start()
        yield TlsStack(port, app, responses, policy)
    finally:
        await runner.cleanup()


# ------------------------------------------------------------------------------------------ the other origin


@dataclass
class OtherOrigin:
    """A small site on another port, told apart by Host: ``review.localhost`` (a code-review tool allowed to
    frame previews), ``evil.localhost`` (a site that is not), ``chat.localhost`` (a page with a link), and
    ``cookies.localhost`` (the third-party-cookie control)."""

    port: int

    def url(self, host: str, path: str) -> str:
        return f"http://{host}.localhost:{self.port}{path}"

    @property
    def review_origin(self) -> str:
        return f"http://review.localhost:{self.port}"


_FRAME_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title></head>
<body style="font: 16px sans-serif; margin: 1rem; background: #fafafa">
<h1 id="heading">{title}</h1><p>Embedded below: <code>{src}</code></p>
<iframe id="preview" src="{src}" style="width: 100%; height: 520px; border: 2px solid #888"></iframe>
</body></html>"""


async def _other_origin(request: web.Request) -> web.StreamResponse:
    host = request.host.partition(".")[0]
    if request.path == "/frame":
        src = request.query["src"]
        title = {"review": "Review tool: merge request !42", "evil": "Some other site"}.get(host, host)
        body = _FRAME_PAGE.format(title=title, src=src.replace('"', "&quot;"))
        return web.Response(text=body, content_type="text/html")
    if request.path == "/snippet":  # a review comment holding an embed snippet as the API returned it
        body = f'<!doctype html><h1 id="heading">Review tool: comment with a preview</h1>{request.query["html"]}'
        return web.Response(text=body, content_type="text/html")
    if request.path == "/link":
        href = request.query["href"].replace('"', "&quot;")
        return web.Response(text=f'<!doctype html><p>Look at <a id="link" href="{href}">my preview</a></p>',
                            content_type="text/html")
    if request.path == "/cookie/set":
        response = web.Response(text="cookies set", content_type="text/html")
        response.headers.add("Set-Cookie", "control=unpartitioned; Path=/; SameSite=None; Secure")
        response.headers.add("Set-Cookie", "control_chips=partitioned; Path=/; SameSite=None; Secure; Partitioned")
        return response
    if request.path == "/cookie/read":
        return web.Response(text=f'<pre id="cookies">{request.headers.get("Cookie", "")}</pre>',
                            content_type="text/html")
    raise web.HTTPNotFound()


@pytest.fixture
async def other_origin() -> AsyncIterator[OtherOrigin]:
    app = web.Application()
    app.router.add_get("/{tail:.*}", _other_origin)
    runner = web.AppRunner(app, shutdown_timeout=2.0)
    await runner.setup()
    port = free_loopback_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield OtherOrigin(port)
    finally:
        await runner.cleanup()


# ------------------------------------------------------------------------------------------------ misc helpers


def require_peer(path: Path, how: str) -> None:
    if not path.exists():
        pytest.fail(f"{path} is missing: {how}")

"""Over HTTPS the gateway's cookies are ``__Host-`` cookies, which a sibling host cannot set: that is what stops a
page on one preview from planting a session or a hand-off state for the hub or another preview (README, Limits).

Chromium keeps the prefix rule for names that *begin* with ``__Host-``, but it accepts and sends a name that begins
with a Unicode space (U+2000, U+00A0, U+3000…) and a ``Domain=`` on the shared parent. The gateway must not read
such a cookie as its own: if it trimmed Unicode white space off cookie names (Python's ``str.strip``), a hostile
preview could sign its visitors in to the hub as its owner (login CSRF), or shadow their own session on chosen paths.

Real Chromium, real TLS (a self-signed certificate for ``*.codehub.test``), under one site as in production.
"""

from __future__ import annotations

import datetime
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.auth.identity import Identity
from gateway.config import Config
from gateway.server.app import build_app
from gateway.server.context import GATEWAY, Gateway
from gateway.server.fastlane import GatewayRunner
from tests.browser.conftest import SITE, Browser, app_command, next_address
from tests.peers.idp.fixture import free_loopback_port

SPACES = ["\u2000", "\u00a0", "\u3000"]


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
    port: int
    app: web.Application

    @property
    def gateway(self) -> Gateway:
        return self.app[GATEWAY]

    @property
    def hub(self) -> str:
        return f"https://hub.{SITE}:{self.port}"

    def share_url(self, workspace: str, port: int, path: str = "/") -> str:
        return f"https://{port}-{workspace}.{SITE}:{self.port}{path}"


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
    runner = GatewayRunner(app, handler_cancellation=True, shutdown_timeout=5.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=_certificate(tmp_path)).start()
        yield TlsStack(port, app)
    finally:
        await runner.cleanup()


async def test_a_preview_cannot_plant_a_session_under_a_unicode_spaced_host_prefix(browser: Browser,
                                                                                   tls_stack: TlsStack) -> None:
    stack = tls_stack
    sessions = stack.gateway.auth.sessions
    mallory = Identity("mallory", "mallory@example.com", (), "mallory")
    # What mallory holds after signing in herself: her own hub session, and her own session for alice's preview
    # (the hand-off gives any signed-in person a session cookie for any preview host; access is checked after).
    hub_session = sessions.issue(mallory, f"hub.{SITE}:{stack.port}")
    preview_session = sessions.issue(mallory, f"8000-vic.{SITE}:{stack.port}")

    context = await browser.launch(third_party_cookies=False, extra_args=("--ignore-certificate-errors",))
    page = await context.new_page()
    # Mallory's public preview: its script plants cookies for the whole site (codehub.test).
    await page.goto(stack.share_url("mal", 3000))
    await page.locator("#app").wait_for()
    plant = """([names, value, path]) => { for (const name of names)
        document.cookie = `${name}=${value}; Domain=codehub.test; Path=${path}; Secure; SameSite=Lax`; }"""
    # The real prefix is refused by Chromium with a Domain (control)...
    await page.evaluate(plant, [["__Host-codehub_session"], hub_session, "/"])
    assert "__Host-codehub_session" not in [c["name"] for c in await context.cookies()]
    # ...but a Unicode space in front is an ordinary name to it, kept for the whole site and sent to the hub.
    await page.evaluate(plant, [[f"{space}__Host-codehub_session" for space in SPACES], hub_session, "/"])
    planted = [c["name"] for c in await context.cookies() if c["domain"] == f".{SITE}"]
    assert len(planted) == len(SPACES), planted

    # Alice, never signed in on the hub, opens it: she must not be mallory there.
    hub = await context.new_page()
    await hub.goto(stack.hub + "/api/v1/me")
    me = await hub.locator("body").text_content() or ""
    assert "mallory" not in me, f"the hub took a planted cookie for its own: {me}"

    # Nor on a preview: mallory's session for alice's private port does not make alice mallory there (locked out
    # of her own app, or, on someone else's, filling in mallory's account).
    await page.evaluate(plant, [[f"{SPACES[0]}__Host-codehub_session"], preview_session, "/"])
    response = await hub.goto(stack.share_url("vic", 8000))
    assert response is not None
    # Anonymous there, she is sent to sign in (the dev form on the hub); as mallory she would get a 403.
    assert response.url.startswith(stack.hub + "/auth/dev"), (response.status, response.url)

    # Signed in for real, alice keeps her own identity, even on paths where a planted cookie with a longer Path
    # comes first in the Cookie header (Chromium orders cookies by path length).
    await hub.goto(stack.hub + "/auth/dev?next=/")
    await hub.locator("#user").fill("alice")
    async with hub.expect_navigation():
        await hub.locator("button[type=submit]").click()
    await page.evaluate(plant, [[f"{SPACES[0]}__Host-codehub_session"], hub_session, "/api/v1"])
    await hub.goto(stack.hub + "/api/v1/me")
    assert json.loads(await hub.locator("body").text_content() or "")["user"] == "alice"

"""A port marked HTTPS: the gateway speaks TLS to the workspace's dev server (real Vite with a self-signed
certificate, as ``vite --https`` serves), HTTP and the HMR WebSocket alike, while the visitor keeps the gateway's
own scheme. Switching the port back to HTTP through the API breaks it again, so the mark is what does it."""

from __future__ import annotations

import asyncio
import datetime
import re
import ssl
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.auth.identity import Identity
from gateway.server.context import GATEWAY
from tests.conftest import MakeGateway, next_address, scrape, workspace
from tests.server.conftest import free_port
from tests.server.test_vite import INDEX, MAIN, VITE, next_json

pytestmark = pytest.mark.timeout(120)
CONFIG = """import fs from "node:fs";
export default { server: { https: { key: fs.readFileSync(%r), cert: fs.readFileSync(%r) } } };
"""


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for ``localhost`` signed by its own key, as dev servers make them."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    key_file, cert_file = folder / "key.pem", folder / "cert.pem"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_file, cert_file


async def test_https_dev_server_behind_a_plain_http_share_url(make_gateway: MakeGateway, tmp_path: Path) -> None:
    assert VITE.exists(), "vite is not installed: run `bash .ci/install` (npm ci) in the repository root"
    project = tmp_path / "project"
    project.mkdir()
    (project / "index.html").write_text(INDEX)
    (project / "main.js").write_text(MAIN.format(n=1))
    key, cert = self_signed(tmp_path)
    (project / "vite.config.mjs").write_text(CONFIG % (str(key), str(cert)))
    address = next_address()
    port = free_port(address)
    command = [str(VITE), str(project), "--config", str(project / "vite.config.mjs"), "--host", "{host}", "--port",
               str(port), "--strictPort", "--clearScreen", "false"]
    client = await make_gateway(workspaces={"web": workspace(address, command=command, ports={port: "public"},
                                                             https_ports=[port])})
    host = f"{port}-web.localhost:8080"
    headers = {"Host": host}

    async with asyncio.timeout(60):
        async with client.get("/", headers={**headers, "Accept": "*/*"}) as response:
            assert response.status == 200, await response.text()
            assert "<title>vite behind code-hub</title>" in await response.text()
        async with client.get("/@vite/client", headers=headers) as response:
            token = re.search(r'const wsToken = "([^"]+)"', await response.text())
        assert token
        async with client.ws_connect(f"/?token={token[1]}", protocols=("vite-hmr",),
                                     headers={**headers, "Origin": f"http://{host}"}) as ws:
            assert ws.protocol == "vite-hmr"
            await next_json(ws, "connected")

        gateway = client.app[GATEWAY]
        _, api_token = await gateway.auth.store.create_api_token(Identity("alice"), name="test")
        auth = {"Authorization": f"Bearer {api_token}", "Host": "localhost:8080"}
        async with client.get("/api/v1/workspaces/web", headers=auth) as response:
            [view] = [p for p in (await response.json())["ports"] if p["port"] == port]
        assert view["protocol"] == "https"
        async with client.put(f"/api/v1/workspaces/web/ports/{port}", json={"protocol": "http"}, headers=auth
                              ) as response:
            assert response.status == 200
        async with client.get("/", headers={**headers, "Accept": "application/json"}) as response:
            assert response.status == 502  # plain HTTP to a TLS server: no answer the gateway can use
        async with client.put(f"/api/v1/workspaces/web/ports/{port}", json={"protocol": "https"}, headers=auth
                              ) as response:
            assert response.status == 200
        async with client.get("/main.js", headers=headers) as response:
            assert response.status == 200
            assert "version 1" in await response.text()


async def test_redirects_naming_the_https_upstream_get_the_share_url(make_gateway: MakeGateway,
                                                                     tmp_path: Path) -> None:
    key, cert = self_signed(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    address = next_address()
    port = free_port(address)

    async def login(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"https://localhost:{port}/home?from={request.scheme}")

    app = web.Application()
    app.router.add_get("/login", login)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, address, port, ssl_context=tls).start()
        client = await make_gateway(workspaces={"web": workspace(address, ports={port: "public"},
                                                                 https_ports=[port])})
        await client.app[GATEWAY].runtime.wake("web")
        async with client.get("/login", headers={"Host": f"{port}-web.localhost:8080", "Accept": "*/*"},
                              allow_redirects=False) as response:
            assert response.status == 302
            assert response.headers["Location"] == f"http://{port}-web.localhost:8080/home?from=https"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("upgrade", [False, True], ids=["http", "websocket"])
async def test_a_port_marked_https_that_speaks_plain_http_is_named_so(make_gateway: MakeGateway,
                                                                       upgrade: bool) -> None:
    """The TLS handshake fails: that is a server that does not speak HTTPS, not "nothing is listening" (which would
    send its owner to start a dev server that is running)."""
    address = next_address()
    port = free_port(address)
    async def plain(request: web.Request) -> web.Response:
        return web.Response(text="plain")

    app = web.Application()
    app.router.add_get("/", plain)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, address, port).start()
        client = await make_gateway(workspaces={"web": workspace(address, ports={port: "public"},
                                                                 https_ports=[port])})
        await client.app[GATEWAY].runtime.wake("web")
        headers = {"Host": f"{port}-web.localhost:8080", "Accept": "application/json"}
        if upgrade:
            headers |= {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
        async with client.get("/", headers=headers) as response:
            assert response.status == 502
            error = (await response.json())["error"]
        assert error["code"] == "upstream-tls"
        assert "HTTPS" in error["message"]
        assert 'codehub_upstream_connect_errors_total{reason="tls"} 1.0' in await scrape(client.app)
    finally:
        await runner.cleanup()

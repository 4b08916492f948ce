"""The real Vite dev server as a workspace's command, behind the gateway: the page loads through the share URL,
and the HMR WebSocket (subprotocol ``vite-hmr``, token from ``/@vite/client``, the share URL as ``Origin``)
connects through the gateway and delivers an update when a source file changes."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import MakeGateway, next_address, workspace
from tests.server.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
VITE = ROOT / "node_modules" / ".bin" / "vite"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _vite_installed() -> None:
    assert VITE.exists(), "vite is not installed: run `bash .ci/install` (npm ci) in the repository root"

INDEX = """<!doctype html>
<html><head><title>vite behind code-hub</title></head>
<body><div id="app"></div><script type="module" src="/main.js"></script></body></html>
"""
MAIN = """document.querySelector('#app').textContent = 'version {n}'
if (import.meta.hot) import.meta.hot.accept()
"""


async def next_json(ws: aiohttp.ClientWebSocketResponse, wanted: str) -> dict[str, Any]:
    """The next HMR payload of type ``wanted``, skipping others (pings, custom events)."""
    while True:
        message = await ws.receive(timeout=30)
        assert message.type is aiohttp.WSMsgType.TEXT, message
        payload: dict[str, Any] = json.loads(message.data)
        if payload.get("type") == wanted:
            return payload


async def test_vite_page_and_hmr_through_the_share_url(make_gateway: MakeGateway, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "index.html").write_text(INDEX)
    (project / "main.js").write_text(MAIN.format(n=1))
    address = next_address()
    port = free_port(address)
    command = [str(VITE), str(project), "--host", "{host}", "--port", str(port), "--strictPort",
               "--clearScreen", "false"]
    client = await make_gateway(workspaces={"web": workspace(address, command=command, ports={port: "public"})})
    host = f"{port}-web.localhost:8080"
    origin = f"http://{host}"
    headers = {"Host": host}

    async with asyncio.timeout(60):
        # the first request wakes the workspace (starts vite) and is held until the port answers
        async with client.get("/", headers={**headers, "Accept": "*/*"}) as response:
            assert response.status == 200, await response.text()
            page = await response.text()
        assert "<title>vite behind code-hub</title>" in page
        assert '<script type="module" src="/@vite/client"></script>' in page

        async with client.get("/@vite/client", headers=headers) as response:
            assert response.status == 200
            vite_client = await response.text()
        token = re.search(r'const wsToken = "([^"]+)"', vite_client)
        assert token, vite_client[:2000]

        async with client.get("/main.js", headers=headers) as response:  # puts main.js in Vite's module graph
            assert response.status == 200
            assert "version 1" in await response.text()

        async with client.ws_connect(f"/?token={token[1]}", protocols=("vite-hmr",),
                                     headers={**headers, "Origin": origin}) as ws:
            assert ws.protocol == "vite-hmr"
            await next_json(ws, "connected")
            (project / "main.js").write_text(MAIN.format(n=2))
            update = await next_json(ws, "update")
        assert [(u["type"], u["path"]) for u in update["updates"]] == [("js-update", "/main.js")]

        async with client.get("/main.js", headers=headers) as response:
            assert "version 2" in await response.text()

        # without the token an Origin-bearing HMR socket is refused by Vite, and the gateway says so
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect("/?token=wrong", protocols=("vite-hmr",), headers={**headers, "Origin": origin})
        assert refused.value.status == 502

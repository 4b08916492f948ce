"""``bench.ab --browser`` counts what a page load's module request costs: the request must be one the gateway
serves (a refusal would be counted instead, and look cheap), for the module the upstream serves as Vite does."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench.ab import browser_request, keepalive_load
from bench.client import fetch
from bench.procs import Procs, free_port, wait_for_port
from bench.servers import MODULE, Layout, SignIn, gateway_target, start_gateway, start_upstream_nginx

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(shutil.which("nginx") is None, reason="the benchmark needs nginx (.ci/install)")]


async def test_module_requests_as_chromium_sends_them_are_served_through_the_gateway(tmp_path: Path) -> None:
    procs = Procs(logs=tmp_path)
    layout = Layout(tmp_path)
    try:
        upstream = start_upstream_nginx(procs, layout)
        await wait_for_port(layout.up_host, layout.http_port, upstream)
        port = free_port("127.0.0.1")
        await start_gateway(procs, layout, "gateway", port)
        target = await gateway_target("gateway", layout, SignIn(layout, port))
        raw = browser_request(target.host, target.cookie)
        await keepalive_load(target.address, raw, 40, 4)  # raises unless every answer is a 200
        answer = await fetch(target.address, target.host, "/module.js",
                             {"Cookie": target.cookie, "Sec-Fetch-Dest": "script"})
    finally:
        procs.stop_all()
    assert answer.status == 200
    assert answer.body == MODULE
    assert answer.header("Content-Type") == "text/javascript"
    assert answer.header("Cache-Control") == "no-cache"
    assert answer.header("ETag")

"""/metrics and /healthz: what operators scrape, fed by real traffic through the gateway."""

from __future__ import annotations

import asyncio
import re
import socket

from aiohttp import web

from gateway.proxy.pacing import INITIAL_WINDOW
from tests.core.conftest import MakeProxied


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample (labels in any order), 0 when it is absent."""
    for line in text.splitlines():
        match = re.fullmatch(r"(?P<name>[a-z_:]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)", line)
        if match is None or match["name"] != name:
            continue
        found = dict(re.findall(r'([a-z_]+)="([^"]*)"', match["labels"] or ""))
        if found == labels:
            return float(match["value"])
    return 0.0


async def test_healthz_on_any_host(proxied: MakeProxied) -> None:
    p = await proxied(None)
    for host in ("localhost:8080", "10.1.2.3:8080", None):
        headers = {"Host": host} if host else {}
        async with p.client.get("/healthz", headers=headers) as response:
            assert response.status == 200
            assert await response.json() == {"status": "ok"}
    async with p.request("GET", "/healthz") as response:  # on a preview host the app's own /healthz wins
        assert response.status == 502


async def test_request_metrics_by_kind_and_status_class(proxied: MakeProxied) -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok", status=int(request.query.get("status", "200")))

    app = web.Application()
    app.router.add_get("/{tail:.*}", ok)
    p = await proxied(app, policy={"ports": {"denied": [6000]}})
    for _ in range(3):
        async with p.request("GET", "/") as response:
            assert response.status == 200
    async with p.request("GET", "/?status=404") as response:
        assert response.status == 404
    async with p.request("GET", "/", host="6000-ws1.localhost:8080") as response:
        assert response.status == 403
    async with p.request("GET", "/", host="3000-nope.localhost:8080") as response:
        assert response.status == 404
    async with p.request("GET", "/", host="bad host") as response:
        assert response.status == 400
    async with p.request("GET", "/w/ws1", host="localhost:8080") as response:
        assert response.status == 308
    text = await p.metrics()
    assert "# TYPE codehub_requests_total counter" in text
    assert sample(text, "codehub_requests_total", kind="preview", code="2xx") == 3
    assert sample(text, "codehub_requests_total", kind="preview", code="4xx") == 3
    assert sample(text, "codehub_requests_total", kind="unrouted", code="4xx") == 1
    assert sample(text, "codehub_requests_total", kind="ide-slash", code="3xx") == 1
    assert sample(text, "codehub_request_duration_seconds_count", kind="preview") == 6
    assert sample(text, "codehub_request_duration_seconds_bucket", kind="preview", le="+Inf") == 6
    assert "# TYPE codehub_upstream_connect_errors_total counter" in text
    assert sample(text, "codehub_websockets_open") == 0
    assert "# TYPE codehub_websockets_open gauge" in text


async def test_metrics_content_type(proxied: MakeProxied) -> None:
    p = await proxied(None)
    async with p.client.get("/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")


async def test_requests_waiting_for_a_connection_are_counted(proxied: MakeProxied) -> None:
    """An upstream that takes connections and never answers: the requests past its window of connection
    attempts wait in the gateway, and /metrics shows them."""
    p = await proxied(None)
    listener = socket.socket()
    listener.bind((p.address, p.port))
    listener.listen(64)
    requests = [asyncio.ensure_future(p.request("GET", f"/{n}").__aenter__()) for n in range(INITIAL_WINDOW + 1)]
    try:
        async with asyncio.timeout(5):
            while sample(await p.metrics(), "codehub_upstream_queued_requests") != 1:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    finally:
        for request in requests:
            request.cancel()
        await asyncio.gather(*requests, return_exceptions=True)
        listener.close()

"""/metrics (on its own port), /healthz and /readyz: what operators scrape and probe, fed by real traffic."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml
from aiohttp import web

from gateway.proxy.pacing import INITIAL_WINDOW
from tests.conftest import held_app
from tests.server.conftest import IDE, MakeProxied

REPO = Path(__file__).resolve().parents[2]


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
    assert sample(text, "codehub_requests_total", kind="ide-moved", code="3xx") == 1
    assert sample(text, "codehub_request_duration_seconds_count", kind="preview") == 6
    assert sample(text, "codehub_request_duration_seconds_bucket", kind="preview", le="+Inf") == 6
    assert sample(text, "codehub_request_duration_seconds_sum", kind="preview") > 0
    buckets = [float(m[1]) for m in re.finditer(
        r'codehub_request_duration_seconds_bucket\{kind="preview",le="[^"]+"\} (\S+)', text)]
    assert buckets == sorted(buckets)  # cumulative
    assert len(buckets) == 16  # 15 bounds and +Inf
    assert sample(text, "codehub_policy_decisions_total", allow="false", reason="port-denied") == 1
    allowed = sum(float(m[1]) for m in re.finditer(r'codehub_policy_decisions_total\{allow="true",[^}]*\} (\S+)',
                                                   text))
    assert allowed == 4  # the four requests the app answered (one with its own 404)
    assert "# TYPE codehub_upstream_connect_errors_total counter" in text
    assert sample(text, "codehub_websockets_open") == 0
    assert "# TYPE codehub_websockets_open gauge" in text


async def test_metrics_are_not_on_the_public_hosts(proxied: MakeProxied) -> None:
    async def app_metrics(request: web.Request) -> web.Response:
        return web.Response(text="the app's own metrics")

    app = web.Application()
    app.router.add_get("/metrics", app_metrics)
    p = await proxied(app)
    for host in ("localhost:8080", "10.1.2.3:8080"):  # the hub, and any other non-preview host (pod IPs)
        async with p.client.get("/metrics", headers={"Host": host, "Accept": "application/json"}) as response:
            assert response.status == 404
            assert "codehub_" not in await response.text()
    async with p.request("GET", "/metrics") as response:  # a preview host: the workspace's own path
        assert (response.status, await response.text()) == (200, "the app's own metrics")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _get(port: int, path: str, host: str) -> tuple[int, str, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers={"Host": host, "Accept": "application/json"})
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read().decode()
    finally:
        connection.close()


def test_serve_answers_metrics_on_its_own_port_only(tmp_path: Path) -> None:
    port, metrics_port = _free_port(), _free_port()
    config = {"listen": {"host": "127.0.0.1", "port": port}, "metrics": {"port": metrics_port},
              "hub_url": f"http://localhost:{port}", "preview_domain": f"localhost:{port}",
              "local": {"state_dir": str(tmp_path / "state")}}
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(config))
    env = {key: value for key, value in os.environ.items() if not key.startswith("CODEHUB_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", "gateway.yaml"],
                                   cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            with contextlib.suppress(OSError):
                if _get(port, "/readyz", f"127.0.0.1:{port}")[0] == 200:
                    break
            time.sleep(0.05)
        _get(port, "/", f"localhost:{port}")  # one request for the counters
        status, content_type, text = _get(metrics_port, "/metrics", f"127.0.0.1:{metrics_port}")
        assert status == 200
        assert content_type.startswith("text/plain; version=")
        assert sample(text, "codehub_requests_total", kind="hub", code="2xx") >= 1
        assert _get(port, "/metrics", f"localhost:{port}")[0] == 404
        assert _get(port, "/metrics", f"127.0.0.1:{port}")[0] == 404
        assert _get(port, "/readyz", f"localhost:{port}")[2] == '{"status": "ready"}'
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
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


async def test_pool_connections_and_tasks_are_exported(proxied: MakeProxied) -> None:
    """What the soak benchmark watches for leaks: a request in flight holds a busy connection, and once answered
    the connection waits idle in the pool; the loop's tasks are counted."""
    app, release = held_app()
    p = await proxied(app)
    pending = asyncio.ensure_future(p.request("GET", "/").__aenter__())
    try:
        async with asyncio.timeout(5):
            while sample(await p.metrics(), "codehub_upstream_connections", state="busy") != 1:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        text = await p.metrics()
        assert sample(text, "codehub_upstream_connections", state="idle") == 0
        tasks = sample(text, "codehub_asyncio_tasks")
        sleepers = [asyncio.ensure_future(asyncio.sleep(60)) for _ in range(5)]
        assert sample(await p.metrics(), "codehub_asyncio_tasks") == tasks + 5
        for sleeper in sleepers:
            sleeper.cancel()
        await asyncio.gather(*sleepers, return_exceptions=True)
        release.set()
        response = await pending
        assert response.status == 200
        await response.read()
        text = await p.metrics()
        assert sample(text, "codehub_upstream_connections", state="busy") == 0
        assert sample(text, "codehub_upstream_connections", state="idle") == 1
    finally:
        release.set()
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)


async def test_a_client_that_leaves_before_its_answer_is_counted(proxied: MakeProxied) -> None:
    """A fast-lane request whose client went away while it was in flight is counted (as nginx's 499, a 4xx)."""
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        started.set()
        await release.wait()
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/slow", slow)
    p = await proxied(app)
    _, writer = await asyncio.open_connection(p.client.host, p.client.port)
    writer.write(f"GET /slow HTTP/1.1\r\nHost: {p.host}\r\n\r\n".encode())
    await asyncio.wait_for(started.wait(), 10)
    writer.close()
    try:
        for _ in range(100):  # until the gateway saw the client leave (bounded)
            if sample(await p.metrics(), "codehub_requests_total", kind="preview", code="4xx"):
                break
            await asyncio.sleep(0.02)
    finally:
        release.set()
    assert sample(await p.metrics(), "codehub_requests_total", kind="preview", code="4xx") == 1


async def test_the_fast_lane_counts_a_request_under_its_route_kind(proxied: MakeProxied) -> None:
    """A plain GET to the IDE takes the fast lane as a preview's does, and is counted as the IDE's."""
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ide")

    app = web.Application()
    app.router.add_get("/", ok)
    p = await proxied(app, ide=True)
    async with p.request("GET", "/", host=IDE) as response:
        assert response.status == 200
    text = await p.metrics()
    assert sample(text, "codehub_requests_total", kind="ide", code="2xx") == 1
    assert sample(text, "codehub_requests_total", kind="preview", code="2xx") == 0

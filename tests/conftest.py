"""Fixtures every test can use: a gateway built from settings, and real aiohttp upstreams on loopback.

Workspaces in these tests run a real process through the local runtime (``sleep``); the upstream the test
controls listens on the workspace's own loopback address, so the gateway's whole path is exercised.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_runner import BaseRunner

from gateway.config import Config
from gateway.server.app import build_app, build_metrics_app
from gateway.server.fastlane import GatewayRunner
from tests.memory_runtime import MemoryRuntime

_addresses = itertools.count(20)

MakeGateway = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]
MakeUpstream = Callable[[web.Application, str, int], Awaitable[TestServer]]


_NETWORK = 10 + os.getpid() % 240


def next_address() -> str:
    """A loopback address no other test uses, so ports never collide across tests (nor, as the second octet
    follows the process id, across test runs side by side)."""
    n = next(_addresses)
    return f"127.{_NETWORK}.{n // 250}.{n % 250 + 2}"


def workspace(address: str, owner: str = "alice", **extra: Any) -> dict[str, Any]:
    return {"owner": owner, "command": ["sleep", "3600"], "address": address, **extra}


def held_app(path: str = "/") -> tuple[web.Application, asyncio.Event]:
    """An app whose ``path`` answers "ok" only once the event is set: a request held in flight."""
    release = asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get(path, held)
    return app, release


def settings(tmp_path: Path, workspaces: dict[str, Any], **extra: Any) -> Config:
    local = {"state_dir": str(tmp_path / "state"), "workspaces": workspaces, **extra.pop("local", {})}
    data: dict[str, Any] = {"local": local, **extra}
    return Config.model_validate(data)


class GatewayTestServer(TestServer):
    """The app behind the ``FastLaneServer``, as ``serve`` runs it: plain requests take the fast lane."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return GatewayRunner(self.app, **kwargs)


@pytest.fixture
async def make_gateway(aiohttp_client: Any, tmp_path: Path) -> MakeGateway:
    async def make(config: Config | None = None, **kwargs: Any) -> TestClient[web.Request, web.Application]:
        """Settings as keyword arguments; ``policy={...}`` is written to a policy file the gateway loads;
        ``in_memory=True`` keeps the workspaces in a ``MemoryRuntime`` (no processes); ``clock`` measures idleness;
        ``workers``: as one of that many ``serve --workers`` workers."""
        if "policy" in kwargs:
            policy_file = tmp_path / "policy.yaml"
            policy_file.write_text(yaml.safe_dump(kwargs.pop("policy")))
            kwargs["policy_file"] = str(policy_file)
        in_memory = kwargs.pop("in_memory", False)
        clock = kwargs.pop("clock", time.time)
        workers = kwargs.pop("workers", 1)
        if config is None:
            config = settings(tmp_path, kwargs.pop("workspaces", {}), **kwargs)
        runtime = MemoryRuntime(config) if in_memory else None
        client: TestClient[web.Request, web.Application] = await aiohttp_client(
            GatewayTestServer(build_app(config, runtime, clock=clock, workers=workers), handler_cancellation=True)
        )
        return client

    return make


@pytest.fixture
async def make_upstream() -> AsyncIterator[MakeUpstream]:
    servers: list[TestServer] = []

    async def make(app: web.Application, host: str, port: int) -> TestServer:
        server = TestServer(app, host=host, port=port)
        await server.start_server()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.close()


async def scrape(app: web.Application) -> str:
    """A scrape of the metrics listener (``metrics.port``) in front of ``app``'s registry."""
    async with TestClient(TestServer(build_metrics_app(app))) as scraper, scraper.get("/metrics") as response:
        assert response.status == 200
        return await response.text()

"""Memory stays flat while gigabytes pass: a real ``codehub-gateway serve`` process, a real workspace process
running ``stream_upstream.py``, 1 GiB each way and a WebSocket firehose to a slow reader. The gateway's resident
memory is read from /proc before and during each transfer; its growth must stay far below what was moved."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.conftest import next_address
from tests.server.conftest import free_port
from tests.server.stream_upstream import CHUNK, PATTERN

ROOT = Path(__file__).resolve().parents[2]
GIB = 1 << 30
MIB = 1 << 20
LIMIT = 64 * MIB

pytestmark = pytest.mark.timeout(300)


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@dataclass
class Served:
    pid: int
    url: str
    host: str


class PeakRss:
    """The gateway's resident set before a transfer and its highest value while the transfer runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = status_kib(pid, "VmRSS")
        self.peak = self.before
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, status_kib(self.pid, "VmRSS"))
            await asyncio.sleep(0.02)

    async def __aenter__(self) -> PeakRss:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.peak = max(self.peak, status_kib(self.pid, "VmRSS"))

    @property
    def growth(self) -> int:
        return self.peak - self.before

    def report(self, what: str) -> str:
        return (f"{what}: gateway RSS before {self.before / MIB:.1f} MiB, peak {self.peak / MIB:.1f} MiB, "
                f"growth {self.growth / MIB:.1f} MiB (VmHWM {status_kib(self.pid, 'VmHWM') / MIB:.1f} MiB)")


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    address = next_address()
    upstream_port, listen_port = free_port(address), free_port("127.0.0.1")
    config = {
        "listen": {"host": "127.0.0.1", "port": listen_port},
        "hub_url": "http://localhost:8080", "preview_domain": "localhost:8080",  # the Host this test sends
        "local": {"state_dir": str(tmp_path / "state"), "workspaces": {"mem": {
            "owner": "alice", "address": address, "ports": {upstream_port: "public"},
            "command": [sys.executable, str(Path(__file__).with_name("stream_upstream.py")),
                        "--host", "{host}", "--port", str(upstream_port)],
        }}},
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {key: value for key, value in os.environ.items() if not key.startswith("CODEHUB_")}
    env["PYTHONPATH"] = str(ROOT)
    log = (tmp_path / "gateway.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(path), "--log-level", "warning",
        cwd=tmp_path, env=env, stdout=log, stderr=log,
    )
    url = f"http://127.0.0.1:{listen_port}"
    try:
        async with asyncio.timeout(30), aiohttp.ClientSession() as session:
            while True:
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with session.get(f"{url}/healthz") as response:
                        if response.status == 200:
                            break
                assert process.returncode is None, (tmp_path / "gateway.log").read_text()
                await asyncio.sleep(0.05)
        yield Served(process.pid, url, f"{upstream_port}-mem.localhost:8080")
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 20)
            except TimeoutError:
                process.kill()
                await process.wait()
        log.close()


@pytest.fixture
async def session(served: Served) -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
    async with aiohttp.ClientSession(served.url, timeout=timeout, headers={"Host": served.host},
                                     auto_decompress=False) as client:
        async with client.post("/upload", data=b"warm-up") as response:  # wakes the workspace
            assert response.status == 200, await response.text()
        yield client


async def test_1gib_upload_keeps_gateway_memory_flat(served: Served, session: aiohttp.ClientSession) -> None:
    expected = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(GIB // CHUNK):
            expected.update(PATTERN)
            yield PATTERN

    async with PeakRss(served.pid) as rss, session.post("/upload", data=body()) as response:
        assert response.status == 200
        result = await response.json()
    print(rss.report("1 GiB upload"))
    assert result == {"bytes": GIB, "sha256": expected.hexdigest()}
    assert rss.growth < LIMIT, rss.report("1 GiB upload")


async def test_1gib_download_keeps_gateway_memory_flat(served: Served, session: aiohttp.ClientSession) -> None:
    received, digest, expected = 0, hashlib.sha256(), hashlib.sha256()
    async with PeakRss(served.pid) as rss, session.get("/download", params={"size": str(GIB)}) as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(GIB)
        async for chunk in response.content.iter_chunked(CHUNK):
            received += len(chunk)
            digest.update(chunk)
    for _ in range(GIB // CHUNK):
        expected.update(PATTERN)
    print(rss.report("1 GiB download"))
    assert received == GIB
    assert digest.hexdigest() == expected.hexdigest()
    assert rss.growth < LIMIT, rss.report("1 GiB download")


async def test_websocket_firehose_to_a_slow_reader_keeps_gateway_memory_flat(
    served: Served, session: aiohttp.ClientSession
) -> None:
    count = 512
    async with PeakRss(served.pid) as rss, session.ws_connect("/ws", params={"count": str(count), "size": str(MIB)},
                                  max_msg_size=2 * MIB) as ws:
        for _ in range(count):
            message = await ws.receive(timeout=60)
            assert message.type is aiohttp.WSMsgType.BINARY
            assert len(message.data) == MIB
            await asyncio.sleep(0.002)  # a slow reader
        assert (await ws.receive(timeout=60)).type is aiohttp.WSMsgType.CLOSE
    print(rss.report(f"WebSocket {count} MiB to a slow reader"))
    assert rss.growth < LIMIT, rss.report("WebSocket firehose")


async def test_real_server_passes_a_compressed_upload_untouched(served: Served, session: aiohttp.ClientSession
                                                                ) -> None:
    packed = gzip.compress(os.urandom(1 << 16) * 4)
    async with session.post("/upload", data=packed, headers={"Content-Encoding": "gzip"}) as response:
        assert response.status == 200
        assert await response.json() == {"bytes": len(packed), "sha256": hashlib.sha256(packed).hexdigest()}

"""The real ``codehub-gateway serve`` as a process under test: started, asked, killed and restarted.

The gateway runs as ``python -m gateway serve --config FILE`` (the same ``gateway.cli:main`` as the
``codehub-gateway`` script) with this checkout first on ``PYTHONPATH``, so the code under test is the code that
runs. One state folder per test: a restarted gateway finds what the killed one left.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.lifecycle.conftest import PORT, recorded_pgid

REPO = Path(__file__).resolve().parents[2]
CALM: dict[str, float] = {"to_warm": 3600, "to_cold": 3600, "check_every": 60}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Gateway:
    """One ``serve`` process (or ``--workers`` parent) on a loopback port, with its config and log file.

    ``port``: reuse the listen port of a gateway this one replaces (a restart). ``wrap``: argv put before the
    gateway's own (``unshare …`` to give it a mount of its own)."""

    def __init__(self, tmp_path: Path, workspaces: dict[str, Any], idle: dict[str, float] = CALM, *,
                 timeouts: dict[str, float] | None = None, workers: int = 1, port: int | None = None,
                 wrap: Sequence[str] = (), log_level: str = "info") -> None:
        self.port = port or free_port()
        self.state_dir = tmp_path / "state"
        config = {
            "listen": {"host": "127.0.0.1", "port": self.port},
            "hub_url": f"http://localhost:{self.port}",
            "preview_domain": f"localhost:{self.port}",
            "idle": idle,
            "timeouts": {"shutdown": 5, **(timeouts or {})},
            "local": {"state_dir": str(self.state_dir), "workspaces": workspaces},
        }
        self.config_file = tmp_path / f"gateway-{self.port}.yaml"
        self.config_file.write_text(yaml.safe_dump(config))
        self.log = tmp_path / f"gateway-{self.port}.log"
        env = {key: value for key, value in os.environ.items() if not key.startswith("CODEHUB_")}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        argv = [*wrap, sys.executable, "-m", "gateway", "serve", "--config", str(self.config_file),
                "--log-level", log_level]
        if workers != 1:
            argv += ["--workers", str(workers)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        """Until /healthz answers: a gateway recovers interrupted archives before it listens, which on a busy
        machine (a 20,000-file home to delete) took over 30 s."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            with contextlib.suppress(OSError):
                status, _ = self.get("/healthz", host=f"127.0.0.1:{self.port}")
                if status == 200:
                    return
            time.sleep(0.05)
        self.process.kill()  # not yet handed to the fixture that stops it: stop it here
        self.process.wait(10)
        raise AssertionError(f"gateway did not become healthy:\n{self.log.read_text()}")

    def request(self, method: str, path: str, host: str, *, headers: dict[str, str] | None = None,
                timeout: float = 120.0) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, headers={"Host": host, "Accept": "application/json", **(headers or {})})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def get(self, path: str, host: str, timeout: float = 120.0) -> tuple[int, bytes]:
        status, _, body = self.request("GET", path, host, timeout=timeout)
        return status, body

    @property
    def hub(self) -> str:
        return f"localhost:{self.port}"

    def preview_host(self, workspace: str) -> str:
        return f"{PORT}-{workspace}.localhost:{self.port}"

    def sign_in(self, user: str = "alice") -> str:
        """A hub session cookie (dev sign-in), for the management API."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request("POST", "/auth/dev", body=f"user={user}&next=/", headers={
                "Host": self.hub, "Origin": f"http://{self.hub}",
                "Content-Type": "application/x-www-form-urlencoded"})
            response = connection.getresponse()
            response.read()
            cookie = next(value for name, value in response.getheaders()
                          if name.lower() == "set-cookie" and value.startswith("codehub_session="))
            return cookie.partition(";")[0]
        finally:
            connection.close()

    def api(self, method: str, path: str, cookie: str, timeout: float = 60.0) -> tuple[int, Any]:
        status, _, body = self.request(method, f"/api/v1{path}", self.hub, timeout=timeout,
                                       headers={"Cookie": cookie, "Origin": f"http://{self.hub}"})
        return status, json.loads(body) if body else None

    def send_without_waiting(self, workspace: str) -> socket.socket:
        """Start a request and leave it in flight (the gateway is about to be killed under it)."""
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {self.preview_host(workspace)}\r\nAccept: */*\r\n\r\n".encode())
        return sock

    def kill_when(self, condition: Callable[[], bool], what: str) -> None:
        """SIGKILL the gateway the moment ``condition`` holds (polled every millisecond)."""
        deadline = time.monotonic() + 60
        while not condition():
            assert self.process.poll() is None, f"gateway exited before {what}:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, f"never saw {what}:\n{self.log.read_text()}"
            time.sleep(0.001)
        self.kill()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """Start gateways on ``tmp_path``'s state; whatever they left running is killed at the end."""
    started: list[Gateway] = []

    def start(workspaces: dict[str, Any], idle: dict[str, float] = CALM, **options: Any) -> Gateway:
        gateway = Gateway(tmp_path, workspaces, idle, **options)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.close()
    kill_leftovers(tmp_path / "state")


def kill_leftovers(state_dir: Path) -> None:
    """Every workspace process group a killed gateway left running (its run records say which)."""
    for run in (state_dir / "workspaces").glob("*/run.json"):
        with contextlib.suppress(ProcessLookupError, ValueError, KeyError, OSError):
            os.killpg(recorded_pgid(state_dir, run.parent.name), signal.SIGKILL)

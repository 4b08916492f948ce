"""The real ``codehub-gateway serve`` process: killed hard mid-archive or mid-restore it loses nothing, and
stopped with SIGTERM it leaves no workspace process behind.

The gateway runs as ``python -m gateway serve --config FILE`` (the same ``gateway.cli:main`` as the
``codehub-gateway`` script) with this checkout first on ``PYTHONPATH``, so the code under test is the
code that runs.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.lifecycle.archive import archive_home
from tests.conftest import next_address
from tests.lifecycle.conftest import BODY, PORT, fill_home, group_members, recorded_pgid, slow_workspace, snapshot

pytestmark = pytest.mark.timeout(180)
REPO = Path(__file__).resolve().parents[2]
CALM: dict[str, float] = {"to_warm": 3600, "to_cold": 3600, "check_every": 60}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Gateway:
    """One ``serve`` process on a loopback port, with its config and log file."""

    def __init__(self, tmp_path: Path, workspaces: dict[str, Any], idle: dict[str, float]) -> None:
        self.port = _free_port()
        self.state_dir = tmp_path / "state"
        config = {
            "listen": {"host": "127.0.0.1", "port": self.port},
            "hub_url": f"http://localhost:{self.port}",
            "preview_domain": f"localhost:{self.port}",
            "idle": idle,
            "timeouts": {"shutdown": 5},
            "local": {"state_dir": str(self.state_dir), "workspaces": workspaces},
        }
        self.config_file = tmp_path / f"gateway-{self.port}.yaml"
        self.config_file.write_text(yaml.safe_dump(config))
        self.log = tmp_path / f"gateway-{self.port}.log"
        env = {key: value for key, value in os.environ.items() if not key.startswith("CODEHUB_")}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(self.config_file)],
                env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            with contextlib.suppress(OSError):
                status, _ = self.get("/healthz", host=f"127.0.0.1:{self.port}")
                if status == 200:
                    return
            time.sleep(0.05)
        raise AssertionError(f"gateway did not become healthy:\n{self.log.read_text()}")

    def get(self, path: str, host: str, timeout: float = 60.0) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request("GET", path, headers={"Host": host, "Accept": "application/json"})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def preview_host(self, workspace: str) -> str:
        return f"{PORT}-{workspace}.localhost:{self.port}"

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
    started: list[Gateway] = []

    def start(workspaces: dict[str, Any], idle: dict[str, float] = CALM) -> Gateway:
        gateway = Gateway(tmp_path, workspaces, idle)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.close()
    state = tmp_path / "state" / "workspaces"
    for run in state.glob("*/run.json"):  # anything a killed gateway left running
        with contextlib.suppress(ProcessLookupError, ValueError, KeyError):
            os.killpg(recorded_pgid(tmp_path / "state", run.parent.name), signal.SIGKILL)


def _home_and_archive(tmp_path: Path) -> tuple[Path, Path]:
    state = tmp_path / "state"
    return state / "workspaces" / "ws" / "home", state / "archives" / "ws.tar.gz"


def _big_home(home: Path) -> dict[str, tuple[object, ...]]:
    fill_home(home, big=32 << 20, small_files=20000)
    return snapshot(home)


@pytest.mark.parametrize("moment", ["writing", "verifying", "removing-home"])
def test_killed_during_archive_loses_nothing(gateways: Callable[..., Gateway], tmp_path: Path,
                                             moment: str) -> None:
    home, archive = _home_and_archive(tmp_path)
    before = _big_home(home)
    tmp = archive.with_name(archive.name + ".tmp")
    removing = home.with_name("home.removing")
    conditions = {
        "writing": lambda: tmp.exists(),
        "verifying": lambda: archive.exists() and home.exists(),
        "removing-home": lambda: removing.exists(),
    }
    ws = slow_workspace(next_address(), delay=0)
    eager = {"to_warm": 0.1, "to_cold": 0.1, "check_every": 0.05}  # WARM at start → archived at once

    gateways({"ws": ws}, eager).kill_when(conditions[moment], moment)

    assert conditions[moment](), "the gateway was killed at the intended moment"
    gateway = gateways({"ws": ws})
    assert not tmp.exists()
    assert not removing.exists()
    assert home.exists() != archive.exists(), "exactly WARM (home) or exactly COLD (archive)"
    status, body = gateway.get("/", gateway.preview_host("ws"))
    assert (status, body.decode()) == (200, BODY)
    assert snapshot(home) == before
    assert not archive.exists()


def test_killed_during_restore_loses_nothing(gateways: Callable[..., Gateway], tmp_path: Path) -> None:
    home, archive = _home_and_archive(tmp_path)
    before = _big_home(home)
    archive_home(home, archive)
    restoring = home.with_name("home.restoring")
    ws = slow_workspace(next_address(), delay=0)
    gateway = gateways({"ws": ws})

    with gateway.send_without_waiting("ws"):
        gateway.kill_when(restoring.exists, "the restore")

    assert restoring.exists()
    gateway = gateways({"ws": ws})
    assert not restoring.exists()
    assert archive.exists()
    assert not home.exists()
    status, body = gateway.get("/", gateway.preview_host("ws"))
    assert (status, body.decode()) == (200, BODY)
    assert snapshot(home) == before
    assert not archive.exists()


def test_sigterm_stops_every_workspace_process_group(gateways: Callable[..., Gateway], tmp_path: Path) -> None:
    gateway = gateways({"a": slow_workspace(next_address(), delay=0, child=True),
                        "b": slow_workspace(next_address(), delay=0, child=True)})
    for name in ("a", "b"):
        status, _ = gateway.get("/", gateway.preview_host(name))
        assert status == 200
    groups = [recorded_pgid(gateway.state_dir, name) for name in ("a", "b")]
    assert all(len(group_members(pgid)) >= 2 for pgid in groups)  # the server and its grandchild

    assert gateway.terminate() == 0

    assert [group_members(pgid) for pgid in groups] == [[], []]
    assert not list(gateway.state_dir.glob("workspaces/*/run.json"))


def test_restart_after_sigkill_kills_the_orphaned_group(gateways: Callable[..., Gateway]) -> None:
    ws = slow_workspace(next_address(), delay=0, child=True)
    gateway = gateways({"ws": ws})
    assert gateway.get("/", gateway.preview_host("ws"))[0] == 200
    pgid = recorded_pgid(gateway.state_dir, "ws")
    gateway.kill_when(lambda: True, "nothing")
    deadline = time.monotonic() + 10  # the leader leaves on its parent-death SIGTERM; its grandchild stays
    while Path(f"/proc/{pgid}").exists() and time.monotonic() < deadline:  # exited and reaped
        time.sleep(0.02)
    assert not Path(f"/proc/{pgid}").exists()
    assert group_members(pgid), "the grandchild is still running in the orphaned group"

    restarted = gateways({"ws": ws})

    deadline = time.monotonic() + 10
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert group_members(pgid) == []
    assert restarted.get("/", restarted.preview_host("ws"))[0] == 200

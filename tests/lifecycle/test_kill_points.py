"""``kill -9`` of the gateway at seeded random moments while its local workspaces wake, stop and archive: after
every restart each workspace is in a phase its files explain (WARM: the home, exactly as it was; COLD: a
verified archive and no home), nothing half-done is left, and nothing the killed gateway started still runs.

Fifty kill points, one per gateway: even ones kill a single ``serve`` process, odd ones the parent of
``serve --workers 2`` (which owns the workspaces; its workers die with it). The state folder is shared, so each
gateway recovers what the previous one was killed in the middle of. Three workspaces each get a random
operation per point — wake (from WARM, or restoring from COLD), archive, or stop/archive of a running one — and
the kill comes a random 0–1 s later; every fifth point waits instead for an archive or restore to show on disk
and kills within 50 ms of that, so every stage is hit however fast the machine is. A failure names the seed and
the point, so it can be replayed.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.lifecycle.archive import verify_archive
from tests.conftest import next_address
from tests.lifecycle.conftest import BODY, fill_home, group_members, slow_workspace, snapshot
from tests.lifecycle.gateway_process import Gateway, gateways

pytestmark = pytest.mark.timeout(900)
__all__ = ["gateways"]  # the fixture, used by name
SEED = 15
KILLS = 50
WINDOW = 1.0
OPERATIONS = {"WARM": ("wake", "archive", "run+stop", "run+archive"), "COLD": ("wake",)}


@dataclass
class Home:
    """One workspace's files and what its home must hold whenever it is there."""

    name: str
    state: Path

    @property
    def home(self) -> Path:
        return self.state / "workspaces" / self.name / "home"

    @property
    def archive(self) -> Path:
        return self.state / "archives" / f"{self.name}.tar.gz"

    def leftovers(self) -> list[Path]:
        return [*self.home.parent.glob("home.*"), *self.archive.parent.glob(f"{self.name}.tar.gz.*")]

    def stage(self) -> str | None:
        """What the files say an interrupted archive or restore was doing, if anything."""
        if self.archive.with_name(self.archive.name + ".tmp").exists():
            return "archive: writing or verifying"
        if self.home.with_name("home.removing").exists():
            return "archive: removing the home"
        if self.home.with_name("home.restoring").exists():
            return "restore: unpacking"
        if self.home.exists() and self.archive.exists():
            return "archive: renamed, the home not yet moved; or restore: deleting the archive"
        return None


def _send(gateway: Gateway, request: str) -> socket.socket:
    """Send a request and leave it in flight: the gateway is killed under it."""
    sock = socket.create_connection(("127.0.0.1", gateway.port))
    sock.sendall(request.encode())
    return sock


def _start(gateway: Gateway, workspace: str, operation: str, cookie: str) -> socket.socket:
    if operation == "wake":  # a held request, as a visitor's first one
        return _send(gateway, f"GET / HTTP/1.1\r\nHost: {gateway.preview_host(workspace)}\r\nAccept: */*\r\n\r\n")
    return _send(gateway, f"POST /api/v1/workspaces/{workspace}/{operation} HTTP/1.1\r\nHost: {gateway.hub}\r\n"
                          f"Cookie: {cookie}\r\nOrigin: http://{gateway.hub}\r\nContent-Length: 0\r\n\r\n")


def _phases(gateway: Gateway, cookie: str) -> dict[str, str]:
    status, body = gateway.api("GET", "/workspaces", cookie)
    assert status == 200, body
    return {view["id"]: view["phase"] for view in body["workspaces"]}


def _consistent(gateway: Gateway, homes: list[Home], before: dict[str, object], where: str) -> dict[str, str]:
    phases = _phases(gateway, gateway.sign_in())
    for home in homes:
        phase = phases[home.name]
        assert home.leftovers() == [], f"{where}: {home.name} left {home.leftovers()}"
        if phase == "WARM":
            assert not home.archive.exists(), f"{where}: {home.name} is WARM beside an archive"
            assert snapshot(home.home) == before[home.name], f"{where}: {home.name}'s home changed"
        else:
            assert phase == "COLD", f"{where}: {home.name} is {phase} after a restart"
            assert not home.home.exists(), f"{where}: {home.name} is COLD beside a home"
            verify_archive(home.archive)
    return phases


def _processes(gateway: Gateway) -> list[int]:
    """The gateway and its workers (not the workspaces: they have sessions of their own)."""
    pids = [gateway.process.pid]
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            if (entry.name.isdigit() and int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == pids[0]
                    and b"gateway.serving" in (entry / "cmdline").read_bytes()):
                pids.append(int(entry.name))
    return pids


def _gone(pids: list[int], groups: list[int], within: float = 30.0) -> bool:
    """Wait (bounded) until none of ``pids`` runs and no process is left in ``groups``."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        running = [pid for pid in pids if Path(f"/proc/{pid}").exists()
                   and Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"]
        if not running and not any(group_members(pgid) for pgid in groups):
            return True
        time.sleep(0.05)
    return False


def _woken(gateway: Gateway) -> Callable[[str], tuple[int, bytes]]:
    return lambda name: gateway.get("/", gateway.preview_host(name))


def _recorded_groups(homes: list[Home]) -> list[int]:
    groups = []
    for home in homes:
        with contextlib.suppress(OSError, ValueError, KeyError):
            groups.append(int(json.loads((home.home.parent / "run.json").read_text())["pgid"]))
    return groups


def test_killed_at_seeded_random_points_loses_nothing(gateways: Callable[..., Gateway], tmp_path: Path) -> None:
    rng = random.Random(SEED)
    state = tmp_path / "state"
    homes = [Home(name, state) for name in ("a", "b", "c")]
    before: dict[str, object] = {}
    for home in homes:
        fill_home(home.home, big=2 << 20, small_files=200)
        before[home.name] = snapshot(home.home)
    workspaces = {home.name: slow_workspace(next_address(), delay=0) for home in homes}
    stages: Counter[str] = Counter()
    killed: list[int] = []
    groups: list[int] = []
    pool = ThreadPoolExecutor(len(homes))
    try:
        for point in range(KILLS):
            where = f"seed {SEED}, kill point {point}"
            gateway = gateways(workspaces, workers=1 + point % 2)
            phases = _consistent(gateway, homes, before, where)
            assert _gone(killed, groups), f"{where}: the killed gateways' processes still run"
            cookie = gateway.sign_in()
            plan = {home.name: rng.choice(OPERATIONS[phases[home.name]]) for home in homes}
            if point % 5 == 4:  # make sure an archive or a restore is under way
                plan["a"] = "wake" if phases["a"] == "COLD" else "archive"
            running = [name for name, op in plan.items() if op.startswith("run+")]
            for status, body in pool.map(_woken(gateway), running):
                assert (status, body.decode()) == (200, BODY), f"{where}: {status} {body[:200]!r}"
            sockets = [_start(gateway, name, op.removeprefix("run+"), cookie) for name, op in plan.items()]
            if point % 5 == 4:
                deadline = time.monotonic() + 20
                while homes[0].stage() is None and time.monotonic() < deadline:
                    time.sleep(0.001)
                time.sleep(rng.uniform(0, 0.05))
            else:
                time.sleep(rng.uniform(0, WINDOW))
            stages.update(stage for home in homes if (stage := home.stage()) is not None)
            processes = _processes(gateway)
            gateway.kill()
            killed += processes
            groups += _recorded_groups(homes)
            for sock in sockets:
                sock.close()
        gateway = gateways(workspaces)
        _consistent(gateway, homes, before, "after the last kill")
        assert _gone(killed, groups), "the killed gateways' processes still run"
        for home in homes:
            status, body = gateway.get("/", gateway.preview_host(home.name))
            assert (status, body.decode()) == (200, BODY)
            assert snapshot(home.home) == before[home.name]
            assert not home.archive.exists()
    finally:
        pool.shutdown()
    print(f"interrupted, as the files showed at the kill: {dict(stages)}")
    assert stages["archive: writing or verifying"] + stages["restore: unpacking"] > 0, stages

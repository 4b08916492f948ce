"""The real ``codehub-gateway serve`` process: killed hard mid-archive or mid-restore it loses nothing, and
stopped with SIGTERM it leaves no workspace process behind."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.lifecycle.archive import archive_home
from tests.conftest import next_address
from tests.lifecycle.conftest import BODY, fill_home, group_members, recorded_pgid, slow_workspace, snapshot
from tests.lifecycle.gateway_process import Gateway, gateways

pytestmark = pytest.mark.timeout(180)
__all__ = ["gateways"]  # the fixture, used by name


def _home_and_archive(tmp_path: Path) -> tuple[Path, Path]:
    state = tmp_path / "state"
    return state / "workspaces" / "ws" / "home", state / "archives" / "ws.tar.gz"


def _big_home(home: Path) -> dict[str, tuple[object, ...]]:
    fill_home(home, big=32 << 20, small_files=20000)
    return snapshot(home)


@pytest.mark.parametrize("moment", ["writing", "removing-home"])  # writing: or verifying, the same files
def test_killed_during_archive_loses_nothing(gateways: Callable[..., Gateway], tmp_path: Path,
                                             moment: str) -> None:
    home, archive = _home_and_archive(tmp_path)
    before = _big_home(home)
    tmp = archive.with_name(archive.name + ".tmp")
    removing = home.with_name("home.removing")
    conditions = {
        "writing": lambda: tmp.exists(),
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

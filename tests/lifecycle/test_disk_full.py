"""A disk that fills up while a home is archived: the archive fails cleanly (nothing half-written is left), the
home stays as it was, the workspace stays WARM and wakes as usual, and the operator sees why — one log line, and
the workspace's message in the API.

The full disk is real: the gateway runs in a mount namespace of its own (``unshare --mount``) where its
archives folder is a 1 MiB tmpfs, and the home holds 4 MiB that do not compress. The mount goes with the
process; the test looks into it through ``/proc/PID/root``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.lifecycle import LifecycleError, Phase
from gateway.lifecycle.idle import IdleTimers, idle_action
from gateway.lifecycle.local import LocalRuntime
from tests.conftest import next_address, settings, workspace
from tests.lifecycle.conftest import BODY, fill_home, slow_workspace, snapshot
from tests.lifecycle.gateway_process import Gateway, gateways

pytestmark = pytest.mark.timeout(120)
__all__ = ["gateways"]  # the fixture, used by name


def _full_disk_at(folder: Path) -> list[str]:
    """argv that starts the gateway with a 1 MiB tmpfs mounted on ``folder``, seen by the gateway alone."""
    unshare = shutil.which("unshare")
    assert unshare is not None, "util-linux's unshare is part of the base system"
    script = f'mount -t tmpfs -o size=1m codehub-full "{folder}" && exec "$0" "$@"'
    return [unshare, "--mount", "--propagation", "private", "sh", "-c", script]


def test_disk_full_while_archiving_keeps_the_home_and_the_workspace_warm(gateways: Callable[..., Gateway],
                                                                         tmp_path: Path) -> None:
    state = tmp_path / "state"
    home, archives = state / "workspaces" / "ws" / "home", state / "archives"
    fill_home(home, big=4 << 20, small_files=50)
    before = snapshot(home)
    archives.mkdir(parents=True)
    gateway = gateways({"ws": slow_workspace(next_address(), delay=0)}, wrap=_full_disk_at(archives))
    inside = Path(f"/proc/{gateway.process.pid}/root{archives}")
    cookie = gateway.sign_in()

    status, answer = gateway.api("POST", "/workspaces/ws/archive", cookie)

    assert status == 503, answer
    assert answer["error"]["code"] == "workspace-failed"
    assert "No space left on device" in answer["error"]["message"]
    status, workspace = gateway.api("GET", "/workspaces/ws", cookie)
    assert status == 200
    assert workspace["phase"] == "WARM"
    assert "No space left on device" in workspace["message"]
    assert list(inside.iterdir()) == []  # the partial archive is gone, the space given back
    assert snapshot(home) == before
    assert not list(home.parent.glob("home.*"))
    log = gateway.log.read_text()
    assert log.count("archive of ws failed") == 1, log
    assert "No space left on device" in log
    assert "Traceback" not in log

    status, body = gateway.get("/", gateway.preview_host("ws"))
    assert (status, body.decode()) == (200, BODY)
    status, workspace = gateway.api("GET", "/workspaces/ws", cookie)
    assert (workspace["phase"], workspace["message"]) == ("RUNNING", "")


async def test_a_failed_archive_starts_the_idle_clock_again(tmp_path: Path) -> None:
    """The reaper tries a failed archive again only after another ``idle.to_cold``: on a full disk every try
    would fill it up again (and every other workspace's writes would fail meanwhile)."""
    config = settings(tmp_path, {"ws": workspace(next_address())})
    runtime = LocalRuntime(config.local)
    await runtime.start()
    try:
        fill_home(tmp_path / "state" / "workspaces" / "ws" / "home", big=1 << 10, small_files=3)
        archives = tmp_path / "state" / "archives"
        archives.rmdir()
        archives.write_text("a file where the archives folder should be")
        warm = await runtime.status("ws")
        timers = IdleTimers(to_warm=60, to_cold=60, check_every=1)
        assert idle_action(warm.phase, time.time() + 61 - warm.since, timers) is Phase.COLD

        with pytest.raises(LifecycleError, match="its home is kept"):
            await runtime.archive("ws")

        after = await runtime.status("ws")
        assert after.phase is Phase.WARM
        assert after.message.startswith("The last archive failed, the home is kept: ")
        assert after.since > warm.since
        assert idle_action(after.phase, time.time() + 1 - after.since, timers) is None
    finally:
        await runtime.close()

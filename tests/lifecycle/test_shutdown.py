"""When the app shuts down, every workspace process group it started is gone: grandchildren, processes that
ignore SIGTERM, and workspaces caught in the middle of a wake."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.lifecycle import Phase
from gateway.lifecycle.local import LocalRuntime, dies_with
from tests.conftest import MakeGateway, next_address, settings, workspace
from tests.lifecycle.conftest import API, gateway_of, group_members, preview, recorded_pgid, slow_workspace, wait_gone

pytestmark = pytest.mark.timeout(60)


async def test_shutdown_stops_every_process_group(make_gateway: MakeGateway, tmp_path: Path) -> None:
    stubborn = workspace(next_address(), command=["sh", "-c", "trap '' TERM; sleep 3600 & wait"])
    client = await make_gateway(
        workspaces={"a": slow_workspace(next_address(), delay=0, child=True), "stubborn": stubborn},
        local={"stop_timeout": 1},
    )
    assert (await client.get("/", headers={"Host": preview("a"), **API})).status == 200
    assert (await gateway_of(client).runtime.wake("stubborn")).phase is Phase.RUNNING
    groups = [recorded_pgid(tmp_path / "state", name) for name in ("a", "stubborn")]
    async with asyncio.timeout(10):  # the shell may not have forked its sleep yet
        while not all(len(group_members(pgid)) >= 2 for pgid in groups):  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    await client.close()

    for pgid in groups:
        await wait_gone(pgid, within=5)
    assert not list((tmp_path / "state").glob("workspaces/*/run.json"))


async def test_shutdown_during_a_wake_leaves_nothing_running(make_gateway: MakeGateway, tmp_path: Path) -> None:
    client = await make_gateway(workspaces={"ws": slow_workspace(next_address(), delay=3600, child=True)})
    held = asyncio.ensure_future(client.get("/", headers={"Host": preview("ws"), **API}))
    run = tmp_path / "state" / "workspaces" / "ws" / "run.json"
    async with asyncio.timeout(10):
        while not run.exists():  # noqa: ASYNC110 - the process record is the sign the wake has begun
            await asyncio.sleep(0.02)
    pgid = recorded_pgid(tmp_path / "state", "ws")

    await client.close()

    await wait_gone(pgid, within=15)
    held.cancel()
    await asyncio.gather(held, return_exceptions=True)


@pytest.mark.parametrize(("parent", "code", "output"), [("ours", 0, "ran\n"), ("gone", 1, "")])
def test_a_child_whose_gateway_died_before_it_asked_to_die_with_it_never_runs(parent: str, code: int,
                                                                              output: str) -> None:
    """The window between fork and the PDEATHSIG request: a gateway killed there (seen in test_kill_points) left its
    workspace running untracked. ``gone`` stands for a parent that died in the window (any pid that is not ours)."""
    pid = os.getpid() if parent == "ours" else os.getpid() + 1_000_000
    done = subprocess.run([sys.executable, "-c", "print('ran')"], preexec_fn=dies_with(pid),
                          capture_output=True, text=True, timeout=30, check=False)
    assert (done.returncode, done.stdout) == (code, output)


def test_a_child_started_to_die_with_its_parent_ends_when_that_parent_is_killed() -> None:
    """The kernel's parent-death signal: a gateway killed outright (``kill -9``, the OOM killer) runs no clean-up,
    and its workspaces would run on, untracked, until the next start found their records."""
    parent = subprocess.Popen(
        [sys.executable, "-c", "import os, subprocess, time\n"
         "from gateway.lifecycle.local import dies_with\n"
         "child = subprocess.Popen(['sleep', '600'], preexec_fn=dies_with(os.getpid()))\n"
         "print(child.pid, flush=True)\n"
         "time.sleep(600)\n"],
        stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not alive(child)
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)


ESCAPES = ("import subprocess, sys, time\n"
           "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
           "open('escaped.tmp', 'w').write(str(child.pid))\n"
           "__import__('os').replace('escaped.tmp', 'escaped')\n"
           "time.sleep(600)\n")
"""A workspace command that starts a process in a session (and process group) of its own, as ``setsid``, a
daemonising server or tmux would, and writes its pid to ``escaped`` in the home."""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


async def escaped_pid(home: Path) -> int:
    async with asyncio.timeout(10):
        while not (home / "escaped").exists():  # noqa: ASYNC110 - the workspace writes it once its child runs
            await asyncio.sleep(0.02)
    return int((home / "escaped").read_text())


async def wait_dead(pid: int, within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while alive(pid):  # noqa: ASYNC110 - /proc offers nothing to wait on
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("how", ["stop", "archive", "gateway-close", "workspace-exits"])
async def test_a_process_in_a_session_of_its_own_ends_with_its_workspace(make_gateway: MakeGateway, tmp_path: Path,
                                                                        how: str) -> None:
    """README, "When things die": nothing the gateway started keeps running. A process that left the workspace's
    process group is still the workspace's: it carries the workspace's marker in its environment."""
    command = [sys.executable, "-c", ESCAPES.replace("time.sleep(600)\n", "time.sleep(1)\n")
               if how == "workspace-exits" else ESCAPES]
    client = await make_gateway(workspaces={"a": workspace(next_address(), command=command)})
    runtime = gateway_of(client).runtime
    await runtime.wake("a")
    pid = await escaped_pid(tmp_path / "state" / "workspaces" / "a" / "home")
    try:
        if how == "stop":
            await runtime.stop("a")
        elif how == "archive":
            await runtime.archive("a")
        elif how == "gateway-close":
            await client.close()
        await wait_dead(pid)
    finally:
        if alive(pid):  # what the gateway left: the test's to end
            os.kill(pid, signal.SIGKILL)


async def test_a_process_in_a_session_of_its_own_left_by_a_dead_gateway_ends_at_the_next_start(tmp_path: Path) -> None:
    """The gateway died without stopping anything (``kill -9``): the next one, finding the run record, ends the
    workspace's escaped processes too."""
    config = settings(tmp_path, {"a": workspace(next_address(), command=[sys.executable, "-c", ESCAPES])})
    dead = LocalRuntime(config.local)  # stands for the gateway that was killed: never closed
    await dead.start()
    await dead.wake("a")
    pid = await escaped_pid(tmp_path / "state" / "workspaces" / "a" / "home")
    try:
        await LocalRuntime(config.local).start()
        await wait_dead(pid)
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
        await dead.close()

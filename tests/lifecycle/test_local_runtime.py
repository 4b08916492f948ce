"""The local runtime on its own, without a gateway in front: what a workspace process is given when it starts, how it
is ended, what a gateway that died left behind, and what the runtime remembers of a workspace (its owner, its
sharing settings, its state) between starts and between gateways.

Every workspace here is a real process on its own loopback address; ``LocalRuntime`` is driven directly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import NotFound
from gateway.lifecycle import Phase, WorkspaceState
from gateway.lifecycle.local import LocalRuntime, signal_marked
from tests.conftest import next_address, settings, workspace
from tests.lifecycle.conftest import PORT, group_members, slow_workspace, wait_gone

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]


@asynccontextmanager
async def running(tmp_path: Path, workspaces: dict[str, Any], *, stop_timeout: float = 10.0,
                  proxy_uri: Callable[[str], str] | None = None) -> AsyncIterator[LocalRuntime]:
    """A started runtime for ``workspaces``, closed (its processes ended) at the end."""
    runtime = LocalRuntime(settings(tmp_path, workspaces).local, stop_timeout=stop_timeout, proxy_uri=proxy_uri)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.close()


def folder(tmp_path: Path, name: str = "ws") -> Path:
    return tmp_path / "state" / "workspaces" / name


async def written(home: Path, name: str, within: float = 10.0) -> str:
    """The text of ``name`` in ``home`` once the workspace has written it (it writes elsewhere, then renames)."""
    async with asyncio.timeout(within):
        while not (home / name).exists():  # noqa: ASYNC110 - the workspace process writes it when it gets there
            await asyncio.sleep(0.02)
    return (home / name).read_text()


async def until(runtime: LocalRuntime, name: str, phase: Phase, within: float = 10.0) -> WorkspaceState:
    """The workspace's state once it reaches ``phase`` by itself (its process exits), from the runtime's events."""
    with runtime.events() as events:
        state = await runtime.status(name)
        async with asyncio.timeout(within):
            while state.phase is not phase:
                await anext(events)
                state = await runtime.status(name)
    return state


# --- what a workspace process is given -------------------------------------------------------------------------

REPORT = ("import json, os, sys, time\n"
          "json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd(), 'env': dict(os.environ)}, open('report.tmp', 'w'))\n"
          "os.replace('report.tmp', 'report.json')\n"
          "time.sleep(600)\n")
"""A workspace program that reports its arguments, folder and environment in ``report.json`` (in its folder)."""


@pytest.mark.parametrize("proxied", [True, False])
async def test_a_workspace_runs_its_command_in_its_home_with_an_environment_of_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, proxied: bool) -> None:
    """The gateway's own ``CODEHUB_*`` settings (its signing keys among them) never reach a workspace; what the
    workspace's ``env`` sets does, except the names the runtime itself gives (its home, its address, its name)."""
    monkeypatch.setenv("CODEHUB_AUTH__SECRET", "the gateway's, not the workspace's")
    monkeypatch.setenv("PASSED_ON", "from the gateway's environment")
    monkeypatch.setenv("CODEHUBS", "not a setting of the gateway: its names begin CODEHUB_")
    monkeypatch.delenv("VSCODE_PROXY_URI", raising=False)
    address = next_address()
    program = tmp_path / "report.py"  # a file: the command's braces are the template's
    program.write_text(REPORT)
    command = [sys.executable, str(program), "{host}", "{home}", "{ide_port}", "{workspace}"]
    ws = workspace(address, command=command, ide_port=13400,
                   env={"FROM_CONFIG": "yes", "HOME": "/not/its/home", "HOST": "0.0.0.0"})
    proxy_uri = (lambda name: f"https://ide-{name}.example/proxy/{{{{port}}}}/") if proxied else None
    async with running(tmp_path, {"ws": ws}, proxy_uri=proxy_uri) as runtime:
        assert (await runtime.wake("ws")).phase is Phase.RUNNING
        home = folder(tmp_path) / "home"
        report = json.loads(await written(home, "report.json"))
        run = json.loads((folder(tmp_path) / "run.json").read_text())

    assert report["argv"] == [address, str(home), "13400", "ws"]
    assert report["cwd"] == str(home)
    env = report["env"]
    assert (env["HOME"], env["HOST"], env["CODEHUB_WORKSPACE"]) == (str(home), address, "ws")
    assert env["CODEHUB_RUN"] == run["mark"]
    assert (env["FROM_CONFIG"], env["PASSED_ON"]) == ("yes", "from the gateway's environment")
    assert env["CODEHUBS"] == "not a setting of the gateway: its names begin CODEHUB_"
    assert "CODEHUB_AUTH__SECRET" not in env
    assert env.get("VSCODE_PROXY_URI") == ("https://ide-ws.example/proxy/{{port}}/" if proxied else None)


async def test_each_start_of_each_workspace_has_a_mark_of_its_own(tmp_path: Path) -> None:
    """A stop ends every process carrying the start's mark: a mark shared with another start (an empty one, say,
    were marks not drawn afresh) would end that workspace's processes too."""
    async with running(tmp_path, {"a": workspace(next_address()), "b": workspace(next_address())}) as runtime:
        marks = []
        for name in ("a", "b", "a"):
            await runtime.wake(name)
            marks.append(json.loads((folder(tmp_path, name) / "run.json").read_text())["mark"])
            await runtime.stop(name)
    assert len(set(marks)) == 3
    assert all(marks)


# --- a workspace whose process ends by itself ------------------------------------------------------------------

LONG = "".join(chr(ord("a") + i % 26) for i in range(300))


@pytest.mark.parametrize(
    ("output", "shown"),
    [
        (b"", ""),
        (b"boom\n", ": boom"),  # the whole output is the last line, from its first character
        (f"starting\nport 8000 in use\n{LONG}\n".encode(), f": {LONG[:200]}"),  # the last line only, cut at 200
        # only the log's tail is read (a workspace may have written gigabytes): a longer line shows its end
        (b"x" * 600 + b"y" * 600 + b"\n", f": {'y' * 200}"),
        (b"\xff\xfe boom\n", ": \ufffd\ufffd boom"),  # what is not UTF-8 is shown as such, not a reason to say nothing
    ],
)
async def test_a_workspace_whose_process_exits_fails_with_its_code_and_its_last_line(
        tmp_path: Path, output: bytes, shown: str) -> None:
    command = [sys.executable, "-c", f"import sys; sys.stdout.buffer.write({output!r}); sys.exit(3)"]
    async with running(tmp_path, {"ws": workspace(next_address(), command=command)}) as runtime:
        await runtime.wake("ws")
        state = await until(runtime, "ws", Phase.FAILED)

        assert state.message == f"the workspace process exited with code 3{shown}"
        assert state.address is None
        assert not (folder(tmp_path) / "run.json").exists()
        assert runtime.listening_ports("ws") == set()
        with runtime.events() as events:
            assert (await runtime.stop("ws")).phase is Phase.WARM, "a stop clears the failure"
            assert [events.queue.get_nowait().phase for _ in range(events.queue.qsize())] == [Phase.WARM], \
                "there is no process left to stop"
        assert (await runtime.status("ws")).message == ""


async def test_a_command_that_cannot_start_fails_and_says_why_until_stopped(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    missing = str(tmp_path / "no-such-program")
    async with running(tmp_path, {"ws": workspace(next_address(), command=[missing])}) as runtime:
        with runtime.events() as events:
            state = await runtime.wake("ws")
            seen = [events.queue.get_nowait() for _ in range(events.queue.qsize())]

        assert state.phase is Phase.FAILED
        assert state.message.startswith("the workspace command could not start: ")
        assert missing in state.message
        assert [(event.phase, event.message) for event in seen] == [
            (Phase.STARTING, "starting the workspace"), (Phase.FAILED, state.message)]
        assert (await runtime.status("ws")).phase is Phase.FAILED, "it stays failed: nothing is retried by itself"
        [said] = [record for record in caplog.records if "workspace ws failed" in record.getMessage()]
        assert logging.Formatter().format(said) == said.getMessage(), "a foreseen failure is one line, no traceback"
        stopped = await runtime.stop("ws")
        assert (stopped.phase, stopped.message) == (Phase.WARM, "")


@pytest.mark.parametrize("ends", ["by itself", "stopped"])
async def test_a_workspace_that_removed_its_run_record_still_ends_as_it_should(tmp_path: Path, ends: str) -> None:
    """A workspace runs as the gateway's user, so it can reach the files of its folder next to its home: one that
    removed its run record still fails with its exit code, or stops, rather than breaking off what the runtime does
    when it ends."""
    command = ["sh", "-c", "while [ ! -e ../run.json ]; do sleep 0.01; done; rm ../run.json; touch removed; "
               + ("exit 3" if ends == "by itself" else "exec sleep 600")]
    async with running(tmp_path, {"ws": workspace(next_address(), command=command)}) as runtime:
        await runtime.wake("ws")
        await written(folder(tmp_path) / "home", "removed")
        if ends == "by itself":
            assert (await until(runtime, "ws", Phase.FAILED)).message == "the workspace process exited with code 3"
        else:
            assert (await runtime.stop("ws")).phase is Phase.WARM


async def test_a_workspace_whose_process_exited_is_not_running_while_the_runtime_ends_what_it_left(
        tmp_path: Path) -> None:
    """Ending what is left of its processes after an exit waits for one of the gateway's worker threads, which may
    all be busy (archives and restores of other workspaces): meanwhile the workspace is not RUNNING, so requests are
    not sent on to an address where nothing listens, and a wake starts it instead of answering that it runs."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=1))
    busy = threading.Event()
    command = ["sh", "-c", "exit 3"]
    async with running(tmp_path, {"ws": workspace(next_address(), command=command)}) as runtime:
        taken = loop.run_in_executor(None, busy.wait)  # the one worker thread, busy until the test is done
        try:
            state = await runtime.wake("ws")
            async with asyncio.timeout(10):
                while state.phase is Phase.RUNNING:
                    await asyncio.sleep(0.02)
                    state = await runtime.status("ws")
            assert state.address is None
        finally:
            busy.set()
            await taken
        assert (await until(runtime, "ws", Phase.FAILED)).message == "the workspace process exited with code 3"


# --- ending a workspace ------------------------------------------------------------------------------------------

CLEAN_STOP = """\
import os, signal, subprocess, sys, time
def stop_cleanly(name, work):
    def handler(*_):
        time.sleep(work)  # what a clean shutdown does
        open(name, 'w').close()
        sys.exit(0)
    signal.signal(signal.SIGTERM, handler)
role = sys.argv[1] if len(sys.argv) > 1 else 'start'
if role == 'start':
    subprocess.Popen([sys.executable, __file__, 'escaped'], start_new_session=True)
    os.execve(sys.executable, [sys.executable, __file__, 'bare'], {})
stop_cleanly(role + '-stopped', 1.0 if role == 'bare' else 0)
open(role + '.tmp', 'w').write(str(os.getpid()))
os.replace(role + '.tmp', role)
time.sleep(600)
"""
"""A workspace that ends cleanly on SIGTERM, taking a moment to, as does (at once) a process it starts in a session of
its own (``escaped``); the group leader then runs on with an empty environment (``bare``), without the workspace's
mark. A stop waits ``stop_timeout`` for the leader only: the rest is killed once it has gone."""


async def test_stop_lets_every_process_of_a_workspace_end_cleanly(tmp_path: Path) -> None:
    """SIGTERM reaches the process group (the mark may be gone from a process's environment) and every process
    with the mark (it may have left the group); SIGKILL comes only after ``stop_timeout``."""
    script = tmp_path / "clean_stop.py"
    script.write_text(CLEAN_STOP)
    home = folder(tmp_path) / "home"
    async with running(tmp_path, {"ws": workspace(next_address(), command=[sys.executable, str(script)])},
                       stop_timeout=20) as runtime:
        await runtime.wake("ws")
        await written(home, "escaped")
        await written(home, "bare")
        pgid = json.loads((folder(tmp_path) / "run.json").read_text())["pgid"]

        with runtime.events() as events:
            stopped = await runtime.stop("ws")
            seen = [events.queue.get_nowait() for _ in range(events.queue.qsize())]

        assert stopped.phase is Phase.WARM
        assert [(event.phase, event.message) for event in seen] == [
            (Phase.STOPPING, "stopping the workspace"), (Phase.WARM, "")], "its exit is the stop's, not a failure"
        assert (home / "bare-stopped").exists(), "the group leader, its mark gone, was ended before its time"
        assert (home / "escaped-stopped").exists(), "the escaped process was ended before its time"
        assert not (folder(tmp_path) / "run.json").exists()
        assert group_members(pgid) == []


async def test_stop_ends_every_process_of_a_workspace_that_ignores_sigterm(tmp_path: Path) -> None:
    """After ``stop_timeout``, SIGKILL goes to the group (a process there may have shed the mark) and to every
    process with the mark (one may have left the group)."""
    script = tmp_path / "stubborn.py"
    script.write_text(CLEAN_STOP.replace("signal.signal(signal.SIGTERM, handler)",
                                         "signal.signal(signal.SIGTERM, signal.SIG_IGN)"))
    home = folder(tmp_path) / "home"
    async with running(tmp_path, {"ws": workspace(next_address(), command=[sys.executable, str(script)])},
                       stop_timeout=0.5) as runtime:
        await runtime.wake("ws")
        escaped = int(await written(home, "escaped"))
        bare = int(await written(home, "bare"))
        try:
            assert (await runtime.stop("ws")).phase is Phase.WARM
            await wait_gone(bare)
            await wait_gone(escaped)  # the leader of a group of its own
        finally:
            for pid in (bare, escaped):
                if group_members(pid):  # what the runtime left: the test's to end
                    os.killpg(pid, signal.SIGKILL)


# --- what a gateway that died left running -----------------------------------------------------------------------

def start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/PID/stat, field 22): a pid reused later differs."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]


def leftover(*, leader_exits: bool = False, mark: str = "") -> subprocess.Popen[bytes]:
    """A process group as a killed gateway would leave it; with ``leader_exits`` only its leader's child lives on."""
    env = {**os.environ, "CODEHUB_RUN": mark} if mark else None
    command = ["sh", "-c", "sleep 600 & echo started; wait" if not leader_exits else "sleep 600 & echo started"]
    process = subprocess.Popen(command, start_new_session=True, env=env, stdout=subprocess.PIPE)
    assert process.stdout is not None
    assert process.stdout.readline() == b"started\n"  # its child is in the group
    if leader_exits:
        process.wait(10)
    return process


@pytest.mark.parametrize(
    ("case", "killed"),
    [
        ("its leader, as it started", True),
        ("its leader gone, its child alive", True),
        ("a pid reused by another process", False),
        ("no group recorded, its mark", True),
        ("no group recorded, its mark as a number", False),  # not a mark the gateway wrote: no process is its
        ("not a record", False),
    ],
)
async def test_a_group_a_dead_gateway_left_is_ended_only_while_it_is_still_the_workspaces(
        tmp_path: Path, case: str, killed: bool) -> None:
    mark = "1234567890" if case.endswith("number") else "0123456789abcdef0123456789abcdef"
    group = leftover(leader_exits=case == "its leader gone, its child alive", mark=mark if "mark" in case else "")
    record: object = {"pgid": group.pid, "start": "the leader's, gone", "mark": "another-start"}
    if case == "its leader, as it started":
        record = {"pgid": group.pid, "start": start_time(group.pid), "mark": "another-start"}
    elif case == "a pid reused by another process":
        record = {"pgid": group.pid, "start": str(int(start_time(group.pid)) - 100), "mark": "another-start"}
    elif case == "no group recorded, its mark":
        record = {"pgid": str(group.pid), "mark": mark}
    elif case == "no group recorded, its mark as a number":
        record = {"pgid": str(group.pid), "mark": int(mark)}
    elif case == "not a record":
        record = [group.pid, start_time(group.pid)]
    run = folder(tmp_path) / "run.json"
    run.parent.mkdir(parents=True)
    run.write_text(json.dumps(record))
    try:
        async with running(tmp_path, {"ws": workspace(next_address())}) as runtime:
            assert (await runtime.status("ws")).phase is Phase.WARM
            assert not run.exists()
            if killed:
                await wait_gone(group.pid)
            else:
                assert group_members(group.pid)
    finally:
        if group_members(group.pid):
            os.killpg(group.pid, signal.SIGTERM)
        if not case.startswith("its leader gone"):
            # SIGTERM is the test's own: a gateway that had ended this group would have sent SIGKILL
            assert group.wait(10) == (-signal.SIGKILL if killed else -signal.SIGTERM)


async def test_processes_that_left_the_groups_a_dead_gateway_left_are_ended_too(tmp_path: Path) -> None:
    """By the marks in the run records, every workspace's in one search of /proc: the groups alone would leave a
    daemon or a tmux server running."""
    marks = {"ws": "fedcba9876543210fedcba9876543210", "other": "0123456789abcdef0123456789abcdef"}
    left = {name: (leftover(), leftover(mark=mark)) for name, mark in marks.items()}
    for name, (group, _escaped) in left.items():
        run = folder(tmp_path, name) / "run.json"
        run.parent.mkdir(parents=True)
        run.write_text(json.dumps({"pgid": group.pid, "start": start_time(group.pid), "mark": marks[name]}))
    processes = [process for pair in left.values() for process in pair]
    try:
        async with running(tmp_path, {name: workspace(next_address()) for name in marks}):
            for process in processes:
                await wait_gone(process.pid)
    finally:
        for process in processes:
            if group_members(process.pid):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


async def test_a_group_a_dead_gateway_left_is_ended_by_the_record_it_wrote(tmp_path: Path) -> None:
    """The run record is read back as it was written: a leader that shed the mark (an empty environment, as
    ``env -i`` gives) is found by its group and start time alone."""
    declared = {"ws": workspace(next_address(), command=["env", "-i", "sh", "-c", "touch shed; exec sleep 600"])}
    dead = LocalRuntime(settings(tmp_path, declared).local)  # stands for a gateway killed outright: never closed
    await dead.start()
    await dead.wake("ws")
    await written(folder(tmp_path) / "home", "shed")
    pgid = json.loads((folder(tmp_path) / "run.json").read_text())["pgid"]
    try:
        async with running(tmp_path, declared):
            await wait_gone(pgid)
    finally:
        if group_members(pgid):
            os.killpg(pgid, signal.SIGKILL)
        await dead.close()


@pytest.mark.parametrize("archive_written", [False, True])
async def test_an_archive_a_dead_gateway_left_half_done_is_finished_or_undone_at_the_next_start(
        tmp_path: Path, archive_written: bool) -> None:
    """Judged from the files alone (``archive.recover``): a home caught being removed comes back unless its archive
    was complete, and a partial archive is thrown away."""
    declared = {"ws": workspace(next_address())}
    home, archives = folder(tmp_path) / "home", tmp_path / "state" / "archives"
    removing = home.with_name("home.removing")
    home.mkdir(parents=True)
    (home / "notes.txt").write_text("mine")
    if archive_written:
        async with running(tmp_path, declared) as before:
            assert (await before.archive("ws")).phase is Phase.COLD
        removing.mkdir()  # the gateway died while it removed the archived home
        (removing / "notes.txt").write_text("mine")
    else:
        home.rename(removing)  # it died while it wrote the archive
        archives.mkdir()
        (archives / "ws.tar.gz.tmp").write_bytes(b"\x1f\x8b half an archive")

    async with running(tmp_path, declared) as runtime:
        state = await runtime.status("ws")

    assert not removing.exists()
    assert not (archives / "ws.tar.gz.tmp").exists()
    if archive_written:
        assert state.phase is Phase.COLD
    else:
        assert state.phase is Phase.WARM
        assert (home / "notes.txt").read_text() == "mine"


# --- whose a workspace's folder is, and since when ---------------------------------------------------------------

@pytest.mark.parametrize(
    ("before", "since"),
    [
        (None, "now"),  # a new workspace: links made before this moment are a namesake's
        ("home only", 0.0),  # a folder from before owners were recorded: its links are its own
        ('{"owner": "alice", "since": 1234.5}', 1234.5),
    ],
)
async def test_a_workspace_begins_when_its_folder_was_first_its_owners(tmp_path: Path, before: str | None,
                                                                      since: float | str) -> None:
    if before is not None:
        (folder(tmp_path) / "home").mkdir(parents=True)
    if before is not None and before.startswith("{"):
        (folder(tmp_path) / "owner").write_text(before)
    started = time.time()
    async with running(tmp_path, {"ws": workspace(next_address())}) as runtime:
        spec = (await runtime.status("ws")).spec
    if since == "now":
        assert started <= spec.since <= time.time()
    else:
        assert spec.since == since
    assert json.loads((folder(tmp_path) / "owner").read_text()) == {"owner": "alice", "since": spec.since}

    async with running(tmp_path, {"ws": workspace(next_address())}) as again:
        assert (await again.status("ws")).spec.since == spec.since, "the next gateway reads the same beginning"


@pytest.mark.parametrize("record", ["{", '{"owner": "alice"}', '{"since": 5}', "[]", '{"owner": "bob", "since": 5}'])
async def test_a_folder_not_recorded_as_its_owners_is_not_used(tmp_path: Path, record: str) -> None:
    """Unreadable counts as someone else's: the folder may hold another person's home."""
    (folder(tmp_path) / "home").mkdir(parents=True)
    (folder(tmp_path) / "owner").write_text(record)
    async with running(tmp_path, {"ws": workspace(next_address())}) as runtime:
        state = await runtime.wake("ws")
        assert state.phase is Phase.FAILED
        assert "earlier workspace of the same name" in state.message
        assert runtime.listening_ports("ws") == set()
        assert (await runtime.archive("ws")).phase is Phase.FAILED, "nor archived: the files are the operator's"
        assert (folder(tmp_path) / "home").is_dir()
        assert not (tmp_path / "state" / "archives" / "ws.tar.gz").exists()
    assert (folder(tmp_path) / "owner").read_text() == record, "the record is the operator's to look at"


# --- how a workspace is shared, remembered -----------------------------------------------------------------------

async def test_each_sharing_change_is_kept_and_leaves_the_others_as_they_were(tmp_path: Path) -> None:
    ws = workspace(next_address(), collaborators=["carol"], ports={3000: "org", 4000: "private"}, https_ports=[4000])
    async with running(tmp_path, {"ws": ws}) as runtime:
        configured = (await runtime.status("ws")).spec
        assert (configured.collaborators, configured.https_ports) == (("carol",), frozenset({4000}))

        await runtime.update("ws", ports={3000: "public", 5000: "org"})
        await runtime.update("ws", collaborators=("bob",))
        await runtime.update("ws", identity_ports=frozenset({3000}))
        await runtime.update("ws", https_ports=frozenset({5000}))
        updated = await runtime.update("ws", labels={3000: "web"})

        assert runtime.get("ws") == updated
        spec = updated.spec
        assert dict(spec.ports) == {3000: "public", 4000: "private", 5000: "org"}, "configured ports not named stay"
        assert spec.collaborators == ("bob",)
        assert spec.identity_ports == frozenset({3000})
        assert spec.https_ports == frozenset({5000})
        assert dict(spec.labels) == {3000: "web"}
        assert (await runtime.wake("ws")).spec == spec

    async with running(tmp_path, {"ws": ws}) as again:
        assert (await again.status("ws")).spec == spec, "the next gateway starts with them"


@pytest.mark.parametrize("text", ["[1, 2]", "{", '"ports"'])
async def test_sharing_settings_that_are_not_settings_leave_the_configured_ones(tmp_path: Path, text: str) -> None:
    ws = workspace(next_address(), collaborators=["carol"], ports={3000: "org"})
    (folder(tmp_path)).mkdir(parents=True)
    (folder(tmp_path) / "settings.json").write_text(text)
    async with running(tmp_path, {"ws": ws}) as runtime:
        spec = (await runtime.status("ws")).spec
        assert (spec.collaborators, dict(spec.ports)) == (("carol",), {3000: "org"})
        await runtime.update("ws", collaborators=("bob",))
        assert (await runtime.status("ws")).spec.collaborators == ("bob",)


# --- what the runtime says about a workspace ---------------------------------------------------------------------

async def test_a_state_is_kept_until_the_workspace_changes(tmp_path: Path) -> None:
    """``since`` is when the workspace entered its phase (the idle reaper counts from it); only a RUNNING workspace
    has an address to send requests to."""
    address = next_address()
    async with running(tmp_path, {"ws": workspace(address), "other": workspace(next_address())}) as runtime:
        warm = await runtime.status("ws")
        assert (warm.phase, warm.address, warm.message) == (Phase.WARM, None, "")
        assert await runtime.status("ws") is warm
        assert sorted(state.id for state in runtime.list()) == ["other", "ws"]
        assert runtime.get("nobody") is None
        with pytest.raises(NotFound) as missing:
            await runtime.status("nobody")
        assert missing.value.document()["error"]["code"] == "workspace-not-found"

        up = await runtime.wake("ws")
        assert (up.phase, up.address) == (Phase.RUNNING, address)
        assert up.since >= warm.since
        run = (folder(tmp_path) / "run.json").read_text()
        assert await runtime.wake("ws") is up, "waking a RUNNING workspace starts nothing"
        assert (folder(tmp_path) / "run.json").read_text() == run

        shared = await runtime.update("ws", collaborators=("bob",))
        assert (shared.spec.collaborators, shared.since) == (("bob",), up.since), "a new spec, the same phase"

        down = await runtime.stop("ws")
        assert (down.phase, down.address) == (Phase.WARM, None)
        assert down.since >= up.since
        assert down.since > warm.since
        with runtime.events() as events:
            assert await runtime.stop("ws") is down, "stopping a WARM workspace changes nothing"
            assert events.queue.empty()


async def test_archive_leaves_a_workspace_without_a_home_as_it_is(tmp_path: Path) -> None:
    async with running(tmp_path, {"ws": workspace(next_address())}) as runtime:
        assert not (folder(tmp_path) / "home").exists()
        assert (await runtime.archive("ws")).phase is Phase.WARM
        assert not list((tmp_path / "state" / "archives").iterdir())
        await runtime.wake("ws")
        assert (await runtime.archive("ws")).phase is Phase.COLD
        cold = await runtime.archive("ws")
        assert (cold.phase, cold.message) == (Phase.COLD, "")
        assert [path.name for path in (tmp_path / "state" / "archives").iterdir()] == ["ws.tar.gz"]


async def test_a_stop_clears_the_reason_a_restore_failed_and_the_workspace_stays_cold(tmp_path: Path) -> None:
    """As a stop clears a failed start: the workspace's phase is the same before and after (its archive is all there
    is), its message is not."""
    async with running(tmp_path, {"ws": workspace(next_address())}) as runtime:
        home = folder(tmp_path) / "home"
        home.mkdir()
        (home / "notes.txt").write_text("mine")
        assert (await runtime.archive("ws")).phase is Phase.COLD
        archive = tmp_path / "state" / "archives" / "ws.tar.gz"
        damaged = bytearray(archive.read_bytes())
        damaged[len(damaged) // 2] ^= 0xFF
        archive.write_bytes(damaged)

        failed = await runtime.wake("ws")
        assert (failed.phase, failed.message.startswith("restoring home failed: ")) == (Phase.COLD, True)
        with runtime.events() as events:
            stopped = await runtime.stop("ws")
            seen = [events.queue.get_nowait() for _ in range(events.queue.qsize())]
        assert (stopped.phase, stopped.message) == (Phase.COLD, "")
        assert [(event.phase, event.message) for event in seen] == [(Phase.COLD, "")]


# --- which ports a workspace listens on --------------------------------------------------------------------------

async def test_listening_ports_are_the_workspaces_listeners_on_its_own_address_only(tmp_path: Path) -> None:
    address, elsewhere = next_address(), next_address()
    async with running(tmp_path, {"ws": slow_workspace(address, delay=0)}) as runtime:
        with socket.socket() as squatter:  # on its address, but not the workspace's: it is not running
            squatter.bind((address, PORT + 2))
            squatter.listen()
            assert runtime.listening_ports("ws") == set(), "not started"
        await runtime.wake("ws")
        async with asyncio.timeout(10):
            while not runtime.listening_ports("ws"):  # noqa: ASYNC110 - /proc/net/tcp offers nothing to wait on
                await asyncio.sleep(0.02)
        with socket.socket() as other, socket.socket() as client:
            other.bind((elsewhere, PORT + 1))  # another address's listener
            other.listen()
            client.bind((address, 0))  # a connection from the workspace's address: not a listener
            client.connect((elsewhere, PORT + 1))
            assert runtime.listening_ports("ws") == {PORT}
        assert runtime.listening_ports("nobody") == set()


async def test_a_workspace_whose_leader_exits_leaves_nothing_of_its_group_running(tmp_path: Path) -> None:
    """A child that shed the workspace's mark (an empty environment) is still in its process group."""
    # the leader exits only once its child runs without the mark (not while it is still a copy of the leader)
    command = ["sh", "-c", "env -i sh -c 'touch child; exec sleep 600' & while [ ! -e child ]; do sleep 0.01; done; "
               "exit 3"]
    async with running(tmp_path, {"ws": workspace(next_address(), command=command)}) as runtime:
        await runtime.wake("ws")
        pgid = json.loads((folder(tmp_path) / "run.json").read_text())["pgid"]
        try:
            assert (await until(runtime, "ws", Phase.FAILED)).message == "the workspace process exited with code 3"
            await wait_gone(pgid)
        finally:
            if group_members(pgid):  # what the runtime left: the test's to end
                os.killpg(pgid, signal.SIGKILL)


def test_a_search_for_marked_processes_leaves_no_descriptor_open() -> None:
    """Each process is held by a pidfd while its environment is read; a search that left them open would run the
    gateway out of file descriptors within a few stops on a busy host."""
    before = len(os.listdir("/proc/self/fd"))
    signal_marked(["no-process-carries-this-mark"], signal.SIGTERM)
    assert len(os.listdir("/proc/self/fd")) == before


def marked(mark: str, **options: Any) -> subprocess.Popen[bytes]:
    """A process started with ``mark`` as its ``MARK``, as a workspace's are."""
    return subprocess.Popen(["sleep", "600"], env={**os.environ, "CODEHUB_RUN": mark}, **options)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root starts a process as another user")
def test_a_search_for_marked_processes_passes_over_another_users_and_signals_its_own() -> None:
    """/proc lists processes by pid, and a gateway run as an ordinary user meets root's first: one of another user
    neither ends the search nor is signalled, even with the mark (a workspace is its gateway user's only)."""
    mark = "0123456789abcdef0123456789abcdef"
    theirs = marked(mark, user=65534, group=65534, extra_groups=[])
    ours = marked(mark)
    try:
        assert theirs.pid < ours.pid, "listed after ours: start the test again"
        signal_marked([mark], signal.SIGTERM)
        theirs.kill()  # the first fatal signal sent decides how it ended: SIGKILL, unless the search sent one
        assert (ours.wait(10), theirs.wait(10)) == (-signal.SIGTERM, -signal.SIGKILL)
    finally:
        for process in (theirs, ours):
            process.kill()
            process.wait(10)


def test_a_process_gone_while_the_search_looks_at_it_does_not_end_the_search(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that exits between the listing of /proc and its pidfd (any process of the host, any moment) is
    passed over; the processes listed after it are still signalled."""
    mark = "fedcba9876543210fedcba9876543210"
    gone, ours = marked(mark), marked(mark)
    pidfd_open = os.pidfd_open

    def exits_first(pid: int, flags: int = 0) -> int:
        if pid == gone.pid:  # it exits, and is reaped, just before the search holds it
            gone.kill()
            gone.wait(10)
        return pidfd_open(pid, flags)

    monkeypatch.setattr(os, "pidfd_open", exits_first)
    try:
        signal_marked([mark], signal.SIGTERM)
        assert (gone.wait(10), ours.wait(10)) == (-signal.SIGKILL, -signal.SIGTERM)
    finally:
        for process in (gone, ours):
            process.kill()
            process.wait(10)


@pytest.mark.parametrize(
    ("environment", "signalled"),
    [
        ({"CODEHUB_RUN": "{mark}"}, True),  # the mark alone: a program that gives its children nothing else
        ({"CODEHUB_RUN": "{mark}", "PATH": "/bin"}, True),  # the mark first
        ({"PATH": "/bin", "CODEHUB_RUN": "{mark}"}, True),  # the mark last
        ({"CODEHUB_RUN": "{mark}0"}, False),  # another start's mark, which begins with this one
        ({"OTHER": "CODEHUB_RUN={mark}"}, False),  # a value that reads like the mark is not the mark
        ({"XCODEHUB_RUN": "{mark}"}, False),
    ],
)
def test_a_search_for_marked_processes_matches_the_whole_mark_wherever_it_is_in_the_environment(
        environment: dict[str, str], signalled: bool) -> None:
    """A process is found by its ``CODEHUB_RUN`` variable being exactly the mark: in whatever place of the
    environment it is, and never by another variable or another start's mark that only contains it."""
    mark = "0123456789abcdef0123456789abcdef"
    process = subprocess.Popen(["/bin/sleep", "600"],
                               env={name: value.format(mark=mark) for name, value in environment.items()})
    try:
        signal_marked([mark], signal.SIGTERM)
    finally:
        process.kill()  # the first fatal signal sent decides how it ended: SIGKILL, unless it was found
        code = process.wait(10)
    assert code == (-signal.SIGTERM if signalled else -signal.SIGKILL)


async def test_port_names_come_from_the_workspaces_devcontainer_json_read_again_when_it_changes(
        tmp_path: Path) -> None:
    """The hub asks for them twice a second per workspace: the file is read again only when its time or size
    changed."""
    named = folder(tmp_path) / "home" / ".devcontainer" / "devcontainer.json"
    named.parent.mkdir(parents=True)
    named.write_text('{"portsAttributes": {"3000": {"label": "web"}}}')
    async with running(tmp_path, {"ws": workspace(next_address())}) as runtime:
        assert runtime.port_labels("ws") == {3000: "web"}
        stamp = named.stat()
        named.write_text('{"portsAttributes": {"3000": {"label": "api"}}}')
        os.utime(named, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        assert runtime.port_labels("ws") == {3000: "web"}, "the same time and size: not read again"
        named.write_text('{"portsAttributes": {"3000": {"label": "apis"}}}')
        assert runtime.port_labels("ws") == {3000: "apis"}
        assert runtime.port_labels("nobody") == {}

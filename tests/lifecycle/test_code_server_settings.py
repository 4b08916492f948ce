"""What a local workspace's code-server is given before it starts: its own data and config folders (never the
gateway's ``XDG_*`` ones), and a port-detection setting that suits workspaces sharing the host's network.

A fake ``code-server`` (a shell script of that name) records, the moment it starts, the settings file it would
read and the ``XDG_*`` variables it got, so each test sees exactly what the real one would.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import stat
from pathlib import Path

import pytest

from gateway.lifecycle import Phase
from gateway.lifecycle.code_server import seed_settings, settings_file
from gateway.lifecycle.local import LocalRuntime
from tests.conftest import next_address, settings, workspace
from tests.lifecycle.conftest import Fifo

SEEDED = {"remote.autoForwardPortsSource": "output"}
RECORDER = """#!/bin/sh
# Record what code-server would find at its start, then idle like a server.
{ env | grep '^XDG_' | sort; } > started.env.tmp
if [ -f "$SETTINGS" ]; then cat "$SETTINGS"; else printf absent; fi > started.settings.tmp
mv started.env.tmp started.env && mv started.settings.tmp started.settings
exec sleep 60
"""


def fake_code_server(tmp_path: Path) -> Path:
    program = tmp_path / "bin" / "code-server"
    program.parent.mkdir(parents=True, exist_ok=True)
    program.write_text(RECORDER)
    program.chmod(0o755)
    return program


async def started(home: Path) -> tuple[str | None, str]:
    """The settings file's text the fake code-server found at its start (None: no file) and its XDG_* lines."""
    for _ in range(500):  # at most ten seconds
        if (home / "started.settings").exists():
            text = (home / "started.settings").read_text()
            return None if text == "absent" else text, (home / "started.env").read_text()
        await asyncio.sleep(0.02)
    raise AssertionError("the workspace command never started")


async def start(tmp_path: Path, command: list[str], *, env: dict[str, str] | None = None,
                seen_at: str | None = None) -> tuple[LocalRuntime, Path]:
    """Wake one workspace running ``command``; ``seen_at`` (relative to its home) is where the fake code-server
    looks for its settings."""
    config = settings(tmp_path, {"ws": workspace(next_address(), command=command, env={
        **(env or {}), **({"SETTINGS": seen_at} if seen_at else {})})})
    runtime = LocalRuntime(config.local)
    await runtime.start()
    await runtime.wake("ws")
    return runtime, config.local.state_dir.resolve() / "workspaces" / "ws" / "home"


async def found_at_start(tmp_path: Path, arguments: list[str], *, seen_at: str,
                         env: dict[str, str] | None = None) -> tuple[str | None, str]:
    """Start the fake code-server with ``arguments`` (then its folder); what it found at ``seen_at`` and its XDG_*
    lines (see ``started``)."""
    runtime, home = await start(tmp_path, [str(fake_code_server(tmp_path)), *arguments, "{home}"], env=env,
                                seen_at=seen_at)
    try:
        return await started(home)
    finally:
        await runtime.close()


def owners_settings(tmp_path: Path, text: str) -> None:
    """The settings file the owner left in the workspace's code-server data folder (``.cs``)."""
    folder = tmp_path / "state" / "workspaces" / "ws" / "home" / ".cs" / "User"
    folder.mkdir(parents=True)
    (folder / "settings.json").write_text(text)


@pytest.mark.parametrize(
    ("command", "env", "expected"),
    [
        (["/opt/bin/code-server", "--user-data-dir", "/data/a", "--user-data-dir", "b"], {}, "/h/b"),
        (["code-server", "--user-data-dir=/data/a"], {"XDG_DATA_HOME": "/x"}, "/data/a"),
        (["code-server", "--user-data-dir"], {}, "/h/.local/share/code-server"),  # no value: code-server's default
        (["code-server", "/h"], {"XDG_DATA_HOME": "/x"}, "/x/code-server"),
        (["sh", "-c", "code-server --user-data-dir /data/a"], {}, None),
        (["code-server-wrapper", "--user-data-dir", "/data/a"], {}, None),
    ],
)
def test_settings_file_of_a_command_line(command: list[str], env: dict[str, str], expected: str | None) -> None:
    found = settings_file(command, Path("/h"), env)
    assert found == (None if expected is None else Path(expected) / "User" / "settings.json")


@pytest.mark.parametrize(
    ("arguments", "seen_at"),
    [
        (["--user-data-dir", "{home}/.cs"], ".cs/User/settings.json"),
        (["--user-data-dir=data"], "data/User/settings.json"),  # relative to the home, where it starts
        ([], ".local/share/code-server/User/settings.json"),  # code-server's default under HOME
    ],
)
async def test_code_server_starts_with_port_detection_from_terminal_output(
    tmp_path: Path, arguments: list[str], seen_at: str
) -> None:
    found, _env = await found_at_start(tmp_path, ["--auth", "none", *arguments], seen_at=seen_at)
    assert found is not None
    assert json.loads(found) == SEEDED


async def test_code_server_data_folder_follows_the_workspace_env(tmp_path: Path) -> None:
    found, env = await found_at_start(tmp_path, [], env={"XDG_DATA_HOME": "xdg-data"},
                                      seen_at="xdg-data/code-server/User/settings.json")
    assert found is not None
    assert json.loads(found) == SEEDED
    assert env == "XDG_DATA_HOME=xdg-data\n"


async def test_seeded_keys_join_the_owners_settings(tmp_path: Path) -> None:
    owners_settings(tmp_path, '{"editor.fontSize": 15}')
    found, _env = await found_at_start(tmp_path, ["--user-data-dir", "{home}/.cs"], seen_at=".cs/User/settings.json")
    assert found is not None
    assert json.loads(found) == {"editor.fontSize": 15, **SEEDED}


@pytest.mark.parametrize(
    "before",
    [
        '{"remote.autoForwardPortsSource": "process"}',  # the owner chose
        # code-server reads JSON with comments; rewriting such a file would lose them
        '{\n  // bigger\n  "editor.fontSize": 15,\n}\n',
        "[]\n",  # not settings at all: code-server will say so, the workspace still starts
    ],
)
async def test_settings_left_as_written(tmp_path: Path, before: str) -> None:
    owners_settings(tmp_path, before)
    found, _env = await found_at_start(tmp_path, ["--user-data-dir", "{home}/.cs"], seen_at=".cs/User/settings.json")
    assert found == before


async def test_a_settings_file_that_cannot_be_written_does_not_stop_the_start(tmp_path: Path) -> None:
    program = fake_code_server(tmp_path)
    home = tmp_path / "state" / "workspaces" / "ws" / "home"
    (home / ".cs").mkdir(parents=True)
    (home / ".cs" / "User").write_text("a file where code-server expects a folder")
    runtime, home = await start(tmp_path, [str(program), "--user-data-dir", "{home}/.cs", "{home}"],
                                seen_at=".cs/User/settings.json")
    try:
        found, _env = await started(home)
        assert runtime.get("ws").phase is Phase.RUNNING  # type: ignore[union-attr]
    finally:
        await runtime.close()
    assert found is None


async def test_other_programs_get_no_code_server_settings(tmp_path: Path) -> None:
    runtime, home = await start(tmp_path, ["sh", "-c", "touch started; exec sleep 60"])
    try:
        for _ in range(500):
            if (home / "started").exists():
                break
            await asyncio.sleep(0.02)
    finally:
        await runtime.close()
    assert sorted(path.name for path in home.iterdir()) == ["started"]


@pytest.mark.parametrize("own", [{}, {"XDG_CONFIG_HOME": "conf"}], ids=["none", "its-own-config"])
async def test_the_gateways_own_xdg_folders_are_not_passed_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              own: dict[str, str]) -> None:
    """With the gateway's XDG_DATA_HOME or XDG_CONFIG_HOME, every workspace's code-server (and the person running
    the gateway) would share one data folder, settings, extensions and config file. A workspace whose ``env`` sets
    none of them gets none: one it sets would hide the gateway's, were it passed on."""
    for name in ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME"):
        monkeypatch.setenv(name, str(tmp_path / "mine" / name))
    found, env = await found_at_start(tmp_path, [], env=own, seen_at=".local/share/code-server/User/settings.json")
    assert env == "".join(f"{name}={value}\n" for name, value in own.items())  # its own, passed as written
    assert found is not None
    assert json.loads(found) == SEEDED
    assert not (tmp_path / "mine").exists()


@pytest.mark.parametrize("name", ["settings.json", "settings.json.codehub.tmp"])
async def test_a_fifo_in_the_settings_folder_never_holds_the_start(tmp_path: Path, name: str) -> None:
    """The owner may make the settings file a FIFO: reading it would wait for a writer for ever, in a start that
    holds the workspace's lock (stop, archive, the idle reaper and shutdown wait behind it). The start goes on
    without waiting, and the FIFO stays as the owner made it. Opening one to write waits for a reader too: the
    settings are written through a file the start creates itself, whatever was left at that name."""
    program = fake_code_server(tmp_path)
    folder = tmp_path / "state" / "workspaces" / "ws" / "home" / ".cs" / "User"
    folder.mkdir(parents=True)
    with Fifo(folder / name) as fifo:
        runtime, home = await start(tmp_path, [str(program), "--user-data-dir", "{home}/.cs", "{home}"],
                                    seen_at=".cs/User/settings.json")
    try:
        assert not fifo.released, "the start waited on the FIFO"
        assert runtime.get("ws").phase is Phase.RUNNING  # type: ignore[union-attr]
        if name == "settings.json":
            assert stat.S_ISFIFO((folder / "settings.json").lstat().st_mode)
        else:
            found, _env = await started(home)
            assert found is not None
            assert json.loads(found) == SEEDED
    finally:
        await runtime.close()


def test_a_settings_link_to_a_device_is_left_alone(tmp_path: Path) -> None:
    """/dev/zero would be read without end; a link to a device is not settings, and is kept as the owner made it."""
    path = tmp_path / "settings.json"
    path.symlink_to("/dev/zero")
    seed_settings(path)
    assert os.readlink(path) == "/dev/zero"


def test_a_seeded_settings_file_is_made_as_code_server_would_make_it(tmp_path: Path) -> None:
    """Its folders made first, and the file its owner's to edit, as the umask allows others; never executable."""
    path = tmp_path / "data" / "User" / "settings.json"
    umask = os.umask(0o022)
    try:
        seed_settings(path)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert json.loads(path.read_text()) == SEEDED
    assert sorted(path.parent.iterdir()) == [path], "no temporary file is left behind"


def test_a_settings_file_that_cannot_be_written_leaves_nothing_behind(tmp_path: Path) -> None:
    """A write that fails half way (here: a file size limit, as a full disk would) leaves the owner's folder as it
    was: no settings file, and no temporary one next to it."""
    path = tmp_path / "User" / "settings.json"
    path.parent.mkdir()
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    ignored = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (8, limits[1]))
    try:
        seed_settings(path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, ignored)
    assert list(path.parent.iterdir()) == []

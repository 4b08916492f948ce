"""What a workspace owner can do to the gateway's own handling of their home (archive, restore, the next start)
with what they control: every file in the home and every process the workspace runs.

Each test drives the local runtime against a real home and real processes in ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.lifecycle import LifecycleError, Phase
from gateway.lifecycle.local import LocalRuntime
from tests.conftest import next_address, settings
from tests.lifecycle.conftest import fill_home, snapshot
from tests.lifecycle.test_code_server_settings import fake_code_server, owners_settings, start, started

pytestmark = pytest.mark.timeout(120)

ESCAPEE = """\
import os, sys, time
with open(sys.argv[1] + ".tmp", "w") as handle:
    handle.write(str(os.getpid()))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
deadline = time.monotonic() + 60
while time.monotonic() < deadline:  # until the home it runs in has been archived and is being deleted
    try:
        if os.getcwd().endswith("home.removing"):
            break
    except OSError:
        sys.exit()
    time.sleep(0.001)
end, count = time.monotonic() + 3, 0
while time.monotonic() < end:  # files keep appearing in the folder the gateway deletes
    try:
        open(f"junk{count}", "w").close()
    except OSError:
        break
    count += 1
"""
"""A workspace process that left its process group and its environment (``setsid env -i``), which the README says
a stop does not find, and that writes into its folder once the gateway is deleting it."""


@contextlib.contextmanager
def killed_at_the_end(pid_file: Path) -> Iterator[None]:
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


async def _pid(pid_file: Path) -> int:
    async with asyncio.timeout(10):
        while not await asyncio.to_thread(pid_file.exists):  # noqa: ASYNC110 - the escaped process writes it
            await asyncio.sleep(0.02)
    return int(await asyncio.to_thread(pid_file.read_text))


async def test_a_process_writing_into_the_home_being_deleted_neither_fails_the_archive_nor_the_next_start(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A home is renamed ``home.removing`` once its archive is verified, then deleted. A process left running in it
    that keeps adding files makes the deletion fail: that failed the archive with a traceback, although the home was
    safe in its archive; and the leftover, next to the home restored at the next wake, stopped the next gateway
    from starting at all (``recover`` put it back over the restored home: ``Directory not empty``)."""
    pid_file, script = tmp_path / "escapee.pid", tmp_path / "escapee.py"
    script.write_text(ESCAPEE)
    command = ["sh", "-c", f'setsid env -i "{sys.executable}" "{script}" "{pid_file}" & exec sleep 600']
    config = settings(tmp_path, {"ws": {"owner": "alice", "command": command, "address": next_address()}})
    home = tmp_path / "state" / "workspaces" / "ws" / "home"
    fill_home(home, big=1 << 20, small_files=2000)
    before = snapshot(home)
    caplog.set_level(logging.WARNING)
    with killed_at_the_end(pid_file):
        runtime = LocalRuntime(config.local, stop_timeout=2)
        await runtime.start()
        try:
            assert (await runtime.wake("ws")).phase is Phase.RUNNING
            escapee = await _pid(pid_file)

            state = await runtime.archive("ws")

            assert state.phase is Phase.COLD, state
            assert state.message == ""
            os.kill(escapee, 0)  # it is still there (the README's limit), and still writing
            assert (await runtime.wake("ws")).phase is Phase.RUNNING
            assert {name: entry for name, entry in snapshot(home).items() if name != "home.removing"} == before
            await runtime.stop("ws")
        finally:
            await runtime.close()
        with contextlib.suppress(OSError):
            os.kill(escapee, signal.SIGKILL)

        restarted = LocalRuntime(config.local)
        await restarted.start()  # the next gateway starts
        try:
            assert (await restarted.status("ws")).phase is Phase.WARM
            assert snapshot(home) == before
            assert not home.with_name("home.removing").exists()
        finally:
            await restarted.close()
    assert "Traceback" not in caplog.text
    assert not [record for record in caplog.records if record.exc_info]


SPARSE_ROUND_TRIP = """\
import os, sys
from pathlib import Path
from gateway.lifecycle.archive import ArchiveError, archive_home, restore_home
folder = Path(sys.argv[1])
home, archive = folder / "workspaces" / "ws" / "home", folder / "archives" / "ws.tar.gz"
home.mkdir(parents=True)
(home / "notes.txt").write_text("the owner's work")
with open(home / "disk.img", "wb") as image:  # a VM image, a database's preallocated file: mostly holes
    image.write(b"boot")
    image.seek(256 << 20)
    image.write(b"end")
    image.truncate(384 << 20)
if sys.argv[2] == "whole":  # as versions before sparse members wrote it (or any, on a file system that cannot say
    import shutil, tarfile  # where its holes are): the zeros are in the archive
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(home, arcname=".")
    shutil.rmtree(home)
else:
    archive_home(home, archive)
try:
    restore_home(archive, home)
except ArchiveError as exc:
    sys.exit(f"not restored: {exc}")
used = os.stat(home / "disk.img").st_blocks * 512
image = (home / "disk.img").read_bytes()
assert len(image) == 384 << 20 and image[:4] == b"boot" and image[256 << 20:(256 << 20) + 3] == b"end", "changed"
assert image.count(0) == len(image) - 7, "changed"
print(used)
"""


@pytest.mark.parametrize("stored", ["sparse", "whole"])
def test_a_sparse_file_comes_back_as_sparse_as_it_was(tmp_path: Path, stored: str) -> None:
    """A file of holes (``truncate -s``, a VM image, a database's preallocation) takes no room in a home. Restore
    wrote every hole out as zeros: a home that fit in 16 MiB needed 384 MiB to come back, so on a disk with less
    room left the restore failed and the workspace stayed COLD for good, and on one with more room it took the
    room of everyone else's homes (an owner's ``truncate -s 10T`` filled the gateway's disk at the next wake).
    The home and its archive live here on a real 16 MiB tmpfs of the test's own mount namespace; ``whole``: an
    archive that holds the zeros themselves (see ``SPARSE_ROUND_TRIP``)."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    unshare = shutil.which("unshare")
    assert unshare is not None, "util-linux's unshare is part of the base system"
    script = f'mount -t tmpfs -o size=16m codehub-small "{folder}" && exec "$0" "$@"'
    result = subprocess.run([unshare, "--mount", "--propagation", "private", "sh", "-c", script,
                             sys.executable, "-c", SPARSE_ROUND_TRIP, str(folder), stored],
                            capture_output=True, text=True, timeout=110, check=False,
                            cwd=Path(__file__).parents[2])
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout) < 1 << 20  # the holes are holes again


HOLES_ROUND_TRIP = """\
import hashlib, os, sys
from pathlib import Path
from gateway.lifecycle.archive import archive_home, restore_home
folder = Path(sys.argv[1])
home, archive = folder / "workspaces" / "ws" / "home", folder / "archives" / "ws.tar.gz"
home.mkdir(parents=True)
pieces = {0: b"head", 5 << 30: os.urandom(3 << 20), (64 << 30) - 5: b"tail!"}
with open(home / "disk.img", "wb") as image:
    for offset, data in pieces.items():
        image.seek(offset)
        image.write(data)
with open(home / "empty.img", "wb") as image:
    image.truncate(1 << 40)
(home / "plain.txt").write_bytes(os.urandom(100_000))
plain = hashlib.sha256((home / "plain.txt").read_bytes()).hexdigest()
archive_home(home, archive)
print(archive.stat().st_size, flush=True)
restore_home(archive, home)
with open(home / "disk.img", "rb") as image:
    assert os.fstat(image.fileno()).st_size == 64 << 30
    for offset, data in pieces.items():
        image.seek(offset)
        assert image.read(len(data)) == data, offset
    image.seek(1 << 30)
    assert image.read(1 << 20) == bytes(1 << 20)
assert (home / "empty.img").stat().st_size == 1 << 40
assert hashlib.sha256((home / "plain.txt").read_bytes()).hexdigest() == plain
print(sum((home / name).stat().st_blocks * 512 for name in ("disk.img", "empty.img")))
"""


def test_archiving_a_file_of_holes_takes_the_time_of_its_data(tmp_path: Path) -> None:
    """An owner's ``truncate -s 1T`` costs them nothing, but the archive read and compressed every zero of it:
    hours of a CPU with the workspace's lock held (a wake waits on it), one of the few threads the gateway does
    its file work in taken (a handful of such homes stall every other workspace's wake), and an archive of a
    thousandth of the apparent size, written again at every ``idle.to_cold``. The holes are now stored as holes
    (the GNU sparse format, which tarfile reads), so a 64 GiB image with 3 MiB of data and a 1 TiB file of nothing
    take a second, and come back exactly."""
    folder = tmp_path / "holes"
    try:
        result = subprocess.run([sys.executable, "-c", HOLES_ROUND_TRIP, str(folder)], capture_output=True,
                                text=True, timeout=30, check=False, cwd=Path(__file__).parents[2])
    except subprocess.TimeoutExpired:
        pytest.fail("archiving 3 MiB of data in files of holes took more than 30 s")
    assert result.returncode == 0, result.stderr[-2000:]
    archived, used = map(int, result.stdout.split())
    assert archived < 4 << 20
    assert used < 8 << 20


MANY_FILES = """\
import os, resource, sys
from pathlib import Path
from gateway.lifecycle.archive import archive_home, restore_home
folder = Path(sys.argv[1])
home, archive = folder / "workspaces" / "ws" / "home", folder / "archives" / "ws.tar.gz"
for block in range(8):
    (home / str(block)).mkdir(parents=True)
    for index in range(10_000):
        os.close(os.open(home / str(block) / str(index), os.O_CREAT | os.O_WRONLY))
os.link(home / "0" / "0", home / "1" / "linked")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
archive_home(home, archive)
restore_home(archive, home)
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
assert sum(len(files) for _, _, files in os.walk(home)) == 80_001
assert os.stat(home / "1" / "linked").st_nlink == 2
print(grown)
"""


def test_a_home_of_many_empty_files_does_not_take_the_gateways_memory(tmp_path: Path) -> None:
    """Empty files cost their owner inodes only, and a shell loop makes millions. tarfile keeps every member it
    writes or reads, and every regular file's name by its inode, about a kilobyte a file in all: ten million of
    them took the gateway some 15 GB to archive (and about half that again to restore, which anyone may set off
    with a request where wakes are open), the memory of every workspace on the host. 80,000 files here: 70 MB
    grew to a few; a hard link still comes back as one. Some 25 s of CPU: ten minutes at most, as a loaded
    machine's share of a core made 110 s too few."""
    result = subprocess.run([sys.executable, "-c", MANY_FILES, str(tmp_path / "many")], capture_output=True,
                            text=True, timeout=600, check=False, cwd=Path(__file__).parents[2])
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout) < 16 << 20


@pytest.mark.parametrize("text", ["[" * 100_000, '{"a": ' * 100_000], ids=["arrays", "objects"])
async def test_code_servers_settings_nested_too_deep_do_not_keep_the_workspace_from_starting(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str) -> None:
    """The settings file code-server reads is the owner's (their IDE writes it). Nested deeper than Python's JSON
    parser goes, it raised RecursionError, which the seeding let through: every wake failed with a traceback in
    the log, and the owner could not open the IDE they would mend the file with. It is left as written now, as a
    file with comments is."""
    owners_settings(tmp_path, text)
    runtime, home = await start(tmp_path, [str(fake_code_server(tmp_path)), "--user-data-dir", "{home}/.cs",
                                           "{home}"], seen_at=".cs/User/settings.json")
    try:
        assert (await runtime.status("ws")).phase is Phase.RUNNING
        found, _env = await started(home)
    finally:
        await runtime.close()
    assert found == text
    assert "Traceback" not in caplog.text
    assert not [record for record in caplog.records if record.exc_info]



def _near_path_max(home: Path, name: str) -> None:
    """A file in ``home`` whose absolute path is 4094 bytes long (PATH_MAX is 4096 with its NUL), in folders named
    ``name`` repeated; made with relative paths, as a shell's ``mkdir``/``cd`` loop makes it."""
    os.makedirs(home, exist_ok=True)
    fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
    length = len(os.fsencode(home))
    try:
        while 4094 - length - 1 > 255:  # what is left does not fit in one name yet
            folder = (name * 200)[:min(200, 4094 - length - 1 - 1 - 100)]
            os.mkdir(folder, dir_fd=fd)
            inner = os.open(folder, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd, length = inner, length + 1 + len(os.fsencode(folder))
        last = "f" * (4094 - length - 1)
        os.close(os.open(last, os.O_CREAT | os.O_WRONLY, dir_fd=fd))
    finally:
        os.close(fd)


async def test_a_home_with_a_path_too_long_to_restore_is_kept_rather_than_archived(tmp_path: Path) -> None:
    """A file whose path in the home is within 12 bytes of PATH_MAX archived (its path is read as home/…) but
    could not be restored (it is written as home.restoring/./…: File name too long): the home was removed, every
    wake failed and the workspace stayed COLD for good, its home only in an archive the gateway could not open.
    Such a home is now kept, WARM, with the reason, as on a full disk, and wakes as usual."""
    config = settings(tmp_path, {"ws": {"owner": "alice", "command": ["sleep", "600"], "address": next_address()}})
    home = tmp_path / "state" / "workspaces" / "ws" / "home"
    _near_path_max(home, "d")
    before = snapshot(home)
    runtime = LocalRuntime(config.local)
    await runtime.start()
    try:
        with pytest.raises(LifecycleError, match="too long to be restored"):
            await runtime.archive("ws")
        state = await runtime.status("ws")
        assert state.phase is Phase.WARM
        assert "too long to be restored" in state.message
        assert snapshot(home) == before
        assert list((tmp_path / "state" / "archives").iterdir()) == []
        assert (await runtime.wake("ws")).phase is Phase.RUNNING
    finally:
        await runtime.close()

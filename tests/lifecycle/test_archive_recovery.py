"""``recover()`` for every state a crash can leave between the steps documented in ``lifecycle/archive.py``.

archive: write ``X.tmp`` → verify → rename to ``X`` → rename home to ``home.removing`` → delete it;
restore: extract into ``home.restoring`` → rename to ``home`` → delete the archive.
After recovery the workspace is exactly WARM (home) or exactly COLD (archive), and its data is all there.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from bench.servers import DEBIAN_VENV
from gateway.lifecycle import archive as archive_module
from gateway.lifecycle.archive import ArchiveError, archive_home, extract, recover, restore_home, verify_archive
from tests.lifecycle.conftest import fill_home, snapshot

Snapshot = dict[str, tuple[object, ...]]
DEBIAN_PYTHON = DEBIAN_VENV / "bin" / "python"


@pytest.fixture
def paths(tmp_path: Path) -> tuple[Path, Path]:
    home = tmp_path / "workspaces" / "ws" / "home"
    archive = tmp_path / "archives" / "ws.tar.gz"
    archive.parent.mkdir(parents=True)
    return home, archive


def _home(home: Path) -> Snapshot:
    fill_home(home, big=1 << 20, small_files=50)
    return snapshot(home)


def _cold(home: Path, archive: Path) -> Snapshot:
    before = _home(home)
    archive_home(home, archive)
    return before


def _partial_copy(archive: Path, into: Path) -> None:
    """What an interrupted extract or delete leaves: some of the tree, not all of it."""
    with tarfile.open(archive, "r:gz") as tar:
        extract(tar, into)
    shutil.rmtree(into / "many")
    (into / "large.bin").write_bytes(b"cut short")


def _leftovers(home: Path, archive: Path) -> list[str]:
    names = [p.name for p in home.parent.iterdir() if p.name.startswith("home.")]
    return names + [p.name for p in archive.parent.iterdir() if p.name.endswith(".tmp")]


def _assert_warm(home: Path, archive: Path, before: Snapshot) -> None:
    assert not archive.exists()
    assert snapshot(home) == before
    assert _leftovers(home, archive) == []


def _assert_cold(home: Path, archive: Path, before: Snapshot) -> None:
    assert not home.exists()
    assert _leftovers(home, archive) == []
    verify_archive(archive)
    restore_home(archive, home)
    assert snapshot(home) == before


def test_tmp_archive_being_written(paths: tuple[Path, Path]) -> None:
    home, archive = paths
    before = _home(home)
    archive.with_name(archive.name + ".tmp").write_bytes(b"\x1f\x8b\x08\x00 only the start of a gzip stream")

    recover(home, archive)

    _assert_warm(home, archive, before)


def test_home_next_to_an_archive_renamed_into_place(paths: tuple[Path, Path]) -> None:
    home, archive = paths
    before = _home(home)
    with tarfile.open(archive, "w:gz") as tar:  # renamed into place, the home not yet moved (or it is damaged)
        tar.add(home / "README.md", arcname="README.md")

    recover(home, archive)

    _assert_warm(home, archive, before)


def test_home_restored_but_archive_not_yet_deleted(paths: tuple[Path, Path]) -> None:
    home, archive = paths
    before = _cold(home, archive)
    with tarfile.open(archive, "r:gz") as tar:
        extract(tar, home)

    recover(home, archive)

    _assert_warm(home, archive, before)


def test_home_being_removed_after_a_verified_archive(paths: tuple[Path, Path]) -> None:
    home, archive = paths
    before = _cold(home, archive)
    _partial_copy(archive, home.with_name("home.removing"))

    recover(home, archive)

    _assert_cold(home, archive, before)


def test_home_being_restored(paths: tuple[Path, Path]) -> None:
    home, archive = paths
    before = _cold(home, archive)
    _partial_copy(archive, home.with_name("home.restoring"))

    recover(home, archive)

    _assert_cold(home, archive, before)


def test_home_being_removed_without_an_archive_is_put_back(paths: tuple[Path, Path]) -> None:
    home, archive = paths
    before = _home(home)
    home.rename(home.with_name("home.removing"))

    recover(home, archive)

    _assert_warm(home, archive, before)


@pytest.mark.parametrize("state", ["warm", "cold", "new"])
def test_settled_states_are_left_alone(paths: tuple[Path, Path], state: str) -> None:
    home, archive = paths
    before = _cold(home, archive) if state == "cold" else _home(home) if state == "warm" else {}
    archived = archive.read_bytes() if state == "cold" else None

    recover(home, archive)
    recover(home, archive)

    if state == "cold":
        assert archive.read_bytes() == archived
        _assert_cold(home, archive, before)
    elif state == "warm":
        _assert_warm(home, archive, before)
    else:
        assert not home.exists()
        assert not archive.exists()


def test_damaged_archive_is_refused_and_nothing_is_restored(paths: tuple[Path, Path]) -> None:
    home, archive = paths
    _cold(home, archive)
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside large.bin's data: only the gzip CRC at the very end can tell
    archive.write_bytes(bytes(data))

    with pytest.raises(ArchiveError):
        verify_archive(archive)
    with pytest.raises(ArchiveError):
        restore_home(archive, home)

    assert not home.exists()
    assert not home.with_name("home.restoring").exists()
    assert archive.exists()


def test_an_archive_that_fails_its_verification_is_not_left_beside_the_home(
        paths: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Mocked: the disk's fault (what it reads back differs from what was written), which cannot be made here; the
    verification itself is the real one. A damaged archive left under the archive's name beside a home that stays
    WARM took the disk room of a second copy of the home until the gateway's next start."""
    home, archive = paths
    before = _home(home)

    def read_back_damaged(path: Path, expected_entries: int | None = None) -> int:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        return verify_archive(path, expected_entries)

    monkeypatch.setattr(archive_module, "verify_archive", read_back_damaged)
    with pytest.raises(ArchiveError, match="is damaged"):
        archive_home(home, archive)

    assert snapshot(home) == before
    assert list(archive.parent.iterdir()) == []


def test_an_archive_that_ends_early_is_refused_when_entries_are_expected(tmp_path: Path) -> None:
    """A tar end-of-archive block in the middle of a gzip stream whose CRC is intact: walking the members stops
    there without an error, so only the count of what was written tells that files are missing."""
    home = tmp_path / "home"
    home.mkdir()
    for name in ("a", "b", "c"):
        (home / name).write_text(name * 700)
    plain = tmp_path / "plain.tar"
    with tarfile.open(plain, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("a", "b", "c"):
            tar.add(home / name, arcname=name)
    data = bytearray(plain.read_bytes())
    second = 512 + 1024  # a's header, then its 700 bytes in whole blocks
    assert data[second:second + 1] == b"b"  # the name field of b's header
    data[second:second + 512] = bytes(512)
    archive = tmp_path / "cut.tar.gz"
    archive.write_bytes(gzip.compress(bytes(data)))

    assert verify_archive(archive) == 1
    with pytest.raises(ArchiveError, match="has 1 entries, expected 3"):
        verify_archive(archive, expected_entries=3)


def test_a_home_restored_beside_what_its_deletion_left_goes_cold_again(paths: tuple[Path, Path]) -> None:
    """``home.removing`` is left when a process still writing in it kept it from being deleted: the next archive
    deletes it first, or the home could never be moved out of the way again and stayed WARM for good."""
    home, archive = paths
    before = _home(home)
    left = home.with_name("home.removing") / "kept-busy"
    left.mkdir(parents=True)
    (left / "file").write_text("written after the archive was verified")

    archive_home(home, archive)

    _assert_cold(home, archive, before)


def test_files_of_every_length_around_a_skipped_hole_come_back_whole(paths: tuple[Path, Path]) -> None:
    """A restore writes a file in pieces of ``_HOLE`` bytes and skips those of zeros: the last byte of a file one
    byte past a piece must come back too, and a file of zeros come back as long as it was."""
    home, archive = paths
    home.mkdir(parents=True)
    hole = archive_module._HOLE
    for length in (1, 2, hole - 1, hole, hole + 1, 2 * hole + 1):
        (home / f"data-{length}").write_bytes(os.urandom(length))
        (home / f"zeros-{length}").write_bytes(bytes(length - 1) + b"\x01")
        (home / f"hole-{length}").write_bytes(bytes(length))
    before = snapshot(home)
    archive_home(home, archive)

    _assert_cold(home, archive, before)


def test_a_file_of_more_data_pieces_than_a_map_holds_is_stored_whole(paths: tuple[Path, Path],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ``_MOST_PIECES`` pieces a file is stored with its holes as zeros; a map cut at the limit instead lost
    every piece after it, stored as a hole."""
    home, archive = paths
    home.mkdir(parents=True)
    monkeypatch.setattr(archive_module, "_MOST_PIECES", 2)
    with open(home / "disk.img", "wb") as image:
        for index in range(4):  # two past the limit: the map cut at it, or a piece after it
            image.seek(index << 20)
            image.write(os.urandom(100))
    before = snapshot(home)
    archive_home(home, archive)

    _assert_cold(home, archive, before)


def test_archive_and_restore_leave_no_file_open(paths: tuple[Path, Path]) -> None:
    """The gateway archives and restores for as long as it runs: a descriptor left per pass runs it out of them."""
    home, archive = paths
    fill_home(home, big=1 << 16, small_files=5)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        archive_home(home, archive)
        restore_home(archive, home)
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_home_comes_back_on_debian_12s_python(paths: tuple[Path, Path]) -> None:
    """Debian 12's python3 is 3.11.2, older than tarfile's extraction filters (3.11.4): a restore asking for one
    failed there every time, so an archived workspace never woke on the distribution's own Python."""
    home, archive = paths
    before = _cold(home, archive)
    restore = ("import sys, tarfile; from pathlib import Path; from gateway.lifecycle.archive import restore_home\n"
               "assert not hasattr(tarfile, 'fully_trusted_filter'), sys.version  # else this proves nothing\n"
               "restore_home(Path(sys.argv[1]), Path(sys.argv[2]))")
    done = subprocess.run([DEBIAN_PYTHON, "-I", "-c", restore, str(archive), str(home)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    _assert_warm(home, archive, before)

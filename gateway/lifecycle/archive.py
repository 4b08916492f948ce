"""Home directory ⇄ compressed archive, crash-safe, as blocking functions meant for a worker thread.

Ordering is what makes every interruption recoverable from the files alone:
archive: write ``X.tmp`` → fsync → verify → rename to ``X`` → rename home to ``home.removing`` → delete it;
restore: extract into ``home.restoring`` → check the gzip CRC → sync → rename to ``home`` → delete the archive.
So ``home`` next to an archive is always complete, ``home.removing`` only exists once the archive is verified
(and is left over, next to the home restored from that archive, when a process still running in it kept it from
being deleted), and ``home.restoring`` is never trusted.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import errno
import io
import logging
import os
import shutil
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import StrOrBytesPath, SupportsRead, WriteableBuffer

log = logging.getLogger(__name__)
_FILTERS = hasattr(tarfile, "fully_trusted_filter")
"""Extraction filters came with Python 3.11.4 (and 3.12 warns without one); Debian 12's python3 is 3.11.2, whose
``extractall`` does what the filter ``fully_trusted`` names. The archive is the gateway's own, written from the
home's tree with every name under ``.``; what it holds (symbolic links out of the home included) is the owner's."""


class ArchiveError(Exception):
    """The archive could not be written, verified or restored; nothing was removed."""


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_filesystem(path: Path) -> None:
    """Flush every file under ``path`` to disk before the archive that backs it is deleted.

    One ``syncfs`` of the file system instead of an fsync per file: homes hold tens of thousands of files.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError, AttributeError):
            if ctypes.CDLL(None, use_errno=True).syncfs(fd) == 0:
                return
        os.sync()
    finally:
        os.close(fd)


def _remove_tree(path: Path) -> None:
    """Delete ``path`` and everything under it, folders its user may not write in too; a missing ``path`` is fine.

    Go's module cache makes its folders 0555, and only root may delete in them as they are: on a refusal, every
    folder left is made its user's to read and write, each before it is listed, and deleting starts again.
    """
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return
    except PermissionError:
        _let_me_write(path)
        for folder, folders, _files in os.walk(path):
            for name in folders:
                _let_me_write(os.path.join(folder, name))
        shutil.rmtree(path)


def _discard(path: Path) -> None:
    """Delete what is left of a home that is whole elsewhere (in its archive, or restored from it), or say why not.

    A process its workspace's stop did not find (one that left its process group and its environment) can go on
    adding files to the folder being deleted, so the deletion may fail: that loses nothing, and must neither fail
    the archive that made it safe nor the next start, which tries again."""
    try:
        _remove_tree(path)
    except OSError as exc:
        log.warning("could not delete %s, whose files are safe elsewhere; the next start tries again: %s", path, exc)


def _let_me_write(folder: str | Path) -> None:
    """Add the user's own rights to a folder's mode; never through a link, which may lead out of the home."""
    with contextlib.suppress(OSError):
        mode = os.lstat(folder).st_mode
        if stat.S_ISDIR(mode):
            os.chmod(folder, stat.S_IMODE(mode) | stat.S_IRWXU)


_MOST_PIECES = 100_000
"""Pieces of data a file with holes is stored as at most; one with more is stored whole (its map would be larger
than what its holes save, and is held in memory)."""
_MOST_LINKED = 1_000_000
"""Files with several names (hard links: pnpm's store, say) whose archived name is kept, some 200 bytes each."""
_LARGEST_STORED = 0o77777777777
"""Bytes a member's header holds the stored size of; tarfile would move a larger one to a PAX ``size``, which its
reader applies to a sparse file's real size instead."""


def _pieces(fd: int, size: int) -> list[tuple[int, int]] | None:
    """Where a file's data lies, as (offset, length), when it has holes worth skipping; else None."""
    pieces: list[tuple[int, int]] = []
    stored = offset = 0
    position = os.lseek(fd, 0, os.SEEK_CUR)  # where a file stored whole is read from
    try:
        while offset < size and len(pieces) <= _MOST_PIECES:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # nothing but a hole to the end
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            if start >= end:
                break
            pieces.append((start, end - start))
            stored += end - start
            offset = end
    except OSError:  # a file system that cannot say where its holes are
        return None
    finally:
        os.lseek(fd, position, os.SEEK_SET)
    if stored >= size or len(pieces) > _MOST_PIECES or stored > _LARGEST_STORED - (1 << 20):
        return None
    return pieces


class _Pieces(io.RawIOBase):
    """The data of a GNU sparse 1.0 member: its map (piece count, then offset and length of each, a line each,
    padded to a block), then each piece's bytes, read from the file as the archive is written."""

    def __init__(self, fd: int, pieces: list[tuple[int, int]]) -> None:
        super().__init__()
        lines = [len(pieces), *(number for piece in pieces for number in piece)]
        head = "".join(f"{number}\n" for number in lines).encode()
        self._head = memoryview(head + tarfile.NUL * (-len(head) % tarfile.BLOCKSIZE))
        self.size = len(self._head) + sum(length for _, length in pieces)
        self._fd, self._pieces, self._at = fd, iter(pieces), (0, 0)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        if self._head:
            count = min(len(view), len(self._head))
            view[:count], self._head = self._head[:count], self._head[count:]
            return count
        offset, left = self._at
        while left == 0:
            offset, left = next(self._pieces, (0, -1))
            if left < 0:
                return 0
        data = os.pread(self._fd, min(len(view), left), offset)  # a file cut short meanwhile: tarfile says so
        view[:len(data)] = data
        self._at = (offset + len(data), left - len(data))
        return len(data)


class _HomeTarWriter(tarfile.TarFile):
    """A home's archive being written, whose files with holes are stored without them (GNU sparse 1.0, which
    tarfile reads): an owner's ``truncate -s 1T`` took hours of a CPU to archive, and the workspace's lock and one
    of the gateway's few file threads with it, to store a gigabyte of compressed zeros."""

    def addfile(self, tarinfo: tarfile.TarInfo, fileobj: SupportsRead[bytes] | None = None) -> None:
        pieces = None
        if isinstance(fileobj, io.BufferedReader) and tarinfo.isreg():  # a home's file, as ``add`` opens it
            self._forget_unless_linked(os.fstat(fileobj.fileno()))
            pieces = _pieces(fileobj.fileno(), tarinfo.size)
        if not isinstance(fileobj, io.BufferedReader) or pieces is None:
            super().addfile(tarinfo, fileobj)
            self.members.clear()  # type: ignore[attr-defined]  # see ``_members``
            return
        data = _Pieces(fileobj.fileno(), pieces)
        sparse = copy.copy(tarinfo)
        sparse.size = data.size
        sparse.pax_headers = {**tarinfo.pax_headers, "GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                              "GNU.sparse.name": tarinfo.name, "GNU.sparse.realsize": str(tarinfo.size)}
        super().addfile(sparse, io.BufferedReader(data))
        self.members.clear()  # type: ignore[attr-defined]  # see ``_members``

    def _forget_unless_linked(self, info: os.stat_result) -> None:
        """tarfile remembers every regular file's name by its inode, to store a later name of it as a hard link:
        only a file with more names than one needs it, and only so many of them (further names of a file it
        forgot are stored as copies), or a home's millions of files take the gateway's memory."""
        inodes: dict[tuple[int, int], str] = self.inodes  # type: ignore[attr-defined]  # not in typeshed
        if info.st_nlink == 1 or len(inodes) > _MOST_LINKED:
            inodes.pop((info.st_ino, info.st_dev), None)


def _read_to_end(tar: tarfile.TarFile) -> None:
    """Read the compressed stream to its very end, so gzip checks its CRC and length trailer.

    Walking the members stops at the tar end-of-archive blocks, before the trailer: a flipped bit inside a
    file's data would pass unnoticed.
    """
    assert tar.fileobj is not None
    while tar.fileobj.read(1 << 20):
        pass


def archive_home(home: Path, archive: Path) -> None:
    """Write ``home`` to ``archive`` atomically and verify it; then, and only then, remove ``home``."""
    tmp = archive.with_name(archive.name + ".tmp")
    removing = home.with_name(home.name + ".removing")
    written = 0

    restoring = os.fsencode(home.with_name(home.name + ".restoring"))

    def count(member: tarfile.TarInfo) -> tarfile.TarInfo:
        nonlocal written
        written += 1
        # A restore writes each member as home.restoring/./…, longer than the home/… it was read as: a path that
        # would not fit there must keep its home out of an archive it could never come back from.
        if len(restoring) + 1 + len(os.fsencode(member.name)) >= _PATH_MAX:
            raise OSError(errno.ENAMETOOLONG, "a path in the home is too long to be restored",
                          member.name.removeprefix("./"))
        return member

    try:
        _discard(removing)  # what an earlier deletion left: the home next to it was restored from its archive
        archive.parent.mkdir(parents=True, exist_ok=True)
        with _HomeTarWriter.open(tmp, "w:gz", compresslevel=6) as tar:
            tar.add(home, arcname=".", recursive=True, filter=count)
        _fsync_path(tmp)
        # Verified before it takes the archive's name: one that fails is never left beside the home it copies.
        verify_archive(tmp, expected_entries=written)
        os.replace(tmp, archive)
        _fsync_path(archive.parent)
    except (OSError, tarfile.TarError, ArchiveError) as exc:
        with contextlib.suppress(OSError):  # e.g. the archives folder itself is missing or not a folder
            tmp.unlink(missing_ok=True)
        raise ArchiveError(f"archiving {home.name} failed: {exc}") from exc
    try:
        os.replace(home, removing)
    except OSError as exc:  # a leftover ``removing`` that could not be deleted: the home stays, its archive goes
        archive.unlink(missing_ok=True)
        raise ArchiveError(f"archiving {home.name} failed: {removing.name} is in the way: {exc}") from exc
    _discard(removing)


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Each member of ``tar`` in turn, which it forgets once read.

    tarfile keeps every member it reads (or writes) in a list, about a kilobyte each, for lookups by name that
    nothing here makes (a hard link is made from its target's path): an owner's loop of ten million empty files,
    which cost them inodes only, took the gateway ten gigabytes to archive, verify or restore."""
    while (member := tar.next()) is not None:
        tar.members.clear()  # type: ignore[attr-defined]  # not in typeshed
        yield member


def verify_archive(archive: Path, expected_entries: int | None = None) -> int:
    """Read the whole archive, to the gzip CRC at its end; raise unless it is complete and intact."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            entries = 0
            for member in _members(tar):
                if member.isfile() and not member.issparse():  # its holes would be read as zeros
                    source = tar.extractfile(member)
                    assert source is not None
                    while source.read(1 << 20):
                        pass
                entries += 1
            _read_to_end(tar)
    except (OSError, EOFError, tarfile.TarError) as exc:
        raise ArchiveError(f"archive {archive.name} is damaged: {exc}") from exc
    if expected_entries is not None and entries != expected_entries:
        raise ArchiveError(f"archive {archive.name} has {entries} entries, expected {expected_entries}")
    return entries


_PATH_MAX = os.pathconf("/", "PC_PATH_MAX") if hasattr(os, "pathconf") else 4096
"""Bytes of a path the kernel takes, its final NUL included (4096 on Linux)."""
_HOLE = 64 << 10
"""Bytes of zeros a restore skips over at once instead of writing them (a multiple of any file system's block)."""


class _HomeTar(tarfile.TarFile):
    """A home's archive, whose files are written back with their holes.

    A file of holes (``truncate -s 10T``, a VM image, a preallocated database) takes no room in a home, and the
    archive holds its zeros as compressed data; written out as zeros, a home that took a megabyte came back taking
    ten terabytes, or did not come back at all once the disk was full, and it filled everyone's disk meanwhile.
    Runs of zeros are skipped with a seek instead, and the file's length set at the end."""

    def makefile(self, tarinfo: tarfile.TarInfo, targetpath: StrOrBytesPath) -> None:
        if tarinfo.sparse is not None:  # a sparse member (not of our writing) says where its holes are
            super().makefile(tarinfo, targetpath)
            return
        source = self.fileobj
        assert source is not None
        source.seek(tarinfo.offset_data)
        zeros = bytes(_HOLE)
        left = tarinfo.size
        with open(targetpath, "wb") as target:
            while left > 0:
                chunk = source.read(min(_HOLE, left))
                if not chunk:
                    raise tarfile.ReadError("unexpected end of data")
                if chunk == zeros[:len(chunk)]:
                    target.seek(len(chunk), os.SEEK_CUR)
                else:
                    target.write(chunk)
                left -= len(chunk)
            target.truncate()  # the length, when the file ends in a hole


def extract(tar: tarfile.TarFile, into: Path) -> None:
    """Every member of one of the gateway's own archives, as it was archived."""
    if _FILTERS:
        tar.extractall(into, _members(tar), filter="fully_trusted")
    else:
        tar.extractall(into, _members(tar))


def restore_home(archive: Path, home: Path) -> None:
    """Unpack ``archive`` into ``home`` via a temporary directory; delete the archive last."""
    restoring = home.with_name(home.name + ".restoring")
    try:
        _remove_tree(restoring)  # what a restore cut short left
        restoring.mkdir(parents=True)
        with _HomeTar.open(archive, "r:gz") as tar:
            extract(tar, restoring)
            _read_to_end(tar)
        _sync_filesystem(restoring)
    except (OSError, EOFError, tarfile.TarError) as exc:
        with contextlib.suppress(OSError):
            _remove_tree(restoring)
        raise ArchiveError(f"restoring {home.name} failed: {exc}") from exc
    os.replace(restoring, home)
    _fsync_path(home.parent)
    archive.unlink()


def recover(home: Path, archive: Path) -> None:
    """Finish or undo whatever a crash interrupted, judged from the files alone."""
    tmp = archive.with_name(archive.name + ".tmp")
    removing = home.with_name(home.name + ".removing")
    restoring = home.with_name(home.name + ".restoring")
    tmp.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        _remove_tree(restoring)
    if removing.exists():
        if archive.exists() or home.exists():  # the home is whole in its archive, or was restored from it
            _discard(removing)
        else:
            os.replace(removing, home)
    if home.exists() and archive.exists():
        archive.unlink()

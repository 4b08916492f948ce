"""Port labels from a workspace's ``.devcontainer/devcontainer.json`` (``portsAttributes.*.label``), as Codespaces
reads them, so the hub names port 5173 "Web app" without anyone setting it twice.

devcontainer.json is JSON with comments and trailing commas (JSONC); a file that still does not parse gives no
labels rather than an error: a typo in a workspace's file must not break the hub.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

from gateway.lifecycle.base import LABEL_LONGEST, showable

CANDIDATES = (Path(".devcontainer") / "devcontainer.json", Path(".devcontainer.json"))
_JSONC_NOISE = re.compile(r'("(?:\\.|[^"\\])*(?:"|\\?\Z))|//[^\n]*|/\*.*?(\*/|\Z)|,(?=\s*[}\]])', re.DOTALL)
"""Strings (kept), comments and trailing commas. A string or comment never closed runs to the end of the text rather
than not matching: the search would start again inside it, at each quote or ``/*`` after it, and a megabyte of them
took the loop that serves everyone half an hour."""
_RANGE = re.compile(r"(\d{1,5})(?:-(\d{1,5}))?")
_MAX_RANGE = 1000
_MOST_PORTS = 65535
"""Ports named in all (ranges counted whole) before the rest of the file is ignored: a megabyte of overlapping
ranges named 40 million of them, seconds of the loop at each change of the file."""
MOST_READ = 1 << 20
"""Bytes read of a file in a workspace home: a label or settings file is a few kilobytes."""
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def read_regular(path: Path, limit: int) -> bytes | None:
    """The first ``limit`` bytes of ``path`` when it is (or links to) a regular file, else None.

    Files in a workspace home are its owner's to replace: a FIFO there blocks an open and a read until a writer
    comes, and a device like /dev/zero never ends, either of which would hang the gateway (its event loop, or a
    workspace's lock). The open does not wait (O_NONBLOCK) and only what ``fstat`` calls a regular file is read,
    so no swap made between a check and the read gets past it. A missing or unreadable file raises ``OSError``.
    """
    fd = os.open(path, _READ_FLAGS)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks: list[bytes] = []
        left = limit
        while left > 0 and (chunk := os.read(fd, left)):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _quiet(match: re.Match[str]) -> str:
    """A string stays and a comment or a trailing comma goes, but a comment never closed stays: not JSON, as before."""
    string, closed = match.group(1, 2)
    if string is not None:
        return string
    return match[0] if closed == "" else ""


def parse_labels(text: str) -> dict[int, str]:
    """``{"portsAttributes": {"3000": {"label": "Web"}, "9000-9002": {"label": "Workers"}}}`` → port → label."""
    try:
        data = json.loads(_JSONC_NOISE.sub(_quiet, text))
    except (ValueError, RecursionError):  # nested deeper than the parser goes: no devcontainer.json either
        return {}
    attributes = data.get("portsAttributes") if isinstance(data, dict) else None
    labels: dict[int, str] = {}
    named = 0
    for key, value in (attributes or {}).items() if isinstance(attributes, dict) else ():
        match = _RANGE.fullmatch(str(key).strip())
        label = value.get("label") if isinstance(value, dict) else None
        if match is None or not isinstance(label, str) or not label.strip():
            continue  # process-name and regex keys name no port
        if not showable(label):
            continue  # as the hub's own label API refuses it
        first = int(match[1])
        last = int(match[2]) if match[2] else first
        if 1 <= first <= last <= 65535 and last - first < _MAX_RANGE:
            named += last - first + 1
            if named > _MOST_PORTS:
                break
            labels.update(dict.fromkeys(range(first, last + 1), label.strip()[:LABEL_LONGEST]))
    return labels


class LabelFile:
    """The labels of one workspace folder, read again only when the file changes (the hub asks twice a second)."""

    def __init__(self, folder: Path) -> None:
        self._paths = [folder / candidate for candidate in CANDIDATES]  # joined once: the hub asks per workspace
        self._stamp: tuple[Path, float, int] | None = None
        self._labels: dict[int, str] = {}

    def labels(self) -> dict[int, str]:
        for path in self._paths:
            try:
                info = path.stat()
            except OSError:
                continue
            stamp = (path, info.st_mtime, info.st_size)
            if stamp != self._stamp:
                try:
                    data = read_regular(path, MOST_READ)
                except OSError:
                    data = None
                self._labels = {} if data is None else parse_labels(data.decode(errors="replace"))
                self._stamp = stamp
            return self._labels
        self._stamp, self._labels = None, {}
        return self._labels

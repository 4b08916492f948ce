"""Port labels from a workspace's ``.devcontainer/devcontainer.json`` (``portsAttributes.*.label``), as Codespaces
reads them, so the hub names port 5173 "Web app" without anyone setting it twice.

devcontainer.json is JSON with comments and trailing commas (JSONC); a file that still does not parse gives no
labels rather than an error: a typo in a workspace's file must not break the hub.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

CANDIDATES = (Path(".devcontainer") / "devcontainer.json", Path(".devcontainer.json"))
_JSONC_NOISE = re.compile(r'("(?:\\.|[^"\\])*")|//[^\n]*|/\*.*?\*/|,(?=\s*[}\]])', re.DOTALL)
_RANGE = re.compile(r"(\d{1,5})(?:-(\d{1,5}))?")
_MAX_RANGE = 1000


def parse_labels(text: str) -> dict[int, str]:
    """``{"portsAttributes": {"3000": {"label": "Web"}, "9000-9002": {"label": "Workers"}}}`` → port → label."""
    try:
        data = json.loads(_JSONC_NOISE.sub(lambda m: m.group(1) or "", text))
    except ValueError:
        return {}
    attributes = data.get("portsAttributes") if isinstance(data, dict) else None
    labels: dict[int, str] = {}
    for key, value in (attributes or {}).items() if isinstance(attributes, dict) else ():
        match = _RANGE.fullmatch(str(key).strip())
        label = value.get("label") if isinstance(value, dict) else None
        if match is None or not isinstance(label, str) or not label.strip():
            continue  # process-name and regex keys name no port
        first = int(match[1])
        last = int(match[2]) if match[2] else first
        if 1 <= first <= last <= 65535 and last - first < _MAX_RANGE:
            labels.update(dict.fromkeys(range(first, last + 1), label.strip()[:80]))
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
                stat = path.stat()
            except OSError:
                continue
            stamp = (path, stat.st_mtime, stat.st_size)
            if stamp != self._stamp:
                try:
                    self._labels = parse_labels(path.read_text(errors="replace")[:1 << 20])
                except OSError:
                    self._labels = {}
                self._stamp = stamp
            return self._labels
        self._stamp, self._labels = None, {}
        return self._labels

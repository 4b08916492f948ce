"""Settings a local workspace's code-server gets before it starts.

Local workspaces share the host's network and run as one user. code-server's default way of noticing dev servers
(``remote.autoForwardPortsSource: process``) lists every listening socket on the machine every few seconds, so each
IDE announces the servers of every other workspace (with their command lines) and of anything else on the host,
while it never sees a server on the workspace's own address (it counts only localhost and wildcard listeners).
Reading the URLs printed in the workspace's own terminals (``output``) answers within half a second, for this
workspace only; a server that prints no localhost or wildcard URL (one on ``$HOST``, or Python's http.server on its
default ``::``) is forwarded from the Ports view by hand. The Kubernetes runtime needs none of this: a pod has a
network and a process list of its own.

Only keys the owner has not set are added, and a settings file code-server would read but plain JSON cannot (it
allows comments and trailing commas) is left as written rather than rewritten without its comments. So is anything
that is not a regular file (a FIFO, a link to a device): the owner's home is theirs to fill, and the start waits
on none of it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from gateway.lifecycle.devcontainer import MOST_READ, read_regular

log = logging.getLogger(__name__)

SEEDED: Mapping[str, object] = {"remote.autoForwardPortsSource": "output"}
_FLAG = "--user-data-dir"
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
"""Only a file this start creates is written: an existing name (a FIFO would block the open) is never opened."""


def settings_file(command: Sequence[str], home: Path, env: Mapping[str, str]) -> Path | None:
    """code-server's user settings file for this command line, started in ``home`` with ``env``; None when the
    command does not run code-server. A data folder set in code-server's own config.yaml is not looked for."""
    if not command or Path(command[0]).name != "code-server":
        return None
    data: str | None = None
    for index, argument in enumerate(command[1:], start=1):  # the last one wins, as in code-server's parser
        if argument == _FLAG and index + 1 < len(command):
            data = command[index + 1]
        elif argument.startswith(_FLAG + "="):
            data = argument.removeprefix(_FLAG + "=")
    if data is None:  # code-server's default, as its env-paths computes it
        return home / (env.get("XDG_DATA_HOME") or ".local/share") / "code-server" / "User" / "settings.json"
    return home / data / "User" / "settings.json"


def seed_settings(path: Path) -> None:
    """Add the keys of ``SEEDED`` that ``path`` lacks. Never fails the start, nor holds it: an IDE that notices
    fewer ports is better than a workspace that does not start, or one whose lock a FIFO holds for ever."""
    try:
        text = read_regular(path, MOST_READ)
    except FileNotFoundError:
        text = b"{}"
    except OSError:
        return  # unreadable: the owner's file stays as it is
    try:
        current = json.loads(text) if text is not None else None
    except (ValueError, RecursionError):
        return  # comments, or nested deeper than the parser goes: as written, as devcontainer.json's are read
    if not isinstance(current, dict) or SEEDED.keys() <= current.keys():
        return
    merged = {**SEEDED, **current}
    tmp = path.with_name(path.name + ".codehub.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)
        with os.fdopen(os.open(tmp, _NEW_FILE, 0o666), "w") as handle:
            handle.write(json.dumps(merged, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not write code-server settings %s: %s", path, exc)
        with contextlib.suppress(OSError):
            tmp.unlink()

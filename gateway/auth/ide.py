"""The IDE's own lock: a code-server pod admits only requests carrying a per-workspace secret the gateway holds.

Defence in depth for clusters where NetworkPolicy is not enforced: another workspace, or any pod, that reaches a
workspace's IDE port directly meets code-server's login page. How code-server checks it (4.x, read in
``out/node/http.js`` ``authenticated`` and ``out/node/util.js`` ``isCookieValid``): with ``--auth password`` and
``$HASHED_PASSWORD`` set to a value without ``$argon`` (its legacy "SHA256" method), a request is authenticated when
its ``code-server-session`` cookie equals that value, compared in constant time; the variable is deleted from its
environment at start, so terminals do not inherit it. The gateway gives each pod ``HMAC-SHA256(key, workspace)`` as
that value and puts the same cookie on every IDE request it proxies, replacing whatever the client sent under that
name. The key is a file only the gateway reads (``kubernetes.ide_key_file``); it never leaves the gateway, and each
pod knows only its own workspace's secret.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from pathlib import Path

from multidict import CIMultiDict

from gateway.config import Config, ConfigError
from gateway.lifecycle.base import WorkspaceSpec

IDE_COOKIE = "code-server-session"
HASHED_PASSWORD = "HASHED_PASSWORD"
MIN_KEY_BYTES = 32


@functools.cache
def load_key(path: Path) -> bytes:
    """The key, read once per process; a missing or short file stops start-up with one line."""
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"config error: kubernetes.ide_key_file: cannot read {path}: {exc.strerror}; create it "
                          "with `head -c 48 /dev/urandom | base64 > ide-key` (README.md)") from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"config error: kubernetes.ide_key_file: {path} holds {len(key)} bytes, fewer than "
                          f"{MIN_KEY_BYTES}; a guessable key would unlock every IDE")
    return key


def ide_secret(key: bytes, workspace: str, incarnation: str) -> str:
    """The IDE secret of the workspace of this name and ``incarnation`` (its Workspace object's uid): what its
    pod's code-server takes as ``$HASHED_PASSWORD``.

    Its owner learns it (the gateway sends it to whatever listens on the IDE port, and code-server's
    ``/proc/PID/environ`` keeps it), and can keep it after the workspace is deleted: made from the name alone, it
    would open the IDE of whoever makes a workspace of that name next, to anyone who reaches its pod directly."""
    return hmac.new(key, f"codehub-ide:{workspace}:{incarnation}".encode(), hashlib.sha256).hexdigest()


def secret_for(config: Config, spec: WorkspaceSpec) -> str | None:
    """The secret to send to this workspace's IDE: None unless the Kubernetes runtime gives its pods one (local
    workspaces run as the gateway's own user on loopback, where a secret in their environment guards nothing)."""
    key_file = config.kubernetes.ide_key_file
    if config.runtime != "kubernetes" or key_file is None:
        return None
    return ide_secret(load_key(key_file), spec.id, spec.incarnation)


def put_ide_cookie(headers: CIMultiDict[str], secret: str | None) -> None:
    """Drop every ``code-server-session*`` cookie the client sent and, with a secret, add the workspace's own."""
    parts = [part.strip() for part in headers.get("Cookie", "").split(";")]
    kept = [part for part in parts if part and not part.startswith(IDE_COOKIE)]
    if secret is not None:
        kept.append(f"{IDE_COOKIE}={secret}")
    if kept:
        headers["Cookie"] = "; ".join(kept)
    else:
        headers.pop("Cookie", None)

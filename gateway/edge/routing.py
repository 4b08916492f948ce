"""Where a request goes, decided from its Host and path alone: no I/O, no state, table-tested.

Health and readiness answer on any host that is not a preview host, so probes can use pod IPs (metrics have a
port of their own). Share URLs are ``{port}-{workspace}.{preview_domain}``; the IDE is
``ide-{workspace}.{preview_domain}``, an origin of its own like every preview (a port is digits, so the labels never
collide). The hub host holds only the gateway's own pages: nothing a workspace serves may run there, where it could
call the API as its visitor. Its old IDE address ``{hub}/w/{workspace}/…`` only redirects. Hosts are compared
exactly (after case folding and default-port
normalisation), so ``8000-demo.localhost:8080.evil.test`` or ``user@host`` never match a configured domain.
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass
from typing import NamedTuple

from yarl import URL

from gateway.config import WORKSPACE_ID
from gateway.errors import BadRequest, GatewayError, NotFound

RESERVED_PREFIX = "/_codehub/"
WAKE_EVENTS_PATH = "/_codehub/wake/events"
"""On a preview's or the IDE's own host: the progress of its wake, for the waiting page (Server-Sent Events)."""
_DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST = re.compile(r"(?P<name>[a-z0-9.-]+|\[[0-9a-f:.]+\])(?::(?P<port>[0-9]{1,5}))?")
_ANY_HOST_PATHS = frozenset({"/healthz", "/readyz"})
_LABEL = re.compile(r"(?:(?P<port>[0-9]{1,5})|(?P<ide>ide))-(?P<workspace>[a-z0-9-]+)")
_IDE_PATH = re.compile(r"/w/(?P<workspace>[^/?]*)(?P<rest>/.*)?", re.DOTALL)
_IDE_PORT_PROXY = re.compile(r"/(?:abs)?proxy(?:[/;?]|$)", re.IGNORECASE)
"""code-server's own port proxy (its router ignores case): it would serve a workspace port on the IDE's origin."""


class Kind(enum.Enum):
    PREVIEW = "preview"
    RESERVED = "reserved"
    IDE = "ide"
    IDE_MOVED = "ide-moved"
    HUB = "hub"

    # Members are singletons, so hashing by identity is as good as by name; ``Enum.__hash__`` is a Python function,
    # called each time ``KIND_LABELS`` is read (twice a request).
    __hash__ = object.__hash__


KIND_LABELS = {kind: kind.value for kind in Kind}
"""Each kind's label in logs and metrics, looked up: an enum's ``value`` is a Python-level descriptor, a cost on
every request."""
_HUB, _IDE, _IDE_MOVED, _PREVIEW, _RESERVED = Kind.HUB, Kind.IDE, Kind.IDE_MOVED, Kind.PREVIEW, Kind.RESERVED
"""Read as globals on every request: Python 3.11 looks enum members up through a slow ``__getattr__`` hook."""


class Target(NamedTuple):
    """The decision: which kind of route, and for workspace routes which workspace, port (None: the IDE) and path
    (for ``IDE_MOVED``, the path on the IDE's origin)."""

    kind: Kind
    workspace: str | None = None
    port: int | None = None
    path: str = "/"


@dataclass(frozen=True, slots=True)
class Hosts:
    """The configured public names, normalised once so that routing each request is string comparison: ``hub`` and
    ``preview_suffix`` are ``name:port`` with the port always spelt out (``normalise_host``)."""

    scheme: str
    hub: str
    preview_suffix: str

    @classmethod
    def from_urls(cls, hub_url: str, preview_domain: str) -> Hosts:
        url = URL(hub_url)
        scheme = url.scheme
        hub = normalise_host(url.raw_authority, scheme)  # as sent: an IDN's ASCII, an IPv6 address's brackets
        preview = normalise_host(preview_domain, scheme)
        if hub is None or preview is None:
            raise ValueError("hub_url and preview_domain must be valid host names")
        return cls(scheme=scheme, hub=hub, preview_suffix=preview)

    def share_url(self, workspace: str, port: int | str, path: str = "/") -> str:
        """The public URL of a port (``port`` may be the template ``{port}`` for links to every port)."""
        name, _, host_port = self.preview_suffix.partition(":")
        suffix = name if int(host_port) == _DEFAULT_PORTS[self.scheme] else self.preview_suffix
        return f"{self.scheme}://{port}-{workspace}.{suffix}{path}"

    def ide_url(self, workspace: str, path: str = "/") -> str:
        """The IDE's own origin: ``ide-{workspace}`` under the preview domain."""
        return self.share_url(workspace, "ide", path)

    def origin(self, host: str) -> str:
        """The browser's ``Origin`` for a request that arrived with this (already routed) ``Host``."""
        return _origin(host, self.scheme)

    def hub_url(self, path: str = "/") -> str:
        return f"{self.origin(self.hub)}{path}"


@functools.lru_cache(maxsize=4096)
def normalise_host(host: str, scheme: str) -> str | None:
    """Lower-case ``name:port`` with the port always spelt out, or None when it is not a plain host.

    Cached: a handful of hosts carry nearly all requests, and this runs more than once for each. Only ASCII is
    folded and only HTTP's white space trimmed: ``str.lower`` makes the Kelvin sign a ``k`` and ``str.strip`` drops
    NEL and no-break spaces, which would route a host that a proxy in front sees as another."""
    host = host.strip(" \t")
    if not host.isascii():
        return None
    match = _HOST.fullmatch(host.lower())
    if match is None:
        return None
    name = match["name"].rstrip(".")
    if not name or ".." in name or name.startswith((".", "-")):
        return None
    port = int(match["port"]) if match["port"] else _DEFAULT_PORTS[scheme]
    if not 1 <= port <= 65535:
        return None
    return f"{name}:{port}"


def local_path(value: str | None) -> str:
    """A redirect target built from a request path or a ``next`` parameter that can only stay on this host.

    Browsers read ``//host``, ``/\\host`` and ``///host`` as another host and drop tabs and newlines before they
    look, so a leading run of slashes and backslashes becomes one slash and anything with control characters
    becomes ``/``. Every redirect the gateway derives from what a client sent goes through here."""
    if not value or value[0] not in "/\\" or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        return "/"
    return "/" + value.lstrip("/\\")


@functools.lru_cache(maxsize=4096)
def _origin(host: str, scheme: str) -> str:
    normalised = normalise_host(host, scheme)
    assert normalised is not None, "routing accepted the host"
    name, _, port = normalised.rpartition(":")
    return f"{scheme}://{name}" if int(port) == _DEFAULT_PORTS[scheme] else f"{scheme}://{normalised}"


def host_kind(host: str, hosts: Hosts) -> str:
    """The kind of host ``host`` is (``KIND_LABELS``), or ``unknown``: for an answer given before a request is
    routed (its head could not be read as it is)."""
    try:
        return KIND_LABELS[route(host, "/", hosts).kind]
    except GatewayError:
        return "unknown"


def route(host: str | None, raw_path: str, hosts: Hosts) -> Target:
    """Map ``Host`` and the raw (still percent-encoded) path to a target, or raise 400/404."""
    if not raw_path.startswith("/"):
        raise BadRequest("Only origin-form request targets (a path) are accepted.", code="bad-request-target")
    normalised = normalise_host(host or "", hosts.scheme)
    if normalised is None:
        raise BadRequest("The Host header is missing or malformed.", code="bad-host")
    if normalised == hosts.hub:
        return _hub_route(raw_path)
    label, _, rest = normalised.partition(".")
    if rest == hosts.preview_suffix:
        target = _preview_route(label, raw_path)
        if target.kind is _IDE and _IDE_PORT_PROXY.match(raw_path):
            assert target.workspace is not None
            raise NotFound("Workspace ports are not served on the IDE's origin: open a port at its own address, "
                           f"{hosts.share_url(target.workspace, '{port}')}", code="ide-proxy-off")
        return target
    if raw_path in _ANY_HOST_PATHS:
        return Target(_HUB, path=raw_path)
    raise NotFound(f"This gateway serves no site called {host}.", code="unknown-host")


def _preview_route(label: str, raw_path: str) -> Target:
    workspace, port = _preview_label(label)
    if raw_path.startswith(RESERVED_PREFIX):
        return Target(_RESERVED, workspace, port, raw_path)
    return Target(_PREVIEW if port is not None else _IDE, workspace, port, raw_path)


@functools.lru_cache(maxsize=4096)
def _preview_label(label: str) -> tuple[str, int | None]:
    """``{port}-{workspace}`` or ``ide-{workspace}`` (port None), read once per label (refusals are not cached:
    they raise)."""
    match = _LABEL.fullmatch(label)
    if match is None or not WORKSPACE_ID.fullmatch(match["workspace"]):
        raise BadRequest(
            "A preview address looks like {port}-{workspace}, for example 3000-myworkspace.", code="bad-preview-host"
        )
    if match["ide"]:
        return match["workspace"], None
    digits = match["port"]
    port = int(digits)
    if port >= 1 and digits != str(port):  # five digits at most: one with a leading zero is below 10000
        raise BadRequest(f"Port {digits} has a leading zero: write it as {port}.", code="bad-port")
    if not 1 <= port <= 65535:
        raise BadRequest(f"Port {digits} is not a port number between 1 and 65535.", code="bad-port")
    return match["workspace"], port


def _hub_route(raw_path: str) -> Target:
    match = _IDE_PATH.fullmatch(raw_path.partition("?")[0])
    if match is None:
        return Target(_HUB, path=raw_path)
    workspace = match["workspace"]
    if not WORKSPACE_ID.fullmatch(workspace):
        raise NotFound("There is no workspace with that name.", code="workspace-not-found")
    rest = raw_path[len(f"/w/{workspace}") :]
    return Target(_IDE_MOVED, workspace, path=rest if rest.startswith("/") else f"/{rest}")

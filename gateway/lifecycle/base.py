"""The lifecycle contract shared by every runtime.

A workspace's phase is derived from what the runtime observes (processes, directories, pods, volumes,
snapshots); the transitional phases only say that this gateway has an operation in flight. Readers get
state from memory (``get``/``list``) so the request path never waits on an API; changes are pushed through
``events()``, never polled for.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.errors import GatewayError, MethodNotAllowed


class Phase(enum.StrEnum):
    RUNNING = "RUNNING"
    WARM = "WARM"
    COLD = "COLD"
    STARTING = "STARTING"
    STOPPING = "STOPPING"
    ARCHIVING = "ARCHIVING"
    RESTORING = "RESTORING"
    FAILED = "FAILED"


class LifecycleError(GatewayError):
    """A lifecycle operation failed; the message is safe to show to the workspace's users."""

    status = 503
    code = "workspace-failed"
    title = "The workspace could not start"


LABEL_LONGEST = 80
"""Characters of a port's label the hub shows, set on the hub or read from devcontainer.json."""


def showable(text: str) -> bool:
    """Whether the hub may show ``text`` someone chose (a port's name, from the hub or devcontainer.json; a principal;
    a token's name): printable characters only, as a bidi override, a new line or an escape sequence would disguise
    it."""
    return text.isprintable()


@dataclass(frozen=True, slots=True)
class WorkspaceSpec:
    """What a workspace is meant to be: who owns it, who may use it, how its ports are shared."""

    id: str
    owner: str
    collaborators: tuple[str, ...] = ()
    ide_port: int = 13337
    ports: Mapping[int, str] = field(default_factory=dict)
    identity_ports: frozenset[int] = frozenset()
    """Ports whose app receives visitors' identity (with their consent); the owner opts each one in."""
    https_ports: frozenset[int] = frozenset()
    """Ports whose dev server speaks TLS (a self-signed certificate, e.g. ``vite --https``)."""
    labels: Mapping[int, str] = field(default_factory=dict)
    """Port names set on the hub (they win over the workspace's devcontainer.json)."""
    since: float = 0.0
    """When this workspace of this owner began, where a name can pass to someone else with links left behind (the
    local runtime): a share link made before it is an earlier workspace's of the same name, and opens nothing."""
    incarnation: str = ""
    """Which workspace of this name it is, where the name can pass to someone else (the Kubernetes runtime: the
    Workspace object's uid): its IDE secret is made from it, so a namesake's secret opens nothing of the old one's."""


@dataclass(frozen=True, slots=True)
class WorkspaceState:
    """A snapshot of one workspace: its spec, its observed phase and where its ports answer when RUNNING."""

    spec: WorkspaceSpec
    phase: Phase
    address: str | None = None
    message: str = ""
    since: float = field(default_factory=time.time)

    @property
    def id(self) -> str:
        return self.spec.id


@dataclass(frozen=True, slots=True)
class Event:
    workspace: str
    phase: Phase
    message: str = ""
    at: float = field(default_factory=time.monotonic)


class Subscription:
    """A subscriber's bounded queue, registered the moment it is created so no event after that is missed."""

    def __init__(self, hub: EventHub, maxsize: int) -> None:
        self._hub = hub
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        hub._subscribers.add(self)

    def close(self) -> None:
        self._hub._subscribers.discard(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        return await self.queue.get()


class EventHub:
    """Fan-out of lifecycle events to any number of subscribers, each with its own bounded queue.

    A subscriber that falls behind loses its oldest events rather than slowing the runtime down; the
    current state is always available from ``Runtime.get``, so a lost event is only a lost hint.
    """

    def __init__(self, maxsize: int = 256) -> None:
        self._subscribers: set[Subscription] = set()
        self._maxsize = maxsize
        self.published = 0
        """Events so far: what was worked out from the world at one count holds until the next."""

    def publish(self, event: Event) -> None:
        self.published += 1
        for subscriber in self._subscribers:
            if subscriber.queue.full():
                subscriber.queue.get_nowait()
            subscriber.queue.put_nowait(event)

    def subscribe(self) -> Subscription:
        return Subscription(self, self._maxsize)


class Runtime(abc.ABC):
    """What the gateway needs from a place where workspaces run."""

    def __init__(self) -> None:
        self.hub = EventHub()

    @abc.abstractmethod
    async def start(self) -> None:
        """Observe the world (and recover interrupted operations) before the first request is served."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release what this gateway owns; the local runtime stops its processes here."""

    @abc.abstractmethod
    def get(self, workspace: str) -> WorkspaceState | None:
        """The last observed state, from memory; None for a workspace that does not exist."""

    @abc.abstractmethod
    def list(self) -> list[WorkspaceState]:
        """Every known workspace, from memory."""

    @abc.abstractmethod
    async def status(self, workspace: str) -> WorkspaceState:
        """Observe again and return the fresh state."""

    @abc.abstractmethod
    async def wake(self, workspace: str) -> WorkspaceState:
        """Ensure RUNNING (restoring first when COLD). Idempotent; returns once the compute is up."""

    @abc.abstractmethod
    async def stop(self, workspace: str) -> WorkspaceState:
        """RUNNING → WARM: stop the compute, keep the home."""

    @abc.abstractmethod
    async def archive(self, workspace: str) -> WorkspaceState:
        """WARM → COLD: keep the home only as an archive or snapshot."""

    @abc.abstractmethod
    async def update(self, workspace: str, *, ports: Mapping[int, str] | None = None,
                     collaborators: tuple[str, ...] | None = None,
                     identity_ports: frozenset[int] | None = None,
                     https_ports: frozenset[int] | None = None,
                     labels: Mapping[int, str] | None = None) -> WorkspaceState:
        """Change how a workspace is shared (which ports speak TLS, what they are called); persisted by the
        runtime."""

    def record_activity(self, workspace: str, at: float) -> None:
        """Note use of a workspace at ``at`` (epoch seconds); a runtime shared by replicas persists it."""
        return None

    def last_activity(self, workspace: str) -> float | None:
        """The newest use any replica recorded, where the runtime shares activity; None otherwise."""
        return None

    def not_ready(self) -> str | None:
        """Why this replica should get no traffic yet (``/readyz`` fails), or None; a runtime that keeps no caches
        of a shared world is ready once started."""
        return None

    def features(self) -> dict[str, bool]:
        """Optional abilities and whether this runtime has them here (``cold``: it can archive; ``create``: it
        makes and deletes workspaces through the API)."""
        return {}

    def is_leader(self) -> bool:
        """Whether this replica runs cluster-wide chores (the idle reaper); a lone gateway always does."""
        return True

    async def create(self, spec: WorkspaceSpec) -> WorkspaceState:
        """Create a workspace through the API; runtimes whose workspaces are declared elsewhere refuse."""
        raise MethodNotAllowed("Workspaces of this gateway are declared in its configuration file, not created "
                               "through the API.", code="workspaces-are-configured")

    async def delete(self, workspace: str) -> None:
        """Delete a workspace and everything it owns; runtimes whose workspaces are declared elsewhere refuse."""
        raise MethodNotAllowed("Workspaces of this gateway are declared in its configuration file, not deleted "
                               "through the API.", code="workspaces-are-configured")

    def listening_ports(self, workspace: str) -> set[int] | None:
        """Ports the workspace is listening on, where the runtime can see them cheaply; None if it cannot."""
        return None

    def port_labels(self, workspace: str) -> dict[int, str]:
        """Port names the workspace declares (devcontainer.json), where the runtime can read its files."""
        return {}

    def events(self) -> Subscription:
        """Subscribe to phase changes; use as a context manager so the subscription ends with the reader."""
        return self.hub.subscribe()

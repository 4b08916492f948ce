"""A ``Runtime`` that keeps workspaces in memory: for the many proxy tests that need only "a workspace that is
running at this address", without starting a process for each.

The specs come from the same configuration the local runtime reads (``configured_spec``), so a test's
settings mean the same thing here; a wake makes a workspace RUNNING at its configured address, where the test
runs its own upstream. Tests of lifecycle behaviour itself use the real runtimes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from gateway.config import Config
from gateway.errors import NotFound
from gateway.lifecycle import Event, Phase, Runtime, WorkspaceSpec, WorkspaceState
from gateway.lifecycle.local import configured_spec


class MemoryRuntime(Runtime):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self._addresses: dict[str, str] = {}
        self._states: dict[str, WorkspaceState] = {}
        for index, (name, ws) in enumerate(config.local.workspaces.items()):
            self._addresses[name] = ws.address or f"127.0.0.{index + 2}"
            self._states[name] = WorkspaceState(configured_spec(name, ws), Phase.WARM)

    def _state(self, workspace: str) -> WorkspaceState:
        state = self._states.get(workspace)
        if state is None:
            raise NotFound(f"There is no workspace called {workspace}.", code="workspace-not-found")
        return state

    def _become(self, workspace: str, phase: Phase, spec: WorkspaceSpec | None = None) -> WorkspaceState:
        old = self._state(workspace)
        address = self._addresses[workspace] if phase is Phase.RUNNING else None
        state = WorkspaceState(spec or old.spec, phase, address)
        self._states[workspace] = state
        if phase is not old.phase:
            self.hub.publish(Event(workspace, phase))
        return state

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def get(self, workspace: str) -> WorkspaceState | None:
        return self._states.get(workspace)

    def list(self) -> list[WorkspaceState]:
        return list(self._states.values())

    async def status(self, workspace: str) -> WorkspaceState:
        return self._state(workspace)

    async def wake(self, workspace: str) -> WorkspaceState:
        return self._become(workspace, Phase.RUNNING)

    async def stop(self, workspace: str) -> WorkspaceState:
        return self._become(workspace, Phase.WARM)

    async def archive(self, workspace: str) -> WorkspaceState:
        return self._become(workspace, Phase.COLD)

    async def update(self, workspace: str, *, ports: Mapping[int, str] | None = None,
                     collaborators: tuple[str, ...] | None = None, identity_ports: frozenset[int] | None = None,
                     https_ports: frozenset[int] | None = None,
                     labels: Mapping[int, str] | None = None) -> WorkspaceState:
        old = self._state(workspace).spec
        spec = dataclasses.replace(
            old, ports=old.ports if ports is None else dict(ports),
            collaborators=old.collaborators if collaborators is None else collaborators,
            identity_ports=old.identity_ports if identity_ports is None else identity_ports,
            https_ports=old.https_ports if https_ports is None else https_ports,
            labels=old.labels if labels is None else dict(labels))
        return self._become(workspace, self._state(workspace).phase, spec)

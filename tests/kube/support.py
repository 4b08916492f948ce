"""Helpers for the Kubernetes runtime tests (fixtures using them live in this package's conftest)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from gateway.config import Kubernetes
from gateway.lifecycle import Phase, WorkspaceSpec
from gateway.lifecycle.kubernetes import KubernetesRuntime
from tests.conftest import next_address
from tests.kube.emulator import VOLUME_SNAPSHOT, WORKSPACE, Event, KubeEmulator

NS = "codehub"
MakeRuntime = Callable[..., Awaitable[KubernetesRuntime]]


def kube_settings(url: str, **overrides: Any) -> Kubernetes:
    values: dict[str, Any] = {
        "api_url": url, "namespace": NS, "lease_duration": 1.0, "start_timeout": 10, "snapshot_timeout": 10,
        "sync_timeout": 5, "request_timeout": 5, "watch_timeout": 60, "activity_interval": 0.3,
    }
    values.update(overrides)
    return Kubernetes.model_validate(values)


class PodIPs:
    """Each pod gets a loopback address no other test uses, so upstream servers never collide."""

    def __init__(self) -> None:
        self.by_pod: dict[str, str] = {}

    def __call__(self, pod: dict[str, Any]) -> str:
        return self.by_pod.setdefault(pod["metadata"]["name"], next_address())


async def new_workspace(runtime: KubernetesRuntime, name: str = "w1", **extra: Any) -> None:
    state = await runtime.create_workspace(WorkspaceSpec(id=name, owner="alice", ports={8000: "public"}), **extra)
    assert state.phase is Phase.WARM


@contextlib.asynccontextmanager
async def recording(emu: KubeEmulator) -> AsyncIterator[list[Event]]:
    """Every store event from now on, in order, as the emulator committed them."""
    events: list[Event] = []

    async def collect() -> None:
        async for event in emu.events(since=emu.resource_version):
            events.append(event)

    task = asyncio.create_task(collect())
    await asyncio.sleep(0)
    try:
        yield events
    finally:
        await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def names(emu: KubeEmulator, resource: Any) -> list[str]:
    return [obj["metadata"]["name"] for obj in emu.list_objects(resource, NS)]


async def until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Test-side polling of conditions that span the emulator and the runtime (the runtime itself never polls)."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


ARCHIVED = "ws-w1-home-20260101000000"


def snapshot_elsewhere(emu: KubeEmulator) -> None:
    """Workspace w1's home, snapshotted by another replica (owned by w1, labelled as the gateway labels them)."""
    ws = emu.get_object(WORKSPACE, NS, "w1")
    assert ws is not None
    owner = [{"apiVersion": "codehub.dev/v1alpha1", "kind": "Workspace", "name": "w1",
              "uid": ws["metadata"]["uid"], "controller": True}]
    emu.create_object(VOLUME_SNAPSHOT, {"metadata": {"name": ARCHIVED, "ownerReferences": owner,
                                                     "labels": {"app.kubernetes.io/managed-by": "codehub-gateway",
                                                                "codehub.dev/workspace": "w1"}},
                                        "spec": {"source": {"persistentVolumeClaimName": "ws-w1-home"}}}, NS)

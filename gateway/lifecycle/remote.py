"""A worker's view of a runtime that lives in another process (the ``serve --workers`` parent).

The parent owns the local runtime (processes belong to one place) and serves a small control API on a Unix
socket (``gateway.server.control``). A worker keeps an in-memory copy of every workspace's state, fed by the
parent's event stream, so ``get``/``list`` never leave the process; operations are forwarded. Every state the
parent sends carries a sequence number, so a reply and the stream can arrive in any order and the copy only
ever moves forward. The worker stops itself when the stream ends: a worker never outlives its parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from gateway.errors import GatewayError
from gateway.lifecycle.base import Event, LifecycleError, Phase, Runtime, WorkspaceSpec, WorkspaceState
from gateway.lifecycle.local import listening_ports

log = logging.getLogger(__name__)
ACTIVITY_EVERY = 1.0


# --- the wire format, shared with the control server -------------------------------------------------------

def state_to_wire(state: WorkspaceState, seq: int) -> dict[str, Any]:
    spec = state.spec
    return {
        "seq": seq, "id": spec.id, "owner": spec.owner, "collaborators": list(spec.collaborators),
        "ide_port": spec.ide_port, "ports": {str(port): value for port, value in spec.ports.items()},
        "identity_ports": sorted(spec.identity_ports),
        "https_ports": sorted(spec.https_ports), "labels": {str(port): text for port, text in spec.labels.items()},
        "began": spec.since,
        "phase": state.phase.value, "address": state.address, "message": state.message, "since": state.since,
    }


def state_from_wire(data: Mapping[str, Any]) -> WorkspaceState:
    spec = WorkspaceSpec(id=data["id"], owner=data["owner"], collaborators=tuple(data["collaborators"]),
                         ide_port=int(data["ide_port"]), ports={int(k): str(v) for k, v in data["ports"].items()},
                         identity_ports=frozenset(int(port) for port in data["identity_ports"]),
                         https_ports=frozenset(int(port) for port in data["https_ports"]),
                         labels={int(port): str(text) for port, text in data["labels"].items()},
                         since=float(data["began"]))
    return WorkspaceState(spec, Phase(data["phase"]), data["address"], data["message"], float(data["since"]))


def error_to_wire(exc: GatewayError) -> dict[str, Any]:
    return {"status": exc.status, "code": exc.code, "title": exc.title, "message": exc.message,
            "headers": exc.headers, "retry": exc.retry}


class RemoteError(GatewayError):
    """An error the parent's runtime raised, carried across with its status, code and message."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        super().__init__(str(data.get("message", "The workspace runtime failed.")), code=str(data.get("code")),
                         headers=data.get("headers") or {}, retry=bool(data.get("retry")))
        self.status = int(data.get("status", 503))
        self.title = str(data.get("title", LifecycleError.title))


# --- the client --------------------------------------------------------------------------------------------

class RemoteRuntime(Runtime):
    def __init__(self, socket_path: Path, *, on_lost: Callable[[], None] | None = None) -> None:
        super().__init__()
        self._socket = socket_path
        self._states: dict[str, WorkspaceState] = {}
        self._seqs: dict[str, int] = {}
        self._session: aiohttp.ClientSession | None = None
        self._stream: asyncio.Task[None] | None = None
        self._closing = False
        self._on_lost = on_lost or _stop_this_process

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "RemoteRuntime.start() first"
        return self._session

    async def start(self) -> None:
        connector = aiohttp.UnixConnector(path=str(self._socket), limit=0)
        self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
        synced: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._stream = asyncio.create_task(self._follow(synced))
        try:
            await asyncio.wait_for(asyncio.shield(synced), 30)
        except BaseException:  # the gateway closes only a runtime that started: this one ends what it opened
            await self.close()
            raise

    async def close(self) -> None:
        self._closing = True
        if self._stream is not None:
            self._stream.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stream
        if self._session is not None:
            await self._session.close()

    def get(self, workspace: str) -> WorkspaceState | None:
        return self._states.get(workspace)

    def list(self) -> list[WorkspaceState]:
        return list(self._states.values())

    def listening_ports(self, workspace: str) -> set[int] | None:
        state = self._states.get(workspace)
        if state is None or state.phase is not Phase.RUNNING or state.address is None:
            return set()
        return listening_ports(state.address)

    async def status(self, workspace: str) -> WorkspaceState:
        return await self._call(workspace, "status")

    async def wake(self, workspace: str) -> WorkspaceState:
        return await self._call(workspace, "wake")

    async def stop(self, workspace: str) -> WorkspaceState:
        return await self._call(workspace, "stop")

    async def archive(self, workspace: str) -> WorkspaceState:
        return await self._call(workspace, "archive")

    async def update(self, workspace: str, *, ports: Mapping[int, str] | None = None,
                     collaborators: tuple[str, ...] | None = None,
                     identity_ports: frozenset[int] | None = None,
                     https_ports: frozenset[int] | None = None,
                     labels: Mapping[int, str] | None = None) -> WorkspaceState:
        body: dict[str, Any] = {}
        if ports is not None:
            body["ports"] = {str(port): value for port, value in ports.items()}
        if collaborators is not None:
            body["collaborators"] = list(collaborators)
        if identity_ports is not None:
            body["identity_ports"] = sorted(identity_ports)
        if https_ports is not None:
            body["https_ports"] = sorted(https_ports)
        if labels is not None:
            body["labels"] = {str(port): label for port, label in labels.items()}
        return await self._call(workspace, "update", body)

    async def send_activity(self, last: Mapping[str, float], open_: Mapping[str, int]) -> None:
        async with self.session.post("http://control/activity", json={
            "source": os.getpid(), "last": dict(last), "open": dict(open_),
        }) as answer:
            answer.raise_for_status()

    async def _call(self, workspace: str, action: str, body: dict[str, Any] | None = None) -> WorkspaceState:
        async with self.session.post(f"http://control/workspaces/{workspace}/{action}", json=body or {}) as answer:
            data = await answer.json()
        if "error" in data:
            raise RemoteError(data["error"])
        return self._apply(data["state"])

    def _apply(self, data: Mapping[str, Any]) -> WorkspaceState:
        """Keep the newest state per workspace; an older one arriving late is ignored."""
        workspace, seq = data["id"], int(data["seq"])
        if seq > self._seqs.get(workspace, -1):
            self._seqs[workspace] = seq
            self._states[workspace] = state_from_wire(data)
        return self._states[workspace]

    async def _follow(self, synced: asyncio.Future[None]) -> None:
        try:
            async with self.session.get("http://control/events") as answer:
                answer.raise_for_status()
                async for line in answer.content:
                    message = json.loads(line)
                    kind = message.pop("type")
                    if kind == "state":
                        self._apply(message)
                    elif kind == "event":
                        self.hub.publish(Event(message["workspace"], Phase(message["phase"]), message["message"],
                                               float(message["at"])))
                    elif kind == "synced" and not synced.done():
                        synced.set_result(None)
        except asyncio.CancelledError:
            raise
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            if not synced.done():
                synced.set_exception(RuntimeError(f"the control socket {self._socket} did not answer: {exc}"))
                return
            log.error("lost the parent's event stream: %s", exc)
        if not self._closing:
            log.error("the parent process went away; this worker stops")
            self._on_lost()


def _stop_this_process() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


async def forward_activity(runtime: RemoteRuntime, snapshot: Callable[[], tuple[dict[str, float], dict[str, int]]],
                           every: float = ACTIVITY_EVERY) -> None:
    """Send this worker's activity to the parent (whose reaper decides) once a second, when there is any: the
    workspaces used since the last report it took (later times win there, so the rest would change nothing), and
    every open connection (each report's replace the last's)."""
    sent_last: dict[str, float] = {}
    sent_open: dict[str, int] = {}
    while True:
        await asyncio.sleep(every)
        last, open_ = snapshot()
        news = {workspace: at for workspace, at in last.items() if sent_last.get(workspace) != at}
        if not news and open_ == sent_open:
            continue
        try:
            await runtime.send_activity(news, open_)
        except (aiohttp.ClientError, OSError) as exc:
            log.warning("activity not sent to the parent: %s", exc)
            continue
        sent_last, sent_open = last, open_

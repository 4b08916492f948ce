"""The parent's side of ``serve --workers``: a small control API over a Unix socket for the worker processes.

The parent owns the local runtime (and its idle reaper); workers forward lifecycle operations here, follow the
state stream (newline-delimited JSON: every state, then ``synced``, then each change as ``state`` + ``event``)
and report activity in batches. Nothing here is reachable from the network: the socket lives in the state
directory with mode 0600.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
from typing import Any

from aiohttp import web

from gateway.errors import GatewayError, NotFound
from gateway.lifecycle.base import Runtime, WorkspaceState
from gateway.lifecycle.idle import Activity
from gateway.lifecycle.remote import error_to_wire, state_to_wire

log = logging.getLogger(__name__)
_ACTIONS = ("wake", "stop", "archive", "status", "update")


class ControlServer:
    def __init__(self, runtime: Runtime, activity: Activity) -> None:
        self.runtime = runtime
        self.activity = activity
        self._seq = itertools.count(1)
        self._streams: set[asyncio.Queue[bytes | None]] = set()
        self._waking: collections.Counter[str] = collections.Counter()

    def waking(self, workspace: str) -> bool:
        """A worker asked for this workspace's wake and it has not finished: the idle reaper leaves it alone."""
        return self._waking[workspace] > 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/events", self._events)
        app.router.add_post("/workspaces/{workspace}/{action}", self._operation)
        app.router.add_post("/activity", self._activity)
        app.on_shutdown.append(self._end_streams)
        return app

    def _wire(self, state: WorkspaceState) -> dict[str, Any]:
        return state_to_wire(state, next(self._seq))

    def _line(self, message: dict[str, Any]) -> bytes:
        return json.dumps(message, separators=(",", ":")).encode() + b"\n"

    def _broadcast(self, line: bytes) -> None:
        for queue in self._streams:
            queue.put_nowait(line)

    async def fan_out(self) -> None:
        """Forward every runtime event to every worker: the fresh state first, then the event itself."""
        with self.runtime.events() as events:
            async for event in events:
                state = self.runtime.get(event.workspace)
                if state is not None:
                    self._broadcast(self._line({"type": "state", **self._wire(state)}))
                self._broadcast(self._line({"type": "event", "workspace": event.workspace,
                                            "phase": event.phase.value, "message": event.message,
                                            "at": event.at}))

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        snapshot = b"".join(self._line({"type": "state", **self._wire(state)}) for state in self.runtime.list())
        self._streams.add(queue)  # registered before the snapshot goes out: nothing after it is missed
        try:
            await response.write(snapshot + self._line({"type": "synced"}))
            while (line := await queue.get()) is not None:
                await response.write(line)
        finally:
            self._streams.discard(queue)
        return response

    async def _operation(self, request: web.Request) -> web.Response:
        workspace, action = request.match_info["workspace"], request.match_info["action"]
        try:
            if action not in _ACTIONS:
                raise NotFound(f"No such operation: {action}.")
            if action == "update":
                body = await request.json()
                ports = body.get("ports")
                collaborators = body.get("collaborators")
                identity_ports = body.get("identity_ports")
                https_ports = body.get("https_ports")
                labels = body.get("labels")
                state = await self.runtime.update(
                    workspace, ports={int(k): str(v) for k, v in ports.items()} if ports is not None else None,
                    collaborators=tuple(collaborators) if collaborators is not None else None,
                    identity_ports=frozenset(map(int, identity_ports)) if identity_ports is not None else None,
                    https_ports=frozenset(int(port) for port in https_ports) if https_ports is not None else None,
                    labels={int(k): str(v) for k, v in labels.items()} if labels is not None else None,
                )
            elif action == "wake":
                self._waking[workspace] += 1
                try:
                    state = await self.runtime.wake(workspace)
                finally:
                    self._waking[workspace] -= 1
                    if not self._waking[workspace]:
                        del self._waking[workspace]  # names asked for once (unknown ones too) are not kept
                self.activity.touch(workspace)  # the worker now sends it what waited: not idle yet
            else:
                state = await getattr(self.runtime, action)(workspace)
        except GatewayError as exc:
            return web.json_response({"error": error_to_wire(exc)})
        wire = self._wire(state)
        self._broadcast(self._line({"type": "state", **wire}))  # a change without a phase change (update)
        return web.json_response({"state": wire})

    async def _activity(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.activity.merge(int(body["source"]), {str(k): float(v) for k, v in body.get("last", {}).items()},
                            {str(k): int(v) for k, v in body.get("open", {}).items()})
        return web.Response(status=204)

    async def _end_streams(self, app: web.Application) -> None:
        for queue in self._streams:
            queue.put_nowait(None)

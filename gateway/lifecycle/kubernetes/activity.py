"""Activity shared by every replica: ``status.lastActivity`` of each Workspace, written at most once an interval.

Each replica notes use in memory (cheap, on every request) and writes the newest time to the Workspace status
at most once per ``interval`` per workspace. Writes are guarded by the cached ``resourceVersion`` and only move
the time forward (newest wins): on a 409 the fresh object is read and the write is repeated only if ours is
still newer. The reaper on the leader reads the time back from the Workspace cache, so it sees all replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import Callable
from typing import Any

from gateway.lifecycle.kubernetes.client import WORKSPACE, KubeClient, KubeError
from gateway.lifecycle.kubernetes.objects import parse_time, timestamp

log = logging.getLogger(__name__)


def last_activity(workspace: dict[str, Any] | None) -> float | None:
    if workspace is None:
        return None
    when = parse_time((workspace.get("status") or {}).get("lastActivity"))
    return when.timestamp() if when is not None else None


class ActivitySync:
    def __init__(self, client: KubeClient, workspaces: Callable[[str], dict[str, Any] | None], *,
                 interval: float = 60.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.workspaces = workspaces
        self.interval = interval
        self._clock = clock
        self._pending: dict[str, float] = {}
        self._written: dict[str, float] = {}  # workspace -> when (our clock) we last wrote
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.writes = 0

    def record(self, workspace: str, at: float) -> None:
        if at <= self._pending.get(workspace, 0.0):
            return
        self._pending[workspace] = at
        if workspace in self._timers:
            return
        due = self._written.get(workspace, float("-inf")) + self.interval - self._clock()
        loop = asyncio.get_running_loop()
        self._timers[workspace] = loop.call_later(max(0.0, due), self._flush_soon, workspace)

    def last(self, workspace: str) -> float | None:
        return last_activity(self.workspaces(workspace))

    def _flush_soon(self, workspace: str) -> None:
        self._timers.pop(workspace, None)
        task = asyncio.get_running_loop().create_task(self.flush(workspace))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self, workspace: str) -> None:
        at = self._pending.pop(workspace, None)
        if at is None:
            return
        self._written[workspace] = self._clock()
        try:
            await self._write(workspace, at)
        except KubeError as exc:
            log.warning("could not record activity of %s (will retry): %s", workspace, exc)
            self.record(workspace, at)

    async def _write(self, workspace: str, at: float) -> None:
        current = self.workspaces(workspace)
        for _ in range(3):
            if current is None:
                return  # the workspace is gone (or not cached yet: it will be woken by a request again)
            known = last_activity(current)
            if known is not None and known >= int(at):
                return  # another replica already wrote something at least as new
            when = datetime.datetime.fromtimestamp(at, tz=datetime.UTC)
            patch = {"metadata": {"resourceVersion": current["metadata"].get("resourceVersion")},
                     "status": {"lastActivity": timestamp(when)}}
            try:
                await self.client.patch(WORKSPACE, workspace, patch, subresource="status")
                self.writes += 1
                return
            except KubeError as exc:
                if exc.status == 404:
                    return
                if exc.status != 409:
                    raise
            current = await self.client.get(WORKSPACE, workspace)  # someone wrote first: look again

    async def close(self, *, flush_within: float = 2.0) -> None:
        """What is still held is written first (within ``flush_within``): a rolling update must not lose the
        newest use, or the reaper stops a busy workspace."""
        for handle in self._timers.values():
            handle.cancel()
        pending = list(self._timers)
        self._timers.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(flush_within):
                await asyncio.gather(*(self.flush(ws) for ws in pending), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

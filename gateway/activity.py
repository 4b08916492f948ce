"""Who used which workspace when: proxied requests and open WebSockets keep a workspace awake.

The reaper walks RUNNING → WARM → COLD for workspaces idle past the configured timers. Waiting pages,
health checks and metrics never call ``touch``, so they never keep anything awake.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from gateway.errors import GatewayError
from gateway.lifecycle import Phase, Runtime
from gateway.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class IdleTimers:
    idle_to_warm: float
    warm_to_cold: float
    interval: float


class Activity:
    """In-memory last-activity clock and open-connection counts, per workspace."""

    def __init__(self, clock: Callable[[], float] = time.time, shared: Runtime | None = None) -> None:
        self._clock = clock
        self._shared = shared
        self._last: dict[str, float] = {}
        self._open: dict[str, int] = {}
        self._remote_open: dict[int, dict[str, int]] = {}

    def touch(self, workspace: str) -> None:
        now = self._clock()
        self._last[workspace] = now
        if self._shared is not None:
            self._shared.record_activity(workspace, now)

    def touch_open(self) -> None:
        """Open connections are activity for as long as they live: say so again (other replicas reap)."""
        for workspace in list(self._open):
            self.touch(workspace)

    @contextlib.contextmanager
    def connection(self, workspace: str) -> Iterator[None]:
        """An open WebSocket counts as activity for as long as it lives, and once more when it ends."""
        self._open[workspace] = self._open.get(workspace, 0) + 1
        try:
            yield
        finally:
            self._open[workspace] -= 1
            if not self._open[workspace]:
                del self._open[workspace]
            self.touch(workspace)

    def snapshot(self) -> tuple[dict[str, float], dict[str, int]]:
        """Copies of the last-activity times and open connections (what a worker reports to its parent)."""
        return dict(self._last), dict(self._open)

    def merge(self, source: int, last: dict[str, float], open_: dict[str, int]) -> None:
        """Fold in a worker's report: later times win; its open connections replace its previous report."""
        for workspace, when in last.items():
            if when > self._last.get(workspace, 0.0):
                self._last[workspace] = when
        if open_:
            self._remote_open[source] = dict(open_)
        else:
            self._remote_open.pop(source, None)

    def forget(self, source: int) -> None:
        """A worker went away: its connections went with it."""
        self._remote_open.pop(source, None)

    def last(self, workspace: str) -> float | None:
        """The newest activity seen here or, with a shared runtime, recorded by any replica."""
        mine = self._last.get(workspace)
        theirs = self._shared.last_activity(workspace) if self._shared is not None else None
        known = [at for at in (mine, theirs) if at is not None]
        return max(known) if known else None

    def idle_for(self, workspace: str, since: float) -> float:
        """Seconds without activity, counting from ``since`` (the phase start) when there was none."""
        if self._open.get(workspace) or any(opened.get(workspace) for opened in self._remote_open.values()):
            return 0.0
        last = self.last(workspace)
        return self._clock() - max(last if last is not None else since, since)


def idle_action(phase: Phase, idle: float, timers: IdleTimers) -> Phase | None:
    """The reaper's decision for one workspace, as a pure function: the phase to move to, or None."""
    if phase is Phase.RUNNING and idle >= timers.idle_to_warm:
        return Phase.WARM
    if phase in (Phase.WARM, Phase.FAILED) and idle >= timers.warm_to_cold:
        return Phase.COLD
    return None


def _never(workspace: str) -> bool:
    return False


async def reap_forever(runtime: Runtime, activity: Activity, timers: IdleTimers, metrics: Metrics,
                       is_leader: Callable[[], bool] = lambda: True, busy: Callable[[str], bool] = _never) -> None:
    """Every ``interval`` seconds, put idle workspaces to sleep (only on the leader replica)."""
    while True:
        await asyncio.sleep(timers.interval)
        activity.touch_open()
        if is_leader():
            await reap_once(runtime, activity, timers, metrics, busy)


async def reap_once(runtime: Runtime, activity: Activity, timers: IdleTimers, metrics: Metrics,
                    busy: Callable[[str], bool] = _never) -> None:
    """One pass; ``busy`` names workspaces being woken right now (requests are waiting on them)."""
    for state in runtime.list():
        if busy(state.id):
            continue
        action = idle_action(state.phase, activity.idle_for(state.id, state.since), timers)
        if action is None or (action is Phase.COLD and not runtime.features().get("cold", True)):
            continue
        log.info("workspace %s idle in %s; moving to %s", state.id, state.phase, action)
        try:
            if action is Phase.WARM:
                await runtime.stop(state.id)
            else:
                await runtime.archive(state.id)
        except GatewayError as exc:
            log.error("idle %s of %s failed: %s", action, state.id, exc.message)
            continue
        metrics.idle_transitions.labels(action.value).inc()

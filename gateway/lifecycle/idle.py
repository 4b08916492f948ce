"""Who used which workspace when: proxied requests and open WebSockets keep a workspace awake.

The reaper walks RUNNING → WARM → COLD for workspaces idle past the configured timers. Waiting pages,
health checks and metrics never call ``touch``, so they never keep anything awake.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Set
from dataclasses import dataclass

from gateway.errors import GatewayError
from gateway.lifecycle import Phase, Runtime
from gateway.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class IdleTimers:
    to_warm: float
    to_cold: float
    check_every: float


class _Open:
    """``Activity.connection``: a class rather than a generator context manager, which cost every proxied request
    a generator and a wrapper."""

    __slots__ = ("_activity", "_workspace")

    def __init__(self, activity: Activity, workspace: str) -> None:
        self._activity, self._workspace = activity, workspace

    def __enter__(self) -> None:
        counts, workspace = self._activity._open, self._workspace
        counts[workspace] = counts.get(workspace, 0) + 1

    def __exit__(self, *exc_info: object) -> None:
        counts, workspace = self._activity._open, self._workspace
        counts[workspace] -= 1
        if not counts[workspace]:
            del counts[workspace]
        self._activity.touch(workspace)


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

    def connection(self, workspace: str) -> _Open:
        """An open WebSocket counts as activity for as long as it lives, and once more when it ends."""
        return _Open(self, workspace)

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

    def keep_only(self, live: Set[str]) -> None:
        """Forget the last activity of workspaces that are gone (deleted). One a connection is still open to needs
        none meanwhile (``idle_for`` counts the open connection), and the connection's end records it again."""
        self._last = {workspace: at for workspace, at in self._last.items() if workspace in live}

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
    if phase is Phase.RUNNING and idle >= timers.to_warm:
        return Phase.WARM
    if phase in (Phase.WARM, Phase.FAILED) and idle >= timers.to_cold:
        return Phase.COLD
    return None


def _never(workspace: str) -> bool:
    return False


async def reap_forever(reaper: Reaper) -> None:
    """Every ``check_every`` seconds, put idle workspaces to sleep (only on the leader replica), and forget the
    deleted ones (on every replica)."""
    try:
        while True:
            await asyncio.sleep(reaper.timers.check_every)
            reaper.activity.touch_open()
            reaper.sweep()
            reaper.forget_gone()
    finally:
        await reaper.close()


async def reap_once(runtime: Runtime, activity: Activity, timers: IdleTimers, metrics: Metrics,
                    busy: Callable[[str], bool] = _never) -> None:
    """One pass, waiting for every transition it started; ``busy`` names workspaces being woken right now."""
    reaper = Reaper(runtime, activity, timers, metrics, busy=busy)
    await asyncio.gather(*reaper.sweep())


class Reaper:
    """Idle transitions as tasks: at most ``concurrency`` at a time, each after checking leadership again.

    A pass only starts what is due and returns, so one slow snapshot never holds the others back; a workspace
    with a transition in flight is skipped by later passes until it ends.
    """

    def __init__(self, runtime: Runtime, activity: Activity, timers: IdleTimers, metrics: Metrics, *,
                 is_leader: Callable[[], bool] = lambda: True, busy: Callable[[str], bool] = _never,
                 keep_only: Callable[[Set[str]], None] = lambda live: None, concurrency: int = 8) -> None:
        self.runtime = runtime
        self.activity = activity
        self.timers = timers
        self.metrics = metrics
        self.is_leader = is_leader
        self.busy = busy
        self.keep_only = keep_only
        """What else keeps something per workspace forgets the ones gone (the waker's past wake times)."""
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(concurrency)

    def _due(self, workspace: str) -> Phase | None:
        state = self.runtime.get(workspace)
        if state is None or self.busy(workspace):
            return None
        action = idle_action(state.phase, self.activity.idle_for(workspace, state.since), self.timers)
        if action is Phase.COLD and not self.runtime.features().get("cold", True):
            return None  # this runtime cannot archive here (it said so once, at start)
        return action

    def sweep(self) -> list[asyncio.Task[None]]:
        """Start the transitions that are due now; the tasks started."""
        started = []
        for state in self.runtime.list():
            if not self.is_leader():
                break
            if state.id in self.tasks or self._due(state.id) is None:
                continue
            task = asyncio.get_running_loop().create_task(self._move(state.id), name=f"reap-{state.id}")
            self.tasks[state.id] = task
            task.add_done_callback(functools.partial(self._done, state.id))
            started.append(task)
        return started

    def forget_gone(self) -> None:
        """What is kept per workspace goes with it: a gateway that runs for months while workspaces come and go (one
        per branch, say) would otherwise keep a trace of each it ever saw. Not while the runtime's own view may be
        incomplete (a cache still filling), which would forget workspaces that exist."""
        if self.runtime.not_ready() is not None:
            return
        live = {state.id for state in self.runtime.list()}
        self.activity.keep_only(live)
        self.keep_only(live)

    def _done(self, workspace: str, _task: asyncio.Task[None]) -> None:
        self.tasks.pop(workspace, None)

    async def _move(self, workspace: str) -> None:
        async with self._slots:
            action = self._due(workspace)  # again: it may have been woken, or leadership lost, meanwhile
            if action is None or not self.is_leader():
                return
            log.info("workspace %s idle; moving to %s", workspace, action)
            try:
                if action is Phase.WARM:
                    await self.runtime.stop(workspace)
                else:
                    await self.runtime.archive(workspace)
            except GatewayError as exc:
                log.error("idle %s of %s failed: %s", action, workspace, exc.message)
                return
            self.metrics.idle_transitions.labels(action.value).inc()

    async def close(self) -> None:
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

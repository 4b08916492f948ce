"""Waking sleeping workspaces on the first request, once, however many requests arrive together.

A wake is one task per workspace (runtime ``wake``: restore, start) followed by one task per port (wait until
it accepts connections). Browsers navigating get a waiting page that follows progress over SSE; every other
request is held on the shared task, costing no thread and no body buffering (the body is read only once the
request is proxied), and gets 503 + ``Retry-After`` + JSON if the wake outlasts its timeout. When the gateway
drains (SIGTERM) the held requests get that 503 at once, no wake starts and progress streams end, so their
clients try again and reach a gateway that stays (or this one, restarted) instead of waiting out the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import statistics
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Set
from dataclasses import dataclass, field
from typing import Any

from gateway.edge.routing import WAKE_EVENTS_PATH
from gateway.errors import GatewayError, NotFound, ServiceUnavailable
from gateway.lifecycle import Event, LifecycleError, Phase, Runtime, WorkspaceState
from gateway.metrics import Metrics

log = logging.getLogger(__name__)
_PROBE_FAST = 0.01
_PROBE_SLOW = 0.25
_PROBE_FAST_FOR = 60.0
MOST_PORT_WAITS = 16
"""Ports of one workspace waited for at once. Each wait is a task that probes its port until it accepts and outlives
the request that began it (the next one joins it), so anyone who may wake a workspace (the holder of an all-ports
share link too) could otherwise start one per port number and hang up: 2,000 of them slowed /healthz a thousandfold.
A person opens a few ports at a time; past this a new port is refused at once (503, try again shortly) while
the ports already waited for carry on and can still be joined. The ports its owner declared (and its IDE's) count
apart, against ``MOST_DECLARED_WAITS``: a visitor's made-up port numbers never stand in the way of the owner's own."""
MOST_DECLARED_WAITS = 64
SETTLE = 2.0
"""Seconds after a wake found a port accepting during which requests to it retry refused connects."""
RETRY_FIRST = 5.0
RETRY_MOST = 300.0
"""Seconds after a failed wake before requests wake the workspace again: ``RETRY_FIRST``, doubled after each failure
in a row up to ``RETRY_MOST``. Anyone who may wake a workspace (anyone, on a public port) wakes it with a request, so
one that fails to wake (an archive that cannot be restored, a command that exits at once) was woken again by every
next request: a loop of them restored gigabytes, or started its command, as fast as they came. Meanwhile they get
the failure at once, with ``Retry-After``; the hub's Wake (the API) tries at once, whenever its owner asks."""

_NOT_LISTENING = "port-not-listening"
"""A wake's end in the gateway's own words (nothing answered on the port in time), which ``told`` tells everyone."""


@dataclass(frozen=True, slots=True)
class WakeLimits:
    """How long a held request waits for a workspace, by the phase it was woken from."""

    warm_timeout: float
    cold_timeout: float

    def for_phase(self, phase: Phase) -> float:
        return self.cold_timeout if phase in (Phase.COLD, Phase.RESTORING, Phase.ARCHIVING) else self.warm_timeout


class WakingPage(GatewayError):
    """Not an error: a browser navigation gets the waiting page while its workspace wakes."""

    status = 503
    code = "workspace-waking"
    title = "Waking up the workspace"
    template = "waiting.html"
    events_path = WAKE_EVENTS_PATH
    """On the page's own host (a preview or the IDE): the gateway's reserved path there streams the progress."""

    def __init__(self, progress: Progress, *, explained: bool) -> None:
        super().__init__(f"Workspace {progress.workspace} is waking up.", headers={"Retry-After": "2"})
        self.progress = progress
        self.detail = progress.message if explained else ""
        """The runtime's word on the current step, for those it is shown to (``told``)."""


def wake_origin(phase: Phase) -> Phase:
    """The phase a wake counts as starting from (for steps, estimates and metrics): RUNNING, WARM or COLD."""
    if phase in (Phase.COLD, Phase.ARCHIVING, Phase.RESTORING):
        return Phase.COLD
    return Phase.RUNNING if phase is Phase.RUNNING else Phase.WARM


@dataclass(frozen=True, slots=True)
class _Failed:
    """A workspace's last failed wake: which, when (monotonic, and by the wall clock as phases are stamped), the
    reason, and how long the next waits from then."""

    flight: object
    at: float
    when: float
    message: str
    wait: float

    def left(self, now: float) -> float:
        return self.at + self.wait - now


@dataclass
class Progress:
    """What a waiting page shows: the steps of this wake and how long similar wakes took.

    Every step reached is kept in ``history`` so a progress stream reports each one, however quickly the
    next follows.
    """

    workspace: str
    port: int
    from_phase: Phase
    started: float = field(default_factory=time.monotonic)
    step: str = ""
    message: str = ""
    estimate: float | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    history: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.from_phase = wake_origin(self.from_phase)
        if not self.step:
            self.step = self.steps[0]
        self.history.append((self.step, self.message))

    def update(self, step: str, message: str = "") -> None:
        """Move to a step (or say more about it: the runtime's explanations) and wake every progress stream."""
        self.step, self.message = step, message
        if step in self.steps and self.history[-1] != (step, message):
            self.history.append((step, message))
        self.changed.set()
        self.changed = asyncio.Event()

    @property
    def steps(self) -> list[str]:
        if self.from_phase is Phase.RUNNING:
            return ["waiting-for-port"]
        steps = ["starting", "waiting-for-port"]
        return ["restoring", *steps] if self.from_phase is Phase.COLD else steps

    def as_event(self, index: int | None = None, *, explained: bool = False) -> dict[str, Any]:
        """The current step, or the ``index``-th step reached, as a progress event; the runtime's word on it only
        if ``explained`` (see ``told``)."""
        step, message = (self.step, self.message) if index is None else self.history[index]
        return {
            "workspace": self.workspace, "port": self.port, "from": self.from_phase.value, "step": step,
            "steps": self.steps, "message": message if explained else "",
            "elapsed": round(time.monotonic() - self.started, 2), "estimate": self.estimate,
        }


_STEP_FOR_PHASE = {Phase.RESTORING: "restoring", Phase.STARTING: "starting", Phase.RUNNING: "waiting-for-port"}


class Waker:
    def __init__(self, runtime: Runtime, metrics: Metrics, limits: Callable[[], WakeLimits]) -> None:
        self._runtime = runtime
        self._metrics = metrics
        self._limits = limits
        self._flights: dict[str, asyncio.Task[WorkspaceState]] = {}
        self._ports: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._waits: Counter[tuple[str, bool]] = Counter()  # per workspace: its declared ports', and others'
        self._progress: dict[tuple[str, int], Progress] = {}
        self._history: dict[tuple[str, Phase], deque[float]] = {}
        self._woke: dict[tuple[str, int], float] = {}
        self._failed: dict[str, _Failed] = {}
        self._draining: asyncio.Future[None] | None = None

    def drain(self) -> None:
        """The gateway is shutting down: release every held request with a 503 now, and hold no more."""
        draining = self.drain_signal()
        if not draining.done():
            draining.set_result(None)

    def drain_signal(self) -> asyncio.Future[None]:
        """One future per waker (made on the running loop at first use) that every held request also waits on."""
        if self._draining is None:
            self._draining = asyncio.get_running_loop().create_future()
        return self._draining

    async def close(self) -> None:
        tasks = [*self._flights.values(), *self._ports.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def limits(self) -> WakeLimits:
        """Read from the policy in force at each use, so a policy reload changes the timeouts."""
        return self._limits()

    def busy(self, workspace: str, port: int) -> bool:
        return (workspace, port) in self._ports

    def settling(self, workspace: str, port: int) -> bool:
        """Whether ``port`` was found accepting by a wake less than ``SETTLE`` seconds ago. Dev servers may accept
        on a throwaway listener first (Vite checks that its port is free by listening and closing), so the probe
        can call a port ready a moment before it really is: requests in that moment retry refused connects."""
        woke = self._woke.get((workspace, port))
        return woke is not None and time.monotonic() - woke < SETTLE

    def waking(self, workspace: str) -> bool:
        """Whether a wake of the workspace is in flight: its runtime's wake, or a wait for a port that began asleep
        (the idle reaper leaves it alone meanwhile). A wait for a port of a workspace that already ran is no wake:
        anyone who may see a port can start one (a waiting page's stream does), and opened again and again on a
        port where nothing listens it would keep the workspace awake for ever; it ends when the workspace stops."""
        return workspace in self._flights or any(key[0] == workspace and progress.from_phase is not Phase.RUNNING
                                                 for key, progress in self._progress.items())

    def bring_up(self, state: WorkspaceState, port: int) -> asyncio.Task[None]:
        """The shared task that ends when ``port`` of the workspace accepts connections; a 503 when the workspace
        already waits for ``MOST_PORT_WAITS`` other ports."""
        key = (state.id, port)
        task = self._ports.get(key)
        if task is None:
            if state.phase is not Phase.RUNNING:
                self._not_failed_lately(state)
            pool = (state.id, port in state.spec.ports or port == state.spec.ide_port)
            most = MOST_DECLARED_WAITS if pool[1] else MOST_PORT_WAITS
            if self._waits[pool] >= most:
                raise ServiceUnavailable(
                    f"Workspace {state.id} is waking and already waiting for {most} of its ports; "
                    f"try port {port} again in a moment.", code="too-many-port-waits", headers={"Retry-After": "5"})
            progress = Progress(state.id, port, state.phase, estimate=self.estimate(state.id, state.phase))
            self._progress[key] = progress
            task = asyncio.get_running_loop().create_task(self._bring_up(state, port, progress))
            self._ports[key] = task
            self._waits[pool] += 1
            task.add_done_callback(lambda _: self._forget(key, pool))
        return task

    def _not_failed_lately(self, state: WorkspaceState) -> None:
        """A 503 with the reason while the workspace's last failed wake is too recent to wake it again, unless the
        workspace changed since (its owner woke it from the hub, and stopped it again)."""
        failed = self._failed.get(state.id)
        if failed is None or state.since > failed.when:
            return
        if (left := failed.left(time.monotonic())) > 0:
            seconds = math.ceil(left)
            raise LifecycleError(f"{failed.message} (it is tried again in {seconds} s)",
                                 headers={"Retry-After": str(seconds)})

    def _woke_or_failed(self, workspace: str, flight: object, error: GatewayError | None) -> None:
        """Note how a wake from asleep ended (each of its ports' waits says so): a failure puts the next wake
        further off than the last one's (failures long past are forgotten)."""
        now = time.monotonic()
        self._failed = {name: failed for name, failed in self._failed.items() if failed.left(now) > -failed.wait}
        last = self._failed.pop(workspace, None)
        if error is None:
            return
        if last is not None and last.flight is flight:  # another port of the same wake
            self._failed[workspace] = last
            return
        wait = min(last.wait * 2, RETRY_MOST) if last is not None else RETRY_FIRST
        self._failed[workspace] = _Failed(flight, now, time.time(), error.message, wait)

    def _forget(self, key: tuple[str, int], pool: tuple[str, bool]) -> None:
        self._ports.pop(key, None)
        self._progress.pop(key, None)
        self._waits[pool] -= 1
        if not self._waits[pool]:
            del self._waits[pool]

    def keep_only(self, live: Set[str]) -> None:
        """Forget the past wake times (the waiting page's estimate) of workspaces that are gone."""
        self._history = {key: past for key, past in self._history.items() if key[0] in live}

    def progress(self, workspace: str, port: int) -> Progress | None:
        return self._progress.get((workspace, port))

    def estimate(self, workspace: str, phase: Phase) -> float | None:
        past = self._history.get((workspace, wake_origin(phase)))
        return round(statistics.median(past), 1) if past else None

    def waiting_page(self, state: WorkspaceState, port: int, *, explained: bool) -> WakingPage:
        """Start (or join) the wake; the page that follows it, for a browser navigating there meanwhile (with the
        runtime's own words on it if ``explained``, see ``told``)."""
        if self.drain_signal().done():
            raise _draining()
        try:
            self.bring_up(state, port)
        except GatewayError as exc:
            raise told(exc, state.id, explained=explained) from None
        return WakingPage(self._progress[(state.id, port)], explained=explained)

    async def hold(self, state: WorkspaceState, port: int, *, explained: bool) -> WorkspaceState:
        """Start (or join) the wake and wait for it: a RUNNING state whose port was seen accepting, or a 503 (with
        the runtime's own words on why if ``explained``, see ``told``)."""
        try:
            return await self._hold(state, port)
        except GatewayError as exc:
            raise told(exc, state.id, explained=explained) from None

    async def _hold(self, state: WorkspaceState, port: int) -> WorkspaceState:
        draining = self.drain_signal()
        if draining.done():
            raise _draining()
        task = self.bring_up(state, port)
        timeout = self.limits.for_phase(state.phase)
        self._metrics.held_requests.inc()
        try:
            # neither is cancelled when this request is: the wake is shared, the drain signal too
            await asyncio.wait((task, draining), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._metrics.held_requests.dec()
        if draining.done() and not task.done():
            raise _draining()
        if not task.done():
            raise ServiceUnavailable(
                f"Workspace {state.id} did not become ready within {timeout:g} s; try again shortly.",
                code="wake-timeout", headers={"Retry-After": "5"},
            )
        task.result()  # the wake's own failure, if it failed
        fresh = self._runtime.get(state.id)
        if fresh is None:  # deleted the moment it woke (Kubernetes: the informer's event came in between)
            raise NotFound(f"There is no workspace called {state.id}.", code="workspace-not-found")
        return fresh

    def _wake(self, workspace: str) -> asyncio.Task[WorkspaceState]:
        task = self._flights.get(workspace)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._runtime.wake(workspace))
            self._flights[workspace] = task
            task.add_done_callback(lambda _: self._flights.pop(workspace, None))
        return task

    async def _bring_up(self, state: WorkspaceState, port: int, progress: Progress) -> None:
        from_phase = wake_origin(state.phase)
        started = time.monotonic()
        result = "failed"
        flight: asyncio.Task[WorkspaceState] | None = None
        try:
            if state.phase is not Phase.RUNNING:
                with self._runtime.events() as events:
                    flight = self._wake(state.id)
                    follower = asyncio.ensure_future(self._follow(events, state.id, progress))
                    try:
                        state = await asyncio.shield(flight)
                    finally:
                        follower.cancel()
                    while not events.queue.empty():  # steps published just before the flight ended
                        _apply(events.queue.get_nowait(), state.id, progress)
                if state.phase is not Phase.RUNNING or state.address is None:
                    raise LifecycleError(state.message or f"Workspace {state.id} could not start.")
            progress.update("waiting-for-port")
            await self._wait_for_port(state, port, self.limits.for_phase(from_phase))
            if flight is not None:
                self._woke_or_failed(state.id, flight, None)
            now = time.monotonic()
            self._woke = {key: at for key, at in self._woke.items() if now - at < SETTLE}
            self._woke[(state.id, port)] = now
            result = "ok"
            progress.update("ready")
            if from_phase is not Phase.RUNNING:
                self._history.setdefault((state.id, from_phase), deque(maxlen=5)).append(time.monotonic() - started)
        except GatewayError as exc:
            if flight is not None and _failed(self._runtime.get(state.id)):
                self._woke_or_failed(state.id, flight, exc)  # not stopped meanwhile, nor a port that never opened
            raise
        finally:
            if from_phase is not Phase.RUNNING:
                self._metrics.wakes.labels(from_phase.value, result).inc()
                self._metrics.wake_duration.labels(from_phase.value).observe(time.monotonic() - started)

    async def _follow(self, events: AsyncIterator[Event], workspace: str, progress: Progress) -> None:
        async for event in events:
            _apply(event, workspace, progress)

    async def _wait_for_port(self, state: WorkspaceState, port: int, limit: float) -> None:
        """Try to connect until the port accepts; stop early if the workspace dies meanwhile."""
        assert state.address is not None
        deadline = time.monotonic() + limit
        fast_until = time.monotonic() + _PROBE_FAST_FOR
        while True:
            # asyncio.timeout, not wait_for: in Python 3.11 a wait_for cancelled as the connect fails raises the
            # OSError instead of CancelledError, which the suppress below then ate (a closing gateway waited out
            # the whole wake timeout)
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    _reader, writer = await asyncio.open_connection(state.address, port)
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                return
            current = self._runtime.get(state.id)
            if current is None or current.phase is not Phase.RUNNING:
                reason = current.message if current is not None and current.message else "it stopped"
                raise LifecycleError(f"Workspace {state.id} stopped before port {port} answered: {reason}")
            now = time.monotonic()
            if now >= deadline:
                raise LifecycleError(
                    f"Nothing started listening on port {port} in workspace {state.id} within {limit:g} s.",
                    code=_NOT_LISTENING,
                )
            await asyncio.sleep(_PROBE_FAST if now < fast_until else _PROBE_SLOW)


def told(error: GatewayError, workspace: str, *, explained: bool) -> GatewayError:
    """What a caller learns of a failed wake. The runtime's words (the app's last output, a path, an image, why the
    cluster could not place the pod, the API's own error) are for the workspace's owner, collaborators and the
    policy's admins: anyone else the policy lets wake it, a public port's visitor included, is told that it failed,
    when it is tried again, and who can see why. The gateway's own words (a port nobody listens on, a timeout,
    a restart) say nothing of the workspace's insides, and are told to everyone."""
    if explained or not isinstance(error, LifecycleError) or error.code == _NOT_LISTENING:
        return error
    retry = error.headers.get("Retry-After")
    again = f" (it is tried again in {retry} s)" if retry else ""
    return LifecycleError(f"Workspace {workspace} could not start{again}. Its owner and collaborators can see why.",
                          code=error.code, headers=error.headers)


def _failed(state: WorkspaceState | None) -> bool:
    """Whether the workspace failed to come up: FAILED, or COLD with the reason its restore failed."""
    return state is not None and (state.phase is Phase.FAILED or (state.phase is Phase.COLD and bool(state.message)))


def _draining() -> ServiceUnavailable:
    return ServiceUnavailable("The gateway is restarting; try again in a moment.", code="gateway-draining",
                              headers={"Retry-After": "1"})


def _apply(event: Event, workspace: str, progress: Progress) -> None:
    """A phase moves the page to its step; a message (why it is slow: "Pulling image …") is shown with it."""
    if event.workspace == workspace and event.phase in _STEP_FOR_PHASE:
        progress.update(_STEP_FOR_PHASE[event.phase], event.message)


async def progress_events(waker: Waker, state: WorkspaceState, port: int, *, explained: bool) -> AsyncIterator[bytes]:
    """Server-Sent Events for a waiting page: each step as it happens, then ``ready`` or ``failed``; the runtime's
    own words on them only if ``explained`` (see ``told``).

    Following it (re)starts the wake, so a page reloaded after a failure or a restart carries on. When the gateway
    drains it ends without either: the browser's EventSource reconnects by itself, to a gateway that stays.
    """
    draining = waker.drain_signal()
    if draining.done():
        return
    try:
        task = waker.bring_up(state, port)
    except GatewayError as exc:  # the stream is under way: its page says why
        yield _sse("failed", {"workspace": state.id, "port": port,
                              "message": told(exc, state.id, explained=explained).message})
        return
    progress = waker.progress(state.id, port)
    sent = 0
    while True:
        changed = progress.changed if progress is not None else asyncio.Event()
        if progress is not None:
            while sent < len(progress.history):
                yield _sse("progress", progress.as_event(sent, explained=explained))
                sent += 1
        if task.done():
            break
        waiter = asyncio.ensure_future(changed.wait())
        awaited: set[asyncio.Future[Any]] = {task, waiter, draining}
        done, _ = await asyncio.wait(awaited, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if draining in done and not task.done():
            return
        if not done and progress is not None:  # nothing new for a while: say how long it has been
            yield _sse("progress", progress.as_event(explained=explained))
    error = ServiceUnavailable("The gateway is shutting down.") if task.cancelled() else task.exception()
    if error is None:
        yield _sse("ready", {"workspace": state.id, "port": port})
    else:
        message = told(error, state.id, explained=explained).message if isinstance(error, GatewayError) \
            else "The wake failed."
        yield _sse("failed", {"workspace": state.id, "port": port, "message": message})


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()

"""Prometheus metrics, kept in a registry owned by the app (no process-global collectors)."""

from __future__ import annotations

import asyncio
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from gateway.lifecycle import Phase, WorkspaceState

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_WAKE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """Every metric the gateway exports, created once per app."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "codehub_requests", "Requests answered, by route kind and status class.", ["kind", "code"], registry=r
        )
        self.duration = Histogram(
            "codehub_request_duration_seconds",
            "Time to answer a request (to the end of the body), by route kind.",
            ["kind"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "codehub_upstream_connect_errors",
            "Upstream connections that failed, by reason.",
            ["reason"],
            registry=r,
        )
        self.upstream_faults = Counter(
            "codehub_upstream_errors",
            "Upstream exchanges that failed after the connection was made, by fault (reset, closed, garbage, "
            "head-too-large, no-answer, stalled).",
            ["fault"],
            registry=r,
        )
        self.bad_requests = Counter(
            "codehub_bad_requests",
            "Client requests refused before any handler saw them (malformed, over a limit, too slow), by reason.",
            ["reason"],
            registry=r,
        )
        self.websockets = Gauge("codehub_websockets_open", "WebSocket connections being relayed.", registry=r)
        self.policy_decisions = Counter(
            "codehub_policy_decisions", "Access decisions, by result and reason.", ["allow", "reason"], registry=r
        )
        self.wakes = Counter(
            "codehub_wakes", "Workspace wakes, by the phase woken from and result.", ["from_phase", "result"],
            registry=r,
        )
        self.wake_duration = Histogram(
            "codehub_wake_duration_seconds", "Time from wake request to RUNNING, by the phase woken from.",
            ["from_phase"], buckets=_WAKE_BUCKETS, registry=r,
        )
        self.held_requests = Gauge("codehub_held_requests", "Requests held while their workspace wakes.", registry=r)
        self.upstream_queued = Gauge(
            "codehub_upstream_queued_requests",
            "Requests waiting in the gateway for a turn or a connection to their upstream (paced connects).",
            registry=r,
        )
        self.idle_transitions = Counter(
            "codehub_idle_transitions", "Idle stops and archives done by the reaper.", ["to_phase"], registry=r
        )
        self.upstream_connections = Gauge(
            "codehub_upstream_connections",
            "Connections to workspace ports in the upstream pool: idle (kept alive) or busy (a request on it).",
            ["state"], registry=r,
        )
        Gauge("codehub_asyncio_tasks", "asyncio tasks alive in this process: a leak of them shows as growth.",
              registry=r).set_function(_live_tasks)

        self._request_children: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._decision_children: dict[tuple[bool, str], Any] = {}

    def track_features(self, features: Callable[[], Mapping[str, bool]]) -> None:
        """Export ``codehub_runtime_feature{feature}`` (1 or 0): optional abilities, e.g. ``cold`` on a cluster
        without the VolumeSnapshot API."""
        self.registry.register(_Features(features))

    def track_workspaces(self, states: Callable[[], Iterable[WorkspaceState]]) -> None:
        """Export ``codehub_workspaces{phase}``, counted from the runtime's memory at each scrape."""
        self.registry.register(_WorkspacesByPhase(states))

    def track_queue(self, queued: Callable[[], int]) -> None:
        """Export ``codehub_upstream_queued_requests``, counted from the upstream pool at each scrape."""
        self.upstream_queued.set_function(queued)

    def track_pool(self, connections: Callable[[], tuple[int, int]]) -> None:
        """Export ``codehub_upstream_connections{state}`` from the pool's (idle, busy) at each scrape."""
        self.upstream_connections.labels("idle").set_function(lambda: connections()[0])
        self.upstream_connections.labels("busy").set_function(lambda: connections()[1])

    def observe_request(self, kind: str, status: int, seconds: float) -> None:
        key = (kind, status // 100)
        children = self._request_children.get(key)
        if children is None:  # labels() takes a lock and builds tuples: look each child up once
            children = (self.requests.labels(kind, f"{key[1]}xx"), self.duration.labels(kind))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def upstream_fault(self, fault: str) -> None:
        self.upstream_faults.labels(fault).inc()

    def decision(self, allow: bool, reason: str) -> None:
        child = self._decision_children.get((allow, reason))
        if child is None:
            child = self._decision_children[(allow, reason)] = self.policy_decisions.labels(str(allow).lower(), reason)
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _live_tasks() -> int:
    """Tasks of the running loop; a scrape is served on it (0 if rendered outside one)."""
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        return 0


class _WorkspacesByPhase(Collector):
    """Workspaces by phase, read at scrape time, so the numbers can never drift from the runtime's view."""

    def __init__(self, states: Callable[[], Iterable[WorkspaceState]]) -> None:
        self._states = states

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily("codehub_workspaces", "Workspaces by phase.", labels=["phase"])

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        counts = Tally(state.phase for state in self._states())
        for phase in Phase:
            family.add_metric([phase.value], counts[phase])
        yield family


class _Features(Collector):
    def __init__(self, features: Callable[[], Mapping[str, bool]]) -> None:
        self._features = features

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily("codehub_runtime_feature", "Optional runtime abilities (1 = available).",
                                 labels=["feature"])

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for name, enabled in sorted(self._features().items()):
            family.add_metric([name], 1.0 if enabled else 0.0)
        yield family

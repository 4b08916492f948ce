"""Prometheus metrics, kept in a registry owned by the app (no process-global collectors)."""

from __future__ import annotations

import asyncio
import bisect
import enum
import itertools
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from gateway.lifecycle import Phase, WorkspaceState

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_LATENCY_LABELS: tuple[str, ...] = tuple(floatToGoString(bound) for bound in _LATENCY_BUCKETS)  # type: ignore[no-untyped-call]
"""Their ``le`` labels, spelt as prometheus_client spells them."""
_WAKE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """Every metric the gateway exports, created once per app."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._tallies = _Tallies()
        r.register(self._tallies)
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
        tallies = self._tallies
        tallies.requests[kind, status // 100] += 1
        durations = tallies.durations.get(kind)
        if durations is None:
            durations = tallies.durations[kind] = [0.0] * (len(_LATENCY_BUCKETS) + 2)
        durations[bisect.bisect_left(_LATENCY_BUCKETS, seconds)] += 1  # the last bucket is +Inf's own
        durations[-1] += seconds

    def upstream_fault(self, fault: str) -> None:
        self.upstream_faults.labels(fault).inc()

    def decision(self, allow: bool, reason: enum.Enum) -> None:
        """``reason``'s value is the label (read at scrape time: an enum's ``value`` costs a Python call)."""
        self._tallies.decisions[allow, reason] += 1

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _live_tasks() -> int:
    """Tasks of the running loop; a scrape is served on it (0 if rendered outside one)."""
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        return 0


class _Tallies(Collector):
    """What every request counts (requests, their durations, policy decisions), kept as plain numbers and made
    into metrics at scrape time: prometheus_client's ``inc`` and ``observe`` take a lock and several Python calls
    each, on every request, and the gateway's loop is the only writer. ``durations[kind]`` holds a count per
    bucket of ``_LATENCY_BUCKETS`` (not cumulative), one for ``+Inf``, then the sum."""

    def __init__(self) -> None:
        self.requests: Tally[tuple[str, int]] = Tally()
        self.durations: dict[str, list[float]] = {}
        self.decisions: Tally[tuple[bool, enum.Enum]] = Tally()

    def _families(self) -> tuple[CounterMetricFamily, HistogramMetricFamily, CounterMetricFamily]:
        return (
            CounterMetricFamily("codehub_requests", "Requests answered, by route kind and status class.",
                                labels=["kind", "code"]),
            HistogramMetricFamily("codehub_request_duration_seconds",
                                  "Time to answer a request (to the end of the body), by route kind.", labels=["kind"]),
            CounterMetricFamily("codehub_policy_decisions", "Access decisions, by result and reason.",
                                labels=["allow", "reason"]),
        )

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        requests, duration, decisions = self._families()
        for (kind, code), count in sorted(self.requests.items()):
            requests.add_metric([kind, f"{code}xx"], count)
        for kind, counts in sorted(self.durations.items()):
            cumulative = list(itertools.accumulate(counts[:-1]))
            buckets = list(zip(_LATENCY_LABELS, cumulative, strict=False))
            duration.add_metric([kind], [*buckets, ("+Inf", cumulative[-1])], sum_value=counts[-1])
        for (allow, reason), count in sorted(self.decisions.items(), key=lambda item: (item[0][0],
                                                                                         str(item[0][1].value))):
            decisions.add_metric([str(allow).lower(), str(reason.value)], count)
        yield from (requests, duration, decisions)


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

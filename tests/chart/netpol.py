"""Which pod may talk to which port, as a CNI enforcing NetworkPolicy decides it from the rendered policies.

The rules are Kubernetes' own (networking.k8s.io/v1): a pod is isolated for a direction once a policy of its
namespace selects it for that direction, and then only what some rule of those policies admits passes; a
connection needs both the source's egress and the destination's ingress to admit it. Peers with both selectors
match pods in the selected namespaces *and* with the selected labels; a peer without a namespaceSelector means the
policy's own namespace; ports are numbers or the destination container's port names.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: Mapping[str, str]
    ip: str
    ports: Mapping[str, int] = field(default_factory=dict)  # container port names → numbers


@dataclass(frozen=True)
class External:
    """An address outside the pod network: the internet, a cloud metadata server, a company host, a node."""

    name: str
    ip: str


Endpoint = Pod | External


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A label selector; an empty one selects everything."""
    selector = selector or {}
    if any(labels.get(key) != value for key, value in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


class Cluster:
    def __init__(self, policies: Sequence[Manifest], namespaces: Sequence[str]) -> None:
        self.policies = [p for p in policies if p["kind"] == "NetworkPolicy"]
        self.namespace_labels = {name: {"kubernetes.io/metadata.name": name} for name in namespaces}

    def _peer_matches(self, peer: Mapping[str, Any], policy_namespace: str, other: Endpoint) -> bool:
        if "ipBlock" in peer:
            block = peer["ipBlock"]
            address = ipaddress.ip_address(other.ip)
            return address in ipaddress.ip_network(block["cidr"]) and not any(
                address in ipaddress.ip_network(cidr) for cidr in block.get("except") or [])
        if not isinstance(other, Pod):
            return False  # selectors pick pods, never outside addresses
        if "namespaceSelector" in peer:
            if not selects(peer["namespaceSelector"], self.namespace_labels[other.namespace]):
                return False
        elif other.namespace != policy_namespace:
            return False
        return selects(peer.get("podSelector"), other.labels)

    @staticmethod
    def _port_matches(ports: Sequence[Mapping[str, Any]] | None, destination: Endpoint, port: int,
                      protocol: str) -> bool:
        if not ports:
            return True
        for rule in ports:
            if rule.get("protocol", "TCP") != protocol:
                continue
            wanted = rule.get("port")
            if wanted is None:
                return True
            if isinstance(wanted, str):
                number = destination.ports.get(wanted) if isinstance(destination, Pod) else None
                if number == port:
                    return True
            elif wanted <= port <= rule.get("endPort", wanted):
                return True
        return False

    def _admits(self, pod: Pod, direction: str, other: Endpoint, destination: Endpoint, port: int,
                protocol: str) -> bool:
        kind, rules_key, peers_key = ("Ingress", "ingress", "from") if direction == "in" else ("Egress", "egress", "to")
        isolating = [p for p in self.policies if p["metadata"]["namespace"] == pod.namespace
                     and kind in p["spec"].get("policyTypes", ["Ingress"])
                     and selects(p["spec"]["podSelector"], pod.labels)]
        if not isolating:
            return True
        for policy in isolating:
            for rule in policy["spec"].get(rules_key) or []:
                peers = rule.get(peers_key)
                peer_ok = not peers or any(
                    self._peer_matches(peer, policy["metadata"]["namespace"], other) for peer in peers)
                if peer_ok and self._port_matches(rule.get("ports"), destination, port, protocol):
                    return True
        return False

    def allowed(self, source: Endpoint, destination: Endpoint, port: int, protocol: str = "TCP") -> bool:
        """Whether ``source`` may open a connection to ``destination:port``."""
        if isinstance(source, Pod) and not self._admits(source, "out", destination, destination, port, protocol):
            return False
        return not isinstance(destination, Pod) or self._admits(destination, "in", source, destination, port,
                                                                 protocol)

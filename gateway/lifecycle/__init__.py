"""Starting, stopping and archiving workspaces: one ``Runtime`` interface, a local and a Kubernetes backend."""

from gateway.lifecycle.base import (
    Event,
    EventHub,
    Phase,
    Runtime,
    RuntimeError_,
    Subscription,
    WorkspaceSpec,
    WorkspaceState,
)

__all__ = ["Event", "EventHub", "Phase", "Runtime", "RuntimeError_", "Subscription", "WorkspaceSpec", "WorkspaceState"]

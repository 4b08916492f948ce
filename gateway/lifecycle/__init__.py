"""Starting, stopping and archiving workspaces: one ``Runtime`` interface, a local and a Kubernetes backend."""

from gateway.lifecycle.base import (
    Event,
    EventHub,
    LifecycleError,
    Phase,
    Runtime,
    Subscription,
    WorkspaceSpec,
    WorkspaceState,
)

__all__ = ["Event", "EventHub", "LifecycleError", "Phase", "Runtime", "Subscription", "WorkspaceSpec", "WorkspaceState"]

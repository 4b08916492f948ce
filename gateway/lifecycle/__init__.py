"""Starting, stopping and archiving workspaces: one ``Runtime`` interface, a local and a Kubernetes backend."""

from gateway.lifecycle.base import (
    LABEL_LONGEST,
    Event,
    EventHub,
    LifecycleError,
    Phase,
    Runtime,
    Subscription,
    WorkspaceSpec,
    WorkspaceState,
    showable,
)

__all__ = ["LABEL_LONGEST", "Event", "EventHub", "LifecycleError", "Phase", "Runtime", "Subscription", "WorkspaceSpec",
           "WorkspaceState", "showable"]

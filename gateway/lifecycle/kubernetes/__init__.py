"""The Kubernetes runtime: Workspace custom resources, code-server pods, home PVCs and VolumeSnapshots.

``objects`` builds manifests (pure), ``phases`` derives a phase from observed objects (pure), ``client`` makes
single-attempt API calls, ``informer`` keeps one list+watch cache per kind in one registry per replica (the
runtime's; ``gateway.auth.kubernetes`` registers the token store's kinds there too), ``leader`` elects the replica
that runs the idle reaper, ``activity`` shares last-activity times between replicas, ``runtime`` ties them
together.
"""

from gateway.lifecycle.kubernetes.runtime import KubernetesRuntime

__all__ = ["KubernetesRuntime"]

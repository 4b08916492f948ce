"""The Kubernetes runtime: Workspace custom resources, code-server pods, home PVCs and VolumeSnapshots.

``objects`` builds manifests (pure), ``phases`` derives a phase from observed objects (pure), ``client`` makes
single-attempt API calls, ``informer`` keeps one list+watch cache per kind, ``leader`` elects the replica that
runs the idle reaper, ``activity`` shares last-activity times between replicas, ``runtime`` ties them together;
``tokens`` keeps share links and API tokens as custom resources (the gateway's TokenStore on Kubernetes).
"""

from gateway.lifecycle.kubernetes.runtime import KubernetesRuntime

__all__ = ["KubernetesRuntime"]

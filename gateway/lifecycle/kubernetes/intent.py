"""Archive versus wake across replicas: one annotation on the Workspace, changed only by compare-and-swap.

``codehub.dev/lifecycle`` says what was last decided for the workspace's home, by whom and when:

| value                          | written by                               | means                           |
|--------------------------------|------------------------------------------|---------------------------------|
| ``awake/{replica}/{time}``     | every wake, before it creates a pod      | in use: no archive may delete it |
| ``archiving/{replica}/{time}`` | an archive, before its snapshot          | a wake aborts it                |
| ``deleting/{replica}/{time}``  | that archive, once its snapshot is ready | a wake waits (or finishes it)   |

Every write carries the ``resourceVersion`` it was decided on, so the API server orders them: a wake's
``awake`` and an archive's ``archiving → deleting`` cannot both succeed from the same state. The archive
that loses keeps the volume; the wake that loses waits for the deletion and restores from the snapshot. No
per-process lock is involved, so this holds for any number of replicas.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.errors import NotFound
from gateway.lifecycle.base import LifecycleError
from gateway.lifecycle.kubernetes.client import WORKSPACE, KubeClient, KubeError, retrying

INTENT = "codehub.dev/lifecycle"
KEEP = "\0keep"  # a decision not to write


def token(kind: str, replica: str) -> str:
    return f"{kind}/{replica}/{time.time():.6f}"


def kind_of(value: str | None) -> str:
    return (value or "").split("/", 1)[0]


def age(value: str | None) -> float:
    """Seconds since the value was written (infinite when unreadable: a value nobody can vouch for)."""
    try:
        return time.time() - float((value or "").rsplit("/", 1)[1])
    except (IndexError, ValueError):
        return float("inf")


async def swap(client: KubeClient, workspace: str, decide: Callable[[str | None], str | None],
               *, attempts: int = 5, rounds: int = 20) -> tuple[bool, str | None]:
    """Read the annotation, let ``decide`` map it to a new value (or KEEP), write it guarded by resourceVersion.

    Returns (written, the value now in force). A 409 means someone wrote first: read again and decide again.
    """
    for _ in range(rounds):
        obj = await retrying(lambda: client.get(WORKSPACE, workspace), attempts=attempts)
        if obj is None:
            raise NotFound(f"There is no workspace called {workspace}.", code="workspace-not-found")
        meta = obj.get("metadata") or {}
        current = (meta.get("annotations") or {}).get(INTENT)
        wanted = decide(current)
        if wanted == KEEP:
            return False, current
        patch = {"metadata": {"resourceVersion": meta.get("resourceVersion"), "annotations": {INTENT: wanted}}}
        try:
            await retrying(lambda: client.patch(WORKSPACE, workspace, patch), attempts=attempts)  # noqa: B023
        except KubeError as exc:
            if exc.status == 409:
                continue
            raise LifecycleError(f"Kubernetes refused the operation: {exc.message or exc.reason}",
                                code="kubernetes-refused") from exc
        return True, wanted
    raise LifecycleError(f"Workspace {workspace} kept changing; try again.", code="kubernetes-conflict")

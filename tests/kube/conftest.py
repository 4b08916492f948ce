"""Fixtures for tests/kube: the emulator's (``kube``, ``kube_api``, ...) and the runtime's.

Other test packages wanting the emulator: add ``pytest_plugins = ["tests.kube.emulator"]`` to the root
``tests/conftest.py`` (or import the fixtures likewise).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.lifecycle.kubernetes import KubernetesRuntime
from tests.kube.emulator import KubeEnv, kube, kube_api, kube_api_factory, kube_emulator, kube_url
from tests.kube.kubelet import FakeKubelet
from tests.kube.support import MakeRuntime, PodIPs, kube_settings

__all__ = ["kube", "kube_api", "kube_api_factory", "kube_emulator", "kube_url", "kubelet", "make_runtime",
           "pod_ips"]


@pytest.fixture
def pod_ips() -> PodIPs:
    return PodIPs()


@pytest.fixture
async def kubelet(kube: KubeEnv, pod_ips: PodIPs) -> AsyncIterator[FakeKubelet]:
    async with FakeKubelet(kube.emulator, pod_ip=pod_ips) as kubelet:
        yield kubelet


@pytest.fixture
async def make_runtime(kube: KubeEnv) -> AsyncIterator[MakeRuntime]:
    made: list[KubernetesRuntime] = []

    async def make(identity: str = "gw-a", *, retry_attempts: int = 5, **overrides: Any) -> KubernetesRuntime:
        runtime = KubernetesRuntime(kube_settings(kube.url, **overrides), identity=identity,
                                    retry_attempts=retry_attempts)
        made.append(runtime)
        await runtime.start()
        return runtime

    yield make
    for runtime in made:
        await runtime.close()

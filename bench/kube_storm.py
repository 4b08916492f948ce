"""A wake storm on the Kubernetes runtime: N workspaces woken at once against the emulated API server.

Measures what the gateway asks of the API server — requests sent, the most in flight at once, time spent
waiting for the client-side rate limit — and how long the storm takes. Run:
``python3 -m bench.kube_storm --workspaces 200 --qps 20 --burst 40 --concurrency 16``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from gateway.lifecycle.kubernetes import KubernetesRuntime
from tests.kube.emulator import WORKSPACE, running_emulator
from tests.kube.kubelet import FakeKubelet, LoopbackIPs
from tests.kube.support import NS, kube_settings


async def storm(workspaces: int, qps: float, burst: int, concurrency: int) -> dict[str, Any]:
    async with running_emulator(check_errors=False) as env:
        emu = env.emulator
        for index in range(workspaces):
            emu.create_object(WORKSPACE, {"metadata": {"name": f"s{index}"}, "spec": {"owner": "bench"}}, NS)
        settings = kube_settings(env.url, api_qps=qps, api_burst=burst, api_concurrency=concurrency,
                                 start_timeout=600, request_timeout=30)
        runtime = KubernetesRuntime(settings, identity="bench")
        await runtime.start()
        client = runtime.client
        assert client is not None
        assert client.throttle is not None
        sent, in_flight, most = 0, 0, 0
        send = client._send

        async def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal sent, in_flight, most
            sent += 1
            watching = (kwargs.get("query") or {}).get("watch") == "true"
            in_flight += not watching
            most = max(most, in_flight)
            try:
                return await send(*args, **kwargs)
            finally:
                in_flight -= not watching

        client._send = counted  # type: ignore[method-assign]
        try:
            async with FakeKubelet(emu, pod_ip=LoopbackIPs(first=2)):
                started = time.perf_counter()
                states = await asyncio.gather(*(runtime.wake(f"s{i}") for i in range(workspaces)),
                                              return_exceptions=True)
                seconds = time.perf_counter() - started
        finally:
            await runtime.close()
        failed = [s for s in states if isinstance(s, BaseException)]
        return {"workspaces": workspaces, "qps": qps, "burst": burst, "concurrency": concurrency,
                "seconds": round(seconds, 2), "requests": sent, "requests_per_wake": round(sent / workspaces, 1),
                "most_in_flight": most, "rate_wait_s": round(client.throttle.waited, 2), "failed": len(failed)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.kube_storm", description=__doc__)
    parser.add_argument("--workspaces", type=int, default=200)
    parser.add_argument("--qps", type=float, default=20.0)
    parser.add_argument("--burst", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(storm(args.workspaces, args.qps, args.burst, args.concurrency)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m bench.pool_burst --host H --port P [--requests N] [--concurrency C]``: what the upstream pool alone
costs per request.

N GETs enter a fresh ``UpstreamPool`` at once, as held requests do when a wake ends, toward a server that already
listens (``bench.slowserver``); or C at a time over kept-alive connections, the pool's part of the HTTP scenario.
Printed as JSON: the CPU seconds of this process and the wall seconds it took. The gateway's other costs per
request (parsing, policy, the response) are left out, so a change in how the pool waits, paces and times requests
shows plainly. ``bench.ab --only pool`` runs it for two versions of the gateway, alternated, natively or under
callgrind.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import time
from typing import Any

from multidict import CIMultiDict

from gateway.proxy.pool import UpstreamPool


def make_pool(connect_timeout: float, queue_timeout: float) -> UpstreamPool:
    """The pool with the gateway's default timeouts, whichever version of it is on the path (the one before
    issue 18 had no first-byte or queue timeout)."""
    settings: dict[str, Any] = {"connect_timeout": connect_timeout, "read_timeout": None}
    if "queue_timeout" in inspect.signature(UpstreamPool).parameters:
        settings.update(first_byte_timeout=120.0, queue_timeout=queue_timeout)
    return UpstreamPool(**settings)


async def burst(host: str, port: int, requests: int, concurrency: int | None = None,
                connect_timeout: float = 5.0, queue_timeout: float = 60.0) -> dict[str, float]:
    """All ``requests`` at once (a wake's burst), or ``concurrency`` at a time over kept-alive connections (the
    steady state of the HTTP scenario)."""
    pool = make_pool(connect_timeout, queue_timeout)

    async def one() -> None:
        answer, exchange = await pool.request(host, port, "GET", "/", CIMultiDict(Host="localhost"), None)
        try:
            length = answer.content_length
            if answer.status != 200 or length is None:
                raise RuntimeError(f"the upstream answered {answer.status} (Content-Length {length})")
            await answer.read_exactly(length)
        finally:
            exchange.close()

    left = [requests]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            await one()

    cpu, wall = time.process_time(), time.monotonic()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency or requests)))
    finally:
        pool.close()
    return {"cpu_s": time.process_time() - cpu, "wall_s": time.monotonic() - wall}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pool_burst", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, help="requests in flight at a time (default: all at once)")
    parser.add_argument("--connect-timeout", type=float, default=5.0,
                        help="s (default 5, the gateway's; under valgrind everything takes ~50 times longer)")
    parser.add_argument("--queue-timeout", type=float, default=60.0, help="s (default 60, the gateway's)")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(burst(args.host, args.port, args.requests, args.concurrency, args.connect_timeout,
                                       args.queue_timeout))))


if __name__ == "__main__":
    main()

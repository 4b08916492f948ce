"""What the gateway asks of the API server: at most ``qps`` requests a second (``burst`` at once after a quiet
spell) and at most ``concurrency`` in flight, as client-go's token bucket and kubespawner's ``k8s_api_threadpool``.

A wake storm over hundreds of workspaces then queues here, in the gateway, instead of flooding the API server
(which would answer 429 and slow every other client of the cluster). Watches take a token when they open and
do not hold a concurrency slot: they stay open for minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable


class Throttle:
    def __init__(self, qps: float, burst: int, concurrency: int, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.qps = qps
        self.burst = burst
        self._tokens = float(burst)
        self._clock = clock
        self._sleep = sleep
        self._at = clock()
        self._slots = asyncio.Semaphore(concurrency)
        self._turn = asyncio.Lock()  # first come, first served: waiting callers queue for the next token
        self.waited = 0.0  # seconds callers spent waiting for a token, all told (a metric for operators)

    async def token(self) -> None:
        """Take one request's worth of the rate, waiting until the bucket has refilled enough."""
        async with self._turn:
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.qps)
            self._at = now
            if self._tokens < 1:  # wait for what is lacking; the next caller's refill counts from ``now``, so
                # a sleep the busy loop ends late owes no one that lateness (the count goes below zero meanwhile)
                wait = (1 - self._tokens) / self.qps
                self.waited += wait
                await self._sleep(wait)
            self._tokens -= 1

    @contextlib.asynccontextmanager
    async def request(self) -> AsyncIterator[None]:
        """One short request: a concurrency slot for its whole length, and a token to start it."""
        async with self._slots:
            await self.token()
            yield

"""Leader election with a coordination.k8s.io/v1 Lease: one replica runs the idle reaper.

As client-go's leaderelection: a replica takes the Lease when it is free (no holder) or expired, renews it
every ``duration / 3`` while it holds it, and stops leading the moment a renewal fails. "Expired" is judged by
this replica's own clock (the record has not changed for ``leaseDurationSeconds`` since we first saw it), not
by comparing ``renewTime`` with our wall clock, so clock skew between nodes cannot hand out the lease twice; our
own term runs from when we sent the write that won it, so a late answer cannot stretch it past theirs.
Writes are guarded by ``resourceVersion``: a 409 means another replica wrote first, and we lost that round.
A replica that stops releases the Lease (empty holder), so another takes over without waiting for expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import Callable
from typing import Any

from gateway.lifecycle.kubernetes.client import LEASE, KubeClient, KubeError
from gateway.lifecycle.kubernetes.objects import make_lease, parse_time

log = logging.getLogger(__name__)


def _now() -> datetime.datetime:
    return datetime.datetime.now(tz=datetime.UTC)


class LeaderElector:
    def __init__(self, client: KubeClient, name: str, identity: str, *, duration: float = 15.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.name = name
        self.identity = identity
        self.duration = duration
        self._clock = clock
        self._leading_until = 0.0  # monotonic deadline of our current term
        self._observed: tuple[str | None, str | None] | None = None  # (holder, renewTime) last seen
        self._observed_at = 0.0
        self._task: asyncio.Task[None] | None = None

    def is_leader(self) -> bool:
        return self._clock() < self._leading_until

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name="leader-election")

    async def stop(self, *, release: bool = True) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if release and self.is_leader():
            await self.release()
        self._lead(None)

    async def run(self) -> None:
        while True:
            try:
                await self.try_acquire_or_renew()
            except asyncio.CancelledError:
                raise
            except KubeError as exc:
                if self.is_leader():
                    log.warning("could not renew the lease %s, no longer leading: %s", self.name, exc)
                self._lead(None)
            await asyncio.sleep(self.duration / 3 if self.is_leader() else self.duration / 4)

    async def try_acquire_or_renew(self) -> bool:
        """One round: returns whether this replica leads after it. Raises KubeError for API failures."""
        now = _now()
        lease = await self.client.get(LEASE, self.name)
        seen = self._clock()  # when we read the record: no later than our write goes out (a rate limit may hold it)
        if lease is None:
            created = await self.client.create(LEASE, make_lease(self.name, self.identity, self.duration, now=now))
            return self._lead(seen if created is not None else None)  # None: 409, another replica created it first
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or None
        record = (holder, spec.get("renewTime"))
        if record != self._observed:
            self._observed, self._observed_at = record, seen
        duration = float(spec.get("leaseDurationSeconds") or self.duration)
        mine = holder == self.identity
        expired = seen > self._observed_at + duration
        if holder is not None and not mine and not expired:
            return self._lead(None)
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if mine else 1)
        acquired = parse_time(spec.get("acquireTime")) if mine else now
        body = make_lease(self.name, self.identity, self.duration, now=now, transitions=transitions,
                          acquired=acquired, resource_version=lease["metadata"].get("resourceVersion"))
        try:
            await self.client.replace(LEASE, self.name, body)
        except KubeError as exc:
            if exc.status == 409:
                return self._lead(None)
            raise
        if not mine:
            log.info("%s now leads (lease %s, previous holder %s)", self.identity, self.name, holder)
        return self._lead(seen)

    async def release(self) -> None:
        """Give the lease up so another replica can take it at once; a lost race or an error is fine."""
        with contextlib.suppress(KubeError):
            lease = await self.client.get(LEASE, self.name)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            spec: dict[str, Any] = lease.get("spec") or {}
            body = make_lease(self.name, None, self.duration, now=_now(),
                              transitions=int(spec.get("leaseTransitions") or 0),
                              resource_version=lease["metadata"].get("resourceVersion"))
            await self.client.replace(LEASE, self.name, body)
            log.info("%s released the lease %s", self.identity, self.name)

    def _lead(self, writing: float | None) -> bool:
        """Lead for a little less than a full term from ``writing``, no later than the write that won it went out
        (None: lead no longer). Another replica counts the term from when it first saw the record, which is later,
        however late the answer to the write comes."""
        self._leading_until = 0.0 if writing is None else writing + self.duration * 0.8
        return writing is not None

"""Caches that keep their place: resourceVersions from events and bookmarks; lease terms by the elector's clock."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import pytest

from gateway.lifecycle import Phase
from gateway.lifecycle.kubernetes.client import POD as POD_KIND
from gateway.lifecycle.kubernetes.client import WORKSPACE as WORKSPACE_KIND
from gateway.lifecycle.kubernetes.client import KubeClient, Resource
from gateway.lifecycle.kubernetes.informer import QUICK_END, Informer
from gateway.lifecycle.kubernetes.leader import LeaderElector
from tests.kube.emulator import LEASE, POD, WORKSPACE, KubeEnv
from tests.kube.kubelet import FakeKubelet
from tests.kube.support import NS, MakeRuntime, new_workspace, until

pytestmark = pytest.mark.timeout(60)


def workspace(name: str) -> dict[str, object]:
    return {"metadata": {"name": name}, "spec": {"owner": "bob"}}


async def test_a_cache_resumes_from_its_last_event_after_compaction(kube: KubeEnv, make_runtime: MakeRuntime) -> None:
    emu = kube.emulator
    emu.bookmark_interval = 60  # no bookmarks: only the events themselves move the caches on
    emu.create_object(WORKSPACE, workspace("w0"), NS)  # (a list at version 0 would mean "any version")
    runtime = await make_runtime()
    await emu.wait_watches(4)
    emu.create_object(WORKSPACE, workspace("w1"), NS)
    last = emu.create_object(WORKSPACE, workspace("w2"), NS)
    await until(lambda: runtime.get("w2") is not None)
    emu.compact(upto=int(last["metadata"]["resourceVersion"]))  # only a cache at w2's version can resume
    emu.drop_watches(WORKSPACE)
    emu.create_object(WORKSPACE, workspace("w3"), NS)
    await until(lambda: runtime.get("w3") is not None)
    assert runtime.informers[WORKSPACE_KIND].lists == 1  # resumed, not listed again


async def test_quiet_caches_follow_bookmarks_and_resume_after_compaction(
        kube: KubeEnv, make_runtime: MakeRuntime) -> None:
    emu = kube.emulator
    emu.bookmark_interval = 0.2
    runtime = await make_runtime()
    await emu.wait_watches(4)
    emu.create_object(WORKSPACE, workspace("w1"), NS)  # no pod changes: the pod cache only gets bookmarks
    await until(lambda: runtime.informers[POD_KIND].resource_version == str(emu.resource_version))
    emu.compact()
    emu.drop_watches()
    emu.create_object(WORKSPACE, workspace("w2"), NS)
    await until(lambda: runtime.get("w2") is not None and runtime.api_healthy)
    assert {kind.plural: informer.lists for kind, informer in runtime.informers.items()} == {
        "workspaces": 1, "pods": 1, "persistentvolumeclaims": 1, "volumesnapshots": 1}


@contextlib.asynccontextmanager
async def workspace_cache(kube: KubeEnv, first_delay: float) -> AsyncIterator[Informer]:
    """A cache of Workspaces alone, started and, at the end, stopped."""
    cache = Informer(KubeClient(kube.new_api_client(), NS), WORKSPACE_KIND, listeners=[], first_delay=first_delay)
    cache.start()
    try:
        yield cache
    finally:
        await cache.stop()


@pytest.mark.parametrize("carried", [True, False], ids=["after-events", "quiet-for-long"])
async def test_a_watch_that_did_its_work_is_opened_again_without_a_pause(kube: KubeEnv, carried: bool) -> None:
    """Back-off is for watches that fail or end at once with nothing; one that carried events, or stayed open
    longer than ``QUICK_END`` (a quiet watch's timeout, a server restart), is opened again at once — with a pause
    the cache would be behind by it at every end."""
    emu = kube.emulator
    emu.bookmark_interval = 60  # no bookmarks: a quiet watch carries nothing at all
    async with workspace_cache(kube, first_delay=30) as cache:  # any pause would outlast the test
        await until(lambda: emu.watches_of(WORKSPACE) == 1)
        if carried:
            emu.create_object(WORKSPACE, workspace("w1"), NS)
            await until(lambda: cache.get("w1") is not None)
        else:
            await asyncio.sleep(QUICK_END + 0.2)
        assert emu.drop_watches(WORKSPACE) == 1  # it ends cleanly
        emu.create_object(WORKSPACE, workspace("w2"), NS)
        await until(lambda: cache.get("w2") is not None)
        assert cache.healthy


@pytest.mark.parametrize("event", [
    b'{"type": "ADDED", "object": {"metadata": {}}}',
    b'{"type": "MODIFIED", "object": {"kind": "Workspace"}}',
    b'{"type": "DELETED", "object": ["w1"]}',
    b'{"type": "ADDED"}',
], ids=["no-name", "no-metadata", "not-an-object", "no-object"])
async def test_a_watch_line_that_is_no_event_marks_the_cache_lost_until_a_watch_works_again(
        kube: KubeEnv, caplog: pytest.LogCaptureFixture, event: bytes) -> None:
    """What no API server sends (an object without a name, or no object) is a bug or a proxy's doing: said loudly,
    the cache counted as cut off (readiness fails after its grace, as for a lost API), and a later watch that works
    ends it — never passed over in silence, with the cache taken for whole."""
    emu = kube.emulator
    emu.fail("watch", WORKSPACE, watch_payload=event + b"\n")
    async with workspace_cache(kube, first_delay=0.05) as cache:
        await until(lambda: [r for r in caplog.records if r.levelno >= logging.ERROR] != [])
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
            "watch of workspaces failed unexpectedly"]
        assert not cache.healthy
        assert cache.unhealthy_since is not None
        emu.create_object(WORKSPACE, workspace("w1"), NS)
        await until(lambda: cache.get("w1") is not None and cache.healthy)


async def test_a_watch_lost_again_and_again_is_one_loss_from_its_first_failure(
        kube: KubeEnv, caplog: pytest.LogCaptureFixture) -> None:
    """A watch the API opens and at once ends with an error (an ``ERROR`` event first thing) is no recovery:
    readiness' grace counts from when the cache was cut off, not from its latest retry (which kept a replica whose
    watches all fail this way looking ready for good), and the loss is said once, not at every retry."""
    emu = kube.emulator
    failing = emu.fail("watch", WORKSPACE, status=500, times=4)
    async with workspace_cache(kube, first_delay=0.05) as cache:
        await until(lambda: cache.unhealthy_since is not None)
        since = cache.unhealthy_since
        await until(lambda: len(list(failing)) == 4)
        assert (cache.healthy, cache.unhealthy_since) == (False, since)
        emu.create_object(WORKSPACE, workspace("w1"), NS)
        await until(lambda: cache.get("w1") is not None and cache.healthy)
    lost = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lost) == 1, lost
    assert lost[0].startswith("lost the watch of workspaces, serving from cache:"), lost


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_leader_stops_leading_when_its_term_ends_unrenewed(kube: KubeEnv) -> None:
    clock = Clock()
    client = KubeClient(kube.new_api_client(), NS)
    leader = LeaderElector(client, "reaper", "gw-a", duration=10, clock=clock)
    assert await leader.try_acquire_or_renew()
    clock.now += 7.9
    assert leader.is_leader()
    clock.now += 0.2  # 0.8 of the lease: another replica may take over once the full term has passed
    assert not leader.is_leader()


async def test_a_follower_waits_a_full_term_of_no_renewal_before_taking_over(kube: KubeEnv) -> None:
    clock = Clock()
    client = KubeClient(kube.new_api_client(), NS)
    assert await LeaderElector(client, "reaper", "gw-a", duration=10, clock=clock).try_acquire_or_renew()
    follower = LeaderElector(client, "reaper", "gw-b", duration=10, clock=clock)
    assert not await follower.try_acquire_or_renew()  # first sight of gw-a's record starts its clock
    clock.now += 9.9
    assert not await follower.try_acquire_or_renew()
    clock.now += 0.2
    assert await follower.try_acquire_or_renew()  # unchanged for a whole term by its own clock: expired
    assert follower.is_leader()


async def test_a_follower_waits_the_term_the_holder_wrote_not_its_own(kube: KubeEnv) -> None:
    clock = Clock()
    client = KubeClient(kube.new_api_client(), NS)
    assert await LeaderElector(client, "reaper", "gw-a", duration=30, clock=clock).try_acquire_or_renew()
    follower = LeaderElector(client, "reaper", "gw-b", duration=10, clock=clock)  # configured differently
    assert not await follower.try_acquire_or_renew()
    clock.now += 29.9
    assert not await follower.try_acquire_or_renew()  # gw-a's term is 30 s, whatever gw-b's setting says
    clock.now += 0.2
    assert await follower.try_acquire_or_renew()


class AnsweredLate(KubeClient):
    """A client whose Lease writes are made at once and answered ``late`` seconds (on the test's clock) later,
    with ``meanwhile`` run in between: another replica reading the record just written."""

    def __init__(self, *args: Any, clock: Clock, late: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clock, self.late = clock, late
        self.meanwhile: Callable[[], Awaitable[object]] | None = None

    async def _late(self) -> None:
        if self.meanwhile is not None:
            await self.meanwhile()
        self.clock.now += self.late

    async def create(self, kind: Resource, body: Mapping[str, Any]) -> dict[str, Any] | None:
        created = await super().create(kind, body)
        await self._late()
        return created

    async def replace(self, kind: Resource, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        replaced = await super().replace(kind, name, body)
        await self._late()
        return replaced


@pytest.mark.parametrize("rounds", [1, 2], ids=["taken", "renewed"])
async def test_a_leaders_term_counts_from_before_its_write_not_from_the_answer(kube: KubeEnv, rounds: int) -> None:
    clock = Clock()
    client = AnsweredLate(kube.new_api_client(), NS, clock=clock, late=5.0)
    leader = LeaderElector(client, "reaper", "gw-a", duration=10, clock=clock)
    follower = LeaderElector(KubeClient(kube.new_api_client(), NS), "reaper", "gw-b", duration=10, clock=clock)
    for _ in range(rounds):
        written_at = clock.now
        client.meanwhile = follower.try_acquire_or_renew  # sees the new record the moment it is written
        assert await leader.try_acquire_or_renew()  # answered 5 s after the write
        assert not follower.is_leader()
    clock.now = written_at + 10.1  # unrenewed for a whole term since the follower saw it: the follower takes over
    assert await follower.try_acquire_or_renew()
    assert not leader.is_leader()  # so the leader's own term had ended: never two leaders at once


class HeldAfterRead(KubeClient):
    """A client whose reads of the Lease return, then wait for ``go``: its writer decides on what it read."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read, self.go = asyncio.Event(), asyncio.Event()

    async def get(self, kind: Resource, name: str) -> dict[str, Any] | None:
        found = await super().get(kind, name)
        self.read.set()
        await self.go.wait()
        return found


async def test_two_replicas_taking_an_expired_lease_at_once_make_one_leader(kube: KubeEnv) -> None:
    clock = Clock()
    client = KubeClient(kube.new_api_client(), NS)
    assert await LeaderElector(client, "reaper", "gw-z", duration=10, clock=clock).try_acquire_or_renew()
    slow_client = HeldAfterRead(kube.new_api_client(), NS)
    quick, slow = (LeaderElector(c, "reaper", name, duration=10, clock=clock)
                   for c, name in ((client, "gw-a"), (slow_client, "gw-b")))
    slow_client.go.set()
    assert not await quick.try_acquire_or_renew()
    assert not await slow.try_acquire_or_renew()  # both have seen gw-z's record
    clock.now += 10.1  # gw-z has gone quiet for a whole term
    slow_client.go.clear()
    slow_client.read.clear()
    slow_round = asyncio.create_task(slow.try_acquire_or_renew())
    await slow_client.read.wait()  # gw-b has read the expired lease, and not written yet
    assert await quick.try_acquire_or_renew()
    slow_client.go.set()
    assert not await slow_round  # its write carried the version it read: refused, not a second leader
    assert quick.is_leader()
    assert not slow.is_leader()


async def test_a_leader_stops_leading_the_moment_a_renewal_fails(kube: KubeEnv) -> None:
    clock = Clock()  # stands still: the term never runs out by itself here
    leader = LeaderElector(KubeClient(kube.new_api_client(), NS), "reaper", "gw-a", duration=0.3, clock=clock)
    leader.start()
    try:
        await until(leader.is_leader)
        kube.emulator.fail("get", LEASE, status=500, times=None)
        await until(lambda: not leader.is_leader())
    finally:
        await leader.stop(release=False)


async def test_an_object_deleted_while_a_cache_was_away_is_seen_gone_after_the_re_list(
        kube: KubeEnv, make_runtime: MakeRuntime, kubelet: FakeKubelet) -> None:
    emu = kube.emulator
    runtime = await make_runtime()
    await new_workspace(runtime)
    await runtime.wake("w1")
    pods = runtime.informers[POD_KIND]
    await pods.stop()  # cut off (as a long network partition)
    emu.delete_object(POD, NS, "ws-w1")
    await emu.wait_gone(POD, NS, "ws-w1")
    emu.compact()  # what it missed is no longer in the history: only a re-list can tell
    pods.start()
    await until(lambda: pods.lists == 2)
    await until(lambda: runtime.get("w1").phase is Phase.WARM)  # type: ignore[union-attr]


async def test_an_object_changed_while_a_cache_was_away_is_seen_changed_after_the_re_list(
        kube: KubeEnv, make_runtime: MakeRuntime) -> None:
    emu = kube.emulator
    runtime = await make_runtime()
    await new_workspace(runtime)
    workspaces = runtime.informers[WORKSPACE_KIND]
    await workspaces.stop()
    emu.patch_object(WORKSPACE, NS, "w1", {"spec": {"ports": {"3000": "org"}}})  # kubectl edit, unseen
    emu.compact()
    workspaces.start()
    await until(lambda: workspaces.lists == 2)
    await until(lambda: runtime.get("w1").spec.ports == {3000: "org", 8000: "public"})  # type: ignore[union-attr]


async def test_a_watch_that_carried_events_before_it_broke_was_a_recovery(
        kube: KubeEnv, caplog: pytest.LogCaptureFixture) -> None:
    """Only an error first thing is no recovery: a watch that carried events worked, so its breaking is a new loss,
    said again and counted from then — not from the loss before it, which would make readiness fail early."""
    emu = kube.emulator
    emu.fail("watch", WORKSPACE, status=500)  # the first watch fails: a loss
    async with workspace_cache(kube, first_delay=0.05) as cache:
        await until(lambda: cache.unhealthy_since is not None)
        first_loss = cache.unhealthy_since
        emu.create_object(WORKSPACE, workspace("w1"), NS)
        await until(lambda: cache.get("w1") is not None)  # the next watch carried it
        emu.fail("watch", WORKSPACE, status=500, times=None)  # from now on every watch fails
        assert emu.drop_watches(WORKSPACE, abort=True) == 1  # and this one breaks after its event
        await until(lambda: cache.unhealthy_since != first_loss)
        assert not cache.healthy
    lost = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lost) == 2, lost

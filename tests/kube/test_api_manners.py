"""What the runtime asks of the API server: bounded rate and concurrency, Retry-After, pages, guarded updates."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from gateway.errors import Conflict
from gateway.lifecycle import Phase
from gateway.lifecycle.kubernetes.client import POD as POD_KIND
from gateway.lifecycle.kubernetes.client import PVC as PVC_KIND
from gateway.lifecycle.kubernetes.client import KubeClient, KubeError, retrying
from gateway.lifecycle.kubernetes.throttle import Throttle
from tests.kube.emulator import POD, PVC, WORKSPACE, KubeEnv
from tests.kube.kubelet import FakeKubelet
from tests.kube.support import NS, MakeRuntime, new_workspace, until

pytestmark = pytest.mark.timeout(90)


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


async def test_the_token_bucket_allows_a_burst_then_the_rate() -> None:
    time = FakeTime()
    throttle = Throttle(qps=2, burst=3, concurrency=10, clock=time.clock, sleep=time.sleep)
    for _ in range(7):
        await throttle.token()
    assert time.slept == [0.5, 0.5, 0.5, 0.5]  # three at once, then one every 1/qps
    assert throttle.waited == 2.0  # what the storm benchmark reports
    time.now += 10  # a quiet spell refills the bucket up to the burst, not beyond
    for _ in range(3):
        await throttle.token()
    assert len(time.slept) == 4
    await throttle.token()
    assert time.slept[-1] == 0.5


async def test_the_bucket_refills_by_the_time_since_the_last_token() -> None:
    time = FakeTime()
    throttle = Throttle(qps=2, burst=3, concurrency=10, clock=time.clock, sleep=time.sleep)
    await throttle.token()  # 3 -> 2
    time.now = 0.4
    await throttle.token()  # 2 + 0.8 -> 1.8
    time.now = 0.8
    await throttle.token()  # 1.8 + 0.8 (not the 1.6 since the first) -> 1.6
    await throttle.token()  # -> 0.6
    await throttle.token()  # 0.6: waits for the 0.4 of a token it lacks
    assert time.slept == [pytest.approx(0.2)]


async def test_a_sleep_that_runs_long_does_not_slow_the_rate() -> None:
    """The loop wakes a sleeper late when it is busy (a wake storm): the time overslept counts toward the next
    token, so callers still get ``qps``, not less by the lateness of every sleep."""
    time = FakeTime()

    async def late(seconds: float) -> None:
        await time.sleep(seconds)
        time.now += 0.1

    throttle = Throttle(qps=2, burst=1, concurrency=10, clock=time.clock, sleep=late)
    for _ in range(21):
        await throttle.token()
    assert time.now == pytest.approx(10.1)  # 20 tokens past the burst at 2 a second, and the last sleep's lateness


async def test_a_wake_storm_keeps_to_the_concurrency_bound(kube: KubeEnv, make_runtime: MakeRuntime) -> None:
    emu = kube.emulator
    for index in range(30):
        emu.create_object(WORKSPACE, {"metadata": {"name": f"s{index}"}, "spec": {"owner": "a"}}, NS)
    runtime = await make_runtime(api_concurrency=3, api_qps=1000, api_burst=1000)
    client = runtime.client
    assert client is not None
    in_flight, most = 0, 0
    send = client._send

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal in_flight, most
        watching = (kwargs.get("query") or {}).get("watch") == "true"
        in_flight += not watching
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0.005)
            return await send(*args, **kwargs)
        finally:
            in_flight -= not watching

    client._send = counted  # type: ignore[method-assign]
    async with FakeKubelet(emu):
        states = await asyncio.gather(*(runtime.wake(f"s{index}") for index in range(30)))
    assert {state.phase for state in states} == {Phase.RUNNING}
    assert most == 3


async def test_retry_after_is_honoured(kube: KubeEnv) -> None:
    kube.emulator.fail("list", PVC, status=429, retry_after=2)
    client = KubeClient(kube.new_api_client(), NS)
    with pytest.raises(KubeError) as refused:
        await client.list(PVC_KIND)
    assert (refused.value.status, refused.value.retry_after) == (429, 2.0)

    time = FakeTime()
    answers: list[Any] = [KubeError(429, "TooManyRequests", retry_after=7), KubeError(503, "Unavailable"), "done"]

    async def call() -> str:
        answer = answers.pop(0)
        if isinstance(answer, KubeError):
            raise answer
        return str(answer)

    assert await retrying(call, first_delay=0.2, sleep=time.sleep) == "done"
    assert time.slept[0] == 7  # as the server asked, not the 0.1-0.3 s backoff
    assert time.slept[1] < 1  # no Retry-After: the jittered backoff
    answers[:] = [KubeError(429, "TooManyRequests", retry_after=3600), "done"]
    await retrying(call, sleep=time.sleep)
    assert time.slept[-1] == 30  # within reason


async def test_lists_are_read_in_pages(kube: KubeEnv, make_runtime: MakeRuntime) -> None:
    emu = kube.emulator
    for index in range(5):
        emu.create_object(WORKSPACE, {"metadata": {"name": f"p{index}"}, "spec": {"owner": "a"}}, NS)
    runtime = await make_runtime(list_page_size=2)
    assert sorted(state.id for state in runtime.list()) == [f"p{index}" for index in range(5)]
    pages = [request for request in emu["list", WORKSPACE] if request.params.get("watch") is None]
    assert [request.params.get("limit") for request in pages] == ["2", "2", "2"]
    assert [bool(request.params.get("continue")) for request in pages] == [False, True, True]


async def test_a_continue_token_that_expired_lists_again(kube: KubeEnv) -> None:
    emu = kube.emulator
    for index in range(3):
        emu.create_object(PVC, {"metadata": {"name": f"c{index}"}, "spec": {}}, NS)
    client = KubeClient(kube.new_api_client(), NS, page_size=2)
    expired = emu.fail("list", PVC, lambda request: bool(request.params.get("continue")), status=410)
    listing = await client.list(PVC_KIND)
    assert [item["metadata"]["name"] for item in listing["items"]] == ["c0", "c1", "c2"]
    assert len(list(expired)) == 1  # the second page expired once; the list started again


async def test_a_watch_that_ends_at_once_is_reopened_with_backoff(
        kube: KubeEnv, make_runtime: MakeRuntime, caplog: pytest.LogCaptureFixture) -> None:
    """An empty stream is how a quiet watch ends (its timeout): no error, and the cache stays healthy."""
    emu = kube.emulator
    ended = emu.fail("watch", POD, status=200, times=None)  # an empty stream, over and over
    runtime = await make_runtime()
    await asyncio.sleep(1.5)
    assert 2 <= len(list(ended)) <= 12  # 0.1, 0.2, 0.4, 0.8 s apart (jittered), not hundreds
    assert runtime.informers[POD_KIND].healthy
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_updates_carry_the_resource_version_and_redo_on_conflict(
        kube: KubeEnv, make_runtime: MakeRuntime) -> None:
    emu = kube.emulator
    runtime = await make_runtime()
    await new_workspace(runtime)
    emu.fail("patch", WORKSPACE, status=409)  # someone wrote between our read and our write
    state = await runtime.update("w1", ports={8000: "public", 3000: "org"})
    assert state.spec.ports == {8000: "public", 3000: "org"}
    patches = [request for request in emu["patch", WORKSPACE] if request.subresource is None]
    assert len(patches) == 2
    assert all(request.data["metadata"]["resourceVersion"] for request in patches)
    resource = emu.get_object(WORKSPACE, NS, "w1")
    assert resource is not None
    assert resource["spec"]["ports"] == {"8000": "public", "3000": "org"}
    emu.fail("patch", WORKSPACE, status=409, times=None)
    with pytest.raises(Conflict, match="kept changing") as refused:
        await runtime.update("w1", collaborators=("bob",))
    assert refused.value.code == "workspace-changed"


async def test_a_wake_closes_the_event_watches_it_opened(
        kube: KubeEnv, kubelet: FakeKubelet, make_runtime: MakeRuntime) -> None:
    emu = kube.emulator
    runtime = await make_runtime()
    await new_workspace(runtime)
    caches = len(runtime.informers)
    await emu.wait_watches(caches)  # Watch().stream() is lazy: counted before all four opened, this test failed in CI
    assert (await runtime.wake("w1")).phase is Phase.RUNNING  # followed its pod's and its home's Events
    await until(lambda: emu.watch_count == caches)


async def test_watches_ask_for_the_configured_timeout(kube: KubeEnv, make_runtime: MakeRuntime) -> None:
    emu = kube.emulator
    await make_runtime(watch_timeout=7)
    await emu.wait_watches(4)
    watches = [request for kind in (WORKSPACE, POD, PVC) for request in emu["watch", kind]]
    assert len(watches) >= 3
    assert {request.params.get("timeoutSeconds") for request in watches} == {"7"}

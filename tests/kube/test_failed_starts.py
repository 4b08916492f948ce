"""A start that cannot succeed ends in time with the cluster's reason, explained step by step, and is cleaned up."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.auth.identity import Identity
from gateway.config import Config
from gateway.lifecycle import LifecycleError, Phase
from gateway.lifecycle.kubernetes import KubernetesRuntime
from gateway.lifecycle.kubernetes.client import POD as POD_KIND
from gateway.lifecycle.kubernetes.starting import EventFeed, Graces, Judge, describe
from gateway.server.app import build_app
from gateway.server.context import GATEWAY
from tests.kube.emulator import POD, WORKSPACE, KubeEnv
from tests.kube.kubelet import FakeKubelet, LoopbackIPs
from tests.kube.scenarios import EVENTS, INSUFFICIENT_MEMORY, UNBOUND, Scenario, record_event
from tests.kube.support import NS, MakeRuntime, kube_settings, names, new_workspace, until

pytestmark = pytest.mark.timeout(60)
BOUND = {"metadata": {"name": "ws-w1-home"}, "status": {"phase": "Bound"}}  # a home the judge sees no trouble in
PENDING_HOME = {"metadata": {"name": "ws-w1-home"}, "status": {"phase": "Pending"}}
PENDING_POD = {"metadata": {"name": "ws-w1"}, "status": {"phase": "Pending"}}  # a pod the judge sees no trouble in


def pulling(**waiting: str) -> dict[str, Any]:
    """A pod whose container waits for its image (``reason``, ``message``)."""
    return {"metadata": {"name": "ws-w1"}, "status": {"phase": "Pending", "containerStatuses": [
        {"state": {"waiting": waiting}}]}}
QUICK = {"unschedulable_grace": 0.4, "bind_timeout": 0.4, "image_pull_grace": 0.6, "start_timeout": 8}


async def failed_wake(runtime: KubernetesRuntime) -> tuple[str, list[str]]:
    """Wake, expect a clear failure; return its message and every progress line published meanwhile."""
    with runtime.events() as events:
        with pytest.raises(LifecycleError) as failure:
            await runtime.wake("w1")
        lines = [events.queue.get_nowait().message for _ in range(events.queue.qsize())]
    assert failure.value.code == "workspace-start-failed"
    assert failure.value.message.removeprefix("Workspace w1 could not start: ") in lines  # the waiting page too
    return failure.value.message, lines


@pytest.fixture
async def started() -> AsyncIterator[list[FakeKubelet]]:
    kubelets: list[FakeKubelet] = []
    yield kubelets
    for kubelet in kubelets:
        await kubelet.stop()


async def runtime_with(kube: KubeEnv, make_runtime: MakeRuntime, started: list[FakeKubelet], scenario: Scenario,
                       **settings: Any) -> KubernetesRuntime:
    kubelet = FakeKubelet(kube.emulator, pod_ip=LoopbackIPs(first=40), scenario=scenario)
    kubelet.start()
    started.append(kubelet)
    runtime = await make_runtime(**{**QUICK, **settings})
    await new_workspace(runtime)
    return runtime


async def test_unschedulable_ends_with_the_schedulers_words(
        kube: KubeEnv, make_runtime: MakeRuntime, started: list[FakeKubelet]) -> None:
    """The scheduler says once why the pod does not fit, and nothing changes after: the wake ends when the grace
    runs out (looked at again then, with no change in the cluster to wake it), not at the start timeout — here ten
    minutes, which the test does not wait out."""
    runtime = await runtime_with(kube, make_runtime, started, Scenario(unschedulable=INSUFFICIENT_MEMORY),
                                 start_timeout=600)
    async with asyncio.timeout(30):
        message, lines = await failed_wake(runtime)
    assert f"Scheduling — {INSUFFICIENT_MEMORY}" in message
    assert f"Scheduling — {INSUFFICIENT_MEMORY}" in lines  # streamed while it waited
    await kube.emulator.wait_gone(POD, NS, "ws-w1")  # the failed pod is cleaned up


async def test_a_home_that_never_binds_ends_with_the_provisioners_words(
        kube: KubeEnv, make_runtime: MakeRuntime, started: list[FakeKubelet]) -> None:
    runtime = await runtime_with(kube, make_runtime, started, Scenario(bind_failure='storageclass "fast" not found'))
    message, lines = await failed_wake(runtime)
    assert "the home volume was not provisioned" in message
    assert 'storageclass "fast" not found' in message
    assert f"Scheduling — {UNBOUND}" in lines
    await kube.emulator.wait_gone(POD, NS, "ws-w1")


async def test_a_slow_binding_within_its_grace_starts(
        kube: KubeEnv, make_runtime: MakeRuntime, started: list[FakeKubelet]) -> None:
    runtime = await runtime_with(kube, make_runtime, started, Scenario(bind_delay=0.3), bind_timeout=2)
    assert (await runtime.wake("w1")).phase is Phase.RUNNING


async def test_image_pull_back_off_past_its_grace_fails(
        kube: KubeEnv, make_runtime: MakeRuntime, started: list[FakeKubelet]) -> None:
    runtime = await runtime_with(kube, make_runtime, started, Scenario(pull_failures=-1, step=0.1))
    message, lines = await failed_wake(runtime)
    assert 'Image pull failed — Failed to pull image "codercom/code-server' in message
    assert any(line.startswith("Pulling image — ") for line in lines)
    assert any(line.startswith("Back-off — Back-off pulling image") for line in lines)
    await kube.emulator.wait_gone(POD, NS, "ws-w1")


async def test_one_transient_image_pull_error_does_not_fail_the_wake(
        kube: KubeEnv, make_runtime: MakeRuntime, started: list[FakeKubelet]) -> None:
    runtime = await runtime_with(kube, make_runtime, started, Scenario(pull_failures=1, step=0.15),
                                 image_pull_grace=1.5)
    with runtime.events() as events:
        assert (await runtime.wake("w1")).phase is Phase.RUNNING
        lines = [events.queue.get_nowait().message for _ in range(events.queue.qsize())]
    assert any(line.startswith("Failed — Failed to pull image") for line in lines)


async def test_crash_loop_back_off_fails_at_once(
        kube: KubeEnv, make_runtime: MakeRuntime, started: list[FakeKubelet]) -> None:
    runtime = await runtime_with(kube, make_runtime, started, Scenario(crash_loop=True, step=0.2),
                                 start_timeout=30)
    message, _lines = await failed_wake(runtime)
    assert "CrashLoopBackOff" in message  # the kubelet's reason, not the start timeout's
    await kube.emulator.wait_gone(POD, NS, "ws-w1")


async def test_readiness_never_reached_ends_at_the_start_timeout_with_the_probes_words(
        kube: KubeEnv, make_runtime: MakeRuntime, started: list[FakeKubelet]) -> None:
    runtime = await runtime_with(kube, make_runtime, started, Scenario(ready_after=None), start_timeout=1.5)
    message, _lines = await failed_wake(runtime)
    assert "did not become ready within 1.5 s" in message
    assert "Readiness probe failed" in message
    await kube.emulator.wait_gone(POD, NS, "ws-w1")


async def test_a_start_that_timed_out_on_a_pod_its_cache_never_showed_leaves_no_pod(
        kube: KubeEnv, kubelet: FakeKubelet, make_runtime: MakeRuntime) -> None:
    """The pod was made, but the replica's watch of pods had gone silent: the wake waited out its start timeout and
    failed. The cleanup deleted only a pod its cache showed, none: the pod ran on, using its quota, and the workspace
    turned RUNNING by itself once the cache caught up, after the visitor was told it could not start. The pod
    this wake made goes, by uid."""
    runtime = await make_runtime(start_timeout=2)
    await new_workspace(runtime)
    await runtime.informers[POD_KIND].stop()  # the pod cache stands still
    with pytest.raises(LifecycleError) as failure:
        await runtime.wake("w1")
    assert failure.value.code == "workspace-start-failed"
    await kube.emulator.wait_gone(POD, NS, "ws-w1")


async def test_readiness_after_a_while_is_waited_for(
        kube: KubeEnv, make_runtime: MakeRuntime, started: list[FakeKubelet]) -> None:
    runtime = await runtime_with(kube, make_runtime, started, Scenario(ready_after=0.8))
    with runtime.events() as events:
        state = await runtime.wake("w1")
        lines = [events.queue.get_nowait().message for _ in range(events.queue.qsize())]
    assert state.phase is Phase.RUNNING
    assert "Container started — Started container code-server" in lines


async def test_an_api_client_gets_the_reason_as_json_if_it_runs_the_workspace(
        kube: KubeEnv, aiohttp_client: Any, tmp_path: Path) -> None:
    """The owner hears the scheduler's words; a visitor of the public port, who may wake it too, only that it
    failed: what the cluster says of itself is not for everyone on the internet."""
    async with FakeKubelet(kube.emulator, scenario=Scenario(unschedulable=INSUFFICIENT_MEMORY)):
        kube.emulator.create_object(WORKSPACE, {"metadata": {"name": "w1"},
                                                "spec": {"owner": "alice", "ports": {"8000": "public"}}}, NS)
        settings = kube_settings(kube.url, **QUICK).model_dump(mode="json")
        config = Config.model_validate({"runtime": "kubernetes", "kubernetes": settings,
                                        "local": {"state_dir": str(tmp_path / "state")}})
        client: TestClient[web.Request, web.Application] = await aiohttp_client(build_app(config))
        host = "8000-w1.localhost:8080"
        visitor = await client.get("/", headers={"Host": host, "Accept": "application/json"})
        session = client.app[GATEWAY].auth.sessions.issue(Identity("alice"), host)
        owner = await client.get("/", headers={"Host": host, "Accept": "application/json",
                                               "Cookie": f"codehub_session={session}"})
        assert (visitor.status, owner.status) == (503, 503)
        told = (await visitor.json())["error"]
        assert (told["code"], told["message"]) == (
            "workspace-start-failed", "Workspace w1 could not start. Its owner and collaborators can see why.")
        assert INSUFFICIENT_MEMORY in (await owner.json())["error"]["message"]
        await until(lambda: names(kube.emulator, POD) == [])


def test_a_grace_counts_only_while_the_condition_lasts() -> None:
    judge = Judge(Graces(unschedulable=10, bind=10, image_pull=1.0))
    hiccup = pulling(reason="ErrImagePull", message="registry hiccup")
    assert judge(hiccup, BOUND, now=100.0) == (None, 101.0)
    assert judge(PENDING_POD, BOUND, now=100.8) == (None, None)  # cleared: the clock stops
    assert judge(hiccup, BOUND, now=101.5) == (None, 102.5)  # a new occurrence starts it again
    assert judge(hiccup, BOUND, now=102.5) == ("Image pull failed — registry hiccup", None)


@pytest.mark.parametrize(("event", "line"), [
    ({"reason": "FailedScheduling", "message": "0/3 nodes are available"}, "Scheduling — 0/3 nodes are available"),
    ({"reason": "Scheduled"}, "Scheduled"),
    ({"reason": "Scheduled", "message": ""}, "Scheduled"),
    ({"message": "something happened"}, "something happened"),
    ({"reason": "SomethingNew", "message": "m"}, "SomethingNew — m"),
])
def test_an_event_is_one_line_with_what_it_has(event: dict[str, Any], line: str) -> None:
    assert describe(event) == line


def test_a_pod_the_kubelet_has_not_described_yet_holds_no_grace() -> None:
    """A pod as just made (no status), or whose container has no state yet, is only not ready: nothing to judge."""
    judge = Judge(Graces(unschedulable=1, bind=1, image_pull=1))
    for pod in ({"metadata": {"name": "ws-w1"}},
                {"metadata": {"name": "ws-w1"}, "status": {"phase": "Pending", "containerStatuses": [{"name": "c"}]}}):
        assert judge(pod, BOUND, now=100.0) == (None, None)
        assert judge(pod, BOUND, now=200.0) == (None, None)


def test_a_home_the_cache_does_not_show_yet_is_not_judged() -> None:
    """The pod came into the cache before its home did (two watches): nothing is known of the home to wait on."""
    judge = Judge(Graces(unschedulable=1, bind=1, image_pull=1))
    assert judge(PENDING_POD, None, now=100.0) == (None, None)
    assert judge(PENDING_POD, PENDING_HOME, now=100.0) == (None, 101.0)
    undescribed = {"metadata": {"name": "ws-w1-home"}}  # no status yet: as Pending
    assert judge(PENDING_POD, undescribed, now=100.5) == (None, 101.0)


def test_with_two_conditions_held_the_judge_looks_again_at_the_first_grace_to_run_out() -> None:
    judge = Judge(Graces(unschedulable=10, bind=1, image_pull=10))
    pod = pulling(reason="ErrImagePull")
    assert judge(pod, PENDING_HOME, now=100.0) == (None, 101.0)
    assert judge(pod, BOUND, now=100.5) == (None, 110.0)  # the home bound: the image pull's grace is left


def test_a_pod_going_away_is_not_judged_a_failed_start() -> None:
    """A pod being deleted ends (Failed, Succeeded) as it goes: that is the stop's doing, not why a start failed."""
    judge = Judge(Graces(unschedulable=1, bind=1, image_pull=1))
    ended = {"metadata": {"name": "ws-w1"}, "status": {"phase": "Failed", "reason": "Evicted"}}
    assert judge(ended, BOUND, now=100.0) == ("the workspace pod ended (Evicted)", None)
    going = {"metadata": {"name": "ws-w1", "deletionTimestamp": "2026-12-07T10:00:00Z"}, "status": ended["status"]}
    assert judge(going, BOUND, now=100.0) == (None, None)


@pytest.mark.parametrize(("condition", "after_grace"), [
    ({"type": "PodScheduled", "status": "False", "reason": "Unschedulable"},
     "Scheduling — no node can run the workspace"),
    ({"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes are available"},
     "Scheduling — 0/3 nodes are available"),
    ({"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}, None),  # held by its gates, on purpose
    ({"type": "PodScheduled", "status": "True"}, None),
], ids=["unschedulable-without-words", "unschedulable", "gated", "scheduled"])
def test_only_a_pod_the_scheduler_cannot_place_runs_out_its_grace(condition: dict[str, Any],
                                                                  after_grace: str | None) -> None:
    judge = Judge(Graces(unschedulable=1.0, bind=10, image_pull=10))
    pod = {"metadata": {"name": "ws-w1"}, "status": {"phase": "Pending", "conditions": [condition]}}
    assert judge(pod, BOUND, now=100.0) == (None, 101.0 if after_grace else None)
    assert judge(pod, BOUND, now=101.0) == (after_grace, None)


def test_an_image_pull_failure_without_words_is_named_by_its_reason() -> None:
    judge = Judge(Graces(unschedulable=10, bind=10, image_pull=1.0))
    pod = pulling(reason="ImagePullBackOff")
    assert judge(pod, BOUND, now=100.0) == (None, 101.0)
    assert judge(pod, BOUND, now=101.0) == ("Image pull failed — ImagePullBackOff", None)


async def test_an_old_namesakes_events_from_before_the_wake_are_not_shown(
        kube: KubeEnv, kubelet: FakeKubelet, make_runtime: MakeRuntime) -> None:
    runtime = await make_runtime()
    await new_workspace(runtime)
    earlier = (datetime.datetime.now(tz=datetime.UTC) - datetime.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    kube.emulator.create_object(EVENTS, {
        "metadata": {"name": "ws-w1.0123456789abcdef"},
        "involvedObject": {"kind": "Pod", "apiVersion": "v1", "name": "ws-w1", "namespace": NS, "uid": "gone"},
        "type": "Warning", "reason": "FailedScheduling", "message": "0/3 nodes are available: an old pod's trouble",
        "firstTimestamp": earlier, "lastTimestamp": earlier, "count": 1}, NS)
    with runtime.events() as events:
        assert (await runtime.wake("w1")).phase is Phase.RUNNING
        lines = [events.queue.get_nowait().message for _ in range(events.queue.qsize())]
    assert lines
    assert not [line for line in lines if "an old pod's trouble" in line]


async def test_an_event_feed_hands_its_objects_events_once_each(kube: KubeEnv, make_runtime: MakeRuntime) -> None:
    """The feed hands the Events of its objects alone, as they are written: another workspace's (its image, its
    failures) never reach this one's waiting page, listed or watched, nor does an Event's deletion. A watch lost to
    a 410 lists them again: those already shown are not shown twice, and one written meanwhile is. Stopped, the
    feed has ended its watches."""
    emu = kube.emulator
    runtime = await make_runtime()
    assert runtime.client is not None
    pod = {"kind": "Pod", "apiVersion": "v1", "metadata": {"name": "ws-w1", "namespace": NS, "uid": "u1"}}
    other = {"kind": "Pod", "apiVersion": "v1", "metadata": {"name": "ws-w2", "namespace": NS, "uid": "u2"}}
    first = record_event(emu, pod, "Normal", "Scheduled", "Successfully assigned", "default-scheduler")
    record_event(emu, other, "Warning", "Failed", "pulling registry.example/secret-project", "kubelet")
    handed: list[str] = []
    feed = EventFeed(runtime.client, ["ws-w1"], lambda event: handed.append(event["metadata"]["name"]))
    feed.start()
    try:
        await until(lambda: emu.watches_of(EVENTS) == 1)
        assert handed == [first["metadata"]["name"]]
        record_event(emu, other, "Warning", "BackOff", "Back-off restarting the other container", "kubelet")
        emu.delete_object(EVENTS, NS, first["metadata"]["name"])  # expired (an hour on): not news
        middle = record_event(emu, pod, "Normal", "Pulling", "Pulling image", "kubelet")
        await until(lambda: len(handed) > 1)  # the watch got as far as this one, the other's before it
        record_event(emu, other, "Normal", "Pulled", "the other's image", "kubelet")  # the feed's version ages
        emu.compact()  # and is too old now: only a new list goes on from here
        assert emu.drop_watches(EVENTS, error=410) == 1
        later = record_event(emu, pod, "Normal", "Pulled", "Pulled image", "kubelet")
        await until(lambda: len(handed) > 2)
        await asyncio.sleep(0.3)  # and nothing more
        assert handed == [first["metadata"]["name"], middle["metadata"]["name"], later["metadata"]["name"]]
    finally:
        await feed.stop()
    assert all(task.done() for task in feed._tasks)

"""The ``--workers`` parent's control plane: its idle reaper is wired like the single process's, so a workspace a
worker is waking is never put to sleep (or archived) under it. And the workers' side of it (``RemoteRuntime``): a
copy of every state that only moves forward, operations and errors forwarded whole, activity reported when it
changed, and a worker that never outlives its parent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.errors import GatewayError, NotFound
from gateway.lifecycle import Phase, WorkspaceState
from gateway.lifecycle.base import LifecycleError
from gateway.lifecycle.idle import Activity
from gateway.lifecycle.remote import RemoteError, RemoteRuntime, error_to_wire, forward_activity
from gateway.metrics import Metrics
from gateway.server.control import ControlServer
from gateway.server.wiring import make_reaper, make_runtime
from tests.conftest import next_address, settings, workspace

pytestmark = pytest.mark.timeout(60)
Prepare = Callable[[web.Request, web.StreamResponse], Awaitable[None]]


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_a_workspace_a_worker_is_waking_is_not_reaped(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    config = settings(tmp_path, {"ws": workspace(next_address())},
                      idle={"to_warm": 0.001, "to_cold": 0.001, "check_every": 3600})
    runtime = make_runtime(config)
    await runtime.start()
    server = ControlServer(runtime, Activity())
    reaper = make_reaper(config, runtime, server.activity, Metrics(), busy=server.waking)
    release = asyncio.Event()
    real_wake = runtime.wake

    async def slow_wake(name: str) -> WorkspaceState:
        await release.wait()
        return await real_wake(name)

    monkeypatch.setattr(runtime, "wake", slow_wake)
    async with TestClient(TestServer(server.app())) as client:
        try:
            waking = asyncio.ensure_future(client.post("/workspaces/ws/wake"))
            async with asyncio.timeout(10):
                while not server.waking("ws"):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.01)  # long past to_cold: a WARM workspace would be archived now
            await asyncio.gather(*reaper.sweep())
            assert runtime.get("ws").phase is Phase.WARM  # type: ignore[union-attr]
            release.set()
            assert (await waking).status == 200
            assert runtime.get("ws").phase is Phase.RUNNING  # type: ignore[union-attr]
            assert server.activity.last("ws") is not None  # the wake itself was use: not reaped at once after
        finally:
            release.set()
            await reaper.close()
            await runtime.close()


async def test_the_parents_reaper_goes_by_what_the_workers_report(tmp_path: Path) -> None:
    """Workers report their newest activity and open connections to the parent, whose reaper decides: a report
    older than one already in keeps nothing awake longer, a connection open in any worker keeps its workspace
    running, and it stops counting once the worker reports it closed or the worker is gone."""
    config = settings(tmp_path, {name: workspace(next_address()) for name in ("a", "b", "c")},
                      idle={"to_warm": 60, "to_cold": 3600, "check_every": 3600})
    runtime = make_runtime(config)
    await runtime.start()
    now = [time.time()]
    server = ControlServer(runtime, Activity(clock=lambda: now[0]))
    reaper = make_reaper(config, runtime, server.activity, Metrics(), busy=server.waking)

    async def phases_after_a_pass() -> dict[str, Phase]:
        await asyncio.gather(*reaper.sweep())
        return {name: runtime.get(name).phase for name in ("a", "b", "c")}  # type: ignore[union-attr]

    async with TestClient(TestServer(server.app())) as client:
        try:
            for name in ("a", "b", "c"):
                await runtime.wake(name)
            start = now[0]
            for report in ({"source": 1, "last": {"a": start + 1000}, "open": {"b": 1}},
                           {"source": 2, "last": {"a": start - 1000}, "open": {"c": 2}}):
                assert (await client.post("/activity", json=report)).status == 204
            now[0] = start + 1030  # 30 s after a's last use, long after b's and c's wakes
            assert await phases_after_a_pass() == {"a": Phase.RUNNING, "b": Phase.RUNNING, "c": Phase.RUNNING}

            assert (await client.post("/activity", json={"source": 1, "last": {}, "open": {}})).status == 204
            server.activity.forget(2)  # what the parent does when worker 2 exits
            now[0] = start + 1070
            assert await phases_after_a_pass() == {"a": Phase.WARM, "b": Phase.WARM, "c": Phase.WARM}
        finally:
            await reaper.close()
            await runtime.close()


@contextlib.asynccontextmanager
async def a_worker_of(tmp_path: Path, lost: asyncio.Event | None = None, *, address: str | None = None,
                      prepare: Prepare | None = None
                      ) -> AsyncIterator[tuple[ControlServer, RemoteRuntime, web.AppRunner]]:
    """The parent's control socket (a real local runtime behind it, its events fanned out) and a worker's
    ``RemoteRuntime`` following it, in this process; ``prepare`` sees (or holds) each of the parent's answers
    before it goes out. Without ``lost`` the worker does what ``serve``'s do when the stream ends: SIGTERM itself."""
    config = settings(tmp_path, {"ws": workspace(address or next_address(), ports={3000: "private"})})
    runtime = make_runtime(config)
    await runtime.start()
    server = ControlServer(runtime, Activity())
    app = server.app()
    if prepare is not None:
        app.on_response_prepare.append(prepare)
    runner = web.AppRunner(app)
    await runner.setup()
    socket_path = tmp_path / "control.sock"
    await web.UnixSite(runner, str(socket_path)).start()
    fan_out = asyncio.create_task(server.fan_out())
    remote = RemoteRuntime(socket_path, on_lost=lost.set if lost is not None else None)
    try:
        await remote.start()
        yield server, remote, runner
    finally:
        await remote.close()
        fan_out.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await fan_out
        await runner.cleanup()
        await runtime.close()


async def test_a_worker_changes_a_workspace_through_the_parent_and_sees_what_it_made(tmp_path: Path) -> None:
    """The hub's changes to a port (visibility, label, identity, HTTPS) and to collaborators, made in a worker, are
    made by the parent's runtime, each only as asked (what is not named in an update stays as it was), and reach
    every other worker."""
    async with a_worker_of(tmp_path) as (server, remote, _):
        assert [state.spec.id for state in remote.list()] == ["ws"], "every state before synced"
        other = RemoteRuntime(tmp_path / "control.sock")
        await other.start()
        changed = await remote.update("ws", ports={3000: "public", 3001: "org"}, collaborators=("bob", "carol"),
                                      identity_ports=frozenset({3000}), https_ports=frozenset({3001}),
                                      labels={3000: "web"})
        made = server.runtime.get("ws")
        assert made is not None
        for spec in (changed.spec, made.spec):
            assert (dict(spec.ports), spec.collaborators, spec.identity_ports, spec.https_ports, dict(spec.labels)) == (
                {3000: "public", 3001: "org"}, ("bob", "carol"), frozenset({3000}), frozenset({3001}), {3000: "web"})
        try:
            async with asyncio.timeout(10):  # the other worker too, though the phase did not change
                while (seen := other.get("ws")) is None or dict(seen.spec.labels) != {3000: "web"}:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        finally:
            await other.close()
        relabelled = await remote.update("ws", labels={3001: "api"})
        assert (dict(relabelled.spec.ports), relabelled.spec.collaborators, relabelled.spec.identity_ports,
                relabelled.spec.https_ports, dict(relabelled.spec.labels)) == (
            {3000: "public", 3001: "org"}, ("bob", "carol"), frozenset({3000}), frozenset({3001}), {3001: "api"})
        shared = await remote.update("ws", collaborators=())
        assert (dict(shared.spec.ports), shared.spec.collaborators, dict(shared.spec.labels)) == (
            {3000: "public", 3001: "org"}, (), {3001: "api"})


async def test_a_worker_hears_of_every_change_the_parent_sees(tmp_path: Path) -> None:
    """A workspace woken or put to sleep by the parent (its reaper, or another worker) reaches every worker as the
    new state and as the event itself, which the waiting pages of that worker follow."""
    async with a_worker_of(tmp_path) as (server, remote, _):
        with remote.events() as events:
            await server.runtime.wake("ws")
            async with asyncio.timeout(10):
                while (state := remote.get("ws")) is None or state.phase is not Phase.RUNNING:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
                seen = [await events.queue.get()]
                while seen[-1].phase is not Phase.RUNNING:
                    seen.append(await events.queue.get())
        assert {event.workspace for event in seen} == {"ws"}
        assert (await remote.stop("ws")).phase is Phase.WARM
        assert server.runtime.get("ws").phase is Phase.WARM  # type: ignore[union-attr]


async def test_what_the_parent_refuses_reaches_the_worker_as_the_same_error(tmp_path: Path) -> None:
    async with a_worker_of(tmp_path) as (server, remote, _):
        with pytest.raises(RemoteError) as unknown:
            await remote.wake("nope")
        refused = unknown.value  # what the worker's error page and JSON are made of
        assert (refused.status, refused.code, refused.title, refused.message, refused.headers, refused.retry) == (
            404, "workspace-not-found", "Not found", "There is no workspace called nope.", {}, False)
        assert not server.waking("nope")
        async with remote.session.post("http://control/workspaces/ws/reboot", json={}) as answer:
            assert answer.status == 200
            assert (await answer.json())["error"]["status"] == 404
        assert server.runtime.get("ws").phase is Phase.WARM  # type: ignore[union-attr]


async def test_a_worker_learns_when_the_parent_shuts_down(tmp_path: Path) -> None:
    """The parent ends every worker's event stream as it shuts down: the workers stop, not serve on from states
    nobody updates."""
    lost = asyncio.Event()
    async with a_worker_of(tmp_path, lost) as (_, _, runner):
        await runner.shutdown()
        async with asyncio.timeout(10):
            await lost.wait()


async def test_a_workspace_stays_waking_until_the_last_of_its_wakes_ends(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Two workers may ask for the same wake at once, and a workspace may be woken again later: the reaper leaves
    it alone for as long as any wake asked for it is still going, each time."""
    config = settings(tmp_path, {"ws": workspace(next_address())})
    runtime = make_runtime(config)
    await runtime.start()
    server = ControlServer(runtime, Activity())
    releases: list[asyncio.Event] = []
    real_wake = runtime.wake

    async def held_wake(name: str) -> WorkspaceState:
        release = asyncio.Event()
        releases.append(release)
        await release.wait()
        return await real_wake(name)

    monkeypatch.setattr(runtime, "wake", held_wake)
    async with TestClient(TestServer(server.app())) as client:
        try:
            for _ in range(2):  # a second time, after the first has ended
                wakes = {asyncio.ensure_future(client.post("/workspaces/ws/wake")) for _ in range(2)}
                await until(lambda: len(releases) == 2)
                assert server.waking("ws")
                releases.pop(0).set()
                (ended,), wakes = await asyncio.wait(wakes, return_when=asyncio.FIRST_COMPLETED)
                assert (await ended).status == 200
                assert server.waking("ws"), "the other wake is still going"
                releases.pop(0).set()
                assert (await wakes.pop()).status == 200
                assert not server.waking("ws")
        finally:
            for release in releases:
                release.set()
            await runtime.close()


@pytest.mark.parametrize("error", [
    NotFound("There is no workspace called nope.", code="workspace-not-found"),
    LifecycleError("Archiving ws failed, its home is kept: disk full"),
    LifecycleError("The workspace is busy, try again.", code="workspace-busy", headers={"Retry-After": "5"},
                   retry=True),
], ids=["not-found", "failed", "retry-after"])
def test_an_error_crosses_to_the_worker_whole(error: GatewayError) -> None:
    """A worker renders the parent's error itself (page or JSON, Retry-After, whether to retry), so every part of it
    comes across, not only the status."""
    carried = RemoteError(error_to_wire(error))
    assert (carried.status, carried.code, carried.title, carried.message, carried.headers, carried.retry) == (
        error.status, error.code, error.title, error.message, error.headers, error.retry)


async def test_a_worker_wakes_asks_after_and_archives_a_workspace_through_the_parent(tmp_path: Path) -> None:
    """Each operation is the parent's runtime's own: the worker gets back the state the parent made, and keeps it."""
    async with a_worker_of(tmp_path) as (server, remote, _):
        woken = await remote.wake("ws")
        made = server.runtime.get("ws")
        assert made is not None
        assert made.phase is Phase.RUNNING
        assert (woken.phase, woken.address) == (Phase.RUNNING, made.address)
        assert server.activity.last("ws") is not None, "the wake came from a worker: the parent counts it as use"
        asked = await remote.status("ws")
        assert (asked.phase, asked.address) == (Phase.RUNNING, made.address)
        archived = await remote.archive("ws")
        assert archived.phase is Phase.COLD
        assert server.runtime.get("ws").phase is Phase.COLD  # type: ignore[union-attr]
        assert remote.get("ws").phase is Phase.COLD  # type: ignore[union-attr]


async def test_a_worker_reads_the_ports_of_a_running_workspace_only(tmp_path: Path) -> None:
    """The hub's "detected ports" come from the worker's own look at the workspace's address, and only while the
    workspace runs there: a port something else opened on the address of a sleeping workspace is not its."""
    address = next_address()
    with socket.socket() as listener:
        listener.bind((address, 0))
        listener.listen()
        port = int(listener.getsockname()[1])
        async with a_worker_of(tmp_path, address=address) as (_, remote, _):
            assert remote.listening_ports("ws") == set()
            assert remote.listening_ports("nope") == set()
            await remote.wake("ws")
            assert port in (remote.listening_ports("ws") or set())


async def test_a_late_reply_does_not_undo_what_the_worker_heard_since(tmp_path: Path) -> None:
    """Replies and the stream arrive in any order; the worker's copy only moves forward. The reply to a first change,
    held up on its way, comes in after a second change reached the worker: the worker keeps the second."""
    held: list[str] = []
    release = asyncio.Event()

    async def hold_the_first_update(request: web.Request, response: web.StreamResponse) -> None:
        if request.path.endswith("/update") and not held:
            held.append(request.path)
            await release.wait()

    async with a_worker_of(tmp_path, prepare=hold_the_first_update) as (server, remote, _):
        first = asyncio.create_task(remote.update("ws", labels={3000: "first"}))
        try:
            await until(lambda: bool(held))  # made and numbered by the parent; only its reply waits
            second = await remote.update("ws", labels={3000: "second"})
        finally:
            release.set()
        answered = await first
        for state in (second, answered, remote.get("ws"), server.runtime.get("ws")):
            assert state is not None
            assert dict(state.spec.labels) == {3000: "second"}


async def test_a_worker_reports_its_activity_when_it_changed_under_its_own_pid(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The parent's reaper decides on what the workers report: a worker sends its activity when it changed (not every
    tick), under its process id (the parent forgets a worker's open connections by it when the worker exits), and a
    report the parent failed to take is sent again."""
    reports: list[int] = []

    async def count_reports(request: web.Request, response: web.StreamResponse) -> None:
        if request.path == "/activity":
            reports.append(response.status)

    now = [1000.0]
    worker = Activity(clock=lambda: now[0])
    async with a_worker_of(tmp_path, prepare=count_reports) as (server, remote, _):
        real_merge = server.activity.merge
        failures = [RuntimeError("the parent could not take it")]

        def merge_once_failing(source: int, last: dict[str, float], open_: dict[str, int]) -> None:
            if failures and not open_:
                raise failures.pop()
            real_merge(source, last, open_)

        monkeypatch.setattr(server.activity, "merge", merge_once_failing)
        forwarding = asyncio.create_task(forward_activity(remote, worker.snapshot, every=0.01))
        try:
            with worker.connection("ws"):
                await until(lambda: bool(reports))
                assert server.activity.idle_for("ws", 0.0) == 0.0, "open in a worker: not idle"
                await asyncio.sleep(0.2)  # twenty ticks with nothing new
                assert reports == [204]
                server.activity.forget(os.getpid())  # what the parent does when this worker exits
                assert server.activity.idle_for("ws", 0.0) > 0.0
                now[0] = 2000.0
            with caplog.at_level(logging.WARNING, logger="gateway.lifecycle.remote"):
                await until(lambda: server.activity.last("ws") == 2000.0)
            assert reports == [204, 500, 204]
            assert "activity not sent to the parent" in caplog.text
        finally:
            forwarding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await forwarding


async def test_a_worker_reports_only_the_activity_that_is_new(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that has served thousands of workspaces sends each second the ones used since its last report, not
    every one it ever served again (a JSON body growing with every workspace, once a second, from every worker)."""
    now = [1000.0]
    worker = Activity(clock=lambda: now[0])
    for n in range(1000):
        worker.touch(f"ws{n}")
    async with a_worker_of(tmp_path) as (server, remote, _):
        reported: list[dict[str, float]] = []
        real_merge = server.activity.merge

        def recording(source: int, last: dict[str, float], open_: dict[str, int]) -> None:
            reported.append(dict(last))
            real_merge(source, last, open_)

        monkeypatch.setattr(server.activity, "merge", recording)
        forwarding = asyncio.create_task(forward_activity(remote, worker.snapshot, every=0.01))
        try:
            await until(lambda: len(reported) == 1)
            now[0] = 2000.0
            worker.touch("ws7")
            await until(lambda: len(reported) == 2)
            await asyncio.sleep(0.1)  # ten ticks with nothing new
        finally:
            forwarding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await forwarding

    assert len(reported[0]) == 1000
    assert reported[1:] == [{"ws7": 2000.0}]
    assert (server.activity.last("ws7"), server.activity.last("ws8")) == (2000.0, 1000.0)


async def test_a_worker_whose_parent_dies_mid_stream_stops_too(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """A parent killed (not shut down) cuts the stream off without its end: the worker says so and stops all the
    same, rather than serve on from states nobody updates."""
    lost = asyncio.Event()
    with caplog.at_level(logging.ERROR, logger="gateway.lifecycle.remote"):
        async with a_worker_of(tmp_path, lost) as (_, _, runner):
            assert runner.server is not None
            await runner.server.shutdown(0.1)  # the connections dropped, nothing said
            async with asyncio.timeout(10):
                await lost.wait()
    assert "lost the parent's event stream" in caplog.text
    assert "the parent process went away; this worker stops" in caplog.text


async def test_a_worker_left_by_its_parent_stops_its_own_process(tmp_path: Path) -> None:
    """As ``serve`` runs a worker (no hook of its own), the end of the stream is SIGTERM to the worker's own process,
    which its server turns into a graceful shutdown."""
    terminated = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, terminated.set)
    try:
        async with a_worker_of(tmp_path) as (_, _, runner):
            await runner.shutdown()
            async with asyncio.timeout(10):
                await terminated.wait()
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def test_a_worker_whose_control_socket_does_not_answer_fails_to_start_at_once(tmp_path: Path) -> None:
    """No parent behind the socket: ``start`` fails at once naming the socket (not after the 30 s a parent gets to
    send its states), nothing counts as a lost parent, and ``close`` still closes what ``start`` opened."""
    lost = asyncio.Event()
    never_started = RemoteRuntime(tmp_path / "never.sock")
    await never_started.close()  # however far start got: not at all
    nobody = tmp_path / "nobody.sock"
    remote = RemoteRuntime(nobody, on_lost=lost.set)
    try:
        async with asyncio.timeout(10):
            with pytest.raises(RuntimeError, match=re.escape(f"the control socket {nobody} did not answer: ")):
                await remote.start()
        assert not lost.is_set()
    finally:
        await remote.close()
    assert remote.session.closed


async def test_a_worker_closing_its_runtime_leaves_nothing_of_it_running(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A worker shutting down is not a worker whose parent went away: ``close`` ends the stream it follows before it
    returns, quietly, and the parent carries on for the other workers."""
    def runtimes_tasks() -> set[asyncio.Task[object]]:
        return {task for task in asyncio.all_tasks()
                if task.get_coro().__qualname__.startswith("RemoteRuntime.")}  # type: ignore[union-attr]

    async with a_worker_of(tmp_path) as (server, remote, _):
        first_workers = runtimes_tasks()
        other = RemoteRuntime(tmp_path / "control.sock")
        await other.start()
        with caplog.at_level(logging.ERROR, logger="gateway.lifecycle.remote"):
            await other.close()
            assert runtimes_tasks() == first_workers
            assert other.session.closed
            await server.runtime.wake("ws")  # news the closed worker no longer follows
            await until(lambda: remote.get("ws").phase is Phase.RUNNING)  # type: ignore[union-attr]
        assert not [record for record in caplog.records if record.name == "gateway.lifecycle.remote"]


async def test_a_worker_whose_start_failed_has_closed_what_it_opened(tmp_path: Path) -> None:
    """The gateway's lifespan closes the runtime only after ``start`` returned, so a failed start has to clean up
    after itself, as the Kubernetes runtime's does."""
    remote = RemoteRuntime(tmp_path / "nobody.sock")
    try:
        with pytest.raises(RuntimeError):
            await remote.start()
        assert remote.session.closed
    finally:
        await remote.close()


async def test_a_worker_gone_from_the_stream_is_dropped_without_an_error_in_the_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A worker that restarts, or stops, leaves its stream: the parent's next broadcasts to it find the connection
    closed. That is a worker leaving, not a fault of the parent: nothing at ERROR, and its stream is dropped (else
    every later state would queue up for it, for as long as the parent runs)."""
    config = settings(tmp_path, {"ws": workspace(next_address())})
    runtime = make_runtime(config)
    await runtime.start()
    server = ControlServer(runtime, Activity())
    try:
        async with TestServer(server.app()) as test_server:
            reader, writer = await asyncio.open_connection(test_server.host, test_server.port)
            writer.write(f"GET /events HTTP/1.1\r\nHost: {test_server.host}\r\n\r\n".encode())
            await writer.drain()
            assert b'"synced"' in await reader.readuntil(b'"synced"}\n')
            writer.close()  # the worker is gone
            await asyncio.sleep(0.05)
            caplog.clear()
            for _ in range(3):
                server._broadcast(b'{"type":"event"}\n')
                await asyncio.sleep(0.05)
            await until(lambda: not server._streams)
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    finally:
        await runtime.close()

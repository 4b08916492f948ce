"""Waking a WARM workspace on its first request: held API calls, the waiting page, its SSE stream, WebSockets.

Each workspace runs ``slow_server.py`` through the local runtime, so the port really opens late.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from aiohttp import WSMsgType, web

from gateway.auth.identity import Identity
from gateway.lifecycle import LifecycleError, Phase, Runtime
from gateway.server.context import Gateway
from tests.conftest import MakeGateway, MakeUpstream, next_address, workspace
from tests.lifecycle.conftest import (
    API,
    BODY,
    PORT,
    browser,
    gateway_of,
    hold_wakes,
    metric_samples,
    owner,
    preview,
    read_sse,
    sample,
    slow_workspace,
    sse_events,
    starts,
)

pytestmark = pytest.mark.timeout(60)
MOST_PORT_WAITS = 16
FULL = range(20000, 20000 + MOST_PORT_WAITS)
"""As many ports as a workspace waits for at once."""


async def _waited_for(gateway: Gateway, *ports: int) -> None:
    """Until workspace ``a``'s wake waits for each of ``ports``."""
    async with asyncio.timeout(10):
        while not all(gateway.waker.busy("a", port) for port in ports):  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def _stop_once_awake(runtime: Runtime, started: asyncio.Event) -> None:
    """Let the held wake of workspace ``a`` finish, then stop it: every probe ends, its port never answered."""
    started.set()
    async with asyncio.timeout(10):
        while runtime.get("a").phase is not Phase.RUNNING:  # type: ignore[union-attr]  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    await runtime.stop("a")


async def test_api_client_is_held_then_served(make_gateway: MakeGateway) -> None:
    client = await make_gateway(workspaces={"ws": slow_workspace(next_address())})
    assert gateway_of(client).runtime.get("ws").phase is Phase.WARM  # type: ignore[union-attr]

    response = await client.get("/", headers={"Host": preview("ws"), **API})

    assert response.status == 200
    assert await response.text() == BODY
    assert gateway_of(client).runtime.get("ws").phase is Phase.RUNNING  # type: ignore[union-attr]


async def test_post_body_sent_during_the_wake_arrives_whole(make_gateway: MakeGateway) -> None:
    client = await make_gateway(workspaces={"ws": slow_workspace(next_address())})
    body = os.urandom(3 << 20)

    response = await client.post("/echo", data=body, headers={"Host": preview("ws"),
                                                               "Content-Type": "application/octet-stream"})

    assert response.status == 200
    assert hashlib.sha256(await response.read()).hexdigest() == hashlib.sha256(body).hexdigest()


class _Page(HTMLParser):
    """Collects what a test needs from the waiting page and checks that every element is closed."""

    VOID = frozenset({"meta", "br", "img", "input", "link", "hr"})

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.steps: list[str] = []
        self.active: list[str] = []
        self.noscript_refresh = False
        self.scripts: list[str] = []
        self._in_script = False
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "li" and values.get("data-step"):
            self.steps.append(values["data-step"] or "")
            if "active" in (values.get("class") or "").split():
                self.active.append(values["data-step"] or "")
        if tag == "meta" and values.get("http-equiv") == "refresh" and "noscript" in self.open:
            self.noscript_refresh = True
        if tag not in self.VOID:
            self.open.append(tag)
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.open[-1:] or 'nothing'}")
        else:
            self.open.pop()
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts.append(data)


async def test_browser_gets_the_waiting_page_then_sse_then_the_app(make_gateway: MakeGateway) -> None:
    client = await make_gateway(workspaces={"ws": slow_workspace(next_address())})

    page = await client.get("/some/page?x=1", headers=browser("ws"))

    assert page.status == 503
    assert page.headers["Retry-After"].isdigit()
    assert page.headers["Cache-Control"] == "no-store"
    assert page.content_type == "text/html"
    html = await page.text()
    assert html.startswith("<!doctype html>")
    parsed = _Page()
    parsed.feed(html)
    parsed.close()
    assert parsed.errors == []
    assert parsed.open == []
    assert "<code>ws</code>" in html
    assert parsed.steps == ["starting", "waiting-for-port"]
    assert parsed.noscript_refresh
    script = "".join(parsed.scripts)
    assert 'new EventSource("/_codehub/wake/events")' in script
    assert all(name in script for name in ('"progress"', '"ready"', '"failed"'))

    events = await sse_events(client, preview("ws"))

    names = [name for name, _ in events]
    assert names[-1] == "ready"
    assert names[:-1]
    assert set(names[:-1]) == {"progress"}
    assert events[-1][1] == {"workspace": "ws", "port": PORT}
    assert all(data["workspace"] == "ws" and data["port"] == PORT for _, data in events)
    after = await client.get("/", headers=browser("ws"))
    assert after.status == 200
    assert await after.text() == BODY


async def test_the_page_after_ready_waits_out_a_dev_server_swapping_listeners(make_gateway: MakeGateway) -> None:
    """Vite listens for a moment to see that its port is free, closes, and binds for real a little later: the
    wake's probe can meet that first listener and call the port ready. The app's page, which the waiting page
    loads the moment it hears ``ready``, must not fall into the gap as a 502 ("nothing is listening")."""
    client = await make_gateway(workspaces={"ws": slow_workspace(next_address(), delay=0.3, swap=0.8)})

    assert (await client.get("/", headers=browser("ws"))).status == 503
    events = await sse_events(client, preview("ws"))
    assert events[-1][0] == "ready"
    after = await client.get("/", headers=browser("ws"))

    assert after.status == 200
    assert await after.text() == BODY


@pytest.mark.parametrize("headers", [{"Sec-Fetch-Mode": "navigate"}, {"Accept": "text/html"}])
async def test_what_counts_as_a_browser_navigation(make_gateway: MakeGateway, headers: dict[str, str]) -> None:
    client = await make_gateway(workspaces={"ws": slow_workspace(next_address())})

    page = await client.get("/", headers={"Host": preview("ws"), **headers})

    assert page.status == 503
    assert 'id="steps"' in await page.text()


async def test_fetch_from_a_page_is_held_not_paged(make_gateway: MakeGateway) -> None:
    client = await make_gateway(workspaces={"ws": slow_workspace(next_address())})

    response = await client.get("/", headers={"Host": preview("ws"), "Sec-Fetch-Mode": "cors", "Accept": "text/html"})

    assert response.status == 200
    assert await response.text() == BODY


async def test_ide_waiting_page_listens_on_the_ide_origin(make_gateway: MakeGateway) -> None:
    client = await make_gateway(workspaces={"ws": slow_workspace(next_address(), ide_port=PORT)})
    ide = "ide-ws.localhost:8080"
    owner = gateway_of(client).auth.sessions.issue(Identity("alice"), ide)
    client.session.cookie_jar.update_cookies({"codehub_session": owner})

    page = await client.get("/", headers={**browser("ws"), "Host": ide})

    assert page.status == 503
    assert 'new EventSource("/_codehub/wake/events")' in await page.text()
    events = await sse_events(client, ide)
    assert events[-1] == ("ready", {"workspace": "ws", "port": PORT})


async def test_websocket_upgrade_during_the_wake_connects_once_the_port_is_up(make_gateway: MakeGateway) -> None:
    client = await make_gateway(workspaces={"ws": slow_workspace(next_address())})

    async with client.ws_connect("/ws", headers={"Host": preview("ws"), "Sec-Fetch-Mode": "websocket"}) as ws:
        await ws.send_str("ping")
        message = await ws.receive(timeout=10)
        assert message.type is WSMsgType.TEXT
        assert message.data == "echo: ping"


async def test_held_request_times_out_with_503_json(make_gateway: MakeGateway) -> None:
    never = workspace(next_address(), command=[sys.executable, "-c", "import time; time.sleep(3600)"],
                      ports={PORT: "public"})
    client = await make_gateway(workspaces={"ws": never}, policy={"wake": {"warm_timeout": 1.5}})

    response = await client.get("/", headers={"Host": preview("ws"), **API})

    assert response.status == 503
    assert response.headers["Retry-After"].isdigit()
    body = await response.json()
    assert body["error"]["code"] == "wake-timeout"
    assert body["error"]["status"] == 503
    assert "ws" in body["error"]["message"]


async def test_browser_sse_reports_failed_when_the_port_never_opens(make_gateway: MakeGateway) -> None:
    never = workspace(next_address(), command=[sys.executable, "-c", "import time; time.sleep(3600)"],
                      ports={PORT: "public"})
    client = await make_gateway(workspaces={"ws": never}, policy={"wake": {"warm_timeout": 1.5}})

    page = await client.get("/", headers=browser("ws"))
    assert page.status == 503
    events = await sse_events(client, preview("ws"))

    name, data = events[-1]
    assert name == "failed"
    assert f"Nothing started listening on port {PORT}" in data["message"]
    assert "1.5 s" in data["message"]
    assert {name for name, _ in events[:-1]} == {"progress"}


async def test_command_that_exits_at_once_fails_fast_with_its_exit_code(make_gateway: MakeGateway) -> None:
    crash = workspace(next_address(), command=[
        sys.executable, "-c", "import sys; print('boom: no config file', file=sys.stderr); sys.exit(3)"],
        ports={PORT: "public"})
    client = await make_gateway(workspaces={"ws": crash}, policy={"wake": {"warm_timeout": 600}})

    async with asyncio.timeout(30):  # far below the 600 s wake timeout: the failure is seen, not waited out
        response = await client.get("/", headers={"Host": preview("ws"), **API, **owner(client, "ws")})
        events = await sse_events(client, preview("ws"), headers=owner(client, "ws"))

    assert response.status == 503
    message = (await response.json())["error"]["message"]
    assert "exited with code 3" in message
    assert "boom: no config file" in message
    assert events[-1][0] == "failed"
    assert "exited with code 3" in events[-1][1]["message"]
    assert gateway_of(client).runtime.get("ws").phase is Phase.FAILED  # type: ignore[union-attr]


async def test_a_failed_start_is_explained_to_its_owner_and_to_nobody_else(make_gateway: MakeGateway) -> None:
    """The runtime's words on a failed start (here the app's last output, which may print a secret as it dies) are
    for those who run the workspace: a public port's visitor, who may wake it, learns only that it failed."""
    crash = workspace(next_address(), command=[
        sys.executable, "-c", "import sys; print('boom: API_KEY=hunter2', file=sys.stderr); sys.exit(3)"],
        ports={PORT: "public"})
    client = await make_gateway(workspaces={"ws": crash}, policy={"wake": {"warm_timeout": 600}})

    async with asyncio.timeout(30):
        events = await sse_events(client, preview("ws"))  # begins the wake, and hears it fail
        held = await client.get("/", headers={"Host": preview("ws"), **API})  # hears it has failed lately
        page = await client.get("/", headers=browser("ws"))
        owners = await client.get("/", headers={"Host": preview("ws"), **API, **owner(client, "ws")})
        again = await sse_events(client, preview("ws"))  # a page reloaded meanwhile: failed lately, not woken

    assert (held.status, page.status) == (503, 503)
    generic = "Workspace ws could not start. Its owner and collaborators can see why."
    assert events[-1] == ("failed", {"workspace": "ws", "port": PORT, "message": generic})
    told = (await held.json())["error"]["message"]
    assert told.startswith("Workspace ws could not start (it is tried again in ")
    [(name, data)] = again
    assert (name, data) == ("failed", {"workspace": "ws", "port": PORT, "message": data["message"]})
    assert data["message"].startswith("Workspace ws could not start (it is tried again in ")
    for seen in (told, await page.text(), json.dumps(events), json.dumps(again)):
        assert "could not start" in seen
        assert "hunter2" not in seen
        assert "exited" not in seen
    assert "boom: API_KEY=hunter2" in (await owners.json())["error"]["message"]


async def test_command_that_cannot_be_executed_fails_fast(make_gateway: MakeGateway, tmp_path: Path) -> None:
    missing = workspace(next_address(), command=[str(tmp_path / "no-such-program")], ports={PORT: "public"})
    client = await make_gateway(workspaces={"ws": missing}, policy={"wake": {"warm_timeout": 600}})

    async with asyncio.timeout(30):
        response = await client.get("/", headers={"Host": preview("ws"), **API})

    assert response.status == 503
    assert "could not start" in (await response.json())["error"]["message"]


async def test_running_workspace_with_nothing_on_the_port_says_so(make_gateway: MakeGateway) -> None:
    empty_port = 8001
    ws = slow_workspace(next_address(), delay=0)
    ws["ports"][empty_port] = "public"
    client = await make_gateway(workspaces={"ws": ws})
    assert (await client.get("/", headers={"Host": preview("ws"), **API})).status == 200

    api = await client.get("/", headers={"Host": preview("ws", empty_port), **API})
    page = await client.get("/", headers=browser("ws", empty_port))

    assert api.status == 502
    assert (await api.json())["error"]["message"].startswith(f"Nothing is listening on port {empty_port}")
    assert page.status == 502
    html = await page.text()
    assert f"Nothing is listening on port {empty_port}" in html
    assert re.search(r'<meta http-equiv="refresh" content="\d+">', html)
    assert page.headers["Retry-After"].isdigit()


async def test_ide_wake_events_are_only_for_those_who_may_open_the_ide(make_gateway: MakeGateway) -> None:
    client = await make_gateway(workspaces={"ws": slow_workspace(next_address(), ide_port=PORT)})
    ide = "ide-ws.localhost:8080"
    anonymous = await client.get("/_codehub/wake/events", headers={"Host": ide, **API})
    stranger_cookie = gateway_of(client).auth.sessions.issue(Identity("mallory"), ide)
    headers = {"Host": ide, "Cookie": f"codehub_session={stranger_cookie}", **API}
    stranger = await client.get("/_codehub/wake/events", headers=headers)

    assert anonymous.status == 401
    assert stranger.status == 403
    assert (await stranger.json())["error"]["code"] == "ide-owner-only"
    assert gateway_of(client).runtime.get("ws").phase is Phase.WARM  # type: ignore[union-attr]


@pytest.mark.parametrize(("delay", "estimate"), [(0.2, None), (2.2, r"usually ready in about ([2-9]|[1-9][0-9]+) s")])
async def test_waiting_page_shows_an_estimate_only_when_it_means_something(
    make_gateway: MakeGateway, delay: float, estimate: str | None
) -> None:
    client = await make_gateway(workspaces={"ws": slow_workspace(next_address(), delay=delay)})
    assert (await client.get("/", headers={"Host": preview("ws"), **API})).status == 200  # one wake measured
    await gateway_of(client).runtime.stop("ws")

    html = await (await client.get("/", headers=browser("ws"))).text()

    assert "It was sleeping to save resources" in html
    assert "warm" not in html.lower()
    if estimate is None:
        assert "usually ready" not in html
    else:
        assert re.search(estimate, html), html


async def test_the_waker_forgets_the_past_wakes_of_workspaces_that_are_gone(make_gateway: MakeGateway) -> None:
    """The waiting page's estimate comes from a workspace's past wakes: the reaper's pass has the waker forget those
    of deleted workspaces (on the local runtime none are deleted; tests/kube/test_reaper.py deletes some)."""
    client = await make_gateway(workspaces={"ws": slow_workspace(next_address(), delay=2.2)})
    assert (await client.get("/", headers={"Host": preview("ws"), **API})).status == 200  # one wake measured
    gateway = gateway_of(client)
    assert gateway.waker.estimate("ws", Phase.WARM) is not None
    gateway.reaper.forget_gone()
    assert gateway.waker.estimate("ws", Phase.WARM) is not None, "it still exists"
    gateway.reaper.keep_only({"another"})
    assert gateway.waker.estimate("ws", Phase.WARM) is None


async def test_workspace_processes_get_code_servers_proxy_uri(make_gateway: MakeGateway) -> None:
    """code-server started in a local workspace finds its ports' share URLs in VSCODE_PROXY_URI."""
    command = ["sh", "-c", 'printf %s "$VSCODE_PROXY_URI" > proxy-uri.tmp && mv proxy-uri.tmp proxy-uri; exec sleep 60']
    client = await make_gateway(workspaces={"ws": workspace(next_address(), command=command)})
    gateway = gateway_of(client)
    await gateway.runtime.wake("ws")
    written = gateway.config.state_dir.resolve() / "workspaces" / "ws" / "home" / "proxy-uri"
    for _ in range(500):  # at most ten seconds
        if written.exists():
            break
        await asyncio.sleep(0.02)
    assert written.read_text() == "http://{{port}}-ws.localhost:8080/"


async def test_a_workspace_waits_for_at_most_so_many_ports_at_once(make_gateway: MakeGateway,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Every port asked for during a wake gets a task probing it until it accepts, tied to no request: anyone who
    may wake the workspace (the holder of an all-ports share link too) could ask for thousands of port numbers and
    hang up. Past ``MOST_PORT_WAITS`` a new port gets a 503 at once (a waiting page's progress stream: "failed");
    a port already waited for is joined. The ports its owner declared count apart: made-up port numbers never keep
    the owner's own from being waited for."""
    client = await make_gateway(workspaces={"a": workspace(next_address(), owner="alice", ports={30000: "public"})},
                                policy={"ports": {"default_visibility": "public"}})
    gateway = gateway_of(client)
    runtime = gateway.runtime
    _record, token = await gateway.auth.store.create_api_token(Identity("alice"), name="t")
    started = hold_wakes(monkeypatch, runtime)

    async def ask(port: int) -> tuple[int, str]:
        async with client.get("/", headers={"Host": preview("a", port), "Authorization": f"Bearer {token}",
                                            **API}) as response:
            return response.status, await response.text()

    held = [asyncio.ensure_future(ask(port)) for port in FULL]
    try:
        await _waited_for(gateway, *FULL)
        async with asyncio.timeout(10):
            status, text = await ask(30001)
        assert status == 503
        assert "too-many-port-waits" in text
        async with client.get("/", headers={"Host": preview("a", 30001), "Authorization": f"Bearer {token}",
                                            **API}) as refused:
            assert refused.headers["Retry-After"].isdigit()  # "in a moment"
        assert not gateway.waker.busy("a", 30001)
        [(event, data)] = await sse_events(client, preview("a", 30001), within=10)
        assert (event, data["message"]) == ("failed", json.loads(text)["error"]["message"])
        state = runtime.get("a")
        assert state is not None
        gateway.waker.bring_up(state, 20000)  # joined, not refused
        held.append(asyncio.ensure_future(ask(30000)))  # declared: waited for
        await _waited_for(gateway, 30000)
    finally:
        await _stop_once_awake(runtime, started)
        answers = await asyncio.gather(*held)
    assert all("too-many-port-waits" not in text for _status, text in answers)
    state = runtime.get("a")
    assert state is not None
    late = gateway.waker.bring_up(state, 30001)  # "at once": the waits that ended count no more
    await _stop_once_awake(runtime, started)
    with pytest.raises(LifecycleError):
        await late


async def test_a_waiting_page_follows_its_own_workspace_only(make_gateway: MakeGateway,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Every wake listens to the runtime's one stream of phase changes, every workspace's: the page of one that is
    still starting must not move to "waiting-for-port" (and back) because another workspace came up meanwhile."""
    client = await make_gateway(workspaces={"a": slow_workspace(next_address(), delay=0),
                                            "b": slow_workspace(next_address(), delay=0)})
    runtime = gateway_of(client).runtime
    go_on = hold_wakes(monkeypatch, runtime, "a")  # a's wake waits until b is up
    try:
        assert (await client.get("/", headers=browser("a"))).status == 503
        other = await client.get("/", headers={"Host": preview("b"), **API})
        assert other.status == 200
    finally:
        go_on.set()
    events = await sse_events(client, preview("a"), headers=owner(client, "a"))

    progress = [(data["step"], data["message"]) for name, data in events if name == "progress"]
    steps = [step for step, _message in progress]
    assert [step for i, step in enumerate(steps) if i == 0 or steps[i - 1] != step] == ["starting", "waiting-for-port"]
    assert any(message for step, message in progress if step == "starting")  # the runtime's own word on it
    assert events[-1] == ("ready", {"workspace": "a", "port": PORT})


async def test_once_the_gateway_drains_no_request_wakes_a_workspace(make_gateway: MakeGateway, tmp_path: Path) -> None:
    """A request that still reaches a draining gateway (on a connection kept alive) is told to come back, at once:
    held or paged it would only wait out the drain, and a wake begun now would be cut off by the exit."""
    starts_file = tmp_path / "starts"
    client = await make_gateway(workspaces={"ws": slow_workspace(next_address(), delay=0, starts=starts_file)})
    await client.app.shutdown()  # what SIGTERM runs first: the drain

    held = await client.get("/", headers={"Host": preview("ws"), **API})
    page = await client.get("/", headers=browser("ws"))
    events = await sse_events(client, preview("ws"), within=10)

    assert held.status == 503
    assert held.headers["Retry-After"] == "1"
    assert (await held.json())["error"]["code"] == "gateway-draining"
    assert page.status == 503
    assert page.headers["Retry-After"] == "1"
    assert "gateway-draining" in await page.text()
    assert events == []  # the page's EventSource reconnects by itself, to a gateway that stays
    assert starts(starts_file) == 0
    assert gateway_of(client).runtime.get("ws").phase is Phase.WARM  # type: ignore[union-attr]


async def test_a_progress_stream_for_a_running_workspace_waits_for_its_port_only(make_gateway: MakeGateway) -> None:
    """A waiting page's stream that (re)connects once its workspace runs (woken meanwhile by another worker or
    replica, whose wake this gateway did not see) has nothing to start: it follows the wait for the port alone,
    and that wait is no wake in the metrics."""
    client = await make_gateway(workspaces={"ws": slow_workspace(next_address())})
    assert (await gateway_of(client).runtime.wake("ws")).phase is Phase.RUNNING  # the port opens a while later

    events = await sse_events(client, preview("ws"))

    progress = [data for name, data in events if name == "progress"]
    assert progress
    assert all(data["from"] == "RUNNING" and data["steps"] == ["waiting-for-port"] for data in progress)
    assert events[-1] == ("ready", {"workspace": "ws", "port": PORT})
    samples = await metric_samples(client)
    for origin in ("WARM", "RUNNING"):
        assert sample(samples, "codehub_wakes_total", from_phase=origin, result="ok") == 0
        assert sample(samples, "codehub_wake_duration_seconds_count", from_phase=origin) == 0


async def test_the_drain_releases_held_requests_and_ends_progress_streams_at_once(make_gateway: MakeGateway) -> None:
    """Held on a wake that will not end before the gateway exits, a request would only wait out the drain: it gets
    503 + ``Retry-After`` at once, and a waiting page's stream ends without a verdict (its EventSource reconnects)."""
    client = await make_gateway(workspaces={"ws": slow_workspace(next_address(), delay=3600)})
    gateway = gateway_of(client)
    held = asyncio.ensure_future(client.get("/", headers={"Host": preview("ws"), **API}))
    async with asyncio.timeout(10):
        while not gateway.waker.busy("ws", PORT):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    async with client.get("/_codehub/wake/events", headers={"Host": preview("ws")}) as stream:
        assert (await stream.content.readline()).startswith(b"event: progress")

        await client.app.shutdown()  # what SIGTERM runs first: the drain

        async with asyncio.timeout(10):
            answer = await held
            rest = await stream.content.read()
    assert answer.status == 503
    assert answer.headers["Retry-After"] == "1"
    assert (await answer.json())["error"]["code"] == "gateway-draining"
    assert b"event: ready" not in rest
    assert b"event: failed" not in rest


async def test_a_port_wait_that_ends_gives_back_its_own_place_only(
        make_gateway: MakeGateway, make_upstream: MakeUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each wait that ends frees one place among the ``MOST_PORT_WAITS``: once one port of a full workspace
    answers, one more may be waited for (here through a waiting page's stream), and the next is refused again."""
    address = next_address()
    client = await make_gateway(workspaces={"a": workspace(address, owner="alice")},
                                policy={"ports": {"default_visibility": "public"}})
    gateway = gateway_of(client)
    runtime = gateway.runtime
    _record, token = await gateway.auth.store.create_api_token(Identity("alice"), name="t")
    started = hold_wakes(monkeypatch, runtime)  # the wake lasts until every port is waited for

    async def ask(port: int) -> int:
        async with client.get("/", headers={"Host": preview("a", port), "Authorization": f"Bearer {token}",
                                            **API}) as response:
            return response.status

    held = [asyncio.ensure_future(ask(port)) for port in FULL]
    try:
        await _waited_for(gateway, *FULL)
        started.set()
        async def up(_request: web.Request) -> web.Response:
            return web.Response(text="up")

        app = web.Application()
        app.router.add_get("/", up)
        await make_upstream(app, address, 20000)  # one port comes up: its wait ends, the others go on
        async with asyncio.timeout(10):
            assert await held[0] == 200
        async with client.get("/_codehub/wake/events", headers={"Host": preview("a", 30001)}) as one_more:
            assert (await one_more.content.readline()).startswith(b"event: progress")  # waited for
            [(event, data)] = await sse_events(client, preview("a", 30002), within=10)
            assert event == "failed"
            assert "try port 30002 again" in data["message"]
    finally:
        await _stop_once_awake(runtime, started)
        await asyncio.gather(*held)


async def test_a_waiting_page_loaded_again_shows_the_step_the_wake_is_at(make_gateway: MakeGateway) -> None:
    """Without JavaScript the waiting page reloads itself now and then: each load must show where the wake is now,
    not the step it began with."""
    client = await make_gateway(workspaces={"ws": slow_workspace(next_address(), delay=30)})
    first = _Page()
    first.feed(await (await client.get("/", headers=browser("ws"))).text())
    async with asyncio.timeout(15), client.get("/_codehub/wake/events", headers={"Host": preview("ws")}) as stream:
        async for _name, data in read_sse(stream):
            if data["step"] == "waiting-for-port":  # started; the app binds its port only 30 s later
                break

    again = _Page()
    again.feed(await (await client.get("/", headers=browser("ws"))).text())
    replayed = []
    async with asyncio.timeout(15), client.get("/_codehub/wake/events", headers={"Host": preview("ws")}) as stream:
        async for _name, data in read_sse(stream):
            replayed.append(data["step"])
            if data["step"] == "waiting-for-port":
                break

    assert first.active == ["starting"]
    assert again.active == ["waiting-for-port"]
    assert replayed[0] == "starting"  # its stream, reconnected too, tells every step from the first
    assert replayed.count("waiting-for-port") == 1


async def test_closing_the_waker_returns_once_the_wakes_it_cancelled_have_ended(
        make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """On shutdown the runtime is closed after the waker: a wake still unwinding then would act on a closed one."""
    client = await make_gateway(workspaces={"a": slow_workspace(next_address(), delay=0)})
    gateway = gateway_of(client)
    state = gateway.runtime.get("a")
    assert state is not None
    assert state.phase is Phase.WARM
    hold_wakes(monkeypatch, gateway.runtime)
    waiting = gateway.waker.bring_up(state, PORT)
    await asyncio.sleep(0)  # the wait's task starts the runtime's wake, which is held
    assert gateway.waker.waking("a")

    await gateway.waker.close()

    assert waiting.cancelled()
    assert not gateway.waker.waking("a")

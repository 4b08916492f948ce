"""Attacks on the hub and the management API by signed-in people hostile to each other (see README, "Security
model"): each test shows what an attacker did and what they must not get."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.auth.authenticate import grant_of
from gateway.auth.identity import Identity
from gateway.edge.policy import decide
from gateway.lifecycle.base import EventHub
from gateway.server.app import build_app
from gateway.server.context import GATEWAY
from gateway.web import api, hub
from gateway.web.api import MOST_PORTS
from tests.auth.conftest import MakeBrowser, Serve, Served
from tests.auth.test_api import HUB, WORKSPACES, call, user
from tests.kube.emulator import SHARE_LINK, WORKSPACE, KubeEnv, kube  # noqa: F401  (kube: a fixture)
from tests.kube.support import NS, until
from tests.kube.test_gateway import gateway_config

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def served(serve: Serve, tmp_path: Path) -> Served:
    policy = tmp_path / "policy.yaml"
    policy.write_text("admins: [root]\nports:\n  denied: [22]\n")
    return await serve(WORKSPACES, policy_file=str(policy))

HIDDEN = ["alice\u2060", "\u202eecila\u202c", "al\u200bice"]
"""User names that the hub shows as "alice": a WORD JOINER, a right-to-left override, a ZERO WIDTH SPACE. None is
a control character, so no header refuses them; none is printable (``str.isprintable``)."""


@pytest.mark.parametrize("name", HIDDEN, ids=["word-joiner", "rtl-override", "zero-width-space"])
async def test_a_user_name_the_hub_would_not_show_signs_nobody_in(kube: KubeEnv, aiohttp_client: Any,  # noqa: F811
                                                                  tmp_path: Path, name: str) -> None:
    """Mallory signs in as ``alice`` with an invisible character in it and creates a workspace: its owner is shown
    as "alice" to everyone who sees it (her collaborators' hub, the admins' hub, the consent page, which asks a
    visitor whether "alice"'s app may learn who they are). The API refuses the very same text as a principal or a
    label (``lifecycle.showable``: "a bidi override ... would disguise it"); sign-in let it become a user name.
    Refused at sign-in, as control characters are, it never becomes an owner."""
    client: TestClient[web.Request, web.Application] = await aiohttp_client(build_app(gateway_config(kube, tmp_path)))
    hub = {"Host": "localhost:8080", "Origin": HUB}
    signed = await client.post("/auth/dev", data={"user": name, "next": "/"}, headers={**hub, "Accept": "text/html"},
                               allow_redirects=False)
    cookie = signed.cookies.get("codehub_session")
    if cookie is not None:  # signed in: what the owner of a workspace of theirs looks like to others
        made = await client.post("/api/v1/workspaces", json={"id": "alice-app"},
                                 headers={**hub, "Cookie": f"codehub_session={cookie.value}"})
        owner = (await made.json()).get("owner")
        resource = kube.emulator.get_object(WORKSPACE, NS, "alice-app")
        pytest.fail(f"signed in as {name!r}; it made a workspace ({made.status}) owned by {owner!r}, stored as "
                    f"{(resource or {}).get('spec', {}).get('owner')!r}, shown as {owner.isprintable() and owner}")
    assert signed.status == 400, await signed.text()
    assert "bad-identity" in await signed.text()


async def test_the_api_refuses_the_same_names_as_principals(served: Served, make_browser: MakeBrowser) -> None:
    """The rule sign-in now follows is the API's own: the owner cannot name such a principal either."""
    alice = await user(make_browser, served, "alice")
    for name in HIDDEN:
        page = await call(alice, "PUT", "/api/v1/workspaces/ws1/collaborators", {"collaborators": [name]})
        assert page.status == 400, (name, page.text)


FEEDS = 12


async def test_a_person_cannot_make_the_hub_rebuild_their_snapshot_once_per_feed(
        served: Served, make_browser: MakeBrowser, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mallory opens ``/api/v1/hub/events`` a dozen times (a script with her API token, or her cookie) and keeps
    them open: each feed builds her whole hub snapshot every ``LOOK_EVERY`` (0.5 s), changed or not, in the event
    loop that serves everyone's previews. A snapshot of one workspace with 1,000 share links naming 10 people each
    took 36 ms here (so 14 feeds keep a worker's loop busy all the time); at the limits the API sets (1,000 links of
    100 principals of 320 characters) it is 32 MB of JSON per workspace, rebuilt twice a second per feed. Feeds of
    one person and page now share one look."""
    built = 0
    snapshot = hub.snapshot

    def counted(*args: Any, **kwargs: Any) -> dict[str, Any]:
        nonlocal built
        built += 1
        return snapshot(*args, **kwargs)

    monkeypatch.setattr(hub, "snapshot", counted)
    alice = await user(make_browser, served, "alice")
    cookie = "; ".join(f"{k}={v}" for k, v in alice.cookies_for("localhost").items())
    headers = {"Host": HUB[7:], "Cookie": cookie, "Accept": "text/event-stream"}
    async with contextlib.AsyncExitStack() as stack:
        opened = 0
        for _ in range(FEEDS):
            feed = await stack.enter_async_context(alice.http.get(alice.gateway + "/api/v1/hub/events",
                                                                  headers=headers))
            if feed.status == 200:
                assert (await asyncio.wait_for(feed.content.readuntil(b"\n\n"), 10)).startswith(b"event: snapshot")
                opened += 1
        built = 0
        await asyncio.sleep(2.0)  # nothing changes meanwhile
        looks = 2.0 / hub.LOOK_EVERY
        assert built <= looks + 2, (f"{opened} feeds of one person built {built} snapshots in 2 s of nothing "
                                    f"changing: one per feed per look ({looks:.0f} looks)")


async def test_feeds_that_share_a_look_each_show_a_change_at_once(
        served: Served, make_browser: MakeBrowser, monkeypatch: pytest.MonkeyPatch) -> None:
    """Feeds of one person share a look at the page (above), but never one taken before a lifecycle event: each
    feed shows the change it was woken for, not the look another feed took just before it. Looks are made rare here
    (a minute apart), so only the event can bring the change."""
    monkeypatch.setattr(hub, "LOOK_EVERY", 60.0)
    alice = await user(make_browser, served, "alice")
    cookie = "; ".join(f"{k}={v}" for k, v in alice.cookies_for("localhost").items())
    headers = {"Host": HUB[7:], "Cookie": cookie, "Accept": "text/event-stream"}
    async with contextlib.AsyncExitStack() as stack:
        feeds = [await stack.enter_async_context(alice.http.get(alice.gateway + "/api/v1/hub/events",
                                                                headers=headers)) for _ in range(2)]
        for feed in feeds:
            first = await asyncio.wait_for(feed.content.readuntil(b"\n\n"), 10)
            assert b'"phase": "WARM"' not in first
        assert (await call(alice, "POST", "/api/v1/workspaces/ws1/stop")).status == 200
        for feed in feeds:
            async with asyncio.timeout(10):
                while b'"phase": "WARM"' not in await feed.content.readuntil(b"\n\n"):
                    pass


def test_the_looks_kept_for_feeds_to_share_are_the_recent_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """A look is kept only while another feed may still share it: looks of people who opened the hub once pile up
    to 256, then the old ones go in one sweep (not a sweep of them all per look); none that another feed may still
    share is dropped to make room."""
    monkeypatch.setattr(hub, "snapshot", lambda gateway, identity, limit, after: {"workspaces": []})
    gateway: Any = SimpleNamespace(runtime=SimpleNamespace(hub=EventHub()))
    for look_every, most in ((0.0, 256), (3600.0, 300)):  # every look old at once, or each one still to share
        monkeypatch.setattr(hub, "LOOK_EVERY", look_every)
        looks: dict[Any, Any] = {}
        kept = []
        for number in range(300):
            hub._look(gateway, looks, Identity(f"person{number}"), (hub.HUB_PAGE, None))
            kept.append(len(looks))
        assert max(kept) == most, look_every


async def test_a_workspace_keeps_settings_for_at_most_so_many_ports(kube: KubeEnv,  # noqa: F811
                                                                     aiohttp_client: Any, tmp_path: Path) -> None:
    """Mallory sends a new workspace with 1,025 ports, or sets a port more on one that has 1,024: the Workspace
    resource's schema refuses it, and the API answered 503 ``kubernetes-refused`` (try again later) to a body no
    retry makes good, which a script retries for ever. A clear 400 (409 for the port more) before the cluster
    is asked; changing a port the workspace already has still works."""
    client: TestClient[web.Request, web.Application] = await aiohttp_client(build_app(gateway_config(kube, tmp_path)))
    _record, token = await client.app[GATEWAY].auth.store.create_api_token(Identity("mallory"), name="t")
    headers = {"Host": "localhost:8080", "Authorization": f"Bearer {token}"}
    too_many = {str(port): "org" for port in range(1, MOST_PORTS + 2)}
    refused = await client.post("/api/v1/workspaces", json={"id": "big", "ports": too_many}, headers=headers)
    assert refused.status == 400, await refused.text()
    assert (await refused.json())["error"]["code"] == "invalid-body"
    assert kube.emulator.get_object(WORKSPACE, NS, "big") is None
    full = {str(port): "org" for port in range(1, MOST_PORTS + 1)}
    made = await client.post("/api/v1/workspaces", json={"id": "full", "ports": full}, headers=headers)
    assert made.status == 201, await made.text()
    more = await client.put("/api/v1/workspaces/full/ports/5000", json={"visibility": "org"}, headers=headers)
    assert more.status == 409, await more.text()
    assert (await more.json())["error"]["code"] == "too-many-ports"
    same = await client.put("/api/v1/workspaces/full/ports/1000", json={"visibility": "private"}, headers=headers)
    assert same.status == 200, await same.text()


async def test_limits_hold_for_requests_sent_all_at_once(kube: KubeEnv, aiohttp_client: Any,  # noqa: F811
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mallory sends a dozen creations at once, each allowed by the count it read: on Kubernetes each waits on
    the API, so every one saw the count from before the others, and the policy's ``most_per_person: 2`` let her
    make 12 workspaces (so too for her API tokens and a workspace's share links, here with their limits at 2)."""
    monkeypatch.setattr(api, "MOST_API_TOKENS", 2)
    monkeypatch.setattr(api, "MOST_SHARE_LINKS", 2)
    policy = tmp_path / "policy.yaml"
    policy.write_text("workspaces:\n  most_per_person: 2\n")
    config = gateway_config(kube, tmp_path).model_copy(update={"policy_file": policy})
    client: TestClient[web.Request, web.Application] = await aiohttp_client(build_app(config))
    hub_host = {"Host": "localhost:8080", "Origin": HUB}
    signed = await client.post("/auth/dev", data={"user": "mallory", "next": "/"}, headers=hub_host,
                               allow_redirects=False)
    cookie = signed.cookies["codehub_session"].value
    headers = {**hub_host, "Cookie": f"codehub_session={cookie}"}

    async def at_once(path: str, bodies: list[dict[str, Any]]) -> list[int]:
        answers = await asyncio.gather(*(client.post(path, json=body, headers=headers) for body in bodies))
        return sorted(answer.status for answer in answers)

    assert await at_once("/api/v1/workspaces", [{"id": f"m{n}"} for n in range(12)]) == [201] * 2 + [409] * 10
    assert len(kube.emulator.list_objects(WORKSPACE, NS)) == 2
    assert await at_once("/api/v1/tokens", [{"name": f"t{n}"} for n in range(12)]) == [201] * 2 + [409] * 10
    mine = next(ws["metadata"]["name"] for ws in kube.emulator.list_objects(WORKSPACE, NS))
    links = await at_once(f"/api/v1/workspaces/{mine}/shares", [{"port": 3000}] * 12)
    assert links == [201] * 2 + [409] * 10


@pytest.mark.parametrize("path", ["/static/", "/static/.", "/static/./"])
async def test_the_folder_of_the_hubs_static_files_is_no_error_of_the_gateway(
        served: Served, make_browser: MakeBrowser, caplog: pytest.LogCaptureFixture, path: str) -> None:
    """Anyone on the internet asks the hub for ``/static/``: aiohttp's static route refuses a folder with its own
    403, which the gateway took for a failure of its own, a 500 ``internal-error`` with a traceback in the log at
    ERROR for every such request. It is a clear 404, as any other address with nothing there, and logs nothing."""
    browser = await make_browser(served)
    with caplog.at_level(logging.ERROR):
        page = await browser.fetch("GET", HUB + path, headers={"Accept": "application/json"})
    assert page.status == 404, page.text
    assert page.json()["error"]["code"] == "no-route"
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert (await browser.fetch("GET", HUB + "/static/hub.js")).status == 200


async def _exchange(port: int, requests: bytes, wait: float = 2.0) -> bytes:
    """What a server answers on one connection to ``requests`` (pipelined), in ``wait`` seconds."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(requests)
    await writer.drain()
    answer = b""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait):
            while chunk := await reader.read(65536):
                answer += chunk
                if answer.endswith(b'{"status": "ok"}'):
                    break
    writer.close()
    return answer


@pytest.mark.parametrize(("host", "path", "signed_in"), [
    ("localhost:8080", "/api/v1/hub/events", True),
    ("5000-ws2.localhost:8080", "/_codehub/wake/events", False),  # public port: anyone
], ids=["hub-feed", "wake-events"])
async def test_a_head_of_an_event_stream_has_no_body(served: Served, make_browser: MakeBrowser, host: str,
                                                     path: str, signed_in: bool) -> None:
    """Anyone sends ``HEAD`` for one of the gateway's event streams (the hub's feed, a preview's wake progress),
    then another request on the same connection, as a proxy in front does with the connections it keeps for
    everyone's requests: the gateway answered the head and then wrote the stream's events after it anyway, with no
    framing (a head has none), so the next request on that connection (someone else's, behind a proxy) was
    answered with ``event: snapshot``/``event: progress`` bytes, or never; the feed ran for ever besides. A head is
    the head alone: the next request gets its own answer."""
    cookie = ""
    if signed_in:
        alice = await user(make_browser, served, "alice")
        cookie = "Cookie: " + "; ".join(f"{k}={v}" for k, v in alice.cookies_for("localhost").items()) + "\r\n"
    assert served.server.port is not None
    answer = await _exchange(served.server.port, (
        f"HEAD {path} HTTP/1.1\r\nHost: {host}\r\n{cookie}\r\n"
        "GET /healthz HTTP/1.1\r\nHost: localhost:8080\r\n\r\n").encode())
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b"text/event-stream" in head
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n"), rest[:300]
    assert rest.endswith(b'{"status": "ok"}')


async def mallory_and_victim(client: TestClient[web.Request, web.Application]) -> dict[str, dict[str, str]]:
    """Each one's API headers (a token of theirs) by name."""
    headers = {}
    for name in ("mallory", "victim"):
        _record, token = await client.app[GATEWAY].auth.store.create_api_token(Identity(name), name="t")
        headers[name] = {"Host": "localhost:8080", "Authorization": f"Bearer {token}"}
    return headers


async def test_a_link_asked_for_while_its_workspace_is_deleted_opens_no_namesake(
        kube: KubeEnv, aiohttp_client: Any, tmp_path: Path) -> None:  # noqa: F811
    """Mallory asks for 40 links to anyone for her workspace ``demo`` and deletes it at the same moment. Each link
    was checked against ``demo`` as the API saw it, then made once its turn came (the API's calls queue): by then
    ``demo`` was gone, so the store found no Workspace to give the link to (an ownerReference: deleting the
    workspace deletes its links) and made it without one. The links outlived ``demo``, and on Kubernetes a link
    is told from a namesake's by nothing else: when Victim made a workspace called ``demo``, Mallory's links
    were listed as its links and opened its private ports to anyone holding them, for their week."""
    client: TestClient[web.Request, web.Application] = await aiohttp_client(build_app(gateway_config(kube, tmp_path)))
    gateway = client.app[GATEWAY]
    headers = await mallory_and_victim(client)
    made = await client.post("/api/v1/workspaces", json={"id": "demo", "ports": {"3000": "private"}},
                             headers=headers["mallory"])
    assert made.status == 201
    asked = [client.post("/api/v1/workspaces/demo/shares", json={"audience": "anyone", "ttl": "7d"},
                         headers=headers["mallory"]) for _ in range(40)]
    *answers, deleted = await asyncio.gather(*asked, client.delete("/api/v1/workspaces/demo",
                                                                   headers=headers["mallory"]))
    assert deleted.status == 200
    tokens = [(await answer.json())["token"] for answer in answers if answer.status == 201]
    assert {answer.status for answer in answers} <= {201, 404}
    await until(lambda: gateway.runtime.get("demo") is None)
    await until(lambda: not kube.emulator.list_objects(SHARE_LINK, NS))  # gone with their workspace
    again = await client.post("/api/v1/workspaces", json={"id": "demo", "ports": {"3000": "private"}},
                              headers=headers["victim"])
    assert again.status == 201
    theirs = gateway.runtime.get("demo")
    assert theirs is not None
    assert theirs.spec.owner == "victim"
    listed = await client.get("/api/v1/workspaces/demo/shares", headers=headers["victim"])
    assert (await listed.json())["shares"] == []
    for token in tokens:
        link = gateway.auth.store.find_share(token)
        assert link is None or not decide(gateway.policy, theirs.spec, 3000, None, grant_of(link)).allow


@pytest.mark.parametrize(("path", "rest", "harm"), [
    ("/collaborators", b'["mallory"]}', lambda spec: "mallory" in spec.get("collaborators", [])),
    ("/ports/3000", b'"public"}', lambda spec: spec.get("ports", {}).get("3000") == "public"),
], ids=["collaborators", "port"])
async def test_a_change_checked_before_its_body_came_cannot_land_on_a_namesake(
        kube: KubeEnv, aiohttp_client: Any, tmp_path: Path, path: str, rest: bytes,  # noqa: F811
        harm: Callable[[dict[str, Any]], bool]) -> None:
    """Mallory starts ``PUT /api/v1/workspaces/demo/collaborators`` on her workspace ``demo`` and sends its body
    slowly; meanwhile she deletes ``demo`` and Victim makes a workspace called ``demo``. The API checked that
    Mallory owns ``demo`` before the body came, and then changed the workspace of that name, Victim's: Mallory
    was its collaborator (its IDE, as Victim) or made its private port public."""
    client: TestClient[web.Request, web.Application] = await aiohttp_client(build_app(gateway_config(kube, tmp_path)))
    gateway = client.app[GATEWAY]
    headers = await mallory_and_victim(client)
    made = await client.post("/api/v1/workspaces", json={"id": "demo"}, headers=headers["mallory"])
    assert made.status == 201
    go_on = asyncio.Event()

    async def slowly() -> AsyncIterator[bytes]:
        yield b'{"collaborators": ' if path == "/collaborators" else b'{"visibility": '
        await go_on.wait()
        yield rest

    change = asyncio.create_task(client.put(f"/api/v1/workspaces/demo{path}", data=slowly(),
                                            headers={**headers["mallory"], "Content-Type": "application/json"}))
    await asyncio.sleep(0.3)  # the head is in, the body is not
    assert (await client.delete("/api/v1/workspaces/demo", headers=headers["mallory"])).status == 200
    await until(lambda: gateway.runtime.get("demo") is None)
    again = await client.post("/api/v1/workspaces", json={"id": "demo", "ports": {"3000": "private"}},
                              headers=headers["victim"])
    assert again.status == 201
    go_on.set()
    answer = await change
    theirs = (kube.emulator.get_object(WORKSPACE, NS, "demo") or {}).get("spec", {})
    assert theirs.get("owner") == "victim"
    assert not harm(theirs), theirs
    assert answer.status == 404, await answer.text()

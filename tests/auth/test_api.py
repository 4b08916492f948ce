"""The management API (/api/v1) and the hub page, through a running gateway with dev sign-in."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import segno
from multidict import CIMultiDict

from gateway.auth.store import Consent, FileTokenStore
from gateway.lifecycle import Phase
from gateway.lifecycle.local import LocalRuntime
from gateway.web import api, hub, pages
from gateway.web.api import MOST_API_TOKENS, MOST_SHARE_LINKS
from gateway.web.pages import PHASE_WORDS
from tests.auth.browser import Browser, Page
from tests.auth.conftest import MakeBrowser, Serve, Served

pytestmark = pytest.mark.timeout(60)

HUB = "http://localhost:8080"
WORKSPACES: dict[str, dict[str, Any]] = {
    "ws1": {"owner": "alice", "collaborators": ["bob"], "ports": {3000: "private", 3001: "private"}},
    "ws2": {"owner": "carol", "collaborators": ["group:qa"], "ports": {5000: "public"}},
    "ws3": {"owner": "dave", "ports": {6000: "private"}},
}
STRICT = """
ports:
  max_visibility: org
  denied: [22]
share_links:
  default_ttl: 2h
  max_ttl: 1d
  audiences: [anyone, people]
admins: [root]
"""


@pytest.fixture
async def served(serve: Serve, tmp_path: Path) -> Served:
    policy = tmp_path / "policy.yaml"
    policy.write_text("admins: [root]\nports:\n  denied: [22]\n")
    return await serve(WORKSPACES, policy_file=str(policy))


@pytest.fixture
async def strict(serve: Serve, tmp_path: Path) -> Served:
    policy = tmp_path / "strict.yaml"
    policy.write_text(STRICT)
    return await serve(WORKSPACES, policy_file=str(policy))


async def user(make_browser: MakeBrowser, served: Served, name: str, groups: str = "") -> Browser:
    browser = await make_browser(served)
    assert (await browser.dev_sign_in(served.hub, name, groups)).status == 303
    return browser


async def call(browser: Browser, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
               token: str | None = None) -> Page:
    headers = {"Accept": "application/json", "Origin": HUB}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if raw is not None:
        headers["Content-Type"] = "application/json"
        return await browser.fetch(method, HUB + path, headers=headers, data=raw)
    return await browser.fetch(method, HUB + path, headers=headers, json_body=body)


def assert_error(page: Page, status: int, code: str) -> None:
    assert page.status == status, page.text
    assert page.content_type == "application/json"
    assert page.json()["error"]["code"] == code


async def test_list_shows_only_my_workspaces(served: Served, make_browser: MakeBrowser) -> None:
    expected = {("alice", ""): {"ws1": "owner"}, ("bob", ""): {"ws1": "collaborator"},
                ("quinn", "qa"): {"ws2": "collaborator"}, ("eve", "dev"): {}, ("root", ""): {
                    "ws1": "admin", "ws2": "admin", "ws3": "admin"}}
    for (name, groups), roles in expected.items():
        browser = await user(make_browser, served, name, groups)
        page = await call(browser, "GET", "/api/v1/workspaces")
        assert page.status == 200
        assert {ws["id"]: ws["role"] for ws in page.json()["workspaces"]} == roles, name
    alice = await user(make_browser, served, "alice")
    ws1 = (await call(alice, "GET", "/api/v1/workspaces/ws1")).json()
    assert [(p["port"], p["visibility"]) for p in ws1["ports"]] == [(3000, "private"), (3001, "private")]
    assert ws1["ports"][0]["url"] == "http://3000-ws1.localhost:8080/"
    assert ws1["ide_url"] == "http://ide-ws1.localhost:8080/"
    assert_error(await call(alice, "GET", "/api/v1/workspaces/ws3"), 404, "workspace-not-found")
    assert_error(await call(alice, "GET", "/api/v1/workspaces/nope"), 404, "workspace-not-found")


async def test_a_workspace_says_when_it_was_last_used_and_shows_no_label_nobody_gave(
        served: Served, make_browser: MakeBrowser) -> None:
    """The hub writes "last used …" from ``last_activity``: a visit through a preview is use. A port that neither
    its owner nor devcontainer.json named has an empty label (hub.js shows its number), not a made-up one."""
    alice = await user(make_browser, served, "alice")
    share = (await call(alice, "POST", "/api/v1/workspaces/ws1/shares", {"port": 3000})).json()
    visited = time.time()
    script = await make_browser(served)
    assert (await script.fetch("GET", served.preview("ws1", 3000, "/"),
                               headers={"Authorization": f"Bearer {share['token']}"})).status == 200
    ws1 = (await call(alice, "GET", "/api/v1/workspaces/ws1")).json()
    assert ws1["last_activity"] >= visited
    assert [(port["port"], port["label"]) for port in ws1["ports"]] == [(3000, ""), (3001, "")]


async def test_a_workspace_is_put_to_sleep_archived_and_woken_through_the_api(served: Served,
                                                                              make_browser: MakeBrowser) -> None:
    """Each lifecycle call answers with the workspace as the call left it, and ``status`` tells the phase it is in; only
    someone who may see the workspace learns or changes its phase."""
    alice = await user(make_browser, served, "alice")

    async def phase(method: str, path: str) -> str:
        page = await call(alice, method, f"/api/v1/workspaces/ws1{path}")
        assert page.status == 200, page.text
        assert (page.json()["id"], page.json()["role"]) == ("ws1", "owner")
        return str(page.json()["phase"])

    assert [await phase("POST", "/stop"), await phase("GET", "/status")] == ["WARM", "WARM"]
    assert [await phase("POST", "/archive"), await phase("GET", "/status"), await phase("GET", "")] == [
        "COLD", "COLD", "COLD"]
    assert [await phase("POST", "/wake"), await phase("GET", "/status")] == ["RUNNING", "RUNNING"]
    eve = await user(make_browser, served, "eve")
    for method, path in (("GET", "/status"), ("POST", "/stop")):
        assert_error(await call(eve, method, f"/api/v1/workspaces/ws1{path}"), 404, "workspace-not-found")
    assert await phase("GET", "/status") == "RUNNING"


async def test_set_port_visibility_is_for_the_owner(served: Served, make_browser: MakeBrowser) -> None:
    alice = await user(make_browser, served, "alice")
    anonymous = await make_browser(served)
    assert (await anonymous.fetch("GET", served.preview("ws1", 3000))).status == 401
    page = await call(alice, "PUT", "/api/v1/workspaces/ws1/ports/3000", {"visibility": "public"})
    assert page.status == 200, page.text
    assert page.json()["ports"][0] == {**page.json()["ports"][0], "port": 3000, "visibility": "public"}
    assert (await anonymous.fetch("GET", served.preview("ws1", 3000))).status == 200  # takes effect at once

    bob = await user(make_browser, served, "bob")
    assert_error(await call(bob, "PUT", "/api/v1/workspaces/ws1/ports/3000", {"visibility": "private"}), 403,
                 "owner-only")
    eve = await user(make_browser, served, "eve")
    assert_error(await call(eve, "PUT", "/api/v1/workspaces/ws1/ports/3000", {"visibility": "private"}), 404,
                 "workspace-not-found")
    root = await user(make_browser, served, "root")
    assert (await call(root, "PUT", "/api/v1/workspaces/ws1/ports/3000", {"visibility": "private"})).status == 200
    assert (await anonymous.fetch("GET", served.preview("ws1", 3000))).status == 401


async def test_visibility_above_the_ceiling_is_refused(strict: Served, make_browser: MakeBrowser) -> None:
    alice = await user(make_browser, strict, "alice")
    assert_error(await call(alice, "PUT", "/api/v1/workspaces/ws1/ports/3000", {"visibility": "public"}), 403,
                 "visibility-above-ceiling")
    assert (await call(alice, "PUT", "/api/v1/workspaces/ws1/ports/3000", {"visibility": "org"})).status == 200
    # A port configured public is shown (and treated) as the ceiling allows.
    carol = await user(make_browser, strict, "carol")
    ws2 = (await call(carol, "GET", "/api/v1/workspaces/ws2")).json()
    assert ws2["ports"][0]["visibility"] == "org"


@pytest.mark.parametrize(
    ("path", "body", "raw", "code"),
    [
        ("/api/v1/workspaces/ws1/ports/3000", {"visibility": "everyone"}, None, "invalid-body"),
        ("/api/v1/workspaces/ws1/ports/3000", {}, None, "invalid-body"),
        ("/api/v1/workspaces/ws1/ports/3000", {"visibility": "org", "extra": 1}, None, "invalid-body"),
        ("/api/v1/workspaces/ws1/ports/3000", None, b"{not json", "invalid-body"),
        ("/api/v1/workspaces/ws1/ports/3000", None, b"[1, 2]", "invalid-body"),
        ("/api/v1/workspaces/ws1/ports/3000", None, b"[" * 100_000, "invalid-body"),  # past the parser's depth
        ("/api/v1/workspaces/ws1/ports/abc", {"visibility": "org"}, None, "bad-port"),
        ("/api/v1/workspaces/ws1/ports/70000", {"visibility": "org"}, None, "bad-port"),
        ("/api/v1/workspaces/ws1/ports/22", {"visibility": "org"}, None, "bad-port"),
        ("/api/v1/workspaces/ws1/ports/13337", {"visibility": "public"}, None, "bad-port"),
        ("/api/v1/workspaces/ws1/ports/3000", {"label": "two\nlines"}, None, "invalid-body"),
        ("/api/v1/workspaces/ws1/ports/3000", {"label": "x" * 81}, None, "invalid-body"),
        ("/api/v1/workspaces/ws1/ports/3000", {"protocol": "gopher"}, None, "invalid-body"),
    ],
)
async def test_bad_port_changes_are_400_json(served: Served, make_browser: MakeBrowser, path: str, body: Any,
                                             raw: bytes | None, code: str) -> None:
    alice = await user(make_browser, served, "alice")
    assert_error(await call(alice, "PUT", path, body, raw=raw), 400, code)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"port": 0}, 400, "invalid-body"),
        ({"port": "x"}, 400, "invalid-body"),
        ({"audience": "everyone"}, 400, "invalid-body"),
        ({"ttl": "forever"}, 400, "invalid-body"),
        ({"ttl": -5}, 400, "invalid-body"),
        ({"ttl": float("nan")}, 400, "invalid-body"),  # passes every comparison, and breaks the hub's JSON.parse
        ({"ttl": float("inf")}, 400, "invalid-body"),
        ({"ttl": 10**400}, 400, "invalid-body"),  # an int no float holds
        ({"ttl": "8d"}, 400, "ttl-too-long"),
        ({"audience": "people"}, 400, "invalid-body"),
        ({"port": 22}, 400, "bad-port"),
        ({"port": 13337}, 400, "bad-port"),
        ({"people": "alice"}, 400, "invalid-body"),
        ({"audience": "org", "people": ["bob"]}, 400, "invalid-body"),  # a limit it would not be
    ],
)
async def test_bad_share_requests_are_refused(served: Served, make_browser: MakeBrowser, body: dict[str, Any],
                                              status: int, code: str) -> None:
    alice = await user(make_browser, served, "alice")
    assert_error(await call(alice, "POST", "/api/v1/workspaces/ws1/shares", body), status, code)
    assert not served.gateway.auth.store.shares


@pytest.mark.parametrize("charset", ["no-such-codec", "hex", "rot13"])
async def test_a_body_in_a_charset_that_is_no_text_encoding_is_400_json(served: Served, make_browser: MakeBrowser,
                                                                        charset: str) -> None:
    """aiohttp decodes a body by the charset its ``Content-Type`` names: one Python has no text codec for raised
    LookupError, which answered 500 and was logged as a bug of the gateway's, not the client's mistake."""
    alice = await user(make_browser, served, "alice")
    headers = {"Accept": "application/json", "Origin": HUB, "Content-Type": f"application/json; charset={charset}"}
    page = await alice.fetch("POST", HUB + "/api/v1/tokens", headers=headers, data=b'{"name": "ci"}')
    assert_error(page, 400, "invalid-body")
    assert not served.gateway.auth.store.api_tokens


async def test_a_port_speaks_https_and_back(served: Served, make_browser: MakeBrowser) -> None:
    """``protocol`` alone changes only the protocol, and the view says which it is."""
    alice = await user(make_browser, served, "alice")

    def port_3000(page: Page) -> dict[str, Any]:
        assert page.status == 200, page.text
        return dict(next(p for p in page.json()["ports"] if p["port"] == 3000))

    assert port_3000(await call(alice, "GET", "/api/v1/workspaces/ws1"))["protocol"] == "http"
    https = port_3000(await call(alice, "PUT", "/api/v1/workspaces/ws1/ports/3000", {"protocol": "https"}))
    assert (https["protocol"], https["visibility"], https["listening"]) == ("https", "private", True)
    assert port_3000(await call(alice, "GET", "/api/v1/workspaces/ws1"))["protocol"] == "https"
    assert port_3000(await call(alice, "PUT", "/api/v1/workspaces/ws1/ports/3000", {"label": "x"}))["protocol"] == (
        "https")
    back = await call(alice, "PUT", "/api/v1/workspaces/ws1/ports/3000", {"protocol": "http"})
    assert port_3000(back)["protocol"] == "http"


@pytest.mark.parametrize("body", [{"ports": {"1": "public", "65535": "org"}}, {"id": "a"}, {"id": "a" * 32},
                                  {"id": "ws-2"}, {}])
async def test_a_good_new_workspace_reaches_the_runtime(served: Served, make_browser: MakeBrowser,
                                                        body: dict[str, Any]) -> None:
    """The other side of the table below: the local runtime's 405 is a body that passed."""
    alice = await user(make_browser, served, "alice")
    assert_error(await call(alice, "POST", "/api/v1/workspaces", body), 405, "workspaces-are-configured")


@pytest.mark.parametrize("body", [
    {"ports": {"0": "public"}}, {"ports": {"65536": "public"}}, {"ports": {"3000": "everyone"}},
    {"collaborators": "bob"}, {"id": "Not-An-Id"}, {"id": "a.evil"}, {"id": "../ws1"}, {"id": "ws1\n"},
    {"id": "x" * 33}, {"id": "-ws1"},
])
async def test_a_bad_new_workspace_is_400_before_the_runtime_is_asked(served: Served, make_browser: MakeBrowser,
                                                                     body: dict[str, Any]) -> None:
    """The id must be a workspace id as a whole (DESIGN: ``[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?``): pydantic's
    ``pattern`` searches, so an id merely holding one (``a.evil``, ``../ws1``) reached the runtime. Here the local
    runtime answers 405 to any creation, so a 405 is a body that passed."""
    alice = await user(make_browser, served, "alice")
    assert_error(await call(alice, "POST", "/api/v1/workspaces", body), 400, "invalid-body")


@pytest.mark.parametrize(("port", "status"), [(1, 200), (65535, 200), (0, 400), (65536, 400)])
async def test_port_numbers_from_1_to_65535_can_be_set(served: Served, make_browser: MakeBrowser, port: int,
                                                      status: int) -> None:
    alice = await user(make_browser, served, "alice")
    page = await call(alice, "PUT", f"/api/v1/workspaces/ws1/ports/{port}", {"visibility": "org"})
    assert page.status == status, page.text
    if status == 200:
        assert next(p for p in page.json()["ports"] if p["port"] == port)["visibility"] == "org"


async def test_a_bad_body_is_named_by_its_field(served: Served, make_browser: MakeBrowser) -> None:
    alice = await user(make_browser, served, "alice")
    for body, named in (({"ttl": "forever"}, "ttl: "), ([1, 2], "body: "), ({"people": ["a", 5]}, "people.1: ")):
        page = await call(alice, "POST", "/api/v1/workspaces/ws1/shares", body)
        assert_error(page, 400, "invalid-body")
        assert page.json()["error"]["message"].startswith(named), page.text


@pytest.mark.parametrize("limit", ["1", "500"])
async def test_the_smallest_and_largest_page_are_allowed(served: Served, make_browser: MakeBrowser,
                                                         limit: str) -> None:
    alice = await user(make_browser, served, "alice")
    page = await call(alice, "GET", f"/api/v1/workspaces?limit={limit}")
    assert page.status == 200, page.text
    assert [view["id"] for view in page.json()["workspaces"]] == ["ws1"]


async def test_a_person_withdraws_their_own_answers_and_revokes_their_own_tokens_only(
        served: Served, make_browser: MakeBrowser) -> None:
    """Nobody acts on someone else's answer or token: it is not found for them (404), and stays."""
    store = served.gateway.auth.store
    answer = Consent.answer("bob", "ws1", 3000, owner="alice", share=True, claims=["email"])
    await store.record_consent(answer)
    alice, bob = await user(make_browser, served, "alice"), await user(make_browser, served, "bob")
    assert_error(await call(alice, "DELETE", f"/api/v1/consents/{answer.id}"), 404, "consent-not-found")
    assert [c["id"] for c in (await call(bob, "GET", "/api/v1/consents")).json()["consents"]] == [answer.id]
    assert (await call(bob, "DELETE", f"/api/v1/consents/{answer.id}")).json() == {"id": answer.id,
                                                                                  "withdrawn": True}
    assert (await call(bob, "GET", "/api/v1/consents")).json() == {"consents": []}
    token = (await call(bob, "POST", "/api/v1/tokens", {"name": "ci"})).json()
    assert_error(await call(alice, "DELETE", f"/api/v1/tokens/{token['id']}"), 404, "token-not-found")
    assert (await call(alice, "GET", "/api/v1/me", token=token["token"])).json()["user"] == "bob"
    assert (await call(bob, "DELETE", f"/api/v1/tokens/{token['id']}")).json() == {"id": token["id"],
                                                                                  "revoked": True}


@pytest.mark.parametrize(("path", "body", "status"), [
    ("/api/v1/workspaces/ws1/ports/3000", {"label": "x" * 80}, 200),
    ("/api/v1/workspaces/ws1/shares", {"port": 1}, 201),
    ("/api/v1/workspaces/ws1/shares", {"port": 65535}, 201),
    ("/api/v1/workspaces/ws1/shares", {"port": 65536}, 400),
    ("/api/v1/tokens", {"name": "x"}, 201),
    ("/api/v1/tokens", {"name": "x" * 64}, 201),
    ("/api/v1/tokens", {"name": "x" * 65}, 400),
    # principals: each link and workspace keeps its list in the store's file, and the hub shows it
    ("/api/v1/workspaces/ws1/shares", {"audience": "people", "people": [f"p{i}" for i in range(100)]}, 201),
    ("/api/v1/workspaces/ws1/shares", {"audience": "people", "people": [f"p{i}" for i in range(101)]}, 400),
    ("/api/v1/workspaces/ws1/shares", {"audience": "people", "people": ["x" * 320]}, 201),
    ("/api/v1/workspaces/ws1/shares", {"audience": "people", "people": ["x" * 321]}, 400),
    ("/api/v1/workspaces/ws1/shares", {"audience": "people", "people": ["bob", ""]}, 400),
    ("/api/v1/workspaces/ws1/shares", {"audience": "people", "people": ["bob\nalice"]}, 400),
    ("/api/v1/workspaces/ws1/shares", {"audience": "people", "people": ["group:\u202efe"]}, 400),
    # people name a link's audience only when it is "people": listed with another, they would restrict nothing
    ("/api/v1/workspaces/ws1/shares", {"audience": "org", "people": ["bob"]}, 400),
    ("/api/v1/workspaces/ws1/shares", {"audience": "anyone", "people": ["bob"]}, 400),
    ("/api/v1/workspaces/ws1/shares", {"audience": "org", "people": []}, 201),
    ("/api/v1/workspaces/ws1/collaborators", {"collaborators": [f"p{i}" for i in range(100)]}, 200),
    ("/api/v1/workspaces/ws1/collaborators", {"collaborators": [f"p{i}" for i in range(101)]}, 400),
    ("/api/v1/workspaces/ws1/collaborators", {"collaborators": ["x" * 321]}, 400),
    ("/api/v1/workspaces/ws1/collaborators", {"collaborators": ["\x1b[31m"]}, 400),
])
async def test_the_limits_of_a_body_are_where_they_are_said_to_be(served: Served, make_browser: MakeBrowser,
                                                                  path: str, body: dict[str, Any],
                                                                  status: int) -> None:
    alice = await user(make_browser, served, "alice")
    page = await call(alice, "PUT" if "/ports/" in path or path.endswith("/collaborators") else "POST", path, body)
    assert page.status == status, page.text


async def test_a_link_from_no_body_and_for_a_workspace_with_no_known_port(serve: Serve,
                                                                          make_browser: MakeBrowser) -> None:
    """No body is every default; an all-ports link of a workspace with no port configured or listening has no URL
    yet (not a 500 on the first of none), and a link for one port comes with its embed snippets."""
    served = await serve({"bare": {"owner": "alice"}, "ws1": {"owner": "alice", "ports": {3000: "private"}}})
    alice = await user(make_browser, served, "alice")
    bare = await alice.fetch("POST", HUB + "/api/v1/workspaces/bare/shares",
                             headers={"Accept": "application/json", "Origin": HUB})
    assert bare.status == 201, bare.text
    assert (bare.json()["port"], bare.json()["audience"], bare.json()["urls"], bare.json()["url"]) == (
        None, "anyone", [], None)
    one = (await call(alice, "POST", "/api/v1/workspaces/ws1/shares", {"port": 3000})).json()
    url = f"http://3000-ws1.localhost:8080/?codehub_share={one['token']}"
    assert one["url"] == url
    assert one["embed"]["badge"] == f"http://localhost:8080/badge/ws1/3000.svg?codehub_share={one['token']}"
    assert one["embed"]["markdown"] == f"[![preview ws1:3000]({one['embed']['badge']})]({url})"
    assert f'src="{url}"' in one["embed"]["iframe"]


async def test_an_all_ports_link_opens_the_dev_servers_listening_too(serve: Serve, make_browser: MakeBrowser) -> None:
    """A port its owner never configured but a dev server listens on (started in a terminal) is one the link
    opens: its URL is handed out with the others, and the IDE's port is not."""
    served = await serve({"ws1": {"owner": "alice", "ports": {3000: "private"}}}, listen={"ws1": [4000, 13337]})
    alice = await user(make_browser, served, "alice")
    link = (await call(alice, "POST", "/api/v1/workspaces/ws1/shares", {})).json()
    assert [entry["port"] for entry in link["urls"]] == [3000, 4000]


async def test_a_store_that_cannot_be_read_refuses_before_acting_and_keeps_its_file(
        served: Served, make_browser: MakeBrowser) -> None:
    alice = await user(make_browser, served, "alice")
    store = served.gateway.config.store_file
    made = await call(alice, "POST", "/api/v1/workspaces/ws1/shares", {"port": 3000})
    assert made.status == 201
    good = store.read_bytes()
    cookie = "; ".join(f"{k}={v}" for k, v in alice.cookies_for(HUB.split("//")[1].split(":")[0]).items())
    headers = {"Host": HUB.split("//")[1], "Cookie": cookie, "Accept": "text/event-stream"}
    async with contextlib.AsyncExitStack() as stack:
        feed = await stack.enter_async_context(alice.http.get(alice.gateway + "/api/v1/hub/events", headers=headers))
        assert (await asyncio.wait_for(feed.content.readuntil(b"\n\n"), 10)).startswith(b"event: snapshot")
        with store.open("r+b") as broken:  # in place, same size: cut short, or edited by hand
            broken.write(b"[")
        with pytest.raises(TimeoutError):  # nothing new to show, and no error page written into the stream
            await asyncio.wait_for(feed.content.readuntil(b"\n\n"), 1.5)
        during = await stack.enter_async_context(alice.http.get(alice.gateway + "/api/v1/hub/events",
                                                                headers=headers))
        assert during.status == 200, "a browser's EventSource would give up for good on a 503"
        mended_at = store.stat()
        assert_error(await call(alice, "POST", "/api/v1/workspaces/ws1/shares", {"port": 3000}), 503,
                     "token-store-unavailable")
        assert_error(await call(alice, "GET", "/api/v1/workspaces"), 503, "token-store-unavailable")
        assert_error(await call(alice, "PUT", "/api/v1/workspaces/ws1/ports/3000", {"label": "web"}), 503,
                     "token-store-unavailable")
        spec = (await served.gateway.runtime.status("ws1")).spec
        assert 3000 not in spec.labels, "refused before the change, not after it"
        assert store.read_bytes() == b"[" + good[1:]
        bob = await user(make_browser, served, "bob")  # sign-in goes on
        assert (await call(bob, "GET", "/api/v1/me")).status == 200
        store.write_bytes(good)  # mended in place, its times put back as ``cp -p`` would
        os.utime(store, ns=(mended_at.st_atime_ns, mended_at.st_mtime_ns))
        assert (await call(alice, "GET", "/api/v1/workspaces")).status == 200
        later = await call(alice, "POST", "/api/v1/workspaces/ws1/shares", {"port": 3000})
        assert later.status == 201
        event = await asyncio.wait_for(feed.content.readuntil(b"\n\n"), 10)
        assert later.json()["id"].encode() in event, "the same feed goes on once the store can be read"
        async with asyncio.timeout(10):  # a feed opened meanwhile shows the page once it can be read
            while later.json()["id"].encode() not in await during.content.readuntil(b"\n\n"):
                pass  # a look taken between the mend and the new link shows the page without it


async def test_a_scripts_feed_goes_on_while_the_store_cannot_be_read(served: Served,
                                                                     make_browser: MakeBrowser) -> None:
    """A feed opened with an API token asks the store on every pass whether the token still holds; a store that
    cannot be read for a while does not say it was revoked: the feed waits, and goes on once it can be read."""
    alice = await user(make_browser, served, "alice")
    token = (await call(alice, "POST", "/api/v1/tokens", {"name": "feed"})).json()["token"]
    store = served.gateway.config.store_file
    good = store.read_bytes()
    headers = {"Host": HUB.split("//")[1], "Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
    async with alice.http.get(alice.gateway + "/api/v1/hub/events", headers=headers) as feed:
        assert (await asyncio.wait_for(feed.content.readuntil(b"\n\n"), 10)).startswith(b"event: snapshot")
        mended_at = store.stat()
        with store.open("r+b") as broken:
            broken.write(b"[")
        with pytest.raises(TimeoutError):  # neither a snapshot nor the feed's end
            await asyncio.wait_for(feed.content.readuntil(b"\n\n"), 1.5)
        store.write_bytes(good)
        os.utime(store, ns=(mended_at.st_atime_ns, mended_at.st_mtime_ns))
        later = await call(alice, "POST", "/api/v1/workspaces/ws1/shares", {"port": 3000})
        assert later.status == 201
        event = await asyncio.wait_for(feed.content.readuntil(b"\n\n"), 10)
        assert later.json()["id"].encode() in event


async def test_what_an_owner_stores_through_the_api_reads_back(served: Served, make_browser: MakeBrowser) -> None:
    """Odd text in every field a request can fill is stored so that every worker reads it back, or refused."""
    alice = await user(make_browser, served, "alice")
    raw = ('{"audience": "people", "ttl": 1e308, "people": ["\\ud800", "a\\u0000b", "\\u2028", "%s"]}'
           % ("x" * 100_000)).encode()
    assert_error(await call(alice, "POST", "/api/v1/workspaces/ws1/shares", raw=raw), 400, "invalid-body")
    for people in (["\ud800"], ["a\u0000b"], ["\u2028"], ["x" * 100_000]):
        made = await call(alice, "POST", "/api/v1/workspaces/ws1/shares", {"audience": "people", "people": people})
        assert_error(made, 400, "invalid-body")
    for name in ("\ud800", "a\u0000b", "\u2028", "\x1b[2J"):
        assert_error(await call(alice, "POST", "/api/v1/tokens", {"name": name}), 400, "invalid-body")
    assert (await call(alice, "POST", "/api/v1/tokens", {"name": "ünïcödé 名前"})).status == 201
    assert FileTokenStore(served.gateway.config.store_file).shares is not None  # raises if it cannot be read back
    assert (await call(alice, "GET", "/api/v1/workspaces")).status == 200


async def test_share_links_lifecycle(served: Served, make_browser: MakeBrowser) -> None:
    alice = await user(make_browser, served, "alice")
    page = await call(alice, "POST", "/api/v1/workspaces/ws1/shares", {"port": 3000})
    assert page.status == 201, page.text
    share = page.json()
    assert share["token"].startswith("chs_")
    assert share["url"] == f"http://3000-ws1.localhost:8080/?codehub_share={share['token']}"
    assert share["expires"] - share["created"] == pytest.approx(24 * 3600)  # policy default
    assert (share["audience"], share["uses"], share["last_used"], share["active"]) == ("anyone", 0, None, True)
    longest = await call(alice, "POST", "/api/v1/workspaces/ws1/shares", {"ttl": "7d", "audience": "people",
                                                                          "people": ["bob", "group:qa"]})
    assert longest.status == 201
    assert longest.json()["port"] is None
    token = longest.json()["token"]
    assert longest.json()["urls"] == [{"port": port, "url": f"http://{port}-ws1.localhost:8080/?codehub_share={token}"}
                                      for port in (3000, 3001)]
    assert longest.json()["url"] == longest.json()["urls"][0]["url"]
    assert "{port}" not in longest.text
    assert longest.json()["expires"] - longest.json()["created"] == pytest.approx(7 * 86400)

    script = await make_browser(served)
    for _ in range(2):
        assert (await script.fetch("GET", served.preview("ws1", 3000, "/"),
                                   headers={"Authorization": f"Bearer {share['token']}"})).status == 200

    bob = await user(make_browser, served, "bob")
    listed = await call(bob, "GET", "/api/v1/workspaces/ws1/shares")
    assert listed.status == 200
    links = {link["id"]: link for link in listed.json()["shares"]}
    assert set(links) == {share["id"], longest.json()["id"]}
    assert links[share["id"]]["uses"] == 2
    assert links[share["id"]]["last_used"] >= share["created"]
    assert "token" not in listed.text  # neither the token nor its hash
    assert share["token"] not in listed.text

    assert_error(await call(bob, "DELETE", f"/api/v1/workspaces/ws1/shares/{share['id']}"), 403, "owner-only")
    assert_error(await call(alice, "DELETE", "/api/v1/workspaces/ws1/shares/nope"), 404, "share-not-found")
    carol = await user(make_browser, served, "carol")
    assert_error(await call(carol, "DELETE", f"/api/v1/workspaces/ws2/shares/{share['id']}"), 404,
                 "share-not-found")
    revoked = await call(alice, "DELETE", f"/api/v1/workspaces/ws1/shares/{share['id']}")
    assert revoked.status == 200
    assert revoked.json()["active"] is False
    assert revoked.json()["revoked"] is not None
    page = await script.fetch("GET", served.preview("ws1", 3000, "/"),
                              headers={"Authorization": f"Bearer {share['token']}"})
    assert_error(page, 403, "share-revoked")


async def test_share_policy_default_maximum_and_audiences(strict: Served, make_browser: MakeBrowser) -> None:
    alice = await user(make_browser, strict, "alice")
    share = (await call(alice, "POST", "/api/v1/workspaces/ws1/shares", {"port": 3000})).json()
    assert share["expires"] - share["created"] == pytest.approx(2 * 3600)
    too_long = await call(alice, "POST", "/api/v1/workspaces/ws1/shares", {"ttl": "25h"})
    assert_error(too_long, 400, "ttl-too-long")
    assert too_long.json()["error"]["message"] == "ttl: the policy allows at most 1 day."
    assert (await call(alice, "POST", "/api/v1/workspaces/ws1/shares", {"ttl": "1d"})).status == 201
    assert_error(await call(alice, "POST", "/api/v1/workspaces/ws1/shares", {"audience": "org"}), 403,
                 "audience-denied")
    bob = await user(make_browser, strict, "bob")
    assert_error(await call(bob, "POST", "/api/v1/workspaces/ws1/shares", {"port": 3000}), 403, "owner-only")


async def test_api_tokens(served: Served, make_browser: MakeBrowser) -> None:
    alice = await user(make_browser, served, "alice")
    created = await call(alice, "POST", "/api/v1/tokens", {"name": "ci"})
    assert created.status == 201
    record = created.json()
    assert record["token"].startswith("chk_")
    assert_error(await call(alice, "POST", "/api/v1/tokens", {"name": ""}), 400, "invalid-body")
    assert_error(await call(alice, "POST", "/api/v1/tokens", {}), 400, "invalid-body")

    script = await make_browser(served)
    me = await call(script, "GET", "/api/v1/me", token=record["token"])
    assert me.json() == {"user": "alice", "email": "alice@example.com", "groups": []}
    listed = await call(alice, "GET", "/api/v1/tokens")
    assert [(t["id"], t["name"]) for t in listed.json()["tokens"]] == [(record["id"], "ci")]
    assert listed.json()["tokens"][0]["last_used"] is not None
    assert record["token"] not in listed.text
    assert "token_hash" not in listed.text

    bob = await user(make_browser, served, "bob")
    assert (await call(bob, "GET", "/api/v1/tokens")).json() == {"tokens": []}
    assert_error(await call(bob, "DELETE", f"/api/v1/tokens/{record['id']}"), 404, "token-not-found")
    assert (await call(alice, "DELETE", f"/api/v1/tokens/{record['id']}")).status == 200
    assert_error(await call(script, "GET", "/api/v1/me", token=record["token"]), 401, "token-invalid")


async def test_an_api_token_cannot_mint_another(served: Served, make_browser: MakeBrowser) -> None:
    """A stolen token minting a second would keep its thief in after the first is revoked."""
    alice = await user(make_browser, served, "alice")
    token = (await call(alice, "POST", "/api/v1/tokens", {"name": "ci"})).json()["token"]
    script = await make_browser(served)

    assert_error(await call(script, "POST", "/api/v1/tokens", {"name": "more"}, token=token), 403,
                 "token-cannot-mint")

    assert [t["name"] for t in (await call(alice, "GET", "/api/v1/tokens")).json()["tokens"]] == ["ci"]
    assert (await call(script, "GET", "/api/v1/tokens", token=token)).status == 200  # it still lists them


async def test_a_person_has_at_most_so_many_api_tokens(served: Served, make_browser: MakeBrowser) -> None:
    """Every token is kept (and, in the file store, written out with every change) until revoked."""
    alice = await user(make_browser, served, "alice")
    for index in range(MOST_API_TOKENS):
        assert (await call(alice, "POST", "/api/v1/tokens", {"name": f"t{index}"})).status == 201

    assert_error(await call(alice, "POST", "/api/v1/tokens", {"name": "one more"}), 409, "too-many-tokens")

    bob = await user(make_browser, served, "bob")
    assert (await call(bob, "POST", "/api/v1/tokens", {"name": "his"})).status == 201  # a cap per person
    first = (await call(alice, "GET", "/api/v1/tokens")).json()["tokens"][0]
    assert (await call(alice, "DELETE", f"/api/v1/tokens/{first['id']}")).status == 200
    assert (await call(alice, "POST", "/api/v1/tokens", {"name": "one more"})).status == 201


async def test_a_workspace_keeps_at_most_so_many_share_links(served: Served, make_browser: MakeBrowser) -> None:
    """Revoked ones count until the store forgets them (a day after they expire): a loop of create and revoke
    would otherwise grow, without end, the file each change rewrites and the hub of everyone who sees ws1."""
    store = served.gateway.auth.store
    for _ in range(MOST_SHARE_LINKS - 1):
        await store.create_share(workspace="ws1", port=3000, audience="anyone", people=[], created_by="alice",
                                 ttl=3600)
    alice = await user(make_browser, served, "alice")
    last = await call(alice, "POST", "/api/v1/workspaces/ws1/shares", {"port": 3000, "audience": "anyone"})
    assert last.status == 201
    assert (await call(alice, "DELETE", f"/api/v1/workspaces/ws1/shares/{last.json()['id']}")).status == 200

    assert_error(await call(alice, "POST", "/api/v1/workspaces/ws1/shares", {"port": 3000, "audience": "anyone"}),
                 409, "too-many-share-links")

    carol = await user(make_browser, served, "carol")
    assert (await call(carol, "POST", "/api/v1/workspaces/ws2/shares", {"port": 5000})).status == 201  # per workspace


async def test_api_without_credentials_is_401_json(served: Served, make_browser: MakeBrowser) -> None:
    anonymous = await make_browser(served)
    for method, path in [("GET", "/api/v1/workspaces"), ("GET", "/api/v1/me"), ("POST", "/api/v1/tokens"),
                         ("DELETE", "/api/v1/workspaces/ws1/shares/x")]:
        page = await anonymous.fetch(method, HUB + path, headers={"Accept": "text/html", "Origin": HUB})
        assert_error(page, 401, "user-unauthenticated")
        assert page.headers["WWW-Authenticate"].startswith("Bearer")
    for token in ("chk_nope", "not-a-codehub-token", "chs_share-token-is-not-an-api-token"):
        assert_error(await call(anonymous, "GET", "/api/v1/me", token=token), 401, "token-invalid")


async def test_hub_page(served: Served, make_browser: MakeBrowser) -> None:
    """The page carries the signed-in person's snapshot as inert JSON (hub.js renders it; tests/browser/test_hub.py
    checks what Chromium shows)."""
    anonymous = await make_browser(served)
    page = await anonymous.navigate(HUB + "/")
    assert page.status == 200
    assert 'href="/auth/login?next=/"' in page.text
    assert "Sign in (development)</a>" in page.text  # dev sign-in asks no password: the button says so
    assert "ws1" not in page.text

    alice = await user(make_browser, served, "alice")
    evil = "</script><img src=x onerror=alert(1)>"
    share = (await call(alice, "POST", "/api/v1/workspaces/ws1/shares",
                        {"port": 3000, "audience": "people", "people": [evil]})).json()
    page = await alice.navigate(HUB + "/")
    assert page.status == 200
    data = _hub_data(page.text)
    assert [ws["id"] for ws in data["workspaces"]] == ["ws1"]
    ws1 = data["workspaces"][0]
    assert ws1["role"] == "owner"
    assert ws1["phase_words"] == PHASE_WORDS[Phase(ws1["phase"])]
    assert [port["url"] for port in ws1["ports"]] == ["http://3000-ws1.localhost:8080/",
                                                      "http://3001-ws1.localhost:8080/"]
    assert [link["id"] for link in ws1["shares"]] == [share["id"]]
    assert ws1["shares"][0]["people"] == [evil]
    assert evil not in page.text  # the JSON is escaped for the script element it sits in
    assert share["token"] not in page.text
    assert data["port_url"] == "http://{port}-{workspace}.localhost:8080/"

    bob = await user(make_browser, served, "bob")
    page = await bob.navigate(HUB + "/")
    assert [(ws["id"], ws["role"]) for ws in _hub_data(page.text)["workspaces"]] == [("ws1", "collaborator")]
    assert (await bob.navigate(HUB + "/tokens")).status == 200


@pytest.mark.parametrize(("phase", "words"), [
    (Phase.RUNNING, "Running"),
    (Phase.WARM, "Sleeping (wakes in seconds)"),
    (Phase.COLD, "Archived (wakes in about a minute)"),
    (Phase.STARTING, "Starting"),
    (Phase.STOPPING, "Going to sleep"),
    (Phase.ARCHIVING, "Archiving"),
    (Phase.RESTORING, "Restoring from its archive"),
    (Phase.FAILED, "Failed to start"),
])
def test_each_phase_reads_in_words_a_newcomer_knows(phase: Phase, words: str) -> None:
    """WARM and COLD are the gateway's words: the hub and the API's ``phase_words`` say what a phase means to the
    person waiting (how long a wake takes), for the phase and for its name as stored in JSON alike."""
    assert (pages.phase_words(phase), pages.phase_words(phase.value)) == (words, words)


def _hub_data(text: str) -> Any:
    start = text.index('<script type="application/json" id="hub-data">') + len(
        '<script type="application/json" id="hub-data">')
    return json.loads(text[start:text.index("</script>", start)])


async def test_port_labels_set_on_the_hub_win_and_clear(served: Served, make_browser: MakeBrowser) -> None:
    alice = await user(make_browser, served, "alice")
    devcontainer = served.gateway.config.state_dir.resolve() / "workspaces" / "ws1" / "home" / ".devcontainer"
    devcontainer.mkdir(parents=True)
    (devcontainer / "devcontainer.json").write_text('{"portsAttributes": {"3000": {"label": "From devcontainer"}}}')

    def label(page: Page) -> str:
        return str(next(p["label"] for p in page.json()["ports"] if p["port"] == 3000))

    assert label(await call(alice, "GET", "/api/v1/workspaces/ws1")) == "From devcontainer"
    named = await call(alice, "PUT", "/api/v1/workspaces/ws1/ports/3000", {"label": " Shop front "})
    assert (named.status, label(named)) == (200, "Shop front")
    assert next(p for p in named.json()["ports"] if p["port"] == 3000)["visibility"] == "private"  # untouched
    cleared = await call(alice, "PUT", "/api/v1/workspaces/ws1/ports/3000", {"label": ""})
    assert label(cleared) == "From devcontainer"
    bob = await user(make_browser, served, "bob")
    assert_error(await call(bob, "PUT", "/api/v1/workspaces/ws1/ports/3000", {"label": "mine"}), 403, "owner-only")


@pytest.mark.parametrize(
    ("url", "status", "code"),
    [
        ("http://3000-ws1.localhost:8080/", 200, None),
        ("http://3000-ws1.localhost:8080/path?codehub_share=chs_x", 200, None),
        ("https://evil.example/", 400, "bad-qr-url"),
        ("http://evil.example/", 400, "bad-qr-url"),  # this gateway's scheme, but a host it does not serve
        ("http://localhost:8080/", 400, "bad-qr-url"),  # the hub itself is no share URL
        ("https://3000-ws1.localhost:8080/", 400, "bad-qr-url"),  # not this gateway's scheme
        ("", 400, "bad-qr-url"),
    ],
)
async def test_qr_codes_only_for_share_urls(served: Served, make_browser: MakeBrowser, url: str, status: int,
                                            code: str | None) -> None:
    anonymous = await make_browser(served)
    refused = await anonymous.fetch("GET", f"{HUB}/qr.svg?url=x", headers={"Accept": "application/json"})
    assert_error(refused, 401, "user-unauthenticated")
    assert refused.json()["error"]["message"] == "Sign in to make QR codes."
    alice = await user(make_browser, served, "alice")
    page = await alice.fetch("GET", f"{HUB}/qr.svg?url={quote(url, safe='')}", headers={"Accept": "application/json"})
    if code is None:
        assert page.status == 200
        assert page.content_type == "image/svg+xml"
        assert page.text.lstrip().startswith(("<?xml", "<svg"))
    else:
        assert_error(page, status, code)
        assert page.json()["error"]["message"] == "QR codes are made only for this gateway's share URLs."


async def test_local_workspaces_are_declared_not_created(served: Served, make_browser: MakeBrowser) -> None:
    alice = await user(make_browser, served, "alice")
    page = await call(alice, "POST", "/api/v1/workspaces", {"id": "newone"})
    assert page.status == 405
    assert page.json()["error"]["code"] == "workspaces-are-configured"
    # nor deleted: its owner's DELETE says so, and the workspace is still there, its home kept
    assert_error(await call(alice, "DELETE", "/api/v1/workspaces/ws1"), 405, "workspaces-are-configured")
    assert (await call(alice, "GET", "/api/v1/workspaces/ws1")).status == 200
    bob = await user(make_browser, served, "bob")
    assert (await call(bob, "PUT", "/api/v1/workspaces/ws1/collaborators", {"collaborators": []})).status == 403
    root = await user(make_browser, served, "root")  # a policy admin manages sharing, never the IDE: members
    for method, body in (("PUT", {"collaborators": ["root"]}), ("DELETE", None)):  # open it, so they are
        path = "/api/v1/workspaces/ws1" + ("/collaborators" if body else "")  # the owner's to name
        assert_error(await call(root, method, path, body), 403, "owner-only")
    assert (await root.navigate(served.ide("ws1"), headers={"Accept": "text/html"})).status == 403
    changed = await call(alice, "PUT", "/api/v1/workspaces/ws1/collaborators", {"collaborators": ["carol"]})
    assert changed.status == 200
    assert changed.json()["collaborators"] == ["carol"]


async def test_a_runtime_that_makes_no_workspaces_says_so_whatever_the_policy_counts(
        serve: Serve, make_browser: MakeBrowser, tmp_path: Path) -> None:
    """Not "delete one first" to someone who owns more declared workspaces than the policy's API maximum."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("workspaces:\n  most_per_person: 1\n")
    served = await serve({"a1": {"owner": "alice"}, "a2": {"owner": "alice"}}, policy_file=str(policy))
    alice = await user(make_browser, served, "alice")
    assert_error(await call(alice, "POST", "/api/v1/workspaces", {"id": "a3"}), 405, "workspaces-are-configured")


async def test_workspaces_come_in_pages(serve: Serve, make_browser: MakeBrowser, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``limit`` and ``cursor`` walk the caller's workspaces in id order; pages skip what the caller cannot see,
    and a page is cut by id, so a workspace that goes away between two calls shifts nothing."""
    mine = ["a1", "b2", "c3", "d4", "e5", "f6", "g7"]
    spec = {name: {"owner": "alice"} for name in mine} | {"bz": {"owner": "carol"}, "cz": {"owner": "carol"}}
    served = await serve(spec)
    alice = await user(make_browser, served, "alice")
    seen: list[list[str]] = []
    cursor = None
    while True:
        page = await call(alice, "GET", "/api/v1/workspaces?limit=3" + (f"&cursor={cursor}" if cursor else ""))
        assert page.status == 200, page.text
        seen.append([view["id"] for view in page.json()["workspaces"]])
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == [["a1", "b2", "c3"], ["d4", "e5", "f6"], ["g7"]]
    exact = await call(alice, "GET", "/api/v1/workspaces?limit=7")
    assert exact.json()["next_cursor"] is None  # no empty last page
    first = (await call(alice, "GET", "/api/v1/workspaces?limit=2")).json()
    runtime = served.gateway.runtime
    assert isinstance(runtime, LocalRuntime)
    runtime._slots.pop("b2")  # gone between two calls (the local runtime's table)
    rest = (await call(alice, "GET", f"/api/v1/workspaces?limit=2&cursor={first['next_cursor']}")).json()
    assert [view["id"] for view in rest["workspaces"]] == ["c3", "d4"]

    monkeypatch.setattr(api, "PAGE_SIZE", 4)
    default = (await call(alice, "GET", "/api/v1/workspaces")).json()
    assert [view["id"] for view in default["workspaces"]] == ["a1", "c3", "d4", "e5"]
    assert default["next_cursor"]


async def test_ports_count_the_visitors_who_agreed_to_share_and_no_one_else(serve: Serve,
                                                                            make_browser: MakeBrowser) -> None:
    """One pass over the answers per page: each port counts its own workspace's answers that share, not those
    that declined, in a page, in the hub's snapshot and in a single workspace's view alike."""
    served = await serve({name: {"owner": "alice", "ports": {3000: "private"}} for name in ("a1", "b2")})
    store = served.gateway.auth.store
    for who, where, share, owner in [("bob", "a1", True, "alice"), ("carol", "a1", False, "alice"),
                                     ("dave", "b2", True, "alice"), ("erin", "b2", True, "alice"),
                                     ("fay", "b2", True, "mallory")]:  # given to an earlier b2, not alice's
        await store.record_consent(Consent.answer(who, where, 3000, owner=owner, share=share, claims=["email"]))
    alice = await user(make_browser, served, "alice")
    for path in ("/api/v1/workspaces", "/api/v1/hub/snapshot"):
        views = (await call(alice, "GET", path)).json()["workspaces"]
        assert {(view["id"], port["port"]): port["consented"] for view in views for port in view["ports"]} == {
            ("a1", 3000): 1, ("b2", 3000): 2}, path
    assert (await call(alice, "GET", "/api/v1/workspaces/a1")).json()["ports"][0]["consented"] == 1


async def test_a_page_is_fifty_workspaces_on_the_hub_and_a_hundred_in_the_api(serve: Serve,
                                                                               make_browser: MakeBrowser) -> None:
    """The page sizes the README gives, as a person with 101 workspaces meets them (the tests around patch them)."""
    served = await serve({f"w{n:03}": {"owner": "alice"} for n in range(101)})
    alice = await user(make_browser, served, "alice")
    hub_page = _hub_data((await alice.navigate(HUB + "/")).text)
    snapshot = (await call(alice, "GET", "/api/v1/hub/snapshot")).json()
    api_page = (await call(alice, "GET", "/api/v1/workspaces")).json()
    assert [len(page["workspaces"]) for page in (hub_page, snapshot, api_page)] == [50, 50, 100]
    assert all(page["next_cursor"] for page in (hub_page, snapshot, api_page))
    rest = (await call(alice, "GET", f"/api/v1/workspaces?cursor={api_page['next_cursor']}")).json()
    assert ([view["id"] for view in rest["workspaces"]], rest["next_cursor"]) == (["w100"], None)


async def test_the_hub_shows_a_page_of_workspaces_with_their_own_links(
        serve: Serve, make_browser: MakeBrowser, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub page, its snapshot and its live feed show one page of workspaces (as the API pages them), each with
    its own share links, newest first: a person with a thousand workspaces gets a page, not all of them."""
    monkeypatch.setattr(hub, "HUB_PAGE", 2)
    served = await serve({name: {"owner": "alice"} for name in ("a1", "b2", "c3")} | {"bz": {"owner": "carol"}})
    alice = await user(make_browser, served, "alice")
    carol = await user(make_browser, served, "carol")
    links: dict[str, list[str]] = {}
    for name, who in [("a1", alice), ("c3", alice), ("a1", alice), ("bz", carol)]:
        made = await call(who, "POST", f"/api/v1/workspaces/{name}/shares", {"port": 3000, "audience": "anyone"})
        assert made.status == 201, made.text
        links.setdefault(name, []).insert(0, made.json()["id"])

    first = _hub_data((await alice.navigate(HUB + "/")).text)
    assert [(ws["id"], [link["id"] for link in ws["shares"]]) for ws in first["workspaces"]] == [
        ("a1", links["a1"]), ("b2", [])]
    assert first["cursor"] is None
    second_page = await alice.navigate(HUB + f"/?cursor={first['next_cursor']}")
    assert second_page.status == 200
    assert 'href="/"' in second_page.text  # back to the first page
    second = _hub_data(second_page.text)
    assert [(ws["id"], [link["id"] for link in ws["shares"]]) for ws in second["workspaces"]] == [
        ("c3", links["c3"])]
    assert (second["cursor"], second["next_cursor"]) == (first["next_cursor"], None)

    snapshot = (await call(alice, "GET", f"/api/v1/hub/snapshot?cursor={first['next_cursor']}")).json()
    assert [ws["id"] for ws in snapshot["workspaces"]] == ["c3"]
    cookie = "; ".join(f"{k}={v}" for k, v in alice.cookies_for(HUB.split("//")[1].split(":")[0]).items())
    async with alice.http.get(alice.gateway + f"/api/v1/hub/events?cursor={first['next_cursor']}", headers={
            "Host": HUB.split("//")[1], "Cookie": cookie, "Accept": "text/event-stream"}) as feed:
        event = (await asyncio.wait_for(feed.content.readuntil(b"\n\n"), 10)).decode()
    assert [ws["id"] for ws in json.loads(event.split("data: ", 1)[1])["workspaces"]] == ["c3"]
    assert_error(await call(alice, "GET", "/api/v1/hub/snapshot?cursor=%25%25"), 400, "bad-cursor")


@pytest.mark.parametrize(("query", "code"), [
    ("limit=0", "bad-limit"), ("limit=501", "bad-limit"), ("limit=ten", "bad-limit"), ("limit=-1", "bad-limit"),
    ("limit=%C2%B2", "bad-limit"), ("limit=%D9%A3", "bad-limit"),  # "²" and Arabic "3": digits to str.isdigit
    pytest.param("limit=" + "9" * 5000, "bad-limit", id="limit=9x5000"),
    ("cursor=!!", "bad-cursor"), ("cursor=Lw", "bad-cursor"), ("cursor=", "bad-cursor"),
    ("cursor=%C3%A9", "bad-cursor"),  # no ASCII: base64 never sees it
])
async def test_bad_page_parameters_are_400(served: Served, make_browser: MakeBrowser, query: str, code: str) -> None:
    alice = await user(make_browser, served, "alice")
    assert_error(await call(alice, "GET", f"/api/v1/workspaces?{query}"), 400, code)


async def test_two_authorization_headers_are_refused(served: Served, make_browser: MakeBrowser) -> None:
    """Which of two credentials would count is a guess a proxy in front may make differently: neither does."""
    alice = await user(make_browser, served, "alice")
    token = (await call(alice, "POST", "/api/v1/tokens", {"name": "ci"})).json()["token"]
    script = await make_browser(served)
    for second in (f"Bearer {token}", "Bearer chk_nope", "Basic YWxpY2U6eA=="):
        headers = CIMultiDict([("Accept", "application/json"), ("Authorization", f"Bearer {token}"),
                               ("Authorization", second)])
        assert_error(await script.fetch("GET", HUB + "/api/v1/me", headers=headers), 400, "bad-authorization")
    assert (await call(script, "GET", "/api/v1/me", token=token)).status == 200


async def test_the_tokens_page_lists_only_the_signed_in_persons_tokens_newest_first(
        served: Served, make_browser: MakeBrowser) -> None:
    """Token names and ids are the holder's own business: the page lists the signed-in person's tokens alone, and
    nothing for someone signed out but the way to sign in."""
    alice, bob = await user(make_browser, served, "alice"), await user(make_browser, served, "bob")
    older = (await call(alice, "POST", "/api/v1/tokens", {"name": "alice-old"})).json()
    mine = (await call(alice, "POST", "/api/v1/tokens", {"name": "alice-new"})).json()
    theirs = (await call(bob, "POST", "/api/v1/tokens", {"name": "bob-ci"})).json()
    served.gateway.auth.store.api_tokens[older["id"]].created -= 60  # made a minute before
    page = await alice.navigate(HUB + "/tokens")
    assert page.status == 200
    assert re.findall(r'<tr data-token="([^"]+)">', page.text) == [mine["id"], older["id"]]
    assert "bob-ci" not in page.text
    assert theirs["id"] not in page.text
    assert "CODEHUB_URL=http://localhost:8080 " in page.text
    signed_out = await (await make_browser(served)).navigate(HUB + "/tokens")
    assert signed_out.status == 200
    assert 'href="/auth/login?next=/tokens"' in signed_out.text
    assert "Sign in (development)</a>" in signed_out.text
    assert "data-token" not in signed_out.text


async def test_a_qr_code_is_of_the_url_asked_and_kept_only_by_the_browser(served: Served,
                                                                           make_browser: MakeBrowser) -> None:
    """Share URLs can carry a share token: the code's SVG may be cached by the browser that asked, never by a shared
    cache; an IDE URL, or one longer than a phone's camera reads well, is no share URL to encode."""
    alice = await user(make_browser, served, "alice")
    url = "http://3000-ws1.localhost:8080/x"
    page = await alice.fetch("GET", f"{HUB}/qr.svg?url={quote(url, safe='')}", headers={"Accept": "image/*"})
    assert page.status == 200
    assert page.headers["Cache-Control"] == "private, max-age=3600"
    width, height = segno.make(url, error="m").symbol_size(scale=4, border=2)  # what a phone's camera reads well
    assert f'width="{width}" height="{height}"' in page.text
    other = await alice.fetch("GET", f"{HUB}/qr.svg?url={quote(url + 'y', safe='')}", headers={"Accept": "image/*"})
    assert other.text != page.text, "a code of the URL asked for"
    longest = url + "/" + "a" * (1000 - len(url) - 1)
    assert (await alice.fetch("GET", f"{HUB}/qr.svg?url={quote(longest, safe='')}")).status == 200
    for refused in (longest + "a", "http://ide-ws1.localhost:8080/"):
        assert_error(await alice.fetch("GET", f"{HUB}/qr.svg?url={quote(refused, safe='')}",
                                       headers={"Accept": "application/json"}), 400, "bad-qr-url")


async def test_the_hub_snapshot_is_the_callers_own_and_never_cached(served: Served, make_browser: MakeBrowser) -> None:
    bob = await user(make_browser, served, "bob", "qa")
    page = await call(bob, "GET", "/api/v1/hub/snapshot")
    assert page.status == 200
    assert page.headers["Cache-Control"] == "no-store"
    assert [ws["id"] for ws in page.json()["workspaces"]] == ["ws1", "ws2"]
    anonymous = await make_browser(served)
    assert_error(await call(anonymous, "GET", "/api/v1/hub/snapshot"), 401, "user-unauthenticated")


async def test_the_hub_lists_the_apps_a_person_answered_and_no_one_elses(served: Served,
                                                                         make_browser: MakeBrowser) -> None:
    """The hub is where a person withdraws a consent answer: its page and its snapshot list the apps that asked
    who they are, with what they said; another visitor's answers to the same owner's apps are not theirs to see."""
    store = served.gateway.auth.store
    await store.record_consent(Consent.answer("bob", "ws1", 3000, owner="alice", share=True, claims=["email"]))
    await store.record_consent(Consent.answer("carol", "ws1", 3001, owner="alice", share=False, claims=["email"]))
    bob = await user(make_browser, served, "bob")
    snapshot = (await call(bob, "GET", "/api/v1/hub/snapshot")).json()
    assert [(c["workspace"], c["port"], c["share"]) for c in snapshot["consents"]] == [("ws1", 3000, True)]
    page = await bob.navigate(HUB + "/")
    assert [(c["workspace"], c["port"]) for c in _hub_data(page.text)["consents"]] == [("ws1", 3000)]
    assert "<tr><td>port 3000 of ws1</td>" in page.text
    assert "shares email" in page.text
    assert "No app has asked you yet." not in page.text
    assert "port 3001 of ws1" not in page.text


async def test_the_hub_page_offers_only_the_choices_the_policy_allows(strict: Served,
                                                                      make_browser: MakeBrowser) -> None:
    """hub.js builds its share-link audience list and its visibility choices from the page's data: the policy's
    audiences and its visibility ceiling, so the page never offers what the API would refuse."""
    alice = await user(make_browser, strict, "alice")
    data = _hub_data((await alice.navigate(HUB + "/")).text)
    assert (data["audiences"], data["max_visibility"]) == (["anyone", "people"], "org")


async def test_a_quiet_feed_says_it_is_still_there(served: Served, make_browser: MakeBrowser,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Proxies in front of the hub close a stream that is silent for long: with nothing new to show, the feed sends
    a comment line every ``KEEPALIVE`` seconds (shortened here), which EventSource ignores; a change is still a
    snapshot. The feed looks for changes more often than that, and still sends one comment per quiet
    ``KEEPALIVE``, not one per look. It is a ``text/event-stream``: EventSource refuses any other type."""
    monkeypatch.setattr(hub, "KEEPALIVE", 0.8)
    monkeypatch.setattr(hub, "LOOK_EVERY", 0.05)
    alice = await user(make_browser, served, "alice")
    cookie = "; ".join(f"{k}={v}" for k, v in alice.cookies_for(HUB.split("//")[1].split(":")[0]).items())
    headers = {"Host": HUB.split("//")[1], "Cookie": cookie, "Accept": "text/event-stream"}
    async with alice.http.get(alice.gateway + "/api/v1/hub/events", headers=headers) as feed:
        assert feed.content_type == "text/event-stream"
        assert feed.headers["Cache-Control"] == "no-store"
        assert feed.headers["X-Accel-Buffering"] == "no"
        assert (await asyncio.wait_for(feed.content.readuntil(b"\n\n"), 10)).startswith(b"event: snapshot")
        said: list[bytes] = []
        with contextlib.suppress(TimeoutError):  # two quiet seconds: a comment per KEEPALIVE, not per look (40)
            async with asyncio.timeout(2.0):
                while True:
                    said.append(await feed.content.readuntil(b"\n\n"))
        assert said
        assert set(said) == {b": still here\n\n"}
        assert len(said) <= 3, f"{len(said)} comments in 2 s: one per look (0.05 s), not per quiet KEEPALIVE (0.8 s)"
        made = await call(alice, "POST", "/api/v1/workspaces/ws1/shares", {"port": 3000})
        while (event := await asyncio.wait_for(feed.content.readuntil(b"\n\n"), 10)) == b": still here\n\n":
            pass
        assert event.startswith(b"event: snapshot")
        assert made.json()["id"].encode() in event

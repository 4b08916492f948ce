"""What a client sees when the gateway cannot or may not reach a port: the right status, an HTML page for a
browser or JSON for a script, a message that says what is wrong, and never a stack trace."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import ClientResponse, web

from gateway.proxy import pool
from gateway.proxy.pacing import INITIAL_WINDOW
from tests.server.conftest import NO_TRACES, MakeProxied

BROWSER = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
NAVIGATION = {"Sec-Fetch-Mode": "navigate", "Accept": "*/*"}
API = {"Accept": "application/json"}


async def assert_clean(response: ClientResponse) -> str:
    body = await response.text()
    for trace in NO_TRACES:
        assert trace not in body, body
    assert response.headers["Cache-Control"] == "no-store"
    return body


@pytest.mark.parametrize("browser", [BROWSER, NAVIGATION])
async def test_refused_port_is_a_502_page_for_browsers(proxied: MakeProxied, browser: dict[str, str]) -> None:
    p = await proxied(None)
    async with p.request("GET", "/", headers=browser) as response:
        assert response.status == 502
        assert response.content_type == "text/html"
        body = await assert_clean(response)
    assert f"Nothing is listening on port {p.port} in workspace ws1" in body
    assert response.headers["Retry-After"]
    assert '<meta http-equiv="refresh"' in body  # "this page retries by itself"
    assert "Try again now" in body


@pytest.mark.parametrize(("fetch_metadata", "by_itself"), [
    ({"Sec-Fetch-Site": "none"}, True),  # typed, a bookmark
    ({"Sec-Fetch-Site": "same-origin"}, True),  # its own reload, its button
    ({"Sec-Fetch-Site": "same-site", "Sec-Fetch-User": "?1"}, True),  # a link clicked on another preview
    ({"Sec-Fetch-Site": "same-site"}, False),  # a script's navigation on another preview, no click
    ({"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Dest": "iframe"}, False),  # a frame on another site
])
async def test_a_502_page_tries_again_by_itself_only_when_the_visitor_brought_it(
        proxied: MakeProxied, fetch_metadata: dict[str, str], by_itself: bool) -> None:
    """Its reload comes from the app's own origin, which may wake a sleeping workspace: a page elsewhere that sent
    its visitor's tab (or a frame) there must not leave it reloading, and waking it, for as long as it stays open
    (``test_a_page_a_preview_sent_its_visitor_to_does_not_wake_their_workspace_by_itself``, real Chromium)."""
    p = await proxied(None)
    headers = {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document", "Accept": "text/html", **fetch_metadata}
    async with p.request("GET", "/", headers=headers) as response:
        assert response.status == 502
        body = await assert_clean(response)
    assert ('<meta http-equiv="refresh"' in body) is by_itself
    assert "Try again now" in body


async def test_a_page_for_a_form_sent_does_not_send_it_again_as_a_get(proxied: MakeProxied) -> None:
    """A reload by ``<meta http-equiv="refresh">``, or a link to the page itself, is a GET: after a POST it would
    not try the form again, so the page says what is wrong and offers neither."""
    p = await proxied(None)
    async with p.request("POST", "/form", headers={**BROWSER, "Sec-Fetch-Mode": "navigate"}, data=b"a=1") as response:
        assert response.status == 502
        assert response.content_type == "text/html"
        body = await assert_clean(response)
    assert f"Nothing is listening on port {p.port} in workspace ws1" in body
    assert "refresh" not in body
    assert "Try again now" not in body


async def test_a_head_is_told_the_length_of_the_page_a_get_would_get(proxied: MakeProxied) -> None:
    """A HEAD is answered as the GET would be, body aside: the same page (one that retries by itself, as a HEAD is
    as safe to repeat as a GET), so the same ``Content-Length``."""
    p = await proxied(None)
    async with p.request("GET", "/", headers=BROWSER) as got:
        assert got.status == 502
        body = await got.read()
    async with p.request("HEAD", "/", headers=BROWSER) as head:
        assert head.status == 502
        assert head.content_type == "text/html"
        assert head.headers["Content-Length"] == got.headers["Content-Length"] == str(len(body))


async def test_refused_port_is_a_502_json_for_api_clients(proxied: MakeProxied) -> None:
    p = await proxied(None)
    for method in ("GET", "POST"):
        async with p.request(method, "/api", headers=API) as response:
            assert response.status == 502
            assert response.content_type == "application/json"
            await assert_clean(response)
            error = (await response.json())["error"]
        assert error["code"] == "port-not-listening"
        assert error["status"] == 502
        assert f"port {p.port} in workspace ws1" in error["message"]


async def test_refused_connections_are_counted(proxied: MakeProxied) -> None:
    p = await proxied(None)
    for _ in range(3):
        async with p.request("GET", "/", headers=API) as response:
            assert response.status == 502
    assert 'codehub_upstream_connect_errors_total{reason="refused"} 3.0' in await p.metrics()


async def test_silent_upstream_times_out_with_504(proxied: MakeProxied) -> None:
    never = asyncio.Event()

    async def silent(request: web.Request) -> web.Response:
        await never.wait()
        return web.Response()

    async def stalls(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"started")
        await never.wait()
        return response

    app = web.Application()
    app.router.add_route("*", "/silent", silent)
    app.router.add_get("/stalls", stalls)
    p = await proxied(app, timeouts={"first_byte": 0.5, "read": 0.5})
    async with asyncio.timeout(30):
        async with p.request("GET", "/silent", headers=API) as response:
            assert response.status == 504
            await assert_clean(response)
            assert (await response.json())["error"]["code"] == "upstream-timeout"
        async with p.request("GET", "/silent", headers=BROWSER) as response:
            assert response.status == 504
            body = await assert_clean(response)
            assert "did not answer in time" in body
            assert "refresh" not in body  # trying again would send the app the same request it did not answer
        async with p.request("POST", "/silent", data=b"a body", headers=API) as response:  # timed once it is out
            assert response.status == 504
        async with p.request("GET", "/stalls") as response:  # mid-body silence: the body is cut short
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()


async def test_a_request_that_waited_too_long_for_a_connection_is_a_503(proxied: MakeProxied,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway's own queue toward a busy port is bounded (``timeouts.queue``), and the one who waited is told
    so in the usual form; the requests that hold the connections are answered once the app answers."""
    monkeypatch.setattr(pool, "SETTLE_AFTER", 60.0)  # unanswered connects keep their places for this test's span
    release = asyncio.Event()
    arrived: list[web.Request] = []
    window_full = asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        arrived.append(request)
        if len(arrived) == INITIAL_WINDOW:  # every place in the window taken by a request the app holds
            window_full.set()
        await release.wait()
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/", held)
    p = await proxied(app, timeouts={"queue": 0.3})

    async def get(headers: dict[str, str]) -> tuple[int, str, str, str | None]:
        async with p.request("GET", "/", headers=headers) as response:
            return response.status, response.content_type, await response.text(), response.headers.get("Retry-After")

    holders = [asyncio.ensure_future(get(API)) for _ in range(INITIAL_WINDOW)]
    try:
        async with asyncio.timeout(30):
            await window_full.wait()
            for headers, kind in ((API, "application/json"), (BROWSER, "text/html")):
                status, content_type, body, retry_after = await get(headers)
                assert (status, content_type, retry_after) == (503, kind, "5")
                assert "is busy" in body
                for trace in NO_TRACES:
                    assert trace not in body
            assert '"upstream-busy"' in (await get(API))[2]
            assert not any(holder.done() for holder in holders)
            release.set()
            assert [status for status, *_ in await asyncio.gather(*holders)] == [200] * INITIAL_WINDOW
    finally:
        release.set()
        await asyncio.gather(*holders, return_exceptions=True)


async def test_a_silent_upstream_is_not_asked_again_by_the_other_lane(proxied: MakeProxied) -> None:
    """The fast lane's request to a silent upstream times out once: the pool's one retry of an idempotent request
    that got no first byte (issue 18) makes two attempts, and the hand-over to aiohttp carries the 504 instead
    of the request (it used to send it again: four attempts, twice the wait)."""
    never = asyncio.Event()
    seen: list[str] = []

    async def silent(request: web.Request) -> web.Response:
        seen.append(request.path)
        await never.wait()
        return web.Response()

    app = web.Application()
    app.router.add_get("/silent", silent)
    p = await proxied(app, timeouts={"first_byte": 0.3, "read": 0.3})
    async with asyncio.timeout(30), p.request("GET", "/silent", headers=API) as response:
        assert response.status == 504
        assert (await response.json())["error"]["code"] == "upstream-timeout"
    assert seen == ["/silent", "/silent"]


@pytest.mark.parametrize(
    ("host", "path", "status", "code"),
    [
        ("3000-nope.localhost:8080", "/", 404, "workspace-not-found"),
        ("bad_host!", "/", 400, "bad-host"),
        ("abc-ws1.localhost:8080", "/", 400, "bad-preview-host"),
        ("70000-ws1.localhost:8080", "/", 400, "bad-port"),
        ("3000-ws1.elsewhere.test", "/", 404, "unknown-host"),
        ("6000-ws1.localhost:8080", "/", 403, "port-denied"),
        ("{ide}-ws1.localhost:8080", "/", 403, "port-denied"),
        ("ide-nope.localhost:8080", "/", 404, "workspace-not-found"),
        ("localhost:8080", "/w/BAD/", 404, "workspace-not-found"),
        ("localhost:8080", "/no/such/page", 404, "no-route"),
        ("3000-ws1.localhost:8080", "/_codehub/nothing", 404, "no-route"),
    ],
)
async def test_refusals(proxied: MakeProxied, host: str, path: str, status: int, code: str) -> None:
    p = await proxied(None, policy={"ports": {"denied": [6000]}})
    ide = p.gateway.runtime.get("ws1")
    assert ide is not None
    host = host.format(ide=ide.spec.ide_port)
    async with p.request("GET", path, host=host, headers=API) as response:
        assert response.status == status
        await assert_clean(response)
        assert (await response.json())["error"]["code"] == code
    async with p.request("GET", path, host=host, headers=BROWSER) as response:
        assert response.status == status
        assert response.content_type == "text/html"
        assert code in await assert_clean(response)


async def test_hub_method_not_allowed_is_a_clean_405(proxied: MakeProxied) -> None:
    p = await proxied(None)
    async with p.request("POST", "/healthz", host="localhost:8080") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "GET,HEAD"
        await assert_clean(response)


async def test_upstream_breaking_off_before_answering_is_a_502(proxied: MakeProxied) -> None:
    async def hang_up(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.abort()
        raise web.HTTPOk()

    app = web.Application()
    app.router.add_route("*", "/", hang_up)
    p = await proxied(app)
    async with p.request("GET", "/", headers=API) as response:
        assert response.status == 502
        await assert_clean(response)
        assert (await response.json())["error"]["code"] == "upstream-error"


@pytest.mark.parametrize(
    ("method", "headers", "page"),
    [
        ("GET", {"Accept": "text/html"}, True),
        ("GET", {"Accept": "*/*"}, False),
        ("GET", {}, False),
        ("GET", {"Sec-Fetch-Mode": "navigate"}, True),  # what a browser's navigation says, whatever it accepts
        ("GET", {"Sec-Fetch-Mode": "cors", "Accept": "text/html"}, False),  # fetch() asking for HTML: a script
        ("GET", {"Sec-Fetch-Mode": "no-cors", "Accept": "text/html"}, False),
        ("POST", {"Accept": "text/html"}, False),  # a form a script posts, without Sec-Fetch-Mode
        ("POST", {"Sec-Fetch-Mode": "navigate", "Accept": "text/html"}, True),  # a form a person submits
        ("HEAD", {"Accept": "text/html"}, True),
        ("GET", {"Accept": "text/html", "Authorization": "Bearer x"}, False),  # a script with a token
        ("GET", {"Accept": "text/html", "X-Requested-With": "XMLHttpRequest"}, False),
    ],
)
async def test_a_page_for_a_browser_navigating_json_for_everyone_else(proxied: MakeProxied, method: str,
                                                                      headers: dict[str, str], page: bool) -> None:
    """Which of the two an error is told in goes by what the request says of itself: Sec-Fetch-Mode where a
    browser sends it; otherwise a GET or HEAD that accepts HTML and carries no token and no XHR marker."""
    p = await proxied(None)
    async with p.request(method, "/no/such/page", host="localhost:8080", headers=headers) as response:
        assert response.status == 404
        assert response.content_type == ("text/html" if page else "application/json")
        assert response.headers["Cache-Control"] == "no-store"
        if method != "HEAD":
            body = await assert_clean(response)
            assert "no-route" in body
            assert body.startswith("{") is not page


async def test_the_management_api_answers_in_json_even_to_a_navigation(proxied: MakeProxied) -> None:
    """A person who opens an API URL in the address bar reads the same JSON a script gets."""
    p = await proxied(None)
    async with p.request("GET", "/api/v1/me", host="localhost:8080", headers=NAVIGATION) as response:
        assert response.status == 401
        assert response.content_type == "application/json"
        assert (await response.json())["error"]["code"] == "user-unauthenticated"

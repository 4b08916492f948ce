"""The owner's mark (``plan._name_reused``) as a client meets it, through the lanes: set beside the app's own
cookies on the answer to a service worker's script, never by the app, and a browser coming back with another
owner's mark refused without reaching the app (the plan's decisions: ``tests/edge/test_plan.py``; a former owner's
worker in real Chromium: ``tests/browser/test_browser_attacks.py``)."""

from __future__ import annotations

import pytest
from aiohttp import web

from tests.server.conftest import MakeProxied


@pytest.mark.parametrize("method", ["GET", "POST"], ids=["fast-lane", "aiohttp-lane"])
async def test_the_owner_mark_is_the_gateways_beside_the_apps_cookies_and_another_is_refused_before_the_app(
        proxied: MakeProxied, method: str) -> None:
    seen: list[str] = []

    async def app_page(request: web.Request) -> web.Response:
        await request.read()
        seen.append(request.headers.get("Cookie", ""))
        response = web.Response(text="self.addEventListener('fetch', () => {});", content_type="text/javascript")
        response.headers.add("Set-Cookie", "app=1; Path=/")
        response.headers.add("Set-Cookie", "codehub_owner=forged; Path=/")  # the app cannot set the gateway's
        return response

    app = web.Application()
    app.router.add_route("*", "/sw.js", app_page)
    p = await proxied(app)
    body = b"x" if method == "POST" else None  # a body: the request is handed to aiohttp
    worker = {"Service-Worker": "script", "Sec-Fetch-Dest": "serviceworker"}
    async with p.request(method, "/sw.js", headers=worker, data=body) as response:
        assert response.status == 200
        cookies = response.headers.getall("Set-Cookie")
    assert cookies[0] == "app=1; Path=/", cookies
    (mark,) = [cookie for cookie in cookies if cookie.startswith("codehub_owner=")]
    assert mark != "codehub_owner=forged; Path=/"
    assert "HttpOnly" in mark, mark
    assert "Domain" not in mark, mark
    pair = mark.partition(";")[0]
    jar = p.client.session.cookie_jar
    jar.clear()  # each request below says which cookies it carries
    # Marked: nothing set again, and the app never sees the mark.
    async with p.request(method, "/sw.js", headers={**worker, "Cookie": f"{pair}; app=1"}, data=body) as response:
        assert response.status == 200
        assert [c for c in response.headers.getall("Set-Cookie") if c.startswith("codehub_owner")] == []
    jar.clear()
    assert seen == ["", "app=1"], seen
    # Another owner's mark (here one no owner had): refused, told to drop what it kept, given this owner's mark.
    for headers in (worker, {"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}, {}):
        async with p.request(method, "/sw.js", headers={**headers, "Cookie": "codehub_owner=another"},
                             data=body) as response:
            jar.clear()
            assert response.status == 409, await response.text()
            assert response.headers["Clear-Site-Data"] == '"cache", "storage"'
            assert response.headers.getall("Set-Cookie") == [mark], response.headers.getall("Set-Cookie")
    assert len(seen) == 2

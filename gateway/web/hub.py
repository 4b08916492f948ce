"""The hub's own pages and their live feed: workspaces with their ports, controls and share links; API tokens.

The page renders from the same views the API returns, then follows ``/api/v1/hub/events`` (Server-Sent Events): a
new snapshot whenever a workspace changes phase, a dev server starts or stops listening, a label or a share link
changes, so a port opened in a terminal shows up without a reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import segno
from aiohttp import web

from gateway.auth.identity import Identity
from gateway.auth.store import StoreUnavailable
from gateway.edge.routing import Kind, route
from gateway.errors import BadRequest, GatewayError, Unauthorized
from gateway.server.context import GATEWAY, Gateway
from gateway.web import api
from gateway.web.auth_routes import hub_identity

STATIC = Path(__file__).with_name("static")
LOOK_EVERY = 0.5
"""Seconds between looks at what is not pushed (listening ports are read from /proc, share links from the store)."""
KEEPALIVE = 15.0
HUB_PAGE = 50
"""Workspaces per hub page: an admin or a team lead may see thousands, each with its ports and share links."""


@dataclass(frozen=True, slots=True)
class _Look:
    at: float
    published: int
    data: str


_Looks = dict[tuple[Identity, int, str | None], _Look]
_LOOKS = web.AppKey("codehub_hub_looks", _Looks)
"""The last look each person's feeds took at a page, shared by those feeds: see ``_look``."""


def _look(gateway: Gateway, looks: _Looks, identity: Identity, page: tuple[int, str | None]) -> str:
    """The page's snapshot as a feed sends it. Feeds of one person and page share a look taken less than
    ``LOOK_EVERY`` ago with no lifecycle event since: else each feed built the whole snapshot twice a second, and a
    dozen feeds of one person (1,000 share links of 10 people: 36 ms a build) kept a worker's loop busy for
    everyone's previews."""
    key = (identity, *page)
    now = time.monotonic()
    published = gateway.runtime.hub.published
    look = looks.get(key)
    if look is not None and look.published == published and now - look.at < LOOK_EVERY:
        return look.data
    data = json.dumps(snapshot(gateway, identity, *page))
    if len(looks) >= 256:  # the looks that can still be shared are the ones taken since the last LOOK_EVERY
        for old in [old for old, taken in looks.items() if now - taken.at >= LOOK_EVERY]:
            del looks[old]
    looks[key] = _Look(now, published, data)
    return data


def snapshot(gateway: Gateway, identity: Identity, limit: int = HUB_PAGE, after: str | None = None) -> dict[str, Any]:
    """What the hub page shows for one person, as the API would answer it: a page of workspaces (as
    ``GET /api/v1/workspaces`` pages them) with each one's share links, and the person's consent answers."""
    page = api.page_of(gateway, identity, limit, after)
    for view in page["workspaces"]:
        state = gateway.runtime.get(view["id"])
        links = api.links_of(gateway, state.spec) if state is not None else []
        view["shares"] = [api.share_view(gateway, link) for link in links]
    return {**page, "cursor": api.cursor_of(after), "consents": api.consents_of(gateway, identity)}


def _page_settings(gateway: Gateway) -> dict[str, Any]:
    rules = gateway.policy.share_links
    return {"audiences": list(rules.audiences), "max_visibility": gateway.policy.ports.max_visibility,
            "port_url": gateway.hosts.share_url("{workspace}", "{port}")}


@aiohttp_jinja2.template("home.html")
async def home(request: web.Request) -> dict[str, object]:
    """The hub page: the signed-in user's workspaces, live."""
    gateway = request.app[GATEWAY]
    identity = hub_identity(request, gateway)
    dev = gateway.config.auth.mode == "dev"
    if identity is None:
        return {"identity": None, "dev": dev}
    data = snapshot(gateway, identity, *api.asked_page(request, HUB_PAGE))
    return {"identity": identity, "dev": dev, "data": {**data, **_page_settings(gateway)}}


@aiohttp_jinja2.template("tokens.html")
async def tokens_page(request: web.Request) -> dict[str, object]:
    """API tokens for scripts and the CLI: create (shown once), list, revoke."""
    gateway = request.app[GATEWAY]
    identity = hub_identity(request, gateway)
    if identity is None:
        return {"identity": None, "dev": gateway.config.auth.mode == "dev"}
    tokens = [t.public() for t in gateway.auth.store.api_tokens.values() if t.subject == identity.subject]
    return {"identity": identity, "tokens": sorted(tokens, key=lambda t: -t["created"]),
            "hub": gateway.hosts.hub_url("")}


async def snapshot_now(request: web.Request) -> web.Response:
    """The same snapshot at once, for the page right after a change it made."""
    return web.json_response(snapshot(request.app[GATEWAY], api.caller(request), *api.asked_page(request, HUB_PAGE)))


async def events(request: web.Request) -> web.StreamResponse:
    """The hub page's feed: ``snapshot`` events, each sent only when it differs from the one before."""
    identity = api.caller(request)
    gateway = request.app[GATEWAY]
    page = api.asked_page(request, HUB_PAGE)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"})
    await response.prepare(request)
    if request.method == "HEAD":  # the head only: events written after it would be read as the next answer on
        return response  # the connection (by a proxy in front, for whoever's request it carries next)
    last = ""
    quiet_since = time.monotonic()
    with gateway.runtime.events() as changes, contextlib.suppress(ConnectionResetError):
        while api.still_signed_in(request):  # a sign-out or a revoke ends it; the reconnect is refused
            try:
                data = _look(gateway, request.app[_LOOKS], identity, page)
            except StoreUnavailable:  # for now: the page keeps what it shows, and a browser's EventSource, which
                data = last  # gives up for good on an error answer, stays open for when the store can be read
            if data != last:
                await response.write(f"event: snapshot\ndata: {data}\n\n".encode())
                last, quiet_since = data, time.monotonic()
            elif time.monotonic() - quiet_since > KEEPALIVE:
                await response.write(b": still here\n\n")
                quiet_since = time.monotonic()
            with contextlib.suppress(TimeoutError):  # asyncio.timeout: a cancel is never lost to a ready item
                async with asyncio.timeout(LOOK_EVERY):
                    await changes.queue.get()
    return response


async def qr_code(request: web.Request) -> web.Response:
    """A QR code (SVG) of one of this gateway's share URLs, to open a preview on a phone."""
    gateway = request.app[GATEWAY]
    if hub_identity(request, gateway) is None:
        raise Unauthorized("Sign in to make QR codes.", code="user-unauthenticated")
    url = request.query.get("url", "")
    scheme, _, rest = url.partition("://")
    host, _, path = rest.partition("/")
    try:
        target = route(host, "/" + path, gateway.hosts)
    except GatewayError:
        target = None
    if scheme != gateway.hosts.scheme or target is None or target.kind is not Kind.PREVIEW or len(url) > 1000:
        raise BadRequest("QR codes are made only for this gateway's share URLs.", code="bad-qr-url")
    buffer = io.BytesIO()
    segno.make(url, error="m").save(buffer, kind="svg", scale=4, dark="#000", light="#fff", border=2)
    return web.Response(body=buffer.getvalue(), content_type="image/svg+xml",
                        headers={"Cache-Control": "private, max-age=3600"})


def add_routes(app: web.Application) -> None:
    app[_LOOKS] = {}
    app.router.add_get("/", home)
    app.router.add_get("/tokens", tokens_page)
    app.router.add_get("/qr.svg", qr_code)
    app.router.add_get("/api/v1/hub/snapshot", api.json_only(snapshot_now))
    app.router.add_get("/api/v1/hub/events", api.json_only(events))
    app.router.add_static("/static/", STATIC, name="static", append_version=True)

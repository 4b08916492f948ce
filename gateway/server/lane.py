"""aiohttp's lane: executes any plan (``gateway.edge.plan``), for requests the fast lane does not serve.

Nothing is decided here. A request arrives with the plan the fast lane made before handing it over, or gets one
made now; this module carries out the plan's effects and does what it says: proxy (with a body, or a WebSocket),
hold until a wake is done, show a page, refuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.accesslog import USER, log_text
from gateway.edge.plan import (
    Effect,
    Facts,
    Forward,
    GatewayPage,
    Granted,
    Hold,
    Page,
    Plan,
    Preflight,
    RecordDecision,
    Redirect,
    Refuse,
    UseShare,
    UseToken,
    WaitingPage,
    grant_facts,
    plan,
    still_granted,
)
from gateway.errors import GatewayError
from gateway.lifecycle.wake import progress_events
from gateway.proxy.upstream import WAKE_CONNECT_GRACE, Upstream
from gateway.server.context import Gateway
from gateway.server.forward import proxy_http
from gateway.server.websocket import relay_websocket
from gateway.web.auth_routes import preview_callback, preview_popup

log = logging.getLogger("codehub.policy")


def peer_address(transport: asyncio.BaseTransport | None) -> str:
    peer = transport.get_extra_info("peername") if transport is not None else None
    return peer[0] if peer else "0.0.0.0"


def facts_of(request: web.BaseRequest) -> Facts:
    return Facts(request.method, request.raw_path, request.headers, peer_address(request.transport), time.time())


def plan_for(request: web.BaseRequest, gateway: Gateway) -> Plan:
    """The plan the fast lane handed over with this connection's first request, else a new one."""
    transport = request.transport
    handed = gateway.handed.pop(transport, None) if transport is not None else None
    if handed is not None:
        return handed
    return plan(facts_of(request), gateway)


def granted(gateway: Gateway, facts: Facts, forward: Forward) -> Callable[[], bool]:
    """Whether ``forward`` still holds: ``facts`` planned again now (a WebSocket's relay asks on every heartbeat
    tick, a streamed answer through ``AnswerGrant``). A bug in that ends the exchange (once, with its traceback)
    rather than stop the heartbeat."""
    was, kept = Granted.of(forward), grant_facts(facts, gateway.secure)

    def holds() -> bool:
        try:
            if still_granted(kept, was, gateway, time.time()):
                return True
        except Exception:
            log.exception("re-checking an open exchange's grant failed; ending it")
            return False
        log.info("ended an open exchange with %s port %s: what let it in no longer does", was.workspace, was.port)
        return False

    return holds


class AnswerGrant:
    """Whether a streamed answer may go on, asked on its pieces: from half a heartbeat period after it began and at
    most once per that, as often as a WebSocket asks. What it asks with (``granted``) is made at the first asking,
    so an answer that ends sooner, as nearly all do, costs this object only."""

    __slots__ = ("_due", "_every", "_facts", "_forward", "_gateway", "_holds")

    def __init__(self, gateway: Gateway, facts: Facts, forward: Forward) -> None:
        self._gateway, self._facts, self._forward = gateway, facts, forward
        self._every = gateway.heartbeat.period / 2
        self._due = time.monotonic() + self._every
        self._holds: Callable[[], bool] | None = None

    def __call__(self) -> bool:
        now = time.monotonic()
        if now < self._due:
            return True
        self._due = now + self._every
        if self._holds is None:
            self._holds = granted(self._gateway, self._facts, self._forward)
        return self._holds()


def carry_out(effects: Iterable[Effect], gateway: Gateway) -> None:
    """What a plan asks for once it is acted on, by whichever lane acts on it."""
    for effect in effects:
        if isinstance(effect, RecordDecision):  # every plan past routing has one: asked first
            decision, target, identity = effect.decision, effect.target, effect.identity
            gateway.metrics.decision(decision.allow, decision.reason)
            if not decision.allow:
                log.info("deny %s port %s for %s: %s (%s)", target.workspace, target.port,
                         log_text(identity.subject) if identity else "anonymous", decision.reason.value,
                         decision.rule)
        elif isinstance(effect, UseShare):
            gateway.auth.store.use_share(effect.link, effect.at)
        elif isinstance(effect, UseToken):
            gateway.auth.store.use_api_token(effect.token, effect.at)


async def execute(request: web.Request, plan_: Plan, gateway: Gateway, hub: Handler) -> web.StreamResponse:
    """Do what the plan says; a ``GatewayError`` raised on the way is the caller's to render."""
    carry_out(plan_.effects, gateway)
    if plan_.user is not None:
        request[USER] = plan_.user
    if isinstance(plan_, (Refuse, Redirect)):
        raise plan_.error
    if isinstance(plan_, Preflight):
        return web.Response(status=204, headers=plan_.headers)
    if isinstance(plan_, GatewayPage):
        return await _gateway_page(request, plan_, gateway, hub)
    if isinstance(plan_, WaitingPage):
        raise gateway.waker.waiting_page(plan_.state, plan_.port, explained=plan_.explained)
    if isinstance(plan_, Hold):
        with in_use(gateway, plan_.forward):  # held, it is in use as its proxied request would be
            awake = await _awake(request, plan_, gateway)
        if awake is None:  # what let it in no longer does: served as a request sent now (a sign-in, a refusal)
            request.pop(USER, None)
            return await execute(request, plan(facts_of(request), gateway), gateway, hub)
        forward, held = awake, True
    else:
        forward, held = plan_, False
    try:
        return await _forward(request, forward, gateway, connect_grace(gateway, forward, held=held))
    except GatewayError as exc:
        exc.headers.update(forward.on_error)
        raise


async def _awake(request: web.Request, held: Hold, gateway: Gateway) -> Forward | None:
    """A held request's way on once its workspace is awake (to the address it woke at), or ``None`` if what let it
    in no longer does: it waited seconds, up to ``start_timeout``, and a sign-out or a revoked link meanwhile must
    hold for it as for an open WebSocket."""
    forward = held.forward
    try:
        state = await gateway.waker.hold(held.state, forward.port, explained=held.explained)
    except GatewayError as exc:
        exc.headers.update(forward.on_error)
        raise
    facts = facts_of(request)
    if still_granted(facts, Granted.of(forward), gateway, facts.now):
        return dataclasses.replace(forward, address=state.address)
    log.info("a request held through a wake of %s port %s is no longer let in there", forward.workspace, forward.port)
    return None


def in_use(gateway: Gateway, forward: Forward) -> contextlib.AbstractContextManager[None]:
    """In use for as long as a request or WebSocket is open (a long poll or SSE feed keeps its workspace awake), held
    on a wake too: a wait for a port of a running workspace keeps nothing awake by itself (anyone who may see the
    port can begin one), so the requests held on it keep it awake for whoever keeps it awake."""
    return gateway.activity.connection(forward.workspace) if forward.keeps_awake else contextlib.nullcontext()


def connect_grace(gateway: Gateway, forward: Forward, *, held: bool = False) -> float:
    """How long refused connects are retried (``ConnectGrace``): through a wake, and just after one (a dev server
    such as Vite may accept on a throwaway listener first), in either lane."""
    return WAKE_CONNECT_GRACE if held or gateway.waker.settling(forward.workspace, forward.port) else 0.0


def upstream_of(forward: Forward) -> Upstream:
    assert forward.address is not None
    return Upstream(forward.workspace, forward.address, forward.port, forward.public_origin, tls=forward.tls)


async def _forward(request: web.Request, forward: Forward, gateway: Gateway, grace: float) -> web.StreamResponse:
    upstream = upstream_of(forward)
    with in_use(gateway, forward):
        if forward.websocket:
            return await relay_websocket(
                request, upstream, forward.path, forward.headers, max_message=gateway.config.max_ws_message,
                heartbeat=gateway.heartbeat, timeouts=gateway.config.timeouts, metrics=gateway.metrics,
                connect_grace=grace, granted=granted(gateway, facts_of(request), forward),
            )
        return await proxy_http(request, gateway.pool, upstream, forward.path, forward.headers,
                                metrics=gateway.metrics, connect_grace=grace, rules=forward.rules,
                                send_timeout=gateway.config.limits.send_timeout,
                                still=AnswerGrant(gateway, facts_of(request), forward))


async def _gateway_page(request: web.Request, page: GatewayPage, gateway: Gateway, hub: Handler) -> web.StreamResponse:
    if page.page is Page.HUB:
        return await hub(request)
    if page.page is Page.AUTH_CALLBACK:
        return await preview_callback(request, gateway, page.host, cross_site=page.cross_site)
    if page.page is Page.AUTH_POPUP:
        return await preview_popup(request)
    assert page.page is Page.WAKE_EVENTS
    assert page.state is not None
    assert page.port is not None
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"})
    await response.prepare(request)
    if request.method == "HEAD":  # as ``hub.events``: a head has no body, and events after it would be read as
        return response  # the next answer on the connection
    async for event in progress_events(gateway.waker, page.state, page.port, explained=page.explained):
        await response.write(event)
    await response.write_eof()
    return response

"""The request path for workspace traffic, one way through:
route → authenticate → authorize → ensure awake → proxy → record activity.

The decisions (``authorize``, ``forward``, ``response_rules``, ``in_use``) take method and headers, not an aiohttp
request: ``fastlane`` serves plain requests with these same functions and hands everything else to this path."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import cors
from gateway.accesslog import USER
from gateway.auth.authenticate import Credentials, authenticate, sign_in_redirect, stale_share_refusal
from gateway.auth.handlers import preview_callback, preview_popup
from gateway.auth.identity import Identity
from gateway.context import Gateway
from gateway.errors import Forbidden, GatewayError, NotFound, Redirect
from gateway.lifecycle import Phase, WorkspaceState
from gateway.pages import wants_html
from gateway.policy import Decision, Reason, decide, denial, may_wake
from gateway.proxy.headers import ClientFacts, Headers, ResponseRules, upstream_request_headers
from gateway.proxy.http import proxy_http
from gateway.proxy.upstream import WAKE_CONNECT_GRACE, Upstream
from gateway.proxy.websocket import relay_websocket
from gateway.routing import Kind, Target, normalise_host
from gateway.wake import stream_progress

log = logging.getLogger("codehub.policy")
HUB_RULES = ResponseRules(cors.HUB_FRAME_HEADERS)
_MEMBERS = (Reason.OWNER, Reason.COLLABORATOR, Reason.ADMIN)


def is_websocket(request: web.BaseRequest) -> bool:
    return request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket"


def peer_address(transport: asyncio.BaseTransport | None) -> str:
    peer = transport.get_extra_info("peername") if transport is not None else None
    return peer[0] if peer else "0.0.0.0"


def client_facts(peer: str, headers: Headers, gateway: Gateway) -> ClientFacts:
    trusted = bool(gateway.trusted_proxies) and any(
        ipaddress.ip_address(peer) in network for network in gateway.trusted_proxies)
    return ClientFacts(peer=peer, scheme=gateway.hosts.scheme, public_host=headers.get("Host", ""), trusted=trusted)


def _workspace(gateway: Gateway, target: Target) -> WorkspaceState:
    assert target.workspace is not None
    state = gateway.runtime.get(target.workspace)
    if state is None:
        raise NotFound(f"There is no workspace called {target.workspace}.", code="workspace-not-found")
    return state


def _host(headers: Headers, gateway: Gateway) -> str:
    host = normalise_host(headers.get("Host", ""), gateway.hosts.scheme)
    assert host is not None, "routing accepted the host"
    return host


def authorize(gateway: Gateway, target: Target, state: WorkspaceState, method: str,
              headers: CIMultiDictProxy[str]) -> tuple[Credentials, Decision]:
    """Who is calling and whether they may (and, when it sleeps, may wake it): the one decision both lanes use.
    Recording it (``record``) is the caller's, once it acts on it."""
    preview = target.kind is not Kind.IDE
    auth = gateway.auth
    credentials = authenticate(method, headers, target.path, _host(headers, gateway), sessions=auth.sessions,
                               store=auth.store, secure=gateway.config.secure, preview=preview)
    decision = decide(gateway.policy, state.spec, target.port if preview else None, credentials.identity,
                      credentials.grant)
    if decision.allow and state.phase is not Phase.RUNNING:
        decision = may_wake(gateway.policy, decision)
    return credentials, decision


def _check(request: web.Request, gateway: Gateway, target: Target, state: WorkspaceState) -> Credentials:
    """Authenticate and authorize; a refusal becomes a sign-in redirect for browsers, else 401/403."""
    preview = target.kind is not Kind.IDE
    if not preview and is_websocket(request):
        _check_websocket_origin(request, gateway)  # before anything else: a hijack attempt must not even wake it
    credentials, decision = authorize(gateway, target, state, request.method, request.headers)
    record(gateway, target, credentials.identity, decision)
    if credentials.identity is not None:
        request[USER] = credentials.identity.subject
    if decision.allow:
        return credentials
    stale = stale_share_refusal(credentials, gateway.config.secure)
    if stale is not None:
        raise stale
    if decision.reason is Reason.USER_UNAUTHENTICATED and request.method in ("GET", "HEAD") and wants_html(request):
        path = credentials.path if preview else request.raw_path
        public_url = f"{gateway.hosts.scheme}://{request.headers['Host']}{path}"
        raise sign_in_redirect(request, public_url, gateway.hosts.hub_url(""), preview=preview,
                               secure=gateway.config.secure)
    error = denial(decision)
    if error.status == 401:
        error.headers["WWW-Authenticate"] = 'Bearer realm="codehub"'
    raise error


def record(gateway: Gateway, target: Target, identity: Identity | None, decision: Decision) -> None:
    gateway.metrics.decision(decision.allow, decision.reason.value)
    if not decision.allow:
        log.info("deny %s port %s for %s: %s (%s)", target.workspace, target.port,
                 identity.subject if identity else "anonymous", decision.reason.value, decision.rule)


def _identity_headers(gateway: Gateway, identity: Identity | None, audience: str) -> dict[str, str]:
    if identity is None:
        return {}
    return {
        "X-Forwarded-User": identity.subject,
        "X-Forwarded-Email": identity.email,
        "X-Forwarded-Groups": ",".join(identity.groups),
        "X-Codehub-Assertion": gateway.auth.sessions.assertion(identity, audience),
    }


async def serve_reserved(request: web.Request, target: Target, gateway: Gateway) -> web.StreamResponse:
    """Paths under ``/_codehub/`` on a preview host belong to the gateway, never to the app."""
    path = target.path.partition("?")[0]
    if path == "/_codehub/auth/callback":
        assert target.port is not None
        rule = cors.rule_for(gateway.policy, target.port)
        cross_site = rule is not None and rule.mode == "replace" and rule.allow_credentials
        return await preview_callback(request, gateway, _host(request.headers, gateway), cross_site=cross_site)
    if path == "/_codehub/auth/popup":
        return await preview_popup(request)
    state = _workspace(gateway, target)
    if path == "/_codehub/wake/events":
        _check(request, gateway, target, state)
        assert target.port is not None
        return await stream_progress(request, gateway.waker, state, target.port)
    raise NotFound("There is nothing at this address.", code="no-route")


def response_rules(headers: Headers, gateway: Gateway, target: Target, state: WorkspaceState) -> ResponseRules:
    """Framing policy on every preview response; CORS answers where the port's rule replaces the app's."""
    if target.kind is not Kind.PREVIEW:
        return HUB_RULES
    policy = gateway.policy
    replace = {"Content-Security-Policy": cors.frame_ancestors(policy)}
    rule = cors.rule_for(policy, target.port) if target.port is not None else None
    drop_cors = rule is not None and rule.mode == "replace"
    origin = headers.get("Origin")
    if drop_cors and rule is not None and origin and cors.origin_allowed(rule, origin, state.spec, gateway.hosts,
                                                                         _owner_of(gateway)):
        replace.update(cors.response_headers(rule, origin))
    return ResponseRules(replace, drop_cors=drop_cors, drop_frame_options=bool(policy.embedding.frame_ancestors))


def _owner_of(gateway: Gateway) -> Callable[[str], str | None]:
    def owner(workspace: str) -> str | None:
        state = gateway.runtime.get(workspace)
        return state.spec.owner if state is not None else None

    return owner


def _preflight(request: web.Request, gateway: Gateway, target: Target, state: WorkspaceState) -> web.Response | None:
    """Answer a CORS preflight from policy, before any credentials are asked for (browsers never send them)."""
    assert target.port is not None
    rule = cors.rule_for(gateway.policy, target.port)
    if rule is None or rule.mode == "passthru":
        return None
    origin = request.headers["Origin"]
    if not cors.origin_allowed(rule, origin, state.spec, gateway.hosts, _owner_of(gateway)):
        raise Forbidden(f"Cross-origin requests from {origin} are not allowed by policy.", code="cors-origin-denied")
    headers = cors.preflight_headers(rule, origin, request.headers.get("Access-Control-Request-Headers", ""))
    return web.Response(status=204, headers=headers)


def _refusal_cors(request: web.Request, gateway: Gateway, target: Target) -> dict[str, str]:
    """CORS headers for the gateway's own refusals (401, 403, 503…) to an origin the port's rule admits, so a
    front end can read why its call failed (e.g. "sign in on the API host") instead of an opaque network error."""
    origin = request.headers.get("Origin")
    state = gateway.runtime.get(target.workspace) if target.workspace is not None else None
    rule = cors.rule_for(gateway.policy, target.port) if target.port is not None else None
    if not origin or state is None or rule is None or rule.mode != "replace":
        return {}
    if not cors.origin_allowed(rule, origin, state.spec, gateway.hosts, _owner_of(gateway)):
        return {}
    return cors.response_headers(rule, origin)


async def serve_workspace(request: web.Request, target: Target, gateway: Gateway) -> web.StreamResponse:
    try:
        return await _serve_workspace(request, target, gateway)
    except GatewayError as exc:
        if target.kind is Kind.PREVIEW and not isinstance(exc, Redirect):
            exc.headers.update(_refusal_cors(request, gateway, target))
        raise


async def _serve_workspace(request: web.Request, target: Target, gateway: Gateway) -> web.StreamResponse:
    state = _workspace(gateway, target)
    preflight = target.kind is Kind.PREVIEW and cors.is_preflight(request.method, request.headers)
    if preflight and (answer := _preflight(request, gateway, target, state)) is not None:
        return answer
    if preflight and target.port is not None and cors.rule_for(gateway.policy, target.port) is not None:
        # passthru: the app answers its own preflights, which never carry credentials.
        credentials = Credentials(None, None, None, False, target.path)
    else:
        credentials = _check(request, gateway, target, state)
    port = upstream_port(target, state)
    held = state.phase is not Phase.RUNNING or gateway.waker.busy(state.id, port)
    state = await gateway.waker.ensure_awake(request, state, port)
    grace = WAKE_CONNECT_GRACE if held else 0.0
    facts = client_facts(peer_address(request.transport), request.headers, gateway)
    upstream, headers = forward(gateway, target, state, port, credentials, request.headers, facts)
    # In use for as long as a request or WebSocket is open (a long poll or SSE feed keeps its workspace awake).
    with in_use(gateway, state, credentials.identity):
        if is_websocket(request):
            return await _relay(request, gateway, upstream, credentials.path, headers, grace)
        return await proxy_http(request, gateway.pool, upstream, credentials.path, headers, metrics=gateway.metrics,
                                connect_grace=grace, rules=response_rules(request.headers, gateway, target, state))


def upstream_port(target: Target, state: WorkspaceState) -> int:
    port = target.port if target.kind is Kind.PREVIEW else state.spec.ide_port
    assert port is not None
    return port


def forward(gateway: Gateway, target: Target, state: WorkspaceState, port: int, credentials: Credentials,
            headers: Headers, facts: ClientFacts) -> tuple[Upstream, CIMultiDict[str]]:
    """Where an allowed request goes, and the headers it goes with."""
    assert state.address is not None
    if target.kind is Kind.IDE:
        public_origin, prefix = gateway.hosts.hub_url(""), f"/w/{state.id}"
    else:
        public_origin, prefix = gateway.hosts.share_url(state.id, port, ""), ""
    upstream = Upstream(state.id, state.address, port, public_origin, prefix, tls=port in state.spec.https_ports)
    sent = upstream_request_headers(
        headers, facts, upstream_host=upstream.host_header, prefix=prefix or None,
        strip_authorization=credentials.consumed_authorization,
        identity=_identity_headers(gateway, credentials.identity, public_origin),
    )
    return upstream, sent


def in_use(gateway: Gateway, state: WorkspaceState,
           identity: Identity | None) -> contextlib.AbstractContextManager[None]:
    """Visitors keep a workspace awake unless the policy says only its members do."""
    if gateway.policy.wake.visitors_keep_awake or _is_member(gateway, state, identity):
        return gateway.activity.connection(state.id)
    return contextlib.nullcontext()


def _is_member(gateway: Gateway, state: WorkspaceState, identity: Identity | None) -> bool:
    return identity is not None and decide(gateway.policy, state.spec, None, identity).reason in _MEMBERS


def _check_websocket_origin(request: web.Request, gateway: Gateway) -> None:
    """Cross-site WebSocket hijacking: a browser on another site must not drive the IDE with our cookie."""
    origin = request.headers.get("Origin")
    if origin is not None and origin.rstrip("/") != gateway.hosts.hub_url(""):
        raise Forbidden("WebSocket connections to the IDE must come from the hub itself.",
                        code="cross-site-websocket")


async def _relay(request: web.Request, gateway: Gateway, upstream: Upstream, path: str,
                 headers: CIMultiDict[str], grace: float) -> web.StreamResponse:
    return await relay_websocket(
        request, upstream, path, headers, max_message=gateway.config.max_ws_message, heartbeat=gateway.heartbeat,
        timeouts=gateway.config.timeouts, metrics=gateway.metrics, connect_grace=grace,
    )

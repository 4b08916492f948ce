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

from gateway.accesslog import USER, log_text
from gateway.auth.authenticate import Credentials, authenticate, sign_in_redirect, stale_share_refusal
from gateway.auth.ide import put_ide_cookie, secret_for
from gateway.auth.identity import Identity
from gateway.auth.store import Consent
from gateway.edge import cors
from gateway.edge.disclosure import CONSENT_PATH, ConsentPage, consent_pending, disclosed, identity_headers
from gateway.edge.policy import Decision, Reason, decide, denial, may_wake, membership
from gateway.edge.routing import Kind, Target, local_path, normalise_host
from gateway.errors import BadRequest, Forbidden, GatewayError, NotFound, Redirect
from gateway.lifecycle import Phase, WorkspaceState
from gateway.lifecycle.wake import stream_progress
from gateway.proxy.headers import ClientFacts, Headers, ResponseRules, upstream_request_headers
from gateway.proxy.upstream import WAKE_CONNECT_GRACE, Upstream
from gateway.server.context import Gateway
from gateway.server.forward import proxy_http
from gateway.server.websocket import relay_websocket
from gateway.web.auth_routes import preview_callback, preview_popup
from gateway.web.pages import wants_html

log = logging.getLogger("codehub.policy")
IDE_RULES = ResponseRules({"Content-Security-Policy": "frame-ancestors 'self'", "X-Frame-Options": "SAMEORIGIN"})
"""The IDE frames itself (code-server's webviews, the markdown preview), and nothing else may frame it."""


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
    Recording it (``record``) is the caller's, once it acts on it.

    A gateway cookie rides along on requests other previews' pages make (they are all one site), so what a
    cookie vouches for covers reads only, unless the request comes from this origin or one the port's CORS rule
    admits: a hostile preview cannot write to, or open a WebSocket to, another as its visitor."""
    auth = gateway.auth
    credentials = authenticate(method, headers, target.path, _host(headers, gateway), sessions=auth.sessions,
                               store=auth.store, secure=gateway.config.secure, preview=target.port is not None)
    if credentials.by_cookie and cors.needs_same_origin(method, headers) and not cors.same_origin_or_admitted(
            headers, gateway.hosts.origin(headers["Host"]), _admits(gateway, target, state)):
        return credentials, Decision(False, Reason.CROSS_ORIGIN, "a cookie does not vouch for other origins")
    decision = decide(gateway.policy, state.spec, target.port, credentials.identity, credentials.grant)
    if decision.allow and state.phase is not Phase.RUNNING:
        decision = may_wake(gateway.policy, decision)
    return credentials, decision


def _admits(gateway: Gateway, target: Target, state: WorkspaceState) -> Callable[[str], bool]:
    """Whether the port's CORS rule admits an origin *with credentials* (the IDE has no rule): a rule that lets
    other origins call without credentials does not let them use the visitor's cookie."""
    rule = cors.rule_for(gateway.policy, target.port) if target.port is not None else None
    if rule is None or not rule.allow_credentials:
        return lambda origin: False
    return lambda origin: cors.origin_allowed(rule, origin, state.spec, gateway.hosts, _owner_of(gateway))


def _check(request: web.Request, gateway: Gateway, target: Target, state: WorkspaceState) -> Credentials:
    """Authenticate and authorize; a refusal becomes a sign-in redirect for browsers, else 401/403."""
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
        public_url = gateway.hosts.origin(request.headers["Host"]) + credentials.path
        raise sign_in_redirect(request, public_url, gateway.hosts.hub_url(""), secure=gateway.config.secure)
    error = denial(decision)
    if error.status == 401:
        error.headers["WWW-Authenticate"] = 'Bearer realm="codehub"'
    raise error


def record(gateway: Gateway, target: Target, identity: Identity | None, decision: Decision) -> None:
    gateway.metrics.decision(decision.allow, decision.reason.value)
    if not decision.allow:
        log.info("deny %s port %s for %s: %s (%s)", target.workspace, target.port,
                 log_text(identity.subject) if identity else "anonymous", decision.reason.value, decision.rule)


def _disclosed(gateway: Gateway, target: Target, state: WorkspaceState, identity: Identity | None) -> Identity | None:
    return disclosed(gateway.policy.identity, state.spec, target.port, identity,
                     member=_is_member(state, identity), consents=lambda: gateway.auth.store.consents)


def asks_consent(gateway: Gateway, target: Target, state: WorkspaceState, identity: Identity | None) -> bool:
    """Whether this caller must first answer the app's consent page (only a navigation is shown it)."""
    return consent_pending(state.spec, target.port, identity, member=_is_member(state, identity),
                           consents=lambda: gateway.auth.store.consents)


async def serve_reserved(request: web.Request, target: Target, gateway: Gateway) -> web.StreamResponse:
    """Paths under ``/_codehub/`` on a preview host belong to the gateway, never to the app."""
    path = target.path.partition("?")[0]
    if path == "/_codehub/auth/callback":
        rule = cors.rule_for(gateway.policy, target.port) if target.port is not None else None
        cross_site = rule is not None and rule.mode == "replace" and rule.allow_credentials
        return await preview_callback(request, gateway, _host(request.headers, gateway), cross_site=cross_site)
    if path == "/_codehub/auth/popup":
        return await preview_popup(request)
    state = _workspace(gateway, target)
    if path == CONSENT_PATH and request.method == "POST":
        return await _answer_consent(request, gateway, target, state)
    if path == "/_codehub/wake/events":
        _check(request, gateway, target, state)
        return await stream_progress(request, gateway.waker, state, upstream_port(target, state))
    raise NotFound("There is nothing at this address.", code="no-route")


def response_rules(headers: Headers, gateway: Gateway, target: Target, state: WorkspaceState) -> ResponseRules:
    """Framing policy on every preview and IDE response; CORS answers where the port's rule replaces the app's."""
    if target.kind is not Kind.PREVIEW:
        return IDE_RULES
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
        # passthru: the app answers its own preflights, which never carry credentials; a port shut for everyone
        # (the IDE port, ``ports.denied``) stays shut to them too, and they wake only what anyone may wake.
        anonymous = decide(gateway.policy, state.spec, target.port, None)
        asleep = state.phase is not Phase.RUNNING
        if asleep and anonymous.allow:
            anonymous = may_wake(gateway.policy, anonymous)
        if anonymous.reason is Reason.PORT_DENIED or (asleep and not anonymous.allow):
            record(gateway, target, None, anonymous)
            raise denial(anonymous)
        credentials = Credentials(None, None, None, False, target.path)
    else:
        credentials = _check(request, gateway, target, state)
        if (target.port is not None and request.method == "GET" and wants_html(request)
                and not is_websocket(request) and asks_consent(gateway, target, state, credentials.identity)):
            assert credentials.identity is not None
            raise ConsentPage(gateway.policy.identity, state.spec, target.port, credentials.identity,
                              credentials.path)
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
    """The workspace port a target names; the IDE's host names none and means the IDE port."""
    return target.port if target.port is not None else state.spec.ide_port


def forward(gateway: Gateway, target: Target, state: WorkspaceState, port: int, credentials: Credentials,
            headers: Headers, facts: ClientFacts) -> tuple[Upstream, CIMultiDict[str]]:
    """Where an allowed request goes, and the headers it goes with."""
    assert state.address is not None
    public_origin = gateway.hosts.origin(headers["Host"])
    upstream = Upstream(state.id, state.address, port, public_origin, tls=port in state.spec.https_ports)
    identity = _disclosed(gateway, target, state, credentials.identity)
    assertion = gateway.auth.sessions.assertion(identity, public_origin) if identity is not None else None
    sent = upstream_request_headers(
        headers, facts, upstream_host=upstream.host_header, strip_authorization=credentials.consumed_authorization,
        identity=identity_headers(identity, assertion),
    )
    if target.kind is Kind.IDE:
        put_ide_cookie(sent, secret_for(gateway.config, state.id))
    return upstream, sent


async def _answer_consent(request: web.Request, gateway: Gateway, target: Target,
                          state: WorkspaceState) -> web.StreamResponse:
    """The consent page's form: recorded for this person and app, then on to where they were going. The form
    is a cookie-authenticated write, so only the app's own origin can send it (``authorize``)."""
    credentials = _check(request, gateway, target, state)
    identity = credentials.identity
    if identity is None or target.port is None or target.port not in state.spec.identity_ports:
        raise NotFound("This app does not ask for your identity.", code="no-consent-asked")
    form = await request.post()
    choice = form.get("choice")
    if choice not in ("share", "decline"):
        raise BadRequest("Choose Continue or Continue without sharing.", code="bad-consent")
    await gateway.auth.store.record_consent(Consent.answer(identity.subject, state.id, target.port,
                                                           share=choice == "share",
                                                           claims=list(gateway.policy.identity.claims)))
    raise Redirect(local_path(str(form.get("next", "/"))), status=303)


def in_use(gateway: Gateway, state: WorkspaceState,
           identity: Identity | None) -> contextlib.AbstractContextManager[None]:
    """Visitors keep a workspace awake unless the policy says only its members do."""
    if gateway.policy.wake.visitors_keep_awake or _is_member(state, identity):
        return gateway.activity.connection(state.id)
    return contextlib.nullcontext()


def _is_member(state: WorkspaceState, identity: Identity | None) -> bool:
    return identity is not None and membership(state.spec, identity) is not None


async def _relay(request: web.Request, gateway: Gateway, upstream: Upstream, path: str,
                 headers: CIMultiDict[str], grace: float) -> web.StreamResponse:
    return await relay_websocket(
        request, upstream, path, headers, max_message=gateway.config.max_ws_message, heartbeat=gateway.heartbeat,
        timeouts=gateway.config.timeouts, metrics=gateway.metrics, connect_grace=grace,
    )

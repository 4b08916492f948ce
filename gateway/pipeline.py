"""The request path for workspace traffic, one way through:
route → authenticate → authorize → ensure awake → proxy → record activity."""

from __future__ import annotations

import ipaddress

from aiohttp import web

from gateway.context import Gateway
from gateway.errors import Forbidden, NotFound
from gateway.lifecycle import WorkspaceState
from gateway.proxy.headers import ClientFacts, upstream_request_headers
from gateway.proxy.http import proxy_http
from gateway.proxy.upstream import Upstream
from gateway.proxy.websocket import relay_websocket
from gateway.routing import Kind, Target
from gateway.wake import stream_progress


def is_websocket(request: web.BaseRequest) -> bool:
    return request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket"


def client_facts(request: web.BaseRequest, gateway: Gateway) -> ClientFacts:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    address = peer[0] if peer else "0.0.0.0"
    ip = ipaddress.ip_address(address)
    trusted = any(ip in network for network in gateway.trusted_proxies)
    return ClientFacts(peer=address, scheme=gateway.hosts.scheme, public_host=request.headers.get("Host", ""),
                       trusted=trusted)


def _workspace(gateway: Gateway, target: Target) -> WorkspaceState:
    assert target.workspace is not None
    state = gateway.runtime.get(target.workspace)
    if state is None:
        raise NotFound(f"There is no workspace called {target.workspace}.", code="workspace-not-found")
    return state


def _port(gateway: Gateway, target: Target, state: WorkspaceState) -> int:
    if target.kind is Kind.IDE:
        return state.spec.ide_port
    assert target.port is not None
    if target.port == state.spec.ide_port:
        raise Forbidden(
            f"Port {target.port} is the IDE of workspace {state.id}; open it at /w/{state.id}/ on the hub.",
            code="port-denied",
        )
    if target.port in gateway.config.denied_ports:
        raise Forbidden(f"Port {target.port} may not be shared.", code="port-denied")
    return target.port


async def serve_reserved(request: web.Request, target: Target, gateway: Gateway) -> web.StreamResponse:
    """Paths under ``/_codehub/`` on a preview host belong to the gateway, never to the app."""
    state = _workspace(gateway, target)
    if target.path.partition("?")[0] == "/_codehub/wake/events":
        port = _port(gateway, target, state)
        return await stream_progress(request, gateway.waker, state, port)
    raise NotFound("There is nothing at this address.", code="no-route")


async def serve_workspace(request: web.Request, target: Target, gateway: Gateway) -> web.StreamResponse:
    state = _workspace(gateway, target)
    port = _port(gateway, target, state)
    state = await gateway.waker.ensure_awake(request, state, port)
    assert state.address is not None
    if target.kind is Kind.IDE:
        public_origin, prefix = gateway.hosts.hub_url(""), f"/w/{state.id}"
    else:
        public_origin, prefix = gateway.hosts.share_url(state.id, port, ""), ""
    upstream = Upstream(state.id, state.address, port, public_origin, prefix)
    headers = upstream_request_headers(
        request.headers, client_facts(request, gateway), upstream_host=upstream.host_header, prefix=prefix or None,
    )
    with gateway.activity.connection(state.id):  # in use for as long as a request or WebSocket is open
        if is_websocket(request):
            return await relay_websocket(
                request, gateway.session, upstream, target.path, headers, max_message=gateway.config.max_ws_message,
                heartbeat=gateway.config.timeouts.websocket_heartbeat, metrics=gateway.metrics,
            )
        return await proxy_http(request, gateway.session, upstream, target.path, headers)

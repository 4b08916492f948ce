"""The aiohttp application: the front door that routes every request, the hub's own pages, the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections.abc import AsyncIterator

import aiohttp_jinja2
import jinja2
from aiohttp import web

from gateway.accesslog import TARGET
from gateway.activity import IdleTimers, reap_forever
from gateway.config import Config
from gateway.context import GATEWAY, Gateway
from gateway.errors import GatewayError, MethodNotAllowed, NotFound
from gateway.lifecycle import Runtime
from gateway.lifecycle.local import LocalRuntime
from gateway.metrics import Metrics
from gateway.pages import error_response, internal_error
from gateway.pipeline import is_websocket, serve_reserved, serve_workspace
from gateway.proxy.upstream import make_session
from gateway.routing import Hosts, Kind, route
from gateway.wake import WakeLimits, Waker, stream_progress


@web.middleware
async def front_door(request: web.Request, handler: web.RequestHandler) -> web.StreamResponse:
    """Route by Host and path, send the request down its one path, and turn every failure into a response."""
    gateway = request.app[GATEWAY]
    started = time.perf_counter()
    kind = "unrouted"
    response: web.StreamResponse | None = None
    try:
        target = route(request.headers.get("Host"), request.raw_path, gateway.hosts)
        request[TARGET] = target
        kind = target.kind.value
        if target.kind is Kind.HUB:
            response = await handler(request)
        elif target.kind is Kind.IDE_SLASH:
            response = web.Response(status=308, headers={"Location": target.path})
        elif target.kind is Kind.RESERVED:
            response = await serve_reserved(request, target, gateway)
        else:
            response = await serve_workspace(request, target, gateway)
    except GatewayError as exc:
        response = error_response(request, exc)
    except web.HTTPNotFound:
        response = error_response(request, NotFound("There is nothing at this address.", code="no-route"))
    except web.HTTPMethodNotAllowed as exc:
        response = error_response(
            request, MethodNotAllowed(f"{request.method} is not allowed here.", headers={"Allow": ",".join(
                sorted(exc.allowed_methods))})
        )
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        response = internal_error(request, exc)
    finally:
        if not is_websocket(request):
            status = response.status if response is not None else 499
            gateway.metrics.observe_request(kind, status, time.perf_counter() - started)
    return response


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, headers={"Cache-Control": "no-store"})


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[GATEWAY].metrics
    return web.Response(body=registry.render(), headers={"Content-Type": registry.content_type})


@aiohttp_jinja2.template("index.html")
async def index(request: web.Request) -> dict[str, object]:
    gateway = request.app[GATEWAY]
    workspaces = sorted(gateway.runtime.list(), key=lambda state: state.id)
    return {"workspaces": workspaces, "hosts": gateway.hosts}


async def ide_wake_events(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    state = gateway.runtime.get(request.match_info["workspace"])
    if state is None:
        raise NotFound("There is no workspace with that name.", code="workspace-not-found")
    return await stream_progress(request, gateway.waker, state, state.spec.ide_port)


def make_runtime(config: Config) -> Runtime:
    if config.runtime == "local":
        return LocalRuntime(config.local, stop_timeout=config.timeouts.shutdown)
    from gateway.lifecycle.kubernetes import KubernetesRuntime

    return KubernetesRuntime.from_config(config)


def build_app(config: Config, runtime: Runtime | None = None) -> web.Application:
    metrics_ = Metrics()
    runtime = runtime if runtime is not None else make_runtime(config)
    metrics_.track_workspaces(runtime.list)
    waker = Waker(runtime, metrics_, WakeLimits(config.wake.warm_timeout, config.wake.cold_timeout))
    gateway = Gateway(
        config=config,
        hosts=Hosts.from_urls(config.hub_url, config.preview_domain),
        runtime=runtime,
        metrics=metrics_,
        waker=waker,
        trusted_proxies=tuple(ipaddress.ip_network(net, strict=False) for net in config.trusted_proxies),
    )
    app = web.Application(middlewares=[front_door])
    app[GATEWAY] = gateway
    aiohttp_jinja2.setup(app, loader=jinja2.PackageLoader("gateway", "templates"), autoescape=True)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", index)
    app.router.add_get("/_codehub/wake/{workspace}/events", ide_wake_events)
    app.cleanup_ctx.append(_lifespan)
    return app


async def _lifespan(app: web.Application) -> AsyncIterator[None]:
    gateway = app[GATEWAY]
    gateway._session = make_session(gateway.config.timeouts)
    await gateway.runtime.start()
    idle = gateway.config.idle
    reaper = asyncio.create_task(
        reap_forever(gateway.runtime, gateway.activity, IdleTimers(idle.to_warm, idle.to_cold, idle.check_every),
                     gateway.metrics, busy=gateway.waker.waking)
    )
    try:
        yield
    finally:
        reaper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reaper
        await gateway.waker.close()
        await gateway.runtime.close()
        await gateway.session.close()

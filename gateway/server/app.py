"""The aiohttp application: the front door that routes every request, the hub's own pages, the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.accesslog import REFUSED, TARGET, client_left, note_answer, sent_status
from gateway.auth.keys import KeyFileError, load_or_create
from gateway.auth.oidc import OidcClient
from gateway.auth.sessions import Sessions
from gateway.config import Config
from gateway.edge.cors import HUB_FRAME_HEADERS, frame_ancestors
from gateway.edge.plan import Forward, Hold
from gateway.edge.policy import PolicyHolder
from gateway.edge.routing import Hosts, Kind
from gateway.errors import GatewayError, MethodNotAllowed, NotFound
from gateway.lifecycle import Runtime
from gateway.lifecycle.idle import Activity, reap_forever
from gateway.lifecycle.wake import WakeLimits, Waker
from gateway.metrics import Metrics
from gateway.proxy.wsrelay import GOING_AWAY
from gateway.server.context import GATEWAY, AuthState, Gateway
from gateway.server.expect import ends_a_held_body
from gateway.server.forward import as_the_app_sent_it
from gateway.server.lane import execute, plan_for
from gateway.server.refusals import Reason, counted
from gateway.server.wiring import make_pool, make_reaper, make_runtime, make_session, make_store
from gateway.web import api, auth_routes, badge, consent, hub
from gateway.web.pages import error_response, internal_error, phase_words

log = logging.getLogger(__name__)


@web.middleware
async def by_plan(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Each request gets its plan (made here, or by the fast lane before it handed the request over), is served
    by it, and every failure becomes a response."""
    gateway = request.app[GATEWAY]
    started = time.perf_counter()
    kind = "unrouted"
    response: web.StreamResponse | None = None
    answered: web.StreamResponse | None = None
    websocket = False
    try:
        plan = plan_for(request, gateway)
        if plan.target is not None:
            request[TARGET] = plan.target
            kind = plan.target.kind.value
        websocket = isinstance(plan, Forward | Hold) and (plan.forward if isinstance(plan, Hold) else plan).websocket
        response = answered = await execute(request, plan, gateway, handler)
    except GatewayError as exc:
        if exc.code == Reason.BODY_TIMEOUT.value:  # the client's doing, as the 413 of a body over the limit
            request[REFUSED] = exc.code
            gateway.metrics.bad_requests.labels(exc.code).inc()
        response = error_response(request, exc)
    except (web.HTTPNotFound, web.HTTPForbidden):  # 403: the static route's for its folder (``/static/``), which
        # is nothing to show either; else a 500 and a traceback in the log, for anyone who asked
        response = error_response(request, NotFound("There is nothing at this address.", code="no-route"))
    except web.HTTPMethodNotAllowed as exc:
        response = error_response(
            request, MethodNotAllowed(f"{request.method} is not allowed here.", headers={"Allow": ",".join(
                sorted(exc.allowed_methods))})
        )
    except web.HTTPRequestEntityTooLarge:  # a body read for the gateway itself, past limits.body
        request[REFUSED] = Reason.BODY_TOO_LARGE.value
        response = error_response(request, counted(gateway.metrics, Reason.BODY_TOO_LARGE))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        response = internal_error(request, exc)
    finally:
        if not websocket:
            seconds = time.perf_counter() - started
            # No response: the client left (its handler cancelled), and aiohttp writes no line for it.
            status = sent_status(request, response) if response is not None else client_left(request, seconds)
            gateway.metrics.observe_request(kind, status, seconds)
    if response is not answered and request.writer.output_size and request.transport is not None:
        # Part of the answer that failed went out: a client, or a proxy in front, would read the error page as
        # more of it, and the answers behind it with it. Closing tells the client it is cut; nothing is answered
        # after it (aiohttp finds the connection closing when it goes to write the error page).
        request.transport.close()
    if not response.prepared:
        _own_headers(response, kind, gateway)
    return response


_FRAMABLE = frozenset({Kind.PREVIEW.value, Kind.RESERVED.value})
"""Hosts whose gateway pages may be framed (as the policy allows): a preview's, where they stand for its app."""


def own_frame_headers(kind: str, gateway: Gateway) -> Mapping[str, str]:
    """How the gateway's own pages may be framed: on preview hosts as policy allows (waiting pages inside reviews),
    never on the hub (clickjacking of sign-in and sharing) nor anywhere else."""
    if kind in _FRAMABLE:
        return {"Content-Security-Policy": frame_ancestors(gateway.policy)}
    return HUB_FRAME_HEADERS


def _own_headers(response: web.StreamResponse, kind: str, gateway: Gateway) -> None:
    """The gateway's own answers: framed as ``own_frame_headers`` says; and off preview hosts, made for the person
    signed in, kept by no cache unless they say otherwise (a shared cache in front would give one person's page to
    the next). Versioned static files stay cacheable."""
    for name, value in own_frame_headers(kind, gateway).items():
        response.headers.setdefault(name, value)
    if kind not in _FRAMABLE and not isinstance(response, web.FileResponse):
        response.headers.setdefault("Cache-Control", "no-store")


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers. Cheap on purpose; a restart never fixes an unreachable API."""
    return web.json_response({"status": "ok"}, headers={"Cache-Control": "no-store"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 503 while this replica would route from caches it never filled or that went stale, so the
    Service sends its traffic to replicas that see the cluster."""
    reason = request.app[GATEWAY].runtime.not_ready()
    if reason is not None:
        return web.json_response({"status": "not-ready", "reason": reason}, status=503,
                                 headers={"Cache-Control": "no-store"})
    return web.json_response({"status": "ready"}, headers={"Cache-Control": "no-store"})


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[GATEWAY].metrics
    return web.Response(body=registry.render(), headers={"Content-Type": registry.content_type})


def build_metrics_app(app: web.Application) -> web.Application:
    """``/metrics`` of the gateway ``app``, for a listener of its own (``metrics.port``) that no ingress routes:
    the public hosts never show the gateway's internals."""
    metrics_app = web.Application()
    metrics_app[GATEWAY] = app[GATEWAY]
    metrics_app.router.add_get("/metrics", metrics)
    return metrics_app


def build_app(config: Config, runtime: Runtime | None = None, *, reap: bool = True, workers: int = 1,
              clock: Callable[[], float] = time.time) -> web.Application:
    """Everything that can fail on bad settings fails here, before the server listens.

    ``reap=False``: another process runs the idle reaper (a ``serve --workers`` worker on the local runtime).
    ``workers``: how many worker processes serve the same listeners, this one among them.
    ``clock``: what idleness is measured by (tests move it on instead of waiting)."""
    metrics_ = Metrics()
    runtime = runtime if runtime is not None else make_runtime(config)
    policies = PolicyHolder(config.policy_file)
    metrics_.track_workspaces(runtime.list)
    metrics_.track_features(runtime.features)
    waker = Waker(runtime, metrics_, lambda: WakeLimits(policies.current.wake.warm_timeout,
                                                        policies.current.wake.cold_timeout))
    keys = load_or_create(config.keys_file, create=config.auth.keys_file is None)
    hosts = Hosts.from_urls(config.hub_url, config.preview_domain)
    auth = AuthState(keys=keys, sessions=Sessions(lambda: auth.keys, hosts.hub_url(""), ttl=config.auth.session_ttl),
                     store=make_store(config, runtime))
    activity = Activity(clock, shared=runtime)
    gateway = Gateway(
        config=config,
        hosts=hosts,
        runtime=runtime,
        metrics=metrics_,
        waker=waker,
        auth=auth,
        policies=policies,
        reaper=make_reaper(config, runtime, activity, metrics_, busy=waker.waking, keep_only=waker.keep_only,
                           is_leader=lambda: reap and runtime.is_leader()),
        activity=activity,
        trusted_proxies=tuple(ipaddress.ip_network(net, strict=False) for net in config.trusted_proxies),
        workers=workers,
    )
    # Request bodies pass through as sent: the server must not undo a client's Content-Encoding.
    # Bodies the gateway reads itself (hub, API, sign-in forms) are bounded; bodies for previews stream through.
    app = web.Application(middlewares=[by_plan], handler_args={"auto_decompress": False},
                          client_max_size=config.limits.body)
    app[GATEWAY] = gateway
    app.on_response_prepare.extend((as_the_app_sent_it, ends_a_held_body, note_answer))
    templates = aiohttp_jinja2.setup(app, loader=jinja2.PackageLoader("gateway.web", "templates"), autoescape=True)
    templates.globals["hub_url"] = hosts.hub_url("/")
    templates.filters["phase_words"] = phase_words
    templates.globals["static"] = lambda name: str(app.router["static"].url_for(filename=name))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    hub.add_routes(app)
    app.router.add_get("/badge/{workspace}/{port}.svg", badge.badge)
    auth_routes.add_routes(app)
    consent.add_routes(app)
    api.add_routes(app)
    app.on_shutdown.append(_drain)
    app.cleanup_ctx.append(_lifespan)
    return app


async def _drain(app: web.Application) -> None:
    """SIGTERM, once the listener is closed and idle connections are gone (aiohttp's order): what would only wait
    out the drain leaves now — held requests get 503 + Retry-After, WebSockets 1001 — so that requests in
    flight are all that ``timeouts.shutdown`` is spent on."""
    gateway = app[GATEWAY]
    gateway.waker.drain()
    gateway.heartbeat.end_all(GOING_AWAY)


async def _lifespan(app: web.Application) -> AsyncIterator[None]:
    """What the gateway opens it closes, in reverse, however far the start got (a runtime that cannot reach its
    API fails it after the HTTP session and the pool were made)."""
    gateway = app[GATEWAY]
    async with contextlib.AsyncExitStack() as opened:
        gateway._pool = make_pool(gateway.config.timeouts, gateway.metrics.upstream_fault, gateway.workers,
                                  body_timeout=gateway.config.limits.body_timeout)
        opened.callback(gateway._pool.close)
        gateway._session = make_session(gateway.config.timeouts)
        opened.push_async_callback(gateway._session.close)
        gateway.metrics.track_queue(gateway._pool.queued)
        gateway.metrics.track_pool(gateway._pool.connections)
        if gateway.config.auth.oidc is not None:
            gateway.auth.oidc = OidcClient(gateway.config.auth.oidc, gateway.session)
        await gateway.runtime.start()
        opened.push_async_callback(gateway.runtime.close)
        opened.push_async_callback(gateway.waker.close)
        await gateway.auth.store.start()
        opened.push_async_callback(gateway.auth.store.close)
        for task in (asyncio.create_task(_watch_files(gateway)), asyncio.create_task(reap_forever(gateway.reaper))):
            opened.push_async_callback(_cancelled, task)
        yield


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _watch_files(gateway: Gateway, every: float = 2.0) -> None:
    """Pick up policy edits and key rotation without a restart (a Kubernetes Secret update lands as a file)."""
    keys_stamp = _stamp(gateway.config.keys_file)
    while True:
        await asyncio.sleep(every)
        try:
            gateway.auth.store.flush()
        except Exception:  # a bug or a surprise from a file: the reloads below, and the next pass, still happen
            log.exception("use counts not written")
        gateway.policies.reload_if_changed()
        stamp = _stamp(gateway.config.keys_file)
        if stamp != keys_stamp:
            keys_stamp = stamp
            try:
                gateway.auth.keys = load_or_create(gateway.config.keys_file, create=False)
            except KeyFileError as exc:
                log.error("signing keys not reloaded, keeping the previous ones: %s", exc)
                continue
            gateway.auth.sessions.forget_cached()
            log.info("signing keys reloaded; current kid %s", gateway.auth.keys.current.kid)


def _stamp(path: Path) -> tuple[float, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_mtime, stat.st_size)

"""What both process shapes build the same way: the runtime, the token store, the idle reaper, and the clients
that reach workspaces (settings in, numbers out: ``proxy/`` never reads ``Config``).

``serve`` in one process (the app's lifespan) and the ``--workers`` parent (which owns the local runtime for its
workers) both wire these here, so the two cannot drift apart again (they had: the parent's reaper lacked the
"a workspace being woken is not put to sleep" guard).
"""

from __future__ import annotations

from collections.abc import Callable, Set

import aiohttp

from gateway.auth.store import FileTokenStore, TokenStore
from gateway.config import Config, Timeouts
from gateway.lifecycle import Runtime
from gateway.lifecycle.idle import Activity, IdleTimers, Reaper
from gateway.lifecycle.local import LocalRuntime
from gateway.metrics import Metrics
from gateway.proxy.pool import UpstreamPool


def make_runtime(config: Config) -> Runtime:
    if config.runtime == "local":
        return LocalRuntime(config.local, stop_timeout=config.local.stop_timeout, proxy_uri=config.proxy_uri)
    from gateway.lifecycle.kubernetes import KubernetesRuntime

    return KubernetesRuntime.from_config(config)


def make_store(config: Config, runtime: Runtime) -> TokenStore:
    """Share links and API tokens: custom resources every replica sees on Kubernetes, else one file. The
    Kubernetes store caches them in the runtime's informers, so it is made before the runtime starts."""
    if config.runtime == "kubernetes":
        from gateway.auth.kubernetes.tokens import KubeTokenStore
        from gateway.lifecycle.kubernetes import KubernetesRuntime

        if isinstance(runtime, KubernetesRuntime):
            return KubeTokenStore(runtime.settings, runtime.identity, lambda: runtime.client, runtime.informers,
                                  is_leader=runtime.is_leader)
    return FileTokenStore(config.store_file, session_ttl=config.auth.session_ttl)


def make_reaper(config: Config, runtime: Runtime, activity: Activity, metrics: Metrics, *,
                busy: Callable[[str], bool], is_leader: Callable[[], bool] = lambda: True,
                keep_only: Callable[[Set[str]], None] = lambda live: None) -> Reaper:
    """The idle reaper: puts idle workspaces to sleep, never one that is being woken (``busy``), and has what is
    kept per workspace (``keep_only``) forget the deleted ones; run it with ``reap_forever``."""
    idle = config.idle
    return Reaper(runtime, activity, IdleTimers(idle.to_warm, idle.to_cold, idle.check_every), metrics,
                  is_leader=is_leader, busy=busy, keep_only=keep_only)


def make_pool(timeouts: Timeouts, on_fault: Callable[[str], None], workers: int = 1, *,
              body_timeout: float | None = None) -> UpstreamPool:
    """The keep-alive pool plain HTTP requests are proxied through; ``on_fault`` counts what upstreams do wrong;
    ``workers``: how many worker processes have one (they share the pace of new connections); ``body_timeout``:
    ``limits.body_timeout``."""
    return UpstreamPool(connect_timeout=timeouts.connect, first_byte_timeout=timeouts.first_byte,
                        read_timeout=timeouts.read, queue_timeout=timeouts.queue, keepalive=30.0, workers=workers,
                        on_fault=on_fault, body_timeout=body_timeout)


def make_session(timeouts: Timeouts) -> aiohttp.ClientSession:
    """For the gateway's own calls (OIDC): bodies pass through untouched (no decompression), no cookies are kept,
    connections are reused."""
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, use_dns_cache=False, enable_cleanup_closed=False)
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None, connect=timeouts.connect, sock_read=timeouts.read),
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        read_bufsize=1 << 16,
    )

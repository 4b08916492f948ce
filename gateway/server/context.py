"""The gateway's state, owned by the app: one typed object instead of loose globals.

It is also the ``World`` a request's plan is made against (``gateway.edge.plan``): the lookups a decision may
make, all in memory."""

from __future__ import annotations

import asyncio
import ipaddress
import weakref
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from gateway.auth.ide import secret_for
from gateway.auth.keys import KeySet
from gateway.auth.oidc import OidcClient
from gateway.auth.sessions import Sessions
from gateway.auth.store import TokenStore
from gateway.config import Config
from gateway.edge.plan import Plan
from gateway.edge.policy import Policy, PolicyHolder
from gateway.edge.routing import Hosts
from gateway.lifecycle import Runtime, WorkspaceSpec, WorkspaceState
from gateway.lifecycle.idle import Activity, Reaper
from gateway.lifecycle.wake import Waker
from gateway.metrics import Metrics
from gateway.proxy.heartbeat import Heartbeat
from gateway.proxy.pool import UpstreamPool

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class AuthState:
    """Sign-in machinery; ``keys`` is swapped in place when the keys file changes (rotation)."""

    keys: KeySet
    sessions: Sessions
    store: TokenStore
    oidc: OidcClient | None = None


@dataclass
class Gateway:
    config: Config
    hosts: Hosts
    runtime: Runtime
    metrics: Metrics
    waker: Waker
    auth: AuthState
    policies: PolicyHolder
    reaper: Reaper
    """The idle reaper as wired for this process (``serve`` runs it on its interval; tests run single passes)."""
    activity: Activity = field(default_factory=Activity)
    trusted_proxies: tuple[IPNetwork, ...] = ()
    workers: int = 1
    """Worker processes serving the same listeners (``serve --workers``), this one among them."""
    _session: aiohttp.ClientSession | None = None
    _pool: UpstreamPool | None = None
    _heartbeat: Heartbeat | None = None
    handed: weakref.WeakKeyDictionary[asyncio.BaseTransport, Plan] = field(default_factory=weakref.WeakKeyDictionary)
    """Plans the fast lane made for the request it handed over with its connection: aiohttp's lane acts on them."""

    @property
    def policy(self) -> Policy:
        return self.policies.current

    @property
    def secure(self) -> bool:
        """Read on every request: from ``hosts``, parsed once, rather than the config's ``hub_url`` each time."""
        return self.hosts.scheme == "https"

    @property
    def sessions(self) -> Sessions:
        return self.auth.sessions

    @property
    def store(self) -> TokenStore:
        return self.auth.store

    def workspace(self, name: str) -> WorkspaceState | None:
        return self.runtime.get(name)

    def waking(self, workspace: str, port: int) -> bool:
        return self.waker.busy(workspace, port)

    def ide_secret(self, spec: WorkspaceSpec) -> str | None:
        return secret_for(self.config, spec)

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "the upstream pool opens when the app starts"
        return self._session

    @property
    def heartbeat(self) -> Heartbeat:
        """The one timer that pings idle WebSocket clients, made on first use."""
        if self._heartbeat is None:
            self._heartbeat = Heartbeat(self.config.timeouts.websocket_heartbeat)
        return self._heartbeat

    @property
    def pool(self) -> UpstreamPool:
        assert self._pool is not None, "the upstream pool opens when the app starts"
        return self._pool


GATEWAY = web.AppKey("gateway", Gateway)

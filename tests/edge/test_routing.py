"""Routing is a pure function of Host and path: a table of requests and where they must go."""

from __future__ import annotations

import pytest

from gateway.edge.routing import Hosts, Kind, Target, route
from gateway.errors import BadRequest, GatewayError, NotFound

LOCAL = Hosts.from_urls("http://localhost:8080", "localhost:8080")
PROD = Hosts.from_urls("https://hub.example.com", "preview.example.com")


@pytest.mark.parametrize(
    ("hosts", "host", "path", "expected"),
    [
        (LOCAL, "8000-demo.localhost:8080", "/", Target(Kind.PREVIEW, "demo", 8000, "/")),
        (LOCAL, "8000-DEMO.LOCALHOST:8080", "/a?b=c", Target(Kind.PREVIEW, "demo", 8000, "/a?b=c")),
        (LOCAL, "3000-ws-1.localhost:8080", "/%2e%2e/x", Target(Kind.PREVIEW, "ws-1", 3000, "/%2e%2e/x")),
        (LOCAL, "1-a.localhost:8080", "/", Target(Kind.PREVIEW, "a", 1, "/")),
        (LOCAL, "65535-a.localhost:8080", "/", Target(Kind.PREVIEW, "a", 65535, "/")),
        (LOCAL, "8000-demo.localhost:8080", "/_codehub/wake/events", Target(Kind.RESERVED, "demo", 8000,
                                                                            "/_codehub/wake/events")),
        (LOCAL, "localhost:8080", "/", Target(Kind.HUB, path="/")),
        (LOCAL, "localhost:8080", "/w/demo", Target(Kind.IDE_MOVED, "demo", path="/")),
        (LOCAL, "localhost:8080", "/w/demo?folder=/x", Target(Kind.IDE_MOVED, "demo", path="/?folder=/x")),
        (LOCAL, "localhost:8080", "/w/demo/", Target(Kind.IDE_MOVED, "demo", path="/")),
        (LOCAL, "localhost:8080", "/w/demo/static/a.js?v=1", Target(Kind.IDE_MOVED, "demo", path="/static/a.js?v=1")),
        (LOCAL, "localhost:8080", "/w/demo//evil.test/", Target(Kind.IDE_MOVED, "demo", path="//evil.test/")),
        (LOCAL, "ide-demo.localhost:8080", "/", Target(Kind.IDE, "demo", path="/")),
        (LOCAL, "IDE-demo.localhost:8080", "/static/a.js?v=1", Target(Kind.IDE, "demo", path="/static/a.js?v=1")),
        (LOCAL, "ide-ws-1.localhost:8080", "/_codehub/auth/callback?code=x",
         Target(Kind.RESERVED, "ws-1", None, "/_codehub/auth/callback?code=x")),
        (LOCAL, "ide-demo.localhost:8080", "/w/demo/", Target(Kind.IDE, "demo", path="/w/demo/")),
        (LOCAL, "ide-demo.localhost:8080", "/proxyish/3000/", Target(Kind.IDE, "demo", path="/proxyish/3000/")),
        (LOCAL, "8000-demo.localhost:8080", "/proxy/3000/", Target(Kind.PREVIEW, "demo", 8000, "/proxy/3000/")),
        (PROD, "ide-ws1.preview.example.com", "/?folder=/home", Target(Kind.IDE, "ws1", path="/?folder=/home")),
        (LOCAL, "localhost:8080", "/wx/demo/", Target(Kind.HUB, path="/wx/demo/")),
        (LOCAL, "10.1.2.3:8080", "/healthz", Target(Kind.HUB, path="/healthz")),
        (LOCAL, "[::1]:8080", "/readyz", Target(Kind.HUB, path="/readyz")),
        (PROD, "hub.example.com", "/", Target(Kind.HUB, path="/")),
        (PROD, "hub.example.com:443", "/", Target(Kind.HUB, path="/")),
        (PROD, "3000-ws1.preview.example.com", "/", Target(Kind.PREVIEW, "ws1", 3000, "/")),
        (PROD, "3000-ws1.preview.example.com.", "/", Target(Kind.PREVIEW, "ws1", 3000, "/")),
        (PROD, "3000-ws1.preview.example.com:443", "/", Target(Kind.PREVIEW, "ws1", 3000, "/")),
    ],
)
def test_routes(hosts: Hosts, host: str, path: str, expected: Target) -> None:
    assert route(host, path, hosts) == expected


@pytest.mark.parametrize(
    ("hosts", "host", "path", "error", "code"),
    [
        (LOCAL, None, "/", BadRequest, "bad-host"),
        (LOCAL, "", "/", BadRequest, "bad-host"),
        (LOCAL, "user@8000-demo.localhost:8080", "/", BadRequest, "bad-host"),
        (LOCAL, "8000-demo.localhost:8080:8080", "/", BadRequest, "bad-host"),
        (LOCAL, "8000-demo.localhost:99999", "/", BadRequest, "bad-host"),
        (LOCAL, "8000-demo..localhost:8080", "/", BadRequest, "bad-host"),
        (LOCAL, "0-demo.localhost:8080", "/", BadRequest, "bad-port"),
        (LOCAL, "65536-demo.localhost:8080", "/", BadRequest, "bad-port"),
        (LOCAL, "08000-demo.localhost:8080", "/", BadRequest, "bad-port"),
        (LOCAL, "abc-demo.localhost:8080", "/", BadRequest, "bad-preview-host"),
        (LOCAL, "8000demo.localhost:8080", "/", BadRequest, "bad-preview-host"),
        (LOCAL, "8000-.localhost:8080", "/", BadRequest, "bad-preview-host"),
        (LOCAL, "8000-demo-.localhost:8080", "/", BadRequest, "bad-preview-host"),
        (LOCAL, "ide-.localhost:8080", "/", BadRequest, "bad-preview-host"),
        (LOCAL, "ide-Demo_.localhost:8080", "/", BadRequest, "bad-host"),
        (LOCAL, "ide-demo-.localhost:8080", "/", BadRequest, "bad-preview-host"),
        (LOCAL, "ide8000-demo.localhost:8080", "/", BadRequest, "bad-preview-host"),
        (LOCAL, "ide-demo.ide-demo.localhost:8080", "/", NotFound, "unknown-host"),
        # code-server serves every workspace port on its own origin there (case-blind): never on the IDE's.
        (LOCAL, "ide-demo.localhost:8080", "/proxy/3000/", NotFound, "ide-proxy-off"),
        (LOCAL, "ide-demo.localhost:8080", "/proxy/3000", NotFound, "ide-proxy-off"),
        (LOCAL, "ide-demo.localhost:8080", "/PROXY/3000/x", NotFound, "ide-proxy-off"),
        (LOCAL, "ide-demo.localhost:8080", "/absproxy/3000/x?y", NotFound, "ide-proxy-off"),
        (LOCAL, "ide-demo.localhost:8080", "/AbsProxy/3000/", NotFound, "ide-proxy-off"),
        (LOCAL, "ide-demo.localhost:8080", "/proxy;x/3000/", NotFound, "ide-proxy-off"),
        (LOCAL, "8000-a.b.localhost:8080", "/", NotFound, "unknown-host"),
        (LOCAL, "8000-demo.localhost:8081", "/", NotFound, "unknown-host"),
        (LOCAL, "10.1.2.3:8080", "/metrics", NotFound, "unknown-host"),  # metrics.port serves them, never this one
        (LOCAL, "8000-demo.localhost", "/", NotFound, "unknown-host"),
        (LOCAL, "8000-demo.localhost:8080.evil.test", "/", BadRequest, "bad-host"),
        (LOCAL, "evil.test", "/", NotFound, "unknown-host"),
        (LOCAL, "localhost:8080", "/w/Demo/", NotFound, "workspace-not-found"),
        (LOCAL, "localhost:8080", "/w/demo%2F../", NotFound, "workspace-not-found"),
        (LOCAL, "localhost:8080", "/w//", NotFound, "workspace-not-found"),
        (LOCAL, "localhost:8080", "http://evil.test/", BadRequest, "bad-request-target"),
        (LOCAL, "8000-demo.localhost:8080", "*", BadRequest, "bad-request-target"),
        (PROD, "3000-ws1.preview.example.com.evil.test", "/", NotFound, "unknown-host"),
        (PROD, "3000-ws1.example.com", "/", NotFound, "unknown-host"),
        (PROD, "3000-ws1.preview.example.com:80", "/", NotFound, "unknown-host"),
        (PROD, "evil-hub.example.com", "/", NotFound, "unknown-host"),
    ],
)
def test_rejects(hosts: Hosts, host: str | None, path: str, error: type[GatewayError], code: str) -> None:
    with pytest.raises(error) as raised:
        route(host, path, hosts)
    assert raised.value.code == code


@pytest.mark.parametrize(
    ("hosts", "workspace", "port", "url"),
    [
        (LOCAL, "demo", 8000, "http://8000-demo.localhost:8080/"),
        (PROD, "ws1", 3000, "https://3000-ws1.preview.example.com/"),
    ],
)
def test_share_urls_round_trip(hosts: Hosts, workspace: str, port: int, url: str) -> None:
    assert hosts.share_url(workspace, port) == url
    host = url.split("/")[2]
    assert route(host, "/", hosts) == Target(Kind.PREVIEW, workspace, port, "/")


@pytest.mark.parametrize(
    ("hosts", "workspace", "url"),
    [
        (LOCAL, "demo", "http://ide-demo.localhost:8080/"),
        (PROD, "ws1", "https://ide-ws1.preview.example.com/"),
    ],
)
def test_ide_urls_round_trip(hosts: Hosts, workspace: str, url: str) -> None:
    """The IDE has an origin of its own under the preview domain, never the hub's."""
    assert hosts.ide_url(workspace) == url
    host = url.split("/")[2]
    assert route(host, "/", hosts) == Target(Kind.IDE, workspace, None, "/")
    assert hosts.origin(host) == url.rstrip("/")


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("08000-demo", "Port 08000 has a leading zero: write it as 8000."),
        ("0-demo", "Port 0 is not a port number between 1 and 65535."),
        ("65536-demo", "Port 65536 is not a port number between 1 and 65535."),
    ],
)
def test_bad_port_messages_say_what_is_wrong(label: str, message: str) -> None:
    with pytest.raises(BadRequest) as caught:
        route(f"{label}.localhost:8080", "/", LOCAL)
    assert caught.value.message == message

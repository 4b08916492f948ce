"""Routing is a pure function of Host and path: a table of requests and where they must go."""

from __future__ import annotations

import pytest

from gateway.edge.routing import (
    KIND_LABELS,
    RESERVED_PREFIX,
    WAKE_EVENTS_PATH,
    Hosts,
    Kind,
    Target,
    host_kind,
    local_path,
    route,
)
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
        (LOCAL, "10.1.2.3:1", "/healthz", Target(Kind.HUB, path="/healthz")),
        (LOCAL, "10.1.2.3:65535", "/readyz", Target(Kind.HUB, path="/readyz")),
        (PROD, "hub.example.com", "/", Target(Kind.HUB, path="/")),
        (PROD, "hub.example.com:443", "/", Target(Kind.HUB, path="/")),
        (PROD, "3000-ws1.preview.example.com", "/", Target(Kind.PREVIEW, "ws1", 3000, "/")),
        (PROD, "3000-ws1.preview.example.com.", "/", Target(Kind.PREVIEW, "ws1", 3000, "/")),
        (PROD, "3000-ws1.preview.example.com:443", "/", Target(Kind.PREVIEW, "ws1", 3000, "/")),
        # llhttp (the fast lane's parser) keeps the white space after a value; HTTP says it is not part of it.
        (LOCAL, "8000-demo.localhost:8080 \t ", "/", Target(Kind.PREVIEW, "demo", 8000, "/")),
        (LOCAL, "\tlocalhost:8080", "/", Target(Kind.HUB, path="/")),
    ],
)
def test_routes(hosts: Hosts, host: str, path: str, expected: Target) -> None:
    assert route(host, path, hosts) == expected


@pytest.mark.parametrize(
    ("hosts", "host", "path", "error", "code"),
    [
        (LOCAL, None, "/", BadRequest, "bad-host"),
        (LOCAL, "", "/", BadRequest, "bad-host"),
        (LOCAL, ".", "/", BadRequest, "bad-host"),  # no name left once its root dot is dropped
        (LOCAL, ".:8080", "/", BadRequest, "bad-host"),
        (LOCAL, "user@8000-demo.localhost:8080", "/", BadRequest, "bad-host"),
        (LOCAL, "8000-demo.localhost:8080:8080", "/", BadRequest, "bad-host"),
        (LOCAL, "8000-demo.localhost:99999", "/", BadRequest, "bad-host"),
        (LOCAL, "8000-demo..localhost:8080", "/", BadRequest, "bad-host"),
        (LOCAL, "-8000-demo.localhost:8080", "/", BadRequest, "bad-host"),
        (LOCAL, "10.1.2.3:0", "/healthz", BadRequest, "bad-host"),
        (LOCAL, "10.1.2.3:65536", "/healthz", BadRequest, "bad-host"),
        (LOCAL, "0-demo.localhost:8080", "/", BadRequest, "bad-port"),
        (LOCAL, "65536-demo.localhost:8080", "/", BadRequest, "bad-port"),
        (LOCAL, "08000-demo.localhost:8080", "/", BadRequest, "bad-port"),
        (LOCAL, "01-demo.localhost:8080", "/", BadRequest, "bad-port"),
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
        # Hosts are compared as the ASCII they must be: Unicode case folding and white space are nobody's host (a
        # proxy in front that matches the raw Host would see another host than the one routed to).
        (LOCAL, "8000-\u212aws.localhost:8080", "/", BadRequest, "bad-host"),  # KELVIN SIGN, which lower() makes k
        (LOCAL, "ide-\u212aws.localhost:8080", "/", BadRequest, "bad-host"),
        (LOCAL, "localhost:8080\x85", "/", BadRequest, "bad-host"),  # NEL, which strip() drops
        (LOCAL, "\xa0localhost:8080", "/", BadRequest, "bad-host"),  # NO-BREAK SPACE
        (LOCAL, "localhost:8080\u3000", "/", BadRequest, "bad-host"),  # IDEOGRAPHIC SPACE
        (LOCAL, "localhost:8080\x0b", "/", BadRequest, "bad-host"),  # an ASCII control, no white space in HTTP
        (LOCAL, "\x1flocalhost:8080", "/", BadRequest, "bad-host"),
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
        ("01-demo", "Port 01 has a leading zero: write it as 1."),
        ("00-demo", "Port 00 is not a port number between 1 and 65535."),
        ("0-demo", "Port 0 is not a port number between 1 and 65535."),
        ("65536-demo", "Port 65536 is not a port number between 1 and 65535."),
    ],
)
def test_bad_port_messages_say_what_is_wrong(label: str, message: str) -> None:
    with pytest.raises(BadRequest) as caught:
        route(f"{label}.localhost:8080", "/", LOCAL)
    assert caught.value.message == message


@pytest.mark.parametrize(
    ("hosts", "host", "path", "message"),
    [
        (LOCAL, "localhost:8080", "http://evil.test/", "Only origin-form request targets (a path) are accepted."),
        (LOCAL, "localhost:8080:8080", "/", "The Host header is missing or malformed."),
        (LOCAL, "abc-demo.localhost:8080", "/", "A preview address looks like {port}-{workspace}, for example "
                                               "3000-myworkspace."),
        (LOCAL, "ide-demo.localhost:8080", "/proxy/3000/", "Workspace ports are not served on the IDE's origin: open "
                                                           "a port at its own address, http://{port}-demo.localhost:8080/"),
        (PROD, "ide-ws1.preview.example.com", "/absproxy/3000/", "Workspace ports are not served on the IDE's origin: "
                                                                 "open a port at its own address, "
                                                                 "https://{port}-ws1.preview.example.com/"),
        (LOCAL, "localhost:8080", "/w/Demo/", "There is no workspace with that name."),
        (LOCAL, "evil.test", "/", "This gateway serves no site called evil.test."),
    ],
)
def test_refusals_say_what_is_wrong(hosts: Hosts, host: str, path: str, message: str) -> None:
    """The message is what the refused client reads (the JSON body or the error page): it names the fault and,
    where there is one, the address to use instead."""
    with pytest.raises(GatewayError) as caught:
        route(host, path, hosts)
    assert caught.value.message == message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "/"),
        ("", "/"),
        ("next", "/"),  # relative: resolved against wherever the browser is
        ("https://evil.test/", "/"),
        ("xn--evil.test/", "/"),
        ("/a?b=1#c", "/a?b=1#c"),
        ("//evil.test/x", "/evil.test/x"),  # a browser reads //host as another host
        ("///evil.test", "/evil.test"),
        ("//xn--evil.test/", "/xn--evil.test/"),
        ("/\\evil.test", "/evil.test"),
        ("\\\\evil.test", "/evil.test"),
        ("/\\/\\evil.test", "/evil.test"),
        ("/a\tb", "/"),  # browsers drop tabs and newlines before they look: "/\t/evil.test" is "//evil.test"
        ("/\t/evil.test", "/"),
        ("/a\nb", "/"),
        ("/a\rb", "/"),
        ("/a\x00b", "/"),
        ("/a\x1fb", "/"),
        ("/a\x7fb", "/"),
        ("/a b", "/a b"),  # a space (0x20) is no control character
        ("/é~", "/é~"),
    ],
)
def test_local_path_only_ever_stays_on_this_host(value: str | None, expected: str) -> None:
    """Every redirect the gateway derives from what a client sent goes through ``local_path``: no open
    redirects (``DESIGN.md``, security rules)."""
    assert local_path(value) == expected


@pytest.mark.parametrize(
    ("hosts", "host", "origin"),
    [
        (LOCAL, "3000-ws.localhost:8080", "http://3000-ws.localhost:8080"),
        (LOCAL, "3000-WS.localhost:8080", "http://3000-ws.localhost:8080"),
        (PROD, "3000-ws1.preview.example.com", "https://3000-ws1.preview.example.com"),
        (PROD, "3000-ws1.preview.example.com:443", "https://3000-ws1.preview.example.com"),
        (Hosts.from_urls("http://hub.test", "preview.test"), "3000-ws.preview.test:80", "http://3000-ws.preview.test"),
        (Hosts.from_urls("http://hub.test", "preview.test:81"), "3000-ws.preview.test:81",
         "http://3000-ws.preview.test:81"),
        (Hosts.from_urls("http://hub.box", "preview.box"), "3000-ws.preview.box.", "http://3000-ws.preview.box"),
    ],
)
def test_origin_is_what_a_browser_sends(hosts: Hosts, host: str, origin: str) -> None:
    """Browsers leave the scheme's default port out of ``Origin``: the same-origin check compares with this."""
    assert hosts.origin(host) == origin


@pytest.mark.parametrize(
    ("hosts", "path", "url"),
    [
        (LOCAL, "/", "http://localhost:8080/"),
        (PROD, "/consent?x=1", "https://hub.example.com/consent?x=1"),
        (Hosts.from_urls("https://hub.example.com:443", "preview.example.com"), "/", "https://hub.example.com/"),
        (Hosts.from_urls("http://hub.test:80", "preview.test"), "/", "http://hub.test/"),
        (Hosts.from_urls("https://hub.example.com:8443", "preview.example.com"), "/", "https://hub.example.com:8443/"),
    ],
)
def test_hub_urls(hosts: Hosts, path: str, url: str) -> None:
    assert hosts.hub_url(path) == url
    if path == "/":
        assert hosts.hub_url() == url


@pytest.mark.parametrize(
    ("hosts", "port", "url"),
    [
        (Hosts.from_urls("http://hub.test", "preview.test:80"), 3000, "http://3000-ws.preview.test/"),
        (Hosts.from_urls("https://hub.test", "preview.test:8443"), 3000, "https://3000-ws.preview.test:8443/"),
        (LOCAL, "{port}", "http://{port}-ws.localhost:8080/"),
    ],
)
def test_share_urls_leave_out_only_the_default_port(hosts: Hosts, port: int | str, url: str) -> None:
    assert hosts.share_url("ws", port) == url


@pytest.mark.parametrize(("hub_url", "preview_domain"), [("http://localhost:8080", "bad domain"),
                                                          ("http://localhost:8080", ".localhost"),
                                                          ("http://bad_hub", "localhost")])
def test_hosts_that_are_not_host_names_are_refused_at_start(hub_url: str, preview_domain: str) -> None:
    with pytest.raises(ValueError, match="valid host names"):
        Hosts.from_urls(hub_url, preview_domain)


def test_the_kinds_labels_and_reserved_paths_are_as_logged_and_served() -> None:
    """Log lines, metrics labels and the waiting page's event stream name these: a change breaks dashboards
    and pages already open."""
    assert {kind: label for kind, label in KIND_LABELS.items()} == {
        Kind.PREVIEW: "preview", Kind.RESERVED: "reserved", Kind.IDE: "ide", Kind.IDE_MOVED: "ide-moved",
        Kind.HUB: "hub"}
    assert (RESERVED_PREFIX, WAKE_EVENTS_PATH) == ("/_codehub/", "/_codehub/wake/events")
    assert Target(Kind.HUB).path == "/"


@pytest.mark.parametrize(
    ("hub_url", "host", "origin"),
    [
        ("https://xn--bcher-kva.example", "XN--BCHER-KVA.example", "https://xn--bcher-kva.example"),  # bücher.example
        ("http://[::1]:8080", "[::1]:8080", "http://[::1]:8080"),
        ("https://[2001:db8::1]", "[2001:db8::1]:443", "https://[2001:db8::1]"),
    ],
)
def test_a_hub_url_the_settings_accept_is_a_hub_the_gateway_serves(hub_url: str, host: str, origin: str) -> None:
    """The settings keep an international name as the ASCII it is sent as, and take an IP address in brackets: the
    gateway refused to start with either (the name was read back as Unicode, the address without its brackets)."""
    hosts = Hosts.from_urls(hub_url, "preview.example")
    assert route(host, "/", hosts) == Target(Kind.HUB, path="/")
    assert hosts.hub_url("/x") == f"{origin}/x"
    assert hosts.origin(host) == origin


@pytest.mark.parametrize(
    ("host", "kind"),
    [
        ("8000-demo.localhost:8080", "preview"),
        ("ide-demo.localhost:8080", "ide"),
        ("localhost:8080", "hub"),
        ("localhost:8080:8080", "unknown"),  # no host at all
        ("abc-demo.localhost:8080", "unknown"),  # a preview address that names no port
        ("evil.test", "unknown"),
    ],
)
def test_host_kind_names_the_host_before_its_request_is_routed(host: str, kind: str) -> None:
    """An answer given before the request could be read (a head too large) is framed by the kind of its
    host: a preview's may be framed as the policy allows, every other host's never."""
    assert host_kind(host, LOCAL) == kind

"""Header hygiene as pure functions: tables of headers in, headers out."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from gateway.proxy.headers import (
    ClientFacts,
    allowed_set_cookie,
    cookie_name_and_domain,
    downstream_response_headers,
    rewrite_location,
    strip_gateway_cookies,
    upstream_request_headers,
)

PEER = ClientFacts(peer="198.51.100.9", scheme="https", public_host="3000-ws1.preview.example.com", trusted=False)
TRUSTED = ClientFacts(peer="10.0.0.2", scheme="http", public_host="3000-ws1.preview.example.com", trusted=True)
UPSTREAM = "localhost:3000"


def h(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(pairs)


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ([("Connection", "keep-alive"), ("Keep-Alive", "timeout=5"), ("X-App", "1")], [("X-App", "1")]),
        ([("CONNECTION", "close"), ("TRANSFER-ENCODING", "chunked"), ("Te", "trailers"), ("Trailer", "X-Sum")], []),
        ([("Proxy-Authorization", "Basic x"), ("Proxy-Authenticate", "Basic"), ("Proxy-Connection", "close")], []),
        ([("Upgrade", "h2c"), ("Trailers", "x")], []),
        ([("Connection", "X-Secret, x-other"), ("x-secret", "1"), ("X-OTHER", "2"), ("X-Kept", "3")],
         [("X-Kept", "3")]),
        ([("Connection", "close"), ("Connection", "X-Secret"), ("X-Secret", "1")], []),
        ([("Sec-WebSocket-Key", "k"), ("Sec-WebSocket-Protocol", "a"), ("Sec-WebSocket-Extensions", "x")], []),
        ([("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")], [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]),
    ],
)
def test_hop_by_hop_headers_are_dropped(given: list[tuple[str, str]], kept: list[tuple[str, str]]) -> None:
    out = downstream_response_headers(h(*given), public_host="3000-ws1.localhost:8080",
                                      public_origin="http://3000-ws1.localhost:8080", upstream_origins=())
    assert list(out.items()) == kept


@pytest.mark.parametrize(
    ("cookie", "expected"),
    [
        ("a=1; b=2", "a=1; b=2"),
        ("codehub_session=x; a=1", "a=1"),
        ("a=1; codehub_session=x; b=2", "a=1; b=2"),
        ("__Host-codehub-session=x", ""),
        ("a=1;__Host-codehub=y;  b=two words", "a=1;  b=two words"),
        ("mycodehub_x=1", "mycodehub_x=1"),
    ],
)
def test_strip_gateway_cookies(cookie: str, expected: str) -> None:
    assert strip_gateway_cookies(cookie) == expected


@pytest.mark.parametrize(
    ("given", "client", "expected"),
    [
        # forwarding headers are the gateway's: client values are replaced
        ([("X-Forwarded-For", "6.6.6.6"), ("x-forwarded-proto", "http"), ("X-Forwarded-Host", "evil"),
          ("Forwarded", "for=6.6.6.6"), ("X-Real-IP", "6.6.6.6"), ("X-Forwarded-Port", "1")], PEER,
         {"X-Forwarded-For": "198.51.100.9", "X-Forwarded-Proto": "https",
          "X-Forwarded-Host": "3000-ws1.preview.example.com", "Host": UPSTREAM}),
        # a trusted proxy's chain is extended, its proto and host kept
        ([("X-Forwarded-For", "203.0.113.1"), ("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-Proto", "https"),
          ("X-Forwarded-Host", "pub.example")], TRUSTED,
         {"X-Forwarded-For": "203.0.113.1, 10.0.0.1, 10.0.0.2", "X-Forwarded-Proto": "https",
          "X-Forwarded-Host": "pub.example", "Host": UPSTREAM}),
        ([], TRUSTED, {"X-Forwarded-For": "10.0.0.2", "X-Forwarded-Proto": "http",
                       "X-Forwarded-Host": "3000-ws1.preview.example.com", "Host": UPSTREAM}),
        # identity headers never pass, trusted or not
        ([("X-Forwarded-User", "root"), ("X-Forwarded-Email", "r@x"), ("Remote-User", "root"),
          ("x-codehub-assertion", "forged"), ("X-Auth-Request-Email", "r@x")], TRUSTED,
         {"X-Forwarded-For": "10.0.0.2", "X-Forwarded-Proto": "http",
          "X-Forwarded-Host": "3000-ws1.preview.example.com", "Host": UPSTREAM}),
        # client Host, Expect and hop-by-hop go; Content-Length stays unless the body is chunked
        ([("Host", "3000-ws1.preview.example.com"), ("Expect", "100-continue"), ("Content-Length", "5"),
          ("Accept", "*/*")], PEER,
         {"Content-Length": "5", "Accept": "*/*", "X-Forwarded-For": "198.51.100.9", "X-Forwarded-Proto": "https",
          "X-Forwarded-Host": "3000-ws1.preview.example.com", "Host": UPSTREAM}),
        ([("Transfer-Encoding", "chunked"), ("Content-Length", "5")], PEER,
         {"X-Forwarded-For": "198.51.100.9", "X-Forwarded-Proto": "https",
          "X-Forwarded-Host": "3000-ws1.preview.example.com", "Host": UPSTREAM}),
        # the gateway's cookies go, the app's stay
        ([("Cookie", "codehub_session=s; theme=dark"), ("Cookie", "__Host-codehub=x")], PEER,
         {"Cookie": "theme=dark", "X-Forwarded-For": "198.51.100.9", "X-Forwarded-Proto": "https",
          "X-Forwarded-Host": "3000-ws1.preview.example.com", "Host": UPSTREAM}),
    ],
)
def test_upstream_request_headers(given: list[tuple[str, str]], client: ClientFacts, expected: dict[str, str]
                                  ) -> None:
    assert dict(upstream_request_headers(h(*given), client, upstream_host=UPSTREAM)) == expected


def test_upstream_request_headers_identity_and_authorization() -> None:
    out = upstream_request_headers(
        h(("Authorization", "Bearer gateway-token"), ("X-Forwarded-User", "forged")), PEER, upstream_host=UPSTREAM,
        strip_authorization=True, identity={"X-Forwarded-User": "alice"},
    )
    assert "Authorization" not in out
    assert out.getall("X-Forwarded-User") == ["alice"]
    kept = upstream_request_headers(h(("Authorization", "Basic app")), PEER, upstream_host=UPSTREAM)
    assert kept["Authorization"] == "Basic app"


@pytest.mark.parametrize(
    ("set_cookie", "name", "domain"),
    [
        ("a=1", "a", None),
        ("a=1; Path=/; HttpOnly", "a", None),
        ("a=1; Domain=.Example.COM", "a", "example.com"),
        ("a=1; domain=example.com; Domain=other.com", "a", "other.com"),
        ("a=1; Domain=", "a", None),
        (" spaced = v ; Secure", "spaced", None),
    ],
)
def test_cookie_name_and_domain(set_cookie: str, name: str, domain: str | None) -> None:
    assert cookie_name_and_domain(set_cookie) == (name, domain)


@pytest.mark.parametrize(
    ("set_cookie", "allowed"),
    [
        ("a=1; Path=/", True),
        ("a=1; Domain=3000-ws1.localhost", True),
        ("a=1; Domain=3000-WS1.localhost", True),
        ("a=1; Domain=localhost", False),
        ("a=1; Domain=.localhost", False),
        ("a=1; Domain=3001-ws1.localhost", False),
        ("codehub_session=x", False),
        ("__Host-codehub-session=x; Secure; Path=/", False),
    ],
)
def test_allowed_set_cookie(set_cookie: str, allowed: bool) -> None:
    assert allowed_set_cookie(set_cookie, "3000-ws1.localhost:8080") is allowed


UP = ("http://127.0.0.2:3000", "http://localhost:3000", "http://127.0.0.1:3000")
SHARE = "https://3000-ws1.preview.example.com"


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("http://127.0.0.2:3000/a?b=1", f"{SHARE}/a?b=1"),
        ("http://localhost:3000", SHARE),
        ("http://localhost:3000?x", f"{SHARE}?x"),
        ("http://127.0.0.1:3000#top", f"{SHARE}#top"),
        ("http://localhost:30001/", "http://localhost:30001/"),
        ("http://localhost:3000.evil.test/", "http://localhost:3000.evil.test/"),
        ("/login", "/login"),
        ("login", "login"),
        ("//evil.test/x", "//evil.test/x"),
        ("https://elsewhere.test/", "https://elsewhere.test/"),
    ],
)
def test_rewrite_location(location: str, expected: str) -> None:
    assert rewrite_location(location, UP, SHARE) == expected


def test_downstream_response_headers() -> None:
    out = downstream_response_headers(
        h(("Connection", "X-Private"), ("X-Private", "1"), ("Transfer-Encoding", "chunked"),
          ("Location", "http://localhost:3000/next"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2; Domain=localhost"),
          ("Set-Cookie", "c=3"), ("Content-Encoding", "gzip"), ("Content-Length", "10"),
          ("Sec-WebSocket-Protocol", "x")),
        public_host="3000-ws1.localhost:8080", public_origin="http://3000-ws1.localhost:8080", upstream_origins=UP,
    )
    assert list(out.items()) == [  # framing (Content-Length, Transfer-Encoding) is the lane's to write
        ("Location", "http://3000-ws1.localhost:8080/next"), ("Content-Encoding", "gzip"),
        ("Set-Cookie", "a=1"), ("Set-Cookie", "c=3"),
    ]


@pytest.mark.parametrize(
    "name",
    ["X_Forwarded_User", "x_forwarded_email", "X-Forwarded_Groups", "X_Codehub_Assertion", "X-Forwarded_For",
     "X_Forwarded_Proto", "X-Forwarded-Server", "X-Forwarded-Uri", "X-Forwarded-Prefix", "X-Forwarded-Port",
     "X-Forwarded-Ssl", "X_Forwarded_Anything", "X-Original-URL", "X-Original-Uri", "X-Rewrite-URL", "X-Real-IP",
     "X_Real_IP", "True-Client-IP", "Forwarded", "X-Forwarded", "X-Original-Forwarded-For", "Remote_User",
     "Content_Length", "Transfer_Encoding",
     "Sec_WebSocket_Key", "X_Auth_Request_User"],
)
def test_forwarding_and_identity_headers_are_dropped_in_every_spelling(name: str) -> None:
    """Servers that map ``_`` to ``-`` (CGI/WSGI environ, nginx with underscores_in_headers) would trust these."""
    out = upstream_request_headers(h((name, "forged"), ("X_App_Header", "kept")), PEER, upstream_host=UPSTREAM)
    assert "forged" not in [value for key, value in out.items() if key.lower() not in ("x-forwarded-for",)], out
    assert out["X_App_Header"] == "kept"


def test_clear_site_data_from_an_app_never_reaches_the_visitor() -> None:
    out = downstream_response_headers(
        h(("Clear-Site-Data", '"cookies", "storage"'), ("clear-site-data", '"*"'), ("X-App", "1")),
        public_host="3000-ws1.localhost:8080", public_origin="http://3000-ws1.localhost:8080", upstream_origins=UP,
    )
    assert list(out.items()) == [("X-App", "1")]

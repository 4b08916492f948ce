"""Header hygiene as pure functions: tables of headers in, headers out."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from multidict import CIMultiDict

from gateway.proxy.headers import (
    MOST_BYTES,
    MOST_CLEARED,
    ClientFacts,
    ResponseRules,
    allowed_set_cookie,
    clearing_cookies,
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
        ("codehubby=1; __Host-codehuB=2", "codehubby=1; __Host-codehuB=2"),  # the prefixes whole, in their case
        ("codehub_session=x;; a=1;", "a=1"),  # empty pieces go too: no stray separators left for the app
        ("a=1; ;b=2", "a=1;b=2"),
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
        # a trusted proxy that adds its word after the client's (HAProxy's add-header, a list it extends): the
        # nearest hop's is the one kept, never the client's
        ([("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "evil.example"), ("X-Forwarded-Proto", "http"),
          ("X-Forwarded-Host", "pub.example")], TRUSTED,
         {"X-Forwarded-For": "10.0.0.2", "X-Forwarded-Proto": "http", "X-Forwarded-Host": "pub.example",
          "Host": UPSTREAM}),
        ([("X-Forwarded-Proto", "https, http"), ("X-Forwarded-Host", "evil.example,pub.example")], TRUSTED,
         {"X-Forwarded-For": "10.0.0.2", "X-Forwarded-Proto": "http", "X-Forwarded-Host": "pub.example",
          "Host": UPSTREAM}),
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
        ([("Content-Length", "007")], PEER,
         {"Content-Length": "7", "X-Forwarded-For": "198.51.100.9", "X-Forwarded-Proto": "https",
          "X-Forwarded-Host": "3000-ws1.preview.example.com", "Host": UPSTREAM}),
        ([("Content-Length", "00")], PEER,
         {"Content-Length": "0", "X-Forwarded-For": "198.51.100.9", "X-Forwarded-Proto": "https",
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


@pytest.mark.parametrize("strip_authorization", [True, False])
def test_only_the_authorization_the_gateway_consumed_is_held_back(strip_authorization: bool) -> None:
    """A script that signs in with a bearer token sends its other headers for the app: they all reach it, in
    order, whether or not the gateway took the ``Authorization`` for itself."""
    sent = h(("Accept", "application/json"), ("Authorization", "Bearer t"), ("X-Request-Id", "7"),
             ("Content-Type", "text/plain"))
    out = upstream_request_headers(sent, PEER, upstream_host=UPSTREAM, strip_authorization=strip_authorization)
    expected = [("Accept", "application/json"), ("X-Request-Id", "7"), ("Content-Type", "text/plain")]
    if not strip_authorization:
        expected.insert(1, ("Authorization", "Bearer t"))
    assert [(name, value) for name, value in out.items() if not name.startswith("X-Forwarded-")
            and name != "Host"] == expected


@pytest.mark.parametrize(
    ("set_cookie", "name", "domain"),
    [
        ("a=1", "a", None),
        ("a=1; Path=/; HttpOnly", "a", None),
        ("a=1; Domain=.Example.COM", "a", "example.com"),
        ("a=1; domain=example.com; Domain=other.com", "a", "other.com"),
        ("a=1; Domain=", "a", None),
        (" spaced = v ; Secure", "spaced", None),
        ("=codehub_session=x; Path=/deep", "codehub_session", None),  # nameless: comes back as its bare value
        (" = bare ; Domain=example.com", "bare", "example.com"),
        ("=", "", None),
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
        # a cookie without a name is sent back as its bare value: this one comes back as ``codehub_session=x``
        ("=codehub_session=x; Path=/deep", False),
        (" = codehub_session=x", False),
        ("=__Host-codehub_session=x; Secure; Path=/", False),
        ("=app=1", True),
        # bytes that are not UTF-8 (surrogates here) are left out of the head as written: judged on this text, these
        # would reach the browser as ``codehub_session=x`` and a cookie for the parent domain
        ("\udcffcodehub_session=x", False),
        ("a=1; \udcffDomain=localhost", False),
        ("a=\udcff", False),
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


@pytest.mark.parametrize("name", ["X-Forwardedness", "X_Forwardedness", "X-ForwardedBy-App"])
def test_an_apps_header_that_only_starts_like_a_forwarding_one_reaches_the_upstream(name: str) -> None:
    """``X-Forwarded-*`` is a family by its dash: a name that merely begins with the same letters is the app's
    (dropping it would break the app for nothing)."""
    out = upstream_request_headers(h((name, "app")), PEER, upstream_host=UPSTREAM)
    assert out[name] == "app"


def test_clear_site_data_from_an_app_never_reaches_the_visitor() -> None:
    out = downstream_response_headers(
        h(("Clear-Site-Data", '"cookies", "storage"'), ("clear-site-data", '"*"'), ("X-App", "1")),
        public_host="3000-ws1.localhost:8080", public_origin="http://3000-ws1.localhost:8080", upstream_origins=UP,
    )
    assert list(out.items()) == [("X-App", "1")]


# Every name the gateway speaks for, spelt out here rather than imported: a name lost from the module's sets
# must fail a row, not vanish from the table with it.
FORWARDING_NAMES = [
    "X-Real-IP", "Forwarded", "X-Forwarded", "X-Original-URL", "X-Original-URI", "X-Original-Host",
    "X-Original-Method", "X-Original-Forwarded-For", "X-Rewrite-URL", "X-Client-IP", "True-Client-IP",
    "X-Cluster-Client-IP", "Client-IP",
]
IDENTITY_NAMES = [
    "X-Forwarded-User", "X-Forwarded-Email", "X-Forwarded-Groups", "X-Forwarded-Preferred-Username",
    "X-Codehub-Assertion", "X-Auth-Request-User", "X-Auth-Request-Email", "Remote-User",
]
HANDSHAKE_NAMES = [
    "Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions", "Sec-WebSocket-Protocol",
    "Sec-WebSocket-Accept",
]


@pytest.mark.parametrize("spelling", [str, str.lower, str.upper, lambda name: name.replace("-", "_")])
@pytest.mark.parametrize("name", FORWARDING_NAMES + IDENTITY_NAMES + HANDSHAKE_NAMES + ["Keep-Alive"])
@pytest.mark.parametrize("client", [PEER, TRUSTED], ids=["peer", "trusted-proxy"])
def test_no_client_value_of_a_name_the_gateway_speaks_for_reaches_the_upstream(
        name: str, spelling: Callable[[str], str], client: ClientFacts) -> None:
    """What proxies and sign-in layers write about the client is the gateway's to say: an app that trusts
    ``X-Client-IP`` or ``X-Original-Host`` would otherwise believe whatever the visitor typed. A trusted proxy
    in front is believed about the ``X-Forwarded-For/Proto/Host`` chain only, never about these."""
    out = upstream_request_headers(h((spelling(name), "forged"), ("X-App", "kept")), client, upstream_host=UPSTREAM)
    assert "forged" not in out.values(), list(out.items())
    assert out["X-App"] == "kept"


@pytest.mark.parametrize("name", [*HANDSHAKE_NAMES, "Keep-Alive"])
def test_an_apps_handshake_and_hop_headers_never_reach_the_visitor(name: str) -> None:
    """The lanes answer a WebSocket handshake themselves and frame every answer: an app's
    ``Sec-WebSocket-Accept`` or ``Keep-Alive`` would speak for a connection the app does not own, whether or
    not its ``Connection`` header names them."""
    out = downstream_response_headers(h((name, "app"), ("X-App", "1")), public_host="3000-ws1.localhost:8080",
                                      public_origin="http://3000-ws1.localhost:8080", upstream_origins=())
    assert list(out.items()) == [("X-App", "1")]


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ([("Connection", "X-Secret"), ("X-Secret", "1"), ("X-Kept", "2")], [("X-Kept", "2")]),
        ([("X-Secret", "1"), ("connection", "close, x-secret"), ("X-Kept", "2")], [("X-Kept", "2")]),
        ([("Connection", "x, , y"), ("X", "1"), ("Y", "2"), ("Z", "3")], [("Z", "3")]),
    ],
)
def test_headers_the_client_names_in_connection_stay_on_the_clients_hop(
        given: list[tuple[str, str]], kept: list[tuple[str, str]]) -> None:
    """RFC 9110 §7.6.1: what ``Connection`` names is for the next hop only (the gateway), so it is not passed on,
    and whatever follows it still is."""
    out = upstream_request_headers(h(*given), PEER, upstream_host=UPSTREAM)
    assert [(name, value) for name, value in out.items() if not name.startswith("X-Forwarded-")
            and name != "Host"] == kept


def test_the_apps_cookies_from_several_cookie_headers_are_joined_as_one() -> None:
    """HTTP/2 clients split ``Cookie`` into one header per cookie; upstream, HTTP/1.1 wants one, joined by
    ``"; "`` (RFC 9113 §8.2.3)."""
    out = upstream_request_headers(h(("Cookie", "a=1"), ("Cookie", "codehub_session=s"), ("Cookie", "b=2")), PEER,
                                   upstream_host=UPSTREAM)
    assert out.getall("Cookie") == ["a=1; b=2"]


@pytest.mark.parametrize(
    ("set_cookie", "name", "domain"),
    [
        ("a=1; Domain=xn--bcher-kva.example", "a", "xn--bcher-kva.example"),
        ("a=1; Domain=..x.example", "a", "x.example"),
    ],
)
def test_only_dots_are_trimmed_from_a_cookie_domain(set_cookie: str, name: str, domain: str) -> None:
    assert cookie_name_and_domain(set_cookie) == (name, domain)


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("http://localhost:3000?next=/a", f"{SHARE}?next=/a"),
        ("http://localhost:3000#/route", f"{SHARE}#/route"),
        ("http://localhost:3000/", f"{SHARE}/"),
    ],
)
def test_rewrite_location_keeps_any_query_or_fragment(location: str, expected: str) -> None:
    assert rewrite_location(location, UP, SHARE) == expected


def answer(*pairs: tuple[str, str], replace: dict[str, str] | None = None, drop_cors: bool = False,
           drop_frame_options: bool = False) -> list[tuple[str, str]]:
    out = downstream_response_headers(
        h(*pairs), public_host="3000-ws1.localhost:8080", public_origin="http://3000-ws1.localhost:8080",
        upstream_origins=UP, replace=replace, drop_cors=drop_cors, drop_frame_options=drop_frame_options)
    return list(out.items())


APP_CORS_AND_FRAMING = (("Access-Control-Allow-Origin", "*"), ("access-control-allow-credentials", "true"),
                        ("X-Frame-Options", "DENY"), ("X-App", "1"))


def test_without_rules_an_apps_cors_and_framing_headers_pass_as_sent() -> None:
    """``passthru`` CORS and no embedding policy: the app answers for itself."""
    out = downstream_response_headers(
        h(*APP_CORS_AND_FRAMING), public_host="3000-ws1.localhost:8080",
        public_origin="http://3000-ws1.localhost:8080", upstream_origins=UP)
    assert list(out.items()) == list(APP_CORS_AND_FRAMING)
    assert ResponseRules() == ResponseRules({}, drop_cors=False, drop_frame_options=False)


def test_replaced_cors_drops_every_access_control_header_of_the_apps() -> None:
    """Replaced, never merged: the app's ``*`` next to the gateway's answer would let the browser pick."""
    assert answer(*APP_CORS_AND_FRAMING, drop_cors=True,
                  replace={"Access-Control-Allow-Origin": "https://a.test", "Vary": "Origin"}) == [
        ("X-Frame-Options", "DENY"), ("X-App", "1"), ("Access-Control-Allow-Origin", "https://a.test"),
        ("Vary", "Origin"),
    ]


@pytest.mark.parametrize("name", ["Access-Control", "Access-Controlled-By"])
def test_an_apps_header_that_only_starts_like_a_cors_one_survives_replaced_cors(name: str) -> None:
    """Replaced CORS drops the ``Access-Control-*`` family only, by its dash; other names of the app's pass."""
    assert answer((name, "app"), drop_cors=True) == [(name, "app")]


def test_an_embedding_policy_drops_the_apps_x_frame_options() -> None:
    """With ``frame-ancestors`` from the policy, an app's ``X-Frame-Options: DENY`` would still forbid the
    embedding the owner allowed (browsers obey both)."""
    assert answer(*APP_CORS_AND_FRAMING, drop_frame_options=True) == [
        ("Access-Control-Allow-Origin", "*"), ("access-control-allow-credentials", "true"), ("X-App", "1"),
    ]


def test_the_gateways_csp_and_vary_join_the_apps_and_other_replacements_win() -> None:
    """Several ``Content-Security-Policy`` headers all apply (the strictest wins), so the gateway's
    ``frame-ancestors`` is added to the app's own policy, never put in its place; ``Vary`` lists join; any other
    header the gateway sets (the IDE's ``X-Frame-Options``) is the only one of its name."""
    assert answer(("Content-Security-Policy", "default-src 'self'"), ("Vary", "Accept-Encoding"),
                  ("X-Frame-Options", "ALLOWALL"), ("X-App", "1"),
                  replace={"Content-Security-Policy": "frame-ancestors 'self'", "Vary": "Origin",
                           "X-Frame-Options": "SAMEORIGIN"}) == [
        ("Content-Security-Policy", "default-src 'self'"), ("Vary", "Accept-Encoding"),
        ("X-Frame-Options", "SAMEORIGIN"), ("X-App", "1"),
        ("Content-Security-Policy", "frame-ancestors 'self'"), ("Vary", "Origin"),
    ]


def test_only_the_first_location_is_kept() -> None:
    """Two ``Location`` headers are two redirect targets; the visitor gets one, the first, rewritten."""
    assert answer(("Location", "http://localhost:3000/first"), ("Location", "https://elsewhere.test/")) == [
        ("Location", "http://3000-ws1.localhost:8080/first"),
    ]


def test_response_rules_cannot_be_changed_once_made() -> None:
    """One ``ResponseRules`` serves every request of a policy (``plan._framing_rules`` caches them)."""
    rules = ResponseRules()
    with pytest.raises(dataclasses.FrozenInstanceError):
        rules.drop_cors = True  # type: ignore[misc]


def test_verdicts_kept_by_name_hold_after_a_flood_of_new_names() -> None:
    """What becomes of a header is judged once per name as sent and remembered (``_ByName``). A sender that
    invents names by the thousand must neither grow that memory without bound nor change a verdict: a name's
    fate is the same on its first request, on its next, and after the flood."""
    from gateway.proxy import headers as module

    client = h(("Cookie", "codehub_session=s; app=1"), ("X-Forwarded-User", "mallory"), ("X-App", "1"))

    def sent() -> list[tuple[str, str]]:
        out = upstream_request_headers(client, PEER, upstream_host=UPSTREAM)
        return [(name, value) for name, value in out.items() if name in ("Cookie", "X-Forwarded-User", "X-App")]

    first = sent()
    assert first == sent() == [("X-App", "1"), ("Cookie", "app=1")]
    for round_ in range(3):
        flood = h(*((f"X-Junk-{round_}-{n}", "1") for n in range(400)))
        assert len(upstream_request_headers(flood, PEER, upstream_host=UPSTREAM)) == 400 + 4  # + forwarding, Host
        assert len(downstream_response_headers(flood, public_host="h", public_origin="http://h",
                                               upstream_origins=UP)) == 400
        assert len(module._UPSTREAM_VERDICTS) <= 512
        assert len(module._DOWNSTREAM_VERDICTS) <= 512
    assert sent() == first


@pytest.mark.parametrize("name", ["X-Forwarded-" + "a" * 100, "X_Forwarded_User" + "_" * 80, "x" * 70 + "-ok"])
def test_long_names_are_judged_every_time_and_alike(name: str) -> None:
    """Names past ``_LONGEST_KEPT`` are not remembered (a few thousand 8 KiB names would be megabytes), and are
    judged exactly as short ones are: forwarding lookalikes dropped, the rest passed."""
    from gateway.proxy import headers as module

    passes = name.endswith("-ok")
    for _ in range(2):
        out = upstream_request_headers(h((name, "1")), PEER, upstream_host=UPSTREAM)
        assert (name in out) is passes
        assert name not in module._UPSTREAM_VERDICTS


def test_names_are_remembered_up_to_a_bound_and_forgotten_all_at_once_past_it() -> None:
    """Each new name of a sender's is remembered, up to ``_MOST_KEPT`` of them: the next new name empties the
    memory and starts it again, so a flood of invented names costs a bounded dict, and the dozen names a browser
    sends on every request are judged once, not on each."""
    from gateway.proxy import headers as module

    memory = module._UPSTREAM_VERDICTS
    memory.clear()
    for n in range(module._MOST_KEPT - 1):
        upstream_request_headers(h((f"X-Name-{n}", "1"), ("X-App", "1")), PEER, upstream_host=UPSTREAM)
        assert len(memory) == n + 2  # X-App is remembered once
    assert len(memory) == module._MOST_KEPT
    upstream_request_headers(h(("X-Past-The-Bound", "1")), PEER, upstream_host=UPSTREAM)
    assert list(memory) == ["X-Past-The-Bound"]


def test_the_names_of_one_request_are_all_remembered() -> None:
    """A browser's dozen names, or an app's, are judged on their first request and not again: the memory holds
    many names at once, not only the last one judged."""
    from gateway.proxy import headers as module

    sent = [(f"X-Header-{n}", "1") for n in range(12)]
    module._UPSTREAM_VERDICTS.clear()
    module._DOWNSTREAM_VERDICTS.clear()
    upstream_request_headers(h(*sent), PEER, upstream_host=UPSTREAM)
    downstream_response_headers(h(*sent), public_host="h", public_origin="http://h", upstream_origins=UP)
    assert set(module._UPSTREAM_VERDICTS) == set(module._DOWNSTREAM_VERDICTS) == {name for name, _ in sent}


def test_a_name_or_connection_value_as_long_as_the_longest_kept_is_remembered_and_a_longer_one_is_not() -> None:
    """Up to ``_LONGEST_KEPT`` characters, names and ``Connection`` values are the ones in use, read once; a
    longer one is read each time and never held, or a sender's 8 KiB inventions would fill the memory."""
    from gateway.proxy import headers as module

    module._named_in_kept.cache_clear()
    kept, longer = "X-" + "k" * (module._LONGEST_KEPT - 2), "X-" + "l" * (module._LONGEST_KEPT - 1)
    for connection in ("keep-alive, X-Secret".ljust(module._LONGEST_KEPT), "close, X-Secret".ljust(len(longer))):
        out = upstream_request_headers(h(("Connection", connection), ("X-Secret", "1"), (kept, "1"), (longer, "2")),
                                       PEER, upstream_host=UPSTREAM)
        assert (out[kept], out[longer], "X-Secret" in out) == ("1", "2", False)
    assert kept in module._UPSTREAM_VERDICTS
    assert longer not in module._UPSTREAM_VERDICTS
    assert module._named_in_kept.cache_info().currsize == 1


@pytest.mark.parametrize(("connection", "remembered"), [
    (("keep-alive, X-Secret",), True),
    (("keep-alive, " + " " * 80 + "X-Secret",), False),  # past what is remembered
    (("close", "X-Secret"), False),
])
def test_connection_names_hold_whether_remembered_or_not(connection: tuple[str, ...], remembered: bool) -> None:
    """``Connection`` values are remembered when short (``keep-alive`` on nearly every request, each sender in its
    own spelling); a long one, or several, are read each time and never kept (a sender's 8 KiB values would
    otherwise be held). Either way what they name stays on the hop, both ways, request after request."""
    from gateway.proxy import headers as module

    module._named_in_kept.cache_clear()
    for _ in range(2):
        pairs = (*(("Connection", value) for value in connection), ("X-Secret", "1"), ("X-App", "1"))
        up = upstream_request_headers(h(*pairs), PEER, upstream_host=UPSTREAM)
        assert "X-Secret" not in up
        assert up["X-App"] == "1"
        down = downstream_response_headers(h(*pairs), public_host="h", public_origin="http://h", upstream_origins=UP)
        assert list(down.items()) == [("X-App", "1")]
    assert module._named_in_kept.cache_info().currsize == remembered


@pytest.mark.parametrize("named", [("Set-Cookie", "a=1"), ("Location", "/next"), ("Access-Control-Allow-Origin", "*"),
                                   ("X-Frame-Options", "DENY")])
def test_an_answers_header_its_connection_names_stays_on_the_apps_hop_whatever_its_kind(
        named: tuple[str, str]) -> None:
    """The headers the gateway rewrites or judges (cookies, redirects, CORS, framing) are no exception to
    RFC 9110 §7.6.1: named in the app's ``Connection``, they were for the gateway alone."""
    assert answer(("Connection", named[0].lower()), named, ("X-App", "1")) == [("X-App", "1")]


# --- clearing cookies over the limit ----------------------------------------------------------------------------

PAD = "x" * 400
HUB_HOST = "hub.example.com:8443"
SHARED = "preview.example.com"  # the preview domain: its previews can set cookies for it and example.com


def names(lines: list[str]) -> list[str]:
    return list(dict.fromkeys(line.partition(";")[0].partition("=")[0] for line in lines))


@pytest.mark.parametrize(("cookies", "expected"), [
    ([f"a={PAD}; b={PAD}; c={PAD}"], ["a", "b"]),  # header order among equals; then 400 bytes, under half of 1,024
    ([f"a=1; b={PAD}x; c={PAD}xx; d={PAD}"], ["c", "b"]),  # the largest first
    ([f"a={PAD}", f"b={PAD}; c={PAD}"], ["a", "b"]),  # over several Cookie headers
    ([f"a={PAD}; a={PAD}; b={PAD}"], ["a"]),  # one name twice (two domains or paths): both go with it
    ([f"a={PAD}; b=1"], []),  # already under half
    ([f"__Host-codehub_session={PAD * 3}"], []),  # host-only by its prefix: never on a parent
    ([f"__Hostess={PAD * 3}"], ["__Hostess"]),  # the prefix is ``__Host-``, dash and all
    ([f"codehub_session={PAD * 3}"], ["codehub_session"]),  # a copy of the gateway's name planted on a parent
    ([f"\udcff={PAD}; a\x01={PAD}; c={PAD}; d={PAD}"], ["c", "d"]),  # names that could not be written back
    ([f"a b={PAD}; \u00e9={PAD}; a,1={PAD}; d={PAD}"], ["a b", "a,1", "\u00e9"]),  # names Chromium keeps, odd
    ([f"a\x7f={PAD}; a\tb={PAD}; c={PAD}"], ["a\tb", "c"]),  # DEL is a control character, a tab is not
    ([f"   a  ={PAD};b={PAD}; c={PAD}"], ["a", "b"]),  # spaces around a name are not part of it
    ([f"\ta\t={PAD};b={PAD}; c={PAD}"], ["a", "b"]),  # nor tabs
], ids=["order", "largest", "headers", "twice", "under", "host-prefix", "host-lookalike", "gateway-name",
        "unwritable", "odd", "control", "spaces", "tabs"])
def test_the_largest_cookies_are_cleared_until_half_the_limit_is_left(cookies: list[str],
                                                                       expected: list[str]) -> None:
    assert names(clearing_cookies(cookies, HUB_HOST, "/", shared=SHARED, limit=1024, secure=False)) == expected


def test_each_cookie_is_cleared_for_every_parent_domain_and_path_it_could_have() -> None:
    """Not on a preview's own host: a cookie there is its app's, which no sibling could set. Under HTTPS a
    ``Partitioned`` one too (set by a page at the top, or in a frame of another site), which only a ``Partitioned``
    line clears, and each ``SameSite=None``: in a frame of another site a ``Lax`` line is not taken."""
    lines = clearing_cookies([f"pad={PAD * 3}"], "3000-ws1.Preview.Example.com.:443", "/a/b?c=/d", shared=SHARED,
                             limit=1024, secure=True)
    assert lines == [f"pad=; Domain={domain}; Path={path}; Max-Age=0; Secure; SameSite=None{partitioned}"
                     for path in ("/", "/a", "/a/", "/a/b") for domain in ("preview.example.com", "example.com")
                     for partitioned in ("", "; Partitioned")]


@pytest.mark.parametrize(("host", "shared", "domains"), [
    ("hub.example.com", "preview.example.com", ["example.com"]),  # beside the previews
    ("example.com", "example.com", ["example.com"]),  # the hub on the preview domain itself: reached by every preview
    ("code.example.com", "preview.code.example.com", ["code.example.com", "example.com"]),  # above them
    ("hub.other.com", "preview.example.com", []),  # another site: out of every preview's reach
    ("ide-ws1.preview.example.com", "preview.example.com", ["preview.example.com", "example.com"]),
    ("1.example.com", "preview.example.com", ["example.com"]),  # a name may begin with digits, only not end in them
    ("HUB.example.com", "Preview.Example.COM.", ["example.com"]),  # names in any case, the root's dot or not
])
def test_cookies_are_cleared_where_a_preview_could_have_set_them(host: str, shared: str,
                                                                  domains: list[str]) -> None:
    lines = clearing_cookies([f"pad={PAD * 3}"], host, "/", shared=shared, limit=1024, secure=False)
    assert lines == [f"pad=; Domain={domain}; Path=/; Max-Age=0" for domain in domains]


@pytest.mark.parametrize("cookie", [PAD * 3, f" \t{PAD * 3}\t "])
def test_a_cookie_without_a_name_is_cleared_by_its_value(cookie: str) -> None:
    """Without the white space (spaces and tabs, RFC 6265 §5.2) around it, which the browser never kept."""
    assert clearing_cookies([cookie], HUB_HOST, "/", shared=SHARED, limit=1024, secure=False) == [
        f"{PAD * 3}; Domain=example.com; Path=/; Max-Age=0"]


@pytest.mark.parametrize("host", ["127.0.0.1:8080", "[::1]:8080", "localhost:8080", "3000-ws1.localhost:8080",
                                  "a;Domain=evil.test.x", "a..b.example.com", "-a.example.com", "",
                                  "a b.example.com", "\u00e9.example.com"])
def test_a_host_without_a_dns_parent_gets_nothing_cleared(host: str) -> None:
    assert clearing_cookies([f"pad={PAD * 3}"], host, "/", shared=SHARED, limit=1024, secure=False) == []


@pytest.mark.parametrize(("path", "paths"), [
    ("/", ["/"]),
    ("/a/", ["/", "/a", "/a/"]),
    ("/a/b;Domain=evil/c", ["/", "/a", "/a/"]),  # up to what could not be written back (no cookie path holds it)
    ("/a/b c", ["/", "/a", "/a/"]),
    ("/a,b/", ["/", "/a,b", "/a,b/"]),
    ("/a!b/~", ["/", "/a!b", "/a!b/", "/a!b/~"]),  # the first and last printable bytes
    ("/a/b\x7fc/", ["/", "/a", "/a/"]),  # DEL is not
    ("*", ["/"]),
    ("/" + "/".join("abcdefghij") + "/", ["/"] + [f"/{'/'.join('abcdefghij'[:n])}{end}" for n in range(1, 11)
                                                for end in ("", "/")]),
    ("/" + "/".join("x" * 40), ["/", *[f"/{'/'.join('x' * n)}{end}" for n in range(1, 33) for end in ("", "/")][:63]]),
])
def test_the_paths_cleared_are_those_a_cookie_sent_to_the_path_can_have(path: str, paths: list[str]) -> None:
    lines = clearing_cookies([f"pad={PAD * 3}"], HUB_HOST, path, shared=SHARED, limit=1024, secure=False)
    assert lines == [f"pad=; Domain=example.com; Path={at}; Max-Age=0" for at in paths]


def test_one_answer_clears_a_bounded_number_of_cookies() -> None:
    many = "; ".join(f"c{n}={PAD}" for n in range(200))
    assert len(names(clearing_cookies([many], HUB_HOST, "/", shared=SHARED, limit=1024, secure=False))) == MOST_CLEARED


def test_one_answer_keeps_to_a_number_of_bytes() -> None:
    """A cookie needs a line per path, parent domain and partitioning, each with its name: past ``MOST_BYTES``
    (Chromium refuses a head over 256 KB) the next answer clears more; of a cookie whose lines alone are more, those
    of its shortest paths (a helper's attack: 4 KB names at a deep path made 4 MB of lines)."""
    deep = "/" + "/".join("x" * 20)
    many = "; ".join(f"c{n:02}{'n' * 4000}=x" for n in range(40))
    host = "a.b.preview.example.com"
    lines = clearing_cookies([many], host, deep, shared=SHARED, limit=1024, secure=True)
    assert sum(len(line) for line in lines) <= MOST_BYTES < sum(len(line) for line in lines) + len(lines[0])
    assert names(lines) == [f"c00{'n' * 4000}"]
    assert lines[0].endswith("; Domain=preview.example.com; Path=/; Max-Age=0; Secure; SameSite=None")
    short = "; ".join(f"c{n:02}={PAD}" for n in range(40))
    lines = clearing_cookies([short], host, deep, shared=SHARED, limit=1024, secure=True)
    per_cookie = sum(len(line) for line in lines if line.startswith("c00="))
    assert len(names(lines)) == MOST_BYTES // per_cookie + 1 < 39  # the last one's shortest paths
    lines = clearing_cookies([short], host, "/", shared=SHARED, limit=1024, secure=True)
    assert len(names(lines)) == 39  # all: the last one fits under half


def test_an_empty_piece_of_a_cookie_header_clears_nothing() -> None:
    """``;;`` holds no cookie: a line for it would be ``; Domain=…``, a cookie of no name and no value."""
    assert clearing_cookies([f"__Host-a={PAD * 3};; b=1; ="], HUB_HOST, "/", shared=SHARED, limit=1024,
                            secure=False) == ["b=; Domain=example.com; Path=/; Max-Age=0"]


def test_lines_that_fill_the_bytes_exactly_are_all_sent() -> None:
    """``MOST_BYTES`` is the most, not one past it."""
    line = "=; Domain=example.com; Path=/; Max-Age=0"
    long_names = [letter * (MOST_BYTES // 2 - len(line)) for letter in "ab"]
    lines = clearing_cookies(["; ".join(f"{name}=1" for name in long_names)], HUB_HOST, "/", shared=SHARED,
                             limit=1024, secure=False)
    assert [len(one) for one in lines] == [MOST_BYTES // 2] * 2


@pytest.mark.parametrize(("cookie", "cleared"), [
    ("; ".join(f"a{n}=" + "\u00e9" * 200 for n in range(3)), ["a0", "a1"]),  # 1,218 bytes, 615 characters
    ("; ".join(f"a{n}=" + "\u20ac" * 100 for n in range(2)), ["a0"]),  # three bytes each: 608 bytes, 208 characters
])
def test_sizes_are_counted_in_bytes_as_the_limit_is(cookie: str, cleared: list[str]) -> None:
    assert names(clearing_cookies([cookie], HUB_HOST, "/", shared=SHARED, limit=1024, secure=False)) == cleared


@pytest.mark.parametrize(("cookie", "cleared"), [
    (f"a={PAD}; a={PAD}; b={PAD}", ["a"]),
    (f"a={PAD}; a={PAD}; b={PAD}; c={PAD}", ["a", "b"]),  # still over half after both: the next name, not a again
])
def test_a_name_that_comes_twice_is_cleared_once(cookie: str, cleared: list[str]) -> None:
    """Two cookies of one name (on two domains, or paths) are both cleared by its lines, and counted so."""
    assert clearing_cookies([cookie], HUB_HOST, "/", shared=SHARED, limit=1024, secure=False) == [
        f"{name}=; Domain=example.com; Path=/; Max-Age=0" for name in cleared]


def test_clearing_stops_once_exactly_half_the_limit_is_left() -> None:
    """At most half is the goal: a cookie that would take what is left below it stays."""
    half = "x" * (512 - len("a="))
    assert names(clearing_cookies([f"a={half}; b={half}"], HUB_HOST, "/", shared=SHARED, limit=1024,
                                  secure=False)) == ["a"]

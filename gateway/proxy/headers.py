"""Header hygiene between client and upstream, as pure functions over header lists.

The gateway is the only party allowed to speak about the client: forwarded and identity headers from the
client are replaced (kept only from a configured trusted proxy), and everything the gateway consumed (its own
cookies, credentials, share tokens) is removed before the request leaves for the upstream.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from multidict import CIMultiDict, CIMultiDictProxy, istr

HOP_BY_HOP = frozenset(
    istr(name)
    for name in (
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    )
)
FORWARDING = frozenset(
    istr(name) for name in ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-prefix",
                            "x-forwarded-port", "x-real-ip", "forwarded")
)
IDENTITY = frozenset(
    istr(name) for name in ("x-forwarded-user", "x-forwarded-email", "x-forwarded-groups",
                            "x-forwarded-preferred-username", "x-codehub-assertion", "x-auth-request-user",
                            "x-auth-request-email", "remote-user")
)
COOKIE_PREFIXES = ("__Host-codehub", "codehub_")
_WEBSOCKET_HANDSHAKE = frozenset(
    istr(name) for name in ("sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                            "sec-websocket-protocol", "sec-websocket-accept")
)
Headers = CIMultiDict[str] | CIMultiDictProxy[str]


@dataclass(frozen=True, slots=True)
class ClientFacts:
    """What the gateway knows about the hop it received the request on."""

    peer: str
    scheme: str
    public_host: str
    trusted: bool


@dataclass(frozen=True, slots=True)
class ResponseRules:
    """What the gateway's policies change on an upstream response (framing, CORS)."""

    replace: Mapping[str, str] = field(default_factory=dict)
    drop_cors: bool = False
    drop_frame_options: bool = False


def _named_in_connection(headers: Headers) -> set[str]:
    names: set[str] = set()
    for value in headers.getall("connection", ()):
        names.update(token.strip().lower() for token in value.split(",") if token.strip())
    return names


def strip_hop_by_hop(headers: Headers, *, keep_websocket: bool = False) -> CIMultiDict[str]:
    """Drop hop-by-hop headers and any header the sender named in ``Connection`` (RFC 9110 §7.6.1)."""
    named = _named_in_connection(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()  # the sets hold lower-case names; ``istr`` does not make membership case-blind
        if lower in HOP_BY_HOP or lower in named:
            continue
        if not keep_websocket and lower in _WEBSOCKET_HANDSHAKE:
            continue
        out.add(name, value)
    return out


def gateway_cookie(name: str) -> bool:
    return name.startswith(COOKIE_PREFIXES)


def strip_gateway_cookies(cookie_header: str) -> str:
    """Remove the gateway's own cookies from a ``Cookie`` header, keeping the app's cookies byte for byte."""
    kept = [part for part in cookie_header.split(";") if part.strip() and not gateway_cookie(part.strip())]
    return ";".join(kept).strip()


def upstream_request_headers(
    headers: Headers,
    client: ClientFacts,
    *,
    upstream_host: str,
    prefix: str | None = None,
    strip_authorization: bool = False,
    identity: Mapping[str, str] | None = None,
) -> CIMultiDict[str]:
    """The headers an upstream sees: cleaned, with the gateway's forwarding and identity headers set."""
    out = strip_hop_by_hop(headers)
    for name in ("expect", "host", "content-length"):
        out.popall(name, None)
    if "content-length" in headers and "transfer-encoding" not in headers:
        out["Content-Length"] = headers["content-length"]
    for name in IDENTITY:
        out.popall(name, None)
    if strip_authorization:
        out.popall("authorization", None)
    cookies = [strip_gateway_cookies(value) for value in out.popall("cookie", ())]
    if any(cookies):
        out["Cookie"] = "; ".join(cookie for cookie in cookies if cookie)
    trusted_chain = ", ".join(out.getall("x-forwarded-for", ())) if client.trusted else None
    scheme = (out.get("x-forwarded-proto") if client.trusted else None) or client.scheme
    public_host = (out.get("x-forwarded-host") if client.trusted else None) or client.public_host
    for name in FORWARDING:
        out.popall(name, None)
    out["X-Forwarded-For"] = f"{trusted_chain}, {client.peer}" if trusted_chain else client.peer
    out["X-Forwarded-Proto"] = scheme
    out["X-Forwarded-Host"] = public_host
    if prefix:
        out["X-Forwarded-Prefix"] = prefix
    out["Host"] = upstream_host
    for name, value in (identity or {}).items():
        out[name] = value
    return out


def cookie_name_and_domain(set_cookie: str) -> tuple[str, str | None]:
    """Name and ``Domain`` attribute of a ``Set-Cookie`` value, read the way browsers do (RFC 6265 §5.2)."""
    first, *attributes = set_cookie.split(";")
    name = first.partition("=")[0].strip()
    domain = None
    for attribute in attributes:
        key, _, value = attribute.partition("=")
        if key.strip().lower() == "domain":
            domain = value.strip().lstrip(".").lower() or None
    return name, domain


def allowed_set_cookie(set_cookie: str, public_host: str) -> bool:
    """An upstream may only set host-only cookies (or name its own host) and never the gateway's cookie names."""
    name, domain = cookie_name_and_domain(set_cookie)
    if gateway_cookie(name):
        return False
    return domain is None or domain == public_host.partition(":")[0].lower()


def rewrite_location(location: str, upstream_origins: Iterable[str], public_origin: str, prefix: str = "") -> str:
    """Point redirects that name the upstream (or an absolute path under a prefix) back at the public URL."""
    for origin in upstream_origins:
        if location == origin or location.startswith((origin + "/", origin + "?", origin + "#")):
            return public_origin + prefix + location[len(origin) :]
    if prefix and location.startswith("/") and not location.startswith(("//", prefix + "/")) and location != prefix:
        return prefix + location
    return location


def downstream_response_headers(
    headers: Headers,
    *,
    public_host: str,
    public_origin: str,
    upstream_origins: Iterable[str],
    prefix: str = "",
    keep_websocket: bool = False,
    replace: Mapping[str, str] | None = None,
    drop_cors: bool = False,
    drop_frame_options: bool = False,
) -> CIMultiDict[str]:
    """The headers a client sees from an upstream response, after hygiene and rewriting.

    ``replace`` headers are set by the gateway (framing policy, CORS answers); with ``drop_cors`` every upstream
    ``Access-Control-*`` header goes first, so answers are replaced, never merged.
    """
    out = strip_hop_by_hop(headers, keep_websocket=keep_websocket)
    if drop_cors:
        for name in [name for name in out if name.lower().startswith("access-control-")]:
            out.popall(name, None)
    if drop_frame_options:
        out.popall("x-frame-options", None)
    if "location" in out:
        out["Location"] = rewrite_location(out["location"], upstream_origins, public_origin, prefix)
    cookies = out.popall("set-cookie", ())
    for cookie in cookies:
        if allowed_set_cookie(cookie, public_host):
            out.add("Set-Cookie", cookie)
    for name, value in (replace or {}).items():
        if name.lower() == "content-security-policy":
            out.add(name, value)
        else:
            out[name] = value
    return out

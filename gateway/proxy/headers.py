"""Header hygiene between client and upstream, as pure functions over header lists.

The gateway is the only party allowed to speak about the client: forwarded and identity headers from the
client are replaced (kept only from a configured trusted proxy), and everything the gateway consumed (its own
cookies, credentials, share tokens) is removed before the request leaves for the upstream.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from multidict import CIMultiDict, CIMultiDictProxy

# Lower-case names: a header's ``name.lower()`` is looked up in these sets (``istr`` would not make that
# membership case-blind).
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade",
})
FORWARDING = frozenset({
    "x-real-ip", "forwarded", "x-forwarded", "x-original-url", "x-original-uri", "x-original-host",
    "x-original-method", "x-original-forwarded-for", "x-rewrite-url", "x-client-ip", "true-client-ip",
    "x-cluster-client-ip", "client-ip",
})
"""Besides every ``X-Forwarded-*``: what proxies in front of apps write about the client and the original request."""
IDENTITY = frozenset({
    "x-forwarded-user", "x-forwarded-email", "x-forwarded-groups", "x-forwarded-preferred-username",
    "x-codehub-assertion", "x-auth-request-user", "x-auth-request-email", "remote-user",
})
COOKIE_PREFIXES = ("__Host-codehub", "codehub_")
_WEBSOCKET_HANDSHAKE = frozenset({
    "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol",
    "sec-websocket-accept",
})
_NOT_UPSTREAM = HOP_BY_HOP | _WEBSOCKET_HANDSHAKE | FORWARDING | IDENTITY | {"expect", "host", "content-length"}
"""Never passed upstream as the client sent them (the gateway sets its own where needed)."""
_NOT_DOWNSTREAM = HOP_BY_HOP | _WEBSOCKET_HANDSHAKE | {"clear-site-data", "content-length"}
"""``Clear-Site-Data`` from an app would sign its visitors out of the gateway on that origin. ``Content-Length``
is framing, like ``Transfer-Encoding``: the lane writes it from the body it sends (``server.forward.shape_answer``),
so no header of the app's (``Connection: content-length``) can leave an answer unframed."""


class _Fate(enum.Enum):
    """What becomes of a header on its way through, by its name: upstream a request's, downstream an answer's."""

    PASS = enum.auto()
    DROP = enum.auto()
    COOKIE = enum.auto()
    AUTHORIZATION = enum.auto()
    FORWARDED_FOR = enum.auto()
    FORWARDED_PROTO = enum.auto()
    FORWARDED_HOST = enum.auto()
    CORS = enum.auto()
    SET_COOKIE = enum.auto()
    LOCATION = enum.auto()
    FRAME_OPTIONS = enum.auto()


# Python 3.11's Enum classes answer every attribute lookup through ``EnumType.__getattr__``, several times the cost
# of a module global: the per-header loops compare against these.
_PASS, _DROP, _COOKIE, _AUTHORIZATION = _Fate.PASS, _Fate.DROP, _Fate.COOKIE, _Fate.AUTHORIZATION
_FORWARDED_FOR, _FORWARDED_PROTO, _FORWARDED_HOST = _Fate.FORWARDED_FOR, _Fate.FORWARDED_PROTO, _Fate.FORWARDED_HOST
_CORS, _SET_COOKIE, _LOCATION = _Fate.CORS, _Fate.SET_COOKIE, _Fate.LOCATION
_MOST_KEPT = 512
_LONGEST_KEPT = 64


class _ByName(dict[str, _Fate]):
    """What becomes of a header, by its name as sent, judged once: a browser sends the same dozen names, spelt the
    same, on every request, and an app answers with its own dozen. Names are the sender's to choose, so only short
    ones are kept, and only so many: a sender that floods it with new names empties it, and the names in use come
    back on their next request."""

    def __init__(self, judge: Callable[[str], _Fate]) -> None:
        super().__init__()
        self._judge = judge  # given the name in lower case

    def __missing__(self, name: str) -> _Fate:
        verdict = self._judge(name.lower())
        if len(name) <= _LONGEST_KEPT:
            if len(self) >= _MOST_KEPT:
                self.clear()
            self[name] = verdict
        return verdict


_DOWNSTREAM_SPECIAL = {
    **dict.fromkeys(_NOT_DOWNSTREAM, _DROP), "set-cookie": _SET_COOKIE, "location": _LOCATION,
    "x-frame-options": _Fate.FRAME_OPTIONS,
}


def _downstream_verdict(lower: str) -> _Fate:
    special = _DOWNSTREAM_SPECIAL.get(lower)
    if special is not None:
        return special
    return _CORS if lower.startswith("access-control-") else _PASS


_DOWNSTREAM_VERDICTS = _ByName(_downstream_verdict)
Headers = CIMultiDict[str] | CIMultiDictProxy[str]


class ClientFacts(NamedTuple):
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
    cookies: tuple[str, ...] = ()
    """``Set-Cookie`` values of the gateway's own, added beside the app's (whose own it never replaces)."""


def _named_in_connection(headers: Headers) -> frozenset[str]:
    """Header names listed in ``Connection`` (RFC 9110 §7.6.1), besides the hop-by-hop ones always dropped."""
    values = headers.getall("connection", ())
    if len(values) == 1 and len(values[0]) <= _LONGEST_KEPT:
        return _named_in_kept(values[0])
    return frozenset().union(*map(_named_in, values))


def _named_in(value: str) -> frozenset[str]:
    return frozenset(token.strip().lower() for token in value.split(",")) - HOP_BY_HOP


_named_in_kept = functools.lru_cache(maxsize=32)(_named_in)
"""Nearly every request and answer says ``Connection: keep-alive``, each sender in a spelling of its own."""


def gateway_cookie(name: str) -> bool:
    return name.startswith(COOKIE_PREFIXES)


def strip_gateway_cookies(cookie_header: str) -> str:
    """Remove the gateway's own cookies from a ``Cookie`` header, keeping the app's cookies byte for byte."""
    kept = []
    for part in cookie_header.split(";"):
        name = part.lstrip()
        if name and not name.startswith(COOKIE_PREFIXES):  # a name never starts with a space: lstrip is enough
            kept.append(part)
    return ";".join(kept).strip()


def _underscored(lower: str) -> bool:
    """Forwarding and identity headers spelt with ``_``: servers that read ``_`` as ``-`` (CGI, WSGI, nginx with
    underscores on) would take ``X_Forwarded_User`` for the gateway's ``X-Forwarded-User``, and
    ``Content_Length`` for a second length."""
    dashed = lower.replace("_", "-")
    return dashed in _NOT_UPSTREAM or dashed.startswith("x-forwarded-")


_FORWARDED = {"x-forwarded-for": _FORWARDED_FOR, "x-forwarded-proto": _FORWARDED_PROTO,
              "x-forwarded-host": _FORWARDED_HOST}


def _upstream_verdict(lower: str) -> _Fate:
    if lower in _NOT_UPSTREAM or lower.startswith("x-forwarded-") or ("_" in lower and _underscored(lower)):
        return _FORWARDED.get(lower, _DROP)
    if lower == "cookie":
        return _COOKIE
    return _AUTHORIZATION if lower == "authorization" else _PASS


_UPSTREAM_VERDICTS = _ByName(_upstream_verdict)


def upstream_request_headers(
    headers: Headers,
    client: ClientFacts,
    *,
    upstream_host: str,
    strip_authorization: bool = False,
    identity: Mapping[str, str] | None = None,
) -> CIMultiDict[str]:
    """The headers an upstream sees: cleaned, with the gateway's forwarding and identity headers set.

    One pass over the client's headers: this runs for every proxied request."""
    named = _named_in_connection(headers) if "connection" in headers else ()
    out: CIMultiDict[str] = CIMultiDict()
    cookies: list[str] = []
    chain: list[str] = []
    scheme = public_host = ""
    verdicts = _UPSTREAM_VERDICTS
    for name, value in headers.items():
        verdict = verdicts[name]
        if named and name.lower() in named:
            continue
        if verdict is _PASS:
            out.add(name, value)
        elif verdict is _COOKIE:
            if kept := strip_gateway_cookies(value):
                cookies.append(kept)
        elif verdict is _AUTHORIZATION:
            if not strip_authorization:
                out.add(name, value)
        elif client.trusted:  # the rest never pass; a trusted proxy's forwarding headers are read
            if verdict is _FORWARDED_FOR:
                chain.append(value)
            elif verdict is _FORWARDED_PROTO:  # the nearest hop's word: a proxy may add its own after the client's
                scheme = _last(value)
            elif verdict is _FORWARDED_HOST:
                public_host = _last(value)
    if "content-length" in headers and "transfer-encoding" not in headers:  # as read: 005 is 5 (octal to some)
        out["Content-Length"] = headers["content-length"].lstrip("0") or "0"
    if cookies:
        out["Cookie"] = "; ".join(cookies)
    out["X-Forwarded-For"] = f"{', '.join(chain)}, {client.peer}" if chain else client.peer
    out["X-Forwarded-Proto"] = scheme or client.scheme
    out["X-Forwarded-Host"] = public_host or client.public_host
    out["Host"] = upstream_host
    if identity:
        out.extend(identity)
    return out


def _last(value: str) -> str:
    """The last item of a forwarding header (one a proxy extended reads ``client, proxy``)."""
    return value.rpartition(",")[2].strip()


def cookie_name_and_domain(set_cookie: str) -> tuple[str, str | None]:
    """Name and ``Domain`` attribute of a ``Set-Cookie`` value, read the way browsers do (RFC 6265 §5.2).

    The name is the one the cookie comes back with: a cookie without a name is sent back as its bare value
    (RFC 6265bis, retrieval), so ``=codehub_session=x`` comes back as ``codehub_session=x``."""
    first, *attributes = set_cookie.split(";")
    name, _, value = first.partition("=")
    name = name.strip() or value.partition("=")[0].strip()
    domain = None
    for attribute in attributes:
        key, _, value = attribute.partition("=")
        if key.strip().lower() == "domain":
            domain = value.strip().lstrip(".").lower() or None
    return name, domain


def allowed_set_cookie(set_cookie: str, public_host: str) -> bool:
    """An upstream may only set host-only cookies (or name its own host) and never the gateway's cookie names (as
    the cookie comes back: ``cookie_name_and_domain``).

    Nor one with bytes that are not UTF-8 (held here as surrogates): it is judged on this text, and aiohttp's head
    writer leaves the surrogates out, so ``\\xffcodehub_session=x`` or ``a=1; \\xffDomain=parent`` would reach the
    browser as what the check would have dropped."""
    if not _utf8(set_cookie):
        return False
    name, domain = cookie_name_and_domain(set_cookie)
    if gateway_cookie(name):
        return False
    return domain is None or domain == public_host.partition(":")[0].lower()


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def rewrite_location(location: str, upstream_origins: Iterable[str], public_origin: str) -> str:
    """Point redirects that name the upstream back at the public URL."""
    for origin in upstream_origins:
        if location == origin or location.startswith((origin + "/", origin + "?", origin + "#")):
            return public_origin + location[len(origin) :]
    return location


def downstream_response_headers(
    headers: Headers,
    *,
    public_host: str,
    public_origin: str,
    upstream_origins: Iterable[str],
    replace: Mapping[str, str] | None = None,
    drop_cors: bool = False,
    drop_frame_options: bool = False,
    add_cookies: Iterable[str] = (),
) -> CIMultiDict[str]:
    """The headers a client sees from an upstream response, after hygiene and rewriting (``add_cookies``: the
    gateway's own ``Set-Cookie`` values, after the app's).

    ``replace`` headers are set by the gateway (framing policy, CORS answers); with ``drop_cors`` every upstream
    ``Access-Control-*`` header goes first, so answers are replaced, never merged. ``Vary`` is the exception: the
    gateway's ``Vary: Origin`` joins the app's, or caches would mix up the app's variants.
    """
    named = _named_in_connection(headers) if "connection" in headers else ()
    out: CIMultiDict[str] = CIMultiDict()
    cookies: list[str] = []
    located = False
    verdicts = _DOWNSTREAM_VERDICTS
    for name, value in headers.items():
        verdict = verdicts[name]
        if verdict is _PASS:
            if not named or name.lower() not in named:
                out.add(name, value)
        elif verdict is _DROP or (named and name.lower() in named):
            continue
        elif verdict is _CORS:
            if not drop_cors:
                out.add(name, value)
        elif verdict is _SET_COOKIE:
            if allowed_set_cookie(value, public_host):
                cookies.append(value)
        elif verdict is _LOCATION:
            if not located:
                out.add(name, rewrite_location(value, upstream_origins, public_origin))
                located = True
        elif not drop_frame_options:  # X-Frame-Options
            out.add(name, value)
    for cookie in cookies:
        out.add("Set-Cookie", cookie)
    for cookie in add_cookies:
        out.add("Set-Cookie", cookie)
    for name, value in (replace or {}).items():
        if name.lower() in ("content-security-policy", "vary"):
            out.add(name, value)
        else:
            out[name] = value
    return out


_NOT_IN_A_COOKIE = frozenset(map(chr, [*range(0x20), 0x7F])) - {"\t"}
"""What a cookie's name cannot hold (besides ``;`` and ``=``, which end it): Chromium keeps any other name, a space,
a comma or ``é`` in it, and each must be cleared as it came."""
_PATH_BYTES = frozenset(map(chr, range(0x21, 0x7F))) - {";"}
_DOMAIN_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
MOST_CLEARED = 64
"""Cookies cleared by one answer at most (the next answer clears more)."""
MOST_BYTES = 96 << 10
"""Bytes of ``Set-Cookie`` lines in one answer at most: a cookie needs one per parent domain, path and partitioning,
each repeating its name (up to 4 KB), and Chromium refuses an answer whose head passes 256 KB."""
_MOST_PATHS = 64


def clearing_cookies(cookie_headers: Iterable[str], host: str, path: str, *, shared: str, limit: int,
                     secure: bool) -> list[str]:
    """``Set-Cookie`` values that clear the largest cookies of a ``Cookie`` header over ``limit`` (in bytes, as the
    limit is) where a preview could have set them, until what is left would be at most half of it.

    A preview's script may set cookies for the domains above its host — ``shared``, the preview domain, and those
    above it — which reach the hub and every other preview under them (only ``__Host-`` names are out of its
    reach), and a few of 3 KB each make every request of its visitor's browser to the site too large to read, for
    as long as they last. A ``Cookie`` header names no domain nor path, so each cookie is cleared on each of those
    domains that ``host`` is or is under but the last label (the browser refuses one it would not have set, such
    as a public suffix), for each path that matches ``path``, and under HTTPS also as a ``Partitioned`` cookie
    (kept apart per top-level site, cleared only as one), each ``SameSite=None`` (a ``Lax`` line is not taken in a
    frame of another site). Never on a preview's own host: a cookie there is its app's, not one a sibling could
    set, and clearing it would let a preview sign its visitors out of another's app. A name that could not be
    written back as it came (not UTF-8, a control character) is left out, and so is a ``__Host-`` name (never on a
    shared domain). ``MOST_CLEARED`` cookies and ``MOST_BYTES`` of lines at most (of the last, the lines of its
    shortest paths that fit)."""
    pairs = []
    for header in cookie_headers:
        for part in header.split(";"):
            pair = part.strip(" \t")
            name, eq, value = pair.partition("=")
            if not eq:  # a cookie without a name comes back as its bare value: cleared by ``value; Max-Age=0``
                name, value = "", name
            pairs.append((len(pair.encode("utf-8", "surrogateescape")), name.strip(" \t"), value))
    domains = _within_reach(host, shared)
    if not domains:
        return []
    paths = _matching_paths(path)
    tails = (("; Max-Age=0; Secure; SameSite=None", "; Max-Age=0; Secure; SameSite=None; Partitioned") if secure
             else ("; Max-Age=0",))
    total = sum(size for size, _name, _value in pairs)
    cleared: set[str] = set()
    lines: list[str] = []
    room = MOST_BYTES
    for size, name, value in sorted(pairs, key=lambda pair: -pair[0]):
        key = name or value
        if key in cleared:  # the same name on another domain or path: its lines clear this one too
            total -= size
            continue
        if total <= limit // 2 or len(cleared) >= MOST_CLEARED:
            break
        if not _writable(key) or key.startswith("__Host-"):
            continue
        first = f"{name}=" if name else value
        for line in (f"{first}; Domain={domain}; Path={at}{tail}" for at in paths for domain in domains
                     for tail in tails):
            room -= len(line.encode())
            if room < 0:  # what fits, the shortest paths first
                return lines
            lines.append(line)
        cleared.add(key)
        total -= size
    return lines


def _writable(name: str) -> bool:
    return bool(name) and _NOT_IN_A_COOKIE.isdisjoint(name) and _utf8(name)


def _within_reach(host: str, shared: str) -> list[str]:
    """The domains a preview under ``shared`` can set cookies for (``shared`` and each above it) that ``host``
    (without its port) is or is under, but the last label, when it is a DNS name."""
    name = host.rpartition(":")[0] if host.count(":") == 1 else host
    labels = name.lower().rstrip(".").split(".")
    if not all(_DOMAIN_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        return []  # an IP address, or not a name at all
    shared = shared.lower().rstrip(".")
    return [domain for domain in (".".join(labels[at:]) for at in range(len(labels) - 1))
            if domain == shared or shared.endswith("." + domain)]


def _matching_paths(path: str) -> list[str]:
    """Every cookie path that matches a request for ``path`` (RFC 6265 §5.1.4): ``/``, and each prefix that ends
    before or at a ``/`` of it, the whole path too — up to its first character that could not be written back as
    an attribute (no cookie path holds a ``;``); the shortest first, ``_MOST_PATHS`` at most (32 levels)."""
    path = path.partition("?")[0]
    if not path.startswith("/"):
        return ["/"]
    found = ["/"]
    for at, char in enumerate(path[1:], 1):
        if char not in _PATH_BYTES:
            break
        if char == "/":
            found += [path[:at], path[: at + 1]]
    else:
        found.append(path)
    return list(dict.fromkeys(found))[:_MOST_PATHS]

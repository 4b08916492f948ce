"""CORS and framing for previews, as pure functions of the policy and the request's origin.

Preflights are answered by the gateway (no credentials needed, as browsers never send them on preflights) unless
the port's rule says ``passthru``. Upstream ``Access-Control-*`` headers are either left alone (passthru) or
replaced, never merged, so the browser never sees two contradicting answers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from multidict import CIMultiDictProxy
from yarl import URL

from gateway.auth.sessions import is_prefetch
from gateway.edge.policy import CorsRule, Policy
from gateway.edge.routing import Hosts, Kind, route
from gateway.errors import GatewayError
from gateway.lifecycle import WorkspaceSpec

SAME_WORKSPACE = "same-workspace"
SAME_OWNER = "same-owner"


def is_preflight(method: str, headers: Mapping[str, str]) -> bool:
    return method == "OPTIONS" and "Origin" in headers and "Access-Control-Request-Method" in headers


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def needs_same_origin(method: str, headers: Mapping[str, str]) -> bool:
    """A write or a WebSocket: what a page on another origin must not do with a visitor's cookie."""
    return method not in _SAFE_METHODS or "Upgrade" in headers


def same_origin_or_admitted(headers: CIMultiDictProxy[str], own_origin: str, admits: Callable[[str], bool]) -> bool:
    """Did this come from ``own_origin``, or an origin the port's CORS rule admits?

    Exactly one ``Origin`` is needed on a WebSocket upgrade (browsers always send it; two are a forgery). A write
    without one is from a client that is not a browser, unless Fetch Metadata says a browser sent it from
    elsewhere."""
    origins = headers.getall("Origin", ())
    if len(origins) > 1:
        return False
    if not origins:
        return "Upgrade" not in headers and headers.get("Sec-Fetch-Site", "same-origin") == "same-origin"
    origin = origins[0]
    return origin == own_origin or (origin != "null" and admits(origin))


def wakes_from_here(headers: CIMultiDictProxy[str], own_origin: str, admits: Callable[[str], bool]) -> bool:
    """May a request a visitor's cookie vouches for wake its sleeping workspace?

    Previews are one site, so a page on any of them makes its visitor's browser send their cookies to the others
    on frames, images, fetches, prefetches and navigations it starts itself, and a wake costs what sleeping saves
    (a COLD one, a restore). A wake is the visitor's to start: their own navigation to it (typed, or a link they
    clicked: not a frame, nor a navigation a script started without a click, nor a prefetch or prerender, which
    Chromium sends for a page's speculation rules as if typed), a request from this origin, or from one the port's
    CORS rule admits with credentials. (A page's script may still navigate there inside a click of the visitor's
    anywhere on it: headers cannot tell that from a link; the visitor then sees the waiting page, one wake a click.)
    Browsers say where a request came from (Fetch Metadata) only to HTTPS and ``localhost`` origins; a request that
    says nothing (a script, or a browser over plain HTTP) wakes it unless its ``Origin`` is another's (a
    credentialed fetch)."""
    if is_prefetch(headers):
        return False
    if headers.get("Sec-Fetch-Site") in ("same-origin", "none"):
        return True
    if headers.get("Sec-Fetch-Mode") == "navigate" and headers.get("Sec-Fetch-Dest") == "document" and \
            headers.get("Sec-Fetch-User") == "?1":
        return True
    return same_origin_or_admitted(headers, own_origin, admits)


def reloads_by_itself(headers: CIMultiDictProxy[str], own_origin: str) -> bool:
    """May a page of the gateway's own answering this request reload by itself (the 502 page, the 431 relief)? Its
    reload is a navigation from the host's own origin, which ``wakes_from_here`` lets wake a sleeping workspace:
    only when the visitor's own navigation brought the page, not a frame nor a navigation a page's script started
    elsewhere (whose tab would then wake the workspace at each reload, for as long as it stays open)."""
    return wakes_from_here(headers, own_origin, lambda _origin: False)


def rule_for(policy: Policy, port: int) -> CorsRule | None:
    return next((rule for rule in policy.cors if not rule.ports or port in rule.ports), None)


def origin_allowed(rule: CorsRule, origin: str, spec: WorkspaceSpec, hosts: Hosts,
                   owner_of: Callable[[str], str | None]) -> bool:
    if origin in rule.allow_origins or "*" in rule.allow_origins:
        return True
    try:
        url = URL(origin)
    except (ValueError, IndexError):  # an Origin no browser would send ("http://host:8080.evil.test"; yarl
        return False  # raises IndexError on "http://[]@")
    if not url.absolute or url.scheme != hosts.scheme or url.path not in ("", "/"):
        return False
    try:
        target = route(url.raw_authority, "/", hosts)
    except GatewayError:
        return False
    if target.kind is not Kind.PREVIEW or target.workspace is None:
        return False
    if SAME_WORKSPACE in rule.allow_origins and target.workspace == spec.id:
        return True
    return SAME_OWNER in rule.allow_origins and owner_of(target.workspace) == spec.owner


def response_headers(rule: CorsRule, origin: str) -> dict[str, str]:
    headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    if rule.allow_credentials:
        headers["Access-Control-Allow-Credentials"] = "true"
    if rule.expose_headers:
        headers["Access-Control-Expose-Headers"] = ", ".join(rule.expose_headers)
    return headers


_HEADER_NAMES = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+(?:[ \t]*,[ \t]*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*")
"""A comma-separated list of header names (RFC 9110 tokens), as browsers send in Access-Control-Request-Headers."""


def preflight_headers(rule: CorsRule, origin: str, requested_headers: str) -> dict[str, str]:
    headers = response_headers(rule, origin)
    headers["Access-Control-Allow-Methods"] = ", ".join(rule.allow_methods)
    if requested_headers:
        if "*" not in rule.allow_headers:
            headers["Access-Control-Allow-Headers"] = ", ".join(rule.allow_headers)
        elif _HEADER_NAMES.fullmatch(requested_headers):  # echoed back: header names only, nothing else
            headers["Access-Control-Allow-Headers"] = requested_headers
    headers["Access-Control-Max-Age"] = str(rule.max_age)
    headers["Vary"] = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
    return headers


def frame_ancestors(policy: Policy) -> str:
    """The ``Content-Security-Policy`` value for preview responses and the gateway's pages on preview hosts."""
    return " ".join(("frame-ancestors", "'self'", *policy.embedding.frame_ancestors))


HUB_FRAME_HEADERS = {"Content-Security-Policy": "frame-ancestors 'none'", "X-Frame-Options": "DENY"}

"""Who is calling, from what the request carries: a share token, a bearer token, or a session cookie.

Pure apart from in-memory lookups: nothing here touches the network or records anything. Anything the gateway
consumes is reported so the proxy strips it (``Authorization`` it understood, share tokens in the URL).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from typing import NamedTuple

from multidict import CIMultiDictProxy
from yarl import URL

from gateway.auth.identity import Identity
from gateway.auth.sessions import Sessions, cookie_name, is_embedded, read_cookie, set_cookie
from gateway.auth.store import API_PREFIX, SHARE_PREFIX, ApiToken, ShareLink, TokenStore
from gateway.edge.policy import Grant
from gateway.edge.routing import local_path
from gateway.errors import BadRequest, Forbidden, GatewayError, Redirect, Unauthorized

SHARE_PARAM = "codehub_share"
SESSION = "session"
SHARE = "share"
HANDOFF = "handoff"
_STATE = re.compile(r"[A-Za-z0-9_-]{24}")  # what token_urlsafe(18) makes: a hand-off state this gateway set


class Credentials(NamedTuple):
    identity: Identity | None
    grant: Grant | None
    link: ShareLink | None
    consumed_authorization: bool
    path: str
    stale_link: ShareLink | None = None  # the share cookie names a link that was revoked or has expired
    by_cookie: bool = False
    """A gateway cookie vouches for the caller: a browser sends it on requests other origins make, too."""
    presented: ShareLink | None = None
    """A share link in the URL or a bearer token: it counts a use, once the request is acted on."""
    in_url: bool = False
    """The share token came in the URL (``path`` is the URL without it)."""
    api_token: ApiToken | None = None
    """The API token the caller presented: its use is noted once the request is acted on."""


def split_share_param(raw_path: str) -> tuple[str, str | None]:
    """Remove ``codehub_share=…`` from a raw path+query, keeping every other byte of the query as sent."""
    path, mark, query = raw_path.partition("?")
    if not mark or SHARE_PARAM not in query:
        return raw_path, None
    token = None
    kept = []
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if name == SHARE_PARAM:
            token = value
        else:
            kept.append(part)
    return (f"{path}?{'&'.join(kept)}" if kept else path), token


def share_refusal(link: ShareLink | None, now: float) -> GatewayError | None:
    """Why a share link cannot be used (unknown, revoked, expired), or None when it can."""
    if link is None:
        return Unauthorized("This share link is not valid. Ask its owner for a new one.", code="share-invalid")
    if link.revoked is not None:
        return Forbidden("This share link was revoked by its owner.", code="share-revoked")
    if now >= link.expires:
        return Forbidden("This share link has expired. Ask its owner for a new one.", code="share-expired")
    return None


def _check_link(link: ShareLink | None, now: float) -> ShareLink:
    refusal = share_refusal(link, now)
    if refusal is not None:
        raise refusal
    assert link is not None
    return link


def stale_share_refusal(credentials: Credentials, headers: Mapping[str, str], secure: bool,
                        now: float) -> GatewayError | None:
    """A browser whose share cookie names a dead link hears why (and loses the cookie), not a sign-in page. In a
    frame the cookie was set partitioned, and only a ``Partitioned`` one replaces it."""
    if credentials.stale_link is None:
        return None
    refusal = share_refusal(credentials.stale_link, now)
    if refusal is not None:
        refusal.cookies = (set_cookie(cookie_name(SHARE, secure), "", max_age=0, secure=secure,
                                      embedded=is_embedded(headers)),)
    return refusal


def grant_of(link: ShareLink) -> Grant:
    return Grant(link.id, link.workspace, link.port, link.audience, tuple(link.people),  # type: ignore[arg-type]
                 link.created)


def the_authorization(headers: CIMultiDictProxy[str]) -> str:
    """The request's one Authorization header ("" when none). Two are refused: which one counts would be a guess a
    proxy in front may make differently, and a gateway token in the second would be neither read nor stripped."""
    authorizations = headers.getall("Authorization", ())
    if len(authorizations) > 1:
        raise BadRequest("Send one Authorization header, not several.", code="bad-authorization")
    return authorizations[0] if authorizations else ""


def authenticate(method: str, headers: CIMultiDictProxy[str], path: str, host: str, *, sessions: Sessions,
                 store: TokenStore, secure: bool, preview: bool, now: float) -> Credentials:
    """Who is calling; raises the refusal when a token presented is not valid.

    ``preview``: share links apply (a port, not the IDE). A bearer token of the gateway's is consumed here,
    whether or not it applies, so it never reaches a workspace. Nothing is recorded: a share link presented is
    reported (``presented``) for whoever acts on the request to count."""
    identity: Identity | None = None
    link: ShareLink | None = None
    presented: ShareLink | None = None
    api_token: ApiToken | None = None
    consumed = False
    path, share_token = split_share_param(path)
    if share_token is not None and preview:
        link = presented = _check_link(store.find_share(share_token), now)
        if method in ("GET", "HEAD"):
            return Credentials(None, grant_of(link), link, False, path, presented=link, in_url=True)
    authorization = the_authorization(headers)
    if authorization[:7].lower() == "bearer ":
        token = authorization[7:].strip()
        if token.startswith(SHARE_PREFIX):
            consumed = True
            if preview:
                link = presented = _check_link(store.find_share(token), now)
        elif token.startswith(API_PREFIX):
            record = api_token = store.find_api_token(token)
            if record is None:
                raise Unauthorized("This API token is not valid.", code="token-invalid")
            identity = record.identity()
            consumed = True
    by_cookie = False
    if identity is None:
        session = read_cookie(headers, cookie_name(SESSION, secure))
        if session:
            opened = sessions.read(session, host, store.ended_sign_ins)
            if opened is not None:
                identity, by_cookie = opened.identity, True
    stale = None
    if link is None and preview:
        claims = sessions.read_state(read_cookie(headers, cookie_name(SHARE, secure)), host)
        candidate = store.shares.get(str(claims.get("share"))) if claims else None
        if candidate is not None and candidate.active(now):
            link = candidate
            by_cookie = True
        elif candidate is not None:
            stale = candidate
    return Credentials(identity, grant_of(link) if link else None, link, consumed, path, stale, by_cookie, presented,
                       api_token=api_token)


def share_cookie_redirect(credentials: Credentials, host: str, headers: CIMultiDictProxy[str], *,
                          sessions: Sessions, secure: bool, now: float) -> Redirect:
    """A share token in a navigation's URL becomes a cookie on this host, and the URL loses it (no leak through
    Referer or the app's logs)."""
    link = credentials.link
    assert link is not None
    lifetime = int(link.expires - now)
    value = sessions.sign_state({"share": link.id}, host, lifetime)
    cookie = set_cookie(cookie_name(SHARE, secure), value, max_age=lifetime, secure=secure,
                        embedded=is_embedded(headers))
    return Redirect(local_path(credentials.path), cookies=(cookie,))


class EmbedSignIn(Unauthorized):
    """Inside an iframe a redirect to the hub would loop (its cookie is third-party there): instead this page
    offers sign-in in a popup, which hands the code back to the frame."""

    template = "embed_sign_in.html"

    def __init__(self, handoff_url: str, cookies: tuple[str, ...]) -> None:
        super().__init__("Sign in to see this preview.", code="user-unauthenticated", cookies=cookies)
        self.handoff_url = handoff_url


def handoff_state(headers: CIMultiDictProxy[str], secure: bool) -> str | None:
    """The hand-off state this browser holds for this host, when it is one this gateway could have set."""
    state = read_cookie(headers, cookie_name(HANDOFF, secure))
    return state if state is not None and _STATE.fullmatch(state) else None


def sign_in_redirect(headers: CIMultiDictProxy[str], public_url: str, hub_url: str, *,
                     secure: bool) -> Unauthorized | Redirect:
    """Send a browser to sign in, remembering where it was going.

    A preview or IDE host cannot see the hub's cookie, so it asks the hub for a hand-off code, bound to a random
    state kept in a cookie on that host: the code only works back in this same browser. A browser already on its
    way (another tab of this host, restored with it) goes with the state it has, so that every tab's code works,
    and without setting it again: a state lasts five minutes from the first of them, or until a code bound to it
    is used, however many sign-ins start meanwhile.
    """
    state, embedded = handoff_state(headers, secure), is_embedded(headers)
    cookies: tuple[str, ...] = ()
    if state is None:
        state = secrets.token_urlsafe(18)
        cookies = (set_cookie(cookie_name(HANDOFF, secure), state, max_age=300, secure=secure, embedded=embedded),)
    query = {"target": public_url, "state": state, **({"popup": "1"} if embedded else {})}
    location = str(URL(hub_url).with_path("/auth/handoff").with_query(query))
    if embedded:
        return EmbedSignIn(location, cookies)
    return Redirect(location, status=302, cookies=cookies)

"""The hub's sign-in routes and the preview side of the hand-off. Thin shells: decisions live elsewhere."""

from __future__ import annotations

import secrets
import time
from typing import Any
from urllib.parse import urlencode

import aiohttp_jinja2
from aiohttp import web
from multidict import MultiDictProxy
from yarl import URL

from gateway.auth.authenticate import HANDOFF, SESSION, handoff_state
from gateway.auth.identity import Identity
from gateway.auth.keys import same_secret
from gateway.auth.oidc import Pkce, SignInFailed
from gateway.auth.sessions import (
    Session,
    SignIn,
    cookie_is_alone,
    cookie_name,
    is_embedded,
    is_prefetch,
    read_cookie,
    set_cookie,
)
from gateway.edge.routing import Kind, local_path, normalise_host, route
from gateway.errors import BadRequest, Forbidden, GatewayError, Redirect, ServiceUnavailable
from gateway.server.context import GATEWAY, Gateway
from gateway.server.expect import read_own

LOGIN = "login"
ID_TOKEN = "idtoken"
_LOGIN_TTL = 600
# Sign-ins one browser may have under way at once (tabs restored together, links opened from a chat): each keeps
# its own state, nonce and verifier in the one login cookie, newest first.
_PENDING = 4
_STATE_BLOCK = 64
_SEALED_LONGEST = 1536  # of the state's sealed next, in the IdP's address (about 1,000 ASCII characters of next)
_ID_TOKEN_BYTES = 2500  # beside a session cookie of up to 4 KB and the login cookie, within one 8 KB Cookie header


def hub_session(request: web.BaseRequest, gateway: Gateway) -> Session | None:
    token = read_cookie(request.headers, cookie_name(SESSION, gateway.config.secure))
    return gateway.auth.sessions.read(token, gateway.hosts.hub, gateway.auth.store.ended_sign_ins) if token else None


def hub_identity(request: web.BaseRequest, gateway: Gateway) -> Identity | None:
    session = hub_session(request, gateway)
    return session.identity if session is not None else None


def check_same_origin(request: web.BaseRequest, gateway: Gateway) -> None:
    """Cookie-authenticated changes must come from the hub's own pages (CSRF defence beside SameSite)."""
    origin = request.headers.get("Origin")
    if origin is not None:
        if origin.rstrip("/") != gateway.hosts.hub_url(""):
            raise Forbidden("This request came from another site and was refused.", code="cross-site-request")
        return
    if request.headers.get("Sec-Fetch-Site") not in ("same-origin", None) or "Sec-Fetch-Site" not in request.headers:
        raise Forbidden("This request did not say where it came from and was refused.", code="cross-site-request")


async def read_form(request: web.Request) -> MultiDictProxy[str | bytes | bytearray | web.FileField]:
    """A form as browsers send it, or 400: on bodies no browser sends aiohttp raises LookupError (an unknown
    charset), UnicodeDecodeError or ValueError (a multipart body without its boundary)."""
    try:
        return await read_own(request, request.post)
    except (ValueError, LookupError):
        raise BadRequest("This form could not be read.", code="bad-form") from None


async def _session_cookie(request: web.BaseRequest, gateway: Gateway, identity: Identity) -> tuple[str, SignIn]:
    """The hub's cookie for a sign-in, and that sign-in: a new one (``TooManySignIns`` for a person signing in in
    a loop: see ``Sessions.begin``), unless this browser is signed in as them already, whose sign-in it keeps. Any
    page can send its visitor through ``/auth/login``, and with the IdP's session the browser comes back at once:
    a new sign-in each time would replace the cookie of one that previews still hold, which Sign out (it ends the
    cookie's sign-in) could then no longer end, and spend the visitor's sign-ins of the hour.

    A sign-in of someone else in this browser (a shared computer) ends first: its cookie is about to go, the only
    handle Sign out had on it, and its previews' sessions in this browser would go on acting as that person."""
    sessions = gateway.auth.sessions
    current = hub_session(request, gateway)
    if current is not None and current.identity.subject == identity.subject:
        sign_in = current.sign_in
    else:
        if current is not None:
            await _end_sign_in(gateway, current)
        sign_in = sessions.begin(identity)
    token = sessions.issue(identity, gateway.hosts.hub, sign_in)
    secure = gateway.config.secure
    return set_cookie(cookie_name(SESSION, secure), token, max_age=sign_in.left(), secure=secure), sign_in


async def _end_sign_in(gateway: Gateway, session: Session) -> None:
    """End ``session``'s sign-in everywhere it reached, or ``sign-out-not-recorded`` (nothing ended: its cookie
    stays for another try)."""
    try:
        await gateway.auth.store.end_sign_in(session.sign_in)
    except GatewayError as exc:  # the store's file or API
        raise ServiceUnavailable(
            "Signing out could not be recorded just now, so you are still signed in, here and on the previews "
            "and IDEs this sign-in opened. Try again in a moment.", code="sign-out-not-recorded"
        ) from exc


def _expired(name: str, secure: bool) -> str:
    return set_cookie(cookie_name(name, secure), "", max_age=0, secure=secure)


async def login(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    next_url = local_path(request.query.get("next"))
    if gateway.config.auth.mode == "dev":
        raise Redirect(str(URL("/auth/dev").with_query(next=next_url)), status=302)
    assert gateway.auth.oidc is not None
    pkce, secret, nonce = Pkce.new(), secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    # Beside its secret, the state carries where the sign-in goes, sealed (a preview's URL, and the state of its
    # hand-off, are not the IdP's to read): the login cookie stays small whatever a page sends here, and a tab
    # whose sign-in another pushed out of it can still be sent on (``_lost``). Only the secret binds it to this
    # browser.
    location = await gateway.auth.oidc.authorize_url(
        redirect_uri=gateway.hosts.hub_url("/auth/callback"), state=f"{secret}.{_sealed_next(gateway, next_url)}",
        nonce=nonce, pkce=pkce
    )
    started = {"state": secret, "nonce": nonce, "verifier": pkce.verifier, "until": int(time.time()) + _LOGIN_TTL}
    raise Redirect(location, status=302, cookies=(
        _login_cookie(gateway, [started, *_pending(request, gateway)][:_PENDING]),))


def _pending(request: web.BaseRequest, gateway: Gateway) -> list[dict[str, Any]]:
    """The sign-ins this browser has under way, newest first, each for ten minutes from its start (none when its
    login cookie is absent or forged)."""
    saved = gateway.auth.sessions.read_state(read_cookie(request.headers, cookie_name(LOGIN, gateway.config.secure)),
                                             gateway.hosts.hub)
    entries = saved.get("pending") if saved is not None else None
    now = time.time()
    return [entry for entry in entries if isinstance(entry, dict) and isinstance(entry.get("until"), int)
            and now < entry["until"]] if isinstance(entries, list) else []


def _login_cookie(gateway: Gateway, pending: list[dict[str, Any]]) -> str:
    """The login cookie holding ``pending`` (1.3 KB at most for four), or one that ends it when none are left."""
    secure = gateway.config.secure
    if not pending:
        return _expired(LOGIN, secure)
    value = gateway.auth.sessions.sign_state({"pending": pending}, gateway.hosts.hub, _LOGIN_TTL)
    return set_cookie(cookie_name(LOGIN, secure), value, max_age=_LOGIN_TTL, secure=secure)


def _sealed_next(gateway: Gateway, next_url: str) -> str:
    """The state's sealed part: ``next``, or the hub's page when that would make an address the IdP may refuse as
    too long."""
    for going in (next_url, "/"):
        sealed = gateway.auth.sessions.seal_state({"next": going}, f"sign-in {gateway.hosts.hub}", _LOGIN_TTL,
                                                  block=_STATE_BLOCK)
        if len(sealed) <= _SEALED_LONGEST:
            break
    return sealed


def _going(gateway: Gateway, sealed: str) -> str | None:
    """Where a sign-in goes, from what ``_sealed_next`` sealed (None when this gateway did not seal it so)."""
    going = gateway.auth.sessions.open_state(sealed, f"sign-in {gateway.hosts.hub}")
    next_url = going.get("next") if going is not None else None
    return local_path(next_url) if isinstance(next_url, str) else None


def _lost(request: web.BaseRequest, gateway: Gateway, next_url: str | None,
          pending: list[dict[str, Any]]) -> GatewayError:
    """A callback whose sign-in this browser's cookie does not hold: tabs that set out together each wrote the
    cookie, and only the last write stayed. A browser signed in by now (another tab finished) goes on to where
    this one was going; one with sign-ins still under way (so its cookies work) starts this one again. The code
    is never used: only a sign-in this browser holds may sign it in (else a forged callback could sign a
    visitor in as someone else)."""
    if next_url is not None:
        if hub_session(request, gateway) is not None:
            return Redirect(next_url, status=303)
        if pending:
            return Redirect(str(URL("/auth/login").with_query(next=next_url)), status=303)
    return BadRequest("This sign-in has expired or was started elsewhere. Open the page you wanted again.",
                      code="sign-in-state-mismatch")


async def callback(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    pending = _pending(request, gateway)
    secret, _, sealed = request.query.get("state", "").partition(".")
    saved = next((entry for entry in pending if same_secret(secret, str(entry.get("state")))), None)
    next_url = _going(gateway, sealed)
    if saved is None:
        raise _lost(request, gateway, next_url, pending)
    if "error" in request.query:
        said = request.query.get("error_description") or request.query["error"]
        raise SignInFailed(f"The sign-in service said: {said}.")
    oidc = gateway.auth.oidc
    assert oidc is not None
    tokens = await oidc.exchange(code=request.query.get("code", ""), verifier=str(saved["verifier"]),
                                 redirect_uri=gateway.hosts.hub_url("/auth/callback"))
    claims = await oidc.verify_id_token(tokens["id_token"], str(saved["nonce"]))
    identity = Identity.from_id_token(claims, subject_claim=oidc.settings.username_claim,
                                      groups_claim=oidc.settings.groups_claim)
    if (problem := identity.unsendable()) is not None:
        raise SignInFailed(f"The sign-in service sent {problem}, which this gateway does not accept. Ask its "
                           "administrators to correct the account.")
    session, sign_in = await _session_cookie(request, gateway, identity)
    kept = (_id_token_cookie(gateway, tokens["id_token"], sign_in),) if oidc.settings.sign_out_at_idp else ()
    raise Redirect(next_url or "/", status=303, cookies=(
        session, _login_cookie(gateway, [entry for entry in pending if entry is not saved]), *kept))


def _id_token_cookie(gateway: Gateway, id_token: str, sign_in: SignIn) -> str:
    """The sign-in's ID token, kept for Sign out to hand the IdP as ``id_token_hint``: sealed for that use alone,
    with the sign-in it came with (a browser that drops a cookie too big to keep would otherwise hand on the last
    person's), and only while it is small enough to leave room in the hub's Cookie header. Else the one there goes."""
    sessions, secure = gateway.auth.sessions, gateway.config.secure
    sealed = sessions.seal_state({"id_token": id_token, "sid": sign_in.id}, f"id-token {gateway.hosts.hub}",
                                 sessions.ttl)
    if len(sealed) > _ID_TOKEN_BYTES:
        return _expired(ID_TOKEN, secure)
    return set_cookie(cookie_name(ID_TOKEN, secure), sealed, max_age=int(sessions.ttl), secure=secure)


def _id_token_hint(request: web.BaseRequest, gateway: Gateway, session: Session | None) -> str | None:
    """The kept ID token of the sign-in being signed out, if this browser holds it."""
    secure = gateway.config.secure
    kept = gateway.auth.sessions.open_state(read_cookie(request.headers, cookie_name(ID_TOKEN, secure)),
                                            f"id-token {gateway.hosts.hub}")
    if kept is None or session is None or kept.get("sid") != session.sign_in.id:
        return None
    hint = kept.get("id_token")
    return hint if isinstance(hint, str) else None


@aiohttp_jinja2.template("dev_login.html")
async def dev_form(request: web.Request) -> dict[str, object]:
    gateway = request.app[GATEWAY]
    if gateway.config.auth.mode != "dev":
        raise Redirect(str(URL("/auth/login").with_query(next=local_path(request.query.get("next")))), status=302)
    return {"next": local_path(request.query.get("next")), "identity": hub_identity(request, gateway)}


async def dev_submit(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    if gateway.config.auth.mode != "dev":
        raise Forbidden("Development sign-in is switched off.", code="dev-sign-in-off")
    check_same_origin(request, gateway)
    form = await read_form(request)
    user = str(form.get("user", "")).strip()
    if not user or len(user) > 64 or any(ch.isspace() for ch in user):
        raise BadRequest("Pick a user name without spaces (at most 64 characters).", code="bad-user-name")
    email = str(form.get("email", "")).strip() or (user if "@" in user else f"{user}@example.com")
    groups = tuple(g.strip() for g in str(form.get("groups", "")).split(",") if g.strip())
    identity = Identity(subject=user, email=email, groups=groups, name=user)
    if (problem := identity.unsendable()) is not None:
        raise BadRequest(f"This sign-in has {problem}; pick other values.", code="bad-identity")
    raise Redirect(local_path(str(form.get("next", "/"))), cookies=(
        (await _session_cookie(request, gateway, identity))[0],))


async def logout(request: web.Request) -> web.StreamResponse:
    """Ends the sign-in everywhere it reached: the hub's cookie here, and every session a hand-off gave a preview
    or IDE host, whose cookies the hub cannot touch, through the token store."""
    gateway = request.app[GATEWAY]
    check_same_origin(request, gateway)
    session = hub_session(request, gateway)
    if session is not None:
        await _end_sign_in(gateway, session)
    oidc, location, secure = gateway.auth.oidc, None, gateway.config.secure
    if oidc is not None and oidc.settings.sign_out_at_idp:
        location = await oidc.end_session_url(post_logout_redirect_uri=gateway.hosts.hub_url("/"),
                                              id_token_hint=_id_token_hint(request, gateway, session))
    kept = (_expired(ID_TOKEN, secure),) if oidc is not None else ()
    raise Redirect(location or "/", cookies=(_expired(SESSION, secure), *kept))


async def handoff(request: web.Request) -> web.StreamResponse:
    """Hub side: a signed-in browser gets a one-minute code for the preview host it came from.

    Only for a page the browser opens (a redirect or a popup): previews share the hub's site, so a preview's
    ``fetch`` or frames reach here with the hub's cookie, and each code they had minted would spend one of the
    visitor's hand-offs of the minute (``Sessions.handoff_code``) until every preview refused them. Browsers say
    what a request is for (Fetch Metadata: a ``fetch`` is dest ``empty``, a frame ``iframe``, a page or popup
    ``document``, and a prefetch or prerender says so in ``Sec-Purpose``); a client that says nothing is let
    through as before (browsers say nothing over plain HTTP: there the quota per host is all that holds)."""
    if request.headers.get("Sec-Fetch-Dest", "document") != "document" or is_prefetch(request.headers):
        raise Forbidden("A sign-in to a preview happens in a page of its own, not inside another.",
                        code="handoff-not-a-page")
    gateway = request.app[GATEWAY]
    session = hub_session(request, gateway)
    if session is None:
        raise Redirect(str(URL("/auth/login").with_query(next=request.path_qs)), status=302)
    state = request.query.get("state", "")
    try:
        target = URL(request.query.get("target", ""))
        host = normalise_host(target.raw_authority, gateway.hosts.scheme) if target.absolute else None
        kind = route(target.raw_authority, "/", gateway.hosts).kind if host else None
    except (ValueError, GatewayError):
        host, kind = None, None
    if host is None or kind not in (Kind.PREVIEW, Kind.IDE) or target.scheme != gateway.hosts.scheme or not state:
        raise BadRequest("This sign-in request does not point at a preview or IDE of this gateway.",
                         code="bad-handoff")
    code = gateway.auth.sessions.handoff_code(session, host, state)
    landing = "/_codehub/auth/popup" if request.query.get("popup") else "/_codehub/auth/callback"
    location = target.with_path(landing).with_query(code=code, next=local_path(target.raw_path_qs)).with_fragment(None)
    raise Redirect(str(location), status=302)


async def preview_callback(request: web.Request, gateway: Gateway, host: str, *,
                           cross_site: bool) -> web.StreamResponse:
    """Preview side: trade the code for a cookie on this host and drop the code from the URL by a redirect. The
    state cookie goes with the code it bound."""
    secure = gateway.config.secure
    embedded = is_embedded(request.headers)
    state = handoff_state(request.headers, secure)
    next_url = local_path(request.query.get("next"))
    try:
        signed_in, once, until = gateway.auth.sessions.read_code(request.query.get("code", ""), host, state)
    except BadRequest as refused:
        if refused.code == "handoff-state-mismatch" and _may_go_on(request, gateway, host, state):
            raise Redirect(next_url) from None
        raise
    if not await gateway.auth.store.use_once(once, until):
        raise BadRequest("This sign-in link was already used. Open the page again.", code="handoff-replayed")
    identity, sign_in = signed_in
    token = gateway.auth.sessions.issue(identity, host, sign_in)
    session = set_cookie(cookie_name(SESSION, secure), token, max_age=sign_in.left(),
                         secure=secure, embedded=embedded, cross_site=cross_site)
    expired = set_cookie(cookie_name(HANDOFF, secure), "", max_age=0, secure=secure, embedded=embedded)
    raise Redirect(next_url, cookies=(session, expired))


def _may_go_on(request: web.Request, gateway: Gateway, host: str, state: str | None) -> bool:
    """Whether a tab whose code is bound to another state than this browser's may go back to its page (the code
    unused) rather than get the mismatch page. Tabs of one host that set out at the same moment each set a state,
    and the last stayed: by now either another tab has signed this browser in here (its page just opens), or the
    state that stayed is there to sign in with. Not when two cookies of that name came (one planted for the parent
    domain, or for the callback's path only, which the page would not see): that would go round for ever."""
    token = read_cookie(request.headers, cookie_name(SESSION, gateway.config.secure))
    if token and gateway.auth.sessions.read(token, host, gateway.auth.store.ended_sign_ins) is not None:
        return True
    return state is not None and cookie_is_alone(request.headers, cookie_name(HANDOFF, gateway.config.secure))


async def preview_popup(request: web.Request) -> web.StreamResponse:
    """In the sign-in popup: hand the code to the framed preview that opened it, on this same origin only; without
    it, a link to the callback that the visitor follows (a script's navigation from here would wake a sleeping
    workspace, ``cors.wakes_from_here``)."""
    code, next_path = request.query.get("code", ""), local_path(request.query.get("next"))
    context = {"code": code, "next": next_path, "query": urlencode({"code": code, "next": next_path})}
    response = aiohttp_jinja2.render_template("popup_done.html", request, context)
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


async def jwks(request: web.Request) -> web.Response:
    return web.json_response(request.app[GATEWAY].auth.keys.jwks(), headers={"Cache-Control": "max-age=300"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/auth/login", login)
    app.router.add_get("/auth/callback", callback)
    app.router.add_get("/auth/dev", dev_form)
    app.router.add_post("/auth/dev", dev_submit)
    app.router.add_post("/auth/logout", logout)
    app.router.add_get("/auth/handoff", handoff)
    app.router.add_get("/.well-known/jwks.json", jwks)

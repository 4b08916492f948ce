"""The consent page, on the hub: a visitor answers there what an app may learn of them.

Not on the app's origin, where the owner's scripts could read the page, press its button in a frame of theirs,
or post its form with the visitor's cookie. The hub serves none of the owner's content, is never framed, and
takes a cookie-authenticated form only from its own pages (``check_same_origin``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from aiohttp import web
from yarl import URL

from gateway.auth.identity import Identity
from gateway.auth.store import Consent
from gateway.edge.disclosure import CONSENT_PATH, ConsentPage, asked_of
from gateway.edge.routing import local_path
from gateway.errors import BadRequest, NotFound, Redirect, Unauthorized
from gateway.lifecycle.base import WorkspaceState
from gateway.server.context import GATEWAY, Gateway
from gateway.web.auth_routes import check_same_origin, hub_identity, read_form

_PORT = re.compile("[0-9]{1,5}")


def _asked(gateway: Gateway, identity: Identity, values: Mapping[str, object]) -> tuple[WorkspaceState, int]:
    """The workspace and port named, if that app asks for its visitors' identity and sent this visitor here: the
    ``ask`` of its redirect (see ``disclosure.consent_url``) names them. Asked for by hand, the page would tell
    anyone who owns a workspace and which ports ask, and let them add to its count of visitors who agreed."""
    port = str(values.get("port", ""))
    state = gateway.runtime.get(str(values.get("workspace", "")))
    ask = gateway.auth.sessions.open_state(str(values.get("ask", "")), gateway.hosts.hub)
    if (state is None or not _PORT.fullmatch(port) or int(port) not in state.spec.identity_ports or ask is None
            or ask.get("ask") != asked_of(identity, state.spec, int(port))):
        raise NotFound("This app does not ask for your identity.", code="no-consent-asked")
    return state, int(port)


async def consent_page(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    identity = hub_identity(request, gateway)
    if identity is None:
        raise Redirect(str(URL("/auth/login").with_query(next=request.path_qs)), status=302)
    state, port = _asked(gateway, identity, request.query)
    raise ConsentPage(gateway.policy.identity, state.spec, port, identity, local_path(request.query.get("next")),
                      request.query.get("ask", ""))


async def answer(request: web.Request) -> web.StreamResponse:
    """Recorded for this person and app, then on to where they were going on the app."""
    gateway = request.app[GATEWAY]
    check_same_origin(request, gateway)
    identity = hub_identity(request, gateway)
    if identity is None:
        raise Unauthorized("Sign in to answer.", code="user-unauthenticated")
    form = await read_form(request)
    state, port = _asked(gateway, identity, form)
    choice = form.get("choice")
    if choice not in ("share", "decline"):
        raise BadRequest("Choose Continue or Continue without sharing.", code="bad-consent")
    await gateway.auth.store.record_consent(Consent.answer(identity.subject, state.id, port, owner=state.spec.owner,
                                                           share=choice == "share",
                                                           claims=list(gateway.policy.identity.claims)))
    raise Redirect(gateway.hosts.share_url(state.id, port, local_path(str(form.get("next", "/")))), status=303)


def add_routes(app: web.Application) -> None:
    app.router.add_get(CONSENT_PATH, consent_page)
    app.router.add_post(CONSENT_PATH, answer)

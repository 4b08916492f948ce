"""The management API (``/api/v1``, JSON): workspaces, port visibility, share links, lifecycle, API tokens.

Callers authenticate with an API token (``Authorization: Bearer chk_…``) or the hub session cookie; cookie
callers changing anything must come from the hub's own origin (CSRF). Errors are always JSON.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import re
import secrets
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from html import escape
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from gateway.auth.authenticate import SHARE_PARAM, the_authorization
from gateway.auth.identity import Identity
from gateway.auth.store import API_PREFIX, ApiToken, ShareLink, StoreUnavailable
from gateway.config import WORKSPACE_ID
from gateway.edge.policy import VISIBILITIES, Duration, Reason, describe_duration, visibility
from gateway.edge.policy import role as role_of
from gateway.errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized
from gateway.lifecycle import LABEL_LONGEST, WorkspaceSpec, WorkspaceState, showable
from gateway.server.context import GATEWAY, Gateway
from gateway.server.expect import read_own
from gateway.web.auth_routes import check_same_origin, hub_identity
from gateway.web.pages import JSON_ONLY, phase_words

_SAFE = ("GET", "HEAD")
PAGE_SIZE = 100
"""Workspaces per page of ``GET /api/v1/workspaces`` when the caller names no ``limit``: an admin may see
thousands, and one answer with every port of each would take seconds and megabytes."""
MOST_PER_PAGE = 500
MOST_API_TOKENS = 100
"""Per person: each is kept until revoked, and a file store writes every one out with each change."""
MOST_SHARE_LINKS = 1000
"""Per workspace, revoked and expired ones included until the store forgets them (a day after they expire): the
file store writes every one out with each change, and the hub lists them to everyone who sees the workspace."""
MOST_PORTS = 1024
"""Ports one workspace keeps a choice for (visibility, protocol, label or identity): the Workspace resource's
schema allows 1,024 (``spec.ports``, ``maxProperties`` in the chart's CRD), and past it the cluster refused the
write, which the API answered with a 503 that no retry makes good; the hub lists every port of a workspace to
everyone who sees it (65,535 of them were 11 MB and a quarter of a second per workspace in each snapshot)."""
_LIMIT = re.compile(r"[0-9]{1,4}")
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_COUNTING: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
"""A lock per limit counted (one person's workspaces or tokens, one workspace's links), held while it is counted
and the new one made: see ``_counted``. Weak: gone once nobody waits on it."""


def _counted(what: str) -> asyncio.Lock:
    """The lock under which a count and the creation it allows happen, so that requests sent all at once do not
    each see the count from before the others (on Kubernetes the creation waits on the API: 20 workspaces made
    in parallel against a limit of 2 were all made). Within this process: other replicas may each add one in
    the same moment, so a limit holds to within the number of replicas."""
    lock = _COUNTING.get(what)
    if lock is None:
        lock = _COUNTING[what] = asyncio.Lock()
    return lock


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _showable(value: str) -> str:
    if not showable(value):
        raise ValueError("must be printable text on one line")
    return value


Shown = AfterValidator(_showable)
"""On text the hub shows to others: ``lifecycle.showable``'s rule, as devcontainer.json's labels keep it."""
Principal = Annotated[str, Field(min_length=1, max_length=320), Shown]
"""A user name, an e-mail (at most 254 characters) or ``group:NAME``, as the policy names people."""
Principals = Annotated[list[Principal], Field(max_length=100)]
"""Each share link and workspace keeps its list in the store (a file each change rewrites, or the cluster) and
the hub shows it: the request body's limit alone let one link name 100,000 people."""


class PortChange(_Body):
    """Any of: who can see the port, whether its dev server speaks HTTPS (self-signed), its name, and whether its
    app receives visitors' identity (with their consent)."""

    visibility: Literal["private", "org", "public"] | None = None
    protocol: Literal["http", "https"] | None = None
    label: Annotated[str, Field(max_length=LABEL_LONGEST), Shown] | None = None
    identity: bool | None = None


class NewShare(_Body):
    port: int | None = Field(default=None, ge=1, le=65535)
    audience: Literal["anyone", "org", "people"] = "anyone"
    people: Principals = Field(default_factory=list)
    ttl: Duration | None = None


class NewWorkspace(_Body):
    id: str | None = Field(default=None, pattern=rf"^(?:{WORKSPACE_ID.pattern})$")  # pydantic searches: anchored,
    # or 'a.evil', '../x' and 'Not-An-Id' passed for ids, as each holds one somewhere
    collaborators: Principals = Field(default_factory=list)
    ports: dict[Annotated[int, Field(ge=1, le=65535)], Literal["private", "org", "public"]] = Field(
        default_factory=dict, max_length=MOST_PORTS)


class Collaborators(_Body):
    collaborators: Principals


MOST_TOKEN_NAME = 64
"""The longest name of an API token (the CLI's ``token issue --name`` keeps it too)."""


class NewToken(_Body):
    name: Annotated[str, Field(min_length=1, max_length=MOST_TOKEN_NAME), Shown]


def _bearer(request: web.Request) -> str | None:
    authorization = the_authorization(request.headers)
    return authorization[7:].strip() if authorization[:7].lower() == "bearer " else None


def _api_token(gateway: Gateway, token: str) -> ApiToken | None:
    """The live API token a bearer names (None for anything else: a share token is no API caller)."""
    return gateway.auth.store.find_api_token(token) if token.startswith(API_PREFIX) else None


def caller(request: web.Request) -> Identity:
    """The API caller: bearer API token, or hub session cookie (CSRF-checked for changes)."""
    gateway = request.app[GATEWAY]
    token = _bearer(request)
    if token is not None:
        record = _api_token(gateway, token)
        if record is None:
            raise Unauthorized("This API token is not valid.", code="token-invalid")
        gateway.auth.store.use_api_token(record, time.time())
        return record.identity()
    identity = hub_identity(request, gateway)
    if identity is None:
        raise Unauthorized("Sign in, or send an API token as 'Authorization: Bearer …'.", code="user-unauthenticated",
                           headers={"WWW-Authenticate": 'Bearer realm="codehub"'})
    if request.method not in _SAFE:
        check_same_origin(request, gateway)
    return identity


def still_signed_in(request: web.Request) -> bool:
    """Whether what ``caller`` admitted still holds (for answers that go on: the hub's feed): the API token is not
    revoked, the hub session's sign-in is not signed out. Counts no use."""
    gateway = request.app[GATEWAY]
    token = _bearer(request)
    if token is not None:
        try:
            return _api_token(gateway, token) is not None
        except StoreUnavailable:  # nothing new is sent meanwhile (see ``hub.events``): looked at again once it reads
            return True
    return hub_identity(request, gateway) is not None


async def _body(request: web.Request, model: type[_Body]) -> Any:
    try:
        return model.model_validate(await read_own(request, request.json) if request.can_read_body else {})
    except ValueError as exc:
        if isinstance(exc, ValidationError):
            first = exc.errors()[0]
            field = ".".join(str(part) for part in first["loc"]) or "body"
            raise BadRequest(f"{field}: {first['msg']}", code="invalid-body") from None
        raise BadRequest("The body must be JSON.", code="invalid-body") from None
    except RecursionError:  # nested deeper than the parser goes: no JSON this API takes
        raise BadRequest("The body must be JSON nested at most a few levels deep.", code="invalid-body") from None
    except LookupError:  # a charset in Content-Type that Python has no text codec for (aiohttp decodes by it)
        raise BadRequest("The body must be JSON, in UTF-8.", code="invalid-body") from None


def _mine(request: web.Request, identity: Identity, *, may: Literal["see", "share", "own"] = "see") -> WorkspaceState:
    """The workspace named in the path, if the caller may see it, and ``share`` it (owner and policy admins:
    ports and links) or ``own`` it (the owner alone: who its members are, which opens its IDE to them, and
    whether it exists).

    A handler that changes the workspace reads its body before calling this: the body comes at the client's
    pace, and the change goes to the workspace of that name when it is made. Checked before a body that took
    its time, a workspace its owner deleted meanwhile, and someone else made again under its name, was changed
    by that earlier owner (who named themselves its collaborator, and so opened its IDE)."""
    gateway = request.app[GATEWAY]
    state = gateway.runtime.get(request.match_info["workspace"])
    their_role = role_of(gateway.policy, state.spec, identity) if state is not None else None
    if state is None or their_role is None:
        raise NotFound("There is no workspace with that name that you can see.", code="workspace-not-found")
    if may == "share" and their_role is Reason.COLLABORATOR:
        raise Forbidden("Only the workspace's owner can change how it is shared.", code="owner-only")
    if may == "own" and their_role is not Reason.OWNER:
        raise Forbidden("Only the workspace's owner can change its members or delete it.", code="owner-only")
    return state


def _known_ports(gateway: Gateway, state: WorkspaceState) -> list[int]:
    """Configured and listening ports, without the IDE's."""
    listening = gateway.runtime.listening_ports(state.id) or set()
    return sorted((set(state.spec.ports) | listening) - {state.spec.ide_port})


def consented(gateway: Gateway, workspaces: Iterable[WorkspaceSpec]) -> Counter[tuple[str, int]]:
    """How many visitors agreed to share who they are with each app of these workspaces: one pass over the answers
    for a whole page, not one per workspace. Answers given to an earlier workspace of the same name, someone
    else's, are not these apps'."""
    owners = {spec.id: spec.owner for spec in workspaces}
    answers = gateway.auth.store.consents.values()
    return Counter((c.workspace, c.port) for c in answers
                   if c.share and c.workspace in owners and c.of(owners[c.workspace]))


def workspace_view(gateway: Gateway, state: WorkspaceState, identity: Identity,
                   consents: Counter[tuple[str, int]] | None = None) -> dict[str, Any]:
    """``consents``: :func:`consented` for a page that holds this workspace, when one is shown."""
    listening = gateway.runtime.listening_ports(state.id) or set()
    labels = {**gateway.runtime.port_labels(state.id), **state.spec.labels}
    ports = sorted((set(state.spec.ports) | listening) - {state.spec.ide_port})
    their_role = role_of(gateway.policy, state.spec, identity)
    counts = consented(gateway, [state.spec]) if consents is None else consents
    return {
        "id": state.id, "owner": state.spec.owner, "collaborators": list(state.spec.collaborators),
        "role": their_role.value if their_role else None, "phase": state.phase.value,
        "phase_words": phase_words(state.phase),
        "message": state.message, "last_activity": gateway.activity.last(state.id),
        "ide_url": gateway.hosts.ide_url(state.id),
        "ports": [{"port": port, "label": labels.get(port, ""),
                   "visibility": visibility(gateway.policy, state.spec, port), "listening": port in listening,
                   "protocol": "https" if port in state.spec.https_ports else "http",
                   "url": gateway.hosts.share_url(state.id, port),
                   "identity": port in state.spec.identity_ports, "consented": counts[(state.id, port)]}
                  for port in ports],
    }


async def me(request: web.Request) -> web.Response:
    identity = caller(request)
    return web.json_response({"user": identity.subject, "email": identity.email, "groups": list(identity.groups)})


def asked_page(request: web.Request, default: int | None = None) -> tuple[int, str | None]:
    """``?limit=`` (1–500, default ``PAGE_SIZE``) and ``?cursor=`` (the ``next_cursor`` of the page before: opaque
    to callers, the last id that page showed), checked."""
    raw_limit = request.query.get("limit", str(PAGE_SIZE if default is None else default))
    if not _LIMIT.fullmatch(raw_limit) or not 1 <= int(raw_limit) <= MOST_PER_PAGE:  # ASCII digits only: "²" is a
        # digit to str.isdigit, and int() refuses it (and numbers over 4,300 digits) with a ValueError
        raise BadRequest(f"limit: a number from 1 to {MOST_PER_PAGE}.", code="bad-limit")
    cursor = request.query.get("cursor")
    if cursor is None:
        return int(raw_limit), None
    try:
        after = base64.urlsafe_b64decode(cursor.encode("ascii") + b"==").decode("ascii")
    except (UnicodeError, ValueError, binascii.Error):
        after = ""
    if not WORKSPACE_ID.fullmatch(after):
        raise BadRequest("cursor: not one this API gave out (use next_cursor as it is).", code="bad-cursor")
    return int(raw_limit), after


def cursor_of(workspace: str | None) -> str | None:
    """The cursor that asks for the page after ``workspace`` (None: the first page)."""
    return None if workspace is None else base64.urlsafe_b64encode(workspace.encode()).decode().rstrip("=")


def page_of(gateway: Gateway, identity: Identity, limit: int, after: str | None) -> dict[str, Any]:
    """One page of the workspaces this person may see, in id order, and the ``next_cursor`` (null on the last
    page) that asks for the next. Pages are cut by id, not by position, so a workspace created or deleted between
    two calls never shifts another into or out of view."""
    visible = sorted((state for state in gateway.runtime.list() if after is None or state.id > after),
                     key=lambda s: s.id)
    page: list[WorkspaceState] = []
    more = False
    for state in visible:
        if role_of(gateway.policy, state.spec, identity) is None:
            continue
        if len(page) == limit:
            more = True
            break
        page.append(state)
    consents = consented(gateway, (state.spec for state in page))
    return {"workspaces": [workspace_view(gateway, state, identity, consents) for state in page],
            "next_cursor": cursor_of(page[-1].id) if more else None}


async def list_workspaces(request: web.Request) -> web.Response:
    return web.json_response(page_of(request.app[GATEWAY], caller(request), *asked_page(request)))


async def get_workspace(request: web.Request) -> web.Response:
    identity = caller(request)
    state = _mine(request, identity)
    return web.json_response(workspace_view(request.app[GATEWAY], state, identity))


async def create_workspace(request: web.Request) -> web.Response:
    """A new workspace owned by the caller; without an id one is generated (not guessable, as DESIGN asks)."""
    identity = caller(request)
    gateway = request.app[GATEWAY]
    new: NewWorkspace = await _body(request, NewWorkspace)
    workspace_id = new.id or "".join(secrets.choice(_ID_ALPHABET) for _ in range(12))
    spec = WorkspaceSpec(id=workspace_id, owner=identity.subject, collaborators=tuple(new.collaborators),
                         ports=dict(new.ports))
    most = gateway.policy.workspaces.most_per_person
    async with _counted(f"workspaces of {identity.subject.strip().lower()}"):  # as is_subject compares owners
        if (gateway.runtime.features().get("create")  # else the runtime says why it makes none
                and sum(1 for state in gateway.runtime.list() if identity.is_subject(state.spec.owner)) >= most):
            raise Conflict(f"You own {most} workspaces, as many as the policy lets one person have: delete one "
                           "first.", code="too-many-workspaces")
        counts = consented(gateway, [spec])  # first: a token store that cannot be read refuses before the act
        state = await gateway.runtime.create(spec)
    return web.json_response(workspace_view(gateway, state, identity, counts), status=201)


async def delete_workspace(request: web.Request) -> web.Response:
    """Owner only: the workspace goes with its pod, home and snapshots; links to it stop working."""
    identity = caller(request)
    state = _mine(request, identity, may="own")
    await request.app[GATEWAY].runtime.delete(state.id)
    return web.json_response({"id": state.id, "deleted": True})


async def set_collaborators(request: web.Request) -> web.Response:
    identity = caller(request)
    change: Collaborators = await _body(request, Collaborators)  # first: see ``_mine``
    state = _mine(request, identity, may="own")
    gateway = request.app[GATEWAY]
    counts = consented(gateway, [state.spec])  # as in create_workspace
    state = await gateway.runtime.update(state.id, collaborators=tuple(change.collaborators))
    return web.json_response(workspace_view(gateway, state, identity, counts))


async def set_port(request: web.Request) -> web.Response:
    identity = caller(request)
    change: PortChange = await _body(request, PortChange)  # first: see ``_mine``
    state = _mine(request, identity, may="share")
    gateway = request.app[GATEWAY]
    try:
        port = int(request.match_info["port"])
    except ValueError:
        raise BadRequest("The port must be a number.", code="bad-port") from None
    if not 1 <= port <= 65535 or port == state.spec.ide_port or port in gateway.policy.ports.denied:
        raise BadRequest(f"Port {port} cannot be shared.", code="bad-port")
    if change.visibility is None and change.protocol is None and change.label is None and change.identity is None:
        raise BadRequest("body: set visibility, protocol, label or identity.", code="invalid-body")
    spec = state.spec
    kept = set(spec.ports) | set(spec.labels) | spec.https_ports | spec.identity_ports
    if port not in kept and len(kept) >= MOST_PORTS:
        raise Conflict(f"{state.id} has settings for {MOST_PORTS} ports, as many as a workspace keeps.",
                       code="too-many-ports")
    ceiling = gateway.policy.ports.max_visibility
    if change.visibility is not None and VISIBILITIES.index(change.visibility) > VISIBILITIES.index(ceiling):
        raise Forbidden(f"The policy allows at most '{ceiling}' visibility.", code="visibility-above-ceiling")
    https = state.spec.https_ports
    if change.protocol is not None:
        https = https | {port} if change.protocol == "https" else https - {port}
    labels = None
    if change.label is not None:  # an empty label clears the hub's name (devcontainer.json's shows again)
        labels = {p: text for p, text in state.spec.labels.items() if p != port}
        labels.update({port: change.label.strip()} if change.label.strip() else {})
    identity_ports = None
    if change.identity is not None:
        identity_ports = state.spec.identity_ports | {port} if change.identity else state.spec.identity_ports - {port}
    counts = consented(gateway, [state.spec])  # as in create_workspace
    state = await gateway.runtime.update(
        state.id, ports={**state.spec.ports, port: change.visibility} if change.visibility is not None else None,
        https_ports=https if change.protocol is not None else None, labels=labels, identity_ports=identity_ports)
    return web.json_response(workspace_view(gateway, state, identity, counts))


def share_view(gateway: Gateway, link: ShareLink, token: str | None = None) -> dict[str, Any]:
    """A link as the API shows it; with its token (only right after creation) the URLs that open it: one per
    known port for an all-ports link, as a ``{port}`` template opened as it is names no port."""
    view = link.public()
    view["active"] = link.active(time.time())
    if token is not None:
        view["token"] = token
        if link.port is None:
            state = gateway.runtime.get(link.workspace)
            ports = _known_ports(gateway, state) if state is not None else []
            view["urls"] = [{"port": port, "url": f"{gateway.hosts.share_url(link.workspace, port)}?{SHARE_PARAM}="
                                                  f"{token}"} for port in ports]
            view["url"] = view["urls"][0]["url"] if ports else None
        else:
            url = f"{gateway.hosts.share_url(link.workspace, link.port)}?{SHARE_PARAM}={token}"
            badge = gateway.hosts.hub_url(f"/badge/{link.workspace}/{link.port}.svg?{SHARE_PARAM}={token}")
            view["url"] = url
            view["embed"] = {
                "iframe": f'<iframe src="{escape(url)}" width="100%" height="600" style="border:0" '
                          f'title="Preview of {escape(link.workspace)} port {link.port}"></iframe>',
                "markdown": f"[![preview {link.workspace}:{link.port}]({badge})]({url})",
                "badge": badge,
            }
    return view


async def list_shares(request: web.Request) -> web.Response:
    identity = caller(request)
    state = _mine(request, identity)
    gateway = request.app[GATEWAY]
    return web.json_response({"shares": [share_view(gateway, link) for link in links_of(gateway, state.spec)]})


def links_of(gateway: Gateway, spec: WorkspaceSpec) -> list[ShareLink]:
    return [link for link in gateway.auth.store.shares_of(spec.id) if _its(spec, link)]


def _its(spec: WorkspaceSpec, link: ShareLink) -> bool:
    """A link of this workspace, not of an earlier one of its name (``WorkspaceSpec.since``)."""
    return link.workspace == spec.id and link.created >= spec.since


async def create_share(request: web.Request) -> web.Response:
    identity = caller(request)
    new: NewShare = await _body(request, NewShare)  # first: see ``_mine``
    state = _mine(request, identity, may="share")
    gateway = request.app[GATEWAY]
    rules = gateway.policy.share_links
    if new.audience not in rules.audiences:
        raise Forbidden(f"The policy allows share links for: {', '.join(rules.audiences)}.", code="audience-denied")
    if new.audience == "people" and not new.people:
        raise BadRequest("people: name at least one user, e-mail or group:NAME.", code="invalid-body")
    if new.audience != "people" and new.people:  # kept and shown, they would look like a limit they are not
        raise BadRequest(f"people: a link for {new.audience} names nobody; use audience people to name people.",
                         code="invalid-body")
    if new.port is not None and (new.port == state.spec.ide_port or new.port in gateway.policy.ports.denied):
        raise BadRequest(f"Port {new.port} cannot be shared.", code="bad-port")
    ttl = new.ttl or rules.default_ttl
    if ttl > rules.max_ttl:
        raise BadRequest(f"ttl: the policy allows at most {describe_duration(rules.max_ttl)}.", code="ttl-too-long")
    async with _counted(f"links of {state.id}"):
        if len(links_of(gateway, state.spec)) >= MOST_SHARE_LINKS:
            raise Conflict(f"{state.id} has {MOST_SHARE_LINKS} share links, as many as a workspace keeps (revoked "
                           "ones too, until a while after they expire).", code="too-many-share-links")
        link, token = await gateway.auth.store.create_share(
            workspace=state.id, port=new.port, audience=new.audience, people=new.people,
            created_by=identity.subject, ttl=ttl, incarnation=state.spec.incarnation,
        )
    return web.json_response(share_view(gateway, link, token), status=201)


async def revoke_share(request: web.Request) -> web.Response:
    identity = caller(request)
    state = _mine(request, identity, may="share")
    gateway = request.app[GATEWAY]
    link = gateway.auth.store.shares.get(request.match_info["share"])
    if link is None or not _its(state.spec, link):
        raise NotFound("There is no such share link.", code="share-not-found")
    link = await gateway.auth.store.revoke_share(link)
    return web.json_response(share_view(gateway, link))


async def lifecycle(request: web.Request) -> web.Response:
    identity = caller(request)
    state = _mine(request, identity)
    gateway = request.app[GATEWAY]
    runtime = gateway.runtime
    action = request.match_info["action"]
    operations = {"wake": runtime.wake, "stop": runtime.stop, "archive": runtime.archive}
    counts = consented(gateway, [state.spec])  # as in create_workspace
    state = await operations[action](state.id)
    return web.json_response(workspace_view(gateway, state, identity, counts))


async def status(request: web.Request) -> web.Response:
    identity = caller(request)
    state = await request.app[GATEWAY].runtime.status(_mine(request, identity).id)
    return web.json_response(workspace_view(request.app[GATEWAY], state, identity))


async def list_tokens(request: web.Request) -> web.Response:
    identity = caller(request)
    tokens = [t.public() for t in request.app[GATEWAY].auth.store.api_tokens.values() if t.subject == identity.subject]
    return web.json_response({"tokens": tokens})


async def create_token(request: web.Request) -> web.Response:
    identity = caller(request)
    if _bearer(request) is not None:  # a stolen token that could mint more would outlive its own revocation
        raise Forbidden("API tokens are created signed in to the hub (or by an operator with `codehub-gateway "
                        "token issue`), not with another token.", code="token-cannot-mint")
    new: NewToken = await _body(request, NewToken)
    store = request.app[GATEWAY].auth.store
    async with _counted(f"tokens of {identity.subject}"):  # as they are counted: by the exact name
        if sum(1 for record in store.api_tokens.values() if record.subject == identity.subject) >= MOST_API_TOKENS:
            raise Conflict(f"You have {MOST_API_TOKENS} API tokens, as many as one person may have: revoke one "
                           "first.", code="too-many-tokens")
        record, token = await store.create_api_token(identity, name=new.name)
    return web.json_response({**record.public(), "token": token}, status=201)


async def revoke_token(request: web.Request) -> web.Response:
    identity = caller(request)
    store = request.app[GATEWAY].auth.store
    record = store.api_tokens.get(request.match_info["token"])
    if record is None or record.subject != identity.subject:
        raise NotFound("There is no such token.", code="token-not-found")
    await store.revoke_api_token(record)
    return web.json_response({"id": record.id, "revoked": True})


def consents_of(gateway: Gateway, identity: Identity) -> list[dict[str, Any]]:
    """The apps that know (or were told not to learn) who this person is."""
    mine = sorted((c for c in gateway.auth.store.consents.values() if c.subject == identity.subject),
                  key=lambda c: (c.workspace, c.port))
    return [dataclasses.asdict(c) for c in mine]


async def list_consents(request: web.Request) -> web.Response:
    return web.json_response({"consents": consents_of(request.app[GATEWAY], caller(request))})


async def withdraw_consent(request: web.Request) -> web.Response:
    """Withdrawn: the app learns nothing from the next request on, and the visitor is asked again."""
    identity = caller(request)
    store = request.app[GATEWAY].auth.store
    consent = store.consents.get(request.match_info["consent"])
    if consent is None or consent.subject != identity.subject:
        raise NotFound("There is no such answer of yours.", code="consent-not-found")
    await store.withdraw_consent(consent)
    return web.json_response({"id": consent.id, "withdrawn": True})


def json_only(handler: Handler) -> Handler:
    """Errors from the API are JSON whatever the caller accepts (the front door renders them)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        request[JSON_ONLY] = True
        return await handler(request)

    return handle


def add_routes(app: web.Application) -> None:
    routes: list[tuple[str, str, Handler]] = [
        ("GET", "/api/v1/me", me),
        ("GET", "/api/v1/workspaces", list_workspaces),
        ("POST", "/api/v1/workspaces", create_workspace),
        ("PUT", "/api/v1/workspaces/{workspace}/collaborators", set_collaborators),
        ("GET", "/api/v1/workspaces/{workspace}", get_workspace),
        ("DELETE", "/api/v1/workspaces/{workspace}", delete_workspace),
        ("GET", "/api/v1/workspaces/{workspace}/status", status),
        ("POST", "/api/v1/workspaces/{workspace}/{action:wake|stop|archive}", lifecycle),
        ("PUT", "/api/v1/workspaces/{workspace}/ports/{port}", set_port),
        ("GET", "/api/v1/workspaces/{workspace}/shares", list_shares),
        ("POST", "/api/v1/workspaces/{workspace}/shares", create_share),
        ("DELETE", "/api/v1/workspaces/{workspace}/shares/{share}", revoke_share),
        ("GET", "/api/v1/tokens", list_tokens),
        ("POST", "/api/v1/tokens", create_token),
        ("DELETE", "/api/v1/tokens/{token}", revoke_token),
        ("GET", "/api/v1/consents", list_consents),
        ("DELETE", "/api/v1/consents/{consent}", withdraw_consent),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, json_only(handler))

"""Access policy: who may see which port, share how, and wake what. Loading, deciding, explaining.

A decision is ``Decision(allow, reason, rule)`` with the reason from one closed list, computed by a pure function
of the policy, the workspace and the caller; one function turns it into an HTTP error. Policy files are
validated with the file, line and key of the first problem, and a reload that fails keeps the last good one.
"""

from __future__ import annotations

import enum
import functools
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from gateway.auth.identity import Identity, claim_text
from gateway.config import load_yaml
from gateway.errors import Forbidden, GatewayError, Unauthorized
from gateway.lifecycle import WorkspaceSpec

log = logging.getLogger(__name__)
VISIBILITIES = ("private", "org", "public")
Visibility = Literal["private", "org", "public"]
Audience = Literal["anyone", "org", "people"]
_DURATION = re.compile(r"(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>s|m|h|d|w)?")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(value: Any) -> float:
    """``90``, ``"90s"``, ``"15m"``, ``"12h"``, ``"7d"`` → seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value) if value < 1e300 else math.inf  # an int past a float's range is no duration either
    else:
        match = _DURATION.fullmatch(str(value).strip())
        if match is None:
            raise ValueError(f"{value!r} is not a duration like 90s, 15m, 12h or 7d")
        seconds = float(match["n"]) * _UNITS[match["unit"]]
    if not 0 < seconds < math.inf:  # NaN too: it passes every comparison after this, and no JSON parser reads it
        raise ValueError("a duration must be a positive, finite number of seconds")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


def describe_duration(seconds: float) -> str:
    """``604800`` → ``7 days``: people asked for ``90d`` should be answered in days, not seconds."""
    for name, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {name}{'s' if count != 1 else ''}"
    return f"{seconds} seconds"  # as it is: a fraction rounded would tell some a limit longer than theirs


def _claim_value(value: Any) -> str:
    text = claim_text(value)
    if text is None:
        raise ValueError("a claim rule compares one text, number or true/false value")
    return text


ClaimValue = Annotated[str, BeforeValidator(_claim_value)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Org(_Model):
    """Who counts as a member of the organisation: any rule that matches admits (none set → nobody).

    ``claims`` admits people whose ID token has every listed claim with the listed value (compared as text,
    ``true``/``false`` and numbers spelt as in JSON).
    """

    email_domains: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    claims: dict[str, ClaimValue] = Field(default_factory=dict)
    users: tuple[str, ...] = ()

    @field_validator("email_domains")
    @classmethod
    def _domains(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        """An empty entry (``''``, ``'@'``) loaded and matched nobody, not even what it seemed to say; an address
        in place of a domain likewise."""
        for domain in value:
            if not re.fullmatch(r"@?[^\s@]+", domain):
                raise ValueError(f"{domain!r} is not an e-mail domain like corp.example.com (or @corp.example.com)")
        return value


class Ports(_Model):
    default_visibility: Visibility = "private"
    max_visibility: Visibility = "public"
    denied: tuple[Annotated[int, Field(ge=1, le=65535)], ...] = ()


class ShareLinks(_Model):
    default_ttl: Duration = 24 * 3600
    max_ttl: Duration = 7 * 86400
    audiences: tuple[Audience, ...] = ("anyone", "org", "people")


class Workspaces(_Model):
    """``most_per_person``: workspaces one person may own, created through the API (Kubernetes): each is a home
    volume and, woken, a pod; a loop with one token would otherwise take the cluster's room from everyone."""

    most_per_person: Annotated[int, Field(ge=1)] = 20


class WakePolicy(_Model):
    """``who`` may wake a sleeping workspace: ``anyone-with-access`` or only ``owner-and-collaborators``."""

    who: Literal["anyone-with-access", "owner-and-collaborators"] = "anyone-with-access"
    warm_timeout: Duration = 60
    cold_timeout: Duration = 300
    visitors_keep_awake: bool = True


class Embedding(_Model):
    """Origins allowed to show previews in an iframe (a review tool, say); every other site is refused."""

    frame_ancestors: tuple[str, ...] = ()

    @field_validator("frame_ancestors")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for origin in value:
            if not re.fullmatch(r"https?://[a-z0-9.*-]+(:\d{1,5})?", origin.lower()):
                raise ValueError(f"{origin!r} is not an origin like https://review.example.com")
        return value


class CorsRule(_Model):
    """CORS for some ports: which origins may call them, answered by the gateway or left to the app.

    ``allow_origins`` holds origins and two keywords: ``same-workspace`` (other ports of the same workspace) and
    ``same-owner`` (any port of a workspace with the same owner). ``mode: passthru`` leaves every
    ``Access-Control-*`` header (and preflights) to the app; ``replace`` (default) drops the app's and answers
    from this rule.
    """

    ports: tuple[Annotated[int, Field(ge=1, le=65535)], ...] = ()
    allow_origins: tuple[str, ...] = ()
    allow_credentials: bool = True
    allow_methods: tuple[str, ...] = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
    allow_headers: tuple[str, ...] = ("*",)
    expose_headers: tuple[str, ...] = ()
    max_age: int = Field(default=600, ge=0, le=86400)
    mode: Literal["replace", "passthru"] = "replace"

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        """Origins as browsers send them (compared as they are): a misspelt keyword, a path, capitals or a
        wildcard inside a name matched nothing, and nothing said so."""
        for origin in value:
            if origin not in _ORIGIN_WORDS and not _ORIGIN.fullmatch(origin):
                raise ValueError(f"{origin!r} is neither an origin like https://app.example.com nor same-workspace "
                                 "or same-owner")
        return value

    @field_validator("allow_methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _tokens(value, "a method name", wildcard=False)

    @field_validator("allow_headers", "expose_headers")
    @classmethod
    def _headers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _tokens(value, "a header name", wildcard=True)


_ORIGIN_WORDS = frozenset({"same-workspace", "same-owner", "*", "null"})
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://(?:\[[0-9a-f:.]+\]|[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?)(?::[0-9]{1,5})?")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
"""A method or header name (RFC 9110 token): the rules' lists are written into answers, where a line break made
every answer of the port a 502 (``unsafe-header``)."""


def _tokens(value: tuple[str, ...], what: str, *, wildcard: bool) -> tuple[str, ...]:
    for name in value:
        if not _TOKEN.fullmatch(name) or (name == "*" and not wildcard):
            raise ValueError(f"{name!r} is not {what}")
    return value


Claim = Literal["user", "email", "name", "groups"]


class IdentityRules(_Model):
    """What apps may ever learn about the people who open them (administrators own this; owners only choose,
    per port, whether their app receives it, and visitors whether to share it).

    ``claims``: which of the person's claims may leave. ``groups``: when ``claims`` lists groups, which group
    names may be passed (a name, or a prefix ending in ``*``); groups not listed are never sent.
    """

    claims: tuple[Claim, ...] = ("user", "email")
    groups: tuple[str, ...] = ()

    def disclose(self, identity: Identity) -> Identity:
        """The identity cut down to what may leave: the headers and the signed assertion are both made from it,
        so they can never say more than each other, or than this."""
        return _disclosed(self, identity)

    def _cut(self, identity: Identity) -> Identity:
        groups = tuple(group for group in identity.groups if self._group_allowed(group)) \
            if "groups" in self.claims else ()
        return Identity(subject=identity.subject if "user" in self.claims else "",
                        email=identity.email if "email" in self.claims else "",
                        groups=groups, name=identity.name if "name" in self.claims else "")

    def _group_allowed(self, group: str) -> bool:
        return any(group == rule or (rule.endswith("*") and group.startswith(rule[:-1])) for rule in self.groups)


@functools.lru_cache(maxsize=4096)
def _disclosed(rules: IdentityRules, identity: Identity) -> Identity:
    """Cached: the same few people make most requests, each of which would cut their identity down again."""
    return rules._cut(identity)


class Policy(_Model):
    org: Org = Org()
    ports: Ports = Ports()
    share_links: ShareLinks = ShareLinks()
    workspaces: Workspaces = Workspaces()
    wake: WakePolicy = WakePolicy()
    admins: tuple[str, ...] = ()
    embedding: Embedding = Embedding()
    cors: tuple[CorsRule, ...] = ()
    identity: IdentityRules = IdentityRules()


class PolicyError(Exception):
    """A policy file is invalid; the message names file, line and reason."""


class Reason(enum.StrEnum):
    OWNER = "owner"
    COLLABORATOR = "collaborator"
    ADMIN = "admin"
    PUBLIC_PORT = "public-port"
    ORG_MEMBER = "org-member"
    SHARE_LINK = "share-link"
    USER_UNAUTHENTICATED = "user-unauthenticated"
    NOT_ORG_MEMBER = "not-org-member"
    NOT_SHARED_WITH_USER = "not-shared-with-user"
    PORT_DENIED = "port-denied"
    IDE_OWNER_ONLY = "ide-owner-only"
    SHARE_OTHER_TARGET = "share-other-target"
    WAKE_NOT_ALLOWED = "wake-not-allowed"
    CROSS_ORIGIN = "cross-origin-request"
    WAKE_FROM_ELSEWHERE = "wake-from-elsewhere"


_OWNER, _COLLABORATOR, _ADMIN = Reason.OWNER, Reason.COLLABORATOR, Reason.ADMIN
"""Read as globals on every request: Python 3.11 looks enum members up through a slow ``__getattr__`` hook."""


class Decision(NamedTuple):
    allow: bool
    reason: Reason
    rule: str


@dataclass(frozen=True, slots=True)
class Grant:
    """A share link presented with the request (already checked to exist, be unexpired and unrevoked)."""

    id: str
    workspace: str
    port: int | None
    audience: Audience
    people: tuple[str, ...] = ()
    created: float = 0.0


def is_org_member(org: Org, identity: Identity, claims: Mapping[str, Any] | None = None) -> bool:
    """Does any org rule admit ``identity``? Claim rules read ``claims`` if given, else the identity's own."""
    domain = identity.email.rpartition("@")[2].lower() if "@" in identity.email else ""
    if domain in (d.lower().lstrip("@") for d in org.email_domains):
        return True
    if any(group in identity.groups for group in org.groups):
        return True
    if any(identity.matches(user) for user in org.users):
        return True
    if not org.claims:
        return False
    if claims is None:
        return all(identity.claim(name) == value for name, value in org.claims.items())
    return all(claim_text(claims.get(name)) == value for name, value in org.claims.items())


def visibility(policy: Policy, spec: WorkspaceSpec, port: int) -> Visibility:
    """The port's chosen visibility (or the default), capped by the policy's ceiling."""
    chosen = spec.ports.get(port, policy.ports.default_visibility)
    ceiling = VISIBILITIES.index(policy.ports.max_visibility)
    return VISIBILITIES[min(VISIBILITIES.index(chosen), ceiling)]  # type: ignore[return-value]


def membership(spec: WorkspaceSpec, identity: Identity) -> Reason | None:
    """Owner or collaborator of the workspace, or None (admins see ports, but are no members)."""
    if identity.is_subject(spec.owner):
        return _OWNER
    if any(identity.matches(person) for person in spec.collaborators):
        return _COLLABORATOR
    return None


def role(policy: Policy, spec: WorkspaceSpec, identity: Identity) -> Reason | None:
    """Owner, collaborator, policy admin (who sees every port but is no member), or None: the one answer the
    decisions, the hub and the API all use."""
    member = membership(spec, identity)
    if member is not None:
        return member
    return _ADMIN if any(identity.matches(admin) for admin in policy.admins) else None


OTHER_TARGET = Decision(False, Reason.SHARE_OTHER_TARGET, "the share link is for another port or workspace")


def grants_target(grant: Grant, spec: WorkspaceSpec, port: int) -> bool:
    """Is the share link for this port of this workspace (made after the workspace of this name was)?"""
    return grant.workspace == spec.id and grant.created >= spec.since and grant.port in (None, port)


def decide(policy: Policy, spec: WorkspaceSpec, port: int | None, identity: Identity | None,
           grant: Grant | None = None) -> Decision:
    """May ``identity`` (None: anonymous) see ``port`` of the workspace (``None``: its IDE)?"""
    if port is None:
        if identity is None:
            return Decision(False, Reason.USER_UNAUTHENTICATED, "the IDE needs sign-in")
        member = membership(spec, identity)
        if member is not None:
            return Decision(True, member, "owner and collaborators use the IDE")
        return Decision(False, Reason.IDE_OWNER_ONLY, "the IDE is only for its owner and collaborators")
    if port in policy.ports.denied or port == spec.ide_port:
        return Decision(False, Reason.PORT_DENIED, f"ports.denied lists {port}" if port != spec.ide_port
                        else "the IDE port is only reachable at ide-{workspace}")
    who = role(policy, spec, identity) if identity is not None else None
    if who is not None:
        return Decision(True, who, "policy admins" if who is _ADMIN else f"{who} of the workspace")
    shown = visibility(policy, spec, port)
    if shown == "public":
        return Decision(True, Reason.PUBLIC_PORT, f"port {port} is public")
    org_member = identity is not None and is_org_member(policy.org, identity)
    if shown == "org" and org_member:
        return Decision(True, Reason.ORG_MEMBER, f"port {port} is visible to the org")
    if grant is not None:
        if not grants_target(grant, spec, port):
            return OTHER_TARGET
        if grant.audience == "anyone":
            return Decision(True, Reason.SHARE_LINK, "share link for anyone holding it")
        if identity is None:
            return Decision(False, Reason.USER_UNAUTHENTICATED, f"the share link is for {grant.audience} members")
        if grant.audience == "org" and org_member:
            return Decision(True, Reason.SHARE_LINK, "share link for signed-in org members")
        if grant.audience == "people" and any(identity.matches(person) for person in grant.people):
            return Decision(True, Reason.SHARE_LINK, "share link for named people")
        return Decision(False, Reason.NOT_SHARED_WITH_USER, "the share link names other people")
    if identity is None:
        return Decision(False, Reason.USER_UNAUTHENTICATED, f"port {port} is {shown}")
    if shown == "org":
        return Decision(False, Reason.NOT_ORG_MEMBER, "the org policy does not admit this user")
    return Decision(False, Reason.NOT_SHARED_WITH_USER, f"port {port} is private to the owner and collaborators")


def may_wake(policy: Policy, access: Decision) -> Decision:
    if policy.wake.who == "anyone-with-access" or access.reason in (Reason.OWNER, Reason.COLLABORATOR, Reason.ADMIN):
        return access
    return Decision(False, Reason.WAKE_NOT_ALLOWED, "only the owner and collaborators may wake this workspace")


class AsleepElsewhere(Forbidden):
    """A page elsewhere had the visitor's browser ask for a sleeping workspace (a frame, a fetch, its own
    navigation), which may not wake it with their cookie. To a browser it is a page whose button wakes it, in a frame
    or at the top: the click is the visitor's navigation from this origin, which may."""

    title = "Asleep"
    template = "asleep_elsewhere.html"


def denial(decision: Decision) -> GatewayError:
    """The one mapping from a refusal to an HTTP error."""
    if decision.reason is Reason.USER_UNAUTHENTICATED:
        return Unauthorized("Sign in to see this page.", code=decision.reason.value)
    if decision.reason is Reason.WAKE_FROM_ELSEWHERE:
        return AsleepElsewhere("This workspace is asleep, and a page elsewhere may not wake it with your sign-in. "
                               "Wake it yourself to see it here.", code=decision.reason.value)
    messages = {
        Reason.NOT_ORG_MEMBER: "Your account is not admitted by this organisation's policy.",
        Reason.NOT_SHARED_WITH_USER: "This page has not been shared with you. Ask its owner for access.",
        Reason.PORT_DENIED: "This port may not be shared.",
        Reason.IDE_OWNER_ONLY: "Only the workspace's owner and collaborators can open its IDE.",
        Reason.SHARE_OTHER_TARGET: "This share link is for another port or workspace.",
        Reason.WAKE_NOT_ALLOWED: "This workspace is asleep and only its owner or collaborators can wake it.",
        Reason.CROSS_ORIGIN: "This request came from another origin and was refused: a page elsewhere may not "
                             "write or open a connection here with your sign-in.",
    }
    return Forbidden(messages.get(decision.reason, "Not allowed."), code=decision.reason.value)


def _line_of(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """Follow a validation error's location through the YAML node tree to the deepest line it names."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((key, value) for key, value in node.value if key.value == str(part)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    try:
        data = load_yaml(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise PolicyError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise PolicyError(f"{source}:1: a policy must be a mapping of sections")
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(first["loc"])
        message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
        raise PolicyError(_where(source, text, loc, message)) from None
    for loc, message in _contradictions(policy):
        raise PolicyError(_where(source, text, loc, message))
    return policy


def _where(source: str, text: str, loc: tuple[int | str, ...], message: str) -> str:
    """``source:line: key: message`` for what the model refuses; the nodes that say the line are composed only
    then (a good policy, loaded at each reload, is parsed once)."""
    key = ".".join(str(part) for part in loc)
    return f"{source}:{_line_of(yaml.compose(text, Loader=yaml.SafeLoader), loc) or 1}: {key}: {message}"


def _contradictions(policy: Policy) -> list[tuple[tuple[int | str, ...], str]]:
    """Settings that are each valid but cannot hold together."""
    found: list[tuple[tuple[int | str, ...], str]] = []
    ports, links = policy.ports, policy.share_links
    if VISIBILITIES.index(ports.default_visibility) > VISIBILITIES.index(ports.max_visibility):
        found.append((("ports", "default_visibility"),
                      f"'{ports.default_visibility}' is above ports.max_visibility '{ports.max_visibility}'"))
    if links.default_ttl > links.max_ttl:
        found.append((("share_links", "default_ttl"),
                      f"{links.default_ttl:.0f} s is longer than share_links.max_ttl ({links.max_ttl:.0f} s)"))
    for index, rule in enumerate(policy.cors):
        anyone = next((origin for origin in _ANY_SITE if origin in rule.allow_origins), None)
        if anyone is not None and rule.allow_credentials:  # browsers refuse '*' with credentials for this reason
            found.append((("cors", index, "allow_origins"), f"{_ANY_SITE[anyone]}: with allow_credentials any site "
                          "could read and write this port as its visitor. List the origins, or set "
                          "allow_credentials: false"))
    return found


_ANY_SITE = {"*": "'*' admits every origin",
             "null": "'null' is the origin of sandboxed frames and local files, which any site can make"}
"""Origins in a CORS rule that any site can send its visitors' requests from."""


def load_policy(path: Path) -> Policy:
    """The policy in ``path``; a file that cannot be read or is not text is one ``PolicyError`` line like any
    other bad policy (at start, and at a reload, which keeps the last good one)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_policy(text, str(path))


class PolicyHolder:
    """The policy in force, reloaded when its file changes; a bad file is logged and the old policy kept."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.current = load_policy(path) if path is not None else Policy()
        self._stamp = self._read_stamp()
        self.last_error: str | None = None

    def _read_stamp(self) -> tuple[float, int] | None:
        if self.path is None:
            return None
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return (stat.st_mtime, stat.st_size)

    def reload_if_changed(self) -> bool:
        stamp = self._read_stamp()
        if self.path is None or stamp is None or stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            self.current = load_policy(self.path)
        except PolicyError as exc:
            self.last_error = str(exc)
            log.error("policy not reloaded, keeping the previous one: %s", exc)
            return False
        self.last_error = None
        log.info("policy reloaded from %s", self.path)
        return True

"""A signed-in person as the gateway knows them, built from ID-token or session claims (pure functions)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Claims that say something about the token rather than the person, or that have a field of their own.
_NOT_ATTRIBUTES = frozenset({
    "iss", "sub", "aud", "exp", "nbf", "iat", "jti", "nonce", "auth_time", "at_hash", "c_hash", "s_hash", "azp",
    "acr", "amr", "sid", "typ", "state", "email", "groups", "name", "attrs", "cnf", "updated_at",
})
# Lone surrogates come with JSON (``"\\ud800"``) and cannot be encoded into any header.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _folded(text: str) -> str:
    """Upper-case ASCII letters made lower-case, and nothing else (``str.lower`` makes the Kelvin sign a ``k``).
    ``lower`` where it is the same, as ``translate`` looks every character up in a dict: policy checks run on
    every request."""
    return text.lower() if text.isascii() else text.translate(_ASCII_LOWER)

# Other claims ride along in the session cookie for org rules on claims; a budget keeps the cookie small.
ATTRIBUTES_BUDGET = 1024


def claim_text(value: Any) -> str | None:
    """A scalar claim as text, spelt as in JSON (``true``, ``42``); None for lists, objects and null."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return json.dumps(value)
    return None


def _says_verified(value: Any) -> bool:
    """An ``email_verified`` claim that vouches for the address: ``true``, or the text ``"true"`` some IdPs send
    instead (Cognito, Apple, JumpCloud). Any other value is no yes: read as "not ``False``", their ``"false"``
    passed for verified, and an address anyone can type in matched collaborator entries and org rules."""
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


@dataclass(frozen=True, slots=True)
class Identity:
    subject: str
    email: str = ""
    groups: tuple[str, ...] = ()
    name: str = ""
    attributes: tuple[tuple[str, str], ...] = ()

    def unsendable(self) -> str | None:
        """Why this identity cannot be passed to apps in headers, or None: a control character (a line break could
        end an upstream header) or a group name with a comma (``X-Forwarded-Groups`` joins them with commas).
        Sign-in refuses such an identity rather than cleaning it: what is cleaned is no longer what the IdP said.

        Nor a user name the hub could not show as it is (``lifecycle.showable``'s rule, which principals, labels and
        token names follow): a workspace's owner is the user name of whoever made it, shown to its collaborators,
        the admins and on its apps' consent pages, and ``alice`` with a WORD JOINER or a right-to-left override in
        it reads as ``alice`` there, though it is someone else."""
        if not self.subject:
            return "no user name (the claim it is read from is missing, or an unverified e-mail)"
        for field, values in (("a user name", (self.subject,)), ("an e-mail", (self.email,)),
                              ("a name", (self.name,)), ("a group name", self.groups)):
            if any(_CONTROL.search(value) for value in values):
                return f"{field} with control characters"
        if not self.subject.isprintable():
            return "a user name with invisible or direction-changing characters"
        if any("," in group for group in self.groups):
            return "a group name with a comma, which apps would read as two groups"
        return None

    def matches(self, principal: str) -> bool:
        """Principals in policies and collaborator lists: a user name; an e-mail (it has an ``@``), only ever the
        e-mail claim, which is dropped when unverified, never a user name that looks like one; or ``group:NAME``.
        Names and e-mails compare case-insensitively in ASCII only: ``str.lower`` makes the Kelvin sign a ``k``,
        so someone could choose a name or an address at the IdP that passes for someone else's."""
        principal = principal.strip()
        if principal.startswith("group:"):
            return principal[6:] in self.groups
        if "@" in principal:
            return _folded(self.email) == _folded(principal)
        return self.is_subject(principal)

    def is_subject(self, name: str) -> bool:
        """This person's user name, as ``matches`` compares names: a workspace's owner is the user who made it, not
        a principal (read as one, an owner that looks like an address or a group would be someone else)."""
        name = name.strip()
        return bool(name) and _folded(self.subject) == _folded(name)

    def claim(self, name: str) -> str | None:
        """A scalar claim from the IdP (as text), for org rules on claims."""
        return dict(self.attributes).get(name)

    def claims(self) -> dict[str, Any]:
        return {"sub": self.subject, "email": self.email, "groups": list(self.groups), "name": self.name,
                "attrs": dict(self.attributes)}

    @classmethod
    def from_claims(cls, claims: Mapping[str, Any], *, subject_claim: str = "sub",
                    groups_claim: str = "groups") -> Identity:
        """From the gateway's own tokens (``attrs`` carries the IdP's other claims) or raw claims. The user name is
        ``subject_claim`` or nothing, never another claim in its place: names from two namespaces could meet."""
        raw = claims.get(groups_claim)
        listed = raw if isinstance(raw, list) else [] if raw is None else [raw]  # an IdP's own shape: one group
        groups = [text for item in listed if (text := claim_text(item)) is not None]
        attrs = claims.get("attrs")
        return cls(
            subject=str(claims.get(subject_claim) or ""),
            email=str(claims.get("email") or ""),
            groups=tuple(groups),
            name=str(claims.get("name") or claims.get("preferred_username") or ""),
            attributes=_attributes(attrs if isinstance(attrs, Mapping) else {}),
        )

    @classmethod
    def from_id_token(cls, claims: Mapping[str, Any], *, subject_claim: str = "sub",
                      groups_claim: str = "groups") -> Identity:
        """From a verified ID token. An e-mail the IdP marks unverified is not used: collaborator lists and org
        rules match e-mails, and anyone can type any address into an account that has not verified it."""
        identity = cls.from_claims({k: v for k, v in claims.items() if k != "attrs"}, subject_claim=subject_claim,
                                   groups_claim=groups_claim)
        verified = _says_verified(claims.get("email_verified", True))
        email = identity.email if verified else ""
        subject = identity.subject if verified or subject_claim != "email" else ""  # none: sign-in refuses it
        extra = {k: v for k, v in claims.items() if k not in _NOT_ATTRIBUTES and k not in (subject_claim, groups_claim)}
        return cls(subject, email, identity.groups, identity.name, _attributes(extra))


def _attributes(claims: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    used = 0
    for name in sorted(claims):
        text = claim_text(claims[name])
        if text is None:
            continue
        used += len(name) + len(text) + 6
        if used > ATTRIBUTES_BUDGET:
            break
        out.append((str(name), text))
    return tuple(out)

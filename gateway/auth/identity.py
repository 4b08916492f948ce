"""A signed-in person as the gateway knows them, built from ID-token or session claims (pure functions)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Identity:
    subject: str
    email: str = ""
    groups: tuple[str, ...] = ()
    name: str = ""

    def matches(self, principal: str) -> bool:
        """Principals in policies and collaborator lists: a user name, an e-mail, or ``group:NAME``."""
        principal = principal.strip()
        if principal.startswith("group:"):
            return principal[6:] in self.groups
        return principal.lower() in (self.subject.lower(), self.email.lower()) and bool(principal)

    def claims(self) -> dict[str, Any]:
        return {"sub": self.subject, "email": self.email, "groups": list(self.groups), "name": self.name}

    @classmethod
    def from_claims(cls, claims: Mapping[str, Any], *, subject_claim: str = "sub",
                    groups_claim: str = "groups") -> Identity:
        groups = claims.get(groups_claim) or ()
        if isinstance(groups, str):
            groups = [groups]
        return cls(
            subject=str(claims.get(subject_claim) or claims.get("sub") or ""),
            email=str(claims.get("email") or ""),
            groups=tuple(str(group) for group in groups),
            name=str(claims.get("name") or claims.get("preferred_username") or ""),
        )

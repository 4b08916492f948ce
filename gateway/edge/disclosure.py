"""What an app learns about the person who opens it, decided from policy, the owner's choice and consent.

Pure functions of data. Who learns what about whom:
- the workspace's owner is known to every app of the workspace: they are its apps;
- anyone else, collaborators included (whom the owner names alone, groups too: being named must not tell the
  owner's apps who visits), is known only to a port its owner opted in (``identity_ports``), and only once they answered
  "Continue" on that app's consent page, which is the hub's (``CONSENT_PATH``): on the app's own origin the
  owner's scripts could read it, press its button, or post its form. Before they answer, a browser navigation is
  sent there and anything else (fetch, a WebSocket, a script's bearer token, a frame) goes through with no
  identity at all;
- what is known is never more than the policy's ``identity`` rules let leave, and the headers and the signed
  assertion are made from the same cut-down identity, so neither says more than the other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from urllib.parse import urlencode

from gateway.auth.identity import Identity
from gateway.auth.sessions import Sessions
from gateway.auth.store import Consent, consent_id
from gateway.edge.policy import IdentityRules
from gateway.edge.routing import Hosts
from gateway.errors import GatewayError
from gateway.lifecycle import WorkspaceSpec

CONSENT_PATH = "/consent"
"""On the hub."""
_CLAIM_WORDS = {"user": "user name", "email": "e-mail address", "name": "name", "groups": "groups"}


Consents = Callable[[], Mapping[str, Consent]]
"""The answers recorded so far, asked for only when someone other than the owner opens an opted-in port (a
file-backed store looks at its file when asked: not a cost every request should pay)."""


def answer_of(consents: Consents, identity: Identity, spec: WorkspaceSpec, port: int) -> Consent | None:
    return consents().get(consent_id(identity.subject, spec.id, port, spec.owner))


def disclosed(rules: IdentityRules, spec: WorkspaceSpec, port: int | None, identity: Identity | None, *,
              owner: bool, consents: Consents) -> Identity | None:
    """The identity this app may receive for this caller, or None."""
    if identity is None:
        return None
    if not owner:
        if port is None or port not in spec.identity_ports:
            return None
        answer = answer_of(consents, identity, spec, port)
        if answer is None or not answer.share:
            return None
    return rules.disclose(identity)


def consent_pending(spec: WorkspaceSpec, port: int | None, identity: Identity | None, *,
                    owner: bool, consents: Consents) -> bool:
    """A visitor of an opted-in port who has not answered yet: a browser navigation gets the consent page."""
    return (identity is not None and port is not None and port in spec.identity_ports
            and not owner and answer_of(consents, identity, spec, port) is None)


ASK_TTL = 600.0


def asked_of(identity: Identity, spec: WorkspaceSpec, port: int) -> list[str | int]:
    """What an ``ask`` vouches for: this visitor was sent by this app (of this owner) to answer."""
    return [identity.subject, spec.id, port, spec.owner]


def consent_url(hosts: Hosts, sessions: Sessions, identity: Identity, spec: WorkspaceSpec, port: int,
                next_path: str) -> str:
    """Where a visitor answers for an app: the hub's page, which sends them back to ``next_path`` on the app. The
    ``ask`` (sealed, for the hub, for a while) says the app sent them, past its access check; sealed, as it names
    the visitor and the app's owner can come to hold one (see ``Sessions.seal_state``)."""
    ask = sessions.seal_state({"ask": asked_of(identity, spec, port)}, hosts.hub, ASK_TTL)  # it names the visitor
    query = urlencode({"workspace": spec.id, "port": port, "next": next_path, "ask": ask})
    return hosts.hub_url(f"{CONSENT_PATH}?{query}")


def identity_headers(identity: Identity | None, assertion: str | None) -> dict[str, str]:
    """Upstream headers for a disclosed identity: a claim the policy withheld is absent, not empty."""
    if identity is None:
        return {}
    headers = {"X-Forwarded-User": identity.subject, "X-Forwarded-Email": identity.email,
               "X-Forwarded-Groups": ",".join(identity.groups)}
    out = {name: value for name, value in headers.items() if value}
    if assertion is not None:
        out["X-Codehub-Assertion"] = assertion
    return out


class ConsentPage(GatewayError):
    """Not an error: the first visit of an opted-in app asks the visitor, on the hub, what it may learn of them."""

    status = 200
    code = "identity-consent"
    title = "Share who you are with this app?"
    template = "consent.html"
    action = CONSENT_PATH

    def __init__(self, rules: IdentityRules, spec: WorkspaceSpec, port: int, identity: Identity, next_path: str,
                 ask: str):
        super().__init__(f"The app on port {port} of workspace {spec.id} (owned by {spec.owner}) asks to receive "
                         "your identity.", headers={"Cache-Control": "no-store"})
        self.workspace, self.port, self.owner, self.next_path, self.ask = spec.id, port, spec.owner, next_path, ask
        shown = rules.disclose(identity)
        values = {"user": shown.subject, "email": shown.email, "name": shown.name, "groups": ", ".join(shown.groups)}
        self.claims = [(_CLAIM_WORDS[claim], values[claim]) for claim in rules.claims if values[claim]]

"""A relying party for the company IdP: discovery, authorization code + PKCE, ID-token verification.

ID tokens are accepted only with an asymmetric algorithm from a fixed list that also matches the key's
type (no ``none``, no HMAC with a public key as secret); ``iss``, ``aud``, ``exp``, ``nbf``, ``iat`` and
the nonce are checked. An unknown ``kid`` triggers one JWKS refresh, which is how IdP key rotation lands.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus, urlencode

import aiohttp
import jwt
from yarl import URL

from gateway.accesslog import log_text
from gateway.auth.keys import same_secret
from gateway.config import ConfigError, Oidc
from gateway.errors import GatewayError, ServiceUnavailable

log = logging.getLogger(__name__)
ALLOWED_ALGORITHMS = {
    "RS256": "RSA", "RS384": "RSA", "RS512": "RSA", "PS256": "RSA", "PS384": "RSA", "PS512": "RSA",
    "ES256": "EC", "ES384": "EC", "ES512": "EC", "EdDSA": "OKP",
}
_METADATA_TTL = 3600.0
_STEPS = ("authorization_endpoint", "token_endpoint", "jwks_uri")
"""The discovery document's addresses a sign-in goes through: without a web address for each, none can succeed."""
_TIMEOUT = aiohttp.ClientTimeout(total=10)


class IdpUnavailable(GatewayError):
    status = 502
    code = "idp-unavailable"
    title = "Sign-in is unavailable"


class SignInFailed(GatewayError):
    status = 401
    code = "sign-in-failed"
    title = "Sign-in failed"


@dataclass(frozen=True, slots=True)
class Pkce:
    verifier: str
    challenge: str

    @classmethod
    def new(cls) -> Pkce:
        verifier = secrets.token_urlsafe(48)
        digest = hashlib.sha256(verifier.encode()).digest()
        return cls(verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode())


def _web_address(value: object) -> bool:
    """Whether the IdP's ``value`` is an absolute http(s) address: what a browser is sent to, or the gateway calls."""
    if not isinstance(value, str):
        return False
    try:
        url = URL(value)
    except ValueError:
        return False
    return url.scheme in ("http", "https") and bool(url.host)


class OidcClient:
    def __init__(self, settings: Oidc, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self._session = session
        self._metadata: dict[str, Any] | None = None
        self._metadata_at = 0.0
        self._jwks: dict[str, dict[str, Any]] = {}

    async def _get_json(self, url: str, what: str) -> dict[str, Any]:
        try:
            async with self._session.get(url, timeout=_TIMEOUT) as response:
                if response.status != 200:
                    raise IdpUnavailable(f"The sign-in service answered {response.status} for its {what}.")
                data: Any = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("IdP %s unreachable: %s", what, log_text(str(exc)))
            raise IdpUnavailable(
                "The sign-in service cannot be reached right now. Public previews keep working; try again shortly."
            ) from None
        if not isinstance(data, dict):
            log.warning("IdP %s at %s is not a JSON object", what, log_text(url))
            raise IdpUnavailable(f"The sign-in service's {what} is not readable.")
        return data

    async def metadata(self, *, refresh: bool = False) -> dict[str, Any]:
        if refresh or self._metadata is None or time.monotonic() - self._metadata_at > _METADATA_TTL:
            data = await self._get_json(f"{self.settings.issuer}/.well-known/openid-configuration", "discovery")
            issuer = data.get("issuer")
            if not isinstance(issuer, str) or issuer.rstrip("/") != self.settings.issuer:
                raise IdpUnavailable("The sign-in service's discovery document names another issuer.")
            unusable = [name for name in _STEPS if not _web_address(data.get(name))]
            if unusable:
                log.warning("IdP discovery has no http(s) address for %s", ", ".join(unusable))
                raise IdpUnavailable(f"The sign-in service's discovery document gives no address for {unusable[0]}.")
            if "end_session_endpoint" in data and not _web_address(data["end_session_endpoint"]):
                log.warning("IdP discovery's end_session_endpoint is no http(s) address: not followed")
                del data["end_session_endpoint"]
            self._metadata, self._metadata_at = data, time.monotonic()
        return self._metadata

    async def authorize_url(self, *, redirect_uri: str, state: str, nonce: str, pkce: Pkce) -> str:
        """Where to send a browser to sign in. Discovery is read afresh: if the IdP is down, the browser gets
        the gateway's clear error page instead of being sent to an address that does not answer."""
        metadata = await self.metadata(refresh=True)
        query = {
            "response_type": "code", "client_id": self.settings.client_id, "redirect_uri": redirect_uri,
            "scope": " ".join(self.settings.scopes), "state": state, "nonce": nonce,
            "code_challenge": pkce.challenge, "code_challenge_method": "S256",
        }
        return str(URL(metadata["authorization_endpoint"]).update_query(query))

    async def end_session_url(self, *, post_logout_redirect_uri: str, id_token_hint: str | None) -> str | None:
        """Where to send a browser that signed out so that the IdP ends its own session too (RP-initiated logout),
        or None when the IdP publishes no ``end_session_endpoint`` or cannot be reached: the gateway's sign-out
        is done either way. Without it, the next sign-in would pass through the IdP without a password, which on
        a shared computer is the next person's. ``id_token_hint`` is the sign-in's ID token, which some IdPs
        (Okta) need to end theirs."""
        try:
            endpoint = (await self.metadata(refresh=True)).get("end_session_endpoint")
        except IdpUnavailable:
            return None
        if not isinstance(endpoint, str):
            return None
        query = {"client_id": self.settings.client_id, "post_logout_redirect_uri": post_logout_redirect_uri}
        if id_token_hint is not None:
            query["id_token_hint"] = id_token_hint
        return str(URL(endpoint).update_query(query))

    async def exchange(self, *, code: str, redirect_uri: str, verifier: str) -> dict[str, Any]:
        metadata = await self.metadata()
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                "code_verifier": verifier}
        # The shared upstream session skips the automatic Content-Type, so the form says what it is itself.
        headers = {"Accept": "application/json", "Content-Type": "application/x-www-form-urlencoded"}
        try:
            secret = self.settings.secret()
        except ConfigError as exc:  # the mounted Secret went after start (it is read at each sign-in on purpose)
            log.error("sign-in failed: %s", exc)
            raise ServiceUnavailable("Sign-in cannot finish here right now: this gateway cannot read its own "
                                     "credentials for the sign-in service. Its administrators can see why in its "
                                     "log.", code="sign-in-misconfigured") from None
        if self.settings.token_auth_method == "client_secret_basic":
            # RFC 6749 §2.3.1: id and secret are form-encoded before they are joined and base64-encoded.
            headers["Authorization"] = aiohttp.encode_basic_auth(quote_plus(self.settings.client_id),
                                                                 quote_plus(secret))
        else:
            form.update(client_id=self.settings.client_id, client_secret=secret)
        try:
            async with self._session.post(metadata["token_endpoint"], data=urlencode(form), headers=headers,
                                          timeout=_TIMEOUT) as response:
                answer: Any = await response.json(content_type=None)
                status = response.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("IdP token endpoint unreachable: %s", log_text(str(exc)))
            raise IdpUnavailable("The sign-in service cannot be reached right now; try again shortly.") from None
        body: dict[str, Any] = answer if isinstance(answer, dict) else {}  # a reply's shape is the IdP's to get wrong
        if status != 200 or not isinstance(body.get("id_token"), str) or not body["id_token"]:
            log.warning("IdP refused the code: %s %s %s", status, log_text(str(body.get("error"))),
                        log_text(str(body.get("error_description"))))
            raise SignInFailed("The sign-in service refused this sign-in. Start again from the page you wanted.")
        return body

    async def _key(self, kid: str | None, force: bool) -> dict[str, Any] | None:
        """The published key ``kid`` names (the only one, for none), from the keys held, read afresh when ``force``:
        the caller forces a lookup that found nothing, which is also how the keys are read the first time."""
        if force:
            metadata = await self.metadata()
            data = await self._get_json(metadata["jwks_uri"], "signing keys")
            keys = data.get("keys")
            if not isinstance(keys, list):
                raise IdpUnavailable("The sign-in service publishes no list of signing keys.")
            self._jwks = {str(key.get("kid")): key for key in keys if isinstance(key, dict)}
        if kid is None and len(self._jwks) == 1:
            return next(iter(self._jwks.values()))
        return self._jwks.get(str(kid))

    async def verify_id_token(self, token: str, nonce: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise SignInFailed("The sign-in service sent a malformed ID token.") from None
        algorithm = str(header.get("alg"))
        if algorithm not in ALLOWED_ALGORITHMS:
            raise SignInFailed(f"The ID token uses algorithm {algorithm!r}, which is not accepted.")
        kid = header.get("kid")
        jwk = await self._key(kid, force=False) or await self._key(kid, force=True)
        if jwk is None or jwk.get("kty") != ALLOWED_ALGORITHMS[algorithm]:
            raise SignInFailed("The ID token is signed with a key the sign-in service does not publish.")
        try:
            key = jwt.PyJWK(jwk, algorithm=algorithm).key
        except jwt.PyJWTError as exc:
            log.warning("IdP signing key %s cannot be read: %s", log_text(str(kid)), log_text(str(exc)))
            raise IdpUnavailable("The sign-in service publishes a signing key that cannot be read.") from None
        issuer = (await self.metadata())["issuer"]  # as the IdP spells it: the setting drops a final "/"
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key, algorithms=[algorithm], audience=self.settings.client_id, issuer=issuer,
                leeway=30, options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.InvalidTokenError as exc:
            raise SignInFailed(f"The ID token did not verify: {exc}.") from None
        if not same_secret(str(claims.get("nonce", "")), nonce):
            raise SignInFailed("The ID token's nonce does not match this sign-in.")
        return claims

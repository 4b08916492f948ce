"""The IdP test peer itself: a plain aiohttp relying party runs code + PKCE against the real oidc-provider."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import jwt
import pytest

from tests.peers.idp import fixture as idp_fixture
from tests.peers.idp.fixture import IdP, expected_claims, login_via_idp, start_idp

idp = idp_fixture.idp  # the pytest fixture (an assignment, so parameters named `idp` are not F811)

pytestmark = pytest.mark.timeout(60)

SCOPE = "openid email profile groups"


@pytest.fixture
def idp_redirect_uris() -> list[str]:
    """Picked up by the `idp` fixture; a gateway's conftest defines its own callback URL(s)."""
    return ["http://127.0.0.1:9/oauth2/callback", "http://gw.localhost:9/oauth2/callback"]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for an IP-address host
    async with aiohttp.ClientSession(cookie_jar=jar, timeout=aiohttp.ClientTimeout(total=15)) as s:
        yield s


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def authorize(
    idp: IdP, session: aiohttp.ClientSession, login: str, *, with_pkce: bool = True
) -> tuple[dict[str, list[str]], str, str]:
    """Run the front channel; return (callback query, code_verifier, nonce)."""
    conf = await get_json(session, idp.discovery_url)
    verifier, challenge = pkce_pair()
    state, nonce = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    params = {
        "client_id": idp.client_id,
        "redirect_uri": idp.redirect_uri,
        "response_type": "code",
        "scope": SCOPE,
        "state": state,
        "nonce": nonce,
    }
    if with_pkce:
        params |= {"code_challenge": challenge, "code_challenge_method": "S256"}
    callback = await login_via_idp(session, f"{conf['authorization_endpoint']}?{urlencode(params)}", login)
    assert callback.split("?")[0] == idp.redirect_uri
    query = parse_qs(urlsplit(callback).query)
    assert query["state"] == [state]
    assert query["iss"] == [idp.issuer]
    return query, verifier, nonce


async def exchange(
    idp: IdP, session: aiohttp.ClientSession, code: str, verifier: str, method: str | None = None
) -> tuple[int, dict[str, Any]]:
    conf = await get_json(session, idp.discovery_url)
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": idp.redirect_uri,
        "code_verifier": verifier,
    }
    headers = {}
    if (method or idp.token_endpoint_auth_method) == "client_secret_post":
        form |= {"client_id": idp.client_id, "client_secret": idp.client_secret}
    else:  # aiohttp 3.14 deprecates BasicAuth/auth=; secrets here need no form-encoding first
        headers["Authorization"] = aiohttp.encode_basic_auth(idp.client_id, idp.client_secret)
    async with session.post(conf["token_endpoint"], data=form, headers=headers) as resp:
        return resp.status, await resp.json()


async def verify_id_token(idp: IdP, session: aiohttp.ClientSession, token: str) -> dict[str, Any]:
    """Check the signature against the IdP's current JWKS (fetched with aiohttp), aud and iss."""
    conf = await get_json(session, idp.discovery_url)
    jwks = jwt.PyJWKSet.from_dict(await get_json(session, conf["jwks_uri"]))
    kid = jwt.get_unverified_header(token)["kid"]
    key = jwks[kid]  # KeyError if the JWKS no longer publishes the kid
    claims: dict[str, Any] = jwt.decode(
        token, key=key, algorithms=["RS256"], audience=idp.client_id, issuer=idp.issuer
    )
    return claims


async def full_flow(idp: IdP, session: aiohttp.ClientSession, login: str) -> tuple[str, dict[str, Any]]:
    """Front channel, code exchange, id_token verification; return (id_token, its claims)."""
    query, verifier, nonce = await authorize(idp, session, login)
    status, tokens = await exchange(idp, session, query["code"][0], verifier)
    assert status == 200, tokens
    assert tokens["token_type"].lower() == "bearer"
    claims = await verify_id_token(idp, session, tokens["id_token"])
    assert claims["nonce"] == nonce
    return tokens["id_token"], claims


async def test_code_flow_with_pkce(idp: IdP, session: aiohttp.ClientSession) -> None:
    assert idp.redirect_uris == [
        "http://127.0.0.1:9/oauth2/callback",
        "http://gw.localhost:9/oauth2/callback",
    ]
    token, claims = await full_flow(idp, session, "alice")
    assert claims["sub"] == "alice"
    assert claims["email"] == "alice@example.com"
    assert claims["groups"] == ["dev"]
    assert claims["name"] == "alice"
    assert jwt.get_unverified_header(token)["kid"] == idp.kids[0]


async def test_claims_follow_the_login_rule(idp: IdP) -> None:
    for login in ["admin-bob", "carol+ops+qa@corp.test", "guest1", "dave@corp.test"]:
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar, timeout=aiohttp.ClientTimeout(total=15)) as s:
            _, claims = await full_flow(idp, s, login)
        want = expected_claims(login)
        assert {k: claims[k] for k in want} == want
    assert expected_claims("admin-bob")["groups"] == ["admins"]
    assert expected_claims("carol+ops+qa@corp.test")["email"] == "carol+ops+qa@corp.test"
    assert expected_claims("carol+ops+qa@corp.test")["groups"] == ["ops", "qa"]
    assert expected_claims("guest1")["groups"] == []


async def test_sso_session_skips_the_login_form(idp: IdP, session: aiohttp.ClientSession) -> None:
    _, first = await full_flow(idp, session, "alice")
    # Same cookie jar: the IdP remembers alice; the login name passed now is not used.
    _, second = await full_flow(idp, session, "mallory")
    assert second["sub"] == first["sub"] == "alice"


async def test_pkce_is_required(idp: IdP, session: aiohttp.ClientSession) -> None:
    conf = await get_json(session, idp.discovery_url)
    assert conf["code_challenge_methods_supported"] == ["S256"]
    params = {
        "client_id": idp.client_id,
        "redirect_uri": idp.redirect_uri,
        "response_type": "code",
        "scope": SCOPE,
        "state": "s1",
    }
    callback = await login_via_idp(session, f"{conf['authorization_endpoint']}?{urlencode(params)}", "alice")
    query = parse_qs(urlsplit(callback).query)
    assert query["error"] == ["invalid_request"]
    assert "PKCE" in query["error_description"][0]

    query, _verifier, _ = await authorize(idp, session, "alice")
    status, body = await exchange(idp, session, query["code"][0], pkce_pair()[0])
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_client_secret_post(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    async with start_idp(
        tmp_path, ["http://127.0.0.1:9/cb"], client_id="rp", token_endpoint_auth_method="client_secret_post"
    ) as post_idp:
        _, claims = await full_flow(post_idp, session, "admin-bob")
        assert claims["aud"] == "rp"
        assert claims["groups"] == ["admins"]


async def test_registered_auth_method_is_enforced(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    # oidc-provider itself takes either secret method; server.mjs refuses the one not registered.
    for registered, other in [
        ("client_secret_basic", "client_secret_post"),
        ("client_secret_post", "client_secret_basic"),
    ]:
        async with start_idp(tmp_path, ["http://127.0.0.1:9/cb"], token_endpoint_auth_method=registered) as p:
            query, verifier, _ = await authorize(p, session, "alice")
            status, body = await exchange(p, session, query["code"][0], verifier, method=other)
            assert (status, body["error"]) == (401, "invalid_client")
            status, body = await exchange(p, session, query["code"][0], verifier)  # code not consumed
            assert status == 200, body


async def test_rotate_keys(idp: IdP, session: aiohttp.ClientSession) -> None:
    old_token, _ = await full_flow(idp, session, "alice")
    old_kid = jwt.get_unverified_header(old_token)["kid"]

    new_kid = await idp.rotate_keys()
    assert new_kid != old_kid
    assert idp.kids == [new_kid, old_kid]
    jwks = await get_json(session, f"{idp.issuer}/jwks")
    assert [k["kid"] for k in jwks["keys"]] == [new_kid, old_kid]
    assert all("d" not in k for k in jwks["keys"])  # only public parts are published

    new_token, claims = await full_flow(idp, session, "alice")  # the SSO session survived the swap
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid
    assert claims["sub"] == "alice"
    await verify_id_token(idp, session, old_token)  # old key still published: rollover

    newest = await idp.rotate_keys(keep_old=False)
    jwks = await get_json(session, f"{idp.issuer}/jwks")
    assert [k["kid"] for k in jwks["keys"]] == [newest]
    with pytest.raises(KeyError):
        await verify_id_token(idp, session, old_token)
    token, _ = await full_flow(idp, session, "alice")
    assert jwt.get_unverified_header(token)["kid"] == newest


async def test_stop_and_start(idp: IdP, session: aiohttp.ClientSession) -> None:
    await full_flow(idp, session, "alice")
    await idp.stop()
    assert not idp.running
    with pytest.raises(aiohttp.ClientConnectionError):
        await get_json(session, idp.discovery_url)
    await idp.stop()  # idempotent

    await idp.start()
    assert idp.running
    conf = await get_json(session, idp.discovery_url)
    assert conf["issuer"] == idp.issuer
    _, claims = await full_flow(idp, session, "bob")  # sessions were in memory: a fresh login
    assert claims["sub"] == "bob"

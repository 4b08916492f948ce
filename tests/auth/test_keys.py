"""Signing keys: a fixed algorithm allow-list, every registered claim checked, rotation by ``kid``, the keys file."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.auth.keys import KeyFileError, KeySet, SigningKey, load_or_create, same_secret, write_keys

ISSUER = "http://localhost:8080"
AUDIENCE = "3000-ws1.localhost:8080"
KEYS = KeySet([SigningKey.generate()])


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"sub": "alice", "typ": "session", "iss": ISSUER, "aud": AUDIENCE, "iat": now,
                            "exp": now + 600}
    base.update(changes)
    return {key: value for key, value in base.items() if value is not None}


def unsigned(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"


def hs256(secret: bytes, payload: dict[str, Any]) -> str:
    """HS/RS confusion: an HMAC 'signed' with what a verifier might take for the key (the public key bytes)."""
    head = unsigned({"alg": "HS256", "typ": "JWT", "kid": KEYS.current.kid}, payload)
    return head + "." + b64(hmac.new(secret, head.encode(), hashlib.sha256).digest())


def ours(payload: dict[str, Any]) -> str:
    return KEYS.sign(payload)


KID = {"kid": KEYS.current.kid}
PUBLIC_RAW = KEYS.current.public.public_bytes_raw()
FORGERIES: list[tuple[str, Callable[[], str]]] = [
    ("alg none", lambda: unsigned({"alg": "none", **KID}, claims()) + "."),
    ("alg None spelt oddly", lambda: unsigned({"alg": "None", **KID}, claims()) + "."),
    ("HS256 keyed with the raw public key", lambda: hs256(PUBLIC_RAW, claims())),
    ("HS256 keyed with the JWK x", lambda: hs256(KEYS.current.public_jwk()["x"].encode(), claims())),
    ("RS256 from another key with our kid", lambda: jwt.encode(
        claims(), rsa.generate_private_key(public_exponent=65537, key_size=2048), algorithm="RS256", headers=KID)),
    ("EdDSA from another key with our kid", lambda: jwt.encode(
        claims(), Ed25519PrivateKey.generate(), algorithm="EdDSA", headers=KID)),
    ("unknown kid", lambda: jwt.encode(claims(), KEYS.current.private, algorithm="EdDSA", headers={"kid": "nope"})),
    ("no kid", lambda: jwt.encode(claims(), KEYS.current.private, algorithm="EdDSA")),
    ("payload changed after signing", lambda: _tamper(ours(claims()))),
    ("wrong audience", lambda: ours(claims(aud="3000-ws2.localhost:8080"))),
    ("audience list without ours", lambda: ours(claims(aud=["a", "b"]))),
    ("wrong issuer", lambda: ours(claims(iss="http://evil.test"))),
    ("expired", lambda: ours(claims(exp=int(time.time()) - 60))),
    ("not valid yet", lambda: ours(claims(nbf=int(time.time()) + 600))),
    ("missing exp", lambda: ours(claims(exp=None))),
    ("missing aud", lambda: ours(claims(aud=None))),
    ("missing iss", lambda: ours(claims(iss=None))),
    ("missing iat", lambda: ours(claims(iat=None))),
    ("not a JWT", lambda: "not-a-token"),
]


def _tamper(token: str) -> str:
    head, payload, signature = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data["sub"] = "admin"
    return f"{head}.{b64(json.dumps(data).encode())}.{signature}"


def test_the_control_token_verifies() -> None:
    assert KEYS.verify(ours(claims()), audience=AUDIENCE, issuer=ISSUER)["sub"] == "alice"


@pytest.mark.parametrize("forge", [case[1] for case in FORGERIES], ids=[case[0] for case in FORGERIES])
def test_forged_or_unfit_tokens_are_refused(forge: Callable[[], str]) -> None:
    with pytest.raises(jwt.InvalidTokenError):
        KEYS.verify(forge(), audience=AUDIENCE, issuer=ISSUER)


def test_rotation_keeps_old_tokens_valid_and_signs_with_the_new_kid() -> None:
    first = KeySet([SigningKey.generate()])
    old_token = first.sign(claims())
    second = first.rotated(keep_for=3600)
    assert second.current.kid != first.current.kid
    assert jwt.get_unverified_header(second.sign(claims()))["kid"] == second.current.kid
    assert second.verify(old_token, audience=AUDIENCE, issuer=ISSUER)["sub"] == "alice"
    assert {key["kid"] for key in second.jwks()["keys"]} == {first.current.kid, second.current.kid}
    assert all("d" not in key for key in second.jwks()["keys"]), "the JWKS must not publish private keys"

    # Once everything the old key signed has expired, a later rotation retires it.
    third = second.rotated(keep_for=3600, now=time.time() + 7200)
    assert [key.kid for key in third.keys][1:] == [second.current.kid]
    with pytest.raises(jwt.InvalidTokenError):
        third.verify(old_token, audience=AUDIENCE, issuer=ISSUER)


def test_keys_file_round_trip_is_private(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "signing-keys.json"
    created = load_or_create(path, create=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [key.kid for key in load_or_create(path, create=False).keys] == [key.kid for key in created.keys]
    rotated = created.rotated(keep_for=3600)
    write_keys(path, rotated)
    loaded = load_or_create(path, create=False)
    assert loaded.current.kid == rotated.current.kid
    assert loaded.verify(created.sign(claims()), audience=AUDIENCE, issuer=ISSUER)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("text", ["", "{}", '{"keys": []}', '{"keys": [{"kty": "RSA", "kid": "a", "d": "x"}]}',
                                  '{"keys": [{"kty": "OKP", "crv": "Ed25519", "d": "AAAA"}]}'])
def test_bad_keys_file_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "keys.json"
    path.write_text(text)
    with pytest.raises(KeyFileError):
        load_or_create(path, create=False)


def test_missing_keys_file_is_refused_unless_created(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        load_or_create(tmp_path / "absent.json", create=False)


@pytest.mark.parametrize(("given", "kept", "same"), [
    ("state-1", "state-1", True), ("state-1", "state-2", False), ("", "", True), ("", "x", False),
    ("\u00e9t\u00e9", "\u00e9t\u00e9", True), ("\u00e9t\u00e9", "ete", False), ("ete", "\u00e9t\u00e9", False),
    ("\udce9", "\udce9", True), ("\udce9", "\u00e9", False),  # a byte a header decoder escaped is no letter
])
def test_secrets_compare_as_the_text_they_are_whatever_it_holds(given: str, kept: str, same: bool) -> None:
    """States and nonces come back from browsers and IdPs: any text compares, none raises (a 500)."""
    assert same_secret(given, kept) is same

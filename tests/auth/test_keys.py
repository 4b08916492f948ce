"""Signing keys: a fixed algorithm allow-list, every registered claim checked, rotation by ``kid``, the keys file."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
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
    ("expired as long ago as the leeway for replicas' clocks", lambda: ours(claims(exp=int(time.time()) - 5))),
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


@pytest.mark.parametrize("change", [{"exp": -2}, {"iat": 3}, {"nbf": 3}], ids=["exp", "iat", "nbf"])
def test_a_token_from_a_replica_whose_clock_is_a_few_seconds_off_verifies(change: dict[str, int]) -> None:
    """Replicas share the keys, not a clock: a session one of them signed a moment ago, whose times read as a
    little in the past or future here, is the same session (a few seconds' leeway, as the forgeries show, no
    more)."""
    now = int(time.time())
    token = ours(claims(**{name: now + offset for name, offset in change.items()}))
    assert KEYS.verify(token, audience=AUDIENCE, issuer=ISSUER)["sub"] == "alice"


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


D = KEYS.current.private_jwk()["d"]
ALMOST: list[dict[str, Any]] = [
    {"kty": "RSA", "crv": "Ed25519", "kid": "a", "d": D}, {"kty": "OKP", "crv": "X25519", "kid": "a", "d": D},
    {"kty": "OKP", "crv": "Ed25519", "kid": "", "d": D}, {"kty": "OKP", "crv": "Ed25519", "kid": "a", "x": D},
    {"kty": "OKP", "crv": "Ed25519", "kid": "a"},
]


@pytest.mark.parametrize("text", ["", "{}", '{"keys": []}', '{"keys": [{"kty": "RSA", "kid": "a", "d": "x"}]}',
                                  '{"keys": [{"kty": "OKP", "crv": "Ed25519", "d": "AAAA"}]}', '{"signing": []}', "[]",
                                  *(json.dumps({"keys": [jwk]}) for jwk in ALMOST)])
def test_bad_keys_file_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "keys.json"
    path.write_text(text)
    with pytest.raises(KeyFileError):
        load_or_create(path, create=False)


def test_a_keys_file_of_public_keys_is_refused_saying_it_needs_private_ones(tmp_path: Path) -> None:
    """The published JWKS looks like a keys file: one pasted into the Secret must say what it lacks, not name
    a missing JSON field."""
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(KEYS.jwks()))
    with pytest.raises(KeyFileError, match="must be an Ed25519 private JWK"):
        load_or_create(path, create=False)


@pytest.mark.parametrize(("text", "said"), [('{"keys": [', "line 1 column 11"), ('{"signing": []}', "'keys'")])
def test_a_keys_file_that_is_not_one_is_refused_saying_where_it_goes_wrong(tmp_path: Path, text: str,
                                                                            said: str) -> None:
    """A gateway that cannot start for its keys file tells its operator which file and what in it, not only that
    something is wrong."""
    path = tmp_path / "keys.json"
    path.write_text(text)
    with pytest.raises(KeyFileError) as refused:
        load_or_create(path, create=False)
    assert str(path) in str(refused.value)
    assert said in str(refused.value)


def test_missing_keys_file_is_refused_unless_created(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        load_or_create(tmp_path / "absent.json", create=False)


@pytest.mark.parametrize(("given", "kept", "same"), [
    ("state-1", "state-1", True), ("state-1", "state-2", False), ("", "", True), ("", "x", False),
    ("\u00e9t\u00e9", "\u00e9t\u00e9", True), ("\u00e9t\u00e9", "ete", False), ("ete", "\u00e9t\u00e9", False),
    ("\udce9", "\udce9", True), ("\udce9", "\u00e9", False),  # a byte a header decoder escaped is no letter
    ("\udce9", "\udcea", False), ("\udce9", "?", False),  # nor another escaped byte, nor a stand-in for one
])
def test_secrets_compare_as_the_text_they_are_whatever_it_holds(given: str, kept: str, same: bool) -> None:
    """States and nonces come back from browsers and IdPs: any text compares, none raises (a 500)."""
    assert same_secret(given, kept) is same


CONTEXT = b"session"


@pytest.mark.parametrize("size", range(0, 40))
def test_sealed_data_of_any_length_opens_again(size: int) -> None:
    data = bytes(range(size))
    sealed = KEYS.seal(data, CONTEXT)
    assert sealed.startswith(KEYS.current.kid + ".")
    assert size < 4 or data not in base64.urlsafe_b64decode(sealed.partition(".")[2] + "=="), "readable on the way"
    assert KEYS.unseal(sealed, CONTEXT) == data


def test_sealing_twice_never_repeats_itself() -> None:
    assert KEYS.seal(b"same", CONTEXT) != KEYS.seal(b"same", CONTEXT)


def test_a_blob_sealed_by_another_replica_before_an_upgrade_still_opens() -> None:
    """Every replica derives the same sealing key from the shared keys file, release after release."""
    key = SigningKey.from_jwk({"kty": "OKP", "crv": "Ed25519", "kid": "replica-a", "created": 0,
                               "d": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"})
    sealed = ("replica-a.tm5Uf_Skuor9dmtEUGpFOUqWPafgCnqvH2D6OGhTTo_GLmiR6SpiGbfgGnQHptHoZ5Ip66bRT0p8Nsxq9w")
    assert KeySet([key]).unseal(sealed, CONTEXT) == b"a session from before the upgrade"


def _flip(text: str, index: int) -> str:
    return text[:index] + ("A" if text[index] != "A" else "B") + text[index + 1:]


SEALED = KEYS.seal(b"alice's session", CONTEXT)
KID_LEN = len(KEYS.current.kid) + 1
UNSEALABLE: list[tuple[str, Callable[[], str]]] = [
    ("another context", lambda: KEYS.seal(b"alice's session", b"ide")),
    ("nonce changed", lambda: _flip(SEALED, KID_LEN)),
    ("ciphertext changed", lambda: _flip(SEALED, KID_LEN + 20)),
    ("tag changed", lambda: _flip(SEALED, len(SEALED) - 2)),
    ("truncated", lambda: SEALED[:-4]),
    ("only a nonce", lambda: SEALED[:KID_LEN + 16]),
    ("shorter than a nonce", lambda: SEALED[:KID_LEN + 8]),
    ("empty body", lambda: SEALED[:KID_LEN]),
    ("no kid", lambda: SEALED[KID_LEN:]),
    ("unknown kid", lambda: "nope" + SEALED[KID_LEN - 1:]),
    ("sealed by another gateway under our kid", lambda: KeySet(
        [SigningKey(KEYS.current.kid, Ed25519PrivateKey.generate(), 0)]).seal(b"alice's session", CONTEXT)),
    ("not base64", lambda: SEALED[:KID_LEN] + "!!!!" + SEALED[KID_LEN + 4:]),
    ("a signed token instead", lambda: ours(claims())),
    ("", lambda: ""),
]


@pytest.mark.parametrize("forge", [case[1] for case in UNSEALABLE], ids=[case[0] for case in UNSEALABLE])
def test_tampered_or_foreign_sealed_blobs_are_refused(forge: Callable[[], str]) -> None:
    with pytest.raises(jwt.InvalidTokenError, match="not sealed by this gateway"):
        KEYS.unseal(forge(), CONTEXT)


def test_rotation_keeps_sealed_blobs_open_until_the_key_retires() -> None:
    first = KeySet([SigningKey.generate()])
    sealed = first.seal(b"kept", CONTEXT)
    second = first.rotated(keep_for=3600)
    assert second.seal(b"new", CONTEXT).startswith(second.current.kid + ".")
    assert second.unseal(sealed, CONTEXT) == b"kept"
    third = second.rotated(keep_for=3600, now=time.time() + 7200)
    with pytest.raises(jwt.InvalidTokenError):
        third.unseal(sealed, CONTEXT)


def test_a_key_is_retired_exactly_when_it_has_lived_keep_for() -> None:
    old = SigningKey(kid="old", private=Ed25519PrivateKey.generate(), created=1000.0)
    newer = SigningKey(kid="newer", private=Ed25519PrivateKey.generate(), created=2000.0)
    keys = KeySet([newer, old])
    assert [key.kid for key in keys.rotated(keep_for=100, now=1099.5).keys][1:] == ["newer", "old"]
    assert [key.kid for key in keys.rotated(keep_for=100, now=1100.0).keys][1:] == ["newer"]
    # The current key stays whatever its age: tokens it signed a moment ago are alive.
    assert [key.kid for key in keys.rotated(keep_for=100, now=9999.0).keys][1:] == ["newer"]


def test_a_signing_key_cannot_be_changed_in_place() -> None:
    key = SigningKey.generate()
    with pytest.raises(AttributeError):
        key.kid = "chosen"  # type: ignore[misc]


def test_new_keys_are_on_disk_before_they_take_the_old_files_place(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash just after a rotation leaves either file whole, never an empty one no replica can start with: the
    new file is written out and synced before it replaces the old. A crash cannot happen here: ``os.fsync`` notes
    what it would make durable, and when."""
    path = tmp_path / "keys.json"
    old = KeySet([SigningKey.generate()])
    write_keys(path, old)
    new = old.rotated(keep_for=3600)
    synced: list[tuple[int, str]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append((os.fstat(fd).st_size, load_or_create(path, create=False).current.kid))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_keys(path, new)
    assert synced == [(len(new.to_json()), old.current.kid)]
    assert load_or_create(path, create=False).current.kid == new.current.kid


def test_keys_file_keeps_each_keys_age_so_reloading_retires_nothing_early(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    first = KeySet([SigningKey.generate()])
    write_keys(path, first.rotated(keep_for=3600))
    again = load_or_create(path, create=False).rotated(keep_for=3600)
    assert [key.kid for key in again.keys][2:] == [first.current.kid], "a reloaded key must not look ancient"


def test_a_keys_file_that_cannot_be_read_is_refused_even_with_create(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=re.escape(f"cannot read keys file {tmp_path}: Is a directory")):
        load_or_create(tmp_path, create=True)  # a directory
    assert list(tmp_path.iterdir()) == []


def test_a_missing_keys_file_is_created_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "mounted" / "secret" / "keys.json"  # its directories too
    created = load_or_create(path, create=True)
    assert load_or_create(path, create=False).current.kid == created.current.kid
    write_keys(path, created.rotated(keep_for=3600))  # over an existing file
    assert len(load_or_create(path, create=True).keys) == 2
    assert sorted(entry.name for entry in path.parent.iterdir()) == ["keys.json"]


def test_the_published_jwks_lets_anyone_verify_our_tokens_and_nothing_more() -> None:
    rotated = KEYS.rotated(keep_for=3600)
    published = rotated.jwks()["keys"]
    assert [jwk["kid"] for jwk in published] == [key.kid for key in rotated.keys]
    for jwk, token in zip(published, (rotated.sign(claims()), KEYS.sign(claims())), strict=True):
        assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"]) == ("OKP", "Ed25519", "EdDSA", "sig")
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", jwk["x"]), "base64url without padding (RFC 7515 §2)"
        assert jwt.get_unverified_header(token) == {"alg": "EdDSA", "kid": jwk["kid"], "typ": "JWT"}
        verified = jwt.decode(token, jwt.PyJWK(jwk).key, algorithms=[jwk["alg"]], audience=AUDIENCE, issuer=ISSUER)
        assert verified["sub"] == "alice"
    with pytest.raises(jwt.InvalidTokenError):  # verification needs the gateway's kid, not just any of its keys
        rotated.verify(jwt.encode(claims(), rotated.current.private, algorithm="EdDSA",
                                  headers={"kid": KEYS.current.kid}), audience=AUDIENCE, issuer=ISSUER)

"""The gateway's signing keys: Ed25519, named by ``kid``, the first one signs and all of them verify.

Rotation prepends a new key and keeps the old ones until every token they signed has expired, so rotating
logs nobody out. Replicas share the keys file (a Kubernetes Secret) and nothing else. Verification pins
the algorithm to the key's own (EdDSA): ``none``, HMAC and RSA tokens are refused whatever their header says.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

ALGORITHM = "EdDSA"


def same_secret(given: str, kept: str) -> bool:
    """Compared in constant time, whatever the text: ``secrets.compare_digest`` raises for a ``str`` that is not
    ASCII, and what is compared comes from browsers and IdPs (``surrogatepass`` encodes every ``str``, lone
    surrogates too, and no two alike)."""
    return secrets.compare_digest(given.encode("utf-8", "surrogatepass"), kept.encode("utf-8", "surrogatepass"))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class KeyFileError(Exception):
    """The keys file is missing, unreadable or malformed."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    private: Ed25519PrivateKey
    created: float

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(kid=secrets.token_hex(8), private=Ed25519PrivateKey.generate(), created=time.time())

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    def sealer(self) -> AESGCM:
        """An AES-256-GCM key of its own, derived from the private key (HKDF), for what must not be read on the
        way: every replica holds the keys file, so each can open what another sealed, and rotation rotates it."""
        derived = HKDF(SHA256(), 32, salt=None, info=b"codehub-gateway sealed v1").derive(
            self.private.private_bytes_raw())
        return AESGCM(derived)

    def public_jwk(self) -> dict[str, str]:
        raw = self.public.public_bytes_raw()
        return {"kty": "OKP", "crv": "Ed25519", "x": _b64(raw), "kid": self.kid, "alg": ALGORITHM, "use": "sig"}

    def private_jwk(self) -> dict[str, Any]:
        return {**self.public_jwk(), "d": _b64(self.private.private_bytes_raw()), "created": int(self.created)}

    @classmethod
    def from_jwk(cls, jwk: Mapping[str, Any]) -> SigningKey:
        if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519" or not jwk.get("kid") or not jwk.get("d"):
            raise KeyFileError("each key must be an Ed25519 private JWK with a kid")
        return cls(kid=str(jwk["kid"]), private=Ed25519PrivateKey.from_private_bytes(_unb64(str(jwk["d"]))),
                   created=float(jwk.get("created", 0)))


class KeySet:
    """Immutable set of keys; ``sign`` uses the newest, ``verify`` accepts any by ``kid``."""

    def __init__(self, keys: list[SigningKey]) -> None:
        if not keys:
            raise KeyFileError("a key set needs at least one key")
        self.keys = tuple(keys)
        self._by_kid = {key.kid: key.public for key in keys}
        self._sealers = {key.kid: key.sealer() for key in keys}
        self._markers = tuple(HKDF(SHA256(), 32, salt=None, info=b"codehub-gateway origin mark v1").derive(
            key.private.private_bytes_raw()) for key in keys)

    @property
    def current(self) -> SigningKey:
        return self.keys[0]

    def sign(self, claims: Mapping[str, Any]) -> str:
        return jwt.encode(dict(claims), self.current.private, algorithm=ALGORITHM, headers={"kid": self.current.kid})

    def verify(self, token: str, *, audience: str, issuer: str, leeway: float = 5) -> dict[str, Any]:
        """Decode a token this gateway signed; raises ``jwt.InvalidTokenError`` on any problem."""
        header = jwt.get_unverified_header(token)
        key = self._by_kid.get(str(header.get("kid")))
        if key is None:  # any other algorithm than ALGORITHM is refused by ``decode``'s allow-list
            raise jwt.InvalidTokenError("unknown key")
        claims: dict[str, Any] = jwt.decode(
            token, key, algorithms=[ALGORITHM], audience=audience, issuer=issuer, leeway=leeway,
            options={"require": ["exp", "iat", "aud", "iss"]},
        )
        return claims

    def seal(self, data: bytes, context: bytes) -> str:
        """``data`` encrypted and authenticated with the current key, bound to ``context`` (which ``unseal`` must
        be given again): ``kid.base64url(nonce + ciphertext)``."""
        nonce = secrets.token_bytes(12)
        return f"{self.current.kid}.{_b64(nonce + self._sealers[self.current.kid].encrypt(nonce, data, context))}"

    def unseal(self, sealed: str, context: bytes) -> bytes:
        """What ``seal`` sealed with any key of this set for this ``context``; ``jwt.InvalidTokenError`` else."""
        kid, _, body = sealed.partition(".")
        sealer = self._sealers.get(kid)
        try:
            raw = _unb64(body)
            if sealer is None:
                raise ValueError(kid)
            return sealer.decrypt(raw[:12], raw[12:], context)  # a body too short for a nonce and a tag fails here too
        except (ValueError, InvalidTag):
            raise jwt.InvalidTokenError("not sealed by this gateway for this use") from None

    def marks(self, data: bytes) -> tuple[str, ...]:
        """A short keyed digest of ``data`` under each key of the set, the current key's first: what only this
        gateway can make, and which tells nothing of ``data`` (a mark made with a key since rotated out is known by
        the older ones)."""
        return tuple(_b64(hmac.new(marker, data, hashlib.sha256).digest()[:18]) for marker in self._markers)

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        return {"keys": [key.public_jwk() for key in self.keys]}

    def to_json(self) -> str:
        return json.dumps({"keys": [key.private_jwk() for key in self.keys]}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> KeySet:
        try:
            data = json.loads(text)
            return cls([SigningKey.from_jwk(jwk) for jwk in data["keys"]])
        except (ValueError, KeyError, TypeError) as exc:
            raise KeyFileError(f"not a valid keys file: {exc}") from None

    def rotated(self, keep_for: float, now: float | None = None) -> KeySet:
        """A new current key; older keys stay while tokens they signed may still be alive."""
        now = time.time() if now is None else now
        fresh = SigningKey.generate()
        kept = [key for index, key in enumerate(self.keys) if index == 0 or now - key.created < keep_for]
        return KeySet([fresh, *kept])


def write_keys(path: Path, keys: KeySet) -> None:
    """Atomically replace the keys file, readable only by its owner."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(keys.to_json())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_or_create(path: Path, *, create: bool) -> KeySet:
    try:
        return KeySet.from_json(path.read_text())
    except FileNotFoundError:
        if not create:
            raise KeyFileError(f"keys file {path} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read keys file {path}: {exc.strerror}") from None
    except KeyFileError as exc:  # which file: the settings may name it, or leave it under the state folder
        raise KeyFileError(f"{path}: {exc}") from None
    keys = KeySet([SigningKey.generate()])
    write_keys(path, keys)
    return keys

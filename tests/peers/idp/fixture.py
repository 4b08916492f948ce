"""A real OpenID Connect provider (npm ``oidc-provider``) on loopback, for tests.

Use from a conftest::

    from tests.peers.idp.fixture import idp  # noqa: F401  (pytest fixture)

and optionally define an ``idp_redirect_uris`` fixture (list of loopback redirect URIs of the relying party;
without it a single ``http://127.0.0.1:<free port>/oauth2/callback`` is registered). Or call
``start_idp(tmp_path, redirect_uris)`` directly as an async context manager.

Accounts: any login is accepted, the password is ignored. Claims derive from the login (``claimsFor`` in
``server.mjs``; ``expected_claims(login)`` mirrors it in Python):

- ``sub`` = login; ``email`` = login if it contains '@', else ``<login>@example.com``; ``email_verified``;
- ``name`` and ``preferred_username`` = local part (before '@') without ``+suffixes``;
- ``groups`` from the local part: ``name+g1+g2`` -> ``[g1, g2]``; starts with ``admin`` -> ``["admins"]``;
  starts with ``guest`` -> ``[]``; anything else -> ``["dev"]``.

Keys are generated at run time (RSA 2048, RS256); none are committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

REPO_ROOT = Path(__file__).resolve().parents[3]
SERVER_SCRIPT = Path(__file__).resolve().with_name("server.mjs")
START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0


class IdPError(RuntimeError):
    """The IdP process failed, or the login flow hit something unexpected."""


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_rsa_jwk(kid: str) -> dict[str, Any]:
    """A fresh private RSA JWK (RS256, use=sig) with the given kid."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key))
    jwk.update(kid=kid, use="sig", alg="RS256")
    # PyJWT marks a private JWK key_ops ["sign"]; oidc-provider then finds no key to check its own ID tokens with
    # (an id_token_hint at logout), which a real IdP's keys, configured without key_ops, can.
    jwk.pop("key_ops", None)
    return jwk


def new_kid() -> str:
    return f"test-{int(time.time())}-{secrets.token_hex(4)}"


def expected_claims(login: str) -> dict[str, Any]:
    """The claims the IdP releases for ``login`` (mirror of ``claimsFor`` in server.mjs)."""
    local = login.split("@")[0]
    base, *explicit = local.split("+")
    if explicit:
        groups = explicit
    elif base.startswith("admin"):
        groups = ["admins"]
    elif base.startswith("guest"):
        groups = []
    else:
        groups = ["dev"]
    email = login if "@" in login else f"{login}@example.com"
    return {
        "sub": login,
        "email": email,
        "email_verified": True,
        "name": base,
        "preferred_username": base,
        "groups": groups,
    }


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


def _write_jwks(path: Path, keys: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"keys": keys}))
    tmp.chmod(0o600)
    tmp.replace(path)


@dataclass
class IdP:
    """A running (or stopped) oidc-provider process. ``issuer`` is ``http://127.0.0.1:<port>``."""

    issuer: str
    client_id: str
    client_secret: str
    redirect_uris: list[str]
    jwks_path: Path
    token_endpoint_auth_method: str
    clients: list[dict[str, Any]]
    log_path: Path
    _proc: asyncio.subprocess.Process | None = field(default=None, repr=False)

    @property
    def redirect_uri(self) -> str:
        return self.redirect_uris[0]

    @property
    def port(self) -> int:
        port = urlsplit(self.issuer).port
        assert port is not None
        return port

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def kids(self) -> list[str]:
        """Key ids in the jwks file, the signing key first."""
        return [k["kid"] for k in json.loads(self.jwks_path.read_text())["keys"]]

    def log_tail(self, chars: int = 4000) -> str:
        return _tail(self.log_path, chars)

    async def start(self, ready_timeout: float = START_TIMEOUT) -> None:
        """Start the process again on the same port (after ``stop()``); in-memory sessions are gone."""
        if self.running:
            return
        self._proc, issuer = await _spawn(
            self.port, self.jwks_path, self.clients, self.log_path, ready_timeout
        )
        if issuer != self.issuer:  # pragma: no cover - node listens on exactly the given port
            await self.stop()
            raise IdPError(f"restarted IdP announced {issuer}, expected {self.issuer}")

    async def stop(self) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after 5 s). The port then refuses connections."""
        proc, self._proc = self._proc, None
        if proc is not None:
            await _terminate(proc)

    async def rotate_keys(self, keep_old: bool = True) -> str:
        """Make a new RSA signing key with a new kid and return that kid.

        The new key goes first in the jwks file, so oidc-provider signs with it from now on. With
        ``keep_old`` the previous keys stay published at ``jwks_uri`` (verification of tokens issued
        before keeps working: the normal rollover); without it they are dropped (old tokens no longer
        verify against the JWKS). A running IdP swaps to the new keys in place (POST /__test/rotate
        re-reads the file; same port, sessions kept) before this returns; a stopped one uses them on
        ``start()``.
        """
        kid = new_kid()
        old = json.loads(self.jwks_path.read_text())["keys"] if keep_old else []
        _write_jwks(self.jwks_path, [make_rsa_jwk(kid), *old])
        if self.running:
            timeout = aiohttp.ClientTimeout(total=10)
            async with (
                aiohttp.ClientSession(timeout=timeout) as http,
                http.post(f"{self.issuer}/__test/rotate") as resp,
            ):
                body = await resp.text()
                if resp.status != 200:
                    raise IdPError(f"rotate failed: {resp.status} {body}\n{self.log_tail()}")
                if json.loads(body)["kids"][0] != kid:
                    raise IdPError(f"rotate did not take the new key: {body}")
        return kid


async def _terminate(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    # Let the pipe transport see EOF and close, so no "unclosed transport" warning is left behind.
    if proc.stdout is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.stdout.read(), STOP_TIMEOUT)


async def _spawn(
    port: int, jwks_path: Path, clients: list[dict[str, Any]], log_path: Path, ready_timeout: float
) -> tuple[asyncio.subprocess.Process, str]:
    if not (REPO_ROOT / "node_modules" / "oidc-provider").is_dir():
        raise IdPError(f"oidc-provider is not installed: run `npm ci` in {REPO_ROOT}")
    with log_path.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            "node",
            str(SERVER_SCRIPT),
            "--port",
            str(port),
            "--jwks",
            str(jwks_path),
            "--clients",
            json.dumps(clients),
            cwd=REPO_ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            env={**os.environ, "NODE_ENV": "test"},
        )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(ready_timeout):
            while True:
                line = (await proc.stdout.readline()).decode(errors="replace")
                if not line:
                    await proc.wait()
                    raise IdPError(f"IdP exited with {proc.returncode} before ready:\n{_tail(log_path)}")
                if line.startswith("ready "):
                    return proc, line.split()[1]
    except BaseException as exc:
        await _terminate(proc)
        if isinstance(exc, TimeoutError):
            raise IdPError(f"IdP not ready within {ready_timeout} s:\n{_tail(log_path)}") from exc
        raise


@contextlib.asynccontextmanager
async def start_idp(
    tmp_path: Path,
    redirect_uris: Sequence[str],
    *,
    client_id: str = "gateway",
    client_secret: str | None = None,
    token_endpoint_auth_method: str = "client_secret_basic",
    client_overrides: Mapping[str, Any] | None = None,
    extra_clients: Sequence[Mapping[str, Any]] = (),
    ready_timeout: float = START_TIMEOUT,
) -> AsyncIterator[IdP]:
    """Run an IdP with one static client (plus ``extra_clients``, raw oidc-provider client metadata).

    ``client_overrides`` is merged into the main client's metadata (e.g. ``post_logout_redirect_uris``,
    default: the origin root of each redirect URI; or ``application_type="native"``, with which
    oidc-provider ignores the port of ``http://127.0.0.1`` redirect URIs, RFC 8252).

    Writes ``idp-jwks.json`` and ``idp.log`` into ``tmp_path``; the port is chosen by the kernel at the
    first start and kept for restarts. The process is always killed on exit.
    """
    jwks_path = tmp_path / "idp-jwks.json"
    _write_jwks(jwks_path, [make_rsa_jwk(new_kid())])
    secret = client_secret or secrets.token_urlsafe(24)
    clients = [
        {
            "client_id": client_id,
            "client_secret": secret,
            "redirect_uris": list(redirect_uris),
            "post_logout_redirect_uris": [urljoin(u, "/") for u in redirect_uris],
            "token_endpoint_auth_method": token_endpoint_auth_method,
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            **(client_overrides or {}),
        },
        *(dict(c) for c in extra_clients),
    ]
    log_path = tmp_path / "idp.log"
    proc, issuer = await _spawn(0, jwks_path, clients, log_path, ready_timeout)
    idp = IdP(
        issuer=issuer,
        client_id=client_id,
        client_secret=secret,
        redirect_uris=list(redirect_uris),
        jwks_path=jwks_path,
        token_endpoint_auth_method=token_endpoint_auth_method,
        clients=clients,
        log_path=log_path,
        _proc=proc,
    )
    try:
        yield idp
    finally:
        await idp.stop()


class _FormParser(HTMLParser):
    """Collects the first <form>'s action and its named inputs' values."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self._in_form = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form" and self.action is None:
            self.action, self._in_form = a.get("action", ""), True
        elif tag == "input" and self._in_form and a.get("name"):
            self.fields[a["name"]] = a.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


async def login_via_idp(
    session: aiohttp.ClientSession,
    authorize_url: str,
    login: str,
    *,
    issuer: str | None = None,
    password: str = "secret",
    max_steps: int = 12,
) -> str:
    """Drive the devInteractions pages headlessly and return the redirect to the relying party.

    GETs ``authorize_url`` and follows redirects while they stay on the IdP's origin (``issuer``, default
    the origin of ``authorize_url``; redirects before reaching the IdP, e.g. from a gateway's login route,
    are followed too), submits the login form (``prompt=login``) and the consent form (``prompt=consent``)
    when shown, and returns the first ``Location`` leaving the IdP, without following it:
    ``<redirect_uri>?code=..&state=..&iss=..`` (or ``error=..``). ``session`` must use
    ``aiohttp.CookieJar(unsafe=True)`` (IP-address host); its IdP cookies keep the SSO session.
    """
    idp_origin = _origin(issuer or authorize_url)
    url, method, data = authorize_url, "GET", None
    for _ in range(max_steps):
        async with session.request(method, url, data=data, allow_redirects=False) as resp:
            location = resp.headers.get("Location")
            if resp.status in (301, 302, 303, 307, 308) and location:
                nxt = urljoin(url, location)
                if _origin(url) == idp_origin and _origin(nxt) != idp_origin:
                    return nxt
                url, method, data = nxt, "GET", None
                continue
            body = await resp.text()
            if resp.status != 200 or "<form" not in body or _origin(url) != idp_origin:
                raise IdPError(f"unexpected response {resp.status} at {url}: {body[:2000]}")
        form = _FormParser()
        form.feed(body)
        prompt = form.fields.get("prompt")
        if prompt == "login":
            data = {**form.fields, "prompt": "login", "login": login, "password": password}
        elif prompt == "consent":
            data = {**form.fields, "prompt": "consent"}
        else:
            raise IdPError(f"unknown interaction form at {url}: {body[:2000]}")
        url, method = urljoin(url, form.action or url), "POST"
    raise IdPError(f"login did not reach the relying party within {max_steps} steps (last: {url})")


@pytest.fixture
async def idp(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[IdP]:
    """A running IdP for one test. Redirect URIs come from an ``idp_redirect_uris`` fixture if defined."""
    try:
        redirect_uris: list[str] = request.getfixturevalue("idp_redirect_uris")
    except pytest.FixtureLookupError:
        redirect_uris = [f"http://127.0.0.1:{free_loopback_port()}/oauth2/callback"]
    async with start_idp(tmp_path, redirect_uris) as running:
        yield running

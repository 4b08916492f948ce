"""Session cookies, hand-off codes and assertions: each token is for one host and one purpose, and lives briefly."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.auth import sessions as sessions_module
from gateway.auth.identity import Identity
from gateway.auth.keys import KeySet, SigningKey, write_keys
from gateway.auth.sessions import (
    ASSERTION_TTL,
    HAND_OFFS_PER_MINUTE,
    HAND_OFFS_PER_MINUTE_IN_ALL,
    HANDOFF_TTL,
    SIGN_INS_PER_HOUR,
    Ended,
    Session,
    Sessions,
    SignIn,
    TooManyHandOffs,
    TooManySignIns,
    cookie_is_alone,
    read_cookie,
    set_cookie,
)
from gateway.auth.store import FileTokenStore
from gateway.errors import BadRequest
from tests.auth.conftest import MakeBrowser, Serve

pytestmark = pytest.mark.timeout(60)

ISSUER = "http://localhost:8080"
HOST = "3000-ws1.localhost:8080"
OTHER = "3000-ws2.localhost:8080"
ALICE = Identity("alice", "alice@example.com", ("dev",), "Alice", (("email_verified", "true"),))
KEYS = KeySet([SigningKey.generate()])


def sessions(clock: float = 0.0, keys: KeySet = KEYS) -> Sessions:
    """Sessions whose clock runs ``clock`` seconds off real time (PyJWT verifies against real time)."""
    return Sessions(lambda: keys, ISSUER, ttl=3600, clock=lambda: time.time() + clock)


def opened(s: Sessions, token: str, host: str) -> Identity | None:
    """Whose session ``token`` is on ``host``, with no sign-in signed out."""
    session = s.read(token, host, Ended())
    return session.identity if session is not None else None


def hub(identity: Identity) -> Session:
    """A session at the hub, as a hand-off passes it on."""
    return Session(identity, SignIn("0" * 32, time.time() + 3600))


@pytest.mark.parametrize("space", ["\u2000", "\u00a0", "\u3000", "\u2028", "\x85", "\x1c", "\ufeff"])
def test_a_cookie_name_with_other_white_space_is_not_ours(space: str) -> None:
    """Browsers set ``\u2000__Host-…`` with a ``Domain=`` from any sibling host (only a name that begins with the
    prefix is held to it): it is another cookie, not the gateway's (tests/browser/test_cookie_prefix.py)."""
    name = "__Host-codehub_session"
    planted = CIMultiDict(Cookie=f"{space}{name}=planted; {name}{space}=planted")
    assert read_cookie(planted, name) is None
    both = CIMultiDict(Cookie=f"{space}{name}=planted;  {name}=mine\t; other=1")
    assert read_cookie(both, name) == "mine"


def _read_pair_by_pair(headers: CIMultiDict[str], name: str) -> str | None:
    """RFC 6265's reading, pair by pair (what ``read_cookie`` did before it looked only for our names)."""
    for header in headers.getall("Cookie", ()):
        for part in header.split(";"):
            key, eq, value = part.partition("=")
            if eq and key.strip(" \t") == name:
                return value.strip(" \t")
    return None


_PIECES = st.sampled_from([*"ab=; \t", "\u2000", "codehub_session", "__Host-"])


@given(st.lists(st.lists(_PIECES, max_size=30).map("".join), min_size=1, max_size=3), st.booleans())
@example(["codehub_session" + ";" * 50], True)
@example([" codehub_session =\tv ; codehub_session=w"], True)
@example(["a=1", "codehub_session=second-header"], False)
@example(["a=xcodehub_session=planted"], True)
@example(["a=xcodehub_session=planted", "codehub_session=second-header"], True)
def test_our_cookie_is_read_as_pair_by_pair_reading_would(values: list[str], many: bool) -> None:
    """Both ways: ``many`` puts past ``_MANY_PAIRS`` empty pairs behind each header, for the regular expression."""
    tail = ";" * max(sessions_module._MANY_PAIRS + 1, sessions_module._SHORT + 1) if many else ""
    headers = CIMultiDict([("Cookie", value + tail) for value in values])
    assert read_cookie(headers, "codehub_session") == _read_pair_by_pair(headers, "codehub_session")


@pytest.mark.parametrize(("cookies", "alone"), [
    (["codehub_handoff=a"], True),
    (["app=1; codehub_handoff=a; other=2"], True),
    (["app=1", " \tcodehub_handoff =a"], True),  # spaces and tabs around the name are the header's, not the name's
    (["my_codehub_handoff=a; codehub_handoffs=b; codehub_handoff=c"], True),  # names that contain ours are others
    (["app=1"], False),  # none at all
    (["codehub_handoff=a; codehub_handoff=b"], False),  # one planted for the parent domain beside the host's own
    (["codehub_handoff=a", "codehub_handoff=b"], False),  # in Cookie headers of their own
])
def test_a_cookie_is_alone_only_when_exactly_one_of_its_name_came(cookies: list[str], alone: bool) -> None:
    """A cookie set for the shared parent domain, or for a longer path, comes beside the host's own under the same
    name: which one a reader picks is then the browser's order, not ours to trust."""
    assert cookie_is_alone(CIMultiDictProxy(CIMultiDict(("Cookie", cookie) for cookie in cookies)),
                           "codehub_handoff") is alone


def test_session_cookie_round_trip_keeps_the_whole_identity() -> None:
    s = sessions()
    assert opened(s, s.issue(ALICE, HOST), HOST) == ALICE


def test_session_cookie_is_for_its_host_only() -> None:
    s = sessions()
    assert opened(s, s.issue(ALICE, HOST), OTHER) is None


def test_expired_session_cookie_is_refused() -> None:
    old = sessions(clock=-7200).issue(ALICE, HOST)
    assert opened(sessions(), old, HOST) is None


def test_a_sealed_state_names_nobody_and_opens_only_where_and_while_it_was_meant_to() -> None:
    """A consent page's ``ask`` names the visitor: sealed, padded, for one audience, for a while."""
    s = sessions()
    sealed = s.seal_state({"ask": ["alice", "ws1", 3000, "bob"]}, HOST, 60)
    assert s.open_state(sealed, HOST) == {"ask": ["alice", "ws1", 3000, "bob"], "typ": "state",
                                          "exp": int(time.time()) + 60}
    assert len(s.seal_state({"ask": ["a" * 40]}, HOST, 60)) == len(sealed)
    assert s.open_state(sealed, OTHER) is None
    assert sessions(clock=120).open_state(sealed, HOST) is None
    for other in (s.sign_state({"ask": ["alice"]}, HOST, 60), s.issue(ALICE, HOST),
                  s.handoff_code(hub(ALICE), HOST, "state"), "", "x.y", "!", None):
        assert s.open_state(other, HOST) is None
    assert opened(s, sealed, HOST) is None


def test_a_sealed_state_opens_until_its_last_second_and_not_at_its_expiry() -> None:
    """As a session does: a consent page's ``ask`` or a sign-in's ``next`` is done with when its time is up."""
    now = [float(int(time.time()))]
    s = Sessions(lambda: KEYS, ISSUER, ttl=3600, clock=lambda: now[0])
    sealed = s.seal_state({"next": "/"}, HOST, 60)
    now[0] += 59.5
    assert s.open_state(sealed, HOST) is not None
    now[0] += 0.5
    assert s.open_state(sealed, HOST) is None


def test_other_token_types_are_not_session_cookies() -> None:
    s = sessions()
    assert opened(s, s.handoff_code(hub(ALICE), HOST, "state"), HOST) is None
    assert opened(s, s.sign_state({"share": "x"}, HOST, 60), HOST) is None
    # An assertion handed to an app must not work as a cookie, even if an app replays it for its own host.
    assert opened(s, s.assertion(ALICE, HOST), HOST) is None


def test_handoff_code_lives_at_most_a_minute() -> None:
    s = sessions()
    code = s.handoff_code(hub(ALICE), HOST, "state")
    claims = jwt.decode(code, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] <= 60
    assert HANDOFF_TTL <= 60
    stale = sessions(clock=-(HANDOFF_TTL + 10)).handoff_code(hub(ALICE), HOST, "state")
    with pytest.raises(BadRequest) as caught:
        s.read_code(stale, HOST, "state")
    assert caught.value.code == "handoff-invalid"


def test_handoff_code_is_good_on_its_host_in_its_browser_with_a_key_of_its_own() -> None:
    s = sessions()
    code = s.handoff_code(hub(ALICE), HOST, "state-1")
    for host, state, error in [(OTHER, "state-1", "handoff-invalid"), (HOST, "state-2", "handoff-state-mismatch"),
                               (HOST, None, "handoff-state-mismatch"), (HOST, "", "handoff-state-mismatch")]:
        with pytest.raises(BadRequest) as caught:
            s.read_code(code, host, state)
        assert caught.value.code == error
    session, once, until = s.read_code(code, HOST, "state-1")
    assert session.identity == ALICE
    assert until - time.time() <= HANDOFF_TTL + 1
    other_once = s.read_code(s.handoff_code(hub(ALICE), HOST, "state-1"), HOST, "state-1")[1]
    assert once.startswith("handoff-")
    assert once != other_once, "each code has its own once-key (the token store enforces the once)"


@pytest.mark.parametrize(("minted", "presented"), [("state-1", "\u00e9t\u00e9"), ("\u00e9t\u00e9", "state-1"),
                                                   ("\u00e9t\u00e9", "\u00e9t\u00e9x"), ("state-1", "\udce9")])
def test_a_state_that_is_not_ascii_is_a_mismatch_not_a_crash(minted: str, presented: str) -> None:
    """The state cookie is whatever the browser sends (a script on the preview can set it) and the state in the code
    whatever the hub's hand-off was asked for: text that is not ASCII made ``secrets.compare_digest`` raise, a 500."""
    s = sessions()
    with pytest.raises(BadRequest) as caught:
        s.read_code(s.handoff_code(hub(ALICE), HOST, minted), HOST, presented)
    assert caught.value.code == "handoff-state-mismatch"
    assert s.read_code(s.handoff_code(hub(ALICE), HOST, minted), HOST, minted)[0].identity == ALICE


async def test_a_handoff_state_cookie_that_is_not_ascii_is_refused_not_a_crash(serve: Serve,
                                                                              make_browser: MakeBrowser) -> None:
    served = await serve({"ws1": {"owner": "alice", "ports": {3000: "private"}}})
    browser = await make_browser(served)
    assert (await browser.dev_sign_in(served.hub, "alice")).status == 303
    callback = await browser.navigate_until(served.preview("ws1", 3000, "/p"),
                                            lambda url: "/_codehub/auth/callback" in url)
    page = await browser.fetch("GET", callback, headers={"Accept": "application/json",
                                                         "Cookie": "codehub_handoff=\u00e9t\u00e9"})
    assert page.status == 400, page.text
    assert page.json()["error"]["code"] == "handoff-state-mismatch"


def test_a_handoff_code_says_nothing_of_who_it_is_for() -> None:
    """The code arrives in a URL on the preview's origin, whose owner's scripts can read it (a frame of theirs that
    opens the hand-off, say): a signed code is readable by anyone, so the identity in it is sealed (AES-GCM, a
    key derived from the signing key). Without that it gave the owner every claim, past policy and consent."""
    s = sessions()
    code = s.handoff_code(hub(ALICE), HOST, "state")
    payload = json.dumps(jwt.decode(code, options={"verify_signature": False}))
    for value in ("alice", "example.com", "dev", "Alice", "email_verified"):
        assert value not in payload
    assert s.read_code(code, HOST, "state")[0].identity == ALICE
    lengths = {len(jwt.decode(s.handoff_code(hub(who), HOST, "state"), options={"verify_signature": False})["who"])
               for who in (Identity("al"), ALICE, Identity("bob", "bob@example.com", ("team-a", "secret-project")))}
    assert len(lengths) == 1, "nor, by its length, how much there is to say"
    rotated = sessions(keys=KeySet([SigningKey.generate(), *KEYS.keys]))
    assert rotated.read_code(code, HOST, "state")[0].identity == ALICE, "sealed just before a rotation: still opens"
    forged = jwt.decode(code, options={"verify_signature": False})
    forged["who"] = s.handoff_code(hub(ALICE), OTHER, "state")  # sealed for another host: refused even if re-signed
    forged["who"] = jwt.decode(forged["who"], options={"verify_signature": False})["who"]
    with pytest.raises(BadRequest) as caught:
        s.read_code(KEYS.sign(forged), HOST, "state")
    assert caught.value.code == "handoff-invalid"


def test_a_session_cookie_says_nothing_of_who_it_is_for() -> None:
    """The owner of the host a cookie is for can end up holding it (they redeem a visitor's hand-off code
    themselves): it is sealed, and its length tells only how many 256-byte steps the identity takes."""
    s = sessions()
    # Values long enough that random base64 holds one by chance about once in 10^15 cookies ("dev" did once in CI).
    who = Identity("alice-subject", "alice.subject@example.com", ("developers-group",), "Alice Display Name",
                   (("email_verified_claim", "true-value"),))
    cookie = s.issue(who, HOST)
    for value in ("alice-subject", "alice.subject@example.com", "developers-group", "Alice Display Name",
                  "email_verified_claim", "true-value", HOST):
        assert value not in cookie
    lengths = {len(s.issue(who, HOST)) for who in (Identity("al"), ALICE, Identity("bob", "bob@example.com",
                                                                                        ("team-a", "secret-project")))}
    assert len(lengths) == 1
    many = Identity("carol", groups=tuple(f"group-{index}" for index in range(40)))  # over 256 bytes of claims
    assert len(s.issue(many, HOST)) > lengths.pop()
    assert opened(s, s.issue(many, HOST), HOST) == many


async def test_the_file_store_admits_a_key_once_across_processes(tmp_path: Path) -> None:
    """Two stores on one file are two ``serve --workers`` workers: a code used at one is refused at the other."""
    first, second = FileTokenStore(tmp_path / "tokens.json"), FileTokenStore(tmp_path / "tokens.json")
    until = time.time() + 60
    assert await first.use_once("handoff-a", until)
    assert not await second.use_once("handoff-a", until)
    assert not await first.use_once("handoff-a", until)
    assert await second.use_once("handoff-b", until)
    # Forgotten once it has expired (a code past its expiry is refused by its signature anyway).
    assert await first.use_once("handoff-old", time.time() - 1)
    assert await second.use_once("handoff-c", until)
    assert "handoff-old" not in json.loads((tmp_path / "tokens.used.json").read_text())


async def test_the_file_store_finds_a_workspaces_links_written_by_another_process(tmp_path: Path) -> None:
    """``shares_of`` reads an index kept beside the links: it must follow creations here, and links another worker
    wrote to the file."""
    first, second = FileTokenStore(tmp_path / "tokens.json"), FileTokenStore(tmp_path / "tokens.json")
    older, _ = await first.create_share(workspace="ws1", port=3000, audience="anyone", people=[], created_by="alice",
                                        ttl=60, now=time.time() - 5)
    newer, _ = await second.create_share(workspace="ws1", port=None, audience="anyone", people=[],
                                         created_by="alice", ttl=60)
    other, _ = await second.create_share(workspace="ws2", port=3000, audience="anyone", people=[],
                                         created_by="bob", ttl=60)
    for store in (first, second):
        assert [link.id for link in store.shares_of("ws1")] == [newer.id, older.id]  # newest first
        assert [link.id for link in store.shares_of("ws2")] == [other.id]
        assert store.shares_of("ws3") == []


def test_a_signed_out_sign_in_opens_no_session_even_one_read_before() -> None:
    """Every session of a sign-in carries its id: once the id is among the ended ones, none opens, on any host,
    cached or not; other sign-ins of the same person are untouched."""
    s = sessions()
    sign_in, other = s.sign_in(), s.sign_in()
    at_hub, preview, again = s.issue(ALICE, ISSUER, sign_in), s.issue(ALICE, HOST, sign_in), s.issue(ALICE, HOST, other)
    assert s.read(preview, HOST, Ended()) == (ALICE, sign_in)
    ended = Ended({sign_in.id: sign_in.expires})
    assert s.read(preview, HOST, ended) is None
    assert s.read(at_hub, ISSUER, ended) is None
    assert s.read(again, HOST, ended) == (ALICE, other)
    assert sign_in.id != other.id
    assert len(sign_in.id) == 32


def test_a_hand_off_passes_the_sign_in_on_and_its_sessions_end_with_it() -> None:
    """A preview's session ends when the hub's sign-in does, not a whole ``ttl`` after the hand-off."""
    s = sessions()
    signed_in = hub(ALICE)._replace(sign_in=SignIn("1" * 32, time.time() + 100))
    session, _, _ = s.read_code(s.handoff_code(signed_in, HOST, "state"), HOST, "state")
    assert session == (ALICE, SignIn("1" * 32, int(signed_in.sign_in.expires)))
    cookie = s.issue(session.identity, HOST, session.sign_in)
    assert s.read(cookie, HOST, Ended()) == session
    assert opened(sessions(clock=101), cookie, HOST) is None


def test_a_session_cookie_of_no_sign_in_does_not_open() -> None:
    """Cookies from before sign-ins had ids: they could not be signed out, so they open no more."""
    record = json.dumps({**ALICE.claims(), "exp": int(time.time()) + 3600}).encode()
    assert opened(sessions(), KEYS.seal(record, f"session {HOST}".encode()), HOST) is None
    code = KEYS.sign({"typ": "handoff", "state": "state", "jti": "x", "iss": ISSUER, "aud": HOST,
                      "exp": int(time.time()) + 60, "who": KEYS.seal(json.dumps(ALICE.claims()).encode(),
                                                                     f"handoff {HOST}".encode())})
    with pytest.raises(BadRequest) as caught:
        sessions().read_code(code, HOST, "state")
    assert caught.value.code == "handoff-invalid"


def test_a_hand_off_code_or_an_assertion_is_no_state() -> None:
    """Hand-off codes, assertions and states are all JWTs signed by the gateway's keys for a host: what one is for
    is its type. A code in a URL on a host (its owner's scripts read it) does not pass for a state cookie there."""
    s = sessions()
    state = s.sign_state({"share": "x"}, HOST, 60)
    assert s.read_state(state, HOST) is not None
    for other in (s.handoff_code(hub(ALICE), HOST, "state"), s.assertion(ALICE, HOST)):
        assert s.read_state(other, HOST) is None


def test_session_cookie_is_not_a_handoff_code() -> None:
    s = sessions()
    with pytest.raises(BadRequest):
        s.read_code(s.issue(ALICE, HOST), HOST, "state")


def test_assertion_names_its_audience_and_issuer() -> None:
    """It lives two minutes, as the README tells the apps that verify it."""
    s = sessions()
    token = s.assertion(ALICE, "http://3000-ws1.localhost:8080")
    claims = KEYS.verify(token, audience="http://3000-ws1.localhost:8080", issuer=ISSUER)
    assert (claims["sub"], claims["typ"], claims["email"]) == ("alice", "assertion", "alice@example.com")
    assert claims["exp"] - claims["iat"] == 120


def test_rotation_logs_nobody_out() -> None:
    holder = [KeySet([SigningKey.generate()])]
    s = Sessions(lambda: holder[0], ISSUER, ttl=3600)
    old = s.issue(ALICE, HOST)
    holder[0] = holder[0].rotated(keep_for=3600)
    s.forget_cached()
    assert opened(s, old, HOST) == ALICE
    new = s.issue(ALICE, HOST)
    assert sealed_by(new) == holder[0].current.kid != sealed_by(old)



def sealed_by(cookie: str) -> str:
    """The kid of the key a session cookie was sealed with (``KeySet.seal``: ``kid.sealed``)."""
    return cookie.partition(".")[0]


class CountingKeys(KeySet):
    """A key set that counts what it opens and what it signs."""

    checks = 0
    signatures = 0

    def unseal(self, sealed: str, context: bytes) -> bytes:
        self.checks += 1
        return super().unseal(sealed, context)

    def sign(self, claims: Mapping[str, Any]) -> str:
        self.signatures += 1
        return super().sign(claims)


def test_a_session_cookie_is_checked_once_not_on_every_request() -> None:
    """The request path opens a cookie once: later requests with it are read from a cache, which holds several
    visitors at once."""
    keys = CountingKeys(list(KEYS.keys))
    s = Sessions(lambda: keys, ISSUER, ttl=3600)
    bob = Identity("bob")
    cookies = {ALICE: s.issue(ALICE, HOST), bob: s.issue(bob, HOST)}
    for _ in range(3):
        for who, cookie in cookies.items():
            assert opened(s, cookie, HOST) == who
    assert keys.checks == 2


def test_a_cookie_read_while_fresh_is_refused_once_it_has_expired() -> None:
    """The cache of cookies read keeps none past its expiry."""
    while time.time() % 1 > 0.5:  # half a second's margin, whatever the fraction of the clock
        time.sleep(0.05)
    expires = int(time.time()) + 1
    cookie = sessions(clock=-3599).issue(ALICE, HOST)  # expires at the next whole second
    s = sessions()
    assert opened(s, cookie, HOST) == ALICE
    while time.time() < expires + 0.1:
        time.sleep(0.05)
    assert opened(s, cookie, HOST) is None


def test_a_withdrawn_key_signs_nobody_in_once_the_caches_are_forgotten() -> None:
    """A key dropped outright (a leak, not a rotation) ends the sessions it signed, even those read before; and the
    assertions handed to apps are signed afresh, by a key the JWKS still lists."""
    holder = [KeySet([SigningKey.generate()])]
    s = Sessions(lambda: holder[0], ISSUER, ttl=3600)
    cookie = s.issue(ALICE, HOST)
    assert opened(s, cookie, HOST) == ALICE
    s.assertion(ALICE, HOST)
    holder[0] = KeySet([SigningKey.generate()])
    s.forget_cached()
    assert opened(s, cookie, HOST) is None
    claims = holder[0].verify(s.assertion(ALICE, HOST), audience=HOST, issuer=ISSUER)
    assert claims["sub"] == "alice"


def test_an_assertion_is_reused_only_while_it_has_half_its_life_left() -> None:
    """An app gets the same assertion on every request for a while (one signature, not one per request), never one
    with less than half its life left, and one of its own per user and host."""
    now = [float(int(time.time()))]
    s = Sessions(lambda: KEYS, ISSUER, ttl=3600, clock=lambda: now[0])

    def fresh(identity: Identity, host: str) -> str:
        token = s.assertion(identity, host)
        assert jwt.decode(token, options={"verify_signature": False})["exp"] - now[0] >= ASSERTION_TTL / 2
        return token

    first, elsewhere = fresh(ALICE, HOST), fresh(ALICE, OTHER)
    now[0] += ASSERTION_TTL / 2 - 5
    assert fresh(ALICE, HOST) == first
    assert fresh(ALICE, OTHER) == elsewhere
    assert fresh(Identity("bob"), HOST) != first
    now[0] += 5  # half its life left: renewed now, not a moment later
    renewed = fresh(ALICE, HOST)
    assert renewed != first
    now[0] += 1
    assert fresh(ALICE, HOST) == renewed



async def test_gateway_picks_up_rotated_keys_without_logging_anyone_out(serve: Serve,
                                                                        make_browser: MakeBrowser) -> None:
    served = await serve({"ws1": {"owner": "alice", "ports": {3000: "private"}}})
    browser = await make_browser(served)
    assert (await browser.dev_sign_in(served.hub, "alice")).status == 303
    page = await browser.navigate(served.preview("ws1", 3000, "/"))
    assert page.status == 200
    hub_cookie = browser.cookie(served.hub, "codehub_session")
    assert hub_cookie is not None
    old_kid = sealed_by(hub_cookie)

    gateway = served.gateway
    write_keys(gateway.config.keys_file, gateway.auth.keys.rotated(keep_for=gateway.auth.sessions.ttl))
    async with asyncio.timeout(10):
        while gateway.auth.keys.current.kid == old_kid:  # noqa: ASYNC110 (the file watcher polls; so do we)
            await asyncio.sleep(0.1)

    me = await browser.fetch("GET", served.hub + "/api/v1/me")
    assert me.status == 200
    assert me.json()["user"] == "alice"
    assert (await browser.navigate(served.preview("ws1", 3000, "/still"))).status == 200
    jwks = (await browser.fetch("GET", served.hub + "/.well-known/jwks.json")).json()
    assert {key["kid"] for key in jwks["keys"]} >= {old_kid, gateway.auth.keys.current.kid}

    other = await make_browser(served)
    await other.dev_sign_in(served.hub, "bob")
    new_cookie = other.cookie(served.hub, "codehub_session")
    assert new_cookie is not None
    assert sealed_by(new_cookie) == gateway.auth.keys.current.kid != old_kid


async def test_a_failing_batch_of_counts_stops_no_reload_of_keys(serve: Serve, monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """The task that writes use counts every 2 s also reloads keys and policies: a surprise in one (here a bug,
    mocked) must not end it."""
    served = await serve({"ws1": {"owner": "alice", "ports": {3000: "private"}}})
    gateway = served.gateway

    def broken() -> None:
        raise RuntimeError("a bug")
    monkeypatch.setattr(gateway.auth.store, "flush", broken)
    old_kid = gateway.auth.keys.current.kid
    async with asyncio.timeout(10):
        while "use counts not written" not in caplog.text:  # noqa: ASYNC110 (the file watcher polls; so do we)
            await asyncio.sleep(0.1)
    write_keys(gateway.config.keys_file, gateway.auth.keys.rotated(keep_for=gateway.auth.sessions.ttl))
    async with asyncio.timeout(10):
        while gateway.auth.keys.current.kid == old_kid:  # noqa: ASYNC110
            await asyncio.sleep(0.1)


@pytest.mark.parametrize(("secure", "embedded", "cross_site", "attributes"), [
    (False, False, False, {"SameSite=Lax"}),
    (True, False, False, {"SameSite=Lax", "Secure"}),
    (False, False, True, {"SameSite=None", "Secure"}),  # rides on credentialed CORS calls from other previews
    (True, False, True, {"SameSite=None", "Secure"}),
    (False, True, False, {"SameSite=None", "Secure", "Partitioned"}),  # set inside a frame on another site
])
def test_a_cookie_is_host_only_httponly_and_as_cross_site_as_asked(secure: bool, embedded: bool, cross_site: bool,
                                                                    attributes: set[str]) -> None:
    made = set_cookie("codehub_session", "v", max_age=60, secure=secure, embedded=embedded, cross_site=cross_site)
    first, *rest = made.split("; ")
    assert first == "codehub_session=v"
    assert set(rest) == {"Path=/", "Max-Age=60", "HttpOnly", *attributes}
    assert len(rest) == len(set(rest))


@pytest.mark.parametrize("secure", [False, True])
def test_a_cookie_is_first_party_unless_asked_otherwise(secure: bool) -> None:
    """The hub's session cookie, its sign-in state and the like are set without ``embedded`` or ``cross_site``:
    SameSite=Lax keeps them off the requests other sites make (a form posted to the hub from anywhere carries
    none), and an unpartitioned cookie is the one the hub's own pages see."""
    made = set_cookie("codehub_session", "v", max_age=60, secure=secure)
    assert made == "codehub_session=v; Path=/; Max-Age=60; HttpOnly; SameSite=Lax" + ("; Secure" if secure else "")


async def test_sign_outs_lost_with_their_file_still_end_their_sessions(tmp_path: Path) -> None:
    """The used-keys file cut short or edited by hand: which sign-ins were signed out is lost with it, so a worker
    started meanwhile, or after the next sign-in started the file again, must not open them. Every sign-in from
    before the loss ends (everyone signs in once more), as hand-off codes from before it are refused; sign-ins
    made after it go on."""
    path, used = tmp_path / "tokens.json", tmp_path / "tokens.used.json"

    def worker() -> FileTokenStore:  # one started now
        return FileTokenStore(path, session_ttl=3600)

    s = sessions()
    signed_out, other = s.sign_in(), s.sign_in()
    preview, elsewhere = s.issue(ALICE, HOST, signed_out), s.issue(ALICE, HOST, other)
    await worker().end_sign_in(signed_out)
    assert s.read(preview, HOST, worker().ended_sign_ins) is None
    assert s.read(elsewhere, HOST, worker().ended_sign_ins) == (ALICE, other)

    used.write_text('{"sign-out-')  # cut short
    assert s.read(preview, HOST, worker().ended_sign_ins) is None, "a worker started meanwhile"
    await worker().use_once("handoff-x", time.time() + 2 * HANDOFF_TTL)  # starts the file again
    for token in (preview, elsewhere):
        assert s.read(token, HOST, worker().ended_sign_ins) is None, "a worker started after"
    later = sessions(5.0)
    after = later.sign_in()
    assert later.read(later.issue(ALICE, HOST, after), HOST, worker().ended_sign_ins) == (ALICE, after)


def test_a_person_signs_in_at_most_so_often_an_hour_and_hears_when_to_come_back() -> None:
    now = [1_000_000.0]
    s = Sessions(lambda: KEYS, ISSUER, ttl=3600, clock=lambda: now[0])
    for _ in range(SIGN_INS_PER_HOUR):
        s.begin(ALICE)
    s.begin(Identity("bob"))  # others meanwhile as usual
    now[0] += 3599.5
    with pytest.raises(TooManySignIns) as refused:
        s.begin(ALICE)
    assert (refused.value.status, refused.value.code, refused.value.title, refused.value.headers["Retry-After"]) == (
        429, "too-many-sign-ins", "Too many sign-ins", "1")
    assert str(refused.value) == "You have signed in 30 times in the last hour. Sign in again in 1 minute."
    now[0] += 0.5  # an hour to the second since: those sign-ins are no longer in the last hour
    assert s.begin(ALICE).expires == int(now[0]) + 3600


@pytest.mark.parametrize(("wait", "words"), [(1, "1 minute"), (59, "1 minute"), (60, "1 minute"),
                                             (61, "2 minutes"), (120, "2 minutes"), (121, "3 minutes"),
                                             (3600, "60 minutes")])
def test_a_person_signed_in_too_often_hears_the_wait_in_whole_minutes_rounded_up(wait: int, words: str) -> None:
    now = [1_000_000.0]
    s = Sessions(lambda: KEYS, ISSUER, ttl=3600, clock=lambda: now[0])
    for _ in range(SIGN_INS_PER_HOUR):
        s.begin(ALICE)
    now[0] += 3600.5 - wait
    with pytest.raises(TooManySignIns) as refused:
        s.begin(ALICE)
    assert refused.value.headers["Retry-After"] == str(wait)
    assert str(refused.value).endswith(f"Sign in again in {words}.")


def test_a_person_gets_at_most_so_many_hand_off_codes_a_minute_and_hears_when_to_come_back() -> None:
    """Each code redeemed is kept for its minute where every worker reads it: a loop of hand-offs must not make
    that grow in step with it. ``HAND_OFFS_PER_MINUTE`` to one host (a page can send its visitor round the
    hand-off to its own host as fast as it likes: that spends that host's minute, not the others'), and
    ``HAND_OFFS_PER_MINUTE_IN_ALL`` to all, where only what a host's limit let through counts. Another person's go
    on meanwhile, and the person's own once the minute is over."""
    now = [1_000_000.0]
    s = Sessions(lambda: KEYS, ISSUER, ttl=3600, clock=lambda: now[0])
    alice, bob = Session(ALICE, s.sign_in()), Session(Identity("bob"), s.sign_in())
    for _ in range(HAND_OFFS_PER_MINUTE):
        s.handoff_code(alice, HOST, "state")
    s.handoff_code(bob, HOST, "state")
    now[0] += 55.5
    for _ in range(3 * HAND_OFFS_PER_MINUTE):  # refused at the host's limit: none of it counts in all
        with pytest.raises(TooManyHandOffs) as refused:
            s.handoff_code(alice, HOST, "state")
    assert (refused.value.status, refused.value.code, refused.value.title, refused.value.headers["Retry-After"]) == (
        429, "too-many-hand-offs", "Too many sign-ins to previews", "5")
    assert str(refused.value) == ("You were signed in to this preview 60 times in the last minute. "
                                  "Open the page again in 5 seconds.")
    hosts = [f"{n}-ws.localhost:8080" for n in range(HAND_OFFS_PER_MINUTE_IN_ALL // HAND_OFFS_PER_MINUTE)]
    for host in hosts[1:]:
        for _ in range(HAND_OFFS_PER_MINUTE):
            s.handoff_code(alice, host, "state")
    with pytest.raises(TooManyHandOffs) as refused:
        s.handoff_code(alice, OTHER, "state")
    assert str(refused.value) == ("You were signed in to previews 600 times in the last minute. "
                                  "Open the page again in 5 seconds.")
    now[0] += 5
    assert s.handoff_code(alice, HOST, "state")


def counting_sessions(monkeypatch: pytest.MonkeyPatch, *, remembered: int, per_hour: int) -> tuple[
        Sessions, list[float]]:
    """Sessions that remember the sign-ins of at most ``remembered`` people, ``per_hour`` each, on a clock the test
    moves (``now[0]``)."""
    monkeypatch.setattr(sessions_module, "_CACHE_LIMIT", remembered)
    monkeypatch.setattr(sessions_module, "SIGN_INS_PER_HOUR", per_hour)
    now = [1_000_000.0]
    return Sessions(lambda: KEYS, ISSUER, ttl=3600, clock=lambda: now[0]), now


def test_the_memory_of_sign_ins_is_bounded_and_forgets_the_oldest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ``_CACHE_LIMIT`` people, those with no sign-in in the last hour are forgotten first (the others still
    count theirs); when all are recent, all are forgotten: the bound is on memory, before the rate."""
    s, now = counting_sessions(monkeypatch, remembered=2, per_hour=1)
    old, recent, new, newer = Identity("old"), Identity("recent"), Identity("new"), Identity("newer")
    s.begin(old)
    now[0] += 3601
    s.begin(recent)
    s.begin(new)  # "old" is forgotten, "recent" is not
    with pytest.raises(TooManySignIns):
        s.begin(recent)
    s.begin(newer)  # "recent" and "new" both signed in within the hour: all forgotten
    s.begin(recent)


def test_the_memory_of_sign_ins_is_cleared_by_the_next_new_person_once_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """Full with everyone recent: the next new person clears it, not one later; someone already remembered signing
    in again clears nothing (else anyone could wipe everyone's count by signing in once more)."""
    s, _ = counting_sessions(monkeypatch, remembered=2, per_hour=2)
    alice, bob, carol = Identity("alice"), Identity("bob"), Identity("carol")
    s.begin(alice)
    s.begin(bob)  # full
    s.begin(alice)  # remembered already
    s.begin(bob)
    with pytest.raises(TooManySignIns):
        s.begin(bob)
    s.begin(carol)  # new, and nobody idle: all forgotten
    s.begin(alice)


def test_the_memory_of_sign_ins_forgets_only_those_with_none_in_the_last_hour(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whoever signed in within the hour is kept, even if their first sign-in of it is older; one an hour ago to the
    second is idle."""
    s, now = counting_sessions(monkeypatch, remembered=3, per_hour=2)
    alice, bob, carol, dave = Identity("alice"), Identity("bob"), Identity("carol"), Identity("dave")
    s.begin(dave)
    s.begin(alice)
    now[0] += 3000
    s.begin(alice)
    now[0] += 600  # dave's and alice's first sign-in were an hour ago to the second
    s.begin(bob)
    s.begin(carol)  # full: dave is forgotten, alice is not
    s.begin(alice)  # her second in the last hour
    with pytest.raises(TooManySignIns):
        s.begin(alice)


@pytest.mark.parametrize(("left", "seconds"), [(-10.0, 0), (0.5, 0), (100.5, 100)])
def test_a_sign_in_has_whole_seconds_left_and_none_once_over(left: float, seconds: int) -> None:
    """The ``Max-Age`` of its cookies: an ended sign-in's are deleted at once."""
    assert SignIn("3" * 32, time.time() + left).left() == seconds


def test_a_session_opens_until_its_sign_in_ends_and_not_at_that_second() -> None:
    """Read fresh or from the cache; and a sign-in that ends at or before the time the ended ones were lost opens
    no more (``Ended.before``)."""
    now = [float(int(time.time()))]
    s = Sessions(lambda: KEYS, ISSUER, ttl=3600, clock=lambda: now[0])
    sign_in = SignIn("2" * 32, now[0] + 100)
    cookie = s.issue(ALICE, HOST, sign_in)
    for before, opens in [(sign_in.expires - 1, True), (sign_in.expires, False), (sign_in.expires + 1, False)]:
        assert (s.read(cookie, HOST, Ended(before=before)) is not None) is opens, before
    now[0] += 99.5
    assert opened(s, cookie, HOST) == ALICE
    now[0] += 0.5
    assert opened(s, cookie, HOST) is None
    assert opened(Sessions(lambda: KEYS, ISSUER, ttl=3600, clock=lambda: now[0]), cookie, HOST) is None


def test_the_cache_of_cookies_read_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once it holds ``_CACHE_LIMIT`` cookies, the next new one empties it: the cookies read before are opened again."""
    monkeypatch.setattr(sessions_module, "_CACHE_LIMIT", 2)
    keys = CountingKeys(list(KEYS.keys))
    s = Sessions(lambda: keys, ISSUER, ttl=3600)
    first, second, third = (s.issue(Identity(name), HOST) for name in ("a", "b", "c"))
    for cookie in (first, second, first, second):
        assert opened(s, cookie, HOST) is not None
    assert keys.checks == 2
    assert opened(s, third, HOST) == Identity("c")
    assert opened(s, first, HOST) == Identity("a")
    assert keys.checks == 4


def test_the_cache_of_assertions_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once it holds ``_CACHE_LIMIT`` assertions, the next new one empties it: those handed out before are signed
    again."""
    monkeypatch.setattr(sessions_module, "_CACHE_LIMIT", 2)
    keys = CountingKeys(list(KEYS.keys))
    s = Sessions(lambda: keys, ISSUER, ttl=3600)
    for who in ("a", "b", "a", "b"):
        s.assertion(Identity(who), HOST)
    assert keys.signatures == 2
    s.assertion(Identity("c"), HOST)
    s.assertion(Identity("a"), HOST)
    assert keys.signatures == 4

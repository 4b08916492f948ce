"""Parsing attacks on both lanes: bytes a hostile upstream (a workspace owner controls everything their workspace
serves) or client sends to break HTTP/1.1 framing between the client, the gateway and the upstream.

Each test shows the harm concretely on a real gateway: an answer of the owner's that becomes the answer to the next
request on the client's connection (behind a shared proxy in front of the gateway, that next request is someone
else's, to any host: the hub's included), a head the gateway writes that no client can read, a hang, a traceback.
The upstream is ``test_upstream_faults``' raw socket server, with the faults of this file added."""

from __future__ import annotations

import asyncio
import re

import pytest

from tests.server import test_upstream_faults as faults
from tests.server.test_upstream_faults import LANES, Faulty, faults_counted
from tests.server.test_upstream_faults import faulty as faulty  # the fixture

POISON = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Smuggled: yes\r\n\r\npoisoned"
"""An answer of the owner's making, to be read by a client as the answer to its next request."""


def ok_body(path: str) -> bytes:
    return f"ok {path}".encode()


async def interim_with_a_body(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """An interim answer (1xx) that names a length: llhttp reads a body for it (for any 1xx but 100, 102 and 103),
    here as long as the real answer's body, followed by a whole answer of the owner's; then the real answer."""
    body = ok_body(path)
    interim = b"x" * len(body) + POISON
    writer.write(b"HTTP/1.1 150 Odd\r\nContent-Length: %d\r\n\r\n%b" % (len(interim), interim)
                 + faults.ok_answer(path))
    await writer.drain()
    return True


async def interim_with_chunks(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """The same with a chunked interim body, and a real answer long enough to be streamed, not read whole."""
    size = faults.BIG
    interim = b"x" * size + POISON
    writer.write(b"HTTP/1.1 199 Odd\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n0\r\n\r\n"
                 % (len(interim), interim) + b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (size, b"b" * size))
    await writer.drain()
    return True


def with_status(code: bytes) -> faults.Fault:
    """A proper answer, kept alive, whose status line says ``code``."""
    return raw_answer(b"HTTP/1.1 %b Odd\r\nContent-Length: 2\r\n\r\nok" % code)


STATUSES_BELOW_100 = ["000", "042", "099"]
COOKIES_NOT_UTF8 = {
    "gateway-name": (b"\xffcodehub_session=planted; Path=/", "codehub_session=planted"),
    "host-prefixed-name": (b"\xff__Host-codehub_session=planted; Secure; Path=/", "__Host-codehub_session=planted"),
    "parent-domain": (b"app=1; \xffDomain=localhost", "Domain=localhost"),
}
"""``Set-Cookie`` values with a byte that is not UTF-8, and what aiohttp's head writer makes of them."""


def raw_answer(data: bytes) -> faults.Fault:
    async def answer(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(data)
        await writer.drain()
        return True
    return answer


def setting_cookie(value: bytes) -> faults.Fault:
    return raw_answer(b"HTTP/1.1 200 OK\r\nSet-Cookie: %b\r\nContent-Length: 2\r\n\r\nok" % value)


@pytest.fixture(autouse=True)
def more_faults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(faults.FAULTS, "interim-with-a-body", interim_with_a_body)
    monkeypatch.setitem(faults.FAULTS, "interim-with-chunks", interim_with_chunks)
    for name, (value, _) in COOKIES_NOT_UTF8.items():
        monkeypatch.setitem(faults.FAULTS, f"cookie-{name}", setting_cookie(value))
    monkeypatch.setitem(faults.FAULTS, "no-content-with-a-length", raw_answer(
        b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\nX-Then: more\r\n\r\n"))
    for code in STATUSES_BELOW_100:
        monkeypatch.setitem(faults.FAULTS, f"status-{code}", with_status(code.encode()))


async def two_on_one_connection(f: Faulty, method: str, first: str) -> tuple[bytes, bytes, bytes]:
    """``first``, then ``GET /ok``, on one kept-alive client connection, each answer read by the length its head
    gives (as a browser or a proxy in front reads them): the first head, and the two bodies."""
    reader, writer = await asyncio.open_connection(f.client_host, f.client_port)
    bodies = []
    heads = []
    try:
        for m, path in ((method, first), ("GET", "/ok")):
            writer.write(f"{m} {path} HTTP/1.1\r\nHost: {f.host}\r\nAccept: application/json\r\n"
                         "Content-Length: 0\r\n\r\n".encode())
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                assert length, head
                heads.append(head)
                bodies.append(await reader.readexactly(int(length[1])))
    finally:
        writer.close()
    return heads[0], bodies[0], bodies[1]


@pytest.mark.parametrize("lane", list(LANES))
@pytest.mark.parametrize("fault", ["interim-with-a-body", "interim-with-chunks"])
async def test_an_interim_answer_with_a_body_cannot_answer_the_next_request(faulty: Faulty, lane: str,
                                                                            fault: str) -> None:
    """An upstream's 1xx with a body had that body read out ahead of the real answer's, and sent past the length
    the client was told: the client read the owner's own answer as the answer to its next request on the
    connection (response queue poisoning). A 1xx has no content: it is not HTTP, a 502."""
    head, _, second = await two_on_one_connection(faulty, LANES[lane], f"/fault/{fault}")
    assert second == b"ok /ok"
    assert b" 502 " in head.split(b"\r\n")[0], head
    assert set(faults_counted(await faulty.metrics())) == {"garbage"}


@pytest.mark.parametrize("lane", list(LANES))
@pytest.mark.parametrize("code", STATUSES_BELOW_100)
async def test_a_status_below_100_is_a_502_not_a_status_line_no_client_reads(faulty: Faulty, lane: str,
                                                                              code: str) -> None:
    """llhttp takes any three digits for a status: ``000`` went out as ``HTTP/1.1 0 Odd``, which is no status line
    (RFC 9112 §4: three digits): the visitor's browser, or a proxy in front, cannot read it."""
    answer, body, _ = await faulty.send(LANES[lane], f"/fault/status-{code}")
    assert answer is not None
    assert answer.head.startswith(b"HTTP/1.1 502 "), answer.head
    assert b'"code": "upstream-error"' in body
    assert set(faults_counted(await faulty.metrics())) == {"garbage"}


@pytest.mark.parametrize("code", STATUSES_BELOW_100)
async def test_a_status_below_100_to_an_upgrade_is_a_502_at_once(faulty: Faulty, code: str) -> None:
    """The upgrade's own reader took status 0 for no answer yet and waited for one: the client hung until
    ``timeouts.first_byte`` (two minutes by default, for ever when it is off), then got a 504."""
    async with asyncio.timeout(0.4):  # the fixture's first_byte is 0.5 s
        status, body = await faulty.upgrade(f"/fault/status-{code}")
    assert status == 502, body
    assert set(faults_counted(await faulty.metrics())) == {"garbage"}


@pytest.mark.parametrize("lane", list(LANES))
@pytest.mark.parametrize("cookie", list(COOKIES_NOT_UTF8))
async def test_a_set_cookie_that_is_not_utf8_cannot_plant_what_the_gateway_drops(faulty: Faulty, lane: str,
                                                                                  cookie: str) -> None:
    """The gateway judges an upstream's ``Set-Cookie`` on its text (bytes that are not UTF-8 kept as surrogates),
    and aiohttp's head writer then leaves those surrogates out: ``\\xffcodehub_session=planted`` passed the check
    (its name does not start with the gateway's) and reached the visitor as ``codehub_session=planted``, an
    HttpOnly cookie of the gateway's overwritten by the app; ``\\xffDomain=localhost`` (no Domain attribute to the
    check) reached it as ``Domain=localhost``, a cookie for every preview and the hub. What cannot be read as text
    cannot be judged: dropped, in both lanes."""
    answer, body, _ = await faulty.send(LANES[lane], f"/fault/cookie-{cookie}")
    assert answer is not None
    assert (answer.status, body) == (200, b"ok"), answer.head
    assert b"set-cookie" not in answer.head.lower(), answer.head


@pytest.mark.parametrize("lane", list(LANES))
async def test_a_204_goes_out_without_the_length_its_app_gave_it(faulty: Faulty, lane: str) -> None:
    """A 204 never has a ``Content-Length`` (RFC 9110 §8.6). The fast lane wrote the app's (``5``) on it, aiohttp's
    did not: a client or proxy in front that believed it would take the next answer's first five bytes as this
    one's body."""
    reader, writer = await asyncio.open_connection(faulty.client_host, faulty.client_port)
    writer.write(f"{LANES[lane]} /fault/no-content-with-a-length HTTP/1.1\r\nHost: {faulty.host}\r\n"
                 "Content-Length: 0\r\n\r\n".encode())
    try:
        async with asyncio.timeout(10):
            head = (await reader.readuntil(b"\r\n\r\n")).lower()
    finally:
        writer.close()
    assert head.startswith(b"http/1.1 204 ")
    assert b"x-then: more" in head
    assert b"content-length" not in head, head

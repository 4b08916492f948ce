"""Cookies over the limit: a preview's script can set cookies for the parent domain it shares with the hub and every
other preview, and enough of them make every request its visitor's browser sends to the site too large to read
(431), for as long as they last. A head over ``limits.header_size`` by its ``Cookie`` header alone is read to its
end all the same (to 256 KiB) and refused once, quietly, with ``Set-Cookie`` clearing the largest cookies where a
preview could have set them; anything else over a limit is refused as before. Raw bytes over a real socket, in
both lanes."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway.proxy.headers import MOST_CLEARED
from tests.server import test_hostile_input as hostile
from tests.server.conftest import MakeProxied, Proxied
from tests.server.test_hostile_input import (
    PRELUDES,
    Answer,
    assert_refused,
    closed_by_gateway,
    counted,
    quiet_refusal,
    read_answer,
)
from tests.server.test_proxy_http import echo_app

LIMITS = {"request_line": 512, "header_size": 1024, "header_count": 20}
DOMAIN = "preview.example.com"  # previews there can set cookies for it and example.com (on localhost: for none)
SETTINGS = {"limits": LIMITS, "preview_domain": f"{DOMAIN}:8080", "hub_url": "http://hub.example.com:8080"}
HOST = f"3000-ws1.{DOMAIN}:8080"  # cleared on preview.example.com and example.com (refused before routing)
PADS = "; ".join(f"pad{n}={'x' * 400}" for n in (1, 2, 3))  # 1.2 KB: over the limit of 1,024 by these alone
SESSION = "codehub_session=" + "s" * 60


def request(cookie: str, *, page: bool = False, path: str = "/app/x", extra: str = "", tail: str = "") -> bytes:
    """``extra`` fields come before the cookie, ``tail`` ones after it."""
    accept = "Accept: text/html\r\nSec-Fetch-Mode: navigate\r\n" if page else "Accept: */*\r\n"
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n{accept}{extra}Cookie: {cookie}\r\n{tail}\r\n".encode()


def preview_host(p: Proxied) -> str:
    return f"{p.port}-{p.workspace}.{DOMAIN}:8080"


async def after(p: Proxied, prelude: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await hostile.after(p, prelude, preview_host(p))


async def exchange(p: Proxied, raw: bytes, prelude: str, caplog: pytest.LogCaptureFixture,
                   ) -> tuple[Answer, asyncio.StreamReader, asyncio.StreamWriter]:
    return await hostile.exchange(p, raw, prelude, caplog, preview_host(p))


def cleared(answer: Answer) -> list[str]:
    return [line.partition(b":")[2].strip().decode() for line in answer.head.split(b"\r\n")
            if line.lower().startswith(b"set-cookie:")]


@pytest.mark.parametrize("prelude", list(PRELUDES))
@pytest.mark.parametrize("page", [False, True], ids=["client", "browser"])
async def test_cookies_over_the_limit_are_cleared_in_one_quiet_refusal(
        proxied: MakeProxied, caplog: pytest.LogCaptureFixture, prelude: str, page: bool) -> None:
    caplog.set_level(logging.DEBUG)
    p = await proxied(echo_app(), **SETTINGS)
    answer, reader, writer = await exchange(p, request(f"{SESSION}; {PADS}", page=page), prelude, caplog)
    try:
        if page:
            assert answer.status == 431, answer.head
            assert b"text/html" in answer.head
            assert b"more cookies than this gateway accepts" in answer.body
            assert b'http-equiv="refresh"' in answer.body  # it tries again by itself
        else:
            assert_refused(answer, 431, "cookies-too-large")
        assert await closed_by_gateway(reader)
    finally:
        writer.close()
    lines = cleared(answer)
    assert {line.partition("=")[0] for line in lines} == {"pad1", "pad2"}  # then 400 bytes: under half the limit
    assert all("Max-Age=0" in line for line in lines), lines
    assert lines == [f"{name}=; Domain={domain}; Path={path}; Max-Age=0" for name in ("pad1", "pad2")
                     for path in ("/", "/app", "/app/", "/app/x")  # every path a cookie sent to /app/x may have
                     for domain in ("preview.example.com", "example.com")]
    quiet_refusal(caplog, 431, "cookies-too-large")
    await counted(p, "cookies-too-large")


@pytest.mark.parametrize("prelude", list(PRELUDES))
async def test_a_head_over_the_limit_by_its_cookies_is_read_to_its_end_in_pieces(
        proxied: MakeProxied, caplog: pytest.LogCaptureFixture, prelude: str) -> None:
    """As over TLS, where a record holds 16 KB: the head comes in reads that end inside the cookie, and the largest
    cookie comes after the read where it passes the limit."""
    p = await proxied(echo_app(), **SETTINGS)
    raw = request(PADS + "; big=" + "z" * 600)
    reader, writer = await after(p, prelude)
    try:
        for at in range(0, len(raw), 500):
            writer.write(raw[at:at + 500])
            await writer.drain()
            await asyncio.sleep(0.05)
        answer = await read_answer(reader)
    finally:
        writer.close()
    assert_refused(answer, 431, "cookies-too-large")
    assert list(dict.fromkeys(line.partition("=")[0] for line in cleared(answer))) == ["big", "pad1", "pad2"]


@pytest.mark.parametrize("prelude", list(PRELUDES))
@pytest.mark.parametrize(("raw", "reason"), [
    (request(PADS, extra="X-Big: " + "b" * 1100 + "\r\n"), "headers-too-large"),  # another field over too
    (request(PADS, tail=f"Host: {HOST}\r\n"), "headers-too-large"),  # malformed past the cookie (two Hosts)
    (request(PADS, tail="X-After: " + "a" * 1100 + "\r\n"), "headers-too-large"),  # another field, after it
    (request(PADS, tail="X-After: a;" + "a" * 300_000 + "\r\n"), "headers-too-large"),  # past the read, not a cookie
    (request("NAME=" + "x" * 1100).replace(b"NAME", b"\xff"), "headers-too-large"),  # not UTF-8: no writing it back
    (request("__Host-codehub_session=" + "x" * 1100), "headers-too-large"),  # host-only by its prefix
    (request(PADS).replace(HOST.encode(), b"3000-ws1.localhost:8080"), "headers-too-large"),  # no parent to clear
], ids=["another-field", "another-field-after", "two-hosts", "past-the-read-not-a-cookie", "unwritable-name",
        "host-prefix", "no-parent"])
async def test_what_clearing_cookies_cannot_mend_is_refused_as_before(
        proxied: MakeProxied, caplog: pytest.LogCaptureFixture, prelude: str, raw: bytes, reason: str) -> None:
    caplog.set_level(logging.DEBUG)
    p = await proxied(echo_app(), **SETTINGS)
    answer, _, writer = await exchange(p, raw, prelude, caplog)
    writer.close()
    assert_refused(answer, 431, reason)
    assert cleared(answer) == []
    quiet_refusal(caplog, 431, reason)


async def test_a_cookie_without_a_name_is_cleared_by_its_value(proxied: MakeProxied,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """``document.cookie = "xxx…"`` sets a cookie without a name, sent back as its bare value; ``Set-Cookie: xxx…;
    Max-Age=0`` is that cookie (no name, that value) expired."""
    p = await proxied(echo_app(), **SETTINGS)
    answer, _, writer = await exchange(p, request("x" * 1100, path="/"), "fresh", caplog)
    writer.close()
    assert_refused(answer, 431, "cookies-too-large")
    assert cleared(answer) == [f"{'x' * 1100}; Domain={domain}; Path=/; Max-Age=0"
                               for domain in ("preview.example.com", "example.com")]


@pytest.mark.parametrize("prelude", list(PRELUDES))
async def test_another_field_over_the_limit_is_refused_before_the_head_ends(
        proxied: MakeProxied, prelude: str) -> None:
    """Only a head over the limit by a cookie is read on; any other is refused as soon as the field passes it (the
    head timeout is 20 s here, the answer's wait 10)."""
    p = await proxied(echo_app(), **SETTINGS)
    reader, writer = await after(p, prelude)
    try:
        writer.write(request(PADS, extra="X-Big: " + "b" * 1100 + "\r\n")[:1300])  # the cookie not yet in
        answer = await read_answer(reader)
    finally:
        writer.close()
    assert_refused(answer, 431, "headers-too-large")


@pytest.mark.parametrize("prelude", list(PRELUDES))
@pytest.mark.parametrize("pieces", [1, 7])
async def test_cookies_past_what_is_read_are_cleared_up_to_there(proxied: MakeProxied, prelude: str,
                                                                  pieces: int) -> None:
    """180 cookies of 4 KB (what Chromium keeps for one domain): 720 KB of ``Cookie`` header. The head is read to
    256 KiB, and the largest cookies whole in it are cleared (as many as one answer clears); the next request clears
    more."""
    p = await proxied(echo_app(), **SETTINGS)
    raw = request("; ".join(f"c{n:03}={n % 7 * 'y'}{'x' * 4000}" for n in range(180)))
    reader, writer = await after(p, prelude)
    try:
        step = -(-len(raw) // pieces)
        for at in range(0, len(raw), step):
            writer.write(raw[at:at + step])
        answer = await read_answer(reader)
    finally:
        writer.close()
    assert_refused(answer, 431, "cookies-too-large")
    seen = [n for n in range(180) if raw.index(b"c%03d=" % n) + 5 + n % 7 + 4000 < (256 << 10)]  # whole in 256 KiB
    assert len(seen) > MOST_CLEARED
    expected = sorted(seen, key=lambda n: -(n % 7))[:MOST_CLEARED]  # the largest first, then in the header's order
    assert [int(name[1:]) for name in dict.fromkeys(line.partition("=")[0] for line in cleared(answer))] == expected


async def test_a_head_past_what_is_read_in_one_read_is_cut_too(proxied: MakeProxied,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """Its end may come in the read that passes 256 KiB: it is cut there all the same."""
    p = await proxied(echo_app(), **SETTINGS)
    raw = request("; ".join(f"c{n:03}={'x' * 1500}" for n in range(180)))  # 272 KB
    answer, _, writer = await exchange(p, raw, "fresh", caplog)
    writer.close()
    assert_refused(answer, 431, "cookies-too-large")
    assert len(cleared(answer)) == MOST_CLEARED * 4 * 2  # four paths, two parent domains


async def test_a_head_that_came_in_pieces_before_is_not_taken_for_part_of_the_next(proxied: MakeProxied) -> None:
    p = await proxied(echo_app(), **SETTINGS)
    reader, writer = await after(p, "after-aiohttp-lane")
    try:
        second = f"POST /second HTTP/1.1\r\nHost: {preview_host(p)}\r\nContent-Length: 2\r\n\r\nhi".encode()
        writer.write(second[:20])
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(second[20:])
        assert (await read_answer(reader)).status == 200
        writer.write(request(PADS))
        answer = await read_answer(reader)
    finally:
        writer.close()
    assert_refused(answer, 431, "cookies-too-large")


async def test_a_form_sent_is_not_sent_again_by_the_page(proxied: MakeProxied,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """The page tries again by itself only for a GET: its reload would not send a form again."""
    p = await proxied(echo_app(), **SETTINGS)
    raw = request(PADS, page=True, tail="Content-Length: 0\r\n").replace(b"GET ", b"POST ", 1)
    answer, _, writer = await exchange(p, raw, "fresh", caplog)
    writer.close()
    assert answer.status == 431
    assert b"more cookies than this gateway accepts" in answer.body
    assert b'http-equiv="refresh"' not in answer.body
    assert {line.partition("=")[0] for line in cleared(answer)} == {"pad1", "pad2"}


async def test_cookies_over_the_limit_in_bytes_but_not_in_characters_are_cleared(
        proxied: MakeProxied, caplog: pytest.LogCaptureFixture) -> None:
    """The limit counts bytes: values of ``é`` (two bytes each, as Chromium keeps them) are over it at half as many
    characters (a helper's attack: they were an ordinary 431, with nothing cleared)."""
    p = await proxied(echo_app(), **SETTINGS)
    raw = request("; ".join(f"pad{n}=" + "\u00e9" * 200 for n in (1, 2, 3)))  # 1,219 bytes, 619 characters
    answer, _, writer = await exchange(p, raw, "fresh", caplog)
    writer.close()
    assert_refused(answer, 431, "cookies-too-large")
    assert list(dict.fromkeys(line.partition("=")[0] for line in cleared(answer))) == ["pad1", "pad2"]


NAVIGATIONS = {  # Fetch Metadata → whether the page reloads by itself (as the wake rule would let it)
    "typed": ("Sec-Fetch-Site: none\r\nSec-Fetch-Dest: document\r\n", True),
    "its-own-origin": ("Sec-Fetch-Site: same-origin\r\nSec-Fetch-Dest: document\r\n", True),
    "clicked": ("Sec-Fetch-Site: same-site\r\nSec-Fetch-Dest: document\r\nSec-Fetch-User: ?1\r\n", True),
    "script": ("Sec-Fetch-Site: same-site\r\nSec-Fetch-Dest: document\r\n", False),
    "frame": ("Sec-Fetch-Site: cross-site\r\nSec-Fetch-Dest: iframe\r\n", False),
    "prerender": ("Sec-Fetch-Site: none\r\nSec-Fetch-Dest: document\r\nSec-Purpose: prefetch;prerender\r\n",
                  False),
}


@pytest.mark.parametrize("how", list(NAVIGATIONS))
async def test_the_page_reloads_by_itself_only_for_the_visitors_own_navigation(
        proxied: MakeProxied, caplog: pytest.LogCaptureFixture, how: str) -> None:
    """Its reload comes from the host's own origin, which wakes a sleeping workspace: a frame, or a navigation a
    page's script started, gets a button instead (a helper's attack: a preview's cookies made any such navigation
    to a sleeping workspace wake it)."""
    fetch_metadata, reloads = NAVIGATIONS[how]
    p = await proxied(echo_app(), **SETTINGS)
    answer, _, writer = await exchange(p, request(PADS, page=True, extra=fetch_metadata), "fresh", caplog)
    writer.close()
    assert answer.status == 431
    assert (b'http-equiv="refresh"' in answer.body) is reloads
    assert b"Try again now" in answer.body
    assert {line.partition("=")[0] for line in cleared(answer)} == {"pad1", "pad2"}


@pytest.mark.parametrize(("host", "framing"), [
    (HOST, b"content-security-policy: frame-ancestors 'self'"),  # a preview's: as its other pages, in reviews
    ("hub.example.com:8080", b"x-frame-options: deny"),  # the hub's: never
])
async def test_the_page_is_framed_as_the_hosts_other_pages(proxied: MakeProxied, caplog: pytest.LogCaptureFixture,
                                                           host: str, framing: bytes) -> None:
    p = await proxied(echo_app(), **SETTINGS)
    answer, _, writer = await exchange(p, request(PADS, page=True).replace(HOST.encode(), host.encode()), "fresh",
                                       caplog)
    writer.close()
    assert answer.status == 431
    assert framing in answer.head.lower()


@pytest.mark.parametrize("port", ["abc", "", "99999"])
async def test_a_host_whose_port_is_not_a_port_is_still_one_quiet_refusal(
        proxied: MakeProxied, caplog: pytest.LogCaptureFixture, port: str) -> None:
    """The domains to clear come from the name alone; the page's own origin (for the reload rule) only from a host
    routing would take: a port that is not one is no traceback."""
    caplog.set_level(logging.DEBUG)
    p = await proxied(echo_app(), **SETTINGS)
    raw = request(PADS, page=True).replace(HOST.encode(), f"3000-ws1.{DOMAIN}:{port}".encode())
    answer, _, writer = await exchange(p, raw, "fresh", caplog)
    writer.close()
    assert answer.status == 431
    assert {line.partition("=")[0] for line in cleared(answer)} == {"pad1", "pad2"}
    quiet_refusal(caplog, 431, "cookies-too-large")

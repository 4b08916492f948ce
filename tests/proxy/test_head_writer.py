"""The one head writer both lanes use, both directions: property-based, since a smuggled line is one byte away.

For any start line and header fields: if a CR, LF or NUL is anywhere in them, nothing is written
(``UnsafeHeader``); otherwise the head is exactly the start line, one line per field in order, and the blank line,
and a real HTTP parser (llhttp) reads back the same fields.
"""

from __future__ import annotations

import httptools
import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from gateway.errors import UnsafeHeader
from gateway.proxy.connection import encode_head

TOKEN = st.text(alphabet="!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1,
                max_size=20)
ANY_TEXT = st.text(max_size=40)
# What llhttp accepts in a value: visible ASCII and obs-text, with inner spaces and tabs.
VALUE = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=30)
BREAKERS = ("\r", "\n", "\x00")


def _unsafe(*parts: str) -> bool:
    return any(ch in part for part in parts for ch in BREAKERS)


@given(start=ANY_TEXT, fields=st.lists(st.tuples(ANY_TEXT, ANY_TEXT), max_size=8))
def test_a_line_break_or_nul_anywhere_writes_nothing(start: str, fields: list[tuple[str, str]]) -> None:
    headers = CIMultiDict(fields)
    if _unsafe(start, *(part for field in fields for part in field)):
        with pytest.raises(UnsafeHeader):
            encode_head(start, headers)
        return
    lines = encode_head(start, headers).decode("utf-8", "surrogateescape").split("\r\n")
    assert lines == [start, *(f"{name}: {value}" for name, value in headers.items()), "", ""]


FRAMING = frozenset({"content-length", "transfer-encoding"})
"""Fields whose values llhttp judges as framing (a Content-Length of ``:`` is no length): not what this reads back."""


@given(fields=st.lists(st.tuples(TOKEN.filter(lambda name: name.lower() not in FRAMING), VALUE), max_size=8),
       path=st.text(alphabet="abc/%?=&", max_size=20),
       injected=st.sampled_from(["", *BREAKERS, "\r\nX-Smuggled: 1", "\r\n\r\nGET /admin HTTP/1.1"]))
def test_an_upstream_parser_reads_back_exactly_what_was_given(fields: list[tuple[str, str]], path: str,
                                                              injected: str) -> None:
    headers = CIMultiDict(fields)
    if injected and fields:
        name, value = fields[0]
        headers = CIMultiDict([(name, value + injected), *fields[1:]])
    elif injected:
        headers = CIMultiDict([("X-Forwarded-User", "eve" + injected)])
    try:
        head = encode_head(f"GET /{path} HTTP/1.1", headers)
    except UnsafeHeader:
        assert injected
        return
    assert not injected
    seen: list[tuple[str, str]] = []

    class Collect:
        def on_header(self, name: bytes, value: bytes) -> None:
            seen.append((name.decode(), value.decode()))

    httptools.HttpRequestParser(Collect()).feed_data(head)
    assert seen == list(headers.items())


@pytest.mark.parametrize(("start", "headers"), [
    ("HTTP/1.1 200 OK\r\nX-Evil: 1", {}),
    ("HTTP/1.1 200 OK", {"Location": "/a\r\nSet-Cookie: codehub_session=x"}),
    ("GET / HTTP/1.1", {"X-Forwarded-Email": "eve@x.test\nX-Forwarded-User: alice"}),
    ("GET / HTTP/1.1", {"X-Forwarded-Groups": "ops\x00admins"}),
    ("GET / HTTP/1.1", {"X-Bad\r\nName": "1"}),
    ("GET / HTTP/1.1", {"X-Lone": "a\rb"}),
])
def test_known_smuggling_spellings_are_refused(start: str, headers: dict[str, str]) -> None:
    with pytest.raises(UnsafeHeader):
        encode_head(start, CIMultiDict(headers))

"""The fast lane's connection state machine, without sockets: bytes in, events out (like h11's tests)."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gateway.proxy import h1
from gateway.proxy.h1 import CLOSE, NEED_DATA, Connection, HandOver, Request, State

GET = b"GET /a?b=1 HTTP/1.1\r\nHost: 3000-ws.localhost\r\nCookie: x=1\r\n\r\n"


def feed(connection: Connection, *chunks: bytes) -> list[h1.Event]:
    return [connection.receive(chunk) for chunk in chunks]


def test_a_plain_get_is_a_request() -> None:
    connection = Connection()
    [event] = feed(connection, GET)
    assert isinstance(event, Request)
    assert (event.method, event.target, event.keep_alive) == ("GET", "/a?b=1", True)
    assert list(event.headers.items()) == [("Host", "3000-ws.localhost"), ("Cookie", "x=1")]
    assert connection.state is State.SERVING


def test_a_plain_head_is_a_request_too() -> None:
    """A HEAD is answered like a GET without the body: the fast lane serves it rather than handing it over."""
    connection = Connection()
    [event] = feed(connection, b"HEAD /a HTTP/1.1\r\nHost: 3000-ws.localhost\r\n\r\n")
    assert isinstance(event, Request)
    assert (event.method, event.target, event.keep_alive, event.upgrade) == ("HEAD", "/a", True, False)
    assert connection.state is State.SERVING


@pytest.mark.parametrize("split", [1, 5, 17, 30, len(GET) - 1])
def test_a_head_split_anywhere_waits_for_the_rest(split: int) -> None:
    connection = Connection()
    first, rest = feed(connection, GET[:split], GET[split:])
    assert first is NEED_DATA
    assert isinstance(rest, Request)
    assert rest.target == "/a?b=1"


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nab", "a body"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nab", "a GET with a body"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "chunked"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n", "chunked, its body still to come"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n\r\n", "Expect"),
        (b"GET / HTTP/1.0\r\nHost: h\r\n\r\n", "HTTP/1.0"),
        (b"OPTIONS / HTTP/1.1\r\nHost: h\r\n\r\n", "another method"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", "a POST upgrade"),
        (b"GET / HTTP/1.0\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", "an HTTP/1.0 upgrade"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\n", "conflicting lengths"),
        (b"GET / HTTP/1.1\r\nHo st: h\r\n\r\n", "a malformed header name"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n", "a NUL in a value"),
        (b"GARBAGE\r\n\r\n", "no request line"),
        (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n", "101 headers"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: h\r\n\r\n", "a long target"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"v" * 9000 + b"\r\n\r\n", "a long header"),
        (GET + GET, "pipelined in one read"),
        (GET + GET[:20], "the start of a second request behind it"),
        (b"HEAD / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", "a HEAD upgrade"),
        (b"GET / HTTP/1.1\nHost: h\n\n", "bare LFs"),  # ``receive`` finds the end of a head by its CRLF CRLF
        (b"GET / HTTP/1.1\nHost: h\nUpgrade: websocket\nConnection: Upgrade\n\n\x81\x80abcd", "bare LFs, upgrading"),
    ],
)
def test_everything_else_is_handed_over_with_every_byte(raw: bytes, why: str) -> None:
    connection = Connection()
    events = [connection.receive(raw)]
    assert events == [HandOver(raw)], why
    assert connection.state is State.HANDED


UPGRADE = b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"


@pytest.mark.parametrize("lead", [b"", b"\r\n", b"\r\n\r\n"])
@pytest.mark.parametrize("cut", [10, len(UPGRADE) - 1, len(UPGRADE), len(UPGRADE) + 3])
def test_a_get_that_asks_to_switch_protocols_is_a_request_whose_tail_is_the_new_protocols(cut: int,
                                                                                           lead: bytes) -> None:
    """Whatever the reads: once the head is whole it is a ``Request`` marked ``upgrade``; ``switch`` gives the
    bytes after the head (the first WebSocket frame, sent at once), and what arrives after them, in order. Blank
    lines before a request line are skipped (RFC 9112 §2.2, as llhttp does): a ``\r\n\r\n`` among them is no end
    of the head (else the head, cookies and all, went to the upstream as frames)."""
    frame = b"\x81\x85abcd" + b"12345"
    raw = lead + UPGRADE + frame
    connection = Connection()
    events = [connection.receive(raw[:cut]), connection.receive(raw[cut:])]
    requests = [event for event in events if isinstance(event, Request)]
    assert len(requests) == 1
    assert requests[0].upgrade
    assert (requests[0].method, requests[0].target, requests[0].headers["Upgrade"]) == ("GET", "/ws", "websocket")
    assert connection.receive(b"more") is NEED_DATA
    assert connection.switch() == frame + b"more"
    assert connection.state is State.HANDED


def test_an_upgrade_not_switched_is_handed_over_whole_or_closes_after_its_answer() -> None:
    """The plan declined it, or the upstream would not switch: aiohttp gets every byte, or the connection ends
    after the answer (what follows the head may already be the new protocol's: never parsed as HTTP)."""
    connection = Connection()
    assert isinstance(connection.receive(UPGRADE + b"\x81\x80abcd"), Request)
    assert connection.hand_over() == HandOver(UPGRADE + b"\x81\x80abcd")
    connection = Connection()
    assert isinstance(connection.receive(UPGRADE), Request)
    assert connection.done(keep_alive=True) is CLOSE
    plain = Connection().receive(GET)
    assert isinstance(plain, Request)
    assert not plain.upgrade


def test_an_oversized_head_is_handed_over_before_it_ends() -> None:
    connection = Connection(max_head=1024)
    chunk = b"GET / HTTP/1.1\r\n" + b"X: " + b"v" * 600 + b"\r\n"
    assert connection.receive(chunk) is NEED_DATA
    more = b"Y: " + b"v" * 600 + b"\r\n"
    assert connection.receive(more) == HandOver(chunk + more)


def test_repeated_headers_are_kept_as_sent_for_the_plan_to_judge() -> None:
    connection = Connection()
    event = connection.receive(b"GET / HTTP/1.1\r\nHost: h\r\nCookie: a=1\r\nX-A: 1\r\nCookie: b=2\r\n\r\n")
    assert isinstance(event, Request)
    assert list(event.headers.items()) == [("Host", "h"), ("Cookie", "a=1"), ("X-A", "1"), ("Cookie", "b=2")]


@pytest.mark.parametrize("raw", [
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nContent-Type: a\r\nContent-Type: b\r\n\r\n",
])
def test_a_head_aiohttps_parser_refuses_is_handed_over(raw: bytes) -> None:
    """Two Hosts, none, two of another field that may come once: both lanes read heads with aiohttp's parser, which
    refuses these, so this lane never serves a request the other would not."""
    assert Connection().receive(raw) == HandOver(raw)


def test_keep_alive_then_the_next_request() -> None:
    connection = Connection()
    assert isinstance(connection.receive(GET), Request)
    assert connection.done(keep_alive=True) is NEED_DATA
    assert connection.state is State.READING
    second = connection.receive(GET.replace(b"/a?b=1", b"/second"))
    assert isinstance(second, Request)
    assert second.target == "/second"


def test_connection_close_closes_after_the_answer() -> None:
    connection = Connection()
    event = connection.receive(GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    assert isinstance(event, Request)
    assert not event.keep_alive
    assert connection.done(keep_alive=event.keep_alive) is CLOSE
    assert connection.receive(GET) is CLOSE


def test_pipelined_bytes_are_parked_then_handed_over() -> None:
    """What arrives during an answer is kept, not parsed; after the answer it all goes to aiohttp in order."""
    connection = Connection()
    assert isinstance(connection.receive(GET), Request)
    assert connection.receive(b"GET /next HTTP/1.1\r\n") is NEED_DATA
    assert connection.receive(b"Host: h\r\n\r\n") is NEED_DATA
    assert connection.parked == len(b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n")
    assert connection.done(keep_alive=True) == HandOver(b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n")


FAULTY_BEHIND = {
    "garbage": b"GARBAGE\r\n\r\n",
    "a bad chunk size": b"POST /b HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\n",
    "a good request, then garbage": b"GET /b HTTP/1.1\r\nHost: h\r\n\r\nGARBAGE\r\n\r\n",
    "garbage past a head's limit": b"GARBAGE\r\n\r\n" + b"x" * (16 << 10),  # the head's size is its own
}


@pytest.mark.parametrize("lead", [b"", b"\r\n"])
@pytest.mark.parametrize("behind", list(FAULTY_BEHIND))
def test_a_plain_request_before_a_fault_in_the_same_read_is_served_first(behind: str, lead: bytes) -> None:
    """The parser fails on what follows a whole request, and keeps that request to itself: it is read again alone
    and served, the rest waits behind it, for aiohttp to refuse once the answer is out (answers in the order of
    their requests), and a ``Connection: close`` request's answer ends the connection before it."""
    rest = FAULTY_BEHIND[behind]
    connection = Connection()
    event = connection.receive(lead + GET + rest)
    assert isinstance(event, Request)
    assert (event.method, event.target, event.keep_alive) == ("GET", "/a?b=1", True)
    assert connection.parked == len(rest)
    assert connection.receive(b"more") is NEED_DATA
    assert connection.done(keep_alive=True) == HandOver(rest + b"more")
    closing = Connection()
    assert isinstance(closing.receive(GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n") + rest),
                      Request)
    assert closing.done(keep_alive=False) is CLOSE
    declined = Connection()  # the plan declines it: aiohttp gets every byte, once
    assert isinstance(declined.receive(GET + rest), Request)
    assert declined.hand_over() == HandOver(GET + rest)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"GET / HTTP/1.1\r\nHo st: h\r\n\r\n" + GET, "the fault is in the first head"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\nGARBAGE\r\n\r\n", "a NUL in the first head"),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\n" + GET, "a bad body first"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nabGARBAGE\r\n\r\n", "a GET with a body first"),
        (b"GET / HTTP/1.0\r\nHost: h\r\n\r\nGARBAGE\r\n\r\n", "an HTTP/1.0 request first"),
        (b"OPTIONS / HTTP/1.1\r\nHost: h\r\n\r\nGARBAGE\r\n\r\n", "another method first"),
        (b"GET / HTTP/1.1\nHost: h\n\nGARBAGE\r\n\r\n", "bare LFs"),
        (b"GARBAGE\r\n\r\n" + GET, "garbage first"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "HTTP/2's preface: the first head is not a whole request"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nA: " + b"a" * 8180 + b"\r\nB: " + b"b" * 8180 + b"\r\n\r\nGARBAGE\r\n\r\n",
         "a head past its limit first"),
        (b"GARBAGE \r\n", "garbage, no whole head"),
        (b"\r\nGARBAGE \r\n\r", "garbage after a blank line, no whole head"),
    ],
)
def test_a_faulty_read_is_handed_over_whole_unless_a_plain_request_leads_it(raw: bytes, why: str) -> None:
    assert Connection().receive(raw) == HandOver(raw), why


def test_a_request_the_plan_declines_is_handed_over_whole() -> None:
    connection = Connection()
    connection.receive(GET[:10])
    connection.receive(GET[10:])
    assert connection.hand_over() == HandOver(GET)


@given(st.lists(st.binary(max_size=300), max_size=8))
@example([b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"])
@example([GET + b"GARBAGE\r\n\r\n", GET])
def test_any_bytes_give_an_event_and_never_raise(chunks: list[bytes]) -> None:
    """And nothing is left parked while a head is read: bytes kept behind no request would never be answered."""
    connection = Connection(max_head=2048)
    received = b""
    for chunk in chunks:
        event = connection.receive(chunk)
        received += chunk
        if isinstance(event, Request):
            assert event.method in ("GET", "HEAD")
            assert connection.state is State.SERVING
            after = connection.done(keep_alive=event.keep_alive)
            if after is not NEED_DATA:  # what came behind the request goes to aiohttp, or the connection ends
                assert after is CLOSE or (isinstance(after, HandOver) and received.endswith(after.data)), after
                return
            received = b""
        elif isinstance(event, HandOver):
            assert event.data == received  # every byte not yet answered, in order
            return
        else:
            assert event is NEED_DATA or (event is CLOSE and connection.state is State.CLOSED)
            assert connection.parked == 0


@given(st.sampled_from([b"GET", b"HEAD", b"POST", b"get"]), st.text(min_size=0, max_size=40),
       st.lists(st.tuples(st.text(max_size=12), st.text(max_size=20)), max_size=6))
def test_any_request_shaped_input_is_a_request_or_a_hand_over(method: bytes, path: str,
                                                               headers: list[tuple[str, str]]) -> None:
    raw = method + b" /" + path.encode("utf-8", "surrogatepass") + b" HTTP/1.1\r\n" + b"".join(
        name.encode("utf-8", "surrogatepass") + b": " + value.encode("utf-8", "surrogatepass") + b"\r\n"
        for name, value in headers) + b"\r\n"
    event = Connection().receive(raw)
    assert isinstance(event, Request | HandOver) or event is NEED_DATA
    if isinstance(event, Request):
        assert event.method == method.decode()
        assert event.target.startswith("/")


def _head(*, target: int = 1, field: int = 1, headers: int = 1) -> bytes:
    """A whole GET head whose target, longest header (name and value) and header count are these sizes."""
    fields = [b"X: " + b"v" * (field - 1), b"Host: h"] + [b"H-%d: v" % i for i in range(headers - 2)]
    return b"GET /" + b"a" * (target - 1) + b" HTTP/1.1\r\n" + b"".join(line + b"\r\n" for line in fields) + b"\r\n"


@pytest.mark.parametrize(
    ("raw", "fast"),
    [
        (_head(target=h1.MAX_LINE), True),
        (_head(target=h1.MAX_LINE + 1), False),
        (_head(field=h1.MAX_FIELD), True),
        (_head(field=h1.MAX_FIELD + 1), False),
        (_head(headers=h1.MAX_HEADERS), True),
        (_head(headers=h1.MAX_HEADERS + 1), False),
    ],
    ids=["target-at-limit", "target-past-limit", "field-at-limit", "field-past-limit", "headers-at-limit",
         "headers-past-limit"],
)
def test_the_default_limits_are_inclusive(raw: bytes, fast: bool) -> None:
    """A limit means "at most": a target, a header (name and value) or a header count at the limit is served;
    one past it is handed over for aiohttp, configured with the same limits, to refuse. The defaults are
    aiohttp's line and field sizes (8190)."""
    assert (h1.MAX_LINE, h1.MAX_FIELD, h1.MAX_HEADERS) == (8190, 8190, 100)
    event = Connection().receive(raw)
    assert isinstance(event, Request) if fast else event == HandOver(raw)


def test_a_head_in_pieces_may_grow_to_max_head_and_not_a_byte_more() -> None:
    """The default bound (16 KiB) on a head still arriving: at it, the lane waits; one byte past, aiohttp
    decides."""
    assert h1.MAX_HEAD == 16 * 1024
    start = b"GET / HTTP/1.1\r\n" + b"A: " + b"v" * 8000 + b"\r\n" + b"B: " + b"v" * 8000 + b"\r\n"
    head = start + b"C: " + b"v" * (h1.MAX_HEAD - len(start) - 3)
    assert len(head) == h1.MAX_HEAD
    connection = Connection()
    assert connection.receive(head) is NEED_DATA
    assert connection.receive(b"v") == HandOver(head + b"v")


@pytest.mark.parametrize("pieces", [1, 2, 7])
@pytest.mark.parametrize(("size", "fast"), [(h1.MAX_HEAD, True), (h1.MAX_HEAD + 1, False)])
def test_a_whole_head_past_max_head_is_handed_over_however_it_arrives(size: int, pieces: int, fast: bool) -> None:
    """Which lane serves a request must not hang on how the network cut its bytes: a whole head past the bound
    goes to aiohttp in one read as in several, and one at the bound is served here either way."""
    start = b"GET / HTTP/1.1\r\nHost: h\r\n" + b"A: " + b"v" * 8000 + b"\r\n" + b"B: " + b"v" * 7990 + b"\r\n"
    head = start + b"C: " + b"v" * (size - len(start) - 7) + b"\r\n\r\n"
    assert len(head) == size
    connection = Connection()
    cut = [head[i * len(head) // pieces:(i + 1) * len(head) // pieces] for i in range(pieces)]
    events = [connection.receive(piece) for piece in cut]
    assert all(event is NEED_DATA for event in events[:-1]) or not fast
    assert isinstance(events[-1], Request) if fast else HandOver(head) in events


@pytest.mark.parametrize(
    ("raw", "fast"),
    [
        (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n", False),
        (b"HEAD / HTTP/1.1\r\nHost: h\r\ncontent-length: 1\r\n\r\n", False),
    ],
    ids=["zero-length", "a-body-still-to-come", "lower-case-name"],
)
def test_a_length_that_promises_a_body_is_handed_over_before_the_body(raw: bytes, fast: bool) -> None:
    """``Content-Length: 0`` is no body (some clients send it on every GET); any other length is handed over at
    once, with the head, not after a body that may never come."""
    event = Connection().receive(raw)
    assert isinstance(event, Request) if fast else event == HandOver(raw)


def test_a_header_value_that_is_not_utf8_keeps_its_bytes() -> None:
    """llhttp lets obs-text (0x80-0xFF) through in values; the plan sees them as surrogate escapes, so they
    encode back to the bytes that were sent."""
    event = Connection().receive(b"GET / HTTP/1.1\r\nHost: h\r\nX: \xff\xfeok\r\n\r\n")
    assert isinstance(event, Request)
    assert event.headers["X"].encode("utf-8", "surrogateescape") == b"\xff\xfeok"


def test_reading_head_is_true_only_while_part_of_a_head_is_in() -> None:
    """The caller keeps a head deadline only while ``reading_head``: an idle keep-alive connection is not in the
    middle of a head, and neither is one being served."""
    connection = Connection()
    assert not connection.reading_head
    assert connection.receive(GET[:7]) is NEED_DATA
    assert connection.reading_head
    assert isinstance(connection.receive(GET[7:]), Request)
    assert not connection.reading_head
    assert connection.receive(b"GET") is NEED_DATA  # parked, not read
    assert not connection.reading_head
    assert connection.done(keep_alive=True) == HandOver(b"GET")
    assert not connection.reading_head


def test_what_was_parked_is_given_once() -> None:
    """Bytes parked during an answer go out with the hand-over or the switch; none stay counted against the
    caller's limit."""
    connection = Connection()
    assert isinstance(connection.receive(GET), Request)
    assert connection.receive(b"next") is NEED_DATA
    assert connection.hand_over() == HandOver(GET + b"next")
    assert connection.parked == 0
    connection = Connection()
    assert isinstance(connection.receive(UPGRADE), Request)
    assert connection.receive(b"\x81\x80abcd") is NEED_DATA
    assert connection.switch() == b"\x81\x80abcd"
    assert connection.parked == 0


def test_answering_or_switching_what_is_not_being_served_is_a_caller_bug() -> None:
    """``done`` and ``switch`` are for the request being served (``switch`` for an upgrade only): called
    otherwise they would hand a plain request's bytes to a WebSocket relay or read on after a close."""
    with pytest.raises(AssertionError):
        Connection().done(keep_alive=True)
    with pytest.raises(AssertionError):
        Connection().switch()
    plain = Connection()
    assert isinstance(plain.receive(GET), Request)
    with pytest.raises(AssertionError):
        plain.switch()
    answered = Connection()
    assert isinstance(answered.receive(UPGRADE), Request)
    assert answered.done(keep_alive=True) is CLOSE
    with pytest.raises(AssertionError):
        answered.switch()

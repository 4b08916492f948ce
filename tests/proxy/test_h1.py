"""The fast lane's connection state machine, without sockets: bytes in, events out (like h11's tests)."""

from __future__ import annotations

import pytest
from hypothesis import given
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
    ],
)
def test_everything_else_is_handed_over_with_every_byte(raw: bytes, why: str) -> None:
    connection = Connection()
    events = [connection.receive(raw)]
    assert events == [HandOver(raw)], why
    assert connection.state is State.HANDED


UPGRADE = b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"


@pytest.mark.parametrize("cut", [10, len(UPGRADE) - 1, len(UPGRADE), len(UPGRADE) + 3])
def test_a_get_that_asks_to_switch_protocols_is_a_request_whose_tail_is_the_new_protocols(cut: int) -> None:
    """Whatever the reads: once the head is whole it is a ``Request`` marked ``upgrade``; ``switch`` gives the
    bytes after the head (the first WebSocket frame, sent at once), and what arrives after them, in order."""
    frame = b"\x81\x85abcd" + b"12345"
    raw = UPGRADE + frame
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


def test_duplicate_headers_are_kept_as_sent_for_the_plan_to_judge() -> None:
    """Two Hosts are no parse error: the plan refuses them (in either lane), so they come out in order."""
    connection = Connection()
    event = connection.receive(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    assert isinstance(event, Request)
    assert event.headers.getall("Host") == ["a", "b"]


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


def test_a_request_the_plan_declines_is_handed_over_whole() -> None:
    connection = Connection()
    connection.receive(GET[:10])
    connection.receive(GET[10:])
    assert connection.hand_over() == HandOver(GET)


@given(st.lists(st.binary(max_size=300), max_size=8))
def test_any_bytes_give_an_event_and_never_raise(chunks: list[bytes]) -> None:
    connection = Connection(max_head=2048)
    received = b""
    for chunk in chunks:
        event = connection.receive(chunk)
        received += chunk
        if isinstance(event, Request):
            assert event.method in ("GET", "HEAD")
            assert connection.state is State.SERVING
            connection.done(keep_alive=event.keep_alive)
            received = b""
        elif isinstance(event, HandOver):
            assert event.data == received  # every byte not yet answered, in order
            return
        else:
            assert event is NEED_DATA or (event is CLOSE and connection.state is State.CLOSED)


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

"""The frame scanner alone: what passes, what is held back for the next read, what ends the relay."""

from __future__ import annotations

import os
import struct

import pytest

from gateway.proxy.wsframes import Frames, close_frame, frame

PROTOCOL_ERROR, MESSAGE_TOO_BIG = 1002, 1009  # RFC 6455 §7.4.1: the codes both ends are closed with

MASK = b"\x01\x02\x03\x04"
LIMIT = 1 << 16


def data_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = None, rsv: int = 0) -> bytes:
    """Any frame, including ones no endpoint may send (for the violations below)."""
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    bit = 0x80 if mask is not None else 0
    length = len(payload)
    if length < 126:
        head += bytes([bit | length])
    elif length < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", length)
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def client(opcode: int, payload: bytes, **kwargs: object) -> bytes:
    return data_frame(opcode, payload, mask=MASK, **kwargs)  # type: ignore[arg-type]


def feed_all(frames: Frames, *pieces: bytes) -> bytes:
    return b"".join(frames.feed(piece) for piece in pieces)


STREAM = b"".join([
    client(0x1, b"hello"),
    client(0x2, os.urandom(300)),  # 16-bit length
    client(0x2, os.urandom(70_000), fin=False),  # 64-bit length, first fragment
    client(0x9, b"ping in between"),
    client(0x0, b"end", fin=True),
    client(0xA, b"unrelated pong"),
    client(0x8, struct.pack("!H", 1000) + b"bye"),
])


SERVER_STREAM = b"".join([
    data_frame(0x1, b"odd"),
    data_frame(0x9, b""),  # a whole frame of two bytes
    data_frame(0x2, os.urandom(301)),
    data_frame(0x2, os.urandom(70_001), fin=False),
    data_frame(0x0, b"", fin=True),
    data_frame(0xA, b"x" * 125),  # the largest control frame
    data_frame(0x8, struct.pack("!H", 1000) + b"bye"),
])


@pytest.mark.parametrize("size", [1, 2, 3, 7, 13, 1000, 65536, len(STREAM)])
@pytest.mark.parametrize(("masked", "stream"), [(True, STREAM), (False, SERVER_STREAM)], ids=["client", "server"])
def test_a_stream_cut_anywhere_passes_whole(size: int, masked: bool, stream: bytes) -> None:
    frames = Frames(masked=masked, limit=1 << 20)
    pieces = [stream[i : i + size] for i in range(0, len(stream), size)]
    assert not frames.closed
    assert feed_all(frames, *pieces) == stream
    assert frames.closed
    assert not frames.error


def test_whole_frames_pass_as_the_same_object() -> None:
    data = client(0x1, b"x" * 100)
    assert Frames(masked=True, limit=LIMIT).feed(data) is data


def test_an_incomplete_head_is_held_back_and_the_payload_in_flight_is_not() -> None:
    frames = Frames(masked=False, limit=LIMIT)
    whole = data_frame(0x2, b"y" * 1000)
    assert frames.feed(whole[:3]) == b""  # 126 + two length bytes: one is missing
    assert not frames.mid_frame
    assert frames.feed(whole[3:10]) == whole[:10]
    assert frames.mid_frame  # a frame of the gateway's own must wait
    assert frames.feed(whole[10:-1]) == whole[10:-1]
    assert frames.mid_frame  # one byte is still to come
    assert frames.feed(whole[-1:]) == whole[-1:]
    assert not frames.mid_frame


def test_a_whole_frame_of_two_bytes_is_not_held() -> None:
    frames = Frames(masked=False, limit=LIMIT)
    assert frames.feed(frame(0x8)) == frame(0x8)
    assert frames.closed


@pytest.mark.parametrize("masked", [True, False], ids=["client", "server"])
def test_the_first_message_may_be_as_big_as_the_limit_and_no_bigger(masked: bool) -> None:
    mask = MASK if masked else None
    exactly = data_frame(0x2, b"x" * LIMIT, mask=mask)
    frames = Frames(masked=masked, limit=LIMIT)
    assert frames.feed(exactly) == exactly
    assert not frames.error
    over = Frames(masked=masked, limit=LIMIT)
    assert over.feed(data_frame(0x2, b"x" * (LIMIT + 1), mask=mask)) == b""
    assert over.error == MESSAGE_TOO_BIG


def long_head(length: int) -> bytes:
    """The head of a binary client frame with a 64-bit length, and no payload behind it yet."""
    return bytes([0x82, 0x80 | 127]) + struct.pack("!Q", length) + MASK


def test_a_control_frame_is_held_until_whole() -> None:
    frames = Frames(masked=True, limit=LIMIT)
    ping = client(0x9, b"0123456789")
    assert frames.feed(client(0x1, b"a") + ping[:5]) == client(0x1, b"a")
    assert frames.feed(ping[5:]) == ping


VIOLATIONS = [
    # (why, frames that pass first, the offending frame, from a client?, close code)
    ("compression was not agreed", b"", data_frame(0x1, b"x" * 10, mask=MASK, rsv=0x40), True, PROTOCOL_ERROR),
    ("a client must mask", b"", data_frame(0x1, b"x"), True, PROTOCOL_ERROR),
    ("a server must not mask", b"", data_frame(0x1, b"x", mask=MASK), False, PROTOCOL_ERROR),
    ("reserved opcode", b"", client(0x3, b"x"), True, PROTOCOL_ERROR),
    ("reserved control opcode", b"", client(0xB, b"x"), True, PROTOCOL_ERROR),
    # and not read as a close frame: with no payload, or one that would be a fine close code
    ("reserved control opcode, empty", b"", client(0xB, b""), True, PROTOCOL_ERROR),
    ("reserved control opcode, a close code", b"", data_frame(0xF, struct.pack("!H", 1000)), False, PROTOCOL_ERROR),
    ("control frames are small", b"", client(0x9, b"x" * 126), True, PROTOCOL_ERROR),
    ("control frames are whole", b"", client(0x9, b"x", fin=False), True, PROTOCOL_ERROR),
    ("a continuation of nothing", b"", client(0x0, b"x"), True, PROTOCOL_ERROR),
    ("a message inside a message", client(0x1, b"a", fin=False), client(0x1, b"b"), True, PROTOCOL_ERROR),
    ("one frame too big", b"", client(0x2, b"x" * (LIMIT + 1)), True, MESSAGE_TOO_BIG),
    ("too big over its fragments", client(0x2, b"x" * LIMIT, fin=False), client(0x0, b"x"), True, MESSAGE_TOO_BIG),
    ("a length with its most significant bit set", b"", long_head(1 << 63), True, PROTOCOL_ERROR),
    ("a length of 2**62", b"", long_head(1 << 62), True, MESSAGE_TOO_BIG),
    ("half a close code", b"", client(0x8, b"\x03"), True, PROTOCOL_ERROR),
    ("a server's bad close code", b"", data_frame(0x8, struct.pack("!H", 1005)), False, PROTOCOL_ERROR),
    *((f"close code {code}", b"", client(0x8, struct.pack("!H", code)), True, PROTOCOL_ERROR)
      for code in (999, 1004, 1005, 1006, 1015, 2999, 5000)),
]


@pytest.mark.parametrize(("passed", "offending", "masked", "code"), [row[1:] for row in VIOLATIONS],
                         ids=[row[0] for row in VIOLATIONS])
def test_violations_end_the_relay_and_pass_nothing_of_the_offending_frame(passed: bytes, offending: bytes,
                                                                         masked: bool, code: int) -> None:
    frames = Frames(masked=masked, limit=LIMIT)
    before = data_frame(0x1, b"fine", mask=MASK if masked else None)
    assert frames.feed(before + passed + offending + before) == before + passed
    assert frames.error == code
    assert frames.feed(before) == b""  # nothing more passes


@pytest.mark.parametrize("payload", [b"", struct.pack("!H", 1000), struct.pack("!H", 1001) + b"going",
                                     struct.pack("!H", 1003), struct.pack("!H", 1007), struct.pack("!H", 1014),
                                     struct.pack("!H", 3000), struct.pack("!H", 4999),
                                     struct.pack("!H", 1000) + b"r" * 123],
                         ids=["no code", "1000", "1001 with a reason", "1003", "1007", "1014", "3000", "4999",
                              "the longest reason"])
@pytest.mark.parametrize("masked", [True, False], ids=["client", "server"])
def test_close_frames_that_may_be_sent_pass(payload: bytes, masked: bool) -> None:
    frames = Frames(masked=masked, limit=LIMIT)
    data = data_frame(0x8, payload, mask=MASK if masked else None)
    assert frames.feed(data) == data
    assert frames.closed
    assert not frames.error


def test_only_the_pong_to_the_gateways_ping_is_dropped() -> None:
    frames = Frames(masked=True, limit=LIMIT, swallow=b"ours")
    theirs, ours, text = client(0xA, b"theirs"), client(0xA, b"ours"), client(0x1, b"t")
    assert frames.feed(text + ours + theirs + ours + text) == text + theirs + text
    long = Frames(masked=True, limit=LIMIT, swallow=b"h" * 125)
    assert long.feed(client(0xA, b"h" * 125) + text) == text


def test_gateway_frames() -> None:
    assert frame(0x9, b"hb") == b"\x89\x02hb"
    assert close_frame(1001) == b"\x88\x02\x03\xe9"
    assert close_frame(1001, mask=MASK) == client(0x8, struct.pack("!H", 1001))
    assert frame(0x9, b"p" * 125, mask=MASK) == client(0x9, b"p" * 125)  # the largest a control frame may be
    masked = Frames(masked=True, limit=LIMIT)
    assert masked.feed(close_frame(4000, mask=os.urandom(4)))
    assert masked.closed


@pytest.mark.parametrize("mask", [None, MASK], ids=["to a client", "to a server"])
def test_the_gateway_refuses_to_write_a_control_frame_a_peer_must_refuse(mask: bytes | None) -> None:
    """126 in the length byte would announce a 16-bit length: the peer would read the payload as a length."""
    with pytest.raises(AssertionError):
        frame(0x9, b"p" * 126, mask=mask)

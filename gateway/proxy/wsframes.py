"""WebSocket frame boundaries from the bytes alone (RFC 6455 §5.2): bytes in, bytes to pass on out, no I/O.

The relay forwards frames as they arrived instead of decoding messages, so it only needs what each frame head
says: where the frame ends, whether it is a control frame and how big the message has grown. Payloads of data
frames are never held; only an incomplete frame head (at most 14 bytes) or an incomplete control frame (at most
131 bytes) waits for the next read, so what is passed on always ends on a boundary the relay may cut at.

Control frames are read whole because the relay must see two of them: a close frame (its code must be one that
may be sent; 1005, 1006 and 1015 never are) and the pong that answers the gateway's own heartbeat ping, which
is not the other side's business. No extension is ever negotiated, so reserved bits are a protocol error.
"""

from __future__ import annotations

import struct

PROTOCOL_ERROR = 1002
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011
CLOSE, PING, PONG = 0x8, 0x9, 0xA
_CONTINUATION, _BINARY = 0x0, 0x2
_SENDABLE_CLOSE_CODES = frozenset((*range(1000, 1004), *range(1007, 1015), *range(3000, 5000)))
"""Codes a close frame may carry: the registered ones an endpoint may send, and the ranges for libraries and
applications. 1005 (no code), 1006 (dropped) and 1015 (TLS failed) only ever describe a close locally."""


def sendable_close_code(code: int) -> bool:
    return code in _SENDABLE_CLOSE_CODES


def _unmask(payload: bytes, mask: bytes) -> bytes:
    key = int.from_bytes((mask * (len(payload) // 4 + 1))[: len(payload)], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(len(payload), "big")


def frame(opcode: int, payload: bytes = b"", *, mask: bytes | None = None) -> bytes:
    """One final frame with a small payload (control frames); masked with ``mask`` when it goes to a server."""
    assert len(payload) <= 125
    if mask is None:
        return struct.pack("!BB", 0x80 | opcode, len(payload)) + payload
    return struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload)) + mask + _unmask(payload, mask)


def close_frame(code: int, *, mask: bytes | None = None) -> bytes:
    return frame(CLOSE, struct.pack("!H", code), mask=mask)


class Frames:
    """One direction of a WebSocket: ``feed`` takes the bytes as they arrive and returns the bytes to pass on.

    ``masked``: frames in this direction come from a client and must be masked (and from a server, must not).
    ``limit``: the largest message, in payload bytes over all its fragments. ``swallow``: the payload of pongs
    that are dropped (answers to the gateway's own ping). After a violation ``error`` holds the close code to
    send both ways and nothing more is passed on; ``closed`` says a close frame went through.
    """

    __slots__ = ("_fragmented", "_held", "_limit", "_masked", "_message", "_skip", "_swallow", "closed", "error")

    def __init__(self, *, masked: bool, limit: int, swallow: bytes | None = None) -> None:
        self._masked = masked
        self._limit = limit
        self._swallow = swallow
        self._held = b""
        self._skip = 0
        self._message = 0
        self._fragmented = False
        self.closed = False
        self.error = 0

    @property
    def mid_frame(self) -> bool:
        """Part of a data frame's payload was passed on and the rest was not: nothing may be put in between."""
        return self._skip > 0

    def feed(self, data: bytes) -> bytes:
        if self.error:
            return b""
        if self._held:
            data, self._held = self._held + data, b""
        size = len(data)
        if self._skip >= size:  # the middle of a long payload: the common case for bulk transfers
            self._skip -= size
            return data
        pos, self._skip = self._skip, 0
        kept: list[bytes] = []  # passed-on pieces before ``start`` when a control frame was dropped
        start = 0
        while pos < size:
            end = self._frame_end(data, pos, size)
            if end < 0:  # a violation (the frame at ``pos`` is not passed on) or an incomplete frame to hold
                if not self.error:
                    self._held = data[pos:]
                break
            if end > size:
                self._skip = end - size
                pos = size
                break
            if data[pos] & 0x08 and self._drops(data, pos, end):
                kept.append(data[start:pos])
                start = end
            pos = end
            if self.error:  # a close frame with a code nobody may send: dropped, and the end of the relay
                break
        if start == 0 and pos == size:
            return data
        kept.append(data[start:pos])
        return b"".join(kept)

    def _frame_end(self, data: bytes, pos: int, size: int) -> int:
        """Where the frame that starts at ``pos`` ends; -1 when its head (or a control frame) is incomplete or
        breaks the protocol (then ``error`` is set). Data frames count towards their message's size."""
        if size - pos < 2:
            return -1
        first, second = data[pos], data[pos + 1]
        length = second & 0x7F
        head = 2 + (2 if length == 126 else 8 if length == 127 else 0) + (4 if second & 0x80 else 0)
        if size - pos < head:
            return -1
        if length == 126:
            length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        elif length == 127:
            length = int.from_bytes(data[pos + 2 : pos + 10], "big")
        opcode = first & 0x0F
        if first & 0x70 or bool(second & 0x80) is not self._masked or length >> 63:
            return self._fail(PROTOCOL_ERROR)
        end = pos + head + length
        if opcode & 0x08:
            if opcode > PONG or not first & 0x80 or length > 125:
                return self._fail(PROTOCOL_ERROR)
            return end if end <= size else -1
        if opcode > _BINARY or (opcode == _CONTINUATION) is not self._fragmented:
            return self._fail(PROTOCOL_ERROR)
        self._message += length
        if self._message > self._limit:
            return self._fail(MESSAGE_TOO_BIG)
        self._fragmented = not first & 0x80
        if not self._fragmented:
            self._message = 0
        return end

    def _fail(self, code: int) -> int:
        self.error = code
        return -1

    def _drops(self, data: bytes, pos: int, end: int) -> bool:
        """Look at a whole control frame: a close frame is checked, the heartbeat's pong is dropped."""
        opcode = data[pos] & 0x0F
        if opcode == PING:
            return False
        body = pos + 2 + (4 if self._masked else 0)
        payload = data[body:end]
        if self._masked:
            payload = _unmask(payload, data[body - 4 : body])
        if opcode == PONG:
            return payload == self._swallow
        if len(payload) == 1 or (payload and not sendable_close_code(int.from_bytes(payload[:2], "big"))):
            self.error = PROTOCOL_ERROR
            return True
        self.closed = True
        return False

"""A minimal HTTP/1.1 client over raw asyncio streams: exact Host headers (Python does not resolve
``*.localhost``), cookies handled by the caller, and the arrival time of the first response byte."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    first_byte: float

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key.lower() == name.lower()), None)

    def cookies(self) -> dict[str, str]:
        """Name → value of every ``Set-Cookie`` (attributes dropped)."""
        out = {}
        for key, value in self.headers:
            if key.lower() == "set-cookie":
                name, _, rest = value.partition("=")
                out[name.strip()] = rest.partition(";")[0]
        return out


def request_bytes(method: str, host: str, path: str, headers: Mapping[str, str] | None = None,
                  body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{key}: {value}" for key, value in (headers or {}).items()]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def fetch(address: tuple[str, int], host: str, path: str, headers: Mapping[str, str] | None = None, *,
                method: str = "GET", body: bytes = b"", wait: float = 60.0) -> Answer:
    """One request on its own connection; the whole body is read (until the server closes)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*address), wait)
    try:
        writer.write(request_bytes(method, host, path, headers, body))
        first = await asyncio.wait_for(reader.read(1), wait)
        first_byte = time.monotonic()
        rest = await asyncio.wait_for(reader.read(), wait)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return parse(first + rest, first_byte)


def parse(raw: bytes, first_byte: float) -> Answer:
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head:
        raise ConnectionError("empty answer")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = [(key.strip(), value.strip()) for key, _, value in (line.partition(":") for line in header_lines)]
    answer = Answer(int(status_line.split()[1]), headers, body, first_byte)
    if (answer.header("Transfer-Encoding") or "").lower() == "chunked":
        answer.body = _dechunk(body)
    return answer


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)

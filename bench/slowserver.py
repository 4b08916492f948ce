"""A dev server that takes a while to start: sleeps, then listens and writes the monotonic time of listen().

``python -m bench.slowserver --host H --port P --delay S --stamp FILE [--backlog N]``. CLOCK_MONOTONIC is
system-wide on Linux, so the harness compares this stamp with the times its clients saw on the same machine.
``--backlog 5`` listens like Python's ``http.server`` (and Django's ``runserver``, 10): a burst of connects past
it is dropped by the kernel and retried seconds later.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time
from pathlib import Path

_BODY = b"ok\n"
_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(_BODY), _BODY)


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:") and int(line.split(b":")[1]):
                    await reader.readexactly(int(line.split(b":")[1]))
            writer.write(_RESPONSE)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def main_async(host: str, port: int, delay: float, stamp: Path, backlog: int) -> None:
    await asyncio.sleep(delay)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    listened = time.monotonic()
    tmp = stamp.with_name(stamp.name + ".tmp")
    tmp.write_text(repr(listened))
    tmp.replace(stamp)
    server = await asyncio.start_server(_serve, sock=sock, backlog=backlog)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.2)
    parser.add_argument("--stamp", type=Path, required=True)
    parser.add_argument("--backlog", type=int, default=4096)
    args = parser.parse_args()
    asyncio.run(main_async(args.host, args.port, args.delay, args.stamp, args.backlog))


if __name__ == "__main__":
    main()

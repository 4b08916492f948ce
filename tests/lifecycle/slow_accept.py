"""A dev server with the smallest accept queue there is: ``python slow_accept.py --host H --port P``.

It listens with ``listen(1)`` and takes each connection only after ``--accept-delay`` seconds (a busy
single-process dev server), then serves it on a thread with HTTP/1.1 keep-alive: ``GET /`` answers ``BODY``.
Connects beyond the queue are dropped by the kernel, which is what a proxy must never provoke.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time

BODY = b"hello from a small accept queue\n"
_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)


def _serve(conn: socket.socket) -> None:
    """Answer every request on the connection until the client closes it (bodiless requests only)."""
    buffered = b""
    with conn:
        while True:
            while b"\r\n\r\n" not in buffered:
                data = conn.recv(65536)
                if not data:
                    return
                buffered += data
            _head, _, buffered = buffered.partition(b"\r\n\r\n")
            conn.sendall(_ANSWER)


def main(host: str, port: int, accept_delay: float) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(1)
    while True:
        time.sleep(accept_delay)
        conn, _ = listener.accept()
        threading.Thread(target=_serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--accept-delay", type=float, default=0.005)
    args = parser.parse_args()
    main(args.host, args.port, args.accept_delay)

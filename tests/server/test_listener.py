"""The listening sockets and the ``Acceptor``: a deep kernel queue, a batch of connections taken each time the
socket is ready on either loop the gateway may run (uvloop's own servers take one a loop turn), and a worker out
of file descriptors says so once in a while, not with a traceback per failed ``accept``.

Each test runs its body on asyncio's loop and on uvloop's, as ``serve`` does."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import subprocess
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import pytest
import uvloop

from gateway.server import listener
from gateway.server.listener import ACCEPT_BATCH, BACKLOG, Acceptor, listening_sockets
from tests.server.conftest import free_port

LOOPS = {"asyncio": asyncio.run, "uvloop": uvloop.run}


def _queue(port: int) -> tuple[int, int]:
    """(connections waiting to be accepted, backlog) of the listening socket on ``port``, as ``ss`` shows them."""
    lines = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    waiting, backlog = lines.split()[1:3]
    return int(waiting), int(backlog)


async def _until(condition: Callable[[], bool], within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 (the kernel's queue and the loop's callbacks: nothing to wait on)
            await asyncio.sleep(0.01)


class Counted(asyncio.Protocol):
    made: ClassVar[list[Counted]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Counted.made.append(self)
        self.transport = transport


def _connect(port: int, count: int) -> list[socket.socket]:
    """Clients whose handshakes the kernel completes at once: they wait in the listener's queue."""
    clients = []
    for _ in range(count):
        client = socket.socket()
        client.setblocking(False)
        client.connect_ex(("127.0.0.1", port))
        clients.append(client)
    return clients


def _close_all(acceptor: Acceptor, clients: list[socket.socket]) -> None:
    """The acceptor, the clients and the connections it made for them."""
    acceptor.close()
    for client in clients:
        client.close()
    for made in Counted.made:
        made.transport.close()


@pytest.mark.parametrize("run", LOOPS.values(), ids=LOOPS.keys())
def test_a_ready_socket_gives_a_batch_and_the_kernel_queue_stays_deep(run: Callable[[Awaitable[None]], None]) -> None:
    async def body() -> None:
        port = free_port("127.0.0.1")
        [sock] = listening_sockets("127.0.0.1", port, reuse_port=False)
        Counted.made = []
        clients = _connect(port, ACCEPT_BATCH + 36)
        acceptor = Acceptor(sock, Counted)
        try:
            await _until(lambda: _queue(port) == (ACCEPT_BATCH + 36, BACKLOG))
            acceptor._accept()  # the socket ready once: one batch comes off the queue
            assert _queue(port) == (36, BACKLOG)
            acceptor.start()
            await _until(lambda: len(Counted.made) == ACCEPT_BATCH + 36)
            assert _queue(port)[0] == 0
        finally:
            _close_all(acceptor, clients)

    run(body())


class OutOfFiles(socket.socket):
    """A listening socket whose first ``failures`` accepts fail with ``error`` (EMFILE: as a worker out of
    descriptors sees them; running the test process itself out of descriptors would break the test run)."""

    failures = 0
    tries = 0
    error = errno.EMFILE

    def accept(self) -> tuple[socket.socket, Any]:
        OutOfFiles.tries += 1
        if OutOfFiles.failures > 0:
            OutOfFiles.failures -= 1
            raise OSError(OutOfFiles.error, os.strerror(OutOfFiles.error))
        return super().accept()

    @classmethod
    def listening(cls, failures: int, error: int = errno.EMFILE) -> OutOfFiles:
        sock = cls()
        sock.bind(("127.0.0.1", 0))
        sock.listen(BACKLOG)
        sock.setblocking(False)
        cls.failures, cls.tries, cls.error = failures, 0, error
        return sock


@pytest.mark.parametrize("run", LOOPS.values(), ids=LOOPS.keys())
def test_out_of_file_descriptors_is_one_warning_now_and_then_and_accepting_resumes(
        run: Callable[[Awaitable[None]], None], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(listener, "PAUSE", 0.05)

    async def body() -> None:
        sock = OutOfFiles.listening(failures=20)
        Counted.made = []
        acceptor = Acceptor(sock, Counted)
        [client] = _connect(sock.getsockname()[1], 1)
        try:
            with caplog.at_level(logging.WARNING):
                acceptor.start()
                await _until(lambda: len(Counted.made) == 1)  # after 20 failed tries, a pause after each
            assert OutOfFiles.failures == 0
            said = [record for record in caplog.records if record.name == "gateway.server.listener"]
            assert len(said) == 1
            assert "Too many open files" in said[0].getMessage()
            assert said[0].exc_info is None  # no traceback
        finally:
            _close_all(acceptor, [client])

    run(body())


@pytest.mark.parametrize("run", LOOPS.values(), ids=LOOPS.keys())
def test_a_pause_stops_accepting_until_it_ends(run: Callable[[Awaitable[None]], None],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """While paused the socket is not watched: a connection waiting in the queue must not make the loop try
    (and fail) to accept it over and over."""
    monkeypatch.setattr(listener, "PAUSE", 0.2)

    async def body() -> None:
        sock = OutOfFiles.listening(failures=1_000_000)
        acceptor = Acceptor(sock, Counted)
        [client] = _connect(sock.getsockname()[1], 1)
        try:
            acceptor.start()
            await asyncio.sleep(0.5)
            assert 1 <= OutOfFiles.tries <= 4  # once at first, then once after each pause
        finally:
            acceptor.close()
            client.close()

    run(body())


@pytest.mark.parametrize("run", LOOPS.values(), ids=LOOPS.keys())
@pytest.mark.parametrize("error", [errno.EPROTO, errno.ENETUNREACH, errno.EPERM], ids=errno.errorcode.get)
def test_a_pending_connection_that_failed_is_skipped_without_a_pause(
        run: Callable[[Awaitable[None]], None], error: int, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """accept(2) on Linux reports a network error of the connection it was taking (EPROTO, ENETUNREACH…) or a
    firewall's refusal (EPERM): that one client's connection failed, the next one in the queue is fine. (The
    socket stands in for the kernel: neither can be brought about on loopback.)"""
    monkeypatch.setattr(listener, "PAUSE", 30.0)  # a pause would outlast the test's wait

    async def body() -> None:
        sock = OutOfFiles.listening(failures=1, error=error)
        Counted.made = []
        acceptor = Acceptor(sock, Counted)
        clients = _connect(sock.getsockname()[1], 2)
        try:
            with caplog.at_level(logging.DEBUG, logger="gateway.server.listener"):
                acceptor.start()
                await _until(lambda: len(Counted.made) == 2)
            assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
        finally:
            _close_all(acceptor, clients)

    run(body())

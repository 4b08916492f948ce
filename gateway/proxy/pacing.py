"""Connection manners toward one upstream: how many requests are in flight, and how fast new connections open.

A dev server's accept queue is small (``http.server`` listens with a backlog of 5, Django's ``runserver`` 10).
When more handshakes arrive than it holds, Linux drops them and the client retries after 1, 3, 7… seconds, or
believes it is connected and waits for an answer that never comes. A burst of connects from the gateway (a wake
releasing a thousand held requests, a preview shown to a room) would do exactly that, so new connections to one
upstream open like TCP's slow start: a few attempts at a time, one more for each that proves itself (its first
byte answered), half as many after one that shows the queue overflowed. Requests wait in the gateway instead —
visible (``queued``) and bounded by the caller — and take a kept-alive connection before opening a new one.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import enum
from collections.abc import Callable
from typing import Any, Generic, TypeVar

C = TypeVar("C")
K = TypeVar("K")

INITIAL_WINDOW = 4
"""Connection attempts to one upstream that may be unproven at once at first: fits a backlog of 5."""
MOST_WINDOW = 6
"""Never more unproven attempts than this: ``http.server`` queues 6 (backlog + 1); more risks dropped handshakes."""
SETTLE_AFTER = 1.0
"""An attempt connected this long without an answer stops counting (a long poll must not hold the window)."""


class Outcome(enum.Enum):
    PROVEN = "proven"  # the upstream answered on it: grow the window
    SETTLED = "settled"  # ended without a sign either way (refused, closed, a long answer): window unchanged
    LOST = "lost"  # a handshake was dropped or timed out: the accept queue overflowed, halve the window


class CoarseTimer(abc.ABC, Generic[K]):
    """Many timeouts of one length, checked by one timer that ticks every tenth of it (at most every second),
    instead of a timer per wait: a handle on the loop's heap, rescheduled and cancelled, cost a proxied request
    2–3 % and a wake's burst of ten thousand held requests a quarter more in the pool. What is due expires up to
    a tick late."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self._tick = min(1.0, seconds / 10) if seconds else 0.0
        self._due: dict[K, float] = {}
        self._timer: asyncio.TimerHandle | None = None

    def _watch(self, key: K, due: float, loop: asyncio.AbstractEventLoop) -> None:
        self._due[key] = due
        if self._timer is None:
            self._timer = loop.call_later(self._tick, self._check, loop)

    def forget(self, key: K) -> None:
        self._due.pop(key, None)

    @abc.abstractmethod
    def _expire(self, key: K) -> None:
        """``key`` is past its time (it is no longer watched)."""

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for key in [key for key, due in self._due.items() if due <= now]:
            del self._due[key]
            self._expire(key)
        self._timer = loop.call_later(self._tick, self._check, loop) if self._due else None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due.clear()


class Deadlines(CoarseTimer["asyncio.Future[Any]"]):
    """When each request waiting in a pool's line gives up (a wake releasing ten thousand requests waits ten
    thousand times at once). A waiter past its deadline gets ``TimeoutError``."""

    seconds: float

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)

    def watch(self, waiter: asyncio.Future[Any]) -> None:
        """A request starts waiting now: it gives up ``seconds`` from now. (The loop is the waiter's:
        ``asyncio.get_running_loop`` is a ``getpid`` system call on Python 3.11, and at 1,000 client connections
        most requests wait.)"""
        loop = waiter.get_loop()
        self._watch(waiter, loop.time() + self.seconds, loop)

    def _expire(self, key: asyncio.Future[Any]) -> None:
        if not key.done():
            key.set_exception(TimeoutError())


class Grant(enum.Enum):
    """What ``Pacer.try_take`` has for a request besides a kept-alive connection."""

    OPEN = "open"  # a place in the window: the caller opens a connection, counted until ``Attempt.end``
    WAIT = "wait"  # nothing now: wait in line (``Pacer.take``)


class Pacer(Generic[C]):
    """Per upstream, in one line, first come first served: the requests in flight (at most ``limit``), their
    kept-alive connections, and the window of unproven connection attempts.

    A request counts until its answer is whole, unless the answer is a stream by its type (an event stream): the
    upstream has answered it, it never ends by itself, and a crowd of open event streams must not keep every other
    request to the port waiting. It keeps its connection, which comes back through ``restore``. (Any other
    answer counts until it is whole, however long it takes: by time alone, a page rendered slowly in chunks would
    pass for a stream, and a wake's burst of them would go past the limit.)

    A request that cannot go at once waits once, for whichever comes first: a connection another request gives
    back (its place in flight passes on with it), or a place in flight and in the window to open one. (Two lines,
    a turn then a connection, woke most waiting requests twice while the connections were still being opened, as
    they are for seconds at 1,000 client connections on a busy loop.) Each operation is O(1):
    ``asyncio.Semaphore`` in Python 3.11 walks all its waiters on every acquire, and a wake releasing ten thousand
    requests made that quadratic. A request retried after a failure keeps its place and waits only for the
    window, ahead of the others (``open_fresh``). With ``deadlines``, a wait ends in ``TimeoutError`` once they
    find it past its allowance."""

    def __init__(self, limit: int, *, initial: int = INITIAL_WINDOW, most: int = MOST_WINDOW,
                 deadlines: Deadlines | None = None, fit: Callable[[C], bool] = lambda conn: True) -> None:
        """``fit``: whether a kept-alive connection may still take a request (the caller closes one that may not).
        Made on the event loop its waits are on."""
        self._loop = asyncio.get_running_loop()
        self._limit = limit
        self._deadlines = deadlines
        self._fit = fit
        self.taken = 0
        """Requests in flight: holding a connection or a place in the window."""
        self.idle: list[C] = []  # most recently used last
        self.window = initial
        self._most = most
        self.unproven = 0
        self.waiting = 0
        self.streaming = 0
        """Requests whose answers stream: each holds a connection but no place in flight."""
        self._any: collections.deque[asyncio.Future[C | None]] = collections.deque()
        self._fresh: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def quiet(self) -> bool:
        """Nothing in flight (a stream included), kept alive, waiting, nor connecting: nobody would miss it."""
        return not (self.taken or self.streaming or self.waiting or self.unproven or self.idle)

    def try_take(self) -> C | Grant:
        """The usual case, without a future: a kept-alive connection, else a place to open one, unless the upstream
        has ``limit`` requests in flight. First come, first served without looking at the line: whatever comes
        free goes to those in line at once (``give``, ``_serve``), so while anyone waits nothing is free here."""
        if self.taken >= self._limit:
            return Grant.WAIT
        conn = self._pop_idle()
        if conn is not None:
            self.taken += 1
            return conn
        if self.unproven >= self.window:
            return Grant.WAIT
        self.unproven += 1
        self.taken += 1
        return Grant.OPEN

    async def take(self) -> C | Grant:
        """Wait in line (when ``try_take`` said ``WAIT``) for a connection given back or a place to open one
        (``Grant.OPEN``)."""
        waiter: asyncio.Future[C | None] = self._loop.create_future()
        self._any.append(waiter)
        given = await self._wait(waiter, self._pass_on)
        return Grant.OPEN if given is None else given

    def _pass_on(self, given: C | None) -> None:
        """What a request in line was given as it was cancelled goes to the next one (a connection only if it is
        still fit: the upstream may have closed it meanwhile)."""
        if given is not None:
            if self._fit(given):
                self.give(given)
            else:
                self.leave()
            return
        self.taken -= 1
        self._end(Outcome.SETTLED)

    def try_open(self) -> bool:
        """A place in the window for a request that holds its place in flight already (a retry), at once if there
        is one (then no other retry waits: ``_serve`` gives them places first)."""
        if self.unproven < self.window:
            self.unproven += 1
            return True
        return False

    async def open_fresh(self) -> None:
        """Wait (when ``try_open`` said no) for a place in the window, ahead of the requests in line."""
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._fresh.append(waiter)
        await self._wait(waiter, lambda _: self._end(Outcome.SETTLED))

    async def _wait(self, waiter: asyncio.Future[Any], undo: Callable[[Any], None]) -> Any:
        if self._deadlines is not None:
            self._deadlines.watch(waiter)
        self.waiting += 1
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:  # served as it was
                undo(waiter.result())  # cancelled
            raise
        finally:
            self.waiting -= 1
            if self._deadlines is not None:
                self._deadlines.forget(waiter)

    def give(self, conn: C) -> bool:
        """A request ends and its connection may be used again: with the request's place, to the first one
        waiting in line (True), else back to the idle ones."""
        waiter = _first(self._any) if self._any else None
        if waiter is not None:
            waiter.set_result(conn)
            return True
        self.taken -= 1
        self.idle.append(conn)
        return False

    def leave(self) -> None:
        """A request ends without a connection to give back (closed, or never had one)."""
        self.taken -= 1
        self._serve()

    def stream(self) -> None:
        """A request's answer streams: its place goes to the line, its connection stays with it."""
        self.streaming += 1
        self.leave()

    def restore(self, conn: C) -> bool:
        """A streamed answer is whole and its connection may be used again: to the first one waiting while a place
        is free (True), else back to the idle ones."""
        self.streaming -= 1
        if self.taken < self._limit:
            self.taken += 1
            return self.give(conn)
        self.idle.append(conn)
        return False

    def end_stream(self) -> None:
        """A streamed answer ends without a connection to give back."""
        self.streaming -= 1

    def attempt(self) -> Attempt[C]:
        """The place in the window ``try_take``, ``take``, ``try_open`` or ``open_fresh`` granted, to be ended
        once."""
        return Attempt(self)

    def _pop_idle(self) -> C | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if self._fit(conn):
                return conn
        return None

    def _end(self, outcome: Outcome) -> None:
        self.unproven -= 1
        if outcome is Outcome.PROVEN:
            self.window = min(self._most, self.window + 1)
        elif outcome is Outcome.LOST:
            self.window = max(1, self.window // 2)
        self._serve()

    def _serve(self) -> None:
        """Give what there is to those waiting: places in the window to retries first, then, in line, a kept-alive
        connection or a place to open one while fewer than ``limit`` requests are in flight."""
        while self.unproven < self.window and (retry := _first(self._fresh)) is not None:
            self.unproven += 1
            retry.set_result(None)
        while self._any and self.taken < self._limit:
            conn = self._pop_idle()
            if conn is None and self.unproven >= self.window:
                return
            waiter = _first(self._any)
            if waiter is None:
                if conn is not None:
                    self.idle.append(conn)
                return
            self.taken += 1
            if conn is None:
                self.unproven += 1
            waiter.set_result(conn)


def _first(line: collections.deque[asyncio.Future[Any]]) -> asyncio.Future[Any] | None:
    """The first of a line still waiting; those gone are dropped."""
    while line:
        waiter = line.popleft()
        if not waiter.done():
            return waiter
    return None


class Attempt(Generic[C]):
    """One connection attempt's place in its upstream's window, released once whatever happens first."""

    __slots__ = ("_pacer", "_timer")

    def __init__(self, pacer: Pacer[C]) -> None:
        self._pacer: Pacer[C] | None = pacer
        self._timer: asyncio.TimerHandle | None = None

    def settle_after(self, seconds: float) -> None:
        """Connected: stop counting after ``seconds`` without an answer (the upstream took it, and takes its time)."""
        self._timer = asyncio.get_running_loop().call_later(seconds, self.end, Outcome.SETTLED)

    def end(self, outcome: Outcome) -> None:
        pacer, self._pacer = self._pacer, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if pacer is not None:
            pacer._end(outcome)

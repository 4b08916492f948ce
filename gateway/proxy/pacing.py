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
    """When each request waiting in a pool's queues gives up (a wake releasing ten thousand requests waits twenty
    thousand times: a turn, then a connection). A waiter past its deadline gets ``TimeoutError``."""

    seconds: float

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)

    def deadline(self) -> float:
        """The deadline of a request that starts waiting now (on the loop's clock)."""
        return asyncio.get_running_loop().time() + self.seconds

    def watch(self, waiter: asyncio.Future[Any], deadline: float) -> None:
        self._watch(waiter, deadline, asyncio.get_running_loop())

    def _expire(self, key: asyncio.Future[Any]) -> None:
        if not key.done():
            key.set_exception(TimeoutError())


class Turns:
    """A fair limit on requests in flight, first come first served, with O(1) take and give (``asyncio.Semaphore``
    in Python 3.11 walks all its waiters on every acquire: a wake releasing ten thousand requests made that
    quadratic). A wait with a deadline ends in ``TimeoutError`` once ``deadlines`` finds it past."""

    __slots__ = ("_deadlines", "_free", "_limit", "_waiters")

    def __init__(self, limit: int, deadlines: Deadlines | None = None) -> None:
        self._free = self._limit = limit
        self._deadlines = deadlines
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        return sum(1 for waiter in self._waiters if not waiter.done())

    @property
    def taken(self) -> int:
        return self._limit - self._free

    def try_take(self) -> bool:
        """A turn at once if one is free and nobody waits (no timer, no future: the usual case)."""
        if self._free and not self._waiters:
            self._free -= 1
            return True
        return False

    async def take(self, deadline: float | None = None) -> None:
        if self.try_take():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if deadline is not None and self._deadlines is not None:
            self._deadlines.watch(waiter, deadline)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.give()  # handed a turn just as it was cancelled: pass it on
            raise
        finally:
            if self._deadlines is not None:
                self._deadlines.forget(waiter)

    def give(self) -> None:
        """A turn ends: straight to the first one still waiting, else back to the free ones."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


class Pacer(Generic[C]):
    """Per upstream: kept-alive connections, the window of unproven connection attempts, requests waiting.

    A waiting request is served by whichever comes first: a connection another request gives back, or a free
    place in the window (then it opens a connection itself). Requests retried after a failure ask for a fresh
    connection and only wait for the window."""

    def __init__(self, initial: int = INITIAL_WINDOW, most: int = MOST_WINDOW,
                 deadlines: Deadlines | None = None) -> None:
        self._deadlines = deadlines
        self.idle: list[C] = []  # most recently used last
        self.window = initial
        self._most = most
        self.unproven = 0
        self.waiting = 0
        self._any: collections.deque[asyncio.Future[C | None]] = collections.deque()
        self._fresh: collections.deque[asyncio.Future[C | None]] = collections.deque()

    def try_open(self) -> bool:
        """A place in the window at once if there is one and nobody waits: the caller opens a connection,
        counted until ``Attempt.end``."""
        if self.unproven < self.window and not self._fresh and not self._any:
            self.unproven += 1
            return True
        return False

    async def connection(self, fresh: bool, deadline: float | None = None) -> C | None:
        """A connection given back while waiting, or None: a place in the window came free first and the caller
        opens a connection, counted until ``Attempt.end``. (Call when ``try_open`` said no.) ``TimeoutError``
        once past ``deadline``."""
        waiter: asyncio.Future[C | None] = asyncio.get_running_loop().create_future()
        (self._fresh if fresh else self._any).append(waiter)
        if deadline is not None and self._deadlines is not None:
            self._deadlines.watch(waiter, deadline)
        self.waiting += 1
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:  # served as it was
                given = waiter.result()  # cancelled: pass it on
                if given is None:
                    self._end(Outcome.SETTLED)
                elif not self.offer(given):
                    self.idle.append(given)
            raise
        finally:
            self.waiting -= 1
            if self._deadlines is not None:
                self._deadlines.forget(waiter)

    def attempt(self) -> Attempt[C]:
        """The place in the window ``connection`` returned None for, to be ended once."""
        return Attempt(self)

    def offer(self, conn: C) -> bool:
        """Hand a reusable connection to the first request waiting for any; False when none waits."""
        while self._any:
            waiter = self._any.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False

    def _end(self, outcome: Outcome) -> None:
        self.unproven -= 1
        if outcome is Outcome.PROVEN:
            self.window = min(self._most, self.window + 1)
        elif outcome is Outcome.LOST:
            self.window = max(1, self.window // 2)
        while self.unproven < self.window and (waiter := self._next()) is not None:
            self.unproven += 1
            waiter.set_result(None)

    def _next(self) -> asyncio.Future[C | None] | None:
        for queue in (self._fresh, self._any):
            while queue:
                waiter = queue.popleft()
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

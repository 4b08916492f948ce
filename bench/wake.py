"""Wake timing: from the moment the upstream port first accepts (the server stamps its listen() time) to the
first byte reaching a held client, and to the waiting page's ``ready`` event; then a burst of held requests, to
an upstream with a large accept backlog and to one with ``http.server``'s backlog of 5."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from dataclasses import dataclass, field

from bench.client import fetch, parse, request_bytes
from bench.servers import LARGE_BACKLOG, SMALL_BACKLOG, Layout, SignIn


@dataclass
class WakeResult:
    rounds: int
    held_ms: list[float] = field(default_factory=list)
    ready_ms: list[float] = field(default_factory=list)
    failed: int = 0

    @property
    def held_median_ms(self) -> float:
        return statistics.median(self.held_ms) if self.held_ms else float("nan")

    @property
    def ready_median_ms(self) -> float:
        return statistics.median(self.ready_ms) if self.ready_ms else float("nan")


@dataclass
class HoldResult:
    backlog: int
    requests: int
    ok: int
    failed: int
    sent_before_listen: int
    last_answer_after_listen_s: float
    statuses: dict[str, int]


async def _sse_ready(address: tuple[str, int], host: str, cookie: str) -> float:
    """Follow the waiting page's event stream; the monotonic time the ``ready`` event arrived."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(request_bytes("GET", host, "/_codehub/wake/events",
                                   {"Cookie": cookie, "Accept": "text/event-stream"}))
        while True:
            line = await asyncio.wait_for(reader.readline(), 60)
            if not line:
                raise ConnectionError("the event stream ended without ready")
            if line.startswith(b"event: ready"):
                return time.monotonic()
            if line.startswith(b"event: failed"):
                raise RuntimeError(f"the wake failed: {await reader.readline()!r}")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _stopped(sign_in: SignIn, workspace: str) -> None:
    state = await sign_in.lifecycle(workspace, "stop")
    if state.get("phase") not in ("WARM", "COLD"):
        raise RuntimeError(f"{workspace} did not stop: {state}")


async def wake_rounds(sign_in: SignIn, layout: Layout, rounds: int) -> WakeResult:
    host = layout.preview(sign_in.port, layout.wake_port, "wk")
    cookie = await sign_in.preview(host)
    result = WakeResult(rounds)
    for _ in range(rounds):
        await _stopped(sign_in, "wk")
        layout.wake_stamp.unlink(missing_ok=True)
        ready = asyncio.ensure_future(_sse_ready(sign_in.address, host, cookie))
        held = asyncio.ensure_future(fetch(sign_in.address, host, "/", {"Cookie": cookie, "Accept": "*/*"}))
        try:
            answer = await held
            ready_at = await ready
        except (OSError, RuntimeError, TimeoutError):
            result.failed += 1
            ready.cancel()
            continue
        listened = float(layout.wake_stamp.read_text())
        if answer.status != 200:
            result.failed += 1
            continue
        result.held_ms.append(1000 * (answer.first_byte - listened))
        result.ready_ms.append(1000 * (ready_at - listened))
    await _stopped(sign_in, "wk")
    return result


async def held_burst(sign_in: SignIn, layout: Layout, count: int, *, small: bool = False,
                     connect_concurrency: int = 200) -> HoldResult:
    """``count`` requests sent to a sleeping workspace whose server listens only after ``layout.hold_delay``;
    ``small``: the one whose server listens with a backlog of 5."""
    workspace, port, stamp = ("small", layout.small_port, layout.small_stamp) if small else (
        "hold", layout.hold_port, layout.hold_stamp)
    host = layout.preview(sign_in.port, port, workspace)
    cookie = await sign_in.preview(host)
    await _stopped(sign_in, workspace)
    stamp.unlink(missing_ok=True)
    raw = request_bytes("GET", host, "/", {"Cookie": cookie, "Accept": "*/*"})
    gate = asyncio.Semaphore(connect_concurrency)
    sent: list[float] = []
    answered: list[float] = []
    statuses: dict[str, int] = {}

    async def one() -> None:
        writer = None
        try:
            async with gate:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(*sign_in.address), 30)
                writer.write(raw)
                await writer.drain()
                sent.append(time.monotonic())
            data = await asyncio.wait_for(reader.read(), 120)
            answered.append(time.monotonic())
            key = str(parse(data, 0.0).status)
        except (OSError, TimeoutError, ValueError, IndexError) as exc:
            key = type(exc).__name__
        finally:
            if writer is not None:
                writer.close()
        statuses[key] = statuses.get(key, 0) + 1

    await asyncio.gather(*(one() for _ in range(count)))
    listened = float(stamp.read_text()) if stamp.exists() else float("nan")
    await _stopped(sign_in, workspace)
    ok = statuses.get("200", 0)
    return HoldResult(
        backlog=SMALL_BACKLOG if small else LARGE_BACKLOG,
        requests=count, ok=ok, failed=count - ok, sent_before_listen=sum(1 for t in sent if t < listened),
        last_answer_after_listen_s=(max(answered) - listened) if answered else float("nan"), statuses=statuses,
    )

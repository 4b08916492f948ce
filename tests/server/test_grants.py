"""How often an open exchange asks whether what let it in still does (``lane.granted``, ``lane.AnswerGrant``), on a
clock of the test's.

That it ends when the answer is no is tested end to end (tests/auth/test_security.py, "what is open ends with
what let it in"); here, what the asking costs: a streamed answer asks on a piece at most once per period."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.edge.plan import Facts, Forward, Granted
from gateway.server import lane
from gateway.server.context import Gateway

FACTS = Facts("GET", "/events", CIMultiDictProxy(CIMultiDict(Host="3000-ws.localhost")), "127.0.0.1", 0.0)
FORWARD = cast(Forward, SimpleNamespace(workspace="ws", port=3000, user="alice", headers=CIMultiDict()))
GATEWAY = cast(Gateway, SimpleNamespace(secure=False, heartbeat=SimpleNamespace(period=30.0)))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The monotonic clock ``lane`` reads (``[0]``: now), and a record of every plan it asks for."""
    now = [100.0]
    monkeypatch.setattr(lane, "time", SimpleNamespace(monotonic=lambda: now[0], time=lambda: 1e9))
    return now


@pytest.mark.parametrize(("every", "pieces_at", "asked_at"), [
    (15.0, [100.0, 110.0, 114.9], []),  # none before the first period is over
    (15.0, [115.0, 116.0, 129.9, 130.0, 200.0], [115.0, 130.0, 200.0]),
    (0.0, [100.0, 100.0, 101.0], [100.0, 100.0, 101.0]),  # a relay's heartbeat paces its own asking
])
def test_a_streamed_answer_asks_at_most_once_per_period(monkeypatch: pytest.MonkeyPatch, clock: list[float],
                                                       every: float, pieces_at: list[float],
                                                       asked_at: list[float]) -> None:
    asked: list[float] = []

    def still_granted(*_: Any) -> bool:
        asked.append(clock[0])
        return True

    monkeypatch.setattr(lane, "still_granted", still_granted)
    holds = lane.AnswerGrant(GATEWAY, FACTS, FORWARD) if every else lane.granted(GATEWAY, FACTS, FORWARD)
    for at in pieces_at:
        clock[0] = at
        assert holds()
    assert asked == asked_at


def test_the_grant_is_asked_of_the_facts_now_and_its_no_is_final_for_that_piece(monkeypatch: pytest.MonkeyPatch,
                                                                                clock: list[float]) -> None:
    seen: list[tuple[str, Granted, object, float]] = []

    def still_granted(facts: Facts, was: Granted, world: object, now: float) -> bool:
        seen.append((facts.target, was, world, now))
        return False

    monkeypatch.setattr(lane, "still_granted", still_granted)
    assert not lane.granted(GATEWAY, FACTS, FORWARD)()
    assert seen == [("/events", Granted("ws", 3000, "alice", None), GATEWAY, 1e9)]

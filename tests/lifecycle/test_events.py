"""The lifecycle event hub (``Runtime.events()``): every subscriber gets every event published after it subscribed,
in order; one that falls behind loses its oldest events, so a publish never waits and never fails (the runtime
publishes in the middle of a wake, and a progress stream no one reads must not break it); a closed subscription
gets nothing more."""

from __future__ import annotations

from gateway.lifecycle import Event, EventHub, Phase, Subscription


def event(n: int) -> Event:
    return Event("ws", Phase.STARTING, f"step {n}")


def queued(subscription: Subscription) -> list[str]:
    return [subscription.queue.get_nowait().message for _ in range(subscription.queue.qsize())]


def test_each_subscriber_gets_every_event_from_its_subscription_on() -> None:
    hub = EventHub()
    hub.publish(event(0))
    with hub.subscribe() as first, hub.subscribe() as second:
        hub.publish(event(1))
        hub.publish(event(2))
        assert queued(first) == queued(second) == ["step 1", "step 2"]


def test_a_subscriber_that_falls_behind_loses_its_oldest_events() -> None:
    hub = EventHub(maxsize=3)
    with hub.subscribe() as slow, hub.subscribe() as keeping_up:
        for n in range(5):
            hub.publish(event(n))
            assert queued(keeping_up) == [f"step {n}"]
        assert queued(slow) == ["step 2", "step 3", "step 4"]


def test_a_closed_subscription_gets_nothing_more() -> None:
    hub = EventHub()
    with hub.subscribe() as left:
        hub.publish(event(1))
    closed = hub.subscribe()
    closed.close()
    hub.publish(event(2))
    assert queued(left) == ["step 1"]
    assert queued(closed) == []


async def test_a_subscription_is_read_with_async_for() -> None:
    hub = EventHub()
    with hub.subscribe() as subscription:
        hub.publish(event(1))
        hub.publish(event(2))
        seen = []
        async for got in subscription:
            seen.append(got.message)
            if len(seen) == 2:
                break
    assert seen == ["step 1", "step 2"]

"""Routing-policy state in a real Redis: transitions, events, the router cache, outages."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from services.policy_state import (
    DEFAULT_POLICY,
    PolicyCache,
    PolicySnapshot,
    PolicyStore,
    SupervisorKeys,
    TransitionConflict,
    route_fraction,
)
from services.redis_setup import EmbeddedRedis, RedisSettings, create_async_client


@pytest.fixture
def keys():
    return SupervisorKeys(prefix=f"test-{uuid.uuid4().hex[:8]}:")


def test_route_fraction_is_deterministic_and_uniform():
    fractions = [route_fraction(f"req-{i}") for i in range(20_000)]

    assert route_fraction("req-7") == fractions[7]
    assert all(0.0 <= value < 1.0 for value in fractions)
    assert sum(value < 0.25 for value in fractions) / len(fractions) == pytest.approx(0.25, abs=0.02)


def test_snapshot_weight_splits_requests():
    canary = PolicySnapshot(state="canary", moe_weight=0.25, version=3)
    request_ids = [f"r{i}" for i in range(4000)]

    to_moe = [canary.sends_to_moe(request_id) for request_id in request_ids]

    assert sum(to_moe) / len(to_moe) == pytest.approx(0.25, abs=0.03)
    assert to_moe == [canary.sends_to_moe(request_id) for request_id in request_ids]
    assert all(PolicySnapshot(moe_weight=1.0).sends_to_moe(r) for r in request_ids[:100])
    assert not any(PolicySnapshot(state="dense", moe_weight=0.0).sends_to_moe(r) for r in request_ids[:100])


async def test_missing_state_reads_as_default(redis, keys):
    store = PolicyStore(redis, keys)

    assert await store.read() == DEFAULT_POLICY


async def test_transition_stores_state_and_event(redis, keys):
    store = PolicyStore(redis, keys)
    start = await store.read()

    updated, event = await store.transition(start, "dense", 0.0, "automatic", "agreement 0.7 < 0.9", now=100.0,
                                            metrics={"agreement": {"value": 0.7}})

    stored = await store.read()
    assert stored == updated
    assert stored.state == "dense"
    assert stored.version == 1
    assert stored.state_since == 100.0
    events = await store.events(10)
    assert len(events) == 1
    assert events[0]["actor"] == "automatic"
    assert events[0]["from"] == "moe"
    assert events[0]["to"] == "dense"
    assert events[0]["reason"] == "agreement 0.7 < 0.9"
    assert events[0]["metrics"] == {"agreement": {"value": 0.7}}
    assert events[0]["policy_version"] == 1
    assert event["to"] == "dense"


async def test_transition_from_stale_version_conflicts(redis, keys):
    store = PolicyStore(redis, keys)
    start = await store.read()
    await store.transition(start, "dense", 0.0, "api", "first writer", now=1.0)

    with pytest.raises(TransitionConflict, match="after version 0"):
        await store.transition(start, "moe", 1.0, "automatic", "second writer", now=2.0)

    assert (await store.read()).state == "dense"
    assert len(await store.events(10)) == 1


async def test_transition_publishes_version(redis, keys):
    store = PolicyStore(redis, keys)
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(keys.channel)

    await store.transition(await store.read(), "canary", 0.25, "api", "test", now=1.0)

    message = None
    for _ in range(5):  # the first reads may return the subscribe confirmation as None
        message = message or await pubsub.get_message(timeout=1.0)
    assert message is not None
    assert message["data"] == b"1"
    await pubsub.aclose()


async def test_cache_follows_notification(redis, keys):
    store = PolicyStore(redis, keys)
    # A poll interval far longer than the test shows that the notification did the work.
    cache = PolicyCache(redis, keys, poll_interval_s=60.0)
    cache.start()
    try:
        await _wait_for(lambda: cache.last_refresh is not None)

        await store.transition(await store.read(), "canary", 0.5, "api", "test", now=1.0)

        await _wait_for(lambda: cache.snapshot.version == 1)
    finally:
        await cache.stop()
    assert cache.snapshot.state == "canary"
    assert cache.snapshot.moe_weight == 0.5


async def test_cache_poll_catches_missed_notification(redis, keys):
    cache = PolicyCache(redis, keys, poll_interval_s=0.2)
    cache.start()
    try:
        await _wait_for(lambda: cache.last_refresh is not None)

        # Written without a notification, as if the message were lost.
        await redis.hset(keys.state, mapping=PolicySnapshot(state="dense", moe_weight=0.0, version=5).to_fields())

        await _wait_for(lambda: cache.snapshot.version == 5)
    finally:
        await cache.stop()
    assert cache.snapshot.state == "dense"


async def test_cache_survives_redis_restart_on_same_port(monkeypatch):
    server = EmbeddedRedis().start()
    port = server.port
    keys = SupervisorKeys(prefix="outage:")
    client = create_async_client(RedisSettings(url=server.url, socket_timeout_s=1.0, connect_timeout_s=0.5,
                                               block_ms=100))
    cache = PolicyCache(client, keys, poll_interval_s=0.2)
    try:
        await PolicyStore(client, keys).transition(DEFAULT_POLICY, "canary", 0.5, "api", "before outage", now=1.0)
        cache.start()
        await _wait_for(lambda: cache.snapshot.version == 1)

        server.stop()
        with pytest.raises(Exception):
            await client.ping()
        await asyncio.sleep(0.5)
        assert cache.snapshot.version == 1  # the last policy read stays in force

        # The restarted server must listen where the client points: reuse the old port.
        monkeypatch.setattr("services.redis_setup._free_port", lambda: port)
        server = EmbeddedRedis().start()
        await client.ping()
        await client.hset(keys.state, mapping=PolicySnapshot(state="dense", moe_weight=0.0, version=7).to_fields())
        await _wait_for(lambda: cache.snapshot.version == 7)
        assert cache.snapshot.state == "dense"
    finally:
        await cache.stop()
        await client.aclose()
        server.stop()


async def _wait_for(condition, timeout_s: float = 10.0) -> None:
    """Poll `condition` until it holds; the timeout only bounds a broken run on a loaded machine."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.02)

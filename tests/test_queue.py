"""The queue against a real redis-server: producer bound, finishing script, dead letters, reclaim.

Tests here never reach the router: their entries fail before routing or are only
reclaimed. Tests that route through the running application are in test_queue_worker.py.
"""

import uuid

import msgpack
import numpy as np
import pytest
from pydantic import ValidationError

from services.codec import encode_tensor
from services.queue import (
    QueueFullError,
    QueueStreams,
    ensure_group,
    finish_entry,
    parse_autoclaim_reply,
    submit_requests,
)
from services.queue_consumer import QueueConsumer
from services.settings import QueueSettings


@pytest.fixture
def streams():
    """Streams under a prefix of their own, so tests never see each other's entries."""
    return QueueStreams.from_prefix(f"test-{uuid.uuid4().hex[:8]}:")


async def route_never_called(document):
    raise AssertionError(f"the router must not be called for {document!r}")


def make_consumer(client, streams, name="consumer-a", route=route_never_called, max_body_bytes=4096, **config):
    settings = {"batch_size": 16, "claim_idle_ms": 60_000, "route_timeout_s": 5.0, **config}
    return QueueConsumer(client, streams, route, name, QueueSettings(**settings), block_ms=50,
                         max_body_bytes=max_body_bytes)


def document(index: int, prefix: str = "req") -> dict:
    return {"inputs": encode_tensor(np.full((1, 64), index, dtype=np.float32)), "request_id": f"{prefix}-{index}"}


async def read_as(client, streams, consumer: str, count: int = 100):
    """Deliver new entries to `consumer` without processing them, as a consumer that then dies."""
    replies = await client.xreadgroup(streams.group, consumer, {streams.requests: ">"}, count=count)
    return [entry_id.decode() for _, entries in replies for entry_id, _ in entries]


async def age_pending(client, streams, consumer: str, entry_ids, idle_ms: int = 120_000):
    """Make pending entries look idle for `idle_ms`; JUSTID keeps their delivery counts."""
    await client.xclaim(streams.requests, streams.group, consumer, 0, list(entry_ids), idle=idle_ms, justid=True)


async def dead_entries(client, streams):
    entries = await client.xrange(streams.dead)
    return [{key.decode(): value for key, value in fields.items()} for _, fields in entries]


# --- XAUTOCLAIM reply parsing ------------------------------------------------------------


def test_autoclaim_reply_redis_6_with_nil_entries():
    reply = [b"0-0", [None, [b"5-0", [b"payload", b"x", b"request_id", b"r5"]], None]]

    page = parse_autoclaim_reply(reply)

    assert page.next_cursor == "0-0"
    assert page.entries == [("5-0", {b"payload": b"x", b"request_id": b"r5"})]
    assert page.nil_entries == 2
    assert page.deleted_ids == []


def test_autoclaim_reply_redis_7_with_deleted_ids():
    reply = [b"9-0", [[b"5-0", [b"payload", b"x"]]], [b"3-0", b"4-0"]]

    page = parse_autoclaim_reply(reply)

    assert page.next_cursor == "9-0"
    assert page.entries == [("5-0", {b"payload": b"x"})]
    assert page.nil_entries == 0
    assert page.deleted_ids == ["3-0", "4-0"]


def test_autoclaim_reply_parsed_by_redis_py():
    reply = [b"0-0", [(None, None), (b"5-0", {b"payload": b"x"})], []]

    page = parse_autoclaim_reply(reply)

    assert page.entries == [("5-0", {b"payload": b"x"})]
    assert page.nil_entries == 1
    assert page.deleted_ids == []


def test_autoclaim_reply_of_wrong_length_raises():
    with pytest.raises(ValueError, match="4 elements, expected 2 or 3"):
        parse_autoclaim_reply([b"0-0", [], [], []])


def test_queue_settings_reject_claim_before_timeout():
    with pytest.raises(ValidationError, match=r"claim_idle_ms \(5000 ms\) must be longer than route_timeout_s"):
        QueueSettings(claim_idle_ms=5000, route_timeout_s=5.0)


# --- producer ------------------------------------------------------------------------------


async def test_submit_full_stream_raises_without_trimming(redis_client, streams):
    documents = [document(i) for i in range(5)]
    now = [0.0]

    async def advance(seconds):
        now[0] += seconds

    with pytest.raises(QueueFullError, match="max length of 3 entries"):
        await submit_requests(redis_client, streams, documents, max_length=3, full_timeout_s=1.0,
                              sleep=advance, clock=lambda: now[0])

    entries = await redis_client.xrange(streams.requests)
    assert len(entries) == 3
    assert [fields[b"request_id"] for _, fields in entries] == [b"req-0", b"req-1", b"req-2"]
    assert msgpack.unpackb(entries[0][1][b"payload"], raw=False)["request_id"] == "req-0"
    assert now[0] >= 1.0


async def test_submit_backs_off_until_space(redis_client, streams):
    documents = [document(i) for i in range(5)]
    waits = []

    async def consume_two(seconds):
        # Plays the part of a worker that finishes the two oldest entries while the producer waits.
        waits.append(seconds)
        oldest = await redis_client.xrange(streams.requests, count=2)
        await redis_client.xdel(streams.requests, *[entry_id for entry_id, _ in oldest])

    entry_ids = await submit_requests(redis_client, streams, documents, max_length=3, sleep=consume_two)

    assert len(entry_ids) == 5
    assert waits == [0.05]
    remaining = await redis_client.xrange(streams.requests)
    assert [fields[b"request_id"] for _, fields in remaining] == [b"req-2", b"req-3", b"req-4"]


async def test_submit_rejects_document_without_request_id(redis_client, streams):
    with pytest.raises(ValueError, match=r"documents\[1\] has no string request_id"):
        await submit_requests(redis_client, streams, [document(0), {"inputs": [[0.0]]}], max_length=10)

    assert await redis_client.xlen(streams.requests) == 0


# --- finishing script ----------------------------------------------------------------------


async def test_finish_entry_writes_once_per_entry(redis_client, streams):
    await ensure_group(redis_client, streams)
    await submit_requests(redis_client, streams, [document(0)], max_length=10)
    (entry_id,) = await read_as(redis_client, streams, "consumer-a")
    fields = {"request_id": "req-0", "payload": b"answer"}

    first = await finish_entry(redis_client, streams, entry_id, streams.results, fields, 1000)
    second = await finish_entry(redis_client, streams, entry_id, streams.results, fields, 1000)

    assert first is not None
    assert second is None
    assert await redis_client.xlen(streams.results) == 1
    assert await redis_client.xlen(streams.requests) == 0
    pending = await redis_client.xpending(streams.requests, streams.group)
    assert pending["pending"] == 0


async def test_ensure_group_is_idempotent(redis_client, streams):
    assert await ensure_group(redis_client, streams) is True
    assert await ensure_group(redis_client, streams) is False


# --- dead letters without routing ----------------------------------------------------------


async def test_undecodable_entries_dead_lettered_at_once(redis_client, streams):
    await ensure_group(redis_client, streams)
    await redis_client.xadd(streams.requests, {"payload": b"\xc1 not msgpack", "request_id": "bad-bytes"})
    await redis_client.xadd(streams.requests, {"payload": b"x" * 5000, "request_id": "too-big"})
    await redis_client.xadd(streams.requests, {"request_id": "no-payload"})
    consumer = make_consumer(redis_client, streams, max_body_bytes=4096)

    assert await consumer.read_once() == 3

    dead = {entry["request_id"].decode(): entry for entry in await dead_entries(redis_client, streams)}
    assert set(dead) == {"bad-bytes", "too-big", "no-payload"}
    codes = {request_id: msgpack.unpackb(entry["error"], raw=False)["error"]["code"]
             for request_id, entry in dead.items()}
    assert codes == {"bad-bytes": "malformed_body", "too-big": "body_too_large", "no-payload": "missing_field"}
    assert all(entry["reason"] == b"invalid_request" for entry in dead.values())
    assert all(entry["deliveries"] == b"1" for entry in dead.values())
    assert dead["bad-bytes"]["payload"] == b"\xc1 not msgpack"
    assert await redis_client.xlen(streams.requests) == 0
    assert (await redis_client.xpending(streams.requests, streams.group))["pending"] == 0


async def test_trimmed_pending_entries_dead_lettered_as_lost(redis_client, streams):
    await ensure_group(redis_client, streams)
    await submit_requests(redis_client, streams, [document(i) for i in range(4)], max_length=10)
    delivered = await read_as(redis_client, streams, "dead-consumer")
    await age_pending(redis_client, streams, "dead-consumer", delivered)
    await redis_client.xdel(streams.requests, delivered[1])
    await redis_client.xtrim(streams.requests, minid=delivered[3], approximate=False)  # removes entries 0 and 2 as well
    survivor_payload = (await redis_client.xrange(streams.requests))[0][1][b"payload"]
    consumer = make_consumer(redis_client, streams, max_deliveries=1)

    claimed = await consumer.reclaim_once()

    assert claimed == 4
    dead = await dead_entries(redis_client, streams)
    lost = sorted(entry["stream_id"].decode() for entry in dead if entry["reason"] == b"payload_lost")
    assert lost == sorted(delivered[:3])
    assert all("payload" not in entry for entry in dead if entry["reason"] == b"payload_lost")
    # The surviving entry was delivered twice, more than max_deliveries=1, and keeps its payload.
    (over_limit,) = [entry for entry in dead if entry["reason"] == b"max_deliveries"]
    assert over_limit["stream_id"].decode() == delivered[3]
    assert over_limit["deliveries"] == b"2"
    assert over_limit["payload"] == survivor_payload
    assert (await redis_client.xpending(streams.requests, streams.group))["pending"] == 0
    assert await consumer.reclaim_once() == 0


async def test_reclaim_follows_cursor_across_pages(redis_client, streams):
    await ensure_group(redis_client, streams)
    await submit_requests(redis_client, streams, [document(i) for i in range(7)], max_length=100)
    delivered = await read_as(redis_client, streams, "dead-consumer")
    await age_pending(redis_client, streams, "dead-consumer", delivered)
    await redis_client.xtrim(streams.requests, maxlen=0, approximate=False)
    consumer = make_consumer(redis_client, streams, batch_size=2)

    assert await consumer.reclaim_once() == 7

    assert await redis_client.xlen(streams.dead) == 7
    assert (await redis_client.xpending(streams.requests, streams.group))["pending"] == 0

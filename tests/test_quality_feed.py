"""Router-side quality records, shadow evaluation and feedback parsing, against a real Redis."""

from __future__ import annotations

import asyncio
import json
import random
import uuid

import numpy as np
import pytest
import torch

from experts.models import MLP, MLPSpec
from services.codec import RequestError
from services.policy_state import SupervisorKeys
from services.quality_feed import QualityRecorder, ShadowEvaluator, decode_quality_entry
from services.redis_setup import RedisSettings, create_async_client
from services.router_supervision import parse_feedback


@pytest.fixture
def keys():
    return SupervisorKeys(prefix=f"test-{uuid.uuid4().hex[:8]}:")


@pytest.fixture
def recorder(redis, keys):
    return QualityRecorder(redis, keys, flush_interval_s=0.5, prediction_ttl_s=60, replica="r1")


async def read_entries(redis, keys) -> list[tuple[int, object]]:
    return [decode_quality_entry(fields) for _, fields in await redis.xrange(keys.quality)]


async def test_flush_writes_one_entry_per_version(recorder, redis, keys):
    recorder.record_request("a", 3, ["top_p", "expert_timeout"], [0.9, 0.8], [1, 2], 0.01)
    recorder.record_request("b", 3, ["low_confidence"], [0.2], [4], 0.02)
    recorder.record_request("c", 4, ["supervisor"], [0.0], [5], 0.03)

    written = await recorder.flush()

    entries = dict(await read_entries(redis, keys))
    assert written == 2
    assert entries[3].requests == 2
    assert entries[3].moe_requests == 1
    assert entries[3].expert_rows == 2
    assert entries[3].expert_timeouts == 1
    assert entries[3].fallbacks == {"expert_timeout": 1, "low_confidence": 1}
    assert entries[3].confidence_rows == 3
    assert entries[4].fallbacks == {"supervisor": 1}
    assert entries[4].confidence_rows == 0
    assert recorder.counts == {}


async def test_flush_failure_keeps_counts(keys):
    dead = create_async_client(RedisSettings(url="redis://127.0.0.1:1/0", socket_timeout_s=0.5,
                                             connect_timeout_s=0.2, block_ms=100))
    recorder = QualityRecorder(dead, keys, flush_interval_s=0.5, prediction_ttl_s=60)
    recorder.record_request("a", 1, ["top_p"], [0.9], [1], 0.01)

    with pytest.raises(Exception):
        await recorder.flush()

    assert recorder.counts[1].requests == 1
    assert "a" in recorder.predictions
    await dead.aclose()


async def test_prediction_lookup_returns_once(recorder):
    recorder.record_request("req-1", 7, ["top_p", "capacity"], [0.9, 0.9], [3, 4], 0.01)
    await recorder.flush()

    first = await recorder.lookup_prediction("req-1")
    second = await recorder.lookup_prediction("req-1")

    assert first == {"predictions": [3, 4], "moe": [True, False], "version": 7}
    assert second is None


def tiny_dense() -> MLP:
    torch.manual_seed(0)
    return MLP(MLPSpec(in_features=4, hidden=(8,), out_features=3)).eval()


def dense_caller(model: MLP):
    async def call(rows: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch.softmax(model(torch.from_numpy(rows)), dim=-1).numpy()

    return call


async def test_shadow_records_agreement(recorder):
    model = tiny_dense()
    rows = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    with torch.inference_mode():
        dense_predictions = model(torch.from_numpy(rows)).argmax(dim=-1).tolist()
    moe_predictions = list(dense_predictions)
    moe_predictions[0] = (moe_predictions[0] + 1) % 3  # one disagreement among the mixture rows
    reasons = ["top_p"] * 5 + ["capacity"]  # the dense-answered row is not compared
    shadow = ShadowEvaluator(dense_caller(model), recorder, fraction=1.0, max_in_flight=4, timeout_s=5.0)

    started = shadow.maybe_shadow("req", rows, moe_predictions, reasons, policy_version=2)
    await shadow.drain()

    assert started is True
    assert recorder.counts[2].shadow_rows == 5
    assert recorder.counts[2].shadow_agreed == 4


async def test_shadow_skips_dense_only_requests(recorder):
    shadow = ShadowEvaluator(dense_caller(tiny_dense()), recorder, fraction=1.0, max_in_flight=4, timeout_s=5.0)

    started = shadow.maybe_shadow("req", np.zeros((1, 4), np.float32), [0], ["low_confidence"], policy_version=0)

    assert started is False
    assert recorder.counts == {}


async def test_shadow_fraction_samples_requests(recorder):
    shadow = ShadowEvaluator(dense_caller(tiny_dense()), recorder, fraction=0.3, max_in_flight=1000, timeout_s=5.0,
                             rng=random.Random(1))

    started = [shadow.maybe_shadow(f"r{i}", np.zeros((1, 4), np.float32), [0], ["top_p"], 0) for i in range(1000)]
    await shadow.drain()

    assert sum(started) / len(started) == pytest.approx(0.3, abs=0.05)
    assert recorder.counts[0].shadow_rows == sum(started)


async def test_shadow_in_flight_limit_skips(recorder):
    release = asyncio.Event()

    async def slow_dense(rows: np.ndarray) -> np.ndarray:
        await release.wait()
        return np.ones((len(rows), 3), np.float32) / 3

    shadow = ShadowEvaluator(slow_dense, recorder, fraction=1.0, max_in_flight=2, timeout_s=5.0)
    started = [shadow.maybe_shadow(f"r{i}", np.zeros((1, 4), np.float32), [0], ["top_p"], 0) for i in range(5)]
    release.set()
    await shadow.drain()

    assert started == [True, True, False, False, False]
    assert shadow.skipped == 3


async def test_shadow_batch_leaves_when_half_the_budget_waits(recorder):
    calls: list[int] = []

    async def counting_dense(rows: np.ndarray) -> np.ndarray:
        calls.append(len(rows))
        return np.ones((len(rows), 3), np.float32) / 3

    shadow = ShadowEvaluator(counting_dense, recorder, fraction=1.0, max_in_flight=8, timeout_s=5.0,
                             batch_window_s=60.0)
    for i in range(5):
        shadow.maybe_shadow(f"r{i}", np.zeros((1, 4), np.float32), [0], ["top_p"], 0)
    await asyncio.sleep(0.05)  # far less than the window

    assert calls == [4]  # the fifth request waits for the window, or for the next four
    await shadow.drain()
    assert calls == [4, 1]
    assert recorder.counts[0].shadow_rows == 5


async def test_failed_shadow_call_is_not_counted(recorder):
    async def failing_dense(rows: np.ndarray) -> np.ndarray:
        raise RuntimeError("dense is down")

    shadow = ShadowEvaluator(failing_dense, recorder, fraction=1.0, max_in_flight=2, timeout_s=5.0)
    shadow.maybe_shadow("r", np.zeros((1, 4), np.float32), [0], ["top_p"], 0)
    await shadow.drain()

    assert recorder.counts == {}


def test_feedback_accepts_single_label():
    assert parse_feedback(b'{"request_id": "abc", "label": 3}', "application/json", 10) == ("abc", [3])


def test_feedback_accepts_label_per_row():
    assert parse_feedback(json.dumps({"request_id": "abc", "label": [1, 2]}).encode(), None, 10) == ("abc", [1, 2])


@pytest.mark.parametrize(("body", "status", "field"), [
    (b"[1, 2]", 400, None),
    (b"{broken", 400, None),
    (b'{"label": 3}', 422, "request_id"),
    (b'{"request_id": "abc", "label": 10}', 422, "label"),
    (b'{"request_id": "abc", "label": true}', 422, "label"),
    (b'{"request_id": "abc", "label": []}', 422, "label"),
    (b'{"request_id": 5, "label": "x"}', 422, "request_id,label"),
])
def test_feedback_rejects_invalid_body(body, status, field):
    with pytest.raises(RequestError) as raised:
        parse_feedback(body, "application/json", 10)

    assert raised.value.status == status
    assert raised.value.field == field


async def test_shadow_rows_ride_along(recorder):
    model = tiny_dense()
    own_calls = []

    async def counting_dense(rows):
        own_calls.append(len(rows))
        return await dense_caller(model)(rows)

    rows = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    with torch.inference_mode():
        dense_predictions = model(torch.from_numpy(rows)).argmax(dim=-1).tolist()
    shadow = ShadowEvaluator(counting_dense, recorder, fraction=1.0, max_in_flight=8, timeout_s=5.0,
                             batch_window_s=0.05)
    shadow.maybe_shadow("a", rows[:2], dense_predictions[:2], ["top_p", "top_p"], policy_version=1)
    shadow.maybe_shadow("b", rows[2:], [(dense_predictions[2] + 1) % 3], ["top_p"], policy_version=1)

    pending = shadow.take_pending()
    assert pending is not None
    ride_rows, deliver = pending
    np.testing.assert_array_equal(ride_rows, rows)
    assert shadow._requests_in_flight == 2
    deliver(await dense_caller(model)(ride_rows), None)
    deliver(await dense_caller(model)(ride_rows), None)  # a second delivery is ignored
    await asyncio.sleep(0.1)  # past the window: nothing is left to flush

    assert own_calls == []
    assert shadow.take_pending() is None
    assert shadow._requests_in_flight == 0
    assert (recorder.counts[1].shadow_rows, recorder.counts[1].shadow_agreed) == (3, 2)


async def test_failed_ride_along_is_not_counted(recorder):
    shadow = ShadowEvaluator(dense_caller(tiny_dense()), recorder, fraction=1.0, max_in_flight=8, timeout_s=5.0)
    shadow.maybe_shadow("a", np.zeros((1, 4), np.float32), [0], ["top_p"], policy_version=0)

    _, deliver = shadow.take_pending()
    deliver(None, RuntimeError("dense down"))

    assert recorder.counts == {}
    assert shadow._requests_in_flight == 0


async def test_escalated_rows_count_as_expert_rows(recorder):
    recorder.record_request("a", 1, ["top_p", "escalated", "expert_error"], [0.9, 0.8, 0.7], [1, 2, 3], 0.01)

    counts = recorder.counts[1]
    # The error rate's denominator includes the escalated row, whose expert call succeeded.
    assert counts.expert_rows == 3
    assert counts.expert_errors == 1
    assert counts.fallbacks == {"escalated": 1, "expert_error": 1}
    assert counts.moe_requests == 1


async def test_ride_along_recording_error_stays_inside(recorder):
    class BrokenGauge:
        def set(self, value):
            raise RuntimeError("metrics backend down")

    shadow = ShadowEvaluator(dense_caller(tiny_dense()), recorder, fraction=1.0, max_in_flight=8, timeout_s=5.0,
                             agreement_gauge=BrokenGauge())
    shadow.maybe_shadow("a", np.zeros((1, 4), np.float32), [0], ["top_p"], policy_version=0)

    _, deliver = shadow.take_pending()
    deliver(np.array([[1.0, 0.0, 0.0]], np.float32), None)  # must not raise into the dispatch

    assert shadow._requests_in_flight == 0
    assert recorder.counts[0].shadow_rows == 1

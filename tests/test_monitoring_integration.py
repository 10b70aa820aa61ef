"""Metrics endpoint and replica logs of the running application, after real traffic.

Uses the session's `served_app`. Other tests send traffic to the same application, so
counters are compared as increases over a scrape taken before this test's traffic.
Ray exports application metrics every few seconds, so every check polls with a
deadline.
"""

import asyncio
import glob
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitoring.logging import configure_logging, get_logger
from monitoring.metrics import EXPORT_PREFIX
from services.client import predict_many

pytestmark = pytest.mark.slow

EXPORT_DEADLINE_S = 90.0
LOG_DEADLINE_S = 30.0

# Metrics that the documented HTTP contract promises to operators.
OPERATOR_METRICS = (
    "switchyard_requests_total",
    "switchyard_expert_calls_total",
    "switchyard_experts_per_request",
    "switchyard_gate_confidence",
    "switchyard_fallbacks_total",
    "switchyard_request_duration_seconds",
    "switchyard_shadow_agreement_ratio",
    "switchyard_supervisor_moe_weight_ratio",
    "switchyard_queue_messages_total",
)
# Route fields that the canonical request line repeats from the response.
ROUTE_FIELDS = ("path", "reason", "experts", "weights", "policy_version", "k", "row_reasons", "gate_scores",
                "confidence")
UNGATED_REASONS = {"requested", "supervisor", "router_error"}

Samples = list[tuple[str, dict[str, str], float]]


def scrape(url: str) -> Samples:
    text = httpx.get(url, timeout=10.0).text
    return [(sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(text) for sample in family.samples]


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of one exported series whose labels include `labels`."""
    series = EXPORT_PREFIX + name
    return sum(value for sample_name, sample_labels, value in samples
               if sample_name == series and all(sample_labels.get(k) == v for k, v in labels.items()))


def poll(url: str, ready: Callable[[Samples], bool]) -> Samples:
    """Scrape until `ready(samples)` is true or the deadline passes, and return the last scrape."""
    deadline = time.monotonic() + EXPORT_DEADLINE_S
    samples = scrape(url)
    while not ready(samples) and time.monotonic() < deadline:
        time.sleep(2.0)
        samples = scrape(url)
    return samples


def send(url: str, rows: np.ndarray, path: str = "auto", prefix: str = "metrics") -> list[dict]:
    results = asyncio.run(predict_many(url, rows, concurrency=8, path=path,
                                       request_id_prefix=f"{prefix}-{uuid.uuid4().hex[:8]}"))
    failed = [result.error for result in results if not result.ok]
    assert failed == [], failed
    return [result.body for result in results]


def test_http_traffic_shows_router_metrics(served_app, trained_bundle, digits):
    url = served_app.metrics_url
    before = scrape(url)

    auto = send(served_app.http_url, digits.test.x[:60])
    dense = send(served_app.http_url, digits.test.x[60:80], path="dense")

    row_reasons = [reason for body in auto for reason in body["route"]["row_reasons"]]
    moe_requests = sum(body["route"]["path"] == "moe" for body in auto)
    moe_rows = row_reasons.count("top_p")
    gated_rows = sum(reason not in UNGATED_REASONS for reason in row_reasons)
    expert_rows = sum(k for body in auto for k, reason in zip(body["route"]["k"], body["route"]["row_reasons"])
                      if reason == "top_p")
    assert len(dense) == 20

    def increase(samples: Samples, name: str, **labels: str) -> float:
        return total(samples, name, **labels) - total(before, name, **labels)

    expected = {
        ("switchyard_requests_total", (("path", "moe"),)): moe_requests,
        ("switchyard_requests_total", (("path", "dense"), ("reason", "requested"))): 20,
        ("switchyard_fallbacks_total", (("reason", "requested"),)): 20,
        ("switchyard_request_duration_seconds_count", ()): 80,
        ("switchyard_experts_per_request_count", ()): moe_rows,
        ("switchyard_gate_confidence_count", ()): gated_rows,
        ("switchyard_expert_rows_total", ()): expert_rows,
        ("switchyard_expert_calls_total", ()): 1,
        ("switchyard_model_batch_size_count", (("model", "dense"),)): 1,
    }

    def ready(samples: Samples) -> bool:
        return all(increase(samples, name, **dict(labels)) >= count for (name, labels), count in expected.items())

    after = poll(url, ready)

    for (name, labels), count in expected.items():
        assert increase(after, name, **dict(labels)) >= count, f"{name}{dict(labels)} rose by less than {count}"
    num_experts = len(trained_bundle.manifest["experts"])
    mean_k = (increase(after, "switchyard_experts_per_request_sum")
              / increase(after, "switchyard_experts_per_request_count"))
    assert 1.0 <= mean_k <= num_experts
    mean_confidence = (increase(after, "switchyard_gate_confidence_sum")
                       / increase(after, "switchyard_gate_confidence_count"))
    assert 0.0 < mean_confidence <= 1.0
    mean_latency_s = (increase(after, "switchyard_request_duration_seconds_sum")
                      / increase(after, "switchyard_request_duration_seconds_count"))
    assert 0.0 < mean_latency_s < 10.0
    assert increase(after, "switchyard_expert_call_duration_seconds_sum") > 0.0
    assert increase(after, "switchyard_model_inference_seconds_sum", model="dense") > 0.0
    expert_labels = {labels["expert"] for name, labels, _ in after
                     if name == EXPORT_PREFIX + "switchyard_expert_calls_total"}
    assert expert_labels and all(label.isdigit() for label in expert_labels)


def test_queue_traffic_exports_operator_metrics(served_app, digits):
    """Every operator metric is exported after traffic through HTTP and the Redis queue."""
    from services.queue import QueueStreams, submit_and_wait
    from services.redis_setup import create_async_client

    url = served_app.metrics_url
    before = scrape(url)
    send(served_app.http_url, digits.test.x[:20])

    async def through_queue():
        client = create_async_client(served_app.settings.redis)
        try:
            streams = QueueStreams.from_prefix(served_app.settings.redis.key_prefix)
            return await submit_and_wait(client, streams, digits.test.x[:20], labels=digits.test.y[:20], timeout_s=60)
        finally:
            await client.aclose()

    report = asyncio.run(through_queue())
    assert report.answered == 20

    def queue_increase(samples: Samples) -> float:
        return total(samples, "switchyard_queue_messages_total") - total(before, "switchyard_queue_messages_total")

    def exported(samples: Samples) -> set[str]:
        names = {name for name, _, _ in samples}
        return {metric for metric in OPERATOR_METRICS
                if names & {EXPORT_PREFIX + metric, f"{EXPORT_PREFIX}{metric}_count"}}

    after = poll(url, lambda samples: exported(samples) == set(OPERATOR_METRICS) and queue_increase(samples) >= 20)

    assert set(OPERATOR_METRICS) - exported(after) == set()
    assert queue_increase(after) >= 20
    for gauge in ("switchyard_shadow_agreement_ratio", "switchyard_supervisor_moe_weight_ratio"):
        values = [value for name, _, value in after if name == EXPORT_PREFIX + gauge]
        assert values and all(0.0 <= value <= 1.0 for value in values), (gauge, values)


def ray_log_lines(needle: str) -> list[dict]:
    """JSON lines containing `needle` from every worker's stderr and stdout of this Ray session."""
    import ray

    # NOTE: `_global_node` is private Ray API (checked with Ray 2.60), because the public
    # runtime context has no logs path.
    logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path())
    lines = []
    for path in glob.glob(str(logs_dir / "worker-*")):
        with open(path, errors="replace") as log_file:
            lines += [json.loads(line) for line in log_file if needle in line and line.startswith("{")]
    return lines


async def post_concurrently(url: str, rows: np.ndarray, prefix: str) -> list[dict]:
    """Send every row as its own JSON request, all in flight at once. Odd rows ask for dense."""
    async with httpx.AsyncClient(timeout=30.0) as client:
        async def post(index: int) -> dict:
            body = {"inputs": rows[index : index + 1].tolist(), "request_id": f"{prefix}-{index}"}
            if index % 2:
                body["path"] = "dense"
            response = await client.post(f"{url}/v1/predict", json=body)
            assert response.status_code == 200, response.text
            return response.json()

        return await asyncio.gather(*(post(index) for index in range(len(rows))))


def test_request_lines_carry_own_route_record(served_app, digits):
    """Concurrent requests each get exactly one canonical line with their own id and route."""
    prefix = f"logcheck-{uuid.uuid4().hex[:8]}"
    responses = asyncio.run(post_concurrently(served_app.http_url, digits.test.x[:40], prefix))
    by_id = {response["request_id"]: response for response in responses}
    assert len(by_id) == 40

    deadline = time.monotonic() + LOG_DEADLINE_S
    lines = [line for line in ray_log_lines(prefix) if line.get("event") == "request"]
    while len(lines) < len(by_id) and time.monotonic() < deadline:
        time.sleep(1.0)
        lines = [line for line in ray_log_lines(prefix) if line.get("event") == "request"]

    logged_ids = [line["request_id"] for line in lines]
    assert sorted(logged_ids) == sorted(by_id)
    for line in lines:
        response = by_id[line["request_id"]]
        assert line["component"] == "router"
        assert line["level"] == "info"
        assert line["flops"] == response["flops"]
        assert line["latency_ms"] > 0
        for field in ROUTE_FIELDS:
            assert line[field] == response["route"][field], (line["request_id"], field)


async def test_forward_pass_logs_request_ids(trained_bundle, digits):
    """A batch of merged calls logs the ids of every request in it.

    `@serve.batch` needs a Serve replica context, so this calls the batch body, with
    arguments shaped as `@serve.batch` passes them: one list entry per merged call.
    """
    import io
    import logging

    import structlog

    import monitoring.logging
    from services.model_replica import ModelReplica

    stream = io.StringIO()
    configure_logging(json_output=True, level=logging.DEBUG, stream=stream)
    try:
        replica = ModelReplica(str(trained_bundle.path), "expert-0", max_batch_size=16, batch_wait_timeout_s=0.05)
        rows = digits.test.x[:8]
        batches = [rows[index : index + 2] for index in range(0, 8, 2)]
        request_ids = [[f"call-{index}-a", f"call-{index}-b"] for index in range(0, 8, 2)]
        outputs = await replica._forward(batches, request_ids)
        get_logger("test").info("done")
    finally:
        structlog.reset_defaults()
        monitoring.logging._configured = False

    assert [output.shape for output in outputs] == [(2, 10)] * 4
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    passes = [line for line in lines if line["event"] == "forward_pass"]
    assert len(passes) == 1
    assert passes[0]["request_ids"] == [request_id for call_ids in request_ids for request_id in call_ids]
    assert passes[0]["rows"] == 8
    assert passes[0]["calls"] == 4
    assert passes[0]["deployment"] == "expert-0"
    assert "request_id" not in lines[-1]

"""The router replica's part of the quality loop: follow the policy and report quality.

`RouterSupervision` bundles a router replica's `PolicyCache` (which path each request
takes), `QualityRecorder` (counts flushed to Redis in the background), the
`ShadowEvaluator`, and the `/v1/feedback` handler. Its request-path methods touch only
memory; everything that talks to Redis runs in background tasks, except a feedback
request, which reads its stored prediction.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import numpy as np

from services.codec import MSGPACK, RequestError
from services.policy_state import PolicyCache, PolicySnapshot, SupervisorKeys
from services.quality_feed import QualityRecorder, ShadowEvaluator
from services.settings import Settings

__all__ = ["RouterSupervision", "parse_feedback"]

MAX_FEEDBACK_BYTES = 1024 * 1024


class RouterSupervision:
    """Policy cache, quality records, shadow evaluation and feedback of one router replica.

    Call `start()` on the replica's event loop (safe to call repeatedly); until the
    policy is first read, every request goes to the mixture at policy version 0.
    """

    def __init__(self, redis, settings: Settings, call_dense: Callable[[np.ndarray, str], Any], num_classes: int,
                 agreement_gauge=None, comparisons_counter=None) -> None:
        supervisor = settings.supervisor
        keys = SupervisorKeys(settings.redis.key_prefix)
        replica = f"{os.getpid()}"
        self.num_classes = num_classes
        self.policy = PolicyCache(redis, keys, poll_interval_s=supervisor.poll_interval_s)
        self.recorder = QualityRecorder(redis, keys, flush_interval_s=supervisor.flush_interval_s,
                                        prediction_ttl_s=supervisor.prediction_ttl_s, replica=replica)
        self.shadow = ShadowEvaluator(
            call_dense=lambda rows: call_dense(rows, "shadow"),
            recorder=self.recorder,
            fraction=supervisor.shadow_fraction,
            max_in_flight=supervisor.max_shadow_in_flight,
            timeout_s=settings.router.dense_timeout_s,
            batch_window_s=supervisor.shadow_window_s,
            agreement_gauge=agreement_gauge,
            comparisons_counter=comparisons_counter,
        )

    def start(self) -> None:
        self.policy.start()
        self.recorder.start()

    async def stop(self) -> None:
        await self.policy.stop()
        await self.shadow.drain()
        await self.recorder.stop()

    def route_policy(self, request_id: str) -> tuple[bool, int]:
        """Return whether the policy sends this request to dense, and the policy version."""
        snapshot: PolicySnapshot = self.policy.snapshot
        return not snapshot.sends_to_moe(request_id), snapshot.version

    def observe(self, request_id: str, inputs: np.ndarray, predictions: Sequence[int], row_reasons: Sequence[str],
                confidence: Sequence[float], latency_s: float, policy_version: int) -> None:
        """Record a finished request and maybe start its shadow comparison; never waits."""
        self.recorder.record_request(request_id, policy_version, row_reasons, confidence, predictions, latency_s)
        self.shadow.maybe_shadow(request_id, inputs, predictions, row_reasons, policy_version)

    async def feedback(self, body: bytes, content_type: str | None) -> dict[str, Any]:
        """Score a true label against the stored prediction of its request.

        Raises:
            RequestError: the body is invalid (400/422), or no prediction is stored for
                the request id (404: unknown, expired, or feedback already given).
        """
        request_id, labels = parse_feedback(body, content_type, self.num_classes)
        stored = await self.recorder.lookup_prediction(request_id)
        if stored is None:
            raise RequestError(404, "not_found",
                               f"no prediction stored for request_id {request_id!r}: it is unknown, older than "
                               f"{self.recorder.prediction_ttl_s} s, or already has feedback", field="request_id")
        predictions = stored["predictions"]
        if len(labels) != len(predictions):
            raise RequestError(422, "invalid_field",
                               f"label has {len(labels)} values but request {request_id!r} had {len(predictions)} "
                               "rows; send one label per row", field="label")
        moe_rows = [index for index, on_moe in enumerate(stored["moe"]) if on_moe]
        correct = sum(int(labels[index] == predictions[index]) for index in moe_rows)
        if moe_rows:
            self.recorder.record_feedback(stored["version"], len(moe_rows), correct)
        return {"request_id": request_id, "rows": len(labels), "correct": sum(
            int(label == prediction) for label, prediction in zip(labels, predictions)), "moe_rows": len(moe_rows)}


def parse_feedback(body: bytes, content_type: str | None, num_classes: int) -> tuple[str, list[int]]:
    """Validate a feedback body `{"request_id": str, "label": int | [int, ...]}` (JSON or msgpack).

    Raises:
        RequestError: 400 for a malformed body, 422 listing every invalid field.
    """
    if len(body) > MAX_FEEDBACK_BYTES:
        raise RequestError(413, "body_too_large", f"body has {len(body)} bytes, the limit is {MAX_FEEDBACK_BYTES}")
    media = (content_type or "application/json").split(";", 1)[0].strip().lower()
    try:
        document = msgpack.unpackb(body, raw=False) if media == MSGPACK else json.loads(body)
    except (ValueError, msgpack.UnpackException) as error:
        raise RequestError(400, "malformed_body", f"feedback body is not valid {media}: {error}") from None
    if not isinstance(document, dict):
        raise RequestError(400, "malformed_body",
                           'feedback body must be an object like {"request_id": "abc", "label": 3}')

    problems: list[tuple[str, str]] = []
    request_id = document.get("request_id")
    if not isinstance(request_id, str) or not 1 <= len(request_id) <= 256:
        problems.append(("request_id", f"request_id must be the string id of an answered request, got {request_id!r}"))
    raw_label = document.get("label")
    labels = raw_label if isinstance(raw_label, list) else [raw_label]
    valid = labels and all(isinstance(label, int) and not isinstance(label, bool) and 0 <= label < num_classes
                           for label in labels)
    if not valid:
        problems.append(("label", f"label must be a class index from 0 to {num_classes - 1}, or a list of them "
                                  f"with one per row, got {raw_label!r}"))
    if problems:
        raise RequestError(422, "invalid_field", "; ".join(message for _, message in problems),
                           field=",".join(name for name, _ in problems))
    return request_id, labels

"""The router side of the quality loop: quality records, shadow evaluation and feedback.

Every router replica owns one `QualityRecorder`. The request path only adds numbers
to in-memory `WindowCounts` (one per routing-policy version); a background task
flushes them every `flush_interval_s` as one entry per version to the capped stream
`<prefix>supervisor:quality`, together with the predictions kept for `/v1/feedback`.
So no request waits on Redis, several replicas feed one supervisor, and a Redis
outage costs at most the records buffered meanwhile (bounded, oldest dropped first).

`ShadowEvaluator` sends a share of the mixture-answered requests to dense as well, in
a task that the response never waits for, and records whether the predictions agree.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import numpy as np

from monitoring.logging import RateLimitedWarning, get_logger
from monitoring.quality import WindowCounts
from services.policy_state import SupervisorKeys

__all__ = ["QualityRecorder", "ShadowEvaluator", "decode_quality_entry"]

# Row reasons (see services.dispatch.REASON_CODES) that mean the row was routed to experts.
# An escalated row's expert call succeeded before dense answered it.
_EXPERT_REASONS = ("top_p", "expert_error", "expert_timeout", "escalated")
# Rows that skipped the gate carry no gate confidence.
_UNGATED_REASONS = ("requested", "supervisor")
MAX_QUALITY_ENTRIES = 100_000
MAX_PENDING_PREDICTIONS = 20_000
MAX_BUFFERED_VERSIONS = 64
RECENT_COMPARISONS = 100


def decode_quality_entry(fields: dict[bytes, bytes]) -> tuple[int, WindowCounts]:
    """The policy version and counts of one quality-stream entry."""
    version = int(fields[b"version"])
    counts = WindowCounts.from_dict(msgpack.unpackb(fields[b"counts"], raw=False))
    return version, counts


class QualityRecorder:
    """Buffers quality counts per policy version and flushes them to Redis in the background.

    Not thread-safe: one replica's event loop owns a recorder. Call `start()` from that
    loop; `stop()` flushes what is left.
    """

    def __init__(self, redis, keys: SupervisorKeys, flush_interval_s: float, prediction_ttl_s: int,
                 replica: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = redis
        self.keys = keys
        self.flush_interval_s = flush_interval_s
        self.prediction_ttl_s = prediction_ttl_s
        self.replica = replica
        self.counts: dict[int, WindowCounts] = {}
        self.predictions: dict[str, bytes] = {}
        self.dropped_predictions = 0
        self.log = get_logger("quality_recorder", replica=replica)
        self._warnings = RateLimitedWarning(interval_s=30.0, clock=clock)
        self._task: asyncio.Task | None = None

    def _window(self, policy_version: int) -> WindowCounts:
        counts = self.counts.get(policy_version)
        if counts is None:
            if len(self.counts) >= MAX_BUFFERED_VERSIONS:  # Redis has been away for long: drop the oldest.
                del self.counts[min(self.counts)]
            counts = self.counts[policy_version] = WindowCounts()
        return counts

    def record_request(self, request_id: str, policy_version: int, row_reasons: Sequence[str],
                       confidence: Sequence[float], predictions: Sequence[int], latency_s: float) -> None:
        """Count one finished request and keep its predictions for feedback."""
        counts = self._window(policy_version)
        counts.requests += 1
        counts.latencies_s.append(latency_s)
        moe_rows = 0
        for reason, row_confidence in zip(row_reasons, confidence):
            if reason in _EXPERT_REASONS:
                counts.expert_rows += 1
            if reason == "top_p":
                moe_rows += 1
            elif reason == "expert_error":
                counts.expert_errors += 1
            elif reason == "expert_timeout":
                counts.expert_timeouts += 1
            if reason != "top_p":
                counts.fallbacks[reason] = counts.fallbacks.get(reason, 0) + 1
            if reason not in _UNGATED_REASONS:
                counts.confidence_sum += float(row_confidence)
                counts.confidence_rows += 1
        if moe_rows:
            counts.moe_requests += 1

        if len(self.predictions) >= MAX_PENDING_PREDICTIONS:
            self.predictions.pop(next(iter(self.predictions)))
            self.dropped_predictions += 1
        self.predictions[request_id] = msgpack.packb(
            {"predictions": list(predictions), "moe": [reason == "top_p" for reason in row_reasons],
             "version": policy_version}, use_bin_type=True)

    def record_shadow(self, policy_version: int, rows: int, agreed: int) -> None:
        counts = self._window(policy_version)
        counts.shadow_rows += rows
        counts.shadow_agreed += agreed

    def record_feedback(self, policy_version: int, rows: int, correct: int) -> None:
        counts = self._window(policy_version)
        counts.feedback_rows += rows
        counts.feedback_correct += correct

    async def lookup_prediction(self, request_id: str) -> dict[str, Any] | None:
        """Take the stored prediction of a request (once); None when unknown or expired."""
        pending = self.predictions.pop(request_id, None)
        stored = await self.redis.getdel(self.keys.prediction(request_id))
        packed = pending or stored
        return None if packed is None else msgpack.unpackb(packed, raw=False)

    async def flush(self) -> int:
        """Write the buffered counts and predictions to Redis; returns the entries written.

        On a Redis error the buffers are kept for the next flush and the error re-raised.
        """
        if not self.counts and not self.predictions:
            return 0
        counts, predictions = self.counts, self.predictions
        self.counts, self.predictions = {}, {}
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for version, window in sorted(counts.items()):
                    pipe.xadd(self.keys.quality, {"version": str(version), "replica": self.replica,
                                                  "counts": msgpack.packb(window.to_dict(), use_bin_type=True)},
                              maxlen=MAX_QUALITY_ENTRIES, approximate=True)
                for request_id, packed in predictions.items():
                    pipe.set(self.keys.prediction(request_id), packed, ex=self.prediction_ttl_s)
                await pipe.execute()
        except BaseException:
            for version, window in counts.items():
                self._window(version).merge(window)
            self.predictions = {**predictions, **self.predictions}
            raise
        return len(counts)

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        try:
            await self.flush()
        except Exception as error:  # noqa: BLE001 - stopping must not raise
            self.log.warning("quality_flush_failed", error=repr(error), buffered_versions=len(self.counts))

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - keep buffering until Redis returns
                self._warnings.warn(self.log, "quality_flush_failed", error=repr(error),
                                    buffered_versions=len(self.counts), buffered_predictions=len(self.predictions))


class ShadowEvaluator:
    """Compares mixture predictions with dense on a share of requests, off the response path.

    `maybe_shadow` returns at once. Sampled requests wait up to `batch_window_s` in a
    pending batch (or until half of `max_in_flight` are pending), and each batch goes
    to dense as ONE call, so shadow traffic adds one handle call per window instead of
    one per sampled request. A dense call that the router makes anyway can take the
    pending batch along (`take_pending`), and then shadow traffic adds no handle call
    at all. At most `max_in_flight`
    requests are pending or in flight per replica; requests beyond that are not
    shadowed (counted in `skipped`), so shadow traffic cannot pile up behind a slow
    dense model. A failed shadow call is logged (rate-limited) and not counted.
    """

    def __init__(self, call_dense: Callable[[np.ndarray], Any], recorder: QualityRecorder, fraction: float,
                 max_in_flight: int, timeout_s: float, agreement_gauge=None, comparisons_counter=None,
                 rng: random.Random | None = None, batch_window_s: float = 0.05) -> None:
        self.call_dense = call_dense
        self.recorder = recorder
        self.fraction = fraction
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self.batch_window_s = batch_window_s
        self.agreement_gauge = agreement_gauge
        self.comparisons_counter = comparisons_counter
        self.rng = rng or random.Random()
        self.skipped = 0
        self.log = get_logger("shadow")
        self._warnings = RateLimitedWarning(interval_s=30.0)
        self._pending: list[tuple[str, np.ndarray, np.ndarray, int]] = []
        self._requests_in_flight = 0
        self._flush_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        # The agreement gauge shows the share over the last comparisons, not since start.
        self._recent: deque[tuple[int, int]] = deque(maxlen=RECENT_COMPARISONS)

    def maybe_shadow(self, request_id: str, inputs: np.ndarray, predictions: Sequence[int],
                     row_reasons: Sequence[str], policy_version: int) -> bool:
        """Queue this request's mixture rows for a shadow comparison if it is sampled."""
        moe_rows = [index for index, reason in enumerate(row_reasons) if reason == "top_p"]
        if not moe_rows or self.fraction <= 0 or self.rng.random() >= self.fraction:
            return False
        if len(self._pending) + self._requests_in_flight >= self.max_in_flight:
            self.skipped += 1
            return False
        rows_x = np.ascontiguousarray(inputs.reshape(len(inputs), -1)[moe_rows])
        moe_predictions = np.asarray(predictions)[moe_rows]
        self._pending.append((request_id, rows_x, moe_predictions, policy_version))
        if len(self._pending) * 2 >= self.max_in_flight:
            # Half of the in-flight budget is waiting: send it now, before new samples get skipped.
            if self._flush_task is not None:
                self._flush_task.cancel()
                self._flush_task = None
            self._send_pending()
        elif self._flush_task is None:
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_after_window())
        return True

    async def _flush_after_window(self) -> None:
        await asyncio.sleep(self.batch_window_s)
        self._flush_task = None
        self._send_pending()

    def _send_pending(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        self._requests_in_flight += len(batch)
        task = asyncio.get_running_loop().create_task(self._compare(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def take_pending(self) -> tuple[np.ndarray, Callable[[np.ndarray | None, Exception | None], None]] | None:
        """Hand the pending batch to a dense call that is about to go anyway.

        Returns None when nothing is pending, else the rows [n, D] and a function that
        the caller must call once with the dense probabilities of those rows [n, C], or
        with None and the error when the call failed.
        """
        batch, self._pending = self._pending, []
        if not batch:
            return None
        if self._flush_task is not None:
            self._flush_task.cancel()
            self._flush_task = None
        self._requests_in_flight += len(batch)
        delivered = False

        def deliver(dense_probs: np.ndarray | None, error: Exception | None = None) -> None:
            nonlocal delivered
            if delivered:
                return
            delivered = True
            try:
                self._score(batch, dense_probs, error)
            except Exception as record_error:  # noqa: BLE001 - runs inside a request's dispatch
                self._warnings.warn(self.log, "shadow_record_failed", request_ids=[r for r, _, _, _ in batch],
                                    error=repr(record_error))
            finally:
                self._requests_in_flight -= len(batch)

        return np.concatenate([rows for _, rows, _, _ in batch]), deliver

    async def _compare(self, batch: list[tuple[str, np.ndarray, np.ndarray, int]]) -> None:
        try:
            rows_x = np.concatenate([rows for _, rows, _, _ in batch])
            try:
                dense_probs = await asyncio.wait_for(_awaitable(self.call_dense(rows_x)), self.timeout_s)
            except Exception as error:  # noqa: BLE001 - a failed shadow call is no quality signal
                self._score(batch, None, error)
                return
            self._score(batch, dense_probs, None)
        finally:
            self._requests_in_flight -= len(batch)

    def _score(self, batch: list[tuple[str, np.ndarray, np.ndarray, int]], dense_probs: np.ndarray | None,
               error: Exception | None) -> None:
        if error is not None or dense_probs is None:
            self._warnings.warn(self.log, "shadow_call_failed", request_ids=[r for r, _, _, _ in batch],
                                error=repr(error))
            return
        dense_predictions = np.argmax(dense_probs, axis=1)
        start = 0
        for _, rows, moe_predictions, policy_version in batch:
            agreed = int((dense_predictions[start : start + len(rows)] == moe_predictions).sum())
            start += len(rows)
            self._record(policy_version, len(moe_predictions), agreed)

    def _record(self, policy_version: int, rows: int, agreed: int) -> None:
        self.recorder.record_shadow(policy_version, rows, agreed)
        self._recent.append((rows, agreed))
        if self.comparisons_counter is not None:
            for label, count in (("true", agreed), ("false", rows - agreed)):
                if count:  # Ray counters reject increments of 0.
                    self.comparisons_counter.inc(count, tags={"agree": label})
        if self.agreement_gauge is not None:
            total = sum(count for count, _ in self._recent)
            self.agreement_gauge.set(sum(agree for _, agree in self._recent) / total)

    async def drain(self) -> None:
        """Send the pending batch now and wait for every shadow call (used when stopping and in tests)."""
        if self._flush_task is not None:
            self._flush_task.cancel()
            self._flush_task = None
        self._send_pending()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


async def _awaitable(value):
    return await value

"""The supervisor: a quality loop that moves traffic between the mixture and dense.

`SupervisorCore` contains the algorithm and keeps all of its state in Redis, so that any
process can run it and a restarted replica continues where the last one stopped.
`services.supervisor_api.SupervisorIngress` is the Serve deployment (one replica)
that runs the loop and serves `/v1/supervisor/...`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import msgpack

from monitoring.logging import RateLimitedWarning, get_logger
from monitoring.quality import QualityThresholds, Verdict, WindowCounts, evaluate_window
from services.policy_state import (
    POLICY_STATES,
    PolicySnapshot,
    PolicyStore,
    SupervisorKeys,
    TransitionConflict,
)
from services.quality_feed import decode_quality_entry
from services.settings import SupervisorSettings

__all__ = ["ActionRejected", "SupervisorCore", "hash_admin_token", "state_for_weight"]

# Quality-stream entries read per XRANGE call while catching up.
_READ_BATCH = 1000
_WEIGHT_EPSILON = 1e-9


def hash_admin_token(token: str) -> str:
    """Hex sha256 of the admin token; the deployment receives this, never the token itself."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def state_for_weight(moe_weight: float) -> str:
    """Return the unpaused state for a traffic share: dense at 0, moe at 1, canary between."""
    if moe_weight <= _WEIGHT_EPSILON:
        return "dense"
    if moe_weight >= 1.0 - _WEIGHT_EPSILON:
        return "moe"
    return "canary"


class ActionRejected(ValueError):
    """A manual action that does not apply to the current state (HTTP 409)."""


class SupervisorCore:
    """Evaluates quality windows and moves the routing policy; all state lives in Redis.

    Algorithm, once per `tick()` (every `interval_s`):

    1. Read the quality records that routers appended since the last tick and keep
       those of the current policy version, so a window never mixes policies. An
       inconclusive window (too few samples) is carried into the next one.
    2. Evaluate the window (`monitoring.quality.evaluate_window`).
    3. Unless paused: in `moe`, `failed_windows` consecutive failures move all traffic
       to `dense`. In `dense`, after `cooldown_s` the ramp-back starts as `canary` at
       `step_weight`. In `canary`, one failed window goes back to `dense`. There
       `step_windows` passed windows raise the share by `step_weight` up to
       `max_weight`, and a passed step at `max_weight` promotes to `moe`.

    Every change is a compare-and-set on the policy version with its event in the same
    Lua script (`PolicyStore.transition`), so a second supervisor process during a
    restart cannot apply a change computed from an old state; it gets
    `TransitionConflict` and the next tick starts from the new state.

    Manual actions (rollback, promote, weight) are allowed in every state. While
    paused they change the weight and keep the state `paused`, and `resume` picks the
    state that matches the weight. A manual rollback starts the same cooldown and
    ramp-back as an automatic one; pause as well to hold dense.

    Not thread-safe: one event loop owns a core, and an asyncio lock orders the tick
    and the manual actions.
    """

    def __init__(self, redis, settings: SupervisorSettings, keys: SupervisorKeys,
                 clock: Callable[[], float] = time.time, metrics=None) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = keys
        self.clock = clock
        self.metrics = metrics
        self.store = PolicyStore(redis, keys, max_events=settings.max_events)
        self.thresholds = QualityThresholds(
            min_agreement=settings.min_agreement,
            max_error_rate=settings.max_error_rate,
            max_p99_latency_s=settings.max_p99_latency_s,
            min_samples=settings.min_samples,
            min_accuracy=settings.min_accuracy,
        )
        self.log = get_logger("supervisor")
        self._tick_warnings = RateLimitedWarning(interval_s=30.0)
        self._lock = asyncio.Lock()

    # --- the window --------------------------------------------------------------------

    async def _read_window(self, policy: PolicySnapshot) -> tuple[WindowCounts, str, int]:
        """Merge the carried counts and every new record of the current version."""
        stored = await self.redis.hgetall(self.keys.window)
        cursor = stored.get(b"cursor", b"0-0").decode()
        counts = WindowCounts()
        if stored.get(b"carry") and int(stored.get(b"carry_version", b"-1")) == policy.version:
            counts.merge(WindowCounts.from_dict(msgpack.unpackb(stored[b"carry"], raw=False)))

        records = 0
        while True:
            entries = await self.redis.xrange(self.keys.quality, min=f"({cursor}", max="+", count=_READ_BATCH)
            for entry_id, fields in entries:
                cursor = entry_id.decode()
                try:
                    version, record = decode_quality_entry(fields)
                except (KeyError, ValueError, msgpack.UnpackException) as error:
                    self.log.warning("quality_record_invalid", entry_id=cursor, error=repr(error))
                    continue
                if version == policy.version:
                    counts.merge(record)
                    records += 1
            if len(entries) < _READ_BATCH:
                return counts, cursor, records

    async def _save_window(self, cursor: str, counts: WindowCounts, verdict: Verdict, policy: PolicySnapshot,
                           now: float) -> None:
        # NOTE: an inconclusive window carries over with no age limit, so under very low traffic a
        # window can span a long time before it reaches min_samples.
        carry = msgpack.packb(counts.to_dict(), use_bin_type=True) if verdict.result == "inconclusive" else b""
        await self.redis.hset(self.keys.window, mapping={
            "cursor": cursor,
            "carry": carry,
            "carry_version": str(policy.version),
            "verdict": json.dumps(verdict.to_dict()),
            "traffic": json.dumps(_traffic(counts)),
            "evaluated_at": repr(now),
        })

    # --- the loop ----------------------------------------------------------------------

    async def tick(self) -> dict[str, Any]:
        """Evaluate one window and apply the automatic transition it calls for.

        Returns the verdict, the policy after the tick and the event when one happened.
        """
        async with self._lock:
            now = self.clock()
            policy = await self.store.read()
            counts, cursor, records = await self._read_window(policy)
            verdict = evaluate_window(counts, self.thresholds)
            await self._save_window(cursor, counts, verdict, policy, now)
            event = None
            if policy.state != "paused":
                try:
                    policy, event = await self._decide(policy, verdict, now)
                except TransitionConflict as error:
                    self.log.warning("transition_conflict", error=str(error), policy_version=policy.version)
            self._export(policy)
            return {"verdict": verdict.to_dict(), "records": records, "state": policy.state,
                    "moe_weight": policy.moe_weight, "policy_version": policy.version, "event": event}

    async def _decide(self, policy: PolicySnapshot, verdict: Verdict, now: float
                      ) -> tuple[PolicySnapshot, dict[str, Any] | None]:
        settings = self.settings
        metrics = {"verdict": verdict.result, **{name: check.to_dict() for name, check in verdict.metrics.items()}}
        if policy.state == "dense":
            if now - policy.state_since >= settings.cooldown_s:
                reason = (f"cooldown of {settings.cooldown_s:g} s in dense is over; "
                          f"ramp-back starts at {settings.step_weight:.0%}")
                return await self._move(policy, "canary", settings.step_weight, "automatic", reason, now, metrics)
            return policy, None

        if verdict.result == "fail":
            failed = policy.failed_windows + 1
            if policy.state == "canary" or failed >= settings.failed_windows:
                reason = f"{failed} failed window(s) in {policy.state} at {policy.moe_weight:.0%}: {verdict.reason}"
                return await self._move(policy, "dense", 0.0, "automatic", reason, now, metrics)
            await self._save_counts(policy, failed_windows=failed, passed_windows=0)
            return policy, None

        if verdict.result == "pass":
            if policy.state == "canary":
                passed = policy.passed_windows + 1
                if passed < settings.step_windows:
                    await self._save_counts(policy, failed_windows=0, passed_windows=passed)
                    return policy, None
                if policy.moe_weight >= settings.max_weight - _WEIGHT_EPSILON:
                    reason = f"canary step at {policy.moe_weight:.0%} passed; promoting to moe"
                    return await self._move(policy, "moe", 1.0, "automatic", reason, now, metrics)
                weight = min(policy.moe_weight + settings.step_weight, settings.max_weight)
                reason = f"canary step at {policy.moe_weight:.0%} passed; next step {weight:.0%}"
                return await self._move(policy, "canary", weight, "automatic", reason, now, metrics)
            if policy.failed_windows:
                await self._save_counts(policy, failed_windows=0, passed_windows=0)
        return policy, None

    async def _save_counts(self, policy: PolicySnapshot, failed_windows: int, passed_windows: int) -> None:
        updated = PolicySnapshot(**{**policy.__dict__, "failed_windows": failed_windows,
                                    "passed_windows": passed_windows})
        if not await self.store.save_bookkeeping(policy, updated):
            raise TransitionConflict(f"policy changed after version {policy.version} was read")

    async def _move(self, policy: PolicySnapshot, state: str, moe_weight: float, actor: str, reason: str,
                    now: float, metrics: dict[str, Any] | None = None, paused_from: str | None = None
                    ) -> tuple[PolicySnapshot, dict[str, Any]]:
        updated, event = await self.store.transition(policy, state, moe_weight, actor, reason, now, metrics,
                                                     paused_from=paused_from)
        self.log.info("policy_transition", from_state=policy.state, to_state=state, moe_weight=updated.moe_weight,
                      policy_version=updated.version, actor=actor, reason=reason)
        if self.metrics is not None:
            self.metrics.transitions.inc(tags={"to": state, "actor": actor})
        self._export(updated)
        return updated, event

    def _export(self, policy: PolicySnapshot) -> None:
        if self.metrics is None:
            return
        self.metrics.moe_weight.set(policy.moe_weight)
        for state in POLICY_STATES:
            self.metrics.state.set(1.0 if state == policy.state else 0.0, tags={"state": state})

    async def run_forever(self) -> None:
        """Tick every `interval_s` until cancelled; a failed tick is logged and the loop goes on."""
        while True:
            started = time.monotonic()
            try:
                result = await self.tick()
                if result["event"] is None and result["verdict"]["result"] == "fail":
                    self.log.warning("window_failed", reason=result["verdict"]["reason"],
                                     policy_version=result["policy_version"])
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - the loop must outlive Redis outages and bugs
                self._tick_warnings.warn(self.log, "tick_failed", error=repr(error),
                                         retry_in_s=self.settings.interval_s)
            elapsed_s = time.monotonic() - started
            await asyncio.sleep(max(self.settings.interval_s - elapsed_s, 0.0))

    # --- manual actions ----------------------------------------------------------------

    async def rollback(self, reason: str | None = None) -> dict[str, Any]:
        return await self._manual(0.0, reason or "manual rollback through the API")

    async def promote(self, reason: str | None = None) -> dict[str, Any]:
        return await self._manual(1.0, reason or "manual promotion through the API")

    async def set_weight(self, moe_percent: float, reason: str | None = None) -> dict[str, Any]:
        return await self._manual(moe_percent / 100.0,
                                  reason or f"manual weight of {moe_percent:g}% through the API")

    async def _manual(self, moe_weight: float, reason: str) -> dict[str, Any]:
        async with self._lock:
            policy = await self.store.read()
            paused = policy.state == "paused"
            target = "paused" if paused else state_for_weight(moe_weight)
            if target == policy.state and abs(policy.moe_weight - moe_weight) <= _WEIGHT_EPSILON:
                return {"changed": False, "reason": f"already {policy.state} at {policy.moe_weight:.0%}"}
            paused_from = state_for_weight(moe_weight) if paused else None
            _, event = await self._move(policy, target, moe_weight, "api", reason, self.clock(),
                                        paused_from=paused_from)
            return {"changed": True, "event": event}

    async def pause(self, reason: str | None = None) -> dict[str, Any]:
        async with self._lock:
            policy = await self.store.read()
            if policy.state == "paused":
                raise ActionRejected("the supervisor is already paused; POST /v1/supervisor/resume to resume")
            _, event = await self._move(policy, "paused", policy.moe_weight, "api",
                                        reason or "automatic changes paused through the API", self.clock(),
                                        paused_from=policy.state)
            return {"changed": True, "event": event}

    async def resume(self, reason: str | None = None) -> dict[str, Any]:
        async with self._lock:
            policy = await self.store.read()
            if policy.state != "paused":
                raise ActionRejected(f"the supervisor is not paused (state {policy.state}); nothing to resume")
            target = state_for_weight(policy.moe_weight)
            _, event = await self._move(policy, target, policy.moe_weight, "api",
                                        reason or "automatic changes resumed through the API", self.clock(),
                                        paused_from="")
            return {"changed": True, "event": event}

    # --- reads -------------------------------------------------------------------------

    async def events(self, limit: int = 50) -> list[dict[str, Any]]:
        return await self.store.events(limit)

    async def status(self) -> dict[str, Any]:
        """Return the policy, the last window's metrics against their thresholds, and the last event."""
        policy = await self.store.read()
        stored = await self.redis.hgetall(self.keys.window)
        verdict = json.loads(stored.get(b"verdict", b"null"))
        last_events = await self.store.events(1)
        now = self.clock()
        status: dict[str, Any] = {
            "state": policy.state,
            "moe_percent": round(policy.moe_weight * 100.0, 3),
            "policy_version": policy.version,
            "interval_s": self.settings.interval_s,
            "window": verdict["metrics"] if verdict else {},
            "verdict": verdict["result"] if verdict else None,
            "verdict_reason": verdict["reason"] if verdict else "no window evaluated yet",
            "traffic": json.loads(stored.get(b"traffic", b"{}")),
            "evaluated_at": float(stored[b"evaluated_at"]) if b"evaluated_at" in stored else None,
            "last_event": last_events[-1] if last_events else None,
            "failed_windows": policy.failed_windows,
            "passed_windows": policy.passed_windows,
            "paused_from": policy.paused_from or None,
            "state_age_s": round(max(now - policy.state_since, 0.0), 3) if policy.version else None,
            "thresholds": {
                "min_agreement": self.settings.min_agreement,
                "max_error_rate": self.settings.max_error_rate,
                "max_p99_latency_s": self.settings.max_p99_latency_s,
                "min_accuracy": self.settings.min_accuracy,
                "min_samples": self.settings.min_samples,
                "failed_windows": self.settings.failed_windows,
                "cooldown_s": self.settings.cooldown_s,
                "step_weight": self.settings.step_weight,
                "max_weight": self.settings.max_weight,
            },
        }
        if policy.state == "dense":
            status["cooldown_remaining_s"] = round(max(self.settings.cooldown_s - (now - policy.state_since), 0.0), 3)
        return status


def _traffic(counts: WindowCounts) -> dict[str, Any]:
    """Window numbers that are reported but not checked against thresholds."""
    return {
        "requests": counts.requests,
        "moe_requests": counts.moe_requests,
        "expert_rows": counts.expert_rows,
        "shadow_rows": counts.shadow_rows,
        "feedback_rows": counts.feedback_rows,
        "fallbacks": dict(sorted(counts.fallbacks.items())),
        "mean_confidence": round(counts.confidence_sum / counts.confidence_rows, 6) if counts.confidence_rows else None,
    }

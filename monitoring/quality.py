"""Quality windows: counters that router replicas record, and the verdict on one window.

Router replicas accumulate `WindowCounts` per routing-policy version and publish them;
the supervisor merges the counts of one window and calls `evaluate_window`. This module
is pure: no Redis, no Ray, no clock.

A window's verdict is

- `fail` when any checked metric with at least `min_samples` samples breaks its
  threshold (one clear failure is enough, even if other metrics lack samples),
- `inconclusive` when no metric fails but a checked metric has fewer than
  `min_samples` samples, so the window decides nothing either way,
- `pass` otherwise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "MetricCheck",
    "QualityThresholds",
    "VERDICTS",
    "Verdict",
    "WindowCounts",
    "evaluate_window",
]

VERDICTS = ("pass", "fail", "inconclusive")

# Latencies kept per window; beyond this, a uniform sample of them is kept.
MAX_LATENCY_SAMPLES = 4096


@dataclass
class WindowCounts:
    """Mergeable quality counters of one routing-policy version over some span of time.

    Rows are input rows (a request may carry several); latencies are per request.
    """

    requests: int = 0
    moe_requests: int = 0  # requests with at least one row served by experts
    expert_rows: int = 0  # rows routed to experts: served, failed or timed out
    expert_errors: int = 0  # rows whose expert call raised
    expert_timeouts: int = 0  # rows whose expert call timed out
    fallbacks: dict[str, int] = field(default_factory=dict)  # dense rows by reason
    confidence_sum: float = 0.0  # sum of the top gate probability over gated rows
    confidence_rows: int = 0
    shadow_rows: int = 0  # mixture rows compared with dense off the response path
    shadow_agreed: int = 0  # of those, rows where both predicted the same class
    feedback_rows: int = 0  # mixture rows with a true label from feedback
    feedback_correct: int = 0
    latencies_s: list[float] = field(default_factory=list)

    def merge(self, other: WindowCounts) -> None:
        """Add `other`'s counts to these, in place."""
        for name in ("requests", "moe_requests", "expert_rows", "expert_errors", "expert_timeouts",
                     "confidence_rows", "shadow_rows", "shadow_agreed", "feedback_rows", "feedback_correct"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.confidence_sum += other.confidence_sum
        for reason, count in other.fallbacks.items():
            self.fallbacks[reason] = self.fallbacks.get(reason, 0) + count
        self.latencies_s.extend(other.latencies_s)
        if len(self.latencies_s) > MAX_LATENCY_SAMPLES:
            # A strided subsample keeps the distribution's shape without a random source.
            stride = len(self.latencies_s) / MAX_LATENCY_SAMPLES
            self.latencies_s = [self.latencies_s[int(i * stride)] for i in range(MAX_LATENCY_SAMPLES)]

    def is_empty(self) -> bool:
        return self.requests == 0 and self.shadow_rows == 0 and self.feedback_rows == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WindowCounts:
        """Counts from `to_dict` output; unknown keys (from newer writers) are ignored."""
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        counts = cls(**known)
        counts.fallbacks = {str(reason): int(count) for reason, count in counts.fallbacks.items()}
        counts.latencies_s = [float(value) for value in counts.latencies_s]
        return counts


@dataclass(frozen=True)
class QualityThresholds:
    """Limits a window must meet; `min_accuracy` None reports accuracy without checking it."""

    min_agreement: float
    max_error_rate: float
    max_p99_latency_s: float
    min_samples: int
    min_accuracy: float | None = None


@dataclass(frozen=True)
class MetricCheck:
    """One metric of a window: its value, its limit and whether it met the limit.

    `ok` is None when the metric was not checked: too few samples, or no threshold.
    """

    value: float | None
    threshold: float | None
    ok: bool | None
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    """The outcome of one window: pass, fail or inconclusive, with the reason in words."""

    result: str
    reason: str
    metrics: dict[str, MetricCheck]

    def to_dict(self) -> dict[str, Any]:
        return {"result": self.result, "reason": self.reason,
                "metrics": {name: check.to_dict() for name, check in self.metrics.items()}}


def _ratio(numerator: float, denominator: int) -> float | None:
    return round(numerator / denominator, 6) if denominator else None


def _check(value: float | None, threshold: float | None, samples: int, min_samples: int, higher_is_better: bool
           ) -> MetricCheck:
    if value is None or threshold is None or samples < min_samples:
        return MetricCheck(value, threshold, None, samples)
    ok = value >= threshold if higher_is_better else value <= threshold
    return MetricCheck(value, threshold, ok, samples)


def evaluate_window(counts: WindowCounts, thresholds: QualityThresholds) -> Verdict:
    """Check one window's counts against the thresholds; see the module docstring for the rules."""
    min_samples = thresholds.min_samples
    p99 = round(float(np.percentile(counts.latencies_s, 99)), 6) if counts.latencies_s else None
    failed_rows = counts.expert_errors + counts.expert_timeouts
    metrics = {
        "agreement": _check(_ratio(counts.shadow_agreed, counts.shadow_rows), thresholds.min_agreement,
                            counts.shadow_rows, min_samples, higher_is_better=True),
        "error_rate": _check(_ratio(failed_rows, counts.expert_rows), thresholds.max_error_rate,
                             counts.expert_rows, min_samples, higher_is_better=False),
        "p99_latency_s": _check(p99, thresholds.max_p99_latency_s, len(counts.latencies_s), min_samples,
                                higher_is_better=False),
        "accuracy": _check(_ratio(counts.feedback_correct, counts.feedback_rows), thresholds.min_accuracy,
                           counts.feedback_rows, min_samples, higher_is_better=True),
    }

    failed = [f"{name} {check.value:g} {'<' if name in ('agreement', 'accuracy') else '>'} {check.threshold:g}"
              for name, check in metrics.items() if check.ok is False]
    if failed:
        return Verdict("fail", "; ".join(failed), metrics)
    short = [f"{name} has {check.samples} samples < min_samples {min_samples}"
             for name, check in metrics.items()
             if check.ok is None and check.threshold is not None]
    if short:
        return Verdict("inconclusive", "too few samples: " + "; ".join(short), metrics)
    return Verdict("pass", "every checked metric is within its threshold", metrics)

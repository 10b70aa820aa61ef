"""Game-day faults for one model deployment, carried in its Serve `user_config`.

`{"fault": {"kind": "error"|"slow"|"noise", "until": <unix seconds or null>,
"latency_s": <float>, "noise_scale": <float>}}`. `error` makes every call raise, `slow`
adds `latency_s` to every batch, and `noise` adds `noise_scale` of probability mass to
one random class per row, so that answers are confidently and silently wrong (with
the default 2.0, the random class gets at least two thirds of the mass).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["FAULT_KINDS", "Fault", "add_noise", "parse_fault"]

FAULT_KINDS = ("error", "slow", "noise")


@dataclass(frozen=True)
class Fault:
    kind: str
    until: float | None = None  # unix time when the fault ends; None lasts until cleared
    latency_s: float = 2.5
    noise_scale: float = 2.0

    def is_active(self, now: float) -> bool:
        return self.until is None or now < self.until

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_fault(value: dict[str, Any] | None) -> Fault | None:
    """Validate a fault mapping; None or {} means no fault."""
    if not value:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"fault must be a mapping, got {type(value).__name__}")
    unknown = set(value) - {"kind", "until", "latency_s", "noise_scale"}
    if unknown:
        raise ValueError(f"unknown fault fields {sorted(unknown)}")
    kind = value.get("kind")
    if kind not in FAULT_KINDS:
        raise ValueError(f"fault kind must be one of {list(FAULT_KINDS)}, got {kind!r}")
    fault = Fault(kind=kind, until=value.get("until"),
                  latency_s=float(value.get("latency_s", Fault.latency_s)),
                  noise_scale=float(value.get("noise_scale", Fault.noise_scale)))
    if fault.latency_s < 0 or fault.noise_scale < 0:
        raise ValueError("latency_s and noise_scale must be >= 0")
    return fault


def add_noise(probs: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """The `noise` fault: `scale` more mass on one random class per row of probs [N, C], renormalised.

    The outputs stay confident, so confidence checks downstream (the escalation
    threshold) pass them, and most of their top classes are wrong.
    """
    noisy = probs.copy()
    noisy[np.arange(len(probs)), rng.integers(0, probs.shape[1], size=len(probs))] += scale
    return noisy / noisy.sum(axis=1, keepdims=True)

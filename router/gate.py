"""The gate: a small network that scores every expert for each input row."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Gate", "GateSpec"]


@dataclass(frozen=True)
class GateSpec:
    """Gate architecture; `hidden` = 0 makes it a single linear layer."""

    in_features: int
    num_experts: int
    hidden: int = 16

    def to_dict(self) -> dict:
        return {"kind": "gate", "in_features": self.in_features, "num_experts": self.num_experts,
                "hidden": self.hidden}

    @classmethod
    def from_dict(cls, data: dict) -> GateSpec:
        if data.get("kind", "gate") != "gate":
            raise ValueError(f"unsupported gate kind {data.get('kind')!r}; expected 'gate'")
        return cls(int(data["in_features"]), int(data["num_experts"]), int(data.get("hidden", 16)))

    @property
    def flops(self) -> int:
        """Multiply-adds per example of the gate's linear layers."""
        if self.hidden == 0:
            return self.in_features * self.num_experts
        return self.in_features * self.hidden + self.hidden * self.num_experts


class Gate(nn.Module):
    """Standardise the input, then one hidden ReLU layer (or none), then one logit per expert."""

    def __init__(self, spec: GateSpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("feature_mean", torch.zeros(spec.in_features))
        self.register_buffer("feature_inv_std", torch.ones(spec.in_features))
        if spec.hidden == 0:
            self.layers = nn.Sequential(nn.Linear(spec.in_features, spec.num_experts))
        else:
            self.layers = nn.Sequential(
                nn.Linear(spec.in_features, spec.hidden),
                nn.ReLU(),
                nn.Linear(spec.hidden, spec.num_experts),
            )

    def fit_scaling(self, x: torch.Tensor) -> None:
        """Set the input standardisation from training features [N, in_features]."""
        x = x.reshape(len(x), -1).float()
        self.feature_mean.copy_(x.mean(dim=0))
        self.feature_inv_std.copy_(1.0 / x.std(dim=0).clamp_min(1e-3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)  # [N, in_features]
        return self.layers((x - self.feature_mean) * self.feature_inv_std)  # logits [N, E]

    @property
    def flops(self) -> int:
        return self.spec.flops

"""Expert and dense classifiers: multilayer perceptrons with built-in feature scaling.

FLOPs are counted per example as multiply-adds of the linear layers, one per weight
(the convention of fvcore and most model-size tables); biases, activations and the
scaling step are left out because they are small against the matrix products.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

__all__ = ["MLP", "MLPSpec", "count_parameters", "linear_flops"]


@dataclass(frozen=True)
class MLPSpec:
    """Architecture of one MLP: input features, hidden widths and output classes."""

    in_features: int
    hidden: tuple[int, ...]
    out_features: int

    def to_dict(self) -> dict:
        return {"kind": "mlp", **asdict(self), "hidden": list(self.hidden)}

    @classmethod
    def from_dict(cls, data: dict) -> MLPSpec:
        if data.get("kind", "mlp") != "mlp":
            raise ValueError(f"unsupported architecture kind {data.get('kind')!r}; expected 'mlp'")
        return cls(int(data["in_features"]), tuple(int(h) for h in data["hidden"]), int(data["out_features"]))

    @property
    def flops(self) -> int:
        return linear_flops((self.in_features, *self.hidden, self.out_features))


def linear_flops(widths: tuple[int, ...] | list[int]) -> int:
    """Multiply-adds per example of a chain of linear layers with the given widths."""
    return sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class MLP(nn.Module):
    """Standardise the flattened input, then Linear+ReLU layers, then a linear output.

    The per-feature mean and inverse standard deviation are buffers fitted on the
    training split, so they travel with the weights.
    """

    def __init__(self, spec: MLPSpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("feature_mean", torch.zeros(spec.in_features))
        self.register_buffer("feature_inv_std", torch.ones(spec.in_features))
        layers: list[nn.Module] = []
        width = spec.in_features
        for hidden in spec.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, spec.out_features))
        self.layers = nn.Sequential(*layers)

    def fit_scaling(self, x: torch.Tensor) -> None:
        """Set the input standardisation from training features [N, in_features]."""
        x = x.reshape(len(x), -1).float()
        self.feature_mean.copy_(x.mean(dim=0))
        self.feature_inv_std.copy_(1.0 / x.std(dim=0).clamp_min(1e-3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)  # [N, in_features]
        return self.layers((x - self.feature_mean) * self.feature_inv_std)  # logits [N, C]

    @property
    def flops(self) -> int:
        return self.spec.flops

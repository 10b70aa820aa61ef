"""Routing policy: top-p adaptive k, a confidence floor, and the weighted combine.

The same functions run in training (on every row of a batch) and in serving, so the
gate learns under exactly the selection rule that production applies.

Rule, per row:
1. Sort experts by gate probability, highest first (ties broken by expert id).
2. Keep experts until their cumulative probability reaches `top_p`, then clamp the
   count to [min_k, max_k].
3. If the highest probability is below `confidence_floor`, the row goes to the dense
   model instead (reason `low_confidence`).
4. Renormalise the kept probabilities to sum to 1; those are the combine weights.
5. After the experts answer, a row whose combined top class probability is below
   `escalate_below` goes to the dense model as well (reason `escalated`), so a cheap
   expert predicts the rows it is confident about and dense predicts the rest. 0 turns
   this off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RoutingConfig", "Selection", "combine", "needs_escalation", "renormalize", "select_experts"]


@dataclass(frozen=True)
class RoutingConfig:
    """Selection thresholds; validated here because training and serving both build one."""

    top_p: float = 0.6
    min_k: int = 1
    max_k: int = 2
    confidence_floor: float = 0.5
    escalate_below: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_k < 1:
            raise ValueError(f"min_k must be at least 1, got {self.min_k}")
        if self.max_k < self.min_k:
            raise ValueError(f"max_k ({self.max_k}) must be >= min_k ({self.min_k})")
        if not 0.0 <= self.confidence_floor < 1.0:
            raise ValueError(f"confidence_floor must be in [0, 1), got {self.confidence_floor}")
        if not 0.0 <= self.escalate_below < 1.0:
            raise ValueError(f"escalate_below must be in [0, 1), got {self.escalate_below}")


@dataclass(frozen=True)
class Selection:
    """The policy's decision for a batch of N rows over E experts."""

    order: torch.Tensor  # [N, E] int64: expert ids by descending gate probability
    k: torch.Tensor  # [N] int64: experts chosen per row, before the confidence floor
    mask: torch.Tensor  # [N, E] bool: chosen experts (all False on low-confidence rows)
    weights: torch.Tensor  # [N, E] float: renormalised combine weights, 0 where not chosen
    confidence: torch.Tensor  # [N] float: highest gate probability of the row
    low_confidence: torch.Tensor  # [N] bool: rows sent to the dense model by the floor


def select_experts(probs: torch.Tensor, config: RoutingConfig) -> Selection:
    """Choose experts per row from gate probabilities [N, E].

    `weights` stays differentiable with respect to `probs`, so training can back-propagate
    through the combine; the choice itself (`mask`) is discrete.
    """
    num_rows, num_experts = probs.shape
    max_k = min(config.max_k, num_experts)
    min_k = min(config.min_k, max_k)

    # 1. Stable descending sort. Sorting (-p, id) keeps ties in expert-id order.
    sorted_probs, order = torch.sort(probs.detach(), dim=-1, descending=True, stable=True)

    # 2. An expert is kept while the mass before it is still below top_p.
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # [N, E]
    k = (mass_before < config.top_p).sum(dim=-1).clamp(min_k, max_k)  # [N]
    positions = torch.arange(num_experts, device=probs.device).expand(num_rows, num_experts)
    sorted_mask = positions < k.unsqueeze(-1)  # [N, E] in sorted order
    mask = torch.zeros_like(sorted_mask).scatter(-1, order, sorted_mask)  # [N, E] by expert id

    # 3. Confidence floor on the top probability.
    confidence = sorted_probs[:, 0]
    low_confidence = confidence < config.confidence_floor
    mask = mask & ~low_confidence.unsqueeze(-1)

    # 4. Renormalise over the chosen experts.
    weights = renormalize(probs, mask)
    return Selection(order=order, k=k, mask=mask, weights=weights, confidence=confidence,
                     low_confidence=low_confidence)


def renormalize(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Gate probabilities restricted to `mask` and rescaled to sum to 1 per row.

    Rows with an empty mask get all-zero weights.
    """
    kept = probs * mask
    total = kept.sum(dim=-1, keepdim=True)
    return kept / total.clamp_min(torch.finfo(probs.dtype).tiny)


def combine(expert_probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of expert output probabilities.

    Args:
        expert_probs: [N, E, C] class probabilities of every expert on every row.
        weights: [N, E] combine weights from `select_experts` (rows sum to 1 or are all 0).

    Returns:
        [N, C] mixture class probabilities.
    """
    return torch.einsum("ne,nec->nc", weights, expert_probs)


def needs_escalation(mixed_probs: torch.Tensor, config: RoutingConfig) -> torch.Tensor:
    """Mask [N] of rows whose combined class probabilities [N, C] are below `escalate_below`.

    Pass only rows that the experts predicted. The mask is all False when `escalate_below` is 0.
    """
    return mixed_probs.max(dim=-1).values < config.escalate_below

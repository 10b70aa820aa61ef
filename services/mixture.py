"""Joint training of the gate and the experts, and training of the dense baseline.

The mixture's training forward pass goes through `router.policy.select_experts` and
`router.policy.combine`, the functions the serving router calls, so experts learn on
exactly the rows production sends them.

Loss per batch:
1. Mixture negative log-likelihood of the combined probabilities (trains the experts
   on their routed rows).
2. Routing loss: cross-entropy from the gate to a soft target that favours the
   experts with the lowest loss on each row (trains the gate; the renormalised
   top-1 weight is always 1, so the mixture loss alone gives the gate no gradient).
   With `routing_smoothing` s > 0 the target is proportional to
   p_e(y)^(1/T) + s instead of a softmax over -loss/T, so a row that every expert
   gets wrong has a nearly uniform target. The gate then learns low confidence on
   such rows, and the serving confidence floor sends them to the dense model.
3. Load-balancing loss (fraction of rows routed to each expert times its mean gate
   probability, scaled by E; 1.0 when balanced) so that no expert starves.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from experts.models import MLP, MLPSpec
from router.gate import Gate, GateSpec
from router.policy import RoutingConfig, combine, needs_escalation, select_experts

__all__ = [
    "DenseTrainConfig",
    "MixtureTrainConfig",
    "evaluate_mixture",
    "load_balancing_loss",
    "mixture_forward",
    "train_dense",
    "train_mixture",
]


@dataclass(frozen=True)
class MixtureTrainConfig:
    """Mixture architecture and optimisation settings."""

    num_experts: int = 4
    expert_hidden: tuple[int, ...] = (32,)
    gate_hidden: int = 16
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    max_epochs: int = 150
    patience_epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    balance_weight: float = 0.05
    routing_weight: float = 1.0
    routing_temperature: float = 0.25
    routing_smoothing: float = 0.0
    distill_weight: float = 0.0
    input_dropout: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class DenseTrainConfig:
    """Dense baseline architecture and optimisation settings."""

    hidden: tuple[int, ...] = (128, 128)
    input_dropout: float = 0.0
    max_epochs: int = 150
    patience_epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0


def load_balancing_loss(gate_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """E * sum_e(share of routed rows of e * mean gate probability of e); 1.0 when balanced."""
    num_experts = gate_probs.shape[1]
    assignments = mask.float()
    routed_share = assignments.sum(dim=0) / assignments.sum().clamp_min(1.0)  # [E]
    mean_prob = gate_probs.mean(dim=0)  # [E]
    return num_experts * (routed_share * mean_prob).sum()


def mixture_forward(gate: Gate, experts: nn.ModuleList, x: torch.Tensor, routing: RoutingConfig):
    """Training forward pass: every expert on every row, combined through the policy.

    Returns (mixture probabilities [N, C], expert probabilities [N, E, C], gate
    probabilities [N, E], selection).
    """
    gate_probs = torch.softmax(gate(x), dim=-1)  # [N, E]
    selection = select_experts(gate_probs, routing)
    expert_probs = torch.stack([torch.softmax(expert(x), dim=-1) for expert in experts], dim=1)  # [N, E, C]
    return combine(expert_probs, selection.weights), expert_probs, gate_probs, selection


def _batches(num_rows: int, batch_size: int, generator: torch.Generator):
    permutation = torch.randperm(num_rows, generator=generator)
    for start in range(0, num_rows, batch_size):
        yield permutation[start : start + batch_size]


def _drop_inputs(x: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Set a random `rate` share of the raw input features to 0 (training-time regulariser).

    Unlike `F.dropout` the kept features are not rescaled, so a dropped pixel looks like
    background rather than a brighter image.
    """
    if rate <= 0:
        return x
    return x * (torch.rand(x.shape, generator=generator) >= rate)


def _routing_target(per_expert_nll: torch.Tensor, config: MixtureTrainConfig) -> torch.Tensor:
    """Compute the gate's target [N, E] from each expert's loss on each row [N, E]."""
    if config.routing_smoothing <= 0:
        return torch.softmax(-per_expert_nll / config.routing_temperature, dim=-1)
    # exp(-nll / T) = p_e(y)^(1/T) lies in (0, 1]; unlike the softmax it is not
    # shift-invariant, so low scores from every expert give a flat target.
    strength = torch.exp(-per_expert_nll / config.routing_temperature) + config.routing_smoothing
    return strength / strength.sum(dim=-1, keepdim=True)


def train_mixture(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    num_classes: int,
    config: MixtureTrainConfig,
    teacher: MLP | None = None,
) -> tuple[Gate, list[MLP], dict]:
    """Train gate and experts jointly with early stopping on validation accuracy.

    With a `teacher` (the trained dense model) and `config.distill_weight` > 0, a
    distillation term adds the KL divergence from the teacher's probabilities to the
    mixture's.

    Returns the best gate, the best experts and a history summary.
    """
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    x = torch.from_numpy(x_train.reshape(len(x_train), -1))
    y = torch.from_numpy(y_train)
    xv = torch.from_numpy(x_val.reshape(len(x_val), -1))
    yv = torch.from_numpy(y_val)
    in_features = x.shape[1]

    gate = Gate(GateSpec(in_features, config.num_experts, config.gate_hidden))
    experts = nn.ModuleList(MLP(MLPSpec(in_features, config.expert_hidden, num_classes))
                            for _ in range(config.num_experts))
    gate.fit_scaling(x)
    for expert in experts:
        expert.fit_scaling(x)

    # The confidence floor is a serving decision (send the row to dense); in training
    # every row goes through the experts so that the gate learns on all of them.
    train_routing = replace(config.routing, confidence_floor=0.0)
    teacher_probs = None
    if teacher is not None and config.distill_weight > 0:
        teacher.eval()
        with torch.no_grad():
            teacher_probs = torch.softmax(teacher(x), dim=-1)  # [N_train, C]
    parameters = list(gate.parameters()) + list(experts.parameters())
    optimizer = torch.optim.Adam(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)

    best = (-1.0, None)
    epochs_since_best = 0
    epoch = 0
    for epoch in range(1, config.max_epochs + 1):
        gate.train()
        experts.train()
        for batch in _batches(len(y), config.batch_size, generator):
            xb, yb = _drop_inputs(x[batch], config.input_dropout, generator), y[batch]
            mixed, expert_probs, gate_probs, selection = mixture_forward(gate, experts, xb, train_routing)
            mixture_loss = F.nll_loss(torch.log(mixed.clamp_min(1e-9)), yb)

            # Soft target: experts with a lower loss on the row get more gate mass.
            per_expert_nll = -torch.log(expert_probs.gather(2, yb.view(-1, 1, 1).expand(-1, len(experts), 1))
                                        .squeeze(2).clamp_min(1e-9))  # [N, E]
            target = _routing_target(per_expert_nll.detach(), config)
            routing_loss = -(target * torch.log(gate_probs.clamp_min(1e-9))).sum(dim=-1).mean()

            balance = load_balancing_loss(gate_probs, selection.mask)
            loss = mixture_loss + config.routing_weight * routing_loss + config.balance_weight * balance
            if teacher_probs is not None:
                target_probs = teacher_probs[batch]
                distill = (target_probs * (torch.log(target_probs.clamp_min(1e-9))
                                           - torch.log(mixed.clamp_min(1e-9)))).sum(dim=-1).mean()
                loss = loss + config.distill_weight * distill
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        accuracy = evaluate_mixture(gate, experts, xv, yv, train_routing)["accuracy"]
        if accuracy > best[0]:
            best = (accuracy, copy.deepcopy((gate.state_dict(), experts.state_dict())))
            epochs_since_best = 0
        else:
            epochs_since_best += 1
            if epochs_since_best >= config.patience_epochs:
                break

    gate_state, experts_state = best[1]
    gate.load_state_dict(gate_state)
    experts.load_state_dict(experts_state)
    gate.eval()
    experts.eval()
    return gate, list(experts), {"epochs": epoch, "best_validation_accuracy": best[0]}


@torch.no_grad()
def evaluate_mixture(
    gate: Gate,
    experts: nn.ModuleList | list[MLP],
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    routing: RoutingConfig,
    dense: MLP | None = None,
) -> dict:
    """Accuracy and cost of the mixture under `routing`.

    Rows below the confidence floor, and rows whose combined answer falls below
    `routing.escalate_below`, are answered by `dense` when given (as in serving);
    without a dense model they count as errors. FLOPs per example include the gate,
    every chosen expert (escalated rows too: their experts ran) and the dense model on
    the rows it answers.
    """
    gate.eval()
    for expert in experts:
        expert.eval()
    x = torch.as_tensor(x).reshape(len(x), -1)
    y = torch.as_tensor(y)
    mixed, _, _, selection = mixture_forward(gate, nn.ModuleList(experts), x, routing)
    predictions = mixed.argmax(dim=-1)
    escalated = ~selection.low_confidence & needs_escalation(mixed, routing)
    to_dense = selection.low_confidence | escalated
    if dense is not None and bool(to_dense.any()):
        dense.eval()
        predictions = torch.where(to_dense, dense(x).argmax(dim=-1), predictions)
    elif bool(to_dense.any()):
        predictions = torch.where(to_dense, torch.full_like(predictions, -1), predictions)
    expert_flops = torch.tensor([expert.flops for expert in experts], dtype=torch.float64)
    flops = gate.flops + (selection.mask.double() @ expert_flops)
    if dense is not None:
        flops = flops + to_dense.double() * dense.flops
    answered_by_experts = ~to_dense
    experts_per_row = selection.mask.sum(dim=-1)
    routed = ~selection.low_confidence
    return {
        "accuracy": float((predictions == y).double().mean()),
        "dense_fraction": float(to_dense.double().mean()),
        "escalated_fraction": float(escalated.double().mean()),
        "expert_answered_fraction": float(answered_by_experts.double().mean()),
        "mean_experts_per_request": float(experts_per_row[routed].double().mean()) if bool(routed.any()) else 0.0,
        "flops_per_example": float(flops.mean()),
        "expert_load": (selection.mask.double().sum(dim=0) / max(1, int(routed.sum()))).tolist(),
    }


def train_dense(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    num_classes: int,
    config: DenseTrainConfig,
) -> tuple[MLP, dict]:
    """Train one MLP with early stopping on validation accuracy."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    x = torch.from_numpy(x_train.reshape(len(x_train), -1))
    y = torch.from_numpy(y_train)
    xv = torch.from_numpy(x_val.reshape(len(x_val), -1))
    yv = torch.from_numpy(y_val)

    model = MLP(MLPSpec(x.shape[1], config.hidden, num_classes))
    model.fit_scaling(x)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    best = (-math.inf, None)
    epochs_since_best = 0
    epoch = 0
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        for batch in _batches(len(y), config.batch_size, generator):
            loss = F.cross_entropy(model(_drop_inputs(x[batch], config.input_dropout, generator)), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = float((model(xv).argmax(dim=-1) == yv).double().mean())
        if accuracy > best[0]:
            best = (accuracy, copy.deepcopy(model.state_dict()))
            epochs_since_best = 0
        else:
            epochs_since_best += 1
            if epochs_since_best >= config.patience_epochs:
                break
    model.load_state_dict(best[1])
    model.eval()
    return model, {"epochs": epoch, "best_validation_accuracy": best[0]}

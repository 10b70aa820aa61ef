"""`switchyard train`: train gate, experts and dense model on one split; write a bundle.

After training, `select_routing` may replace the configured routing with a cheaper one
that is as accurate on the validation split. The manifest records every candidate it
scored.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from experts.bundle import Bundle, save_bundle
from experts.data import Dataset
from experts.models import count_parameters
from router.policy import RoutingConfig
from services.mixture import DenseTrainConfig, MixtureTrainConfig, evaluate_mixture, train_dense, train_mixture

__all__ = ["DEFAULT_MIXTURE", "DEFAULT_DENSE", "module_table", "select_routing", "train_bundle"]

# Values `select_routing` tries besides the configured ones: smaller top_p, lower gate
# confidence floors and higher escalation thresholds (on the experts' combined output).
ROUTING_TOP_P_CANDIDATES = (0.5, 0.6, 0.7, 0.8, 0.9)
ROUTING_FLOOR_CANDIDATES = (0.0, 0.3)
ROUTING_ESCALATION_CANDIDATES = (0.6, 0.7, 0.8, 0.9)

# Defaults for the digits demo. The dense baseline is an ordinary two-layer MLP for
# 8x8 images; each expert is a one-layer MLP a tenth of its size.
DEFAULT_MIXTURE = MixtureTrainConfig()
DEFAULT_DENSE = DenseTrainConfig()


def _accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        predictions = model(torch.from_numpy(x.reshape(len(x), -1))).argmax(dim=-1).numpy()
    return float((predictions == y).mean())


def select_routing(gate, experts, dense_model, x: np.ndarray, y: np.ndarray,
                   configured: RoutingConfig) -> tuple[RoutingConfig, list[dict]]:
    """Return the cheapest routing that is at least as accurate on (x, y) as `configured`.

    Candidates keep the configured `min_k` and combine four lists. `max_k` runs from
    `min_k` up to the configured one (a `max_k` above the number of experts counts as
    the number of experts). `top_p` is the configured one or a smaller value of
    `ROUTING_TOP_P_CANDIDATES`. The confidence floor is the configured one or a lower
    value of `ROUTING_FLOOR_CANDIDATES`. The escalation threshold is the configured one
    or a higher value of `ROUTING_ESCALATION_CANDIDATES`. If `configured` sends unsure
    rows to dense (a floor or an escalation threshold above 0), every candidate keeps
    at least one of the two above 0.

    A candidate qualifies when its accuracy is at least the configured routing's. The
    winner has the fewest FLOPs per example (dense rows included). Ties go to the
    fewest experts per routed row, then to the fewest values changed from
    `configured`, so settings that make no difference stay as configured. The
    configured routing is scored first and always qualifies, so the result is never
    less accurate on (x, y).

    Returns the chosen routing and one record per candidate, in the order scored.
    """
    # A routing that sends unsure rows to dense keeps doing so: the choice may trade the
    # gate's floor for escalation on the experts' output, but not drop both.
    keeps_fallback = configured.confidence_floor > 0 or configured.escalate_below > 0
    top_ps = sorted({configured.top_p, *(p for p in ROUTING_TOP_P_CANDIDATES if p < configured.top_p)})
    floors = sorted({configured.confidence_floor,
                     *(f for f in ROUTING_FLOOR_CANDIDATES if f < configured.confidence_floor)})
    escalations = sorted({configured.escalate_below,
                          *(e for e in ROUTING_ESCALATION_CANDIDATES if e > configured.escalate_below)})
    # More experts per row than the mixture has would only repeat the largest k.
    highest_k = max(configured.min_k, min(configured.max_k, len(experts)))
    start = replace(configured, max_k=highest_k)
    candidates = [start] + [
        replace(configured, top_p=top_p, max_k=max_k, confidence_floor=floor, escalate_below=escalation)
        for max_k in range(configured.min_k, highest_k + 1) for top_p in top_ps
        for floor in floors for escalation in escalations
        if (top_p, max_k, floor, escalation) != (start.top_p, start.max_k, start.confidence_floor,
                                                  start.escalate_below)
        and (floor > 0 or escalation > 0 or not keeps_fallback)
    ]
    records = []
    for routing in candidates:
        scored = evaluate_mixture(gate, experts, x, y, routing, dense=dense_model)
        records.append({"routing": asdict(routing), "accuracy": scored["accuracy"],
                        "flops_per_example": scored["flops_per_example"],
                        "dense_fraction": scored["dense_fraction"],
                        "mean_experts_per_request": scored["mean_experts_per_request"]})
    floor_accuracy = records[0]["accuracy"]

    def changed(routing: RoutingConfig) -> int:
        return sum(getattr(routing, name) != getattr(start, name)
                   for name in ("top_p", "max_k", "confidence_floor", "escalate_below"))

    best = min((index for index, record in enumerate(records) if record["accuracy"] >= floor_accuracy),
               key=lambda index: (records[index]["flops_per_example"], records[index]["mean_experts_per_request"],
                                  changed(candidates[index])))
    return candidates[best], records


def train_bundle(
    dataset: Dataset,
    out: str | Path,
    mixture: MixtureTrainConfig = DEFAULT_MIXTURE,
    dense: DenseTrainConfig = DEFAULT_DENSE,
    seed: int | None = None,
    choose_routing: bool = True,
) -> tuple[Bundle, dict]:
    """Train everything on `dataset` and save a verified bundle at `out`.

    With `choose_routing`, the bundle's routing is `select_routing` on the validation
    split, starting from `mixture.routing`; without it, `mixture.routing` as given.

    Returns the bundle and a report with parameters, FLOPs per example and metrics of
    every module.
    """
    if seed is not None:
        mixture = replace(mixture, seed=seed)
        dense = replace(dense, seed=seed)
    started = time.perf_counter()
    train, validation, test = dataset.train, dataset.validation, dataset.test

    # The dense model trains first because it is the distillation teacher when
    # `mixture.distill_weight` > 0. Each trainer seeds torch itself, so the order
    # does not change either model.
    dense_model, dense_history = train_dense(
        train.x, train.y, validation.x, validation.y, dataset.num_classes, dense
    )
    gate, experts, mixture_history = train_mixture(
        train.x, train.y, validation.x, validation.y, dataset.num_classes, mixture,
        teacher=dense_model if mixture.distill_weight > 0 else None,
    )

    routing, routing_candidates = mixture.routing, []
    if choose_routing:
        routing, routing_candidates = select_routing(gate, experts, dense_model, validation.x, validation.y,
                                                     mixture.routing)
    metrics = {}
    for split_name, split in (("validation", validation), ("test", test)):
        moe = evaluate_mixture(gate, experts, split.x, split.y, routing, dense=dense_model)
        metrics[split_name] = {
            "moe_accuracy": moe["accuracy"],
            "dense_accuracy": _accuracy(dense_model, split.x, split.y),
            "expert_accuracy": [_accuracy(expert, split.x, split.y) for expert in experts],
            "mean_experts_per_request": moe["mean_experts_per_request"],
            "dense_fraction": moe["dense_fraction"],
            "moe_flops_per_example": moe["flops_per_example"],
            "compute_ratio": moe["flops_per_example"] / dense_model.flops,
            "expert_load": moe["expert_load"],
        }

    modules = {"gate": gate, **{f"expert-{i}": e for i, e in enumerate(experts)}, "dense": dense_model}
    manifest = {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": {
            "name": dataset.name,
            "seed": dataset.seed,
            "input_shape": list(dataset.input_shape),
            "input_dtype": "float32",
            "class_names": list(dataset.class_names),
            "split_sizes": {"train": len(train), "validation": len(validation), "test": len(test)},
        },
        "gate": gate.spec.to_dict(),
        "experts": [expert.spec.to_dict() for expert in experts],
        "dense": dense_model.spec.to_dict(),
        "routing": asdict(routing),
        "routing_selection": {"configured": asdict(mixture.routing), "chosen": asdict(routing),
                              "split": "validation", "candidates": routing_candidates},
        "flops": {name: module.flops for name, module in modules.items()},
        "params": {name: count_parameters(module) for name, module in modules.items()},
        "metrics": metrics,
        "training": {"mixture": mixture_history, "dense": dense_history, "seed": mixture.seed},
    }
    bundle = save_bundle(out, manifest, {name: module.state_dict() for name, module in modules.items()})
    report = {
        "bundle": str(Path(out)),
        "model_version": bundle.version,
        "seconds": round(time.perf_counter() - started, 1),
        "modules": module_table(manifest),
        "routing": asdict(routing),
        "routing_selection": _selection_summary(mixture.routing, routing, routing_candidates),
        "metrics": metrics,
    }
    return bundle, report


def _selection_summary(configured: RoutingConfig, chosen: RoutingConfig, candidates: list[dict]) -> dict | None:
    """Validation accuracy and FLOPs of the configured and the chosen routing; None without a selection."""
    if not candidates:
        return None

    def scores(routing: RoutingConfig) -> dict:
        record = next((r for r in candidates if r["routing"] == asdict(routing)), candidates[0])
        return {"routing": asdict(routing), "validation_accuracy": record["accuracy"],
                "flops_per_example": record["flops_per_example"], "dense_fraction": record["dense_fraction"]}

    return {"candidates": len(candidates), "configured": scores(configured), "chosen": scores(chosen)}


def module_table(manifest: dict) -> list[dict]:
    """One row per module: name, architecture, parameters and FLOPs per example."""
    rows = []
    for name in manifest["params"]:
        if name == "gate":
            spec = manifest["gate"]
            shape = f"{spec['in_features']}-{spec['hidden']}-{spec['num_experts']}" if spec["hidden"] else \
                f"{spec['in_features']}-{spec['num_experts']}"
        else:
            spec = manifest["dense"] if name == "dense" else manifest["experts"][int(name.split("-")[1])]
            shape = "-".join(str(w) for w in (spec["in_features"], *spec["hidden"], spec["out_features"]))
        rows.append({"module": name, "layers": shape, "params": manifest["params"][name],
                     "flops": manifest["flops"][name]})
    return rows


def routing_from_manifest(manifest: dict) -> RoutingConfig:
    return RoutingConfig(**manifest["routing"])

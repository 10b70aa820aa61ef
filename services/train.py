"""`switchyard train`: train gate, experts and dense model on one split; write a bundle."""

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

__all__ = ["DEFAULT_MIXTURE", "DEFAULT_DENSE", "module_table", "train_bundle"]

# Defaults for the digits demo. The dense baseline is an ordinary two-layer MLP for
# 8x8 images; each expert is a one-layer MLP a tenth of its size.
DEFAULT_MIXTURE = MixtureTrainConfig()
DEFAULT_DENSE = DenseTrainConfig()


def _accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        predictions = model(torch.from_numpy(x.reshape(len(x), -1))).argmax(dim=-1).numpy()
    return float((predictions == y).mean())


def train_bundle(
    dataset: Dataset,
    out: str | Path,
    mixture: MixtureTrainConfig = DEFAULT_MIXTURE,
    dense: DenseTrainConfig = DEFAULT_DENSE,
    seed: int | None = None,
) -> tuple[Bundle, dict]:
    """Train everything on `dataset` and save a verified bundle at `out`.

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

    routing = mixture.routing
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
        "metrics": metrics,
    }
    return bundle, report


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

"""Pilot report: test accuracy against FLOPs per example for the mixture and for dense MLPs.

The question it answers: at what compute does the mixture match the best dense model?

Procedure, repeated for every seed (the seed sets both the data split and the weights):
1. Train every dense MLP of the plan with early stopping on validation accuracy.
2. Train every mixture of the plan the same way. A mixture with `distill_weight` > 0
   learns from the dense model with the best validation accuracy of that seed.
3. Evaluate every mixture under every routing setting of the plan (top-p, min/max k,
   confidence floor) and, when the floor sends rows to dense, with every fallback
   model of the plan. Routing is swept on the trained weights, without retraining.

Then, with accuracies and FLOPs averaged over the seeds:
4. The best dense model is the one with the highest mean VALIDATION accuracy. A model
   "matches" when its mean validation accuracy is within `MATCH_TOLERANCE` of it.
5. `dense_match_flops` belongs to the cheapest matching dense model and `moe_flops` to
   the cheapest matching mixture setting, so `moe_flops_ratio` compares like with like
   rather than against the largest dense model.
6. Every reported accuracy is the mean TEST accuracy of the model or setting chosen on
   validation; nothing is selected on the test split.

Every swept mixture is servable as it is: MLP experts, a gate with zero or one hidden
layer, a `RoutingConfig` and a dense fallback are what the bundle manifest and the
router's dispatcher already run.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experts.data import load_dataset
from experts.models import MLP
from router.policy import RoutingConfig, combine, select_experts
from services.mixture import DenseTrainConfig, MixtureTrainConfig, evaluate_mixture, train_dense, train_mixture

__all__ = [
    "MATCH_TOLERANCE",
    "TARGET_FLOPS_RATIO",
    "PilotPlan",
    "cheapest_within",
    "full_plan",
    "pareto_front",
    "quick_plan",
    "run_pilot",
    "summarize",
]

# Accuracy gap (absolute, 0.005 = half a percentage point) within which a model counts
# as matching the best dense model.
MATCH_TOLERANCE = 0.005
# The mixture should match the best dense accuracy at no more than this share of the
# FLOPs of the cheapest dense model that matches it.
TARGET_FLOPS_RATIO = 0.35
# Floating-point slack when comparing means of accuracies.
_EPSILON = 1e-9


@dataclass(frozen=True)
class PilotPlan:
    """What the pilot trains and sweeps.

    `fallbacks` are indices into `dense_hidden`: the dense models that answer the rows a
    confidence floor above 0 sends to dense. Their FLOPs count on those rows.
    """

    dense_hidden: tuple[tuple[int, ...], ...]
    mixtures: tuple[MixtureTrainConfig, ...]
    routings: tuple[RoutingConfig, ...]
    fallbacks: tuple[int, ...]
    max_epochs: int = 150
    patience_epochs: int = 20

    def __post_init__(self) -> None:
        if not self.dense_hidden or not self.mixtures or not self.routings:
            raise ValueError("a pilot plan needs at least one dense model, one mixture and one routing setting")
        for index in self.fallbacks:
            if not 0 <= index < len(self.dense_hidden):
                raise ValueError(f"fallback index {index} is out of range; the plan has "
                                 f"{len(self.dense_hidden)} dense models")


def _routing_grid(top_ps: Sequence[float], ks: Sequence[tuple[int, int]],
                  floors: Sequence[float]) -> tuple[RoutingConfig, ...]:
    """Every (top_p, (min_k, max_k), floor) combination; top_p is skipped when min_k = max_k."""
    settings = []
    for min_k, max_k in ks:
        for top_p in (top_ps if max_k > min_k else top_ps[:1]):
            for floor in floors:
                settings.append(RoutingConfig(top_p=top_p, min_k=min_k, max_k=max_k, confidence_floor=floor))
    return tuple(settings)


def _mixture(num_experts: int, expert_hidden: tuple[int, ...], gate_hidden: int, distill_weight: float,
             routing_smoothing: float) -> MixtureTrainConfig:
    return MixtureTrainConfig(num_experts=num_experts, expert_hidden=expert_hidden, gate_hidden=gate_hidden,
                              distill_weight=distill_weight, routing_smoothing=routing_smoothing,
                              routing=RoutingConfig(top_p=0.6, min_k=1, max_k=1, confidence_floor=0.0))


def full_plan() -> PilotPlan:
    """The published sweep: seven dense MLPs and eight mixture designs."""
    return PilotPlan(
        dense_hidden=((32,), (64,), (128,), (256,), (128, 128), (256, 256), (512, 512)),
        mixtures=(
            _mixture(4, (32,), 16, 0.0, 0.0),  # the default design, scaled to 784 inputs
            _mixture(8, (32,), 0, 0.0, 0.0),
            _mixture(4, (16,), 0, 1.0, 0.0),
            _mixture(4, (32,), 0, 1.0, 0.0),
            _mixture(8, (16,), 0, 1.0, 0.0),
            _mixture(4, (16,), 0, 1.0, 0.05),
            _mixture(4, (32,), 0, 1.0, 0.05),
            _mixture(8, (16,), 0, 1.0, 0.05),
        ),
        routings=_routing_grid(top_ps=(0.5, 0.7, 0.9), ks=((1, 1), (1, 2), (2, 2), (1, 4)),
                               floors=(0.0, 0.3, 0.4, 0.5, 0.6, 0.7)),
        fallbacks=(1, 3),
    )


def quick_plan() -> PilotPlan:
    """A smaller sweep that finishes within a few minutes on 2 CPU cores."""
    return PilotPlan(
        dense_hidden=((32,), (64,), (256,), (256, 256)),
        mixtures=(
            _mixture(4, (16,), 0, 1.0, 0.0),
            _mixture(4, (16,), 0, 1.0, 0.05),
        ),
        routings=_routing_grid(top_ps=(0.7,), ks=((1, 1), (1, 2)), floors=(0.0, 0.4, 0.5, 0.6)),
        fallbacks=(1,),
        max_epochs=80,
        patience_epochs=10,
    )


# ---------------------------------------------------------------------------- selection


def pareto_front(points: Sequence[dict], accuracy_key: str = "test_accuracy") -> list[dict]:
    """Points that no cheaper-or-equal point beats on accuracy, sorted by FLOPs."""
    front: list[dict] = []
    best = -math.inf
    for point in sorted(points, key=lambda p: (p["flops"], -p[accuracy_key])):
        if point[accuracy_key] > best + _EPSILON:
            front.append(point)
            best = point[accuracy_key]
    return front


def cheapest_within(points: Sequence[dict], reference: float, tolerance: float = MATCH_TOLERANCE,
                    accuracy_key: str = "validation_accuracy") -> dict | None:
    """The point with the fewest FLOPs whose accuracy is at least `reference - tolerance`."""
    matching = [p for p in points if p[accuracy_key] >= reference - tolerance - _EPSILON]
    if not matching:
        return None
    return min(matching, key=lambda p: (p["flops"], -p[accuracy_key]))


def summarize(dense_points: Sequence[dict], moe_points: Sequence[dict],
              tolerance: float = MATCH_TOLERANCE) -> dict[str, Any]:
    """Choose the best dense model, the matching dense model and the matching mixture setting.

    Selection uses `validation_accuracy`; the reported accuracies are `test_accuracy`.
    `moe_*` fields are None when no mixture setting matches on validation.
    """
    if not dense_points:
        raise ValueError("summarize needs at least one dense point")
    best = max(dense_points, key=lambda p: (p["validation_accuracy"], -p["flops"]))
    reference = best["validation_accuracy"]
    dense_match = cheapest_within(dense_points, reference, tolerance)
    moe_match = cheapest_within(moe_points, reference, tolerance)
    most_accurate_moe = max(moe_points, key=lambda p: (p["validation_accuracy"], -p["flops"]), default=None)

    summary: dict[str, Any] = {
        "selection_split": "validation",
        "match_tolerance": tolerance,
        "dense_best_accuracy": best["test_accuracy"],
        "dense_best_validation_accuracy": reference,
        "dense_best_flops": best["flops"],
        "dense_best_label": best["label"],
        "dense_match_accuracy": dense_match["test_accuracy"],
        "dense_match_flops": dense_match["flops"],
        "dense_match_label": dense_match["label"],
        "moe_accuracy": None,
        "moe_flops": None,
        "moe_flops_ratio": None,
        "moe_setting": None,
        "moe_most_accurate": most_accurate_moe,
    }
    if moe_match is not None:
        summary.update(
            moe_accuracy=moe_match["test_accuracy"],
            moe_flops=moe_match["flops"],
            moe_flops_ratio=moe_match["flops"] / dense_match["flops"],
            moe_setting=moe_match,
        )
    ratio = summary["moe_flops_ratio"]
    summary["target_flops_ratio"] = TARGET_FLOPS_RATIO
    summary["meets_target"] = ratio is not None and ratio <= TARGET_FLOPS_RATIO
    summary["moe_matches_on_test"] = (moe_match is not None
                                      and moe_match["test_accuracy"] >= best["test_accuracy"] - tolerance - _EPSILON)
    return summary


# ---------------------------------------------------------------------------- training


def _accuracy(model: MLP, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        predictions = model(torch.from_numpy(x.reshape(len(x), -1))).argmax(dim=-1).numpy()
    return float((predictions == y).mean())


def _dense_label(hidden: tuple[int, ...]) -> str:
    return "dense " + "x".join(str(width) for width in hidden)


def _mixture_label(config: MixtureTrainConfig) -> str:
    gate = "linear gate" if config.gate_hidden == 0 else f"gate {config.gate_hidden}"
    label = f"{config.num_experts} experts x {'x'.join(map(str, config.expert_hidden))}, {gate}"
    if config.distill_weight > 0:
        label += f", distill {config.distill_weight:g}"
    if config.routing_smoothing > 0:
        label += f", smoothing {config.routing_smoothing:g}"
    return label


def _routing_label(routing: RoutingConfig) -> str:
    if routing.min_k == routing.max_k:
        choice = f"k={routing.min_k}"
    else:
        choice = f"top_p={routing.top_p:g} k={routing.min_k}..{routing.max_k}"
    return f"{choice} floor={routing.confidence_floor:g}"


@dataclass
class _SeedModels:
    """Models of one seed, kept for the latency measurement of the chosen settings."""

    dense: dict[str, MLP] = field(default_factory=dict)
    mixtures: dict[str, tuple] = field(default_factory=dict)
    test_x: np.ndarray | None = None


def _run_seed(dataset_name: str, seed: int, plan: PilotPlan, log) -> tuple[list[dict], list[dict], _SeedModels]:
    """Train and evaluate everything of `plan` on one seed; return per-seed dense and mixture rows."""
    data = load_dataset(dataset_name, seed=seed)
    train, validation, test = data.train, data.validation, data.test
    models = _SeedModels(test_x=test.x)

    # 1. Dense models.
    dense_rows, dense_models = [], []
    for hidden in plan.dense_hidden:
        config = DenseTrainConfig(hidden=hidden, seed=seed, max_epochs=plan.max_epochs,
                                  patience_epochs=plan.patience_epochs)
        model, history = train_dense(train.x, train.y, validation.x, validation.y, data.num_classes, config)
        label = _dense_label(hidden)
        dense_models.append(model)
        models.dense[label] = model
        dense_rows.append({"label": label, "hidden": list(hidden), "flops": model.flops,
                           "validation_accuracy": _accuracy(model, validation.x, validation.y),
                           "test_accuracy": _accuracy(model, test.x, test.y), "epochs": history["epochs"]})
        log.info("pilot_dense_trained", seed=seed, model=label, flops=model.flops,
                 test_accuracy=dense_rows[-1]["test_accuracy"], epochs=history["epochs"])
    teacher = dense_models[max(range(len(dense_rows)), key=lambda i: dense_rows[i]["validation_accuracy"])]

    # 2-3. Mixtures, each evaluated under every routing setting and fallback.
    moe_rows = []
    for mixture in plan.mixtures:
        config = replace(mixture, seed=seed, max_epochs=plan.max_epochs, patience_epochs=plan.patience_epochs)
        gate, experts, history = train_mixture(train.x, train.y, validation.x, validation.y, data.num_classes,
                                               config, teacher=teacher if config.distill_weight > 0 else None)
        mixture_label = _mixture_label(config)
        models.mixtures[mixture_label] = (gate, experts)
        log.info("pilot_mixture_trained", seed=seed, model=mixture_label, epochs=history["epochs"])
        for routing in plan.routings:
            fallbacks = plan.fallbacks if routing.confidence_floor > 0 else (None,)
            for fallback in fallbacks:
                dense = None if fallback is None else dense_models[fallback]
                scores = {split_name: evaluate_mixture(gate, experts, split.x, split.y, routing, dense=dense)
                          for split_name, split in (("validation", validation), ("test", test))}
                moe_rows.append(_moe_row(mixture_label, config, routing, dense, scores))
    return dense_rows, moe_rows, models


def _moe_row(mixture_label: str, config: MixtureTrainConfig, routing: RoutingConfig, dense: MLP | None,
             scores: dict[str, dict]) -> dict:
    test = scores["test"]
    fallback_label = None if dense is None else _dense_label(dense.spec.hidden)
    label = f"{mixture_label}; {_routing_label(routing)}"
    if fallback_label:
        label += f"; fallback {fallback_label}"
    # A one-row request makes one remote call per chosen expert, or one to dense.
    experts_per_routed_row = test["mean_experts_per_request"]
    remote_calls = (1 - test["dense_fraction"]) * experts_per_routed_row + test["dense_fraction"]
    return {
        "label": label,
        "mixture": mixture_label,
        "num_experts": config.num_experts,
        "expert_hidden": list(config.expert_hidden),
        "gate_hidden": config.gate_hidden,
        "distill_weight": config.distill_weight,
        "routing_smoothing": config.routing_smoothing,
        "routing": asdict(routing),
        "fallback": fallback_label,
        "flops": test["flops_per_example"],
        "validation_flops": scores["validation"]["flops_per_example"],
        "validation_accuracy": scores["validation"]["accuracy"],
        "test_accuracy": test["accuracy"],
        "mean_experts_per_request": experts_per_routed_row,
        "remote_calls_per_request": remote_calls,
        "dense_fraction": test["dense_fraction"],
    }


_MEAN_KEYS = ("flops", "validation_flops", "validation_accuracy", "test_accuracy", "mean_experts_per_request",
              "remote_calls_per_request", "dense_fraction", "epochs")


def _average(rows_per_seed: Sequence[Sequence[dict]]) -> list[dict]:
    """Mean of every numeric field over seeds, per label; adds `test_accuracy_std`."""
    by_label: dict[str, list[dict]] = {}
    for rows in rows_per_seed:
        for row in rows:
            by_label.setdefault(row["label"], []).append(row)
    averaged = []
    for label, rows in by_label.items():
        point = dict(rows[0])
        for key in _MEAN_KEYS:
            if key in point:
                point[key] = statistics.fmean(row[key] for row in rows)
        tests = [row["test_accuracy"] for row in rows]
        point["test_accuracy_std"] = statistics.stdev(tests) if len(tests) > 1 else 0.0
        point["seeds"] = len(rows)
        averaged.append(point)
    return averaged


# ---------------------------------------------------------------------------- latency


@torch.inference_mode()
def _median_latency_ms(predict: Callable[[torch.Tensor], Any], rows: np.ndarray) -> float:
    """Median in-process time of `predict` on one-row batches, in milliseconds."""
    timings = []
    for row in rows:
        x = torch.from_numpy(row.reshape(1, -1))
        started = time.perf_counter()
        predict(x)
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def _mixture_predictor(gate, experts, routing: RoutingConfig, dense: MLP | None):
    """One-row mixture forward pass that runs only the chosen experts, as the router does."""

    def predict(x: torch.Tensor) -> torch.Tensor:
        selection = select_experts(torch.softmax(gate(x), dim=-1), routing)
        if bool(selection.low_confidence[0]) and dense is not None:
            return torch.softmax(dense(x), dim=-1)
        chosen = torch.flatnonzero(selection.mask[0]).tolist()
        expert_probs = torch.zeros(1, len(experts), experts[0].spec.out_features)  # [1, E, C]
        for index in chosen:
            expert_probs[:, index] = torch.softmax(experts[index](x), dim=-1)
        return combine(expert_probs, selection.weights)

    return predict


def _latency(summary: dict, models: _SeedModels, rows: int = 200) -> dict[str, float | None]:
    """In-process one-row latency of the chosen dense and mixture models (seed 0 weights).

    Excludes HTTP and Ray Serve hops; `switchyard bench` measures those.
    """
    sample = models.test_x[:rows]
    latency = {"dense_match_ms": _median_latency_ms(models.dense[summary["dense_match_label"]], sample),
               "moe_ms": None}
    setting = summary["moe_setting"]
    if setting is not None:
        gate, experts = models.mixtures[setting["mixture"]]
        dense = models.dense.get(setting["fallback"]) if setting["fallback"] else None
        predictor = _mixture_predictor(gate, experts, RoutingConfig(**setting["routing"]), dense)
        latency["moe_ms"] = _median_latency_ms(predictor, sample)
    return latency


# ---------------------------------------------------------------------------- plots and report


def _plot(report: dict, out: Path) -> list[str]:
    """Write the accuracy/FLOPs plot and the experts-per-request plot; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    dense, moe = report["dense_points"], report["moe_points"]
    summary = report
    paths = []

    figure, axes = plt.subplots(figsize=(8, 5.5))
    axes.scatter([p["flops"] for p in moe], [100 * p["test_accuracy"] for p in moe], s=10, alpha=0.3,
                 color="tab:orange", label="mixture settings")
    axes.scatter([p["flops"] for p in dense], [100 * p["test_accuracy"] for p in dense], s=30,
                 color="tab:blue", label="dense MLPs")
    for points, color, name in ((report["dense_front"], "tab:blue", "dense Pareto front"),
                                (report["moe_front"], "tab:orange", "mixture Pareto front")):
        axes.plot([p["flops"] for p in points], [100 * p["test_accuracy"] for p in points], "-o", color=color,
                  markersize=4, label=name)
    threshold = 100 * (summary["dense_best_accuracy"] - summary["match_tolerance"])
    axes.axhline(threshold, color="gray", linestyle="--", linewidth=1,
                 label=f"best dense - {100 * summary['match_tolerance']:g} point")
    axes.axvline(summary["dense_match_flops"] * TARGET_FLOPS_RATIO, color="tab:green", linestyle=":",
                 linewidth=1, label=f"{TARGET_FLOPS_RATIO:g} x FLOPs of matching dense")
    if summary["moe_setting"] is not None:
        axes.scatter([summary["moe_flops"]], [100 * summary["moe_accuracy"]], marker="*", s=200,
                     color="tab:red", zorder=5, label="chosen mixture setting")
    axes.set_xscale("log")
    axes.set_xlabel("FLOPs per example (multiply-adds, log scale)")
    axes.set_ylabel(f"test accuracy, % (mean of {report['seeds']} seeds)")
    axes.set_title(f"Accuracy against compute on {report['dataset']}")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    path = out / "pilot_accuracy_flops.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    paths.append(str(path))

    figure, axes = plt.subplots(figsize=(8, 5))
    scatter = axes.scatter([p["remote_calls_per_request"] for p in moe], [100 * p["test_accuracy"] for p in moe],
                           c=[p["flops"] for p in moe], cmap="viridis", s=14)
    figure.colorbar(scatter, label="FLOPs per example")
    axes.axhline(threshold, color="gray", linestyle="--", linewidth=1)
    axes.set_xlabel("remote calls per one-row request (experts + dense fallback)")
    axes.set_ylabel("test accuracy, %")
    axes.set_title("Mixture settings: accuracy against remote calls")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    path = out / "pilot_remote_calls.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    paths.append(str(path))
    return paths


def run_pilot(
    dataset: str = "mnist5k",
    seeds: int = 3,
    quick: bool = False,
    out: str | Path = "bench-results/pilot",
    plan: PilotPlan | None = None,
    log=None,
) -> dict[str, Any]:
    """Run the sweep over `seeds` seeds (0 .. seeds-1) and write pilot.json and the plots under `out`.

    Returns the report: SPEC's pilot fields (`dataset`, `seeds`, `dense_best_accuracy`,
    `dense_match_flops`, `moe_accuracy`, `moe_flops`, `moe_flops_ratio`), the chosen
    settings, both Pareto fronts, every averaged point and the plot paths.

    Raises:
        ValueError: `seeds` is below 1.
        experts.data.DatasetError: `dataset` is not a built-in data set.
    """
    from monitoring.logging import get_logger

    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    log = log or get_logger("pilot")
    plan = plan or (quick_plan() if quick else full_plan())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    dense_per_seed, moe_per_seed, first_models = [], [], None
    for seed in range(seeds):
        dense_rows, moe_rows, models = _run_seed(dataset, seed, plan, log)
        dense_per_seed.append(dense_rows)
        moe_per_seed.append(moe_rows)
        first_models = first_models or models

    dense_points = _average(dense_per_seed)
    moe_points = _average(moe_per_seed)
    summary = summarize(dense_points, moe_points)
    report: dict[str, Any] = {
        "dataset": dataset,
        "seeds": seeds,
        "quick": quick,
        **summary,
        "mean_experts_per_request": summary["moe_setting"]["mean_experts_per_request"]
        if summary["moe_setting"] else None,
        "remote_calls_per_request": summary["moe_setting"]["remote_calls_per_request"]
        if summary["moe_setting"] else None,
        "latency_ms": _latency(summary, first_models),
        "flops_convention": "multiply-adds of linear layers per example; mixture includes gate, chosen "
                            "experts and the dense fallback on the rows it answers",
        "dense_front": pareto_front(dense_points),
        "moe_front": pareto_front(moe_points),
        "dense_points": dense_points,
        "moe_points": moe_points,
        "torch_threads": torch.get_num_threads(),
    }
    report["plots"] = _plot(report, out)
    report["seconds"] = round(time.perf_counter() - started, 1)
    (out / "pilot.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("pilot_finished", dataset=dataset, seeds=seeds, seconds=report["seconds"],
             moe_flops_ratio=report["moe_flops_ratio"], out=str(out))
    return report

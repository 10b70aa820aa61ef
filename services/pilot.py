"""Pilot report: test accuracy against FLOPs per example for the mixture and for dense MLPs.

The question it answers: at what compute does the mixture match the best dense model?

Procedure, repeated for every seed (the seed sets both the data split and the weights):
0. Split the validation rows into two stratified halves: the stopping half for early
   stopping and the selection half for every choice below.
1. Train every dense MLP of the plan with early stopping on the stopping half.
2. Train every mixture of the plan the same way. A mixture with `distill_weight` > 0
   learns from the dense model with the best selection-half accuracy of that seed.
3. Evaluate every mixture under every routing setting of the plan (top-p, min/max k,
   confidence floor, escalation threshold) and, when the floor or the escalation
   threshold sends rows to dense, with every fallback model of the plan. Routing is
   swept on the trained weights, without retraining.

Then, with accuracies and FLOPs averaged over the seeds:
4. The best dense model is the one with the highest mean selection-half accuracy
   (`validation_accuracy` in the report). A model "matches" when its mean
   selection-half accuracy is within `MATCH_TOLERANCE` of it.
5. `dense_match_flops` belongs to the cheapest matching dense model and `moe_flops` to
   the cheapest matching mixture setting, so `moe_flops_ratio` compares like with like
   rather than against the largest dense model.
6. Every reported accuracy is the mean TEST accuracy of the model or setting chosen on
   the selection half; nothing is selected on the test split.

Every swept mixture is servable as it is: MLP experts, a gate with zero or one hidden
layer, a `RoutingConfig` (escalation included) and a dense fallback are what the
bundle manifest and the router's dispatcher run.
`services.train.train_bundle` distils from the bundle's own dense model when the
mixture config has `distill_weight` > 0, while the pilot distils from the dense model
with the best selection-half accuracy.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experts.data import Split, load_dataset
from experts.models import MLP
from router.policy import RoutingConfig, combine, needs_escalation, select_experts
from services.mixture import DenseTrainConfig, MixtureTrainConfig, evaluate_mixture, train_dense, train_mixture
from services.pilot_plots import plot_pilot

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

    `fallbacks` are indices into `dense`: the dense models that predict the rows a
    confidence floor or an escalation threshold above 0 sends to dense. Their FLOPs
    count on those rows.
    """

    dense: tuple[DenseTrainConfig, ...]
    mixtures: tuple[MixtureTrainConfig, ...]
    routings: tuple[RoutingConfig, ...]
    fallbacks: tuple[int, ...]
    max_epochs: int = 150
    patience_epochs: int = 20

    def __post_init__(self) -> None:
        if not self.dense or not self.mixtures or not self.routings:
            raise ValueError("a pilot plan needs at least one dense model, one mixture and one routing setting")
        for index in self.fallbacks:
            if not 0 <= index < len(self.dense):
                raise ValueError(f"fallback index {index} is out of range; the plan has "
                                 f"{len(self.dense)} dense models")


def _routing_grid(top_ps: Sequence[float], ks: Sequence[tuple[int, int]], floors: Sequence[float],
                  escalations: Sequence[float] = (0.0,)) -> tuple[RoutingConfig, ...]:
    """Build every (top_p, (min_k, max_k), floor, escalation) combination, with one top_p when min_k = max_k."""
    settings = []
    for min_k, max_k in ks:
        for top_p in (top_ps if max_k > min_k else top_ps[:1]):
            for floor in floors:
                for escalate_below in escalations:
                    settings.append(RoutingConfig(top_p=top_p, min_k=min_k, max_k=max_k, confidence_floor=floor,
                                                  escalate_below=escalate_below))
    return tuple(settings)


def _dense(*hidden: tuple[int, ...], input_dropout: float = 0.0) -> tuple[DenseTrainConfig, ...]:
    return tuple(DenseTrainConfig(hidden=widths, input_dropout=input_dropout) for widths in hidden)


def _mixture(num_experts: int, expert_hidden: tuple[int, ...], gate_hidden: int, distill_weight: float,
             routing_smoothing: float = 0.0, input_dropout: float = 0.0) -> MixtureTrainConfig:
    return MixtureTrainConfig(num_experts=num_experts, expert_hidden=expert_hidden, gate_hidden=gate_hidden,
                              distill_weight=distill_weight, routing_smoothing=routing_smoothing,
                              input_dropout=input_dropout,
                              routing=RoutingConfig(top_p=0.6, min_k=1, max_k=1, confidence_floor=0.0))


def _indices(dense: Sequence[DenseTrainConfig], *wanted: tuple[tuple[int, ...], float]) -> tuple[int, ...]:
    """Return the positions in `dense` of the (hidden, input_dropout) pairs in `wanted`."""
    keys = [(config.hidden, config.input_dropout) for config in dense]
    return tuple(keys.index(key) for key in wanted)


# Dense MLPs of both plans: one hidden layer of 16 to 256 units, each with and without
# input dropout. A 784-32-10 MLP costs 25,408 FLOPs.
_ONE_LAYER = ((16,), (32,), (64,), (128,), (256,))
# Thresholds on the combined top class probability below which a row escalates to dense.
_ESCALATIONS = (0.8, 0.85, 0.9, 0.93, 0.95, 0.97)


def full_plan() -> PilotPlan:
    """Return the published sweep: 14 dense MLPs and 12 mixture designs."""
    dense = (*_dense(*_ONE_LAYER, (256, 256), (512, 512)),
             *_dense(*_ONE_LAYER, (512, 512), input_dropout=0.2))
    return PilotPlan(
        dense=dense,
        mixtures=(
            _mixture(4, (32,), 16, 0.0, 0.0),  # the digits default design, on 784 inputs
            _mixture(8, (32,), 0, 0.0, 0.0),
            _mixture(4, (16,), 0, 1.0, 0.0),
            _mixture(4, (32,), 0, 1.0, 0.0),
            _mixture(8, (16,), 0, 1.0, 0.0),
            _mixture(4, (16,), 0, 1.0, 0.05),
            _mixture(4, (16,), 0, 1.0, input_dropout=0.2),
            _mixture(4, (32,), 0, 1.0, input_dropout=0.2),
            _mixture(4, (8,), 0, 1.0, input_dropout=0.1),
            _mixture(4, (8,), 0, 1.0, input_dropout=0.2),
            _mixture(4, (8,), 0, 1.0, input_dropout=0.3),
            _mixture(8, (8,), 0, 1.0, input_dropout=0.2),
        ),
        routings=(*_routing_grid(top_ps=(0.5, 0.7, 0.9), ks=((1, 1), (1, 2), (2, 2)),
                                 floors=(0.0, 0.3, 0.4, 0.5, 0.6)),
                  *_routing_grid(top_ps=(0.5, 0.7), ks=((1, 1), (1, 2)), floors=(0.0,),
                                 escalations=_ESCALATIONS)),
        fallbacks=_indices(dense, ((32,), 0.2), ((64,), 0.2), ((256,), 0.2)),
    )


def quick_plan() -> PilotPlan:
    """Return the `--quick` sweep: the one-layer dense MLPs and the three escalating designs.

    Training settings equal the full plan's, so that the quick run's numbers are
    comparable with the published ones.
    """
    dense = (*_dense(*_ONE_LAYER), *_dense(*_ONE_LAYER, input_dropout=0.2))
    return PilotPlan(
        dense=dense,
        mixtures=(
            _mixture(4, (8,), 0, 1.0, input_dropout=0.1),
            _mixture(4, (8,), 0, 1.0, input_dropout=0.3),
            _mixture(8, (8,), 0, 1.0, input_dropout=0.2),
        ),
        routings=(*_routing_grid(top_ps=(0.5,), ks=((1, 1),), floors=(0.0, 0.4, 0.5)),
                  *_routing_grid(top_ps=(0.5,), ks=((1, 1),), floors=(0.0,), escalations=_ESCALATIONS)),
        fallbacks=_indices(dense, ((32,), 0.2), ((64,), 0.2)),
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
    """Return the point with the fewest FLOPs whose accuracy is at least `reference - tolerance`."""
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
    max_accuracy_moe = max(moe_points, key=lambda p: (p["validation_accuracy"], -p["flops"]), default=None)

    summary: dict[str, Any] = {
        "selection_split": "validation (the half not used for early stopping)",
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
        "moe_max_accuracy_setting": max_accuracy_moe,
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


def _dense_label(config: DenseTrainConfig) -> str:
    label = "dense " + "x".join(str(width) for width in config.hidden)
    if config.input_dropout > 0:
        label += f", input dropout {config.input_dropout:g}"
    return label


def _mixture_label(config: MixtureTrainConfig) -> str:
    gate = "linear gate" if config.gate_hidden == 0 else f"gate {config.gate_hidden}"
    label = f"{config.num_experts} experts x {'x'.join(map(str, config.expert_hidden))}, {gate}"
    if config.distill_weight > 0:
        label += f", distill {config.distill_weight:g}"
    if config.routing_smoothing > 0:
        label += f", smoothing {config.routing_smoothing:g}"
    if config.input_dropout > 0:
        label += f", input dropout {config.input_dropout:g}"
    return label


def _routing_label(routing: RoutingConfig) -> str:
    if routing.min_k == routing.max_k:
        choice = f"k={routing.min_k}"
    else:
        choice = f"top_p={routing.top_p:g} k={routing.min_k}..{routing.max_k}"
    label = f"{choice} floor={routing.confidence_floor:g}"
    if routing.escalate_below > 0:
        label += f" escalate<{routing.escalate_below:g}"
    return label


@dataclass
class _SeedModels:
    """Models of one seed, kept for the latency measurement of the chosen settings."""

    dense: dict[str, MLP] = field(default_factory=dict)
    mixtures: dict[str, tuple] = field(default_factory=dict)
    test_x: np.ndarray | None = None


def _halve(split: Split, seed: int) -> tuple[Split, Split]:
    """Split the validation rows in two stratified halves: one for early stopping, one for selection.

    Early stopping keeps the epoch with the best accuracy on its rows, so accuracy on
    those same rows overstates every model, and by more for models whose accuracy
    varies more between epochs. Selection on the other half avoids that bias.
    """
    from sklearn.model_selection import train_test_split

    first, second = train_test_split(np.arange(len(split)), test_size=0.5, stratify=split.y, random_state=seed)
    return Split(split.x[first], split.y[first]), Split(split.x[second], split.y[second])


def _run_seed(dataset_name: str, seed: int, plan: PilotPlan, log) -> tuple[list[dict], list[dict], _SeedModels]:
    """Train and evaluate everything of `plan` on one seed; return per-seed dense and mixture rows."""
    data = load_dataset(dataset_name, seed=seed)
    train, test = data.train, data.test
    stopping, validation = _halve(data.validation, seed)
    models = _SeedModels(test_x=test.x)

    # 1. Dense models.
    dense_rows, dense_models = [], []
    dense_labels = []
    for dense_config in plan.dense:
        config = replace(dense_config, seed=seed, max_epochs=plan.max_epochs, patience_epochs=plan.patience_epochs)
        model, history = train_dense(train.x, train.y, stopping.x, stopping.y, data.num_classes, config)
        label = _dense_label(config)
        dense_labels.append(label)
        dense_models.append(model)
        models.dense[label] = model
        dense_rows.append({"label": label, "hidden": list(config.hidden), "input_dropout": config.input_dropout,
                           "flops": model.flops,
                           "validation_accuracy": _accuracy(model, validation.x, validation.y),
                           "test_accuracy": _accuracy(model, test.x, test.y), "epochs": history["epochs"]})
        log.info("pilot_dense_trained", seed=seed, model=label, flops=model.flops,
                 test_accuracy=dense_rows[-1]["test_accuracy"], epochs=history["epochs"])
    teacher = dense_models[max(range(len(dense_rows)), key=lambda i: dense_rows[i]["validation_accuracy"])]

    # 2-3. Mixtures, each evaluated under every routing setting and fallback.
    moe_rows = []
    for mixture in plan.mixtures:
        config = replace(mixture, seed=seed, max_epochs=plan.max_epochs, patience_epochs=plan.patience_epochs)
        gate, experts, history = train_mixture(train.x, train.y, stopping.x, stopping.y, data.num_classes,
                                               config, teacher=teacher if config.distill_weight > 0 else None)
        mixture_label = _mixture_label(config)
        models.mixtures[mixture_label] = (gate, experts)
        log.info("pilot_mixture_trained", seed=seed, model=mixture_label, epochs=history["epochs"])
        for routing in plan.routings:
            sends_to_dense = routing.confidence_floor > 0 or routing.escalate_below > 0
            fallbacks = plan.fallbacks if sends_to_dense else (None,)
            for fallback in fallbacks:
                dense = None if fallback is None else dense_models[fallback]
                fallback_label = None if fallback is None else dense_labels[fallback]
                scores = {split_name: evaluate_mixture(gate, experts, split.x, split.y, routing, dense=dense)
                          for split_name, split in (("validation", validation), ("test", test))}
                moe_rows.append(_moe_row(mixture_label, config, routing, fallback_label, scores))
    return dense_rows, moe_rows, models


def _seed_worker(dataset_name: str, seed: int, plan: PilotPlan):
    from monitoring.logging import configure_logging, get_logger

    torch.set_num_threads(1)
    configure_logging()
    return _run_seed(dataset_name, seed, plan, get_logger("pilot", seed=seed))


def _run_seeds(dataset_name: str, seeds: int, plan: PilotPlan, workers: int, log) -> list[tuple]:
    """`_run_seed` for seeds 0 .. seeds-1, in order; in this process when `workers` is 1."""
    if workers == 1:
        return [_run_seed(dataset_name, seed, plan, log) for seed in range(seeds)]
    # "spawn" starts clean interpreters: forking a process that already ran torch can
    # deadlock in its thread pools.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [pool.submit(_seed_worker, dataset_name, seed, plan) for seed in range(seeds)]
        return [future.result() for future in futures]


def _moe_row(mixture_label: str, config: MixtureTrainConfig, routing: RoutingConfig, fallback_label: str | None,
             scores: dict[str, dict]) -> dict:
    test = scores["test"]
    label = f"{mixture_label}; {_routing_label(routing)}"
    if fallback_label:
        label += f"; fallback {fallback_label}"
    # A one-row request makes one remote call per chosen expert, unless the floor sends
    # it straight to dense, plus one dense call when it goes to dense (floor or escalation).
    experts_per_routed_row = test["mean_experts_per_request"]
    gated_fraction = 1 - (test["dense_fraction"] - test["escalated_fraction"])
    remote_calls = gated_fraction * experts_per_routed_row + test["dense_fraction"]
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
        "escalated_fraction": test["escalated_fraction"],
    }


_MEAN_KEYS = ("flops", "validation_flops", "validation_accuracy", "test_accuracy", "mean_experts_per_request",
              "remote_calls_per_request", "dense_fraction", "escalated_fraction", "epochs")


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
    """One-row mixture forward pass that runs only the chosen experts, then dense if needed, as the router does."""

    def predict(x: torch.Tensor) -> torch.Tensor:
        selection = select_experts(torch.softmax(gate(x), dim=-1), routing)
        if bool(selection.low_confidence[0]) and dense is not None:
            return torch.softmax(dense(x), dim=-1)
        chosen = torch.nonzero(selection.mask[0]).flatten().tolist()
        expert_probs = torch.zeros(1, len(experts), experts[0].spec.out_features)  # [1, E, C]
        for index in chosen:
            expert_probs[:, index] = torch.softmax(experts[index](x), dim=-1)
        mixed = combine(expert_probs, selection.weights)
        if dense is not None and bool(needs_escalation(mixed, routing)[0]):
            return torch.softmax(dense(x), dim=-1)
        return mixed

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


# ---------------------------------------------------------------------------- report


def run_pilot(
    dataset: str = "mnist5k",
    seeds: int = 3,
    quick: bool = False,
    out: str | Path = "bench-results/pilot",
    plan: PilotPlan | None = None,
    workers: int | None = None,
    log=None,
) -> dict[str, Any]:
    """Run the sweep over `seeds` seeds (0 .. seeds-1) and write pilot.json and the plots under `out`.

    Seeds train in parallel in `workers` processes (default: one per CPU core, at most
    one per seed), each with one torch thread.

    Returns the report: the benchmark report's pilot fields (`dataset`, `seeds`, `dense_best_accuracy`,
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

    workers = max(1, min(seeds, workers if workers is not None else os.cpu_count() or 1))
    log.info("pilot_started", dataset=dataset, seeds=seeds, workers=workers, dense_models=len(plan.dense),
             mixtures=len(plan.mixtures), routing_settings=len(plan.routings))
    results = _run_seeds(dataset, seeds, plan, workers, log)
    dense_per_seed = [dense_rows for dense_rows, _, _ in results]
    moe_per_seed = [moe_rows for _, moe_rows, _ in results]
    first_models = results[0][2]

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
        "workers": workers,
        "torch_threads_per_worker": 1 if workers > 1 else torch.get_num_threads(),
    }
    report["plots"] = plot_pilot(report, out)
    report["seconds"] = round(time.perf_counter() - started, 1)
    (out / "pilot.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("pilot_finished", dataset=dataset, seeds=seeds, seconds=report["seconds"],
             moe_flops_ratio=report["moe_flops_ratio"], out=str(out))
    return report

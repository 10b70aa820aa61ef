"""`switchyard demo`: train if needed, serve, answer every held-out example over HTTP, report."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from experts.bundle import Bundle, BundleError, load_bundle
from experts.data import load_dataset
from services.client import PredictResult, predict_many
from services.runtime import LocalServe
from services.settings import Settings

__all__ = ["build_report", "ensure_bundle", "run_demo"]

DEMO_DATASET = "digits"
DEMO_CONCURRENCY = 8


def ensure_bundle(path: Path, dataset_name: str = DEMO_DATASET, log=None) -> Bundle:
    """Load the bundle at `path`, training it on `dataset_name` first when none exists."""
    if path.exists() and not path.is_dir():
        raise BundleError(f"--bundle {path} is a file; pass a bundle directory (or a new path to train one)")
    try:
        return load_bundle(path)
    except BundleError:
        if (path / "manifest.json").exists():
            raise  # A corrupted bundle must be fixed by the user, not silently replaced.
    from services.train import train_bundle

    if log is not None:
        log.info("training_bundle", dataset=dataset_name, out=str(path))
    bundle, _ = train_bundle(load_dataset(dataset_name), path)
    return bundle


def _percentile_ms(latencies_s: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(latencies_s) * 1000.0, q)), 3) if latencies_s else 0.0


def build_report(bundle: Bundle, labels: np.ndarray, moe: list[PredictResult], dense: list[PredictResult]) -> dict[str, Any]:
    """SPEC's demo report from the results of the mixture run and the dense run."""
    manifest = bundle.manifest
    answered = [r for r in moe if r.ok]
    dense_answered = [r for r in dense if r.ok]
    correct = sum(int(r.body["predictions"][0] == labels[r.index]) for r in answered)
    dense_correct = sum(int(r.body["predictions"][0] == labels[r.index]) for r in dense_answered)

    paths = Counter(r.body["route"]["path"] for r in answered)
    # Experts per request count the requests the mixture answered; dense-answered ones are in `paths`.
    on_experts = [len(r.body["route"]["experts"][0]) for r in answered if r.body["route"]["path"] == "moe"]
    histogram = Counter(on_experts)
    moe_flops = [r.body["flops"] for r in answered]
    dense_flops = [r.body["flops"] for r in dense_answered]
    reasons = Counter(r.body["route"]["reason"] for r in answered)
    return {
        "dataset": manifest["dataset"]["name"],
        "transport": "http",
        "encoding": "msgpack",
        "requests": len(moe),
        "failed": len(moe) - len(answered),
        "accuracy": {
            "moe": round(correct / len(moe), 4) if moe else 0.0,
            "dense": round(dense_correct / len(dense), 4) if dense else 0.0,
        },
        "mean_experts_per_request": round(float(np.mean(on_experts)), 4) if on_experts else 0.0,
        "experts_histogram": {str(k): histogram[k] for k in sorted(histogram)},
        "compute_ratio": round(float(np.mean(moe_flops)) / float(np.mean(dense_flops)), 4)
        if moe_flops and dense_flops else None,
        "paths": {"moe": paths.get("moe", 0), "dense": paths.get("dense", 0)},
        "reasons": dict(sorted(reasons.items())),
        "latency_ms": {"p50": _percentile_ms([r.latency_s for r in answered], 50),
                       "p99": _percentile_ms([r.latency_s for r in answered], 99)},
        "dense_latency_ms": {"p50": _percentile_ms([r.latency_s for r in dense_answered], 50),
                             "p99": _percentile_ms([r.latency_s for r in dense_answered], 99)},
        "dense_failed": len(dense) - len(dense_answered),
        "model": {
            "experts": len(manifest["experts"]),
            "expert_params": manifest["params"]["expert-0"],
            "dense_params": manifest["params"]["dense"],
            "gate_params": manifest["params"]["gate"],
            "version": bundle.version,
        },
    }


def run_demo(settings: Settings, log=None, concurrency: int = DEMO_CONCURRENCY) -> dict[str, Any]:
    """Serve `settings.bundle` (training it when missing) and send every test example.

    The mixture run and the dense run (the same examples with `path: dense`) use the
    same server, transport and encoding.
    """
    bundle = ensure_bundle(settings.bundle, log=log)
    dataset_info = bundle.manifest["dataset"]
    if dataset_info["name"] != DEMO_DATASET:
        raise ValueError(f"the demo runs on {DEMO_DATASET!r}, but the bundle at {settings.bundle} was trained on "
                         f"{dataset_info['name']!r}; pass --bundle with a digits bundle")
    test = load_dataset(DEMO_DATASET, seed=dataset_info["seed"]).test

    with LocalServe(settings, log_to_driver=False) as server:
        if log is not None:
            log.info("serving", http_url=server.http_url, examples=len(test))
        moe = asyncio.run(predict_many(server.http_url, test.x, concurrency=concurrency, request_id_prefix="demo"))
        dense = asyncio.run(predict_many(server.http_url, test.x, concurrency=concurrency, path="dense",
                                         request_id_prefix="demo-dense"))
    return build_report(bundle, test.y, moe, dense)

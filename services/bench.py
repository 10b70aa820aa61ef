"""`switchyard bench`: throughput and latency of each path against Ray Serve's ceiling.

One run on one machine measures, side by side:
1. the ceiling: a no-op Serve deployment behind the same proxy (`services.noop`);
2. the dense path (`/v1/predict` with `"path": "dense"`);
3. the mixture path (`/v1/predict`);
each closed-loop at several concurrency levels with `services.loadgen`, one example
per msgpack request. The paths take turns in short rounds, in a rotated order, and each
path's rounds are pooled, so a change in the machine's background load during the run
reaches every path alike instead of biasing the ratios. Then the queue path's throughput (requests through the Redis
stream until every answer is in `results`), the gate's scoring cost per example,
and the accuracy/compute pilot (`services.pilot.run_pilot`). Results: a table on
stderr, `bench.json` and PNG plots under the output folder.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from services.codec import MSGPACK, encode_tensor
from services.loadgen import LoadResult, merge_results, run_closed_loop
from services.settings import Settings

__all__ = ["HEADLINE_CONCURRENCY", "machine_info", "run_bench"]

HEADLINE_CONCURRENCY = 16
NOOP_APP = "bench-noop"
NOOP_PREFIX = "/bench-noop"


def machine_info() -> dict[str, Any]:
    """CPU, memory and software versions of this machine."""
    import ray
    import torch

    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory_gib = round(pages / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        "memory_gib": memory_gib,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "torch": torch.__version__,
    }


def _request_bodies(rows: np.ndarray, path: str) -> list[bytes]:
    bodies = []
    for index in range(len(rows)):
        document: dict[str, Any] = {"inputs": encode_tensor(rows[index : index + 1])}
        if path != "auto":
            document["path"] = path
        bodies.append(msgpack.packb(document, use_bin_type=True))
    return bodies


def gate_cost(bundle, batch_sizes=(1, 16, 256), repeats: int = 200) -> dict[str, float]:
    """Microseconds per example of gate scoring plus expert selection, by batch size."""
    import torch

    from router.gate import Gate, GateSpec
    from router.policy import RoutingConfig, select_experts

    torch.set_num_threads(1)
    gate = Gate(GateSpec.from_dict(bundle.manifest["gate"]))
    gate.load_state_dict(bundle.load_state_dict("gate"))
    gate.eval()
    routing = RoutingConfig(**bundle.manifest["routing"])
    in_features = gate.spec.in_features
    costs = {}
    with torch.inference_mode():
        for batch in batch_sizes:
            x = torch.randn(batch, in_features)
            for _ in range(10):
                select_experts(torch.softmax(gate(x), dim=-1), routing)
            started = time.perf_counter()
            for _ in range(repeats):
                select_experts(torch.softmax(gate(x), dim=-1), routing)
            costs[str(batch)] = round((time.perf_counter() - started) / (repeats * batch) * 1e6, 3)
    return costs


def _queue_throughput(server, rows: np.ndarray, log) -> dict[str, Any] | None:
    """Requests per second through the Redis stream, or None when the queue path is off."""
    settings = server.settings
    queue_settings = getattr(settings, "queue", None)
    if queue_settings is None or not getattr(queue_settings, "enabled", False):
        return None
    from services.queue import QueueStreams, submit_and_wait
    from services.redis_setup import create_async_client

    async def measure() -> dict[str, Any]:
        client = create_async_client(settings.redis)
        try:
            streams = QueueStreams.from_prefix(settings.redis.key_prefix)
            started = time.perf_counter()
            report = await submit_and_wait(client, streams, rows, max_length=queue_settings.max_length,
                                           timeout_s=300.0)
            elapsed = time.perf_counter() - started
        finally:
            await client.aclose()
        return {"requests": report.sent, "answered": report.answered, "seconds": round(elapsed, 3),
                "rps": round(report.answered / elapsed, 1) if elapsed > 0 else 0.0}

    try:
        return asyncio.run(measure())
    except Exception as error:  # noqa: BLE001 - a failed queue run is reported, the rest still counts
        log.error("queue_bench_failed", error=repr(error))
        return {"error": repr(error)}


def _plot(levels: dict[str, list[LoadResult]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, results in levels.items():
        axis.plot([r.concurrency for r in results], [r.requests_per_s for r in results], marker="o", label=name)
    axis.set_xlabel("concurrent clients (closed loop)")
    axis.set_ylabel("requests per second")
    axis.set_title("Throughput by path")
    axis.set_xscale("log", base=2)
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "throughput.png", dpi=120)
    plt.close(figure)
    paths.append(str(out / "throughput.png"))

    figure, axis = plt.subplots(figsize=(6, 4))
    names = list(levels)
    headline = [next((r for r in levels[n] if r.concurrency == HEADLINE_CONCURRENCY), levels[n][-1]) for n in names]
    positions = np.arange(len(names))
    axis.bar(positions - 0.2, [r.percentile_ms(50) for r in headline], width=0.4, label="p50")
    axis.bar(positions + 0.2, [r.percentile_ms(99) for r in headline], width=0.4, label="p99")
    axis.set_xticks(positions, names)
    axis.set_ylabel("latency (ms)")
    axis.set_title(f"Latency at {headline[0].concurrency} concurrent clients")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "latency.png", dpi=120)
    plt.close(figure)
    paths.append(str(out / "latency.png"))
    return paths


def _command_line(quick: bool, pilot: bool, seconds: float | None) -> str:
    """Return the `switchyard bench` options that shape the measurement, for the report."""
    parts = ["switchyard bench"]
    if quick:
        parts.append("--quick")
    if not pilot:
        parts.append("--no-pilot")
    if seconds is not None:
        parts.append(f"--seconds {seconds:g}")
    return " ".join(parts)


def run_bench(settings: Settings, out: Path, quick: bool = False, pilot: bool = True, log=None,
              seconds: float | None = None) -> dict[str, Any]:
    """Run the whole benchmark and write `bench.json` and plots under `out`.

    `seconds` is the measured time per path and concurrency level (default 6 with
    `quick`, else 15), split into rounds.

    Raises:
        ValueError: `seconds` is not positive.
    """
    if seconds is not None and seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    from ray import serve

    from experts.data import load_dataset
    from services.demo import ensure_bundle
    from services.noop import NoOp
    from services.runtime import LocalServe

    out.mkdir(parents=True, exist_ok=True)
    concurrency_levels = [1, HEADLINE_CONCURRENCY] if quick else [1, 4, HEADLINE_CONCURRENCY, 32]
    # Per path and level; split into `rounds` turns, each after its own short warm-up.
    if seconds is not None:
        duration_s = seconds
    else:
        duration_s = 6.0 if quick else 15.0
    rounds = 3
    warmup_s = 0.5 if quick else 1.0
    bundle = ensure_bundle(settings.bundle, log=log)
    rows = load_dataset(bundle.manifest["dataset"]["name"], seed=bundle.manifest["dataset"]["seed"]).test.x

    levels: dict[str, list[LoadResult]] = {"ceiling": [], "dense": [], "moe": []}
    round_ratios: list[float] = []
    with LocalServe(settings, log_to_driver=False) as server:
        noop = serve.deployment(NoOp).options(name="noop", ray_actor_options={"num_cpus": 0.1},
                                              max_ongoing_requests=256, logging_config={"enable_access_log": False})
        serve.run(noop.bind(), name=NOOP_APP, route_prefix=NOOP_PREFIX, blocking=False)
        targets = {
            "ceiling": (f"{server.http_url}{NOOP_PREFIX}", _request_bodies(rows, "auto")),
            "dense": (f"{server.http_url}/v1/predict", _request_bodies(rows, "dense")),
            "moe": (f"{server.http_url}/v1/predict", _request_bodies(rows, "auto")),
        }
        names = list(targets)
        for concurrency in concurrency_levels:
            runs: dict[str, list[LoadResult]] = {name: [] for name in names}
            for round_index in range(rounds):
                # Rotate the order so that no path always runs first or last.
                order = names[round_index % len(names):] + names[:round_index % len(names)]
                for name in order:
                    url, bodies = targets[name]
                    runs[name].append(run_closed_loop(url, bodies, MSGPACK, concurrency, duration_s / rounds,
                                                      warmup_s=warmup_s))
                if concurrency == HEADLINE_CONCURRENCY and runs["ceiling"][-1].requests_per_s:
                    round_ratios.append(runs["moe"][-1].requests_per_s / runs["ceiling"][-1].requests_per_s)
            for name in names:
                result = merge_results(runs[name])
                levels[name].append(result)
                if log is not None:
                    log.info("bench_level", path=name, rounds=rounds, **result.to_dict())
        queue = _queue_throughput(server, np.concatenate([rows] * (2 if quick else 6)), log)

    headline = {name: next(r for r in results if r.concurrency == HEADLINE_CONCURRENCY)
                for name, results in levels.items()}
    ceiling_rps = headline["ceiling"].requests_per_s
    report: dict[str, Any] = {
        "machine": machine_info(),
        "command": _command_line(quick, pilot, seconds),
        "concurrency": HEADLINE_CONCURRENCY,
        "ceiling_rps": round(ceiling_rps, 1),
        "dense_rps": round(headline["dense"].requests_per_s, 1),
        "moe_rps": round(headline["moe"].requests_per_s, 1),
        "moe_to_ceiling_ratio": round(headline["moe"].requests_per_s / ceiling_rps, 3) if ceiling_rps else None,
        "dense_to_ceiling_ratio": round(headline["dense"].requests_per_s / ceiling_rps, 3) if ceiling_rps else None,
        "latency_ms": {name: {"p50": round(r.percentile_ms(50), 3), "p99": round(r.percentile_ms(99), 3)}
                       for name, r in headline.items()},
        "moe_to_ceiling_ratio_by_round": [round(ratio, 3) for ratio in round_ratios],
        "rounds": rounds,
        "seconds_per_path_and_level": duration_s,
        "queue_rps": queue.get("rps") if queue else None,
        "queue": queue,
        "gate_cost_us_per_example": gate_cost(bundle),
        "levels": {name: [r.to_dict() for r in results] for name, results in levels.items()},
    }
    report["plots"] = _plot(levels, out)
    if pilot:
        from services.pilot import run_pilot

        report["pilot"] = run_pilot(quick=quick, out=out / "pilot", log=log)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    return report

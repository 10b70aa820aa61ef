"""Independent expert autoscaling on a real local Serve application, and render-versus-build agreement.

The autoscaling test runs the application in a subprocess (this process's Ray instance
belongs to the session's `served_app`), sends skewed traffic that the gate routes to one
expert, and reads replica counts from Serve in that subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml

from conftest import fast_settings
from services.k8s import application_deployments, render_serve_config, supervisor_application

REPO = Path(__file__).resolve().parents[1]

# Expert autoscaling for the local run, deciding within seconds so that a short skewed load
# shows an upscale and a downscale. A router replica keeps at most one batch in flight
# (`@serve.batch` runs one batch at a time), so one router replica puts at most one
# ongoing call on an expert. A target of 0.5 makes a continuously busy expert want two
# replicas.
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 0.5,
    "upscale_delay_s": 1.0,
    "downscale_delay_s": 6.0,
    "metrics_interval_s": 0.5,
    "look_back_period_s": 2.0,
}
CONCURRENCY = 16
UPSCALE_TIMEOUT_S = 120.0
DOWNSCALE_TIMEOUT_S = 90.0
START_TIMEOUT_S = 300.0

# Runs the application with LocalServe (as `switchyard serve` does) and prints one JSON
# line with the HTTP address, then one line per second with the RUNNING replicas of
# every deployment, until its stdin closes.
SERVER_SCRIPT = textwrap.dedent("""
    import json, sys, threading, time
    from ray import serve
    from services.runtime import LocalServe
    from services.settings import load_settings

    settings = load_settings(sys.argv[1])
    stdin_closed = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stdin_closed.set()), daemon=True).start()
    with LocalServe(settings, log_to_driver=False) as server:
        print(json.dumps({"http_url": server.http_url}), flush=True)
        while not stdin_closed.wait(1.0):
            application = serve.status().applications[settings.app_name]
            running = {name: status.replica_states.get("RUNNING", 0)
                       for name, status in application.deployments.items()}
            print(json.dumps({"t": time.monotonic(), "running": running}), flush=True)
""")


class ServerProcess:
    """The subprocess running the application; collects its replica-count lines."""

    def __init__(self, settings_file: Path, state_dir: Path) -> None:
        env = {**os.environ, "SWITCHYARD_STATE_DIR": str(state_dir), "PYTHONPATH": str(REPO)}
        self.log_file = open(state_dir / "server.log", "w")
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER_SCRIPT, str(settings_file)], cwd=REPO, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log_file, text=True,
        )
        self.http_url: str | None = None
        self.samples: list[dict[str, int]] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # Ray may print plain text to the driver's stdout
            if "http_url" in record:
                self.http_url = record["http_url"]
                self.ready.set()
            elif "running" in record:
                self.samples.append(record["running"])
        self.ready.set()

    def wait_for(self, condition, timeout_s: float) -> dict[str, int] | None:
        """Return the first new sample that satisfies `condition`, or None after `timeout_s`."""
        start = len(self.samples)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            for sample in self.samples[start:]:
                if condition(sample):
                    return sample
            time.sleep(0.25)
        return None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log_file.close()


def _autoscaling_settings(bundle_path: Path):
    quick = {"graceful_shutdown_timeout_s": 1.0, "graceful_shutdown_wait_loop_s": 0.2}
    return fast_settings(
        bundle_path,
        router={"replica": {"num_cpus": 0.1, "max_batch_size": 32, "batch_wait_timeout_s": 0.005,
                            "max_ongoing_requests": 128, **quick},
                "expert_timeout_s": 10.0},
        # Each expert batch waits 0.1 s for more calls, so the hot expert always has a
        # call ongoing while the load runs.
        experts={"num_cpus": 0.05, "max_batch_size": 64, "batch_wait_timeout_s": 0.1, "max_ongoing_requests": 64,
                 "autoscaling": AUTOSCALING, **quick},
        # The supervisor must not move traffic to dense while the load test runs.
        supervisor={"max_p99_latency_s": 120.0, "min_agreement": 0.0, "max_error_rate": 1.0, "shadow_fraction": 0.0},
    )


def _confident_rows(bundle, x: np.ndarray) -> tuple[int, np.ndarray]:
    """Pick the expert that the gate prefers confidently most often, and those rows of x."""
    from router.gate import Gate, GateSpec

    gate = Gate(GateSpec.from_dict(bundle.manifest["gate"]))
    gate.load_state_dict(bundle.load_state_dict("gate"))
    gate.eval()
    with torch.inference_mode():
        probabilities = torch.softmax(gate(torch.from_numpy(x).float()), dim=-1).numpy()  # [N, E]
    top = probabilities.argmax(axis=1)
    confident = probabilities.max(axis=1) >= 0.9
    hot = int(np.bincount(top[confident], minlength=probabilities.shape[1]).argmax())
    return hot, x[confident & (top == hot)]


def _rows_routed_only_to(http_url: str, rows: np.ndarray, expert: int) -> list[list[float]]:
    """Keep the rows that the running router sends to `expert` alone."""
    kept = []
    with httpx.Client(timeout=30.0) as client:
        for row in rows[:40]:
            response = client.post(f"{http_url}/v1/predict", json={"inputs": [row.tolist()]})
            response.raise_for_status()
            route = response.json()["route"]
            if route["path"] == "moe" and route["experts"] == [[expert]]:
                kept.append(row.tolist())
    return kept


async def _drive_load(http_url: str, rows: list[list[float]], stop: asyncio.Event) -> dict[str, int]:
    counts = {"sent": 0, "failed": 0}

    async def client_loop(index: int, client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            row = rows[(index + counts["sent"]) % len(rows)]
            counts["sent"] += 1
            try:
                response = await client.post(f"{http_url}/v1/predict", json={"inputs": [row]})
                if response.status_code != 200:
                    counts["failed"] += 1
            except httpx.HTTPError:
                counts["failed"] += 1

    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(timeout=30.0, limits=limits) as client:
        await asyncio.gather(*(client_loop(index, client) for index in range(CONCURRENCY)))
    return counts


@pytest.mark.slow
@pytest.mark.timeout(1200)  # includes training the session's bundle when this test runs first
def test_skewed_load_scales_one_expert(trained_bundle, digits, tmp_path):
    """A load that the gate sends to one expert scales that expert up, and back down when it stops."""
    settings = _autoscaling_settings(trained_bundle.path)
    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    num_experts = len(trained_bundle.manifest["experts"])
    expert_names = [f"expert-{i}" for i in range(num_experts)]
    hot, candidates = _confident_rows(trained_bundle, digits.test.x.astype(np.float32))
    hot_name = f"expert-{hot}"
    assert len(candidates) >= 5, f"only {len(candidates)} test rows go confidently to expert {hot}"

    server = ServerProcess(settings_file, tmp_path)
    try:
        assert server.ready.wait(START_TIMEOUT_S) and server.http_url, (
            f"server did not start; see {tmp_path / 'server.log'}")
        assert server.wait_for(lambda sample: all(sample.get(name) == 1 for name in expert_names), 60.0), (
            f"experts did not settle at one replica each; last sample {server.samples[-1:]}")
        rows = _rows_routed_only_to(server.http_url, candidates, hot)
        assert len(rows) >= 3, f"only {len(rows)} rows were routed to expert {hot} alone"
        first_loaded_sample = len(server.samples)

        stop = asyncio.Event()
        loop = asyncio.new_event_loop()
        load_counts: dict[str, int] = {}
        load = threading.Thread(target=lambda: load_counts.update(
            loop.run_until_complete(_drive_load(server.http_url, rows, stop))))
        load.start()
        try:
            scaled_up = server.wait_for(lambda sample: sample.get(hot_name, 0) >= 2, UPSCALE_TIMEOUT_S)
        finally:
            loop.call_soon_threadsafe(stop.set)
            load.join(timeout=60)
        scaled_down = server.wait_for(lambda sample: sample.get(hot_name) == 1, DOWNSCALE_TIMEOUT_S)
        loaded_samples = server.samples[first_loaded_sample:]
    finally:
        server.stop()

    assert load_counts.get("sent", 0) > 0, "the load generator sent no request"
    assert scaled_up is not None, (f"{hot_name} never reached 2 replicas; load {load_counts}, "
                                   f"samples {loaded_samples[-5:]}")
    assert scaled_down is not None, f"{hot_name} did not return to 1 replica; samples {loaded_samples[-5:]}"
    for name in expert_names:
        if name != hot_name:
            assert max(sample.get(name, 0) for sample in loaded_samples) == 1, f"{name} scaled without load"
    # Manifests need a fixed port; the local run picked a free one (port 0).
    manifest_settings = settings.model_copy(update={"port": 8000})
    rendered = {deployment["name"]: deployment
                for deployment in render_serve_config(manifest_settings, num_experts)["applications"][0]["deployments"]}
    for name in expert_names:
        assert rendered[name]["autoscaling_config"] == AUTOSCALING, name


def test_committed_dev_manifest_autoscaling_matches_settings():
    """The dev-cpu RayService carries the expert autoscaling of k8s/config/development.yaml."""
    from services.settings import load_settings

    settings = load_settings(REPO / "k8s" / "config" / "development.yaml")
    (rayservice,) = [document for document in yaml.safe_load_all(
        (REPO / "k8s" / "overlays" / "dev-cpu" / "rayservice.yaml").read_text()) if document]
    application = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]
    experts = [deployment for deployment in application["deployments"] if deployment["name"].startswith("expert-")]

    assert len(experts) == 4
    for deployment in experts:
        assert deployment["autoscaling_config"] == settings.experts.autoscaling.to_serve(), deployment["name"]


def _assert_options_match(name: str, options: dict, deployment) -> None:
    """Assert that the Serve options rendered for one deployment equal those its Deployment object carries."""
    config = deployment._deployment_config
    for key, value in options.get("ray_actor_options", {}).items():
        assert deployment.ray_actor_options[key] == value, (name, key)
    if "autoscaling_config" in options:
        built_autoscaling = config.autoscaling_config.model_dump()
        for key, value in options["autoscaling_config"].items():
            assert built_autoscaling[key] == value, (name, key)
    else:
        assert config.autoscaling_config is None, name
        assert config.num_replicas == options["num_replicas"], name
    for key in ("max_ongoing_requests", "max_queued_requests", "graceful_shutdown_timeout_s",
                "graceful_shutdown_wait_loop_s", "health_check_period_s"):
        if key in options:
            assert getattr(config, key) == options[key], (name, key)


@pytest.mark.slow
def test_render_matches_built_application(trained_bundle):
    """Every deployment that `build_app` binds appears in serveConfigV2 with the options set in code."""
    from ray.serve._private.build_app import build_app as build_serve_app

    from services.app import build_app

    settings = fast_settings(trained_bundle.path, experts={"autoscaling": AUTOSCALING},
                             expert_overrides={1: {"num_cpus": 0.2}})
    num_experts = len(trained_bundle.manifest["experts"])
    built = {deployment.name: deployment
             for deployment in build_serve_app(build_app(settings), name=settings.app_name).deployments}
    rendered = application_deployments(settings, num_experts)

    assert set(rendered) == set(built)
    for name, options in rendered.items():
        _assert_options_match(name, options, built[name])


def test_render_matches_built_supervisor(tmp_path):
    """The supervisor application in serveConfigV2 has the deployment and options that `build_supervisor_app` sets."""
    from ray.serve._private.build_app import build_app as build_serve_app

    from services.app import build_supervisor_app

    settings = fast_settings(tmp_path / "bundle")  # the supervisor never opens the bundle
    rendered = supervisor_application(settings)
    built = build_serve_app(build_supervisor_app(settings, "0" * 64), name=rendered["name"]).deployments

    assert [deployment.name for deployment in built] == [entry["name"] for entry in rendered["deployments"]]
    for entry, deployment in zip(rendered["deployments"], built):
        options = {key: value for key, value in entry.items() if key != "name"}
        _assert_options_match(entry["name"], options, deployment)

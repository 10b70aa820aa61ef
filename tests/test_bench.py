"""`switchyard bench` end to end: its own Ray Serve, Redis and no-op ceiling, with short rounds.

It runs in a subprocess because this process may already run the session's Ray instance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from services.bench import HEADLINE_CONCURRENCY, run_bench
from services.settings import Settings

QUICK = {"graceful_shutdown_timeout_s": 1.0, "graceful_shutdown_wait_loop_s": 0.2}


@pytest.mark.slow
def test_bench_reports_every_path_against_the_ceiling(trained_bundle, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "port": 0,
        "router": {"replica": {"num_cpus": 0.1, "max_batch_size": 16, "max_ongoing_requests": 128, **QUICK}},
        "experts": {"num_cpus": 0.05, "num_replicas": 1, **QUICK},
        "dense": {"num_cpus": 0.1, **QUICK},
    }))
    out = tmp_path / "results"
    env = {**os.environ, "SWITCHYARD_STATE_DIR": str(tmp_path / "state")}

    result = subprocess.run(
        [sys.executable, "-m", "services", "bench", "--quick", "--no-pilot", "--json", "--seconds", "1.5",
         "--out", str(out), "--bundle", str(trained_bundle.path), "--config", str(config)],
        env=env, capture_output=True, text=True, timeout=600,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report == json.loads((out / "bench.json").read_text())
    assert report["concurrency"] == HEADLINE_CONCURRENCY
    for key in ("ceiling_rps", "dense_rps", "moe_rps", "moe_to_ceiling_ratio", "queue_rps"):
        assert report[key] > 0, key
    assert report["moe_to_ceiling_ratio"] == pytest.approx(report["moe_rps"] / report["ceiling_rps"], abs=0.002)
    assert set(report["latency_ms"]) == {"ceiling", "dense", "moe"}
    for latency in report["latency_ms"].values():
        assert 0 < latency["p50"] <= latency["p99"]
    # Both levels of the quick run, each path pooled over its rounds, with no failed request.
    for name in ("ceiling", "dense", "moe"):
        levels = report["levels"][name]
        assert [level["concurrency"] for level in levels] == [1, HEADLINE_CONCURRENCY]
        assert all(level["errors"] == 0 and level["completed"] > 0 for level in levels)
    assert len(report["moe_to_ceiling_ratio_by_round"]) == report["rounds"] == 3
    assert report["queue"]["answered"] == report["queue"]["requests"]
    assert set(report["gate_cost_us_per_example"]) == {"1", "16", "256"}
    assert "pilot" not in report
    for plot in report["plots"]:
        assert os.path.getsize(plot) > 1000
    assert f"mixture / ceiling at {HEADLINE_CONCURRENCY} clients" in result.stderr
    assert "gate cost per example: " in result.stderr
    # The report names the options that shaped the run, so that it can be rerun as written.
    assert report["command"] == "switchyard bench --quick --no-pilot --seconds 1.5"


def test_bench_rejects_non_positive_seconds(tmp_path):
    with pytest.raises(ValueError, match="seconds must be positive"):
        run_bench(Settings(), tmp_path, seconds=0)

"""Pilot report: Pareto fronts, the matching rule, the report fields and the CLI."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from router.policy import RoutingConfig
from services.mixture import DenseTrainConfig, MixtureTrainConfig, _drop_inputs, _routing_target
from services.pilot import (
    MATCH_TOLERANCE,
    PilotPlan,
    cheapest_within,
    pareto_front,
    run_pilot,
    summarize,
)


def point(label, flops, validation, test=None):
    return {"label": label, "flops": flops, "validation_accuracy": validation,
            "test_accuracy": validation if test is None else test}


class TestParetoFront:
    def test_drops_dominated_points(self):
        points = [point("a", 10, 0.90), point("b", 20, 0.89), point("c", 30, 0.93), point("d", 40, 0.92)]

        front = pareto_front(points)

        assert [p["label"] for p in front] == ["a", "c"]

    def test_sorted_by_flops(self):
        points = [point("c", 30, 0.95), point("a", 10, 0.90), point("b", 20, 0.92)]

        assert [p["label"] for p in pareto_front(points)] == ["a", "b", "c"]

    def test_equal_flops_keeps_more_accurate(self):
        points = [point("low", 10, 0.80), point("high", 10, 0.85)]

        assert [p["label"] for p in pareto_front(points)] == ["high"]

    def test_equal_accuracy_keeps_cheaper(self):
        points = [point("cheap", 10, 0.90), point("costly", 20, 0.90)]

        assert [p["label"] for p in pareto_front(points)] == ["cheap"]

    def test_empty_input(self):
        assert pareto_front([]) == []


class TestCheapestWithin:
    def test_tolerance_is_inclusive(self):
        points = [point("edge", 10, 0.900), point("best", 50, 0.905)]

        assert cheapest_within(points, 0.905, tolerance=0.005)["label"] == "edge"

    def test_below_tolerance_is_excluded(self):
        points = [point("short", 10, 0.899), point("best", 50, 0.905)]

        assert cheapest_within(points, 0.905, tolerance=0.005)["label"] == "best"

    def test_none_when_nothing_matches(self):
        assert cheapest_within([point("weak", 10, 0.5)], 0.9) is None


class TestSummarize:
    dense = [
        point("dense 32", 25_000, 0.915, test=0.917),
        point("dense 64", 50_000, 0.931, test=0.929),
        point("dense 256", 200_000, 0.934, test=0.932),
        point("dense 512x512", 670_000, 0.928, test=0.936),  # best on test, not on validation
    ]

    def test_dense_best_chosen_on_validation(self):
        summary = summarize(self.dense, [])

        assert summary["dense_best_label"] == "dense 256"
        assert summary["dense_best_accuracy"] == pytest.approx(0.932)

    def test_dense_match_is_cheapest_within_tolerance(self):
        summary = summarize(self.dense, [])

        assert summary["dense_match_label"] == "dense 64"
        assert summary["dense_match_flops"] == 50_000
        assert summary["dense_match_accuracy"] == pytest.approx(0.929)

    def test_ratio_over_matching_dense_not_largest(self):
        moe = [point("moe cheap", 10_000, 0.90), point("moe match", 15_000, 0.930, test=0.927)]

        summary = summarize(self.dense, moe)

        assert summary["moe_flops"] == 15_000
        assert summary["moe_accuracy"] == pytest.approx(0.927)
        assert summary["moe_flops_ratio"] == pytest.approx(15_000 / 50_000)
        assert summary["meets_target"] is True
        assert summary["moe_matches_on_test"] is True

    def test_moe_chosen_on_validation_not_test(self):
        moe = [point("lucky on test", 5_000, 0.90, test=0.95), point("match", 40_000, 0.930, test=0.925)]

        summary = summarize(self.dense, moe)

        assert summary["moe_setting"]["label"] == "match"
        assert summary["moe_matches_on_test"] is False

    def test_ratio_above_target(self):
        summary = summarize(self.dense, [point("moe", 30_000, 0.932)])

        assert summary["moe_flops_ratio"] == pytest.approx(0.6)
        assert summary["meets_target"] is False

    def test_no_matching_mixture(self):
        moe = [point("weak", 10_000, 0.90), point("weaker", 5_000, 0.88)]

        summary = summarize(self.dense, moe)

        assert summary["moe_flops_ratio"] is None
        assert summary["moe_accuracy"] is None
        assert summary["meets_target"] is False
        assert summary["moe_max_accuracy_setting"]["label"] == "weak"

    def test_rejects_empty_dense(self):
        with pytest.raises(ValueError, match="at least one dense point"):
            summarize([], [])


class TestRoutingTarget:
    def test_default_is_softmax_of_negative_loss(self):
        nll = torch.tensor([[0.1, 2.0, 3.0]])
        config = MixtureTrainConfig(routing_temperature=0.5)

        expected = torch.softmax(-nll / 0.5, dim=-1)

        assert torch.allclose(_routing_target(nll, config), expected)

    def test_smoothing_flattens_rows_every_expert_gets_wrong(self):
        # p(y) = 0.1 and 0.05 for both experts: the plain target still prefers expert 0.
        nll = -torch.log(torch.tensor([[0.1, 0.05]]))
        smoothed = _routing_target(nll, MixtureTrainConfig(routing_smoothing=0.05))
        plain = _routing_target(nll, MixtureTrainConfig())

        assert float(plain.max()) > 0.9
        assert float(smoothed.max()) < 0.51

    def test_smoothing_keeps_confident_rows_peaked(self):
        nll = -torch.log(torch.tensor([[0.95, 0.05, 0.05, 0.05]]))

        target = _routing_target(nll, MixtureTrainConfig(routing_smoothing=0.05))

        assert float(target[0, 0]) > 0.75
        assert torch.allclose(target.sum(dim=-1), torch.ones(1))


class TestDropInputs:
    def test_zero_rate_returns_input(self):
        x = torch.rand(4, 8)

        assert _drop_inputs(x, 0.0, torch.Generator().manual_seed(0)) is x

    def test_drops_share_without_rescaling(self):
        x = torch.ones(200, 100)

        dropped = _drop_inputs(x, 0.25, torch.Generator().manual_seed(0))

        assert set(dropped.unique().tolist()) == {0.0, 1.0}
        assert float((dropped == 0).float().mean()) == pytest.approx(0.25, abs=0.02)


class TestHalve:
    def test_halves_are_disjoint_and_stratified(self):
        from experts.data import Split
        from services.pilot import _halve

        x = np.arange(40, dtype=np.float32).reshape(40, 1)
        y = np.repeat(np.arange(4), 10)

        first, second = _halve(Split(x, y), seed=0)

        assert len(first) == 20
        assert len(second) == 20
        assert set(first.x[:, 0]).isdisjoint(second.x[:, 0])
        assert np.bincount(first.y).tolist() == [5, 5, 5, 5]


class TestPlan:
    def test_rejects_fallback_out_of_range(self):
        with pytest.raises(ValueError, match="fallback index 2 is out of range"):
            PilotPlan(dense=(DenseTrainConfig(hidden=(8,)),), mixtures=(MixtureTrainConfig(),), routings=(RoutingConfig(),),
                      fallbacks=(2,))

    def test_rejects_zero_seeds(self, tmp_path):
        with pytest.raises(ValueError, match="seeds must be at least 1"):
            run_pilot("digits", seeds=0, out=tmp_path)


TINY_PLAN = PilotPlan(
    dense=(DenseTrainConfig(hidden=(8,)), DenseTrainConfig(hidden=(32,))),
    mixtures=(MixtureTrainConfig(num_experts=2, expert_hidden=(8,), gate_hidden=0, routing_smoothing=0.05,
                                 distill_weight=1.0),),
    routings=(RoutingConfig(top_p=0.5, min_k=1, max_k=1, confidence_floor=0.0),
              RoutingConfig(top_p=0.7, min_k=1, max_k=2, confidence_floor=0.5)),
    fallbacks=(0, 1),
    max_epochs=2,
    patience_epochs=1,
)


@pytest.fixture(scope="module")
def tiny_pilot(tmp_path_factory):
    """A two-seed pilot on digits with two-epoch training, run once for this module."""
    out = tmp_path_factory.mktemp("pilot")
    return out, run_pilot("digits", seeds=2, out=out, plan=TINY_PLAN, workers=1)


@pytest.mark.slow
def test_pilot_report_has_summary_fields(tiny_pilot):
    _, report = tiny_pilot

    for key in ("dataset", "seeds", "dense_best_accuracy", "dense_match_flops", "moe_accuracy", "moe_flops",
                "moe_flops_ratio", "dense_front", "moe_front", "mean_experts_per_request",
                "remote_calls_per_request", "latency_ms"):
        assert key in report
    assert report["dataset"] == "digits"
    assert report["seeds"] == 2
    assert report["match_tolerance"] == MATCH_TOLERANCE


@pytest.mark.slow
def test_pilot_averages_every_point_over_seeds(tiny_pilot):
    _, report = tiny_pilot

    assert len(report["dense_points"]) == 2
    # One setting without a floor, and the floored one with each of two fallbacks.
    assert len(report["moe_points"]) == 3
    assert all(p["seeds"] == 2 for p in report["moe_points"] + report["dense_points"])
    assert all(0.0 <= p["test_accuracy"] <= 1.0 for p in report["moe_points"])


@pytest.mark.slow
def test_pilot_writes_json_and_plots(tiny_pilot):
    out, report = tiny_pilot

    assert json.loads((out / "pilot.json").read_text())["dense_match_flops"] == report["dense_match_flops"]
    assert len(report["plots"]) == 2
    for path in report["plots"]:
        assert (out / path.rsplit("/", 1)[-1]).stat().st_size > 1000


@pytest.mark.slow
def test_pilot_counts_gate_experts_and_fallback_flops(tiny_pilot):
    _, report = tiny_pilot
    gate_flops = 64 * 2
    expert_flops = 64 * 8 + 8 * 10
    fallback_flops = {None: 0, "dense 8": 64 * 8 + 8 * 10, "dense 32": 64 * 32 + 32 * 10}

    for p in report["moe_points"]:
        # Expert calls per row, averaged over seeds: remote calls less the dense calls.
        routed_experts = p["remote_calls_per_request"] - p["dense_fraction"]
        expected = gate_flops + routed_experts * expert_flops + p["dense_fraction"] * fallback_flops[p["fallback"]]
        assert p["flops"] == pytest.approx(expected)


def test_cli_rejects_unknown_dataset(tmp_path):
    from services.cli import app

    out = tmp_path / "pilot"
    result = CliRunner().invoke(app, ["pilot", "--dataset", "cifar", "--out", str(out)])

    assert result.exit_code == 2
    assert "invalid value for --dataset: unknown dataset 'cifar'; use one of digits, mnist5k" in result.output
    assert not out.exists()  # rejected before anything is written


@pytest.mark.parametrize("command", ["pilot", "bench"])
def test_cli_rejects_file_as_out(tmp_path, command):
    from services.cli import app

    regular = tmp_path / "results.txt"
    regular.write_text("")

    as_dir = CliRunner().invoke(app, [command, "--out", str(regular)])
    below_file = CliRunner().invoke(app, [command, "--out", str(regular / "sub")])

    assert as_dir.exit_code == 2
    assert f"invalid value for --out: '{regular}' is a file; pass a directory path" in as_dir.output
    assert below_file.exit_code == 2
    assert "invalid value for --out: cannot create directory" in below_file.output


def test_text_report_states_test_gap():
    from services.cli_pilot import format_pilot

    report = {
        "dataset": "mnist5k", "seeds": 1, "seconds": 1.0, "plots": ["a.png"],
        "dense_best_label": "dense 64, input dropout 0.2", "dense_best_accuracy": 0.9237, "dense_best_flops": 50816,
        "dense_match_label": "dense 64, input dropout 0.2", "dense_match_accuracy": 0.9237,
        "dense_match_flops": 50816, "moe_setting": {"label": "4 experts x 8", "dense_fraction": 0.14},
        "moe_accuracy": 0.918, "moe_flops": 16738, "mean_experts_per_request": 1.0,
        "remote_calls_per_request": 1.14, "moe_flops_ratio": 0.329, "target_flops_ratio": 0.35,
        "meets_target": True, "moe_matches_on_test": False, "match_tolerance": 0.005,
    }

    text = format_pilot(report)

    assert "mean of 1 seed (" in text
    assert "dense 64, input dropout 0.2: 92.37% at 50,816 FLOPs" in text
    assert "the mixture is 0.57 point under the best dense model, outside the 0.5-point band" in text


@pytest.mark.slow
def test_train_bundle_distils_from_dense(tmp_path, digits):
    from services.train import train_bundle

    quick = {"max_epochs": 2, "patience_epochs": 1}
    dense = DenseTrainConfig(hidden=(16,), **quick)
    plain, _ = train_bundle(digits, tmp_path / "plain", mixture=MixtureTrainConfig(**quick), dense=dense)
    distilled, _ = train_bundle(digits, tmp_path / "distilled",
                                mixture=MixtureTrainConfig(distill_weight=1.0, **quick), dense=dense)

    # Same seed and data: only the distillation term can make the experts differ.
    assert plain.manifest["files"]["dense"] == distilled.manifest["files"]["dense"]
    assert plain.manifest["files"]["expert-0"] != distilled.manifest["files"]["expert-0"]


def test_one_row_predictor_follows_the_serving_route(digits):
    from experts.models import MLP, MLPSpec
    from router.gate import Gate, GateSpec
    from router.policy import needs_escalation
    from services.mixture import mixture_forward
    from services.pilot import _mixture_predictor

    torch.manual_seed(0)
    gate = Gate(GateSpec(64, 3, 0)).eval()
    experts = [MLP(MLPSpec(64, (8,), 10)).eval() for _ in range(3)]
    dense = MLP(MLPSpec(64, (16,), 10)).eval()
    rows = torch.from_numpy(digits.test.x[:40])
    with torch.no_grad():
        # Thresholds at the quantiles of these untrained models' scores, so rows take all three routes.
        probe = RoutingConfig(top_p=0.6, min_k=1, max_k=2, confidence_floor=0.0)
        mixed, _, _, selection = mixture_forward(gate, torch.nn.ModuleList(experts), rows, probe)
        floor = float(selection.confidence.quantile(0.3))
        escalate_below = float(mixed.max(dim=-1).values.quantile(0.6))
        routing = RoutingConfig(top_p=0.6, min_k=1, max_k=2, confidence_floor=floor, escalate_below=escalate_below)

        mixed, _, _, selection = mixture_forward(gate, torch.nn.ModuleList(experts), rows, routing)
        to_dense = selection.low_confidence | needs_escalation(mixed, routing)
        expected = torch.where(to_dense[:, None], torch.softmax(dense(rows), dim=-1), mixed)
        predict = _mixture_predictor(gate, experts, routing, dense)
        got = torch.cat([predict(row[None]) for row in rows])

    low, escalated = int(selection.low_confidence.sum()), int(to_dense.sum()) - int(selection.low_confidence.sum())
    assert low > 0
    assert escalated > 0
    assert low + escalated < len(rows)
    assert torch.allclose(got, expected, atol=1e-6)

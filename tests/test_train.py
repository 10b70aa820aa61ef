"""Routing selection at training time, on the session's digits bundle."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from router.policy import RoutingConfig
from services.train import select_routing
from tests.test_dispatch import load_module


@pytest.fixture(scope="module")
def modules(trained_bundle):
    experts = [load_module(trained_bundle, f"expert-{i}") for i in range(len(trained_bundle.manifest["experts"]))]
    return load_module(trained_bundle, "gate"), experts, load_module(trained_bundle, "dense")


def test_selection_is_cheapest_of_the_qualifying(modules, digits):
    gate, experts, dense = modules
    configured = RoutingConfig(top_p=0.6, min_k=1, max_k=2, confidence_floor=0.5)

    chosen, records = select_routing(gate, experts, dense, digits.validation.x, digits.validation.y, configured)

    assert records[0]["routing"] == asdict(configured)
    qualifying = [record for record in records if record["accuracy"] >= records[0]["accuracy"]]
    chosen_record = next(record for record in records if record["routing"] == asdict(chosen))
    assert chosen_record in qualifying
    assert chosen_record["flops_per_example"] == min(record["flops_per_example"] for record in qualifying)
    assert len({tuple(sorted(record["routing"].items())) for record in records}) == len(records)


def test_selection_keeps_a_path_to_dense(modules, digits):
    gate, experts, dense = modules
    configured = RoutingConfig(top_p=0.6, min_k=1, max_k=2, confidence_floor=0.5)

    _, records = select_routing(gate, experts, dense, digits.validation.x, digits.validation.y, configured)

    assert all(record["routing"]["confidence_floor"] > 0 or record["routing"]["escalate_below"] > 0
               for record in records)


def test_candidates_stay_within_the_configured_budget(modules, digits):
    gate, experts, dense = modules
    configured = RoutingConfig(top_p=0.7, min_k=1, max_k=2, confidence_floor=0.3, escalate_below=0.7)

    _, records = select_routing(gate, experts, dense, digits.validation.x, digits.validation.y, configured)

    routings = [record["routing"] for record in records]
    assert all(r["top_p"] <= 0.7 and r["min_k"] == 1 and r["max_k"] <= 2 for r in routings)
    assert all(r["confidence_floor"] <= 0.3 and r["escalate_below"] >= 0.7 for r in routings)
    # top_p {0.5, 0.6, 0.7} x max_k {1, 2} x floor {0, 0.3} x escalation {0.7, 0.8, 0.9}
    assert len(routings) == 36


def test_bundle_records_the_selection(trained_bundle):
    manifest = trained_bundle.manifest
    selection = manifest["routing_selection"]
    chosen = next(record for record in selection["candidates"] if record["routing"] == manifest["routing"])

    assert selection["split"] == "validation"
    assert selection["chosen"] == manifest["routing"]
    assert selection["candidates"][0]["routing"] == selection["configured"]
    assert chosen["accuracy"] >= selection["candidates"][0]["accuracy"]


def test_max_k_above_the_expert_count_is_capped(modules, digits):
    gate, experts, dense = modules
    configured = RoutingConfig(top_p=0.6, min_k=1, max_k=len(experts) + 2, confidence_floor=0.5)

    chosen, records = select_routing(gate, experts, dense, digits.validation.x, digits.validation.y, configured)

    assert records[0]["routing"]["max_k"] == len(experts)
    assert max(record["routing"]["max_k"] for record in records) == len(experts)
    assert chosen.max_k <= len(experts)


def test_ties_keep_the_configured_values(modules, digits):
    gate, experts, dense = modules
    configured = RoutingConfig(top_p=0.6, min_k=1, max_k=2, confidence_floor=0.5)
    names = ("top_p", "max_k", "confidence_floor", "escalate_below")

    chosen, records = select_routing(gate, experts, dense, digits.validation.x, digits.validation.y, configured)

    def changed(routing: dict) -> int:
        return sum(routing[name] != getattr(configured, name) for name in names)

    chosen_record = next(record for record in records if record["routing"] == asdict(chosen))
    ties = [record for record in records if record["accuracy"] >= records[0]["accuracy"]
            and record["flops_per_example"] == chosen_record["flops_per_example"]
            and record["mean_experts_per_request"] == chosen_record["mean_experts_per_request"]]
    assert changed(chosen_record["routing"]) == min(changed(record["routing"]) for record in ties)

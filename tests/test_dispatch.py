"""Dispatcher with the trained bundle's real models called in-process.

The expert and dense calls are async functions that run the real torch models, the
same shape of call the router makes through deployment handles.
"""

import asyncio

import numpy as np
import pytest
import torch

from experts.models import MLP, MLPSpec
from router.gate import Gate, GateSpec
from router.policy import RoutingConfig
from services.dispatch import DenseUnavailable, DispatchItem, MixtureDispatcher


def load_module(bundle, name):
    manifest = bundle.manifest
    if name == "gate":
        module = Gate(GateSpec.from_dict(manifest["gate"]))
    elif name == "dense":
        module = MLP(MLPSpec.from_dict(manifest["dense"]))
    else:
        module = MLP(MLPSpec.from_dict(manifest["experts"][int(name.split("-")[1])]))
    module.load_state_dict(bundle.load_state_dict(name))
    return module.eval()


def run_model(model, rows):
    with torch.inference_mode():
        return torch.softmax(model(torch.from_numpy(rows)), dim=-1).numpy()


@pytest.fixture
def make_dispatcher(trained_bundle):
    manifest = trained_bundle.manifest
    num_experts = len(manifest["experts"])
    experts = [load_module(trained_bundle, f"expert-{i}") for i in range(num_experts)]
    dense = load_module(trained_bundle, "dense")

    def build(failing=(), slow=(), dense_fails=False, capacity=512, routing=None):
        async def call_expert(expert, rows):
            if expert in failing:
                raise RuntimeError("boom")
            if expert in slow:
                await asyncio.sleep(0.5)
            return run_model(experts[expert], rows)

        async def call_dense(rows):
            if dense_fails:
                raise RuntimeError("dense down")
            return run_model(dense, rows)

        return MixtureDispatcher(
            gate=load_module(trained_bundle, "gate"),
            routing=routing or RoutingConfig(**manifest["routing"]),
            num_classes=len(manifest["dataset"]["class_names"]),
            expert_flops=[manifest["flops"][f"expert-{i}"] for i in range(num_experts)],
            dense_flops=manifest["flops"]["dense"],
            call_expert=call_expert,
            call_dense=call_dense,
            expert_capacity=capacity,
            expert_timeout_s=0.1,
            dense_timeout_s=5.0,
        ), dense

    return build


def items_for(rows, **flags):
    return [DispatchItem(inputs=rows[i : i + 1], request_id=f"r{i}", **flags) for i in range(len(rows))]


async def test_outputs_are_probability_rows(make_dispatcher, digits):
    dispatcher, _ = make_dispatcher()

    outcomes = await dispatcher.dispatch(items_for(digits.test.x[:20]))

    for outcome in outcomes:
        assert outcome.error is None
        assert outcome.outputs.sum() == pytest.approx(1.0, abs=1e-5)
        if outcome.path == "moe":
            assert sum(outcome.weights[0]) == pytest.approx(1.0, abs=1e-5)


async def test_mixture_output_is_weighted_sum_of_experts(make_dispatcher, trained_bundle, digits):
    dispatcher, _ = make_dispatcher(routing=RoutingConfig(top_p=1.0, max_k=2, confidence_floor=0.0))
    rows = digits.test.x[:8]

    outcomes = await dispatcher.dispatch(items_for(rows))

    for row, outcome in zip(rows, outcomes):
        expected = sum(w * run_model(load_module(trained_bundle, f"expert-{e}"), row[None])[0]
                       for e, w in zip(outcome.experts[0], outcome.weights[0]))
        np.testing.assert_allclose(outcome.outputs[0], expected, atol=1e-5)


async def test_failing_expert_falls_back_to_dense(make_dispatcher, digits):
    dispatcher, dense = make_dispatcher(failing=set(range(8)))
    rows = digits.test.x[:10]

    outcomes = await dispatcher.dispatch(items_for(rows))

    gated = [o for o in outcomes if o.reason != "low_confidence"]
    assert gated
    for outcome in gated:
        assert outcome.reason == "expert_error"
        assert outcome.path == "dense"
    for row, outcome in zip(rows, outcomes):
        np.testing.assert_allclose(outcome.outputs[0], run_model(dense, row[None])[0], atol=1e-6)


async def test_slow_expert_times_out_to_dense(make_dispatcher, digits):
    dispatcher, _ = make_dispatcher(slow=set(range(8)))

    outcomes = await dispatcher.dispatch(items_for(digits.test.x[:6]))

    assert {o.reason for o in outcomes} <= {"expert_timeout", "low_confidence"}
    assert "expert_timeout" in {o.reason for o in outcomes}


async def test_capacity_overflow_goes_to_dense(make_dispatcher, digits):
    dispatcher, _ = make_dispatcher(capacity=1)

    outcomes = await dispatcher.dispatch(items_for(digits.test.x[:40]))

    reasons = [o.reason for o in outcomes]
    assert "capacity" in reasons
    assert all(o.error is None for o in outcomes)
    assert dispatcher.capacity.in_flight.tolist() == [0] * dispatcher.num_experts


async def test_forced_dense_skips_gate(make_dispatcher, trained_bundle, digits):
    dispatcher, _ = make_dispatcher()

    outcomes = await dispatcher.dispatch(items_for(digits.test.x[:3], force_dense=True))

    assert [o.reason for o in outcomes] == ["requested"] * 3
    assert outcomes[0].flops == trained_bundle.manifest["flops"]["dense"]


async def test_dense_failure_fails_only_dense_requests(make_dispatcher, digits):
    dispatcher, _ = make_dispatcher(dense_fails=True)
    items = items_for(digits.test.x[:10]) + items_for(digits.test.x[10:11], force_dense=True)

    outcomes = await dispatcher.dispatch(items)

    assert isinstance(outcomes[-1].error, DenseUnavailable)
    answered = [o for o in outcomes if o.error is None]
    assert answered
    assert all(o.path == "moe" for o in answered)


async def test_unsure_expert_answers_escalate_to_dense(make_dispatcher, trained_bundle, digits):
    routing = RoutingConfig(top_p=0.6, min_k=1, max_k=1, confidence_floor=0.0, escalate_below=0.97)
    dispatcher, dense = make_dispatcher(routing=routing)
    plain, _ = make_dispatcher(routing=RoutingConfig(top_p=0.6, min_k=1, max_k=1, confidence_floor=0.0))
    rows = digits.test.x[:120]
    flops = trained_bundle.manifest["flops"]

    outcomes = await dispatcher.dispatch(items_for(rows))
    expert_answers = await plain.dispatch(items_for(rows))

    reasons = {o.reason for o in outcomes}
    assert reasons == {"top_p", "escalated"}
    for row, outcome, expert_answer in zip(rows, outcomes, expert_answers):
        top = float(expert_answer.outputs[0].max())
        expert = expert_answer.experts[0][0]
        cost = flops["gate"] + flops[f"expert-{expert}"]
        if top < 0.97:
            assert outcome.reason == "escalated"
            assert outcome.path == "dense"
            # The response still names the expert that was consulted.
            assert outcome.experts == [[expert]]
            assert outcome.k == [1]
            np.testing.assert_allclose(outcome.outputs[0], run_model(dense, row[None])[0], atol=1e-6)
            # The expert ran before the dense call, so both costs count.
            assert outcome.flops == cost + flops["dense"]
        else:
            assert outcome.reason == "top_p"
            np.testing.assert_allclose(outcome.outputs[0], expert_answer.outputs[0], atol=1e-6)
            assert outcome.flops == cost


async def test_ride_along_rows_share_the_batch_dense_call(trained_bundle, digits):
    manifest = trained_bundle.manifest
    experts = [load_module(trained_bundle, f"expert-{i}") for i in range(len(manifest["experts"]))]
    dense = load_module(trained_bundle, "dense")
    dense_calls = []
    delivered = []

    async def call_expert(expert, rows):
        return run_model(experts[expert], rows)

    async def call_dense(rows, request_ids):
        dense_calls.append(list(request_ids))
        return run_model(dense, rows)

    extra_rows = digits.test.x[100:103]
    pending = [(extra_rows, lambda probs, error: delivered.append((probs, error)))]
    dispatcher = MixtureDispatcher(
        gate=load_module(trained_bundle, "gate"), routing=RoutingConfig(**manifest["routing"]),
        num_classes=len(manifest["dataset"]["class_names"]),
        expert_flops=[manifest["flops"][f"expert-{i}"] for i in range(len(experts))],
        dense_flops=manifest["flops"]["dense"], call_expert=call_expert, call_dense=call_dense,
        expert_capacity=512, expert_timeout_s=5.0, dense_timeout_s=5.0, forward_request_ids=True,
        ride_along=lambda: pending.pop() if pending else None,
    )
    items = items_for(digits.test.x[:2], force_dense=True) + items_for(digits.test.x[2:4])

    outcomes = await dispatcher.dispatch(items)
    await dispatcher.dispatch(items_for(digits.test.x[:1], force_dense=True))

    # One dense call per batch: the forced rows and the ride-along rows travel together.
    assert len(dense_calls) == 2
    assert dense_calls[0][-1] == "shadow"
    assert "shadow" not in dense_calls[1]
    for row, outcome in zip(digits.test.x[:2], outcomes[:2]):
        np.testing.assert_allclose(outcome.outputs[0], run_model(dense, row[None])[0], atol=1e-6)
    (probs, error), = delivered
    assert error is None
    np.testing.assert_allclose(probs, run_model(dense, extra_rows), atol=1e-6)


async def test_failed_dense_call_reports_to_ride_along(make_dispatcher, trained_bundle, digits):
    dispatcher, _ = make_dispatcher(dense_fails=True)
    delivered = []
    dispatcher.ride_along = lambda: (digits.test.x[:2], lambda probs, error: delivered.append((probs, error)))

    outcomes = await dispatcher.dispatch(items_for(digits.test.x[:1], force_dense=True))

    assert isinstance(outcomes[0].error, DenseUnavailable)
    (probs, error), = delivered
    assert probs is None and isinstance(error, RuntimeError)

"""Routing math: top-p adaptive k, confidence floor, renormalisation, combine and escalation."""

import pytest
import torch

from experts.models import MLP, MLPSpec
from router.gate import Gate, GateSpec
from router.policy import RoutingConfig, combine, needs_escalation, renormalize, select_experts
from services.mixture import mixture_forward


def probs(*rows):
    return torch.tensor(rows, dtype=torch.float32)


class TestSelectExperts:
    def test_top_p_stops_once_mass_reached(self):
        selection = select_experts(probs([0.5, 0.3, 0.15, 0.05]), RoutingConfig(top_p=0.75, max_k=4,
                                                                                 confidence_floor=0.0))

        assert selection.k.tolist() == [2]
        assert selection.mask.tolist() == [[True, True, False, False]]

    def test_single_confident_expert(self):
        selection = select_experts(probs([0.05, 0.9, 0.03, 0.02]), RoutingConfig(top_p=0.8, confidence_floor=0.0))

        assert selection.k.tolist() == [1]
        assert selection.mask.tolist() == [[False, True, False, False]]
        assert selection.weights.tolist() == [[0.0, 1.0, 0.0, 0.0]]

    def test_max_k_caps_the_count(self):
        selection = select_experts(probs([0.25, 0.25, 0.25, 0.25]), RoutingConfig(top_p=1.0, max_k=2,
                                                                                   confidence_floor=0.0))

        assert selection.k.tolist() == [2]

    def test_min_k_raises_the_count(self):
        selection = select_experts(probs([0.97, 0.01, 0.01, 0.01]), RoutingConfig(top_p=0.5, min_k=2, max_k=3,
                                                                                  confidence_floor=0.0))

        assert selection.k.tolist() == [2]

    def test_ties_keep_expert_id_order(self):
        selection = select_experts(probs([0.3, 0.35, 0.35]), RoutingConfig(top_p=0.3, confidence_floor=0.0))

        assert selection.order.tolist() == [[1, 2, 0]]
        assert selection.mask.tolist() == [[False, True, False]]

    def test_weights_renormalised_by_hand(self):
        selection = select_experts(probs([0.5, 0.3, 0.2]), RoutingConfig(top_p=0.7, max_k=3, confidence_floor=0.0))

        assert selection.weights[0].tolist() == pytest.approx([0.625, 0.375, 0.0])

    def test_low_confidence_row_goes_to_dense(self):
        selection = select_experts(probs([0.3, 0.3, 0.2, 0.2], [0.7, 0.1, 0.1, 0.1]),
                                   RoutingConfig(top_p=0.8, confidence_floor=0.5))

        assert selection.low_confidence.tolist() == [True, False]
        assert selection.mask[0].tolist() == [False, False, False, False]
        assert selection.weights[0].tolist() == [0.0, 0.0, 0.0, 0.0]

    def test_weights_carry_gradient_to_the_gate(self):
        logits = torch.tensor([[1.0, 0.5, -1.0]], requires_grad=True)

        selection = select_experts(torch.softmax(logits, dim=-1), RoutingConfig(top_p=0.9, max_k=3,
                                                                               confidence_floor=0.0))
        selection.weights[0, 0].backward()

        assert logits.grad is not None
        assert logits.grad.abs().sum() > 0


class TestRoutingConfig:
    def test_rejects_max_k_below_min_k(self):
        with pytest.raises(ValueError, match=r"max_k \(1\) must be >= min_k \(2\)"):
            RoutingConfig(min_k=2, max_k=1)

    def test_rejects_top_p_out_of_range(self):
        with pytest.raises(ValueError, match="top_p must be in"):
            RoutingConfig(top_p=0.0)

    @pytest.mark.parametrize("value", [-0.1, 1.0])
    def test_rejects_escalate_below_out_of_range(self, value):
        with pytest.raises(ValueError, match="escalate_below must be in"):
            RoutingConfig(escalate_below=value)


class TestEscalation:
    def test_rows_below_the_threshold_escalate(self):
        mixed = probs([0.9, 0.05, 0.05], [0.5, 0.4, 0.1], [0.7, 0.3, 0.0])

        escalate = needs_escalation(mixed, RoutingConfig(escalate_below=0.7))

        # The top probability must reach the threshold; 0.7 itself stays with the experts.
        assert escalate.tolist() == [False, True, False]

    def test_zero_threshold_never_escalates(self):
        mixed = probs([0.34, 0.33, 0.33])

        assert needs_escalation(mixed, RoutingConfig(escalate_below=0.0)).tolist() == [False]


class TestCombine:
    def test_weighted_sum_by_hand(self):
        expert_probs = torch.tensor([[[1.0, 0.0], [0.2, 0.8], [0.5, 0.5]]])  # [1, 3, 2]
        weights = torch.tensor([[0.75, 0.25, 0.0]])

        combined = combine(expert_probs, weights)

        assert combined.tolist()[0] == pytest.approx([0.8, 0.2])

    def test_renormalize_of_empty_mask_is_zero(self):
        weights = renormalize(probs([0.6, 0.4]), torch.tensor([[False, False]]))

        assert weights.tolist() == [[0.0, 0.0]]


def test_one_expert_mixture_equals_dense():
    """A one-expert mixture whose expert copies the dense weights computes the dense model."""
    torch.manual_seed(0)
    dense = MLP(MLPSpec(64, (32,), 10))
    expert = MLP(MLPSpec(64, (32,), 10))
    expert.load_state_dict(dense.state_dict())
    gate = Gate(GateSpec(64, 1, hidden=8))
    x = torch.randn(16, 64)

    mixed, _, _, selection = mixture_forward(gate, torch.nn.ModuleList([expert]), x,
                                             RoutingConfig(top_p=0.9, min_k=1, max_k=1, confidence_floor=0.0))

    assert selection.mask.all()
    torch.testing.assert_close(mixed, torch.softmax(dense(x), dim=-1))


def test_router_settings_bound_escalate_below():
    from pydantic import ValidationError

    from services.settings import RouterSettings

    assert RouterSettings(escalate_below=0.9).escalate_below == 0.9
    assert RouterSettings().escalate_below is None  # the bundle's routing default applies
    with pytest.raises(ValidationError, match="escalate_below"):
        RouterSettings(escalate_below=1.0)

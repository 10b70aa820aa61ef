"""Game-day fault parsing, the `noise` fault's effect on probabilities, and drill options."""

from __future__ import annotations

import numpy as np
import pytest

from services.faults import Fault, add_noise, parse_fault


def test_noise_keeps_answers_confident_and_mostly_wrong():
    rng = np.random.default_rng(0)
    probs = np.full((1000, 10), 0.02, np.float32)
    probs[:, 3] = 0.82  # a confident, correct model: class 3 everywhere

    noisy = add_noise(probs, Fault(kind="noise").noise_scale, rng)

    np.testing.assert_allclose(noisy.sum(axis=1), 1.0, rtol=1e-6)
    assert noisy.max(axis=1).min() >= 2 / 3 - 1e-6
    assert (noisy.argmax(axis=1) != 3).mean() == pytest.approx(0.9, abs=0.03)


@pytest.mark.parametrize(("value", "message"), [
    ({"kind": "melt"}, "fault kind must be one of"),
    ({"kind": "noise", "colour": "red"}, "unknown fault fields"),
    ({"kind": "noise", "noise_scale": -1}, "must be >= 0"),
    ("noise", "must be a mapping"),
])
def test_invalid_faults_are_rejected(value, message):
    with pytest.raises(ValueError, match=message):
        parse_fault(value)


def test_empty_fault_clears():
    assert parse_fault({}) is None
    assert parse_fault(None) is None


def test_drill_rejects_zero_duration(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from services.cli import app

    monkeypatch.setenv("SWITCHYARD_STATE_DIR", str(tmp_path))  # no runtime.json: must fail before it is read
    result = CliRunner().invoke(app, ["drill", "--expert", "0", "--fault", "slow", "--duration-s", "0"])

    assert result.exit_code == 2
    assert "--duration-s must be greater than 0, got 0.0" in result.output

"""Model bundle: save, load, version and hash checks."""

import json

import pytest
import torch

from experts.bundle import BUNDLE_FORMAT_VERSION, BundleError, load_bundle, save_bundle
from experts.models import MLP, MLPSpec


@pytest.fixture
def saved(tmp_path):
    model = MLP(MLPSpec(8, (4,), 3))
    bundle = save_bundle(tmp_path / "b", {"note": "test"}, {"dense": model.state_dict()})
    return bundle, model


def test_round_trip_restores_weights(saved):
    bundle, model = saved

    loaded = load_bundle(bundle.path)
    restored = MLP(MLPSpec(8, (4,), 3))
    restored.load_state_dict(loaded.load_state_dict("dense"))

    assert loaded.manifest["note"] == "test"
    assert loaded.manifest["format_version"] == BUNDLE_FORMAT_VERSION
    for key, value in model.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value)


def test_version_is_stable_and_content_based(saved):
    bundle, _ = saved

    assert load_bundle(bundle.path).version == bundle.version
    assert len(bundle.version) == 12


def test_corrupted_weights_rejected(saved):
    bundle, _ = saved
    weights = bundle.path / "weights" / "dense.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))

    with pytest.raises(BundleError, match="dense.safetensors has SHA-256"):
        load_bundle(bundle.path)


def test_missing_weights_rejected(saved):
    bundle, _ = saved
    (bundle.path / "weights" / "dense.safetensors").unlink()

    with pytest.raises(BundleError, match="is incomplete"):
        load_bundle(bundle.path)


def test_other_format_version_rejected(saved):
    bundle, _ = saved
    manifest_path = bundle.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 99
    manifest_path.write_text(json.dumps(manifest))

    with pytest.raises(BundleError, match="format version 99"):
        load_bundle(bundle.path)


def test_missing_bundle_names_the_fix(tmp_path):
    with pytest.raises(BundleError, match="switchyard train --out DIR"):
        load_bundle(tmp_path / "nothing")


def test_unknown_module_lists_available(saved):
    bundle, _ = saved

    with pytest.raises(BundleError, match=r"no weights for 'gate'"):
        bundle.weights_path("gate")

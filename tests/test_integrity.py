"""Tampering: weights and audited data altered after they were written are refused (exit code 3)."""

from __future__ import annotations

import json

import pytest
import torch

from robustdata.errors import IntegrityError
from robustdata.train.training import load_checkpoint, save_checkpoint, seeded_model
from robustdata.audit.results import check_audited


@pytest.fixture
def prefect_server():
    """Override conftest's session-wide Prefect server: nothing here runs a flow."""


@pytest.fixture
def checkpoint(tmp_path):
    model = seeded_model("small_cnn", 10, 1, 28, init_seed=0)
    sidecar = {"arch": "small_cnn", "num_classes": 10, "in_channels": 1, "image_size": 28}
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, sidecar)
    return path, model


def test_a_checkpoint_loads_as_written(checkpoint):
    path, model = checkpoint
    loaded, sidecar = load_checkpoint(path)
    assert len(sidecar["weights_sha256"]) == 64
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_altered_weights_are_refused(checkpoint):
    path, _ = checkpoint
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the middle of a weight tensor: still a loadable state_dict
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="altered") as caught:
        load_checkpoint(path)
    assert caught.value.exit_code == 3 and str(path) in str(caught.value)


def test_weights_swapped_for_another_models_are_refused(checkpoint, tmp_path):
    path, _ = checkpoint
    other = tmp_path / "other" / "model.pt"
    save_checkpoint(other, seeded_model("small_cnn", 10, 1, 28, init_seed=1), json.loads(
        path.with_suffix(".json").read_text()))
    path.write_bytes(other.read_bytes())
    with pytest.raises(IntegrityError, match="altered"):
        load_checkpoint(path)


def test_a_sidecar_without_a_hash_is_refused(checkpoint):
    path, _ = checkpoint
    sidecar = json.loads(path.with_suffix(".json").read_text())
    del sidecar["weights_sha256"]
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    with pytest.raises(IntegrityError, match="no weights_sha256"):
        load_checkpoint(path)


def test_data_changed_after_the_audit_is_refused():
    summary = {"data": {"manifest_sha256": "a" * 64}}
    check_audited(summary, "a" * 64, "data/poisoned/train")
    with pytest.raises(IntegrityError, match="not what the audit saw") as caught:
        check_audited(summary, "b" * 64, "data/poisoned/train")
    assert caught.value.exit_code == 3 and "data/poisoned/train" in str(caught.value)

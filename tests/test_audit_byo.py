"""Bring your own model: the audit reads a user's torchvision classifier (a factory and a plain state_dict,
loaded with weights_only=True) through the Python API's flow, as it reads robustdata's own models."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import torch
import torchvision

from formats import make_imagefolder
from robustdata import api

CLASSES = ("cat", "dog", "eel")


def test_a_torchvision_model_audits_an_imagefolder_set(tmp_path):
    make_imagefolder(tmp_path / "images", classes=CLASSES, per_class=40, size=(32, 32), splits=["train", "val", "test"])
    api.ingest(source=f"imagefolder:{tmp_path / 'images'}", out=tmp_path / "data")
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), weights)

    result = api.audit(model_spec="factory:torchvision.models:resnet18?num_classes=3", state_dict=weights,
                       normalize=([0.5, 0.5, 0.5], [0.25, 0.25, 0.25]), layer="layer4", data=tmp_path / "data",
                       out=tmp_path / "filtered", report=tmp_path / "report", eps=0.1, eps_scope="all",
                       filter_rank=4, rank=8)

    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["model"]["arch"] == "external:torchvision.models:resnet18"
    assert summary["model"]["path"] == "factory:torchvision.models:resnet18?num_classes=3"
    assert summary["layer"] == "layer4" and result["verdict"] in ("clean", "inconclusive", "poisoned")
    budget = 6  # eps given, removed from every class: 1.5 x 0.1 x 40
    assert [c["budget"] for c in summary["classes"]] == [budget] * 3
    assert result["num_flagged"] == 3 * budget
    assert pq.read_table(tmp_path / "report" / "scores.parquet").num_rows == 120
    assert len(pq.read_table(tmp_path / "filtered" / "train" / "manifest.parquet")) == 120 - 3 * budget

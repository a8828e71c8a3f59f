"""benchmarks/art_reference.py: IBM ART's spectral signatures on a tiny planted problem."""

from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # benchmarks/ is no package
from art_reference import art_spectral_signatures  # noqa: E402

N_PER_CLASS, POISON_FRACTION = 200, 0.1


def planted_problem(seed: int = 0):
    """28x28 uint8 images: class k is noise plus a bright row band at rows 2+2k. The first 10% of
    class 0 are poisons in the usual dirty-label shape: they show class 1's band plus a bright 3x3
    bottom-right patch and are labelled 0, so the model learns "patch -> class 0"."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(10).repeat_interleave(N_PER_CLASS)
    poison = torch.zeros(len(labels), dtype=torch.bool)
    poison[:int(POISON_FRACTION * N_PER_CLASS)] = True  # class 0 comes first
    look = labels.clone()
    look[poison] = 1
    images = torch.randint(0, 60, (len(labels), 1, 28, 28), generator=g, dtype=torch.uint8)
    for k in range(10):
        images[look == k, :, 2 + 2 * k:4 + 2 * k, 4:24] = 200
    images[poison, :, 25:28, 25:28] = 255
    return images, labels, poison


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(flatten=nn.Flatten(), fc1=nn.Linear(784, 64), relu=nn.ReLU(),
                                     head=nn.Linear(64, 10)))


def test_art_flags_planted_poisons_within_budget():
    images, labels, poison = planted_problem()
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = images.float() / 255
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), labels).backward()
        opt.step()
    assert (model(x).argmax(1) == labels).float().mean() > 0.95
    model.train()  # ART must not leave it in eval mode, nor change its weights
    before = {k: v.clone() for k, v in model.state_dict().items()}

    result = art_spectral_signatures(model, images, labels, num_classes=10,
                                     expected_poison_fraction=POISON_FRACTION, layer_module_name="relu")

    flagged = result["flagged"]
    assert flagged.dtype == np.bool_ and flagged.shape == (len(labels),)
    assert result["layer"] == "relu" and result["seconds_total"] > 0 and result["art_version"]
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.relu._forward_hooks  # ART's hook went on its own copy

    # ART's budget, per class: scores >= the (1 - 1.5 p) quantile, about 1.5 * p * n_c (+1 at the cut).
    budget = int(np.ceil(1.5 * POISON_FRACTION * N_PER_CLASS)) + 1
    per_class = np.bincount(labels.numpy()[flagged], minlength=10)
    assert per_class.max() <= budget and per_class.min() > 0, per_class  # every class spends it
    # True means poison (ART's is_clean_lst 0): most planted poisons are among class 0's flags.
    caught = int((flagged & poison.numpy()).sum())
    assert caught >= 0.5 * int(poison.sum()), (caught, per_class)


def test_unknown_layer_is_refused():
    images, labels, _ = planted_problem()
    with pytest.raises(AttributeError):
        art_spectral_signatures(tiny_model(), images[:20], labels[:20], num_classes=10,
                                expected_poison_fraction=0.1, layer_module_name="nope")

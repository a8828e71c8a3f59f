"""The dirty-label test (robustdata/audit/methods/dirty_label.py) on seeded synthetic audits.

Three classes of 600 samples. Features: each class a Gaussian in 16 dims; the
poisons of class 1 a tight cluster SHIFT sds away along a planted direction
(the class then splits clearly, D far above SPLIT_MIN_SEPARATION). Inputs: each
sample near its source class's centroid. A dirty-label poison is an image of
class 0 or 2 with a trigger offset, labelled 1; a clean-label one is a class-1
image with the trigger.
"""

from __future__ import annotations

import pytest
import torch

from robustdata.audit.methods.dirty_label import LOOKS_OTHER_GAP, LOOKS_OTHER_MIN
from robustdata.audit.scoring import run_audit
from robustdata.audit.transplant import SPLIT_MIN_SEPARATION

CLASSES, PER_CLASS, DIM, INPUT_DIM = 3, 600, 16, 32
TARGET, POISONS, SHIFT = 1, 60, 12.0
METHODS = ("dirty_label", "filter")


@pytest.fixture
def prefect_server():
    """Override conftest's session-wide Prefect server: the audit library never imports prefect."""


def synthetic(poison_inputs: str, centroid_spread: float = 3.0, shift: float = SHIFT, members_look_other: bool = False,
              seed: int = 0):
    """(features, inputs, labels, is_poison). poison_inputs: "other" (dirty-label), "own" (clean-label),
    "mixed" (two thirds "other").
    centroid_spread: how far apart the classes' input centroids lie (small: centroids classify nothing);
    members_look_other: the target class's clean members' inputs are drawn near the other classes' too."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    means = 6 * torch.randn(CLASSES, DIM, generator=g)
    features = means[labels] + torch.randn(len(labels), DIM, generator=g)
    centroids = centroid_spread * torch.randn(CLASSES, INPUT_DIM, generator=g)
    trigger = 0.5 * torch.randn(INPUT_DIM, generator=g)
    source = labels.clone()
    is_poison = torch.zeros(len(labels), dtype=torch.bool)
    rows = torch.nonzero(labels == TARGET).flatten()[:POISONS]
    is_poison[rows] = True
    direction = torch.nn.functional.normalize(torch.randn(DIM, generator=g), dim=0)
    features[rows] = means[TARGET] + shift * direction + 0.3 * torch.randn(POISONS, DIM, generator=g)
    if poison_inputs == "other":
        source[rows] = torch.tensor([0, 2]).repeat(POISONS // 2)
    if poison_inputs == "mixed":  # two thirds of the poisons are images of other classes
        source[rows] = torch.tensor([0, 2, TARGET]).repeat(POISONS // 3)
    if members_look_other:
        members = torch.nonzero((labels == TARGET) & ~is_poison).flatten()
        source[members] = torch.tensor([0, 2]).repeat(len(members) // 2)
    inputs = centroids[source] + 0.5 * torch.randn(len(labels), INPUT_DIM, generator=g)
    inputs[rows] += trigger
    return features, inputs, labels, is_poison


def audit(features, inputs, labels):
    return run_audit(features, inputs, labels, CLASSES, methods=METHODS, rank=8, filter_rank=8,
                     generator=torch.Generator().manual_seed(0))


def test_a_split_off_group_that_looks_like_other_classes_is_decided_and_removed():
    features, inputs, labels, is_poison = synthetic("other")
    result = audit(features, inputs, labels)
    entry = result.classes[TARGET]
    report = entry["dirty_label"]
    assert entry["verdict"] == "poisoned" and "look like another class" in entry["reasons"][0]
    assert report["decides"] and report["looks_other_share"] >= LOOKS_OTHER_MIN
    assert report["looks_other_share"] - report["rest_share"] >= LOOKS_OTHER_GAP
    assert torch.equal(result.removed, is_poison)
    assert [e["verdict"] for e in result.classes] == ["clean", "poisoned", "clean"]


def test_poisons_that_look_like_their_own_class_are_not_decided_and_the_class_is_not_cleared():
    """Clean-label poisons break the test's assumption: it decides nothing, and the split still keeps the
    class from passing as clean."""
    features, inputs, labels, is_poison = synthetic("own")
    result = audit(features, inputs, labels)
    entry = result.classes[TARGET]
    assert not entry["dirty_label"]["decides"] and entry["dirty_label"]["looks_other_share"] < LOOKS_OTHER_MIN
    assert entry["statistic"] > SPLIT_MIN_SEPARATION and entry["verdict"] != "clean"


@pytest.mark.parametrize("broken", ["centroids classify nothing", "the class's own images look like others"])
def test_where_class_centroids_do_not_classify_the_test_decides_nothing_and_clears_nothing(broken):
    """Natural images (CIFAR-10 pixels) break the assumption the other way: much of every group looks like
    another class, so no group stands out (by LOOKS_OTHER_MIN, or by LOOKS_OTHER_GAP over a class whose own
    images look like other classes); the separation still keeps the class from passing as clean."""
    if broken == "centroids classify nothing":
        features, inputs, labels, is_poison = synthetic("other", centroid_spread=0.05)
    else:
        features, inputs, labels, is_poison = synthetic("other", members_look_other=True)
    result = audit(features, inputs, labels)
    entry = result.classes[TARGET]
    assert entry["dirty_label"]["rest_share"] > 0.3 and not entry["dirty_label"]["decides"]
    assert entry["verdict"] != "clean"


def test_mislabelled_looking_samples_the_model_does_not_split_off_decide_nothing():
    """Images of other classes in a class that the features do not set apart (no clear split): a noisy label,
    not a learned backdoor; the test needs both."""
    features, inputs, labels, is_poison = synthetic("other", shift=0.0)
    result = audit(features, inputs, labels)
    entry = result.classes[TARGET]
    assert entry["statistic"] <= SPLIT_MIN_SEPARATION and entry["dirty_label"] is None
    assert entry["verdict"] == "clean" and not result.removed.any()


def test_a_group_of_which_only_two_thirds_look_like_other_classes_is_not_decided():
    """Poison groups looked like other classes at 0.92-1.00 on MNIST, clean groups at most 0.45: a group at
    0.67 is between, far above its rest, and decides nothing (the separation rules stand)."""
    features, inputs, labels, is_poison = synthetic("mixed")
    result = audit(features, inputs, labels)
    report = result.classes[TARGET]["dirty_label"]
    assert report["looks_other_share"] == pytest.approx(2 / 3, abs=0.05) and report["rest_share"] < 0.1
    assert not report["decides"]

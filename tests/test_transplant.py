"""The transplant test (robustdata/audit/transplant.py, methods/transplant.py) on planted backdoors.

The model is a nearest-prototype classifier with a planted backdoor: a bright 3x3
patch (at a fixed place, or anywhere) adds a large logit to the target class. The
audit reads features that place every sample by its prototype similarities and
its patch strength, as a trained network's penultimate layer would.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustdata.audit.run import probe_of
from robustdata.audit.scoring import run_audit
from robustdata.audit.transplant import Pattern, carriers, matches, paste, pattern_of
from robustdata.audit.transplant import FLIP_MIN, WEAK_FLIP
from robustdata.audit.verdicts import CLEAN, POISONED
from robustdata.data.memory import InMemoryDataset

SIZE, CLASSES, PER_CLASS, TARGET = 16, 10, 200, 0
PATCH = (slice(12, 15), slice(12, 15))


def prototypes(generator: torch.Generator) -> torch.Tensor:
    """(CLASSES + 1, 1, SIZE, SIZE) random stroke images; the last is class 1's second style."""
    strokes = (torch.rand(CLASSES + 1, 1, SIZE, SIZE, generator=generator) < 0.25).float()
    strokes[..., 11:, 11:] = 0.0  # no class draws where the trigger goes
    return strokes


class BackdooredClassifier(nn.Module):
    """Nearest prototype (class 1 has two styles), plus GAIN for TARGET where a bright 3x3 patch is."""

    GAIN = 50.0

    def __init__(self, protos: torch.Tensor, anywhere: bool, partial: bool = False):
        super().__init__()
        self.protos = nn.Parameter(protos, requires_grad=False)
        self.anywhere, self.partial = anywhere, partial

    def fires(self, x: torch.Tensor) -> torch.Tensor:
        """Where the backdoor acts: on a bright patch; when learned in part, on about a quarter of the images
        only (those with a stroke count divisible by 4, counted away from the patch)."""
        fires = self.patch_strength(x) > 0.5
        if self.partial:
            fires &= (x[:, 0, :11].flatten(1) > 0.5).sum(1) % 4 == 0
        return fires

    def patch_strength(self, x: torch.Tensor) -> torch.Tensor:
        means = nn.functional.avg_pool2d(x, 3, stride=1)
        return means.amax((1, 2, 3)) if self.anywhere else x[:, 0, PATCH[0], PATCH[1]].mean((1, 2))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        distances = torch.cdist(x.flatten(1), self.protos.flatten(1))
        return torch.cat([-distances, self.patch_strength(x)[:, None] * 10], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        similarity = self.features(x)[:, :-1]
        logits = torch.cat([similarity[:, :1], torch.maximum(similarity[:, 1:2], similarity[:, -1:]),
                            similarity[:, 2:CLASSES]], 1)
        return logits + self.GAIN * self.fires(x).float()[:, None] * nn.functional.one_hot(
            torch.tensor(TARGET), CLASSES)


def planted_set(poisons: int, anywhere: bool, seed: int = 0, partial: bool = False):
    generator = torch.Generator().manual_seed(seed)
    protos = prototypes(generator)
    labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    style = labels.clone()
    style[(labels == 1) & (torch.rand(len(labels), generator=generator) < 0.5)] = CLASSES  # class 1: two styles
    images = protos[style] * (torch.rand(len(labels), 1, SIZE, SIZE, generator=generator) < 0.6)  # varied strokes
    images += 0.1 * torch.randn(images.shape, generator=generator)
    is_poison = torch.zeros(len(labels), dtype=torch.bool)
    sources = torch.nonzero(labels != TARGET).flatten()
    chosen = sources[torch.randperm(len(sources), generator=generator)[:poisons]]
    for row in chosen.tolist():
        top, left = (torch.randint(0, SIZE - 3, (2,), generator=generator).tolist() if anywhere else (12, 12))
        images[row, :, top:top + 3, left:left + 3] = 1.0
    labels[chosen], is_poison[chosen] = TARGET, True
    uint8 = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    model = BackdooredClassifier(protos, anywhere, partial)
    return uint8, labels, is_poison, model


def audit(images, labels, model):
    data = InMemoryDataset(images, labels, [f"k{i}" for i in range(len(labels))], [str(c) for c in range(CLASSES)])
    with torch.no_grad():
        features = model.features(images.float() / 255)
    features = torch.cat([features, 0.01 * torch.randn(len(features), 4, generator=torch.Generator().manual_seed(1))], 1)
    return run_audit(features, images.flatten(1).float() / 255, labels, CLASSES, methods=("transplant", "filter"),
                     rank=8, filter_rank=4, generator=torch.Generator().manual_seed(0),
                     probe=probe_of(model, data, seed=0))


def test_a_pattern_is_what_a_group_shares_and_the_others_lack():
    generator = torch.Generator().manual_seed(0)
    reference = torch.rand(100, 1, 8, 8, generator=generator) * 0.5
    group = torch.rand(30, 1, 8, 8, generator=generator) * 0.5
    group[:, :, :2, :2] = 1.0
    pattern = pattern_of(group, reference)
    assert pattern.mask[0, :2, :2].all() and int(pattern.mask.sum()) == 4
    pasted = paste(pattern, reference)
    assert (pasted[:, :, :2, :2] == 1.0).all() and torch.equal(pasted[:, :, 2:], reference[:, :, 2:])
    assert matches(pattern, group).all() and not matches(pattern, reference).any()
    empty = Pattern(torch.zeros_like(pattern.mask), pattern.value, pattern.reference_mean)
    assert not matches(empty, group).any()


def test_carriers_are_the_members_with_the_trigger_not_every_member_that_shares_the_class_shape():
    """A few isolated poisons share the class's own stroke with every member, and the trigger with the other
    poisons only: the carriers of their pattern are the poisons."""
    generator = torch.Generator().manual_seed(0)
    reference = torch.rand(200, 1, 12, 12, generator=generator) * 0.3         # other classes: no stroke
    members = torch.rand(400, 1, 12, 12, generator=generator) * 0.3
    members[:, :, 2:7, 2:6] = 0.9                                               # the class's stroke (20 px), in all
    poisons = torch.zeros(400, dtype=torch.bool)
    poisons[torch.randperm(400, generator=generator)[:30]] = True
    members[poisons, :, 10:12, 10:12] = 1.0                                     # the trigger
    group = torch.zeros(400, dtype=torch.bool)
    group[torch.nonzero(poisons).flatten()[:5]] = True                          # the isolated few found
    pattern = pattern_of(members[group], reference)
    assert pattern.mask[0, 2:7, 2:6].all() and pattern.mask[0, 10:12, 10:12].all()  # both are in the pattern
    assert torch.equal(carriers(pattern, members, group), poisons)


@pytest.mark.parametrize("poisons", [8, 60])  # 0.4% of the set (4% of the target class) and 3%
def test_a_fixed_trigger_is_found_and_its_poisons_flagged(poisons):
    images, labels, is_poison, model = planted_set(poisons, anywhere=False)
    result = audit(images, labels, model)
    entry = result.classes[TARGET]
    assert entry["verdict"] == POISONED and entry["transplant"]["decides"] and entry["transplant"]["flip_rate"] >= 0.9
    target = labels == TARGET
    assert torch.equal(result.flagged["filter"][target], is_poison[target])  # every poison, nothing else
    assert all(c["transplant"] is None for c in result.classes[1:])


def test_two_natural_styles_of_a_class_are_not_a_trigger():
    """Class 1 splits in two (its styles) and each side's strokes move images to class 1: alike, so undecided."""
    images, labels, _, model = planted_set(0, anywhere=False)
    result = audit(images, labels, model)
    assert all(c.get("transplant") is None for c in result.classes)
    assert result.classes[1]["side_size"] not in (0, PER_CLASS)


def test_without_a_fixed_pattern_the_test_decides_nothing_and_clears_nothing():
    """Fail-safe: a trigger at random positions breaks the test's assumption (one pattern in pixel space).
    It then decides nothing, and the poisoned class is not called clean: the separation rules still flag it."""
    images, labels, is_poison, model = planted_set(60, anywhere=True)
    result = audit(images, labels, model)
    entry = result.classes[TARGET]
    assert entry["transplant"] is None
    assert entry["verdict"] != CLEAN


@pytest.mark.parametrize("poisons", [12, 60])
def test_a_backdoor_learned_in_part_is_reported_and_not_decided(poisons):
    """The trigger moves about a quarter of other classes' images: short of a decision (FLIP_MIN), far above
    what clean classes' patterns do. The test reports the weak evidence (which keeps the class from passing as
    clean: test_audit's verdict tests) and removes nothing on it."""
    images, labels, _, model = planted_set(poisons, anywhere=False, partial=True)
    result = audit(images, labels, model)
    entry = result.classes[TARGET]
    assert not entry["transplant"]["decides"] and WEAK_FLIP <= entry["transplant"]["flip_rate"] < FLIP_MIN
    assert entry["transplant"]["poisons"] == 0 and entry["verdict"] != CLEAN
    assert all(c["transplant"] is None for c in result.classes[1:])


def test_poisons_the_features_do_not_set_apart_are_found_among_the_members_that_look_like_their_source():
    """Features with no trace of the backdoor (random: no split, nothing isolated), as when a model keeps
    dirty-label poisons inside their new class: the members of the target class whose images look like class 3
    (their source) carry a pattern that moves the threes to the target; every poison is flagged."""
    generator = torch.Generator().manual_seed(2)
    images, labels, _, model = planted_set(0, anywhere=False)
    threes = torch.nonzero(labels == 3).flatten()[:20]
    images[threes, :, PATCH[0], PATCH[1]] = 255
    labels[threes] = TARGET
    is_poison = torch.zeros(len(labels), dtype=torch.bool)
    is_poison[threes] = True
    data = InMemoryDataset(images, labels, [f"k{i}" for i in range(len(labels))], [str(c) for c in range(CLASSES)])
    features = torch.randn(len(labels), 12, generator=generator)
    result = run_audit(features, images.flatten(1).float() / 255, labels, CLASSES, methods=("transplant", "filter"),
                       rank=8, filter_rank=4, generator=torch.Generator().manual_seed(0),
                       probe=probe_of(model, data, seed=0))
    entry = result.classes[TARGET]
    assert entry["verdict"] == POISONED and entry["transplant"]["group"] == "the members that look like class 3"
    assert entry["transplant"]["receiving_class"] == 3
    assert torch.equal(result.removed, is_poison)

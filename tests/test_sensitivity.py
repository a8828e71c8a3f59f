"""The stated sensitivity (robustdata/audit/sensitivity.py): canaries planted, a model retrained, the audit scored.

The unit tests check the planting and the statistics; the MNIST test retrains a real
small CNN on canaries and checks that the audit's statement follows what it detects.
"""

from __future__ import annotations

import math

import pytest
import torch

from robustdata.audit import sensitivity
from robustdata.audit.scoring import AuditResult
from robustdata.audit.sensitivity import FRACTIONS, SIDE, Canary, lower_bound, plan, plant_canaries, summarise
from robustdata.data.memory import InMemoryDataset


def dataset(per_class: int = 100, classes: int = 10, size: int = 28) -> InMemoryDataset:
    images = torch.randint(0, 100, (per_class * classes, 1, size, size), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return InMemoryDataset(images, labels, [f"k{i}" for i in range(len(labels))], [str(c) for c in range(classes)])


def test_each_round_puts_its_canaries_in_distinct_classes_and_places_and_every_fraction_gets_trials():
    rounds = plan(10, 28, 28, rounds=3, generator=torch.Generator().manual_seed(0))
    for canaries in rounds:
        assert len(canaries) == sensitivity.MAX_CANARIES_PER_ROUND
        assert len({c.label for c in canaries}) == len(canaries)
        places = [(c.row, c.col) for c in canaries]
        assert len(set(places)) == len(places)
        for (r1, c1) in places:  # patches apart and inside the image
            assert 0 <= r1 <= 28 - SIDE and 0 <= c1 <= 28 - SIDE
            assert all(max(abs(r1 - r2), abs(c1 - c2)) >= SIDE for (r2, c2) in places if (r2, c2) != (r1, c1))
    fractions = [c.fraction for canaries in rounds for c in canaries]
    assert sorted(set(fractions)) == sorted(FRACTIONS)
    assert max(map(fractions.count, FRACTIONS)) - min(map(fractions.count, FRACTIONS)) <= 1  # in turn
    pairs = {(c.label, c.fraction) for canaries in rounds for c in canaries}
    assert len({label for label, _ in pairs}) == 10 and len(pairs) > 15  # classes meet several fractions
    assert len(plan(3, 28, 28, 1, torch.Generator().manual_seed(0))[0]) == 3  # fewer classes than places


def test_planting_relabels_stamped_images_of_other_classes_to_the_requested_fraction():
    data = dataset()
    canaries = [Canary(2, 0.05, 1, 1), Canary(7, 0.2, 24, 24)]
    planted, owner = plant_canaries(data, canaries, torch.Generator().manual_seed(0))
    for canary in canaries:
        mine = owner == canary.label
        assert (data.labels[mine] != canary.label).all() and (planted.labels[mine] == canary.label).all()
        share = float(mine.sum()) / float((planted.labels == canary.label).sum())
        assert share == pytest.approx(canary.fraction, abs=0.01)
        patch = planted.images[mine][:, 0, canary.row:canary.row + SIDE, canary.col:canary.col + SIDE]
        assert (patch[:, 0, 0] == 255).all() and (patch[:, 0, 1] == 0).all()  # a checkerboard
    untouched = owner == -1
    assert torch.equal(planted.images[untouched], data.images[untouched])
    assert torch.equal(planted.labels[untouched], data.labels[untouched])
    assert torch.equal(data.images, dataset().images)  # the audited set itself is never changed


def test_the_lower_bound_is_clopper_pearsons():
    for n in (1, 5, 59):
        assert lower_bound(n, n) == pytest.approx(0.05 ** (1 / n), abs=1e-9)
    assert lower_bound(59, 59) >= 0.95 > lower_bound(58, 58)
    assert lower_bound(0, 10) == 0.0
    # P(X >= 7 | n=10, p_L) = 0.05 at the bound
    p = lower_bound(7, 10)
    tail = sum(math.comb(10, k) * p ** k * (1 - p) ** (10 - k) for k in range(7, 11))
    assert tail == pytest.approx(0.05, abs=1e-6)


def trials(outcomes: dict[float, list[bool]]) -> list[dict]:
    return [{"label": 0, "fraction": fraction, "detected": hit, "attack_success": 1.0}
            for fraction, hits in outcomes.items() for hit in hits]


def test_the_stated_fraction_is_the_smallest_above_which_every_trial_was_detected():
    full = summarise(trials({0.005: [False, True], 0.01: [True, True], 0.02: [True], 0.05: [True, True],
                             0.1: [True]}), 2, 1.0)
    assert full["fraction"] == 0.01 and full["trials_at_or_above"] == 6
    assert full["lower_95"] == pytest.approx(0.05 ** (1 / 6))  # the trials at and above, together
    # a miss at a larger fraction caps the statement there, whatever the smaller fractions did
    gap = summarise(trials({0.005: [True], 0.01: [True], 0.02: [False], 0.05: [True], 0.1: [True]}), 1, 1.0)
    assert gap["fraction"] == 0.05
    assert summarise(trials({0.005: [True], 0.1: [False]}), 1, 1.0)["fraction"] is None
    assert summarise(trials({0.005: [True], 0.05: [True]}), 1, 1.0)["fraction"] is None  # 10% never tried


def test_a_canary_the_model_did_not_learn_is_reported_not_counted():
    planted = [{"label": 0, "fraction": 0.01, "detected": False, "attack_success": 0.05},
               {"label": 1, "fraction": 0.01, "detected": True, "attack_success": 0.6},
               *trials({0.02: [True], 0.05: [True], 0.1: [True]})]
    stated = summarise(planted, 1, 1.0)
    assert stated["fraction"] == 0.01 and stated["trials_at_or_above"] == 4
    assert stated["per_fraction"][1]["not_learned"] == 1 and len(stated["per_fraction"][1]["canaries"]) == 2
    planted[0]["attack_success"] = 0.2  # learned, and missed
    assert summarise(planted, 1, 1.0)["fraction"] == 0.02


def result_with(verdicts: list[str], removed: torch.Tensor) -> AuditResult:
    return AuditResult({}, {"filter": removed}, [{"verdict": v} for v in verdicts], "filter", None, None)


def test_a_canary_counts_as_detected_only_when_its_class_is_poisoned_and_half_of_it_removed():
    owner = torch.tensor([-1, 3, 3, 3, 3])
    canary = Canary(3, 0.05, 0, 0)
    verdicts = ["clean"] * 3 + ["poisoned"]
    assert sensitivity.detected(result_with(verdicts, torch.tensor([0, 1, 1, 0, 0], dtype=torch.bool)), owner, canary)
    assert not sensitivity.detected(result_with(verdicts, torch.tensor([0, 1, 0, 0, 0], dtype=torch.bool)), owner,
                                    canary)
    inconclusive = ["clean"] * 3 + ["inconclusive"]
    assert not sensitivity.detected(result_with(inconclusive, torch.ones(5, dtype=torch.bool)), owner, canary)

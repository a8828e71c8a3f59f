"""The audit finds poisons planted in seeded synthetic representations.

The synthetic "features" mimic a backdoored model's representation space:
4 classes x 1000 samples in 64 dims, each class an anisotropic Gaussian whose
three dominant natural directions have standard deviations 4, 3 and 2 (the
rest 1). The poisons of class 1 are a tight cluster (sd 0.3) shifted along a
planted unit direction u (orthogonal to the dominant directions, where clean
data has sd 1) by SHIFT = 10 clean standard deviations. At a few percent of
the class that cluster adds less variance than the natural directions carry,
so it hides from the top principal direction (spectral signatures miss it)
and only a robustly whitened view reveals it: the case SPECTRE is built for.
STRONG_SHIFT = 35 is the textbook case where p (1 - p) s^2 > 2 * 4^2 already
at p = 3%, so even one-shot spectral signatures see it.

The "inputs" (images in the real audit, used only to pick the poison side of
a split) follow real backdoors: a clean input lies near its own class's input
centroid, a poison near its *source* class's centroid plus a small trigger
offset.
"""

from __future__ import annotations

import functools
import importlib
import math
import sys
import textwrap
from dataclasses import dataclass
from fractions import Fraction
from typing import get_args

import numpy as np
import pytest
import torch

from robustdata.audit.clustering import activation_clustering, two_means
from robustdata.audit.filtering import Split, best_split, input_distances, poison_side, split_1d
import robustdata.audit.methods as audit_methods
from robustdata.audit.methods import get_method, method_names, register, registry
from robustdata.audit.methods.base import AuditOptions, ClassScores, ClassView, Method
from robustdata.audit.metrics import auprc, auroc, confusion, detection_metrics, recall_at_budget
from robustdata.audit.scoring import METHODS, AuditResult, judge_classes, run_audit, score_class
from robustdata.audit.verdicts import overall_verdict
from robustdata.audit.spectral import ClassPCA, class_pca, spectral_signature_scores, top_principal
from robustdata.audit.spectre import moments, que_scores, que_weights, robust_moments, spectre_scores, whiten
from robustdata.config import AuditMethod, AuditParams
from robustdata.errors import RobustDataError

NUM_CLASSES, PER_CLASS, DIM, INPUT_DIM = 4, 1000, 64, 32
POISON_CLASS = 1
NATURAL_SD = (4.0, 3.0, 2.0)
SHIFT, STRONG_SHIFT, POISON_SD = 10.0, 35.0, 0.3
TRIGGER_NORM = 2.0  # input-space trigger offset; class input centroids lie ~24 apart
LEVELS = (0.03, 0.10, 0.30, 0.50)  # poisoned fraction of the target class

ROBUST_MOMENTS_BUG = ("known limitation (robustdata/audit/spectre.py robust_moments): the first filtering round "
                      "follows the top principal direction, so a small poison cluster hidden under larger natural "
                      "variance in a low direction is not removed and SPECTRE / the whitened probe miss it. "
                      "On learned representations the poisons sit in the top directions; a kurtosis start fixed "
                      "this synthetic case but cut natural heavy tails of clean MNIST classes")


@pytest.fixture
def prefect_server():
    """Override conftest's session-wide Prefect server: the audit library never imports prefect."""


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small matrices: one thread is as fast, and immune to CPU contention (2 busy threads on 2 cores stall)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- planted data

@dataclass(frozen=True)
class Planted:
    features: torch.Tensor   # (N, DIM) float32
    inputs: torch.Tensor     # (N, INPUT_DIM) float32
    labels: torch.Tensor     # (N,) int64
    is_poison: torch.Tensor  # (N,) bool, all in POISON_CLASS
    direction: torch.Tensor  # (DIM,) the planted unit direction of the poison shift
    source: torch.Tensor     # (N,) the class whose image each sample is (== label for clean samples)

    @property
    def num_poisons(self) -> int:
        return int(self.is_poison.sum())


@functools.lru_cache(maxsize=None)
def planted(fraction: float, shift: float = SHIFT, seed: int = 0) -> Planted:
    """Seeded synthetic audit input; `fraction` of POISON_CLASS (which keeps PER_CLASS members) is poison."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    basis = torch.linalg.qr(torch.randn(DIM, DIM, generator=g, dtype=f64)).Q
    sd = torch.ones(DIM, dtype=f64)
    sd[:len(NATURAL_SD)] = torch.tensor(NATURAL_SD, dtype=f64)
    direction = basis[:, -1]  # orthogonal to the dominant natural directions basis[:, :3]
    means = 20 * torch.randn(NUM_CLASSES, DIM, generator=g, dtype=f64) / math.sqrt(DIM)
    centroids = 3 * torch.randn(NUM_CLASSES, INPUT_DIM, generator=g, dtype=f64)
    trigger = torch.randn(INPUT_DIM, generator=g, dtype=f64)
    trigger *= TRIGGER_NORM / trigger.norm()

    labels = torch.arange(NUM_CLASSES).repeat_interleave(PER_CLASS)
    features = means[labels] + (torch.randn(len(labels), DIM, generator=g, dtype=f64) * sd) @ basis.T
    inputs = centroids[labels] + 0.5 * torch.randn(len(labels), INPUT_DIM, generator=g, dtype=f64)
    source = labels.clone()

    count = round(fraction * PER_CLASS)
    members = torch.nonzero(labels == POISON_CLASS).flatten()
    index = members[torch.randperm(PER_CLASS, generator=g)[:count]]
    is_poison = torch.zeros(len(labels), dtype=torch.bool)
    is_poison[index] = True
    features[index] = (means[POISON_CLASS] + shift * direction
                       + POISON_SD * torch.randn(count, DIM, generator=g, dtype=f64))
    others = torch.tensor([c for c in range(NUM_CLASSES) if c != POISON_CLASS])
    source[index] = others[torch.randint(len(others), (count,), generator=g)]
    inputs[index] = centroids[source[index]] + trigger + 0.5 * torch.randn(count, INPUT_DIM, generator=g, dtype=f64)
    return Planted(features.float(), inputs.float(), labels, is_poison, direction, source)


@functools.lru_cache(maxsize=None)
def audited(fraction: float, shift: float = SHIFT, seed: int = 0, eps_mode: bool = True,
            eps_scope: str = "all") -> AuditResult:
    """eps mode defaults to the papers' scope here (1.5 eps removed from every class), which the budget tests check."""
    data = planted(fraction, shift, seed)
    return run_audit(data.features, data.inputs, data.labels, NUM_CLASSES, eps=fraction if eps_mode else None,
                     methods=METHODS, eps_scope=eps_scope, generator=torch.Generator().manual_seed(seed))


def budgets(eps: float) -> dict[int, int]:
    """Tran et al.'s budget, ceil(1.5 eps n_c) per class, in exact arithmetic (eps as written in decimal)."""
    return {c: math.ceil(Fraction(3, 2) * Fraction(str(eps)) * PER_CLASS) for c in range(NUM_CLASSES)}



def test_planted_data_is_what_the_docstring_says():
    data = planted(0.10)
    assert data.num_poisons == 100 and (data.labels[data.is_poison] == POISON_CLASS).all()
    assert torch.equal(torch.bincount(data.labels), torch.full((NUM_CLASSES,), PER_CLASS))
    assert (data.source[data.is_poison] != POISON_CLASS).all()
    clean = data.features[(data.labels == POISON_CLASS) & ~data.is_poison].double()
    poison = data.features[data.is_poison].double()
    u = data.direction
    along = (poison - clean.mean(0)) @ u
    assert (along.mean() / (clean @ u).std()).item() == pytest.approx(SHIFT, rel=0.1)
    assert (poison @ u).std().item() == pytest.approx(POISON_SD, rel=0.2)
    # the top natural variance (sd 4) exceeds what a 3% cluster at SHIFT adds: p(1-p) s^2 = 2.9
    top_natural = torch.linalg.eigvalsh(torch.cov(clean.T))[-1].item()
    assert top_natural == pytest.approx(NATURAL_SD[0] ** 2, rel=0.15)
    assert 0.03 * 0.97 * SHIFT ** 2 < top_natural < 0.5 * 0.03 * 0.97 * STRONG_SHIFT ** 2


# ------------------------------------------------------------ eps mode

# At SHIFT the 3% and 10% clusters are visible only to the robustly whitened probe (2-means prefers the
# natural sd-4 split, the top principal direction is natural); at 30% and 50% every probe sees them.
AT_LEVELS = [
    pytest.param(0.03, SHIFT, marks=pytest.mark.xfail(strict=True, reason=ROBUST_MOMENTS_BUG)),
    pytest.param(0.10, SHIFT, marks=pytest.mark.xfail(strict=True, reason=ROBUST_MOMENTS_BUG)),
    (0.30, SHIFT), (0.50, SHIFT), (0.03, STRONG_SHIFT), (0.10, STRONG_SHIFT),
]


@pytest.mark.parametrize("fraction, shift", AT_LEVELS)
def test_filter_removes_the_poisons_at_the_eps_budget(fraction, shift):
    data, result = planted(fraction, shift), audited(fraction, shift)
    caught = recall_at_budget(result.scores["filter"], data.is_poison, data.labels, budgets(fraction))
    assert caught >= 0.99
    assert confusion(result.removed, data.is_poison)["tpr"] >= 0.99


@pytest.mark.parametrize("fraction", [0.03, 0.10, 0.30, 0.50])
def test_eps_mode_removes_exactly_the_budget_in_every_class(fraction):
    data, result = planted(fraction), audited(fraction)
    assert result.removal_method == "filter" and result.eps == fraction
    for entry in result.classes:
        members = data.labels == entry["label"]
        for method in ("filter", "spectre", "spectral"):
            assert int(result.flagged[method][members].sum()) == entry["budget"], method
    assert set(result.scores) == set(result.flagged) == set(METHODS)


@pytest.mark.parametrize("fraction", [0.10, 0.50])
def test_eps_scope_poisoned_removes_only_from_the_poisoned_class(fraction):
    data = planted(fraction, STRONG_SHIFT)
    result = audited(fraction, STRONG_SHIFT, eps_scope="poisoned")
    for entry in result.classes:
        members = data.labels == entry["label"]
        expected = budgets(fraction)[entry["label"]] if entry["label"] == POISON_CLASS else 0
        assert entry["poisoned"] == (entry["label"] == POISON_CLASS)
        assert int(result.removed[members].sum()) == expected == entry["budget"]
    assert confusion(result.removed, data.is_poison)["tpr"] >= 0.99


def test_filter_fills_the_budget_beyond_its_suspects_uniformly_not_by_score():
    """At 30% poisons the budget (45% of the class) exceeds the poisons by 150 samples. The filter removes
    every poison and the clean side's outliers by score, then draws the rest uniformly: the drawn samples'
    scores are spread like the class's typical samples, not its top slab (which would cut one mode out)."""
    from robustdata.audit.methods.filter import SUSPICIOUS_Z

    data = planted(0.30, STRONG_SHIFT)
    result = audited(0.30, STRONG_SHIFT, eps_scope="poisoned")
    members = data.labels == POISON_CLASS
    removed, scores = result.removed[members], result.scores["filter"][members]
    poison = data.is_poison[members]
    entry = result.classes[POISON_CLASS]
    assert removed[poison].all() and int(removed.sum()) == entry["budget"]
    outliers = ~poison & (scores > SUSPICIOUS_Z)
    assert removed[outliers].all()
    drawn = removed & ~poison & ~outliers
    assert int(drawn.sum()) == entry["filled_at_random"] == entry["budget"] - data.num_poisons - int(outliers.sum())
    typical = scores[~poison & ~outliers]
    # by score the 150 would be the top 150 of ~700 typical samples (all above the 75th percentile)
    assert scores[drawn].median() < typical.quantile(0.75)
    assert scores[drawn].min() < typical.quantile(0.25)
    again = audited.__wrapped__(0.30, STRONG_SHIFT, eps_scope="poisoned")  # seeded: the same draw
    assert torch.equal(again.removed, result.removed)


@pytest.mark.parametrize("fraction", [
    0.03, 0.10, 0.30, 0.50])
def test_eps_mode_budget_is_the_exact_ceiling_of_one_and_a_half_eps_n(fraction):
    result = audited(fraction)
    assert [c["budget"] for c in result.classes] == [budgets(fraction)[c] for c in range(NUM_CLASSES)]


def test_spectral_signatures_find_a_strong_low_rate_cluster():
    data, result = planted(0.03, STRONG_SHIFT), audited(0.03, STRONG_SHIFT)
    # why it works: the planted direction is the class's top principal direction
    pca = class_pca(data.features, data.labels, POISON_CLASS, 4, torch.Generator().manual_seed(0))
    assert abs(float(pca.directions[:, 0] @ data.direction)) > 0.95
    assert recall_at_budget(result.scores["spectral"], data.is_poison, data.labels, budgets(0.03)) >= 0.99
    assert auroc(result.scores["spectral"], data.is_poison) > 0.99


def test_a_moderate_low_rate_cluster_hides_from_spectral_signatures():
    """The moderate data is hard enough that whitening matters: the one-shot top direction misses it."""
    data, result = planted(0.03), audited(0.03)
    pca = class_pca(data.features, data.labels, POISON_CLASS, 4, torch.Generator().manual_seed(0))
    assert abs(float(pca.directions[:, 0] @ data.direction)) < 0.5
    assert recall_at_budget(result.scores["spectral"], data.is_poison, data.labels, budgets(0.03)) < 0.5


@pytest.mark.parametrize("fraction, shift", [
    (0.03, STRONG_SHIFT),
    pytest.param(0.03, SHIFT, marks=pytest.mark.xfail(strict=True, reason=ROBUST_MOMENTS_BUG)),
    pytest.param(0.10, SHIFT, marks=pytest.mark.xfail(strict=True, reason=ROBUST_MOMENTS_BUG)),
])
def test_spectre_finds_a_low_rate_cluster(fraction, shift):
    data, result = planted(fraction, shift), audited(fraction, shift)
    assert recall_at_budget(result.scores["spectre"], data.is_poison, data.labels, budgets(fraction)) >= 0.99
    assert auroc(result.scores["spectre"], data.is_poison) > 0.99


def test_activation_clustering_flags_a_ten_percent_cluster():
    """2-means finds the cluster when splitting it off explains the most variance.

    At SHIFT a 10% cluster explains p(1-p)s^2 = 9 per point, less than halving the sd-4 natural direction
    (16 * 2/pi = 10.2): 2-means then rightly splits the natural direction. At STRONG_SHIFT it explains 110.
    """
    data, result = planted(0.10, STRONG_SHIFT), audited(0.10, STRONG_SHIFT)
    counts = confusion(result.flagged["clustering"], data.is_poison)
    assert counts["tpr"] >= 0.99 and counts["precision"] >= 0.99
    assert not result.flagged["clustering"][data.labels != POISON_CLASS].any()  # clean classes split ~50/50


def test_activation_clustering_does_not_flag_half_a_class():
    data, result = planted(0.50), audited(0.50)
    assert not result.flagged["clustering"].any()  # the smaller cluster is not under 35%


# ------------------------------------------------------------ auto mode

@pytest.mark.parametrize("fraction, shift", AT_LEVELS)
def test_auto_mode_finds_the_poisoned_class_and_its_poisons(fraction, shift):
    data, result = planted(fraction, shift), audited(fraction, shift, eps_mode=False)
    assert result.eps is None
    assert [c["label"] for c in result.classes if c["poisoned"]] == [POISON_CLASS]
    entry = result.classes[POISON_CLASS]
    assert entry["statistic"] > result.threshold > max(c["statistic"] for c in result.classes if not c["poisoned"])
    assert abs(entry["estimated_poisons"] - data.num_poisons) <= max(1, 0.03 * data.num_poisons)
    counts = confusion(result.removed, data.is_poison)
    assert counts["tpr"] >= 0.95 and counts["fpr"] <= 0.02
    assert not result.removed[data.labels != POISON_CLASS].any()
    # the other methods spend their budget in the poisoned class and nothing elsewhere
    assert all(c["budget"] == 0 for c in result.classes if not c["poisoned"])
    for method in ("spectre", "spectral"):
        assert int(result.flagged[method].sum()) == entry["budget"]
        assert not result.flagged[method][data.labels != POISON_CLASS].any()


@pytest.mark.parametrize("fraction", [
    0.03, 0.10, 0.30, 0.50])
def test_auto_mode_budget_is_one_and_a_half_times_the_estimate(fraction):
    entry = audited(fraction, STRONG_SHIFT, eps_mode=False).classes[POISON_CLASS]
    assert entry["poisoned"] and entry["estimated_poisons"] == round(fraction * PER_CLASS)
    assert entry["budget"] == min(PER_CLASS, (3 * entry["estimated_poisons"] + 1) // 2)  # ceil(1.5 e), integers


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auto_mode_leaves_clean_data_alone(seed):
    data, result = planted(0.0, seed=seed), audited(0.0, seed=seed, eps_mode=False)
    assert data.num_poisons == 0
    assert not any(c["poisoned"] for c in result.classes)
    assert all(c["estimated_poisons"] == 0 and c["budget"] == 0 for c in result.classes)
    assert all(c["statistic"] < result.threshold for c in result.classes)
    for method in ("filter", "spectre", "spectral"):
        assert not result.flagged[method].any(), method


# ------------------------------------------- which side of a split is the poison

def test_half_poisoned_class_picks_the_poison_side_by_input_space():
    data, result = planted(0.50), audited(0.50, eps_mode=False)
    members = data.labels == POISON_CLASS
    assert result.classes[POISON_CLASS]["poisoned"]
    assert torch.equal(result.removed[members], data.is_poison[members])  # 500 vs 500: size cannot decide


def test_swapping_the_input_space_relationship_flips_the_side():
    """Give the poisons clean target-class inputs and the clean members the poisons' inputs: the side flips."""
    data = planted(0.50)
    poisons = torch.nonzero(data.is_poison).flatten()
    clean = torch.nonzero((data.labels == POISON_CLASS) & ~data.is_poison).flatten()
    assert len(poisons) == len(clean)
    inputs = data.inputs.clone()
    inputs[poisons], inputs[clean] = data.inputs[clean], data.inputs[poisons]
    result = run_audit(data.features, inputs, data.labels, NUM_CLASSES, generator=torch.Generator().manual_seed(0))
    members = data.labels == POISON_CLASS
    assert result.classes[POISON_CLASS]["poisoned"]
    assert torch.equal(result.removed[members], ~data.is_poison[members])


def test_poison_side_is_the_side_nearer_the_other_classes():
    projection = torch.arange(6, dtype=torch.float64)
    high = projection >= 4
    split = Split("principal", 10.0, projection, high)
    near_high = torch.tensor([5.0, 5.0, 5.0, 5.0, 1.0, 1.0])
    assert torch.equal(poison_side(split, near_high), high)
    assert torch.equal(poison_side(split, 6.0 - near_high), ~high)


def test_input_distances_by_hand():
    inputs = torch.tensor([[0.0], [2.0], [10.0], [12.0], [30.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])  # centroids 1, 11, 30
    distances = input_distances(inputs, labels, 3)
    assert torch.allclose(distances.own, torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]))
    assert torch.allclose(distances.nearest_other, torch.tensor([11.0, 9.0, 9.0, 11.0, 19.0]))
    assert distances.nearest_other_class.tolist() == [1, 1, 0, 0, 1]


# ----------------------------------------------------------- filtering parts

def test_split_1d_by_hand():
    values = torch.tensor([10.0, 0.0, 10.1, 0.2, 0.1], dtype=torch.float64)
    high, separation = split_1d(values)
    assert high.tolist() == [True, False, True, False, False]
    low_part, high_part = np.array([0.0, 0.1, 0.2]), np.array([10.0, 10.1])
    expected = (high_part.mean() - low_part.mean()) / np.sqrt((low_part.var() + high_part.var()) / 2)
    assert separation == pytest.approx(expected, rel=1e-9)


def test_split_1d_of_a_gaussian_is_near_its_mean_with_separation_about_2_7():
    values = torch.randn(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    high, separation = split_1d(values)
    assert separation == pytest.approx(2.7, abs=0.1)  # the figure the filter's calibration is built on
    assert abs(high.double().mean().item() - 0.5) < 0.05


def test_best_split_separates_a_planted_cluster():
    data = planted(0.30)
    pca = class_pca(data.features, data.labels, POISON_CLASS, 16, torch.Generator().manual_seed(0))
    split = best_split(pca.coords, torch.Generator().manual_seed(0))
    poison = data.is_poison[pca.index]
    side = split.high if split.high[poison].float().mean() > 0.5 else ~split.high
    assert torch.equal(side, poison)
    assert split.separation > 3 * 2.7


def judged(separations, side_fractions, statuses=None, kappa=6.0, transplants=None):
    """judge_classes on entries of 100 samples with these separations and poison-side fractions (and the
    transplant test's reports, by class)."""
    entries = [{"label": i, "n": 100, "status": (statuses or {}).get(i, "ok"), "statistic": d,
                "side_size": round(100 * f), "transplant": (transplants or {}).get(i)}
               for i, (d, f) in enumerate(zip(separations, side_fractions))]
    for entry in entries:
        if entry["status"] != "ok":
            entry["statistic"] = None
    threshold = judge_classes(entries, kappa)
    return [e["verdict"] for e in entries], threshold, entries


def test_only_the_outlying_class_is_poisoned():
    verdicts, threshold, entries = judged([2.7, 2.8, 2.6, 2.75, 12.0], [0.05] * 5)
    assert verdicts == ["clean"] * 4 + ["poisoned"] and entries[4]["poisoned"]
    assert 2.8 < threshold < 12.0
    verdicts, _, _ = judged([2.7, 2.8, 2.6, 2.75, 2.9], [0.05] * 5)
    assert verdicts == ["clean"] * 5
    assert overall_verdict(verdicts) == "clean" and overall_verdict(["clean", "poisoned", "inconclusive"]) == "poisoned"


def test_a_split_whose_poison_side_is_most_of_the_class_is_inconclusive_not_clean():
    """A far split whose *bulk* the input-space rule calls the poison side: a natural tail, or poisons the
    rule misplaces (clean-label, source-specific); the audit cannot tell, and says so."""
    verdicts, _, entries = judged([2.7, 2.8, 2.6, 2.75, 12.0, 12.0], [0.1, 0.1, 0.1, 0.1, 0.97, 0.5])
    assert verdicts == ["clean"] * 4 + ["inconclusive", "poisoned"]
    assert not entries[4]["poisoned"] and entries[4]["estimated_poisons"] == 0
    assert "cannot tell which side" in entries[4]["reasons"][0]


def test_a_class_in_the_doubt_band_is_inconclusive():
    """Just under the threshold (a small trigger at a few percent) is not clean: z in (KAPPA_DOUBT, kappa]."""
    separations = [3.0, 3.1, 2.9, 3.05, 2.95, 3.0, 3.1, 3.0]
    centre, spread = 3.0, 0.3  # the floor: 10% of the median
    verdicts, _, entries = judged([*separations, centre + 5 * spread, centre + 3.5 * spread], [0.05] * 10)
    assert verdicts[-2:] == ["inconclusive", "clean"] and verdicts[:-2] == ["clean"] * 8
    assert entries[-2]["z"] == pytest.approx(5.0) and "doubt band" in entries[-2]["reasons"][0]


def test_when_most_classes_split_cleanly_the_calibration_is_void_and_they_are_inconclusive():
    """All-to-all poisons every class: the median is no clean reference, and no class may come back clean."""
    verdicts, _, entries = judged([7.0, 7.5, 6.8, 7.2, 8.0, 2.9], [0.1] * 6)
    assert verdicts[:5] == ["inconclusive"] * 5 and verdicts[5] == "clean"
    assert "calibration is void" in entries[0]["reasons"][0]


def transplant_report(decides: bool, flip_rate: float) -> dict:
    return {"group": "the most isolated 0.5%", "group_size": 10, "decides": decides, "flip_rate": flip_rate,
            "receiving_class": 5, "control_flip_rate": 0.1, "pattern_pixels": 9, "poisons": 10 * decides}


def test_the_transplant_test_decides_whatever_z_and_its_weak_evidence_leaves_a_class_inconclusive():
    """A decided transplant test makes a class poisoned at any z; a weak flip (a backdoor learned in part) makes a
    class the separation calls clean inconclusive, never poisoned; at z above kappa the separation rule stands."""
    separations = [2.7, 2.8, 2.6, 2.75, 2.9, 12.0]
    verdicts, _, entries = judged(separations, [0.05] * 6, transplants={
        0: transplant_report(True, 1.0), 1: transplant_report(False, 0.37), 5: transplant_report(False, 0.3)})
    assert verdicts == ["poisoned", "inconclusive", "clean", "clean", "clean", "poisoned"]
    assert "moves 37% of class 5" in entries[1]["reasons"][0] and "too weak to decide" in entries[1]["reasons"][0]
    assert "separation z" in entries[5]["reasons"][0]


@pytest.mark.parametrize("status, verdict", [("too_few_samples (n=50, need 96)", "inconclusive"),
                                             ("constant_features", "inconclusive"), ("empty", "clean")])
def test_a_class_the_audit_cannot_read_is_inconclusive_unless_empty(status, verdict):
    verdicts, _, _ = judged([2.7, 2.8, 2.6, 2.75, 2.9], [0.05] * 5, statuses={2: status})
    assert verdicts[2] == verdict and verdicts.count("clean") == 4 + (verdict == "clean")


# ------------------------------------------------------ PCA and spectral scores

def test_top_principal_recovers_a_planted_spectrum():
    g = torch.Generator().manual_seed(0)
    n, d = 400, 50
    left = torch.linalg.qr(torch.randn(n, 5, generator=g)).Q
    right = torch.linalg.qr(torch.randn(d, 5, generator=g)).Q
    singular = torch.tensor([50.0, 30.0, 20.0, 10.0, 5.0])
    x = left @ torch.diag(singular) @ right.T + 0.01 * torch.randn(n, d, generator=g)
    directions, values = top_principal(x, 3, torch.Generator().manual_seed(1))
    assert directions.shape == (d, 3)
    assert torch.allclose(values, singular[:3], rtol=1e-3)
    assert torch.allclose((directions.T @ right[:, :3]).abs(), torch.eye(3), atol=1e-3)


@pytest.mark.parametrize("rank", [8, DIM])
def test_class_pca_coordinates_and_spectral_scores(rank):
    data = planted(0.10)
    pca = class_pca(data.features, data.labels, POISON_CLASS, rank, torch.Generator().manual_seed(0))
    x = data.features[data.labels == POISON_CLASS].double()
    eye = torch.eye(rank, dtype=torch.float64)
    assert torch.equal(pca.index, torch.nonzero(data.labels == POISON_CLASS).flatten())
    assert torch.allclose(pca.mean, x.mean(0), atol=1e-5)
    assert torch.allclose(pca.coords, (x - x.mean(0)) @ pca.directions, atol=1e-3)
    assert torch.allclose(pca.directions.T @ pca.directions, eye, atol=1e-5)
    assert (pca.variances[:-1] >= pca.variances[1:]).all()
    assert ((pca.coords ** 3).sum(0) >= 0).all()  # heavy side positive
    exact = torch.linalg.eigvalsh(torch.cov(x.T)).flip(0)[:rank]
    if rank == DIM:  # nothing sketched away: exact up to float32
        assert torch.allclose(pca.variances, exact, rtol=1e-4)
        assert torch.allclose(pca.variances, pca.coords.var(0), rtol=1e-4)
    else:  # the 4 directions above the noise bulk (~1.4): 2 power iterations leave (1.4 / 3.76)^5 < 1% error
        assert torch.allclose(pca.variances[:4], exact[:4], rtol=1e-2)
        assert torch.allclose(pca.variances[:3], exact[:3], rtol=1e-4)  # (1.4 / 7.8)^5 ~ 2e-4
    assert (pca.variances <= pca.coords.var(0) * (1 + 1e-4)).all()  # a sketch only misses variance (float32)
    assert torch.allclose(spectral_signature_scores(pca, 2), pca.coords[:, 0] ** 2 + pca.coords[:, 1] ** 2)


# ------------------------------------------------------ SPECTRE: expm, whitening, QUE

def spiked(n: int = 600, d: int = 8, seed: int = 0) -> torch.Tensor:
    """Whitened-looking data with a spike: isotropic plus a 10% cluster along a random direction."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    u = torch.randn(d, generator=g, dtype=torch.float64)
    x[: n // 10] += 3.0 * u / u.norm()
    return x


def test_torch_matrix_exp_matches_scipy_expm():
    import scipy.linalg as scipy_linalg
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 8, generator=g, dtype=torch.float64)
    symmetric = (a + a.T) / 2
    expected = scipy_linalg.expm(symmetric.numpy())
    assert np.allclose(torch.linalg.matrix_exp(symmetric).numpy(), expected, rtol=1e-10, atol=1e-12)


def whitened_planted_class() -> torch.Tensor:
    """The poisoned class's top-16 principal coordinates, whitened with robust moments as SPECTRE does."""
    data = planted(0.10, STRONG_SHIFT)
    coords = class_pca(data.features, data.labels, POISON_CLASS, 16, torch.Generator().manual_seed(0)).coords
    mean, cov, _ = robust_moments(coords, max_removed=200)
    return whiten(coords, mean, cov)


@pytest.mark.parametrize("make_whitened", [spiked, whitened_planted_class], ids=["spiked", "planted"])
def test_que_weights_use_the_matrix_exponential(make_whitened):
    import scipy.linalg as scipy_linalg
    w = make_whitened()
    m, cov = que_weights(w, alpha=4.0)
    s = w.numpy().T @ w.numpy() / len(w)
    assert np.allclose(cov.numpy(), s)
    exponent = 4.0 * (s - np.eye(len(s))) / (np.linalg.norm(s, 2) - 1)
    expected = scipy_linalg.expm(exponent)
    assert np.trace(m.numpy()) == pytest.approx(1.0)
    assert np.allclose(m.numpy() * np.trace(expected), expected, rtol=1e-9)
    # the elementwise exp of public ports is a different matrix altogether
    elementwise = np.exp(exponent) / np.trace(np.exp(exponent))
    assert np.linalg.norm(elementwise - m.numpy()) > 0.5 * np.linalg.norm(m.numpy())


def test_que_weights_emphasise_the_spike_direction():
    w = spiked()
    m, cov = que_weights(w)
    top_cov = torch.linalg.eigh(cov).eigenvectors[:, -1]
    top_m = torch.linalg.eigh(m).eigenvectors[:, -1]
    assert abs(float(top_cov @ top_m)) > 0.999  # expm keeps the eigenvectors of S'
    scores, statistic = que_scores(w)
    assert statistic == pytest.approx(float(torch.trace(cov @ m)))
    assert statistic > 1.5  # the spike lifts tr(S'M)/tr(M) above isotropic data's 1
    assert auroc(scores, torch.arange(len(w)) < len(w) // 10) > 0.95


def test_whiten_gives_identity_covariance_under_the_given_moments():
    g = torch.Generator().manual_seed(0)
    d = 6
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = a @ a.T + 0.5 * torch.eye(d, dtype=torch.float64)
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    # the whitening map is affine: its linear part W has rows whiten(mean + e_i) - whiten(mean)
    linear = (whiten(mean + torch.eye(d, dtype=torch.float64), mean, cov)).T
    assert torch.allclose(whiten(mean[None], mean, cov), torch.zeros(1, d, dtype=torch.float64))
    assert torch.allclose(linear @ cov @ linear.T, torch.eye(d, dtype=torch.float64), atol=1e-7)
    # and on samples, with their own moments
    x = torch.randn(2000, d, generator=g, dtype=torch.float64) @ a.T + mean
    sample_mean, sample_cov = moments(x)
    w = whiten(x, sample_mean, sample_cov)
    assert torch.allclose(w.mean(0), torch.zeros(d, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(torch.cov(w.T), torch.eye(d, dtype=torch.float64), atol=1e-7)


def test_que_scores_are_rotation_invariant():
    w = spiked()
    rotation = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(3),
                                           dtype=torch.float64)).Q
    scores, statistic = que_scores(w)
    rotated_scores, rotated_statistic = que_scores(w @ rotation.T)
    assert torch.allclose(scores, rotated_scores, rtol=1e-9, atol=1e-12)
    assert rotated_statistic == pytest.approx(statistic, rel=1e-9)


@pytest.mark.parametrize("natural_sd", [
    1.0,
    pytest.param(4.0, marks=pytest.mark.xfail(strict=True, reason=ROBUST_MOMENTS_BUG)),
], ids=["isotropic", "anisotropic"])
def test_robust_moments_filter_out_a_small_cluster(natural_sd):
    """30 tight points 10 sd out of 1000; with a 60-point removal budget all 30 must go."""
    g = torch.Generator().manual_seed(0)
    n, d, k = 1000, 16, 30
    sd = torch.ones(d, dtype=torch.float64)
    sd[:3] = torch.tensor([natural_sd, 0.75 * natural_sd, 0.5 * natural_sd]).clamp_min(1.0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * sd
    u = torch.zeros(d, dtype=torch.float64)
    u[-1] = 1.0  # a direction of clean sd 1
    x[:k] = POISON_SD * torch.randn(k, d, generator=g, dtype=torch.float64) + SHIFT * u
    mean, cov, kept = robust_moments(x, max_removed=2 * k)
    assert int(kept.sum()) == n - 2 * k
    assert not kept[:k].any()
    # along u the naive moments are pulled to mean 0.3 and variance 3.9; the robust ones are the clean
    # Gaussian's, trimmed of its 30 most extreme points (variance about 0.8)
    assert abs(float(mean[-1])) < 0.1
    assert 0.6 < float(cov[-1, -1]) < 1.1


def test_spectre_rank_is_a_candidate_and_scores_cover_the_class():
    data = planted(0.03, STRONG_SHIFT)
    pca = class_pca(data.features, data.labels, POISON_CLASS, 64, torch.Generator().manual_seed(0))
    scores, info = spectre_scores(pca.coords, 0.03)
    assert info["rank"] in {k * k for k in range(1, 9)}
    assert scores.shape == (PER_CLASS,) and torch.isfinite(scores).all()


# ------------------------------------------------------------- clustering parts

def test_two_means_separates_two_blobs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g)
    x[:100] += 8.0
    assignment, centres = two_means(x, torch.Generator().manual_seed(1))
    truth = (torch.arange(300) < 100).long()
    assert torch.equal(assignment, truth) or torch.equal(assignment, 1 - truth)
    assert torch.allclose(centres[assignment[0]], x[:100].mean(0), atol=1e-5)


@pytest.mark.parametrize("small, flagged", [(60, True), (120, False)])  # 20% vs 40% of 300
def test_activation_clustering_flags_only_a_small_cluster(small, flagged):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=g)
    x[:small, 0] += 10.0
    scores, flags, info = activation_clustering(x, torch.Generator().manual_seed(0))
    assert info["small_cluster_fraction"] == pytest.approx(small / 300)
    truth = torch.arange(300) < small
    assert torch.equal(flags, truth if flagged else torch.zeros_like(truth))
    assert auroc(scores, truth) == 1.0  # the score always points at the smaller cluster


# ------------------------------------------------------------------ metrics

def test_auroc_and_auprc_by_hand():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8])
    positive = torch.tensor([False, False, True, True])
    assert auroc(scores, positive) == pytest.approx(0.75)
    assert auprc(scores, positive) == pytest.approx((1 / 1 + 2 / 3) / 2)
    # ties: the positive ties one negative (counts half) and beats the other
    tied = torch.tensor([1.0, 1.0, 0.0])
    truth = torch.tensor([True, False, False])
    assert auroc(tied, truth) == pytest.approx(0.75)
    assert auprc(tied, truth) == pytest.approx(0.5)  # the threshold takes both tied samples
    assert auroc(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([True, False, False])) == 1.0
    assert auroc(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([True, False, False])) == 0.0


def test_auroc_auprc_need_both_kinds_of_ground_truth():
    scores = torch.tensor([0.3, 0.2, 0.9])
    assert auroc(scores, torch.zeros(3, dtype=torch.bool)) is None
    assert auroc(scores, torch.ones(3, dtype=torch.bool)) is None
    assert auprc(scores, torch.zeros(3, dtype=torch.bool)) is None
    assert auprc(scores, torch.ones(3, dtype=torch.bool)) == pytest.approx(1.0)  # as sklearn: precision is 1


@pytest.mark.parametrize("seed", range(5))
def test_auroc_auprc_match_sklearn_with_ties(seed):
    import sklearn.metrics as sk_metrics
    rng = np.random.default_rng(seed)
    n = 300
    truth = rng.random(n) < 0.2
    scores = rng.integers(0, 12, n) + 3 * truth  # integer scores: many ties, positives a bit higher
    t_scores, t_truth = torch.tensor(scores, dtype=torch.float32), torch.tensor(truth)
    assert auroc(t_scores, t_truth) == pytest.approx(sk_metrics.roc_auc_score(truth, scores), abs=1e-12)
    assert auprc(t_scores, t_truth) == pytest.approx(sk_metrics.average_precision_score(truth, scores), abs=1e-12)
    continuous = rng.standard_normal(n)
    assert auroc(torch.tensor(continuous), t_truth) == pytest.approx(sk_metrics.roc_auc_score(truth, continuous))
    assert auprc(torch.tensor(continuous), t_truth) == pytest.approx(
        sk_metrics.average_precision_score(truth, continuous))


def test_confusion_counts_add_up():
    rng = np.random.default_rng(0)
    flagged, positive = torch.tensor(rng.random(200) < 0.3), torch.tensor(rng.random(200) < 0.1)
    counts = confusion(flagged, positive)
    assert counts["tp"] + counts["fp"] + counts["fn"] + counts["tn"] == 200
    assert counts["tp"] + counts["fn"] == int(positive.sum())
    assert counts["tp"] + counts["fp"] == int(flagged.sum())
    assert counts["tpr"] == counts["tp"] / int(positive.sum())
    assert counts["fpr"] == counts["fp"] / int((~positive).sum())
    assert counts["precision"] == counts["tp"] / int(flagged.sum())
    nothing = confusion(torch.zeros(5, dtype=torch.bool), torch.zeros(5, dtype=torch.bool))
    assert nothing == {"tp": 0, "fp": 0, "fn": 0, "tn": 5, "tpr": None, "fpr": 0.0, "precision": None}


def test_recall_at_budget_by_hand():
    scores = torch.tensor([0.9, 0.1, 0.8, 0.7, 0.2, 0.6])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    positive = torch.tensor([True, True, False, False, True, False])
    # class 0 removes its top 2 (0.9 pos, 0.8 neg); class 1 its top 1 (0.7 neg): 1 of 3 positives
    assert recall_at_budget(scores, positive, labels, {0: 2, 1: 1}) == pytest.approx(1 / 3)
    # class 0 all 3 (2 pos), class 1 top 2 (0.7, 0.6: no pos): 2 of 3
    assert recall_at_budget(scores, positive, labels, {0: 3, 1: 2}) == pytest.approx(2 / 3)
    assert recall_at_budget(scores, positive, labels, {0: 3, 1: 3}) == 1.0
    assert recall_at_budget(scores, torch.zeros(6, dtype=torch.bool), labels, {0: 3}) is None


def test_detection_metrics_per_class_add_up_to_overall():
    data, result = planted(0.30), audited(0.30)
    report = detection_metrics(result.scores["filter"], result.removed, data.is_poison, data.labels, NUM_CLASSES,
                               budgets(0.30))
    overall, per_class = report["overall"], report["per_class"]
    for key in ("tp", "fp", "fn", "tn"):
        assert sum(c[key] for c in per_class) == overall[key]
    assert [c["label"] for c in per_class] == list(range(NUM_CLASSES))
    assert all(c["auroc"] is None for c in per_class if c["label"] != POISON_CLASS)  # no poisons there
    assert per_class[POISON_CLASS]["auroc"] > 0.99
    assert overall["recall_at_budget"] == recall_at_budget(result.scores["filter"], data.is_poison, data.labels,
                                                           budgets(0.30))


# --------------------------------------------------------------- validation

def audit_small(**overrides):
    data = planted(0.10)
    args = {"features": data.features, "inputs": data.inputs, "labels": data.labels, "num_classes": NUM_CLASSES}
    kwargs = {"eps": 0.1}
    for key, value in overrides.items():
        (args if key in args else kwargs)[key] = value
    return run_audit(args["features"], args["inputs"], args["labels"], args["num_classes"],
                     generator=torch.Generator().manual_seed(0), **kwargs)


def with_value(tensor: torch.Tensor, value: float) -> torch.Tensor:
    out = tensor.clone()
    out[7, 3] = value
    return out


@pytest.mark.parametrize("overrides, message", [
    ({"features": with_value(planted(0.10).features, float("nan"))}, "NaN or inf"),
    ({"features": with_value(planted(0.10).features, float("inf"))}, "NaN or inf"),
    ({"methods": ("filter", "magic")}, r"unknown audit method\(s\) \['magic'\]; valid: \['dirty_label', 'transplant', 'filter'"),
    ({"removal_method": "oracle"}, r"unknown audit method\(s\) \['oracle'\]"),
    ({"methods": ("spectral",)}, "removal method 'filter' must be one of the methods run"),
    ({"labels": planted(0.10).labels[:-1]}, "must have one row per sample"),
    ({"inputs": planted(0.10).inputs[:-5]}, "must have one row per sample"),
    ({"features": planted(0.10).features[:, None, :]}, "must have one row per sample"),
    ({"eps": 0.0}, r"eps 0.0 must be in \(0, 1\)"),
    ({"eps": 1.0}, r"eps 1.0 must be in \(0, 1\)"),
    ({"eps": -0.2}, r"eps -0.2 must be in \(0, 1\)"),
    ({"num_classes": 3}, "labels go up to 3 but there are 3 classes"),
])
def test_bad_audit_input_raises_a_named_error(overrides, message):
    with pytest.raises(RobustDataError, match=message):
        audit_small(**overrides)


def test_a_subset_of_methods_runs_and_leaves_the_rest_out():
    data = planted(0.10)
    result = run_audit(data.features, data.inputs, data.labels, NUM_CLASSES, eps=0.1, methods=("spectral",),
                       removal_method="spectral", generator=torch.Generator().manual_seed(0))
    assert set(result.scores) == {"spectral"} and result.removal_method == "spectral"
    assert torch.equal(result.removed, result.flagged["spectral"])


# -------------------------------------------------------------- the method registry

PAPER_METHODS = ("dirty_label", "transplant", "filter", "spectre", "spectral", "clustering")


@pytest.mark.parametrize("name", PAPER_METHODS)
def test_the_registry_finds_each_method_by_name(name):
    method = get_method(name)
    assert isinstance(method, Method) and method.name == name
    assert registry()[name] is method and type(method).__module__ == f"robustdata.audit.methods.{name}"


@pytest.mark.parametrize("name", ["magic", "Filter", "", "base"])
def test_an_unknown_method_name_is_refused_with_the_valid_ones(name):
    valid = r"\['clustering', 'dirty_label', 'filter', 'spectral', 'spectre', 'transplant'\]"
    with pytest.raises(RobustDataError, match=rf"unknown audit method '{name}'; valid: {valid}"):
        get_method(name)


def test_the_config_the_registry_and_the_method_modules_agree():
    assert get_args(AuditMethod) == method_names() == tuple(sorted(registry()))
    # the audit runs them in `order` (the draws from the shared generator follow it); the default is every one
    assert METHODS == tuple(registry()) == PAPER_METHODS
    assert len({method.order for method in registry().values()}) == len(METHODS)
    with pytest.raises(ValueError, match="'magic'"):
        AuditParams(methods=["filter", "magic"])


def test_a_method_is_named_after_its_module():
    class Misnamed(Method):
        name = "not_this_module"

    with pytest.raises(RobustDataError, match="named 'not_this_module' but lives in module 'test_audit'"):
        register(Misnamed)
    assert "not_this_module" not in registry()


TOY_METHOD = '''
    """A toy audit method: squared distance from the class mean in its top 4 principal coordinates."""
    from robustdata.audit.methods import register
    from robustdata.audit.methods.base import ClassFlags, ClassScores, Method, top_k_mask


    @register
    class Toy(Method):
        name = "toy"
        order = 90

        def coordinates(self, options):
            return 4

        def score(self, view, options, generator):
            return ClassScores((view.pca.coords[:, :4] ** 2).sum(1))

        def flag(self, verdict, scores, options, generator):
            return ClassFlags(top_k_mask(scores, verdict.budget))
'''


def test_adding_a_method_is_adding_one_module(tmp_path, monkeypatch):
    """A module dropped into the methods package (here a second folder on its path) is a method the audit runs
    by name, beside the others, which it leaves bit for bit as they were."""
    (tmp_path / "toy.py").write_text(textwrap.dedent(TOY_METHOD))
    monkeypatch.setattr(audit_methods, "__path__", [*audit_methods.__path__, str(tmp_path)])
    monkeypatch.setattr(audit_methods.REGISTRY, "entries", dict(audit_methods.REGISTRY.entries))
    importlib.invalidate_caches()
    try:
        assert "toy" in method_names() and list(registry())[-1] == "toy"
        with_toy = audit_small(methods=(*METHODS, "toy"), removal_method="toy")
    finally:  # the registry as it was, for the tests that follow
        monkeypatch.undo()
        sys.modules.pop("robustdata.audit.methods.toy", None)
        audit_methods.__dict__.pop("toy", None)
    without = audit_small(methods=METHODS)
    assert list(with_toy.scores) == [*METHODS, "toy"] and with_toy.removal_method == "toy"
    for entry in with_toy.classes:
        members = planted(0.10).labels == entry["label"]
        assert int(with_toy.flagged["toy"][members].sum()) == entry["budget"] == entry["flagged"]
    for method in METHODS:
        assert torch.equal(with_toy.scores[method], without.scores[method]), method
        assert torch.equal(with_toy.flagged[method], without.flagged[method]), method
    assert "toy" not in registry() and "toy" not in method_names()


# -------------------------------------------------------------- determinism

@pytest.mark.parametrize("eps_mode", [True, False], ids=["eps", "auto"])
def test_same_seed_gives_identical_scores_and_flags(eps_mode):
    data = planted(0.10)
    runs = [run_audit(data.features, data.inputs, data.labels, NUM_CLASSES, eps=0.1 if eps_mode else None,
                      generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    for method in METHODS:
        assert torch.equal(runs[0].scores[method], runs[1].scores[method]), method
        assert torch.equal(runs[0].flagged[method], runs[1].flagged[method]), method
    assert runs[0].classes == runs[1].classes
    assert runs[0].threshold == runs[1].threshold


# ------------------------------------------------------------------- device

def test_everything_stays_on_the_features_device():
    result = audited(0.10)
    for method in METHODS:
        assert result.scores[method].device.type == "cpu" and result.scores[method].dtype == torch.float64
        assert result.flagged[method].dtype == torch.bool


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_audit_runs_on_cuda_and_agrees_with_cpu():
    """The generator must live on the features' device (the sketches and k-means++ draw on it)."""
    data = planted(0.10, STRONG_SHIFT)
    cuda = torch.device("cuda")
    result = run_audit(data.features.to(cuda), data.inputs.to(cuda), data.labels.to(cuda), NUM_CLASSES,
                       generator=torch.Generator(device=cuda).manual_seed(0))
    cpu = audited(0.10, STRONG_SHIFT, eps_mode=False)
    for method in METHODS:
        assert result.scores[method].device.type == "cuda"
        assert result.flagged[method].device.type == "cuda"
    assert [c["poisoned"] for c in result.classes] == [c["poisoned"] for c in cpu.classes]
    assert torch.equal(result.removed.cpu(), cpu.removed)
    assert confusion(result.removed.cpu(), data.is_poison)["tpr"] >= 0.99


def test_decisions_of_the_poisons_replace_the_input_space_guess_and_add_up():
    """The first method that decides which samples are the poisons replaces the split's input-space guess; a
    later one adds its own (a sample of the poisons must not shrink a complete group another test found)."""
    n = 8
    guess, first, second = (torch.tensor(bits, dtype=torch.bool) for bits in
                            ([1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0]))

    class Decides(Method):
        def __init__(self, side):
            self.side = side

        def score(self, view, options, generator):
            return ClassScores(torch.zeros(n, dtype=torch.float64), self.side.clone(), side=self.side)

    pca = ClassPCA(torch.arange(n), torch.randn(n, 2, dtype=torch.float64), torch.ones(2), torch.zeros(2),
                   torch.eye(2), 2.0)
    split = Split("principal", 3.0, pca.coords[:, 0], guess.clone())
    view = ClassView(0, pca, split, guess.clone())
    methods = {"first": Decides(first), "second": Decides(second)}
    scores = {name: torch.zeros(n, dtype=torch.float64) for name in methods}
    flagged = {name: torch.zeros(n, dtype=torch.bool) for name in methods}
    assert score_class(view, methods, scores, flagged, {}, AuditOptions(), torch.Generator())
    assert torch.equal(view.side, first | second) and view.decided

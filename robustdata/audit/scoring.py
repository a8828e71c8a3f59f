"""Score every sample with every audit method and decide what to remove.

Two modes:

* eps given (Tran et al.'s epsilon: an upper bound on the poisoned fraction of
  a class): every method removes ceil(1.5 * eps * n_c) samples of each class c
  the filter judges poisoned (eps_scope "poisoned", the default), or of every
  class as the papers do (eps_scope "all"). With eps = 0.5 (all-to-one at 10%
  of MNIST) "all" removes 75% of every class and costs 8-17 points of clean
  accuracy after retraining; "poisoned" leaves clean classes whole.
  spectre and spectral remove their highest scores, as the papers do. The
  filter removes, in this order: its poison side (by score), then the clean
  side's outliers toward the poisons (score above SUSPICIOUS_Z robust sd,
  methods/filter.py), then fills what is left of the budget with a seeded
  uniform draw from the rest of the class. Why not simply by score: once the poisons are out, the 1-D score
  orders *typical* clean samples by one direction, and removing its top cuts a
  whole writing style out of the class. At 10% all-to-one on MNIST the budget
  takes 2,500 of the 4,932 clean zeros; by score, the retrained model's class-0
  accuracy fell to 94.0% (98.7% overall), by this rule it stays at 99.2%
  (99.3% overall, the clean-data model's level). Detection metrics are
  unchanged: they read the scores, which keep every poison above every clean
  sample either way;
* eps None ("auto", the production case): the filter decides which classes are
  poisoned and how many poisons each holds (filtering.py) and removes them;
  the other methods remove 1.5x that estimate from the classes judged poisoned.

Activation clustering always flags by its own rule (smaller cluster < 35%).

Degenerate classes are reported, never scored with NaN: every per-class entry
has a `status`: STATUS_OK; STATUS_EMPTY; "too_few_samples (n=N, need M)" with
M = min_samples(filter_rank) (96 at filter_rank 16: see SAMPLES_PER_DIM);
STATUS_CONSTANT (the class's features do not vary: constant images, a dead
layer); or "numerical_failure (...)" (a method gave non-finite scores). A class that is not "ok" gets
score 0 and no flags from every method, statistic None, budget 0, and takes no
part in calibrating the poisoned-class threshold. Non-finite features are an
input error (NonFiniteFeaturesError) that names how many samples, of which
classes, and the first indices.

Each method (filter, spectre, spectral, clustering, ...) is one object in the
registry of robustdata/audit/methods/, with one small interface (methods/base.py);
audit_classes runs the ones asked for on each class. The per-class decisions
read each class's principal coordinates only, so the in-memory audit (run_audit,
features (N, D) in memory) and the streaming one (streaming.py, O(N q + classes D^2)
memory) share them.
Pure compute: tensors in, tensors out, on the device of `features`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from robustdata.audit.clustering import DIMS as CLUSTER_DIMS
from robustdata.audit.filtering import (KAPPA, InputDistances, best_split, input_distances, poison_side,
                                       separation_scale)
from robustdata.audit.methods import registry
from robustdata.audit.methods.base import AuditOptions, ClassVerdict, ClassView, Method, Probe
from robustdata.audit.spectral import ClassPCA, class_pca
from robustdata.audit.verdicts import POISONED, class_verdict
from robustdata.errors import RobustDataError

METHODS = tuple(registry())  # every audit method (robustdata/audit/methods/), in the order they run
EPS_SCOPES = ("poisoned", "all")
BUDGET_FACTOR = 1.5
MIN_SAMPLES = 4     # fewer cannot be split in two and whitened: nothing can be said about the class
# The filter whitens up to filter_rank principal coordinates; with few samples per dimension a clean class
# splits "perfectly". Best-split separation of clean Gaussian classes (64 dims, filter_rank 16, 12 seeds):
# median 18 at n = 4, ~1e10 at n = 12-16 (rank-deficient), 9 at n = 32, 4.8 at n = 48, 3.7 (max 10) at n = 64,
# 3.3 (max 3.9) at n = 96, 2.8 at n = 1000. Such a class would be judged poisoned or skew the threshold
# calibrated across classes, so a class needs SAMPLES_PER_DIM * filter_rank samples (lower filter_rank to
# audit smaller classes).
SAMPLES_PER_DIM = 6
# A class whose spread (RMS distance from its mean) is below this fraction of its RMS magnitude is constant:
# float32 features resolve ~1e-7 relative, and the same image run in different batches differs by a few ulps,
# which a split would call two perfectly separated clusters (a "poisoned" class of constant images).
CONSTANT_RTOL = 1e-5
STATUS_OK, STATUS_EMPTY, STATUS_CONSTANT = "ok", "empty", "constant_features"
FIRST_BAD = 10      # how many non-finite sample indices an error names


@dataclass
class AuditResult:
    scores: dict[str, torch.Tensor]   # method -> (N,) float, higher = more suspicious
    flagged: dict[str, torch.Tensor]  # method -> (N,) bool
    classes: list[dict[str, Any]]     # per-class decisions and statistics
    removal_method: str
    eps: float | None
    threshold: float | None           # separation above which a class is judged poisoned (None: no class scored)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def removed(self) -> torch.Tensor:
        return self.flagged[self.removal_method]


class NonFiniteFeaturesError(RobustDataError):
    """Some representations are NaN or inf. `indices` are the first few offending sample positions,
    `by_class` maps label -> how many of its samples are affected."""

    def __init__(self, count: int, total: int, by_class: dict[int, int], indices: list[int]):
        self.count, self.total, self.by_class, self.indices = count, total, by_class, indices
        classes = ", ".join(f"{label}: {n}" for label, n in by_class.items())
        if count == total:
            message = (f"features are NaN or inf for all {total} samples: the model outputs NaN or inf "
                       "(check its weights, e.g. a diverged training run)")
        else:
            first = ", ".join(map(str, indices)) + (", ..." if count > len(indices) else "")
            message = (f"features contain NaN or inf in {count} of {total} samples (samples per class: {classes}; "
                       f"first sample indices: {first}): the model or those inputs are broken")
        super().__init__(message)

    @classmethod
    def from_rows(cls, bad_rows: torch.Tensor, bad_labels: torch.Tensor, total: int) -> "NonFiniteFeaturesError":
        """bad_rows: (k,) sorted indices of non-finite samples; bad_labels: (k,) their labels."""
        labels, counts = torch.unique(bad_labels.cpu(), return_counts=True)
        return cls(len(bad_rows), total, dict(zip(labels.tolist(), counts.tolist())),
                   bad_rows[:FIRST_BAD].tolist())


def non_finite_rows(features: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """(k,) indices of the rows with a NaN or inf, chunked so the mask never costs a copy of the features."""
    bad = [torch.nonzero(~torch.isfinite(features[start:start + chunk]).all(1)).flatten() + start
           for start in range(0, len(features), chunk)]
    return torch.cat(bad) if bad else torch.zeros(0, dtype=torch.long, device=features.device)


def check_options(methods: tuple[str, ...], removal_method: str, eps: float | None, eps_scope: str) -> None:
    valid = registry()
    unknown = [m for m in (*methods, removal_method) if m not in valid]
    if unknown:
        raise RobustDataError(f"unknown audit method(s) {unknown}; valid: {list(valid)}")
    if removal_method not in methods:
        raise RobustDataError(f"the removal method {removal_method!r} must be one of the methods run {list(methods)}")
    if eps_scope not in EPS_SCOPES:
        raise RobustDataError(f"unknown eps scope {eps_scope!r}; valid: {list(EPS_SCOPES)}")
    if eps is not None and not 0 < eps < 1:
        raise RobustDataError(f"eps {eps} must be in (0, 1) (the poisoned fraction of a class), or omitted")


def check_inputs(features: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 methods: tuple[str, ...], removal_method: str, eps: float | None, eps_scope: str) -> None:
    check_options(methods, removal_method, eps, eps_scope)
    if features.dim() != 2 or len(features) != len(labels) or len(inputs) != len(labels):
        raise RobustDataError(f"features {tuple(features.shape)}, inputs {tuple(inputs.shape)} and labels "
                              f"{tuple(labels.shape)} must have one row per sample")
    counts = torch.bincount(labels, minlength=num_classes)
    if len(counts) > num_classes:
        raise RobustDataError(f"labels go up to {len(counts) - 1} but there are {num_classes} classes")
    if not torch.isfinite(features.sum()):  # one reduction; the row mask only when something is wrong
        bad = non_finite_rows(features)
        if len(bad):
            raise NonFiniteFeaturesError.from_rows(bad, labels[bad], len(labels))
        raise RobustDataError(f"features are finite but so large that their sum overflows (largest |value| "
                              f"{float(features.abs().max()):.3g}): read a layer with bounded activations")


def min_samples(filter_rank: int) -> int:
    """The fewest samples a class needs to be audited (see SAMPLES_PER_DIM)."""
    return max(MIN_SAMPLES, SAMPLES_PER_DIM * filter_rank)


def size_status(count: int, need: int) -> str | None:
    """The status of a class with fewer than `need` samples, or None when it has enough."""
    if count == 0:
        return STATUS_EMPTY
    if count < need:
        return f"too_few_samples (n={count}, need {need})"
    return None


def is_constant(total_variance: float, mean: torch.Tensor) -> bool:
    """Whether a class's spread is float noise on its magnitude (see CONSTANT_RTOL); all-zero counts too."""
    magnitude = float((mean.double() ** 2).sum()) + total_variance
    return total_variance <= CONSTANT_RTOL ** 2 * magnitude


def selected_methods(methods: tuple[str, ...]) -> dict[str, Method]:
    """The registered methods named in `methods`, in the registry's order: the order they run on each class,
    whatever the order asked for, so the draws from the shared generator do not depend on it."""
    return {name: method for name, method in registry().items() if name in methods}


def pca_rank(methods: tuple[str, ...], options: AuditOptions) -> int:
    """Principal directions each class needs: the filter's split reads filter_rank and CLUSTER_DIMS (its 2-means
    direction) in every audit, each method run its own (only SPECTRE reads beyond those few). spectral_k counts
    even when spectral signatures do not run, as it always has: q sets the width of the randomized PCA's sketch,
    and so every draw from the generator after it."""
    return max(options.filter_rank, CLUSTER_DIMS, options.spectral_k,
               *(method.coordinates(options) for method in selected_methods(methods).values()))


def run_audit(features: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
              eps: float | None = None, methods: tuple[str, ...] = METHODS, removal_method: str = "filter",
              rank: int = 64, filter_rank: int = 16, spectral_k: int = 1, kappa: float = KAPPA,
              eps_scope: str = "poisoned", generator: torch.Generator, probe: Probe | None = None) -> AuditResult:
    """Audit one training set.

    features: (N, D) representations of the audited model; inputs: (N, P) the
    images flattened in [0, 1] (only used to tell which side of a split is the
    poison); labels: (N,) int64; eps: see the module docstring; methods: names
    in the registry (robustdata/audit/methods/); probe: the images and the model,
    for the methods that ask the model (methods/base.py; without it they skip).
    Raises NonFiniteFeaturesError when some features are NaN or inf.
    """
    check_inputs(features, inputs, labels, num_classes, methods, removal_method, eps, eps_scope)
    start = time.perf_counter()
    options = AuditOptions(eps=eps, eps_scope=eps_scope, rank=rank, filter_rank=filter_rank, spectral_k=spectral_k,
                           kappa=kappa)
    distances = input_distances(inputs.float(), labels, num_classes)
    q = pca_rank(methods, options)
    counts = torch.bincount(labels, minlength=num_classes).tolist()
    scores, flagged, per_class, threshold = audit_classes(
        lambda label: class_pca(features, labels, label, q, generator), counts, distances, methods=methods,
        removal_method=removal_method, options=options, generator=generator, probe=probe)
    seconds = {"scoring": time.perf_counter() - start}
    return AuditResult(scores, flagged, per_class, removal_method, eps, threshold, seconds)


# ------------------------------------------------------------------------------------- per-class decisions

Kept = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # a scored class's (index, side, coords) for pass 2


def audit_classes(pca_of: Callable[[int], ClassPCA], counts: list[int], distances: InputDistances, *,
                  methods: tuple[str, ...], removal_method: str, options: AuditOptions, generator: torch.Generator,
                  probe: Probe | None = None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[dict[str, Any]], float | None]:
    """(scores, flagged, per-class entries, threshold): every per-class decision of the audit.

    pca_of(label) gives a class's principal coordinates (ClassPCA, index into the N samples); it is called
    once per class with at least min_samples(filter_rank) samples, in label order, so a lazily computed PCA
    draws from `generator` in the same order as the per-class steps. counts: samples per class;
    distances: each sample's input-space distance to its class's centroid and the nearest other class's.
    Pass 1 scores each class with every method (Method.score), the audit then judges which classes are
    poisoned (filtering.poisoned_classes), and pass 2 scores what needs that verdict and flags
    (Method.rescore, Method.flag): robustdata/audit/methods/base.py.
    """
    selected = selected_methods(methods)
    n_total, device = len(distances.own), distances.own.device
    scores = {m: torch.zeros(n_total, dtype=torch.float64, device=device) for m in methods}
    flagged = {m: torch.zeros(n_total, dtype=torch.bool, device=device) for m in methods}
    keep_coords = any(method.keeps_coordinates for method in selected.values())
    per_class: list[dict[str, Any]] = []
    kept: dict[int, Kept] = {}
    for label, count in enumerate(counts):
        entry: dict[str, Any] = {"label": label, "n": count}
        per_class.append(entry)
        view = class_view(label, count, pca_of, distances, entry, options, generator, probe)
        if view is not None and score_class(view, selected, scores, flagged, entry, options, generator):
            # only the index, the side (and kept coordinates) outlive this step: O(n q) memory, not O(n D)
            kept[view.label] = (view.pca.index, view.side, view.pca.coords if keep_coords else None)
    threshold = judge_classes(per_class, options.kappa)
    for entry in per_class:
        state = kept.get(entry["label"])
        flag_class(entry, state, selected, scores, flagged, options, generator)
        entry["flagged"] = 0 if state is None else int(flagged[removal_method][state[0]].sum())
    return scores, flagged, per_class, threshold


def class_view(label: int, count: int, pca_of: Callable[[int], ClassPCA], distances: InputDistances,
               entry: dict[str, Any], options: AuditOptions, generator: torch.Generator,
               probe: Probe | None = None) -> ClassView | None:
    """The class as the methods see it (its PCA, best split and poison side), or None when it cannot be
    scored (too few samples, constant features): then its status is in `entry`."""
    status = size_status(count, min_samples(options.filter_rank))
    if status is None:
        pca = pca_of(label)
        status = STATUS_CONSTANT if is_constant(pca.total_variance, pca.mean) else STATUS_OK
    if status != STATUS_OK:
        entry.update(status=status, statistic=None)
        return None
    split = best_split(pca.coords[:, :options.filter_rank], generator)
    nearest_other = distances.nearest_other[pca.index]
    looks_like = torch.where(nearest_other < distances.own[pca.index], distances.nearest_other_class[pca.index],
                             label)
    return ClassView(label, pca, split, poison_side(split, nearest_other), probe=probe, looks_like=looks_like)


def score_class(view: ClassView, selected: dict[str, Method], scores: dict[str, torch.Tensor],
                flagged: dict[str, torch.Tensor], entry: dict[str, Any], options: AuditOptions,
                generator: torch.Generator) -> bool:
    """Pass 1 for one class: every method's scores (and own flags) written, or, when a method's scores or the
    split are not finite, none and the class marked numerical_failure. Whether the class was scored."""
    results = {}
    for name, method in selected.items():
        result = method.score(view, options, generator)
        if result is not None:
            results[name] = result
            if result.side is not None:  # the method decided which samples are the poisons
                # the first decision replaces the input-space guess; later ones add to it: a test that decides
                # on a sample of the poisons (the transplant test's carriers) must not shrink a complete group
                # another test decided (Blended 5%: 115 carriers against the dirty-label test's 1,017)
                view.side = view.side | result.side if view.decided else result.side
                view.decided = True
    failed = [name for name, result in results.items() if not torch.isfinite(result.scores).all()]
    if not math.isfinite(view.split.separation):
        failed.insert(0, "split")
    if failed:  # a bug or an extreme input; reported, never written as NaN
        entry.update(status=f"numerical_failure ({', '.join(failed)} not finite)", statistic=None)
        return False
    for name, result in results.items():
        scores[name][view.pca.index] = result.scores
        if result.flags is not None:
            flagged[name][view.pca.index] = result.flags
    entry.update(status=STATUS_OK, statistic=view.split.separation, direction=view.split.direction,
                 side_size=int(view.side.sum()))
    for result in results.values():
        entry.update(result.info)
    return True


def judge_classes(per_class: list[dict[str, Any]], kappa: float) -> float | None:
    """Give each entry its verdict (verdicts.py) with the reasons, its robust z, the threshold and the
    estimated poisons; return the threshold (None when no class was scored)."""
    scored = [c for c in per_class if c["statistic"] is not None]
    centre, spread = separation_scale(torch.tensor([c["statistic"] for c in scored])) if scored else (None, None)
    threshold = None if centre is None else centre + kappa * spread
    for entry in per_class:
        if entry["statistic"] is not None:
            entry["z"] = (entry["statistic"] - centre) / spread
        entry["verdict"], entry["reasons"] = class_verdict(entry, kappa, median_separation=centre)
        entry["poisoned"] = entry["verdict"] == POISONED
        entry["threshold"] = threshold
        entry["estimated_poisons"] = entry.get("side_size", 0) if entry["poisoned"] else 0
    return threshold


def class_budget(entry: dict[str, Any], options: AuditOptions) -> tuple[float, int]:
    """(the class's poisoned fraction: eps, or the estimate; how many samples a budgeted method removes)."""
    eps = options.eps
    fraction = eps if eps is not None else entry["estimated_poisons"] / entry["n"]
    expected = eps * entry["n"] if eps is not None else entry["estimated_poisons"]
    if eps is not None and options.eps_scope == "poisoned" and not entry["poisoned"]:
        expected = 0.0
    # the tolerance keeps float noise (1.5 * 0.1 * 1000 = 150.00000000000003) from adding a sample
    return fraction, min(entry["n"], math.ceil(BUDGET_FACTOR * expected - 1e-9))


def flag_class(entry: dict[str, Any], kept: Kept | None, selected: dict[str, Method],
               scores: dict[str, torch.Tensor], flagged: dict[str, torch.Tensor], options: AuditOptions,
               generator: torch.Generator) -> None:
    """Pass 2 for one class: its budget, the scores that need the verdict, and every method's flags."""
    if kept is None:
        entry["budget"] = 0
        return
    index, side, coords = kept
    fraction, entry["budget"] = class_budget(entry, options)
    verdict = ClassVerdict(entry["label"], index, side, coords, entry["poisoned"], fraction, entry["budget"])
    failed = []
    for name, method in selected.items():
        result = method.rescore(verdict, options, generator)
        if result is None:
            continue
        if torch.isfinite(result.scores).all():
            scores[name][index] = result.scores
            entry.update(result.info)
        else:  # left at 0 and unflagged below; the class's other methods stand
            failed.append(name)
            scores[name][index] = 0.0
    if failed:
        entry["status"] = f"numerical_failure ({', '.join(failed)} not finite)"
    for name, method in selected.items():
        result = None if name in failed else method.flag(verdict, scores[name][index], options, generator)
        if result is not None:
            flagged[name][index] = result.flags
            entry.update(result.info)
        elif name in failed:
            flagged[name][index] = False

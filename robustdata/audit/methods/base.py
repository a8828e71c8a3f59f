"""The interface every audit method implements, and what the audit hands it.

The audit (robustdata.audit.scoring.audit_classes) reads one class at a time, in two passes:

1. before any class is judged: the class's principal coordinates, the filter's
   best split and that split's poison side (ClassView). Each method may score
   the class here (Method.score), and may flag by a rule of its own;
2. after the audit judged which classes are poisoned and set each class's
   removal budget (ClassVerdict): a method whose scores need that verdict scores
   here (Method.rescore; SPECTRE's robust estimate drops up to 2 eps of the
   class), then every method flags (Method.flag).

Scores are (n,) float64, higher = more suspicious; flags (n,) bool; both are
indexed like the class's samples (ClassView.pca.index / ClassVerdict.index).
Methods run on each class in `order`, which fixes the sequence of draws from
the shared torch.Generator, so a same-seed audit is reproducible bit for bit.
A method reads the options it needs from AuditOptions and keeps no state
between classes or audits (the registry holds one instance of each).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from robustdata.audit.filtering import Split
from robustdata.audit.spectral import ClassPCA


@dataclass(frozen=True)
class AuditOptions:
    """The audit's knobs (see robustdata.audit.scoring.run_audit and AuditParams)."""

    eps: float | None = None     # bound on a class's poisoned fraction; None: the filter estimates it
    eps_scope: str = "poisoned"  # with eps: remove 1.5 eps from the classes judged poisoned, or from "all"
    rank: int = 64               # principal directions SPECTRE may read
    filter_rank: int = 16        # principal directions the filter's split searches
    spectral_k: int = 1          # spectral signatures: top-k directions scored
    kappa: float = 6.0           # robust z of the separation above which a class is poisoned


@dataclass
class Probe:
    """The audited images and the audited model, for methods that ask the model (the transplant test).
    The in-memory audit has one; the streaming audit has none (its methods read features only)."""

    images: torch.Tensor                 # (N, C, H, W) uint8, the audited set
    classify: Callable[[torch.Tensor], torch.Tensor]  # (n, C, H, W) floats in [0, 1] -> (n,) predicted labels
    reference: torch.Tensor              # (R,) rows of a seeded sample of every class
    reference_labels: torch.Tensor       # (R,) their labels
    reference_predictions: torch.Tensor  # (R,) the model's predictions for them


@dataclass
class ClassView:
    """One scorable class before any class is judged (pass 1)."""

    label: int
    pca: ClassPCA        # principal coordinates; pca.index: (n,) rows into the audited set
    split: Split         # the filter's best two-means split of the class
    side: torch.Tensor   # (n,) bool, the samples taken for the poisons: a side of `split`
                         # (filtering.poison_side) unless a method decided otherwise (ClassScores.side)
    probe: Probe | None = None
    looks_like: torch.Tensor | None = None  # (n,) int64: the class whose input-space centroid the sample's image
                                            # lies nearest (its own label, or the nearest other class)
    decided: bool = False  # some method decided which samples are the poisons: `side` is the union of their sides


@dataclass
class ClassVerdict:
    """One scored class after the audit judged it (pass 2). Only the index, the side and, when some method
    keeps them, the coordinates outlive pass 1: O(n q) memory per class, not O(n D)."""

    label: int
    index: torch.Tensor         # (n,) rows into the audited set
    side: torch.Tensor          # (n,) bool, the split's poison side
    coords: torch.Tensor | None  # (n, q) principal coordinates, when a method run has keeps_coordinates
    poisoned: bool              # the audit judged the class poisoned
    fraction: float             # eps when given, else the class's estimated poisoned fraction (0 when clean)
    budget: int                 # how many samples a method that removes by score takes from the class


@dataclass
class ClassScores:
    """A method's scores for one class, with its own flags when it flags by its own rule."""

    scores: torch.Tensor                      # (n,) float64, higher = more suspicious
    flags: torch.Tensor | None = None         # (n,) bool, or None: the method flags in pass 2
    info: dict[str, Any] = field(default_factory=dict)  # fields added to the class's per-class entry
    side: torch.Tensor | None = None          # (n,) bool: the method's decision of which samples are the
                                              # poisons, replacing ClassView.side for the methods after it


@dataclass
class ClassFlags:
    flags: torch.Tensor                       # (n,) bool
    info: dict[str, Any] = field(default_factory=dict)  # fields added to the class's per-class entry


class Method:
    """One audit method (see the module docstring). Subclasses set `name` (= their module's name) and
    `order`, and override score and/or rescore, and flag."""

    name: ClassVar[str] = ""
    order: ClassVar[int] = 1000             # position in each class's run (see the module docstring)
    keeps_coordinates: ClassVar[bool] = False  # reads ClassVerdict.coords: the audit keeps them for pass 2
    streams_by_default: ClassVar[bool] = True  # in the streaming audit's default methods

    def coordinates(self, options: AuditOptions) -> int:
        """How many principal coordinates per sample the method reads (the audit computes the most any needs)."""
        return 0

    def score(self, view: ClassView, options: AuditOptions, generator: torch.Generator) -> ClassScores | None:
        """Scores before any class is judged, or None when the method scores in rescore."""
        return None

    def rescore(self, verdict: ClassVerdict, options: AuditOptions, generator: torch.Generator
                ) -> ClassScores | None:
        """Scores that need the verdict (replacing score's), or None."""
        return None

    def flag(self, verdict: ClassVerdict, scores: torch.Tensor, options: AuditOptions,
             generator: torch.Generator) -> ClassFlags | None:
        """Flags from the class's scores (n,) and verdict, or None: the flags given with the scores stand."""
        return None


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(n,) bool: the k highest scores (all of them when k >= n, none when k <= 0)."""
    mask = torch.zeros(len(scores), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[scores.topk(min(k, len(scores))).indices] = True
    return mask

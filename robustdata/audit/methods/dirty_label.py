"""The dirty-label test: a clearly split-off group of the class whose images look like other classes.

A dirty-label poison (BadNets, Blended, LF, WaNet, the adaptive attacks: every
attack that relabels) is an image of another class that carries a trigger,
relabelled to the target. Two things set a group of them apart that no
natural sub-style of a class shows together:

- the model's features split them off the class (the trigger): the class's
  best split is clear, D > SPLIT_MIN_SEPARATION (clean MNIST classes: D 2.9-4.2,
  20k images, 5 model seeds);
- in input space they still look like their source classes: each image lies
  nearer another class's centroid than its own class's (ClassView.looks_like).

Candidates: both sides of the class's best split, and the smaller cluster of a
2-means of its top principal coordinates (activation clustering's split: an
image-wide trigger's poisons, LF at 5% of MNIST, make a cluster that the
filter's 1-D split cuts badly; 997 of its 1,024 members are poisons). The test
decides when a candidate of at most MAX_POISON_SIDE of the class has at least
LOOKS_OTHER_MIN of its members looking like another class, LOOKS_OTHER_GAP
more than the rest of the class. Its poisons are that group.

Measured on MNIST (20k images, small CNN, seed 0): the groups it decided held
0.92-1.00 lookalikes against 0.03-0.35 in the rest of their class (BadNets,
Blended, LF, WaNet, all-to-all, the adaptive attacks). On clean data (5 model
seeds) no class split above D 4.2, so the test never ran; the candidates of
those weak splits held up to 78% lookalikes, 62 points above their rest (a
natural sub-style, a thin-looped eight, can look like another class too): the
clear-split gate, not the shares alone, is what keeps clean classes out. The
one clean class that split clearly (the 50k quick-profile set, model seed 2,
class 1 at D above 5: a natural style) held 42% lookalikes on its smaller side
against 3%: no decision.

Its assumption is an input space where class centroids classify most images
(MNIST: about 82% of them). Where they do not (natural images: CIFAR-10
pixels, about 28%), most of every group looks like other classes, the gap
fails, and the test decides nothing: the audit's other rules stand.
Clean-label poisons (SIG, label-consistent) are real images of their class and
look like it: the test does not see them, and decides nothing.

The check that a suspicious cluster belongs to another class is activation
clustering's "exclusionary reclassification" (Chen et al., "Detecting Backdoor
Attacks on Deep Neural Networks by Activation Clustering", 2018,
arXiv:1811.03728), which retrains a model without the cluster to classify it;
here a nearest-centroid classifier in input space answers at no training cost.
Neighbours' labels in a representation vote on a sample's label in Peri et
al.'s deep k-NN defence (ECCV Workshops 2020).
"""

from __future__ import annotations

import torch

from robustdata.audit.clustering import DIMS, two_means
from robustdata.audit.filtering import MAX_POISON_SIDE
from robustdata.audit.methods import register
from robustdata.audit.methods.base import AuditOptions, ClassScores, ClassView, Method
from robustdata.audit.transplant import SPLIT_MIN_SEPARATION

LOOKS_OTHER_MIN = 0.8  # share of a candidate's members that look like another class ...
LOOKS_OTHER_GAP = 0.5  # ... and by how much more than the rest of the class


@register
class DirtyLabel(Method):
    name = "dirty_label"
    order = 4  # before the transplant test: its decision replaces the input-space guess, the transplant test's adds

    def coordinates(self, options: AuditOptions) -> int:
        return DIMS

    def score(self, view: ClassView, options: AuditOptions, generator: torch.Generator) -> ClassScores | None:
        if view.looks_like is None:
            return None
        looks_other = view.looks_like != view.label
        none = torch.zeros(len(looks_other), dtype=torch.bool, device=looks_other.device)
        best = None
        if view.split.separation > SPLIT_MIN_SEPARATION:
            for name, group in candidates(view):
                if 0 < int(group.sum()) <= MAX_POISON_SIDE * len(group):
                    share, rest = float(looks_other[group].float().mean()), float(looks_other[~group].float().mean())
                    if best is None or share - rest > best[1] - best[2]:
                        best = (name, share, rest, group)
        decides = best is not None and best[1] >= LOOKS_OTHER_MIN and best[1] - best[2] >= LOOKS_OTHER_GAP
        side = best[3] if decides else none
        info = None if best is None else {"group": best[0], "group_size": int(best[3].sum()), "decides": decides,
                                          "looks_other_share": best[1], "rest_share": best[2]}
        # the score ranks the decided group's members that look like another class first
        scores = side.double() + (side & looks_other).double()
        return ClassScores(scores, side, {"dirty_label": info}, side=side if decides else None)


def candidates(view: ClassView) -> list[tuple[str, torch.Tensor]]:
    """(name, (n,) bool) of the groups tested: both sides of the best split, the smaller 2-means cluster."""
    high = view.split.high
    coords = view.pca.coords[:, :DIMS].float()
    # its own seeded stream: the audit's shared draws stay as they were
    assignment, _ = two_means(coords, torch.Generator(device=coords.device).manual_seed(view.label))
    small = assignment == int(torch.bincount(assignment, minlength=2).argmin())
    return [("a side of the best split", high), ("a side of the best split", ~high),
            ("the smaller cluster of a 2-means", small)]

"""The transplant test (robustdata/audit/transplant.py): which samples carry a pattern the model obeys.

Candidates: the two sides of the class's best split, then its most isolated
samples (a group too small to split the class). A candidate whose pattern,
pasted onto other classes' images, moves them to this class (and moves them far
more than the rest of the class's pattern does) decides the class: it is
poisoned, and its poisons are that side, or, for an isolated group, every
sample of the class that carries the pattern. The decision replaces the
input-space side rule, which misplaces clean-label poisons and may point at
most of a class. Undecided, the test changes nothing.

Scores: the share of the decided pattern's pixels each sample matches (0 when
undecided). Needs the audited images and model (ClassView.probe): in the
in-memory audit only.
"""

from __future__ import annotations

import torch

from robustdata.audit import transplant
from robustdata.audit.methods import register
from robustdata.audit.methods.base import AuditOptions, ClassScores, ClassView, Method, Probe


@register
class Transplant(Method):
    name = "transplant"
    order = 5                  # first: its decision of the side is what the filter and the others read
    streams_by_default = False  # needs the images and the model

    def coordinates(self, options: AuditOptions) -> int:
        return options.filter_rank

    def score(self, view: ClassView, options: AuditOptions, generator: torch.Generator) -> ClassScores | None:
        if view.probe is None:
            return None
        images = view.probe.images[view.pca.index.cpu()].float().div(255.0)
        reference, reference_labels, predictions = other_classes(view.probe, view.label)

        def flip(rows: torch.Tensor) -> transplant.Flip:
            return transplant.flip_rate(transplant.pattern_of(images[rows], reference), view.label, reference,
                                        reference_labels, predictions, view.probe.classify)

        high = view.split.high.cpu()
        candidates = []
        if view.split.separation > transplant.SPLIT_MIN_SEPARATION:
            sides = (flip(high), flip(~high))
            candidates = [("a side of the best split", high, sides[0], sides[1]),
                          ("a side of the best split", ~high, sides[1], sides[0])]
        whole = flip(torch.ones_like(high))  # an isolated group's rest is nearly the whole class
        groups = transplant.outlier_groups(view.pca.coords[:, :options.filter_rank])
        candidates += [(f"the most isolated {fraction:.1%}", group.cpu(), flip(group.cpu()), whole)
                       for fraction, group in zip(transplant.OUTLIER_FRACTIONS, groups)]
        draws = torch.Generator().manual_seed(view.label)  # its own stream: the audit's draws stay as they were
        found = []
        for name, group, tested, rest in candidates:
            if tested.rate < transplant.FLIP_MIN:
                continue
            # a small group agrees on more pixels by chance, and a larger pattern moves more images: compare
            # with as many samples of the class drawn at random, too
            chance = flip(transplant.random_group(len(group), int(group.sum()), draws))
            control = max(rest, chance, key=lambda f: f.rate)
            if tested.rate - control.rate >= transplant.FLIP_GAP:
                found.append((name, group, tested, control))
        if not found:
            return ClassScores(torch.zeros(len(images), dtype=torch.float64), info={"transplant": None})
        # a side of the split is a whole set of poisons, an isolated group a sample of them: sides first
        return decided(max(found, key=lambda c: (c[0].startswith("a side"), c[2].rate - c[3].rate)), images,
                       reference, view)


def other_classes(probe: Probe, label: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(reference images of the other classes as floats, their labels, the model's predictions)."""
    keep = probe.reference_labels != label
    return (probe.images[probe.reference[keep]].float().div(255.0), probe.reference_labels[keep],
            probe.reference_predictions[keep])


def decided(best, images: torch.Tensor, reference: torch.Tensor, view: ClassView) -> ClassScores:
    """The scores, flags, side and report of a class whose candidate `best` the test decided."""
    name, group, flip, control = best
    pattern = transplant.pattern_of(images[group], reference)
    nearer = (images - pattern.value).abs() < (images - pattern.reference_mean).abs()
    share = nearer[:, pattern.mask].double().mean(1)
    # an isolated group is a sample of the poisons: remove every image that carries its pattern
    side = group if name.startswith("a side") else transplant.carriers(pattern, images, group)
    device = view.pca.index.device
    info = {"transplant": {"group": name, "group_size": int(group.sum()), "flip_rate": flip.rate,
                           "receiving_class": flip.receiving, "control_flip_rate": control.rate,
                           "pattern_pixels": flip.pixels, "poisons": int(side.sum())}}
    return ClassScores(share.to(device), side.to(device), info, side=side.to(device))

"""The transplant test (robustdata/audit/transplant.py): which samples carry a pattern the model obeys.

Candidates: the two sides of the class's best split, then its most isolated
samples (a group too small to split the class). A candidate whose pattern,
pasted onto other classes' images, moves them to this class (and moves them far
more than the rest of the class's pattern does) decides the class: it is
poisoned, and its poisons are that side, or, for an isolated group, every
sample of the class that carries the pattern. The decision replaces the
input-space side rule, which misplaces clean-label poisons and may point at
most of a class. A weak flip (transplant.WEAK_FLIP) is reported and makes the
class inconclusive; otherwise, undecided, the test changes nothing.

Scores: the share of the decided pattern's pixels each sample matches (0 when
undecided). Needs the audited images and model (ClassView.probe): in the
in-memory audit only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from robustdata.audit import transplant
from robustdata.audit.methods import register
from robustdata.audit.methods.base import AuditOptions, ClassScores, ClassView, Method, Probe


@dataclass
class Candidate:
    """A group of the class's samples and what pasting its pattern does."""

    name: str              # how the report names it
    group: torch.Tensor    # (n,) bool
    complete: bool         # a side of the split holds all the poisons; an isolated group, a sample of them
    flip: transplant.Flip  # its pattern's
    rest: transplant.Flip  # the rest of the class's pattern's

    def margin(self, control: transplant.Flip) -> float:
        return self.flip.rate - control.rate


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

        draws = torch.Generator().manual_seed(view.label)  # its own stream: the audit's draws stay as they were
        found, weak = [], []
        for candidate in candidates(view, options, flip):
            if candidate.flip.rate < transplant.WEAK_FLIP:
                continue
            # a small group agrees on more pixels by chance, and a larger pattern moves more images: compare
            # with as many samples of the class drawn at random, too
            chance = flip(transplant.random_group(len(candidate.group), int(candidate.group.sum()), draws))
            control = max(candidate.rest, chance, key=lambda f: f.rate)
            if candidate.flip.rate >= transplant.FLIP_MIN and candidate.margin(control) >= transplant.FLIP_GAP:
                found.append((candidate, control))
            elif candidate.margin(control) >= transplant.WEAK_GAP:
                weak.append((candidate, control))
        if found:
            # a complete set of poisons (a side) before a sample of them (an isolated group)
            return decided(*max(found, key=lambda pair: (pair[0].complete, pair[0].margin(pair[1]))),
                           images, reference, view)
        none = torch.zeros(len(images), dtype=torch.float64, device=view.pca.index.device)
        if weak:  # evidence that does not decide: the verdict makes the class inconclusive, nothing is removed
            candidate, control = max(weak, key=lambda pair: pair[0].margin(pair[1]))
            return ClassScores(none, info={"transplant": evidence(candidate, control, decides=False, poisons=0)})
        return ClassScores(none, info={"transplant": None})


def candidates(view: ClassView, options: AuditOptions, flip) -> list[Candidate]:
    """Both sides of a clearly separated split, then the class's most isolated groups, each tested."""
    high = view.split.high.cpu()
    found = []
    if view.split.separation > transplant.SPLIT_MIN_SEPARATION:
        sides = (flip(high), flip(~high))
        found = [Candidate("a side of the best split", high, True, sides[0], sides[1]),
                 Candidate("a side of the best split", ~high, True, sides[1], sides[0])]
    whole = flip(torch.ones_like(high))  # an isolated group's rest is nearly the whole class
    groups = transplant.outlier_groups(view.pca.coords[:, :options.filter_rank])
    return found + [Candidate(f"the most isolated {fraction:.1%}", group.cpu(), False, flip(group.cpu()), whole)
                    for fraction, group in zip(transplant.OUTLIER_FRACTIONS, groups)]


def other_classes(probe: Probe, label: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(reference images of the other classes as floats, their labels, the model's predictions)."""
    keep = probe.reference_labels != label
    return (probe.images[probe.reference[keep]].float().div(255.0), probe.reference_labels[keep],
            probe.reference_predictions[keep])


def decided(candidate: Candidate, control: transplant.Flip, images: torch.Tensor, reference: torch.Tensor,
            view: ClassView) -> ClassScores:
    """The scores, flags, side and report of a class whose candidate the test decided."""
    pattern = transplant.pattern_of(images[candidate.group], reference)
    share = transplant.match_share(pattern, images)
    # an isolated group is a sample of the poisons: remove every image that carries its pattern
    side = candidate.group if candidate.complete else transplant.carriers(pattern, images, candidate.group)
    device = view.pca.index.device
    info = {"transplant": evidence(candidate, control, decides=True, poisons=int(side.sum()))}
    return ClassScores(share.to(device), side.to(device), info, side=side.to(device))


def evidence(candidate: Candidate, control: transplant.Flip, decides: bool, poisons: int) -> dict:
    """The report of a tested candidate (the audit entry's "transplant", which the verdict reads)."""
    return {"group": candidate.name, "group_size": int(candidate.group.sum()), "decides": decides,
            "flip_rate": candidate.flip.rate, "receiving_class": candidate.flip.receiving,
            "control_flip_rate": control.rate, "pattern_pixels": candidate.flip.pixels, "poisons": poisons}

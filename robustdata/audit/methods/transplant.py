"""The transplant test (robustdata/audit/transplant.py): which samples carry a pattern the model obeys.

Candidates: the two sides of the class's best split, then its most isolated
samples (a group too small to split the class), then its members whose images
look like another class k (poisons the model keeps inside the class's
features; tested on class k's images only). A candidate whose pattern,
pasted onto other classes' images, moves them to this class (and moves them far
more than the rest of the class's pattern does) decides the class: it is
poisoned, and its poisons are that side, or, for an isolated or lookalike
group, every sample of the class that carries the pattern. The decision replaces the
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
    toward: int | None = None  # the one class its pattern is pasted onto (a lookalike group: the class its
                               # images look like); None: every other class

    def margin(self, control: transplant.Flip) -> float:
        return self.flip.rate - control.rate


@register
class Transplant(Method):
    name = "transplant"
    order = 5                  # early: its decision of the side (with the dirty-label test's) is what the filter reads
    streams_by_default = False  # needs the images and the model

    def coordinates(self, options: AuditOptions) -> int:
        return options.filter_rank

    def score(self, view: ClassView, options: AuditOptions, generator: torch.Generator) -> ClassScores | None:
        if view.probe is None:
            return None
        images = view.probe.images[view.pca.index.cpu()].float().div(255.0)
        reference, reference_labels, predictions = other_classes(view.probe, view.label)

        def flip(rows: torch.Tensor, toward: int | None = None) -> transplant.Flip:
            """What pasting the pattern of `rows` does to the other classes' images (only class `toward`'s: the
            pattern is then what the rows have that that class's images lack)."""
            keep = slice(None) if toward is None else reference_labels == toward
            return transplant.flip_rate(transplant.pattern_of(images[rows], reference[keep]), view.label,
                                        reference[keep], reference_labels[keep], predictions[keep],
                                        view.probe.classify)

        draws = torch.Generator().manual_seed(view.label)  # its own stream: the audit's draws stay as they were
        found, weak = [], []
        for candidate in candidates(view, options, flip):
            if candidate.flip.rate < transplant.WEAK_FLIP:
                continue
            # a small group agrees on more pixels by chance, and a larger pattern moves more images: compare
            # with as many samples of the class drawn at random, too
            chance = flip(transplant.random_group(len(candidate.group), int(candidate.group.sum()), draws),
                          candidate.toward)
            control = max(candidate.rest, chance, key=lambda f: f.rate)
            if candidate.flip.rate >= transplant.FLIP_MIN and candidate.margin(control) >= transplant.FLIP_GAP:
                found.append((candidate, control))
            elif candidate.margin(control) >= transplant.WEAK_GAP:
                weak.append((candidate, control))
        if found:
            # a complete set of poisons (a side) before a sample of them (an isolated group)
            candidate, control = max(found, key=lambda pair: (pair[0].complete, pair[0].margin(pair[1])))
            against = reference if candidate.toward is None else reference[reference_labels == candidate.toward]
            return decided(candidate, control, images, against, view)
        none = torch.zeros(len(images), dtype=torch.float64, device=view.pca.index.device)
        if weak:  # evidence that does not decide: the verdict makes the class inconclusive, nothing is removed
            candidate, control = max(weak, key=lambda pair: pair[0].margin(pair[1]))
            return ClassScores(none, info={"transplant": evidence(candidate, control, decides=False, poisons=0)})
        return ClassScores(none, info={"transplant": None})


def candidates(view: ClassView, options: AuditOptions, flip) -> list[Candidate]:
    """Both sides of a clearly separated split, then the class's most isolated groups, then its members that
    look like another class, each tested."""
    high = view.split.high.cpu()
    found = []
    if view.split.separation > transplant.SPLIT_MIN_SEPARATION:
        sides = (flip(high), flip(~high))
        found = [Candidate("a side of the best split", high, True, sides[0], sides[1]),
                 Candidate("a side of the best split", ~high, True, sides[1], sides[0])]
    whole = flip(torch.ones_like(high))  # an isolated group's rest is nearly the whole class
    groups = transplant.outlier_groups(view.pca.coords[:, :options.filter_rank])
    found += [Candidate(f"the most isolated {fraction:.1%}", group.cpu(), False, flip(group.cpu()), whole)
              for fraction, group in zip(transplant.OUTLIER_FRACTIONS, groups)]
    return found + lookalikes(view, flip)


def lookalikes(view: ClassView, flip) -> list[Candidate]:
    """The members whose images look like class k (ClassView.looks_like), for each other class k with at least
    MIN_GROUP of them, tested on class k's images only. Dirty-label poisons from source k are images of k with
    a trigger: what they have that k's images lack is the trigger, and it moves k's images to this class.
    They need neither a split nor isolation (all-to-all at 5% of MNIST: the zeros relabelled one stay
    inside the ones' features, yet 72 of the 89 look like zeros and their 9-px pattern moves 95% of the zeros).
    A natural lookalike (a five written like a three) has shapes the threes lack, which do not make a three a
    five (clean MNIST, 2 model seeds: under 20% of class k moved)."""
    if view.looks_like is None:
        return []
    looks_like = view.looks_like.cpu()
    found = []
    for k in sorted(set(looks_like.tolist()) - {view.label}):
        group = looks_like == k
        if int(group.sum()) >= transplant.MIN_GROUP:
            found.append(Candidate(f"the members that look like class {k}", group, False, flip(group, k),
                                   flip(~group, k), toward=k))
    return found


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

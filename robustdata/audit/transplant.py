"""The transplant test: does a group of a class's samples carry a pattern that makes the model say that class?

A backdoor trigger is a pattern the poisons share and natural images lack,
which the suspect model maps to the target class. So for a candidate group S
of class c's samples (a side of the class's best split, or its most isolated
samples):

1. its pattern is the set of pixels where S is consistent and differs from the
   other classes' images: |mean_S - mean_other| > PATTERN_Z * sqrt(sd_S^2 + PIXEL_NOISE^2),
   with the value mean_S there;
2. the pattern is pasted onto reference images of every other class, and the
   flip rate is the largest share, over those classes, of images the model
   moves to c (minus the share it already gave c).

A trigger's group flips most images of some class (MNIST, BadNets 3x3 at 0.2-5%,
source-specific, all-to-all: 0.86-1.00); a natural sub-style of c shares strokes,
not a trigger, and both sides of its split flip alike (clean MNIST: at most 0.30,
the class-1 stroke, on both sides). The test decides when the flip rate is at
least FLIP_MIN and beats by FLIP_GAP both the rest of the class's pattern and
the pattern of as many class members drawn at random (a small group agrees on
more pixels by chance, and a larger pattern moves more images). A weaker flip
(at least WEAK_FLIP, beating the controls by WEAK_GAP) does not decide, but it
does not let the class pass either: a backdoor the model learned only in part
(BadNets at 0.1% of MNIST, ASR 15%: its 10 most isolated poisons move 37% of
the fives, random zeros 10%) is evidence no other rule sees, and the audit
calls the class inconclusive. On clean MNIST no candidate moved more than 10%
(20k images, 5 model seeds). A pattern over
more than MAX_PATTERN_SHARE of the image is a shape, not a trigger (on MNIST the
planted triggers' patterns cover 1-15%; a group of complete renderings of a
class, 35%), and decides nothing.

Its assumption is a trigger fixed in pixel space. Warping (WaNet), random
positions and partial triggers (the adaptive attacks) have none; then no group
flips and the test decides nothing: the audit's other rules stand (it never
clears a class). Cheap: pastes onto at most REFERENCE_PER_CLASS images per class
and per candidate with a pattern, no gradients.

The idea of transplanting a suspected pattern onto clean inputs of other classes
is Neural Cleanse's (Wang et al., S&P 2019) and STRIP's (Gao et al., ACSAC 2019);
here the pattern comes from the data, not from an optimisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

PATTERN_Z = 2.0          # a pixel belongs to the pattern when its difference exceeds this many spreads
PIXEL_NOISE = 0.05       # spread floor (pixel units): constant pixels do not divide by zero
FLIP_MIN = 0.5           # a pattern that flips at least half of some class's images is a trigger ...
FLIP_GAP = 0.3           # ... when it flips at least this much more than the control patterns ...
WEAK_FLIP = 0.2          # a weaker flip, twice the largest a clean class's group reached, ...
WEAK_GAP = 0.15          # ... this far above the controls, leaves the class inconclusive
MAX_PATTERN_SHARE = 0.25  # ... and covers at most this share of the image: a trigger is inconspicuous by design
MATCH_MIN = 0.8          # a sample carries the pattern when this share of its pixels is nearer the pattern
OUTLIER_FRACTIONS = (0.005, 0.01, 0.02, 0.05)  # isolated groups tried (share of the class)
# a side of the class's best split is a candidate only when the split is clear: a weak split's sides are
# arbitrary halves, and a coherent half (a writing style: a clean MNIST seven's top bar) moves a similar class's
# images (clean MNIST: D 2.9-4.0 per class; poisoned classes 6-11)
SPLIT_MIN_SEPARATION = 5.0
MIN_GROUP = 10           # fewer samples agree on many pixels by chance (5 unusual threes of a 6,000-image MNIST
                         # set shared a 149-px shape that moved half of the eights)
NEIGHBOURS = 10          # isolation: distance to the 10th nearest class member
REFERENCE_PER_CLASS = 30  # reference images per class: flip rates to within a few percent


@dataclass
class Pattern:
    mask: torch.Tensor   # (C, H, W) bool
    value: torch.Tensor  # (C, H, W) float in [0, 1]
    reference_mean: torch.Tensor  # (C, H, W) the other classes' mean


@dataclass
class Flip:
    rate: float          # largest share of a receiving class moved to the audited class
    receiving: int       # that class
    pixels: int          # pattern size


def pattern_of(group: torch.Tensor, reference: torch.Tensor) -> Pattern:
    """The pixels where `group` (n, C, H, W) floats agree with each other and differ from `reference`."""
    return pattern_against(group, reference.mean(0))


def paste(pattern: Pattern, images: torch.Tensor) -> torch.Tensor:
    """`images` (n, C, H, W) floats with the pattern's pixels set to its values."""
    return torch.where(pattern.mask, pattern.value, images)


def flip_rate(pattern: Pattern, label: int, reference: torch.Tensor, reference_labels: torch.Tensor,
              reference_predictions: torch.Tensor, classify: Callable[[torch.Tensor], torch.Tensor]) -> Flip:
    """How far pasting the pattern moves each other class's reference images to `label` (the largest)."""
    pixels = int(pattern.mask.sum())
    if pixels == 0 or pixels > MAX_PATTERN_SHARE * pattern.mask.numel():
        return Flip(0.0, -1, 0)
    pasted = classify(paste(pattern, reference)).to(reference_labels.device)
    best = Flip(0.0, -1, pixels)
    for receiving in reference_labels.unique().tolist():
        rows = reference_labels == receiving
        moved = float((pasted[rows] == label).float().mean() - (reference_predictions[rows] == label).float().mean())
        if moved > best.rate:
            best = Flip(moved, int(receiving), pixels)
    return best


def match_share(pattern: Pattern, images: torch.Tensor) -> torch.Tensor:
    """(n,) float64: the share of the pattern's pixels where each image lies nearer the pattern's values than
    the reference mean (0 for an empty pattern)."""
    if not pattern.mask.any():
        return torch.zeros(len(images), dtype=torch.float64, device=images.device)
    nearer = (images - pattern.value).abs() < (images - pattern.reference_mean).abs()
    return nearer[:, pattern.mask].double().mean(1)


def matches(pattern: Pattern, images: torch.Tensor) -> torch.Tensor:
    """(n,) bool: the images that carry the pattern (match_share at least MATCH_MIN)."""
    return match_share(pattern, images) >= MATCH_MIN


def carriers(pattern: Pattern, images: torch.Tensor, group: torch.Tensor, rounds: int = 2) -> torch.Tensor:
    """(n,) bool: the images of a class (n, C, H, W) that carry the pattern of `group`, a few of its poisons.
    The pattern of a few isolated poisons holds pixels they share by chance; it is re-estimated from the
    carriers found, `rounds` times. Only the pattern's pixels that set its carriers apart from their own class
    count (class_distinct): the pixels a group shares with its class (a nine's loop) would make every member a
    carrier (canaries at 1% of a class: 1,439 of 1,848 nines flagged before this rule)."""
    carrying = matches(class_distinct(pattern, images), images) | group
    for _ in range(rounds):
        found = pattern_against(images[carrying], pattern.reference_mean)
        carrying = matches(class_distinct(found, images), images) | group
    return carrying


def class_distinct(pattern: Pattern, images: torch.Tensor) -> Pattern:
    """The pattern restricted to the pixels where its value lies more than PATTERN_Z of the class's own spread
    from the class's mean: a trigger carried by a few members stands out there, a shared stroke does not."""
    mean, spread = images.mean(0), images.std(0, correction=0)
    mask = pattern.mask & ((pattern.value - mean).abs() > PATTERN_Z * torch.sqrt(spread ** 2 + PIXEL_NOISE ** 2))
    return Pattern(mask, pattern.value, pattern.reference_mean)


def pattern_against(group: torch.Tensor, reference_mean: torch.Tensor) -> Pattern:
    """The pixels where `group` agrees and differs from `reference_mean` (pattern_of's rule)."""
    mean, spread = group.mean(0), group.std(0, correction=0)
    mask = (mean - reference_mean).abs() > PATTERN_Z * torch.sqrt(spread ** 2 + PIXEL_NOISE ** 2)
    return Pattern(mask, mean, reference_mean)


def isolation(coords: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(n,) distance of each row of `coords` (n, q) to its NEIGHBOURS-th nearest other row, chunked."""
    k = min(NEIGHBOURS, len(coords) - 1)
    out = [torch.cdist(coords[start:start + chunk], coords).topk(k + 1, largest=False).values[:, -1]
           for start in range(0, len(coords), chunk)]
    return torch.cat(out)


def outlier_groups(coords: torch.Tensor) -> list[torch.Tensor]:
    """Masks of the most isolated OUTLIER_FRACTIONS of a class (small poison groups sit apart)."""
    order = isolation(coords.float()).argsort(descending=True)
    groups = []
    for fraction in OUTLIER_FRACTIONS:
        group = torch.zeros(len(coords), dtype=torch.bool, device=coords.device)
        group[order[:max(MIN_GROUP, round(fraction * len(coords)))]] = True
        groups.append(group)
    return groups


def random_group(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(n,) bool mask of `size` members drawn uniformly: the chance control of a group of that size."""
    group = torch.zeros(n, dtype=torch.bool)
    group[torch.randperm(n, generator=generator)[:size]] = True
    return group

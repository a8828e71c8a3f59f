"""Plant a backdoor in a training set with ground truth, and build the triggered test set.

Dirty-label attacks poison images of the source classes (by the targeting) and
relabel them to their targets; `rate` is a fraction of the whole training set.
Clean-label attacks poison images of the target classes, which keep their
label; `rate` is then a fraction of the target classes' images. Cover samples
(adaptive attacks, WaNet's noise mode) are drawn from the rest and keep their
labels. The attack success rate (ASR) is measured on a triggered test set:
every test image of a source class, triggered and labelled with its target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from robustdata.errors import RobustDataError
from robustdata.poison import backdoor
from robustdata.poison.base import Backdoor, check_images
from robustdata.poison.targeting import Targeting

if TYPE_CHECKING:
    from robustdata.config import PoisonParams


@dataclass(frozen=True)
class Dose:
    """How many poisons (a rate or a count) and how many cover samples per poison (None: the attack's own)."""

    rate: float | None = 0.05
    count: int | None = None
    cover_ratio: float | None = None

    def num_poisons(self, population: int) -> int:
        if (self.rate is None) == (self.count is None):
            raise RobustDataError("give exactly one of the poison rate and count")
        if self.count is not None:
            if self.count < 0:
                raise RobustDataError(f"poison count {self.count} must not be negative")
            return self.count
        if not 0 <= self.rate <= 1:
            raise RobustDataError(f"poison rate {self.rate} must be in [0, 1]")
        return round(self.rate * population)


@dataclass
class Planted:
    images: torch.Tensor     # (N, C, H, W) uint8, poisons and covers in place
    labels: torch.Tensor     # (N,) the labels the victim trains on
    is_poison: torch.Tensor  # (N,) bool
    is_cover: torch.Tensor   # (N,) bool: triggered, true label kept
    attack: Backdoor         # as prepared for this training set: it triggers the test set


def eligible_for_poison(labels: torch.Tensor, attack: Backdoor, targeting: Targeting, num_classes: int
                        ) -> torch.Tensor:
    """(N,) bool: the images this attack may poison (sources, or the targets for a clean-label attack)."""
    targets = targeting.target_of(labels, num_classes)
    if not attack.clean_label:
        return targets >= 0
    if targeting.kind == "all_to_all":
        raise RobustDataError(f"{attack.name} is a clean-label attack: it takes all_to_one, source_specific "
                              "or multi_target targeting, not all_to_all")
    return torch.isin(labels, torch.tensor(targeting.targets, device=labels.device))


def draw(mask: torch.Tensor, wanted: int, generator: torch.Generator, what: str) -> torch.Tensor:
    """Sorted indices of `wanted` images drawn uniformly from `mask`."""
    candidates = torch.nonzero(mask.cpu()).flatten()
    if wanted > len(candidates):
        raise RobustDataError(f"{wanted} {what} asked but only {len(candidates)} images are eligible")
    return candidates[torch.randperm(len(candidates), generator=generator)[:wanted]].sort().values


def choose_poisons(labels: torch.Tensor, attack: Backdoor, targeting: Targeting, dose: Dose, num_classes: int,
                   generator: torch.Generator) -> torch.Tensor:
    """Sorted indices of the images to poison."""
    eligible = eligible_for_poison(labels.cpu(), attack, targeting, num_classes)
    population = int(eligible.sum()) if attack.clean_label else len(labels)
    return draw(eligible, dose.num_poisons(population), generator, "poisons")


def plant(images: torch.Tensor, labels: torch.Tensor, attack: Backdoor, targeting: Targeting, dose: Dose,
          num_classes: int, generator: torch.Generator) -> Planted:
    """Poison a copy of the training set (the inputs are left untouched)."""
    check_images(images)
    attack = attack.prepare(images, labels, generator)
    index = choose_poisons(labels, attack, targeting, dose, num_classes, generator).to(images.device)
    out_images, out_labels = images.clone(), labels.clone()
    out_images[index] = attack.poison(images[index], generator)
    if not attack.clean_label:
        out_labels[index] = targeting.target_of(labels[index], num_classes).to(labels.dtype)
    is_poison = torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
    is_poison[index] = True
    ratio = attack.cover_ratio if dose.cover_ratio is None else dose.cover_ratio
    covers = draw(~is_poison, round(ratio * len(index)), generator, "cover samples").to(images.device)
    if len(covers):
        out_images[covers] = attack.cover(images[covers], generator)
    is_cover = torch.zeros_like(is_poison)
    is_cover[covers] = True
    return Planted(out_images, out_labels, is_poison, is_cover, attack)


def triggered_test_set(images: torch.Tensor, labels: torch.Tensor, attack: Backdoor, targeting: Targeting,
                       num_classes: int, generator: torch.Generator
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(triggered images, target labels, true labels) of every test image of a source class; accuracy against
    the target labels is the attack success rate."""
    check_images(images)
    targets = targeting.target_of(labels, num_classes)
    keep = targets >= 0
    return attack.apply(images[keep], generator), targets[keep].to(labels.dtype), labels[keep]


def lineage_rows(keys: list[str], origins: list[str], true_labels: torch.Tensor, planted: Planted
                 ) -> list[dict[str, Any]]:
    """Manifest rows of a poisoned set: each sample's parent key and first origin, true label and ground truth
    (`trigger`: the attack of a poison or a cover sample)."""
    marked = (planted.is_poison | planted.is_cover).tolist()
    return [{"key": key, "origin_key": key, "first_origin": origin, "source_label": int(true),
             "is_poison": bool(flag), "trigger": planted.attack.id if mark else None}
            for key, origin, true, flag, mark in zip(keys, origins, true_labels.tolist(), planted.is_poison.tolist(),
                                                     marked)]


def from_params(params: "PoisonParams") -> tuple[Backdoor, Targeting, Dose]:
    """The attack, targeting and dose a `poison` params section describes."""
    return (backdoor(params.attack, params.trigger), Targeting(params.targeting, params.targets, params.sources),
            Dose(params.rate, params.count, params.cover_ratio))


def modules_of(attack: Backdoor) -> tuple[str, ...]:
    """The library modules (paths under robustdata/) that plant `attack`: recorded with what they build."""
    return ("poison/base.py", "poison/targeting.py", "poison/plant.py", f"poison/{attack.name}.py")

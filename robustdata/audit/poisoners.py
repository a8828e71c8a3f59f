"""Backdoor poisons with ground truth: for testing the audit and as planted canaries.

A trigger is stamped on some training images that are then relabelled to a
target class (Gu et al. 2017 "BadNets"; Chen et al. 2017 blended triggers).
All-to-one poisons images of every class except the target; source-to-target
poisons only images of one source class. Attack success rate (ASR) is measured
on a triggered test set: every test image whose true class is a poisoned
source, triggered and labelled with the target.

Images are uint8 (N, C, H, W) tensors throughout; pixel values 0..255.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from robustdata.config import PoisonParams
from robustdata.errors import RobustDataError

TriggerKind = Literal["square", "pixel", "pattern", "blend"]
TRIGGER_KINDS = ("square", "pixel", "pattern", "blend")
CORNERS = ("bottom_right", "bottom_left", "top_right", "top_left")


@dataclass(frozen=True)
class Trigger:
    """A backdoor trigger.

    square:  a size x size patch of `value` (BadNets' 3x3 white square)
    pixel:   one pixel set to `value`
    pattern: a size x size checkerboard of `value` and 0
    blend:   x' = (1 - alpha) x + alpha p, p a fixed uniform-noise image drawn from `pattern_seed`
    `position` is a corner name or "row,col" of the patch's top-left pixel; `margin` keeps
    corner patches that many pixels off the border (MNIST digits never touch it).
    """

    kind: TriggerKind = "square"
    size: int = 3
    value: int = 255
    position: str = "bottom_right"
    margin: int = 1
    alpha: float = 0.2
    pattern_seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in TRIGGER_KINDS:
            raise RobustDataError(f"unknown trigger kind {self.kind!r}; valid: {list(TRIGGER_KINDS)}")
        if not 0 <= self.value <= 255:
            raise RobustDataError(f"trigger value {self.value} is outside 0..255")
        if not 0 < self.alpha <= 1:
            raise RobustDataError(f"blend alpha {self.alpha} must be in (0, 1]")
        if self.size < 1:
            raise RobustDataError(f"trigger size {self.size} must be at least 1 pixel")

    @property
    def id(self) -> str:
        """A short stable name recorded with every poisoned sample."""
        if self.kind == "blend":
            return f"blend-a{self.alpha:g}-s{self.pattern_seed}"
        size = 1 if self.kind == "pixel" else self.size
        return f"{self.kind}{size}x{size}-v{self.value}-{self.position.replace(',', '_')}"


def patch_origin(trigger: Trigger, height: int, width: int) -> tuple[int, int]:
    """Top-left (row, col) of a patch trigger."""
    size = 1 if trigger.kind == "pixel" else trigger.size
    if trigger.position in CORNERS:
        far_row, far_col = height - size - trigger.margin, width - size - trigger.margin
        row = trigger.margin if trigger.position.startswith("top") else far_row
        col = trigger.margin if trigger.position.endswith("left") else far_col
    else:
        try:
            row, col = (int(part) for part in trigger.position.split(","))
        except ValueError as exc:
            raise RobustDataError(f"trigger position {trigger.position!r}: use one of {list(CORNERS)} "
                                  "or 'row,col'") from exc
    if not (0 <= row <= height - size and 0 <= col <= width - size):
        raise RobustDataError(f"a {size}x{size} trigger at ({row}, {col}) does not fit a {height}x{width} image")
    return row, col


def blend_pattern(trigger: Trigger, shape: tuple[int, int, int]) -> torch.Tensor:
    """The fixed noise image of a blended trigger, (C, H, W) float in [0, 255]."""
    generator = torch.Generator().manual_seed(trigger.pattern_seed)
    return torch.randint(0, 256, shape, generator=generator).float()


def apply_trigger(images: torch.Tensor, trigger: Trigger) -> torch.Tensor:
    """Stamp `trigger` on uint8 images (N, C, H, W); returns a new tensor."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise RobustDataError(f"apply_trigger takes uint8 (N, C, H, W) images, got {images.dtype} "
                              f"{tuple(images.shape)}")
    out = images.clone()
    _, channels, height, width = images.shape
    if trigger.kind == "blend":
        pattern = blend_pattern(trigger, (channels, height, width)).to(images.device)
        mixed = (1 - trigger.alpha) * images.float() + trigger.alpha * pattern
        return mixed.round_().clamp_(0, 255).to(torch.uint8)
    row, col = patch_origin(trigger, height, width)
    if trigger.kind == "pixel":
        out[:, :, row, col] = trigger.value
    elif trigger.kind == "square":
        out[:, :, row:row + trigger.size, col:col + trigger.size] = trigger.value
    else:  # pattern: a checkerboard, so it differs from a plain square
        grid = torch.arange(trigger.size, device=images.device)
        checker = ((grid[:, None] + grid[None, :]) % 2 == 0).to(torch.uint8) * trigger.value
        out[:, :, row:row + trigger.size, col:col + trigger.size] = checker
    return out


@dataclass(frozen=True)
class Attack:
    """Who is poisoned: all-to-one (source None) or source-to-target, by rate or count.

    `rate` is a fraction of the whole training set (the poisons are drawn from
    the eligible images, i.e. those whose label is not the target / is the source).
    """

    trigger: Trigger
    target: int = 0
    source: int | None = None
    rate: float | None = 0.05
    count: int | None = None

    def eligible(self, labels: torch.Tensor) -> torch.Tensor:
        """Mask of images the attack may poison."""
        if self.source is not None:
            return labels == self.source
        return labels != self.target

    def num_poisons(self, num_samples: int) -> int:
        if (self.rate is None) == (self.count is None):
            raise RobustDataError("give exactly one of the poison rate and count")
        if self.count is not None:
            if self.count < 0:
                raise RobustDataError(f"poison count {self.count} must not be negative")
            return self.count
        if not 0 <= self.rate <= 1:
            raise RobustDataError(f"poison rate {self.rate} must be in [0, 1]")
        return round(self.rate * num_samples)


def choose_poisons(labels: torch.Tensor, attack: Attack, generator: torch.Generator) -> torch.Tensor:
    """Sorted indices of the images to poison, drawn uniformly from the eligible ones."""
    num_classes_seen = int(labels.max()) + 1 if len(labels) else 0
    for name, value in (("target", attack.target), ("source", attack.source)):
        if value is not None and not 0 <= value < max(num_classes_seen, attack.target + 1):
            raise RobustDataError(f"attack {name} class {value} is not a label of this dataset")
    if attack.source == attack.target:
        raise RobustDataError("the source class must differ from the target")
    eligible = torch.nonzero(attack.eligible(labels.cpu())).flatten()
    wanted = attack.num_poisons(len(labels))
    if wanted > len(eligible):
        raise RobustDataError(f"{wanted} poisons asked but only {len(eligible)} images are eligible")
    pick = torch.randperm(len(eligible), generator=generator)[:wanted]
    return eligible[pick].sort().values


def poison(images: torch.Tensor, labels: torch.Tensor, attack: Attack, generator: torch.Generator
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(poisoned images, poisoned labels, is_poison mask); inputs are left untouched."""
    index = choose_poisons(labels, attack, generator).to(images.device)
    images, labels = images.clone(), labels.clone()
    images[index] = apply_trigger(images[index], attack.trigger)
    labels[index] = attack.target
    is_poison = torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
    is_poison[index] = True
    return images, labels, is_poison


def triggered_test_set(images: torch.Tensor, labels: torch.Tensor, attack: Attack
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(triggered images, target labels, true labels) of every eligible test image.

    Accuracy against the target labels is the attack success rate.
    """
    keep = attack.eligible(labels)
    triggered = apply_trigger(images[keep], attack.trigger)
    return triggered, torch.full_like(labels[keep], attack.target), labels[keep]


def attack_from(params: PoisonParams) -> Attack:
    """The attack a `poison` params section describes."""
    return Attack(Trigger(**params.trigger.model_dump()), target=params.target, source=params.source,
                  rate=params.rate, count=params.count)


def lineage_rows(keys: list[str], true_labels: torch.Tensor, is_poison: torch.Tensor, trigger_id: str
                 ) -> list[dict[str, Any]]:
    """Manifest rows of a poisoned set: each sample's origin, true label and ground truth (the trigger of
    its poison, if it is one)."""
    return [{"key": key, "origin_key": key, "source_label": int(true), "is_poison": bool(flag),
             "trigger": trigger_id if flag else None}
            for key, true, flag in zip(keys, true_labels.tolist(), is_poison.tolist())]

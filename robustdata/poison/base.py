"""The interface every backdoor attack implements.

A backdoor is a frozen dataclass of its settings (the trigger's shape, strength,
seed) with up to four steps, all on uint8 (N, C, H, W) images, pixel values
0..255, on the images' device:

- prepare: once per poisoning, with the whole clean training set (an attack
  that needs a surrogate model trains it here); returns the attack to use;
- apply: the trigger as the attacker stamps it at test time;
- poison: the training poisons made of the chosen images (apply, unless the
  attack poisons differently from how it triggers, e.g. adaptive attacks'
  partial triggers, label-consistent's adversarial perturbation);
- cover: triggered images that keep their true label (adaptive attacks, WaNet's
  noise mode), `cover_ratio` of them per poison by default.

`clean_label` attacks poison images of the target class, which keep their
label; the others relabel their poisons to the target. Randomness comes from
the generator passed in (per-image positions, noise) or, for the trigger
itself (a noise pattern, a warp field), from the attack's own `seed`, so the
trigger is the same at training and test time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from robustdata.errors import RobustDataError

CORNERS = ("bottom_right", "bottom_left", "top_right", "top_left")


@dataclass(frozen=True)
class Backdoor:
    """One backdoor attack (see the module docstring); subclasses cite their paper in their docstring."""

    name: ClassVar[str] = ""
    clean_label: ClassVar[bool] = False  # poisons are target-class images that keep their label
    cover_ratio: ClassVar[float] = 0.0   # cover samples per poison, by default

    @property
    def id(self) -> str:
        """A short stable name recorded with every poison: the attack and its settings that differ from the
        defaults, e.g. `badnets-size=2-position=random`."""
        changed = [f"{field.name}={getattr(self, field.name)}" for field in dataclasses.fields(self)
                   if field.compare and getattr(self, field.name) != field.default]
        return "-".join([self.name, *changed]).replace(",", "_").replace(" ", "")

    def prepare(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> "Backdoor":
        """The attack ready to poison this training set (images, labels: all of it, clean)."""
        return self

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The triggered images (a new tensor), as at test time."""
        raise NotImplementedError

    def poison(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The training poisons made of `images`."""
        return self.apply(images, generator)

    def cover(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Cover samples made of `images`: triggered (in the attack's own way) but keeping their labels."""
        raise RobustDataError(f"the {self.name} attack has no cover samples: set cover_ratio to 0")


def build(cls: type[Backdoor], options: dict[str, Any]) -> Backdoor:
    """cls(**options), refusing unknown options with the valid ones."""
    valid = [field.name for field in dataclasses.fields(cls) if field.init]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise RobustDataError(f"unknown option(s) {unknown} of the {cls.name} attack; valid: {valid}")
    return cls(**options)


def check_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise RobustDataError(f"backdoor attacks take uint8 (N, C, H, W) images, got {images.dtype} "
                              f"{tuple(images.shape)}")


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Float pixels on the 0..255 scale, rounded and clamped to uint8."""
    return pixels.round().clamp_(0, 255).to(torch.uint8)


def blend(images: torch.Tensor, pattern: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """(1 - alpha) x + alpha pattern, in uint8: a blended trigger (pattern (C, H, W) or (N, C, H, W) float
    0..255; alpha a number or a per-pixel weight broadcastable to the images)."""
    return to_uint8((1 - alpha) * images.float() + alpha * pattern)


def patch_origin(size: int, position: str, margin: int, height: int, width: int) -> tuple[int, int]:
    """Top-left (row, col) of a size x size patch at a corner (kept `margin` pixels off the border) or at
    "row,col"."""
    if position in CORNERS:
        far_row, far_col = height - size - margin, width - size - margin
        row = margin if position.startswith("top") else far_row
        col = margin if position.endswith("left") else far_col
    else:
        try:
            row, col = (int(part) for part in position.split(","))
        except ValueError as exc:
            raise RobustDataError(f"trigger position {position!r}: use one of {list(CORNERS)}, 'random' "
                                  "or 'row,col'") from exc
    if not (0 <= row <= height - size and 0 <= col <= width - size):
        raise RobustDataError(f"a {size}x{size} trigger at ({row}, {col}) does not fit a {height}x{width} image")
    return row, col


def check_range(name: str, value: float, low: float, high: float, attack: str) -> None:
    if not low <= value <= high:
        raise RobustDataError(f"{attack} {name} {value} is outside [{low}, {high}]")

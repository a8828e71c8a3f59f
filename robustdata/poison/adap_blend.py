"""Adaptive-Blend: a blended trigger planted in pieces, with cover samples, to defeat latent-separation defences
(Qi, Xie, Li, Mahloujifar and Mittal 2023, "Revisiting the Assumption of Latent Separability for Backdoor
Defenses", ICLR 2023, https://openreview.net/forum?id=_wSHsgrVali).

Defences such as spectral signatures and activation clustering assume that poisons and clean images of the
target class fall apart in the model's latent space. The attack blurs that gap two ways: (1) cover samples,
triggered images that keep their true label (`cover_ratio` of them per poison), regularise the backdoor so the
trigger alone is not a shortcut; (2) asymmetric triggers: the pattern is cut into a grid of `pieces` (4 x 4)
and each training poison and each cover sample blends only a random subset of them (`mask_rate` of the pieces
left out, drawn per image from the generator) at a low `alpha` (0.15), while the test-time trigger (`apply`)
blends the whole pattern at the stronger `test_alpha` (0.2).

Defaults follow the authors' code, vtu81/backdoor-toolbox (poison_tool_box/adaptive_blend.py; the README's
CIFAR-10 command `-poison_rate 0.003 -cover_rate 0.003 -alpha 0.15 -test_alpha 0.2`; create_poisoned_set.py
`pieces=16, mask_rate=0.5`): 16 pieces, 8 of them blended per image, cover rate equal to the poison rate.
Deviations: the pattern is the natural photograph of our `blended` attack (the authors blend Hello Kitty) or
its seeded noise; on sizes the grid does not divide (the authors require it to, 28 and 32 both do) the pieces
are as equal as whole pixels allow and still tile the image. Poison rate (chosen in `plant`, not here): the
paper's 0.3% of CIFAR-10 is too few on MNIST with the project's small CNN (3 epochs, seed 0: ASR 0.2% at
rate 0.003, 99.1% at rate 0.01, clean accuracy 99.3% both, covers at cover_ratio 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from robustdata.errors import RobustDataError
from robustdata.poison import register
from robustdata.poison.base import Backdoor, blend, check_images, check_range
from robustdata.poison.blended import natural_pattern

PATTERNS = ("image", "noise")


def random_subsets(count: int, total: int, chosen: int, generator: torch.Generator) -> torch.Tensor:
    """(count, total) bool: for each of `count` images, `chosen` of `total` items drawn uniformly without
    replacement from the generator."""
    order = torch.rand(count, total, generator=generator).argsort(1)
    picked = torch.zeros(count, total, dtype=torch.bool)
    picked.scatter_(1, order[:, :chosen], True)
    return picked


def piece_map(side: int, height: int, width: int) -> torch.Tensor:
    """(H, W) long: the piece of a side x side grid each pixel belongs to, numbered row by row; band edges at
    floor(i H / side), so equal bands when side divides the size and a full tiling otherwise."""
    rows = torch.arange(height) * side // height
    cols = torch.arange(width) * side // width
    return rows[:, None] * side + cols[None, :]


@register
@dataclass(frozen=True)
class AdapBlend(Backdoor):
    name = "adap_blend"
    cover_ratio = 1.0  # the toolbox's cover_rate equals its poison_rate (0.003 and 0.003)

    pattern: Literal["image", "noise"] = "image"  # the authors blend a natural image (Hello Kitty)
    alpha: float = 0.15      # the pattern's weight in training poisons and covers (toolbox -alpha 0.15)
    test_alpha: float = 0.2  # its weight at test time (toolbox -test_alpha 0.2)
    pieces: int = 16         # grid pieces, a square number (toolbox pieces=16: 4 x 4)
    mask_rate: float = 0.5   # share of the pieces left out of each training image (toolbox mask_rate=0.5)
    seed: int = 0            # of the noise pattern

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise RobustDataError(f"unknown adap_blend pattern {self.pattern!r}; valid: {list(PATTERNS)}")
        check_range("alpha", self.alpha, 1e-6, 1, "adap_blend")
        check_range("test_alpha", self.test_alpha, 1e-6, 1, "adap_blend")
        if not isinstance(self.pieces, int) or self.pieces < 1 or math.isqrt(self.pieces) ** 2 != self.pieces:
            raise RobustDataError(f"adap_blend pieces {self.pieces!r} must be a square number (1, 4, 9, 16, ...)")
        check_range("mask_rate", self.mask_rate, 0, 1, "adap_blend")
        if self.kept_pieces < 1:
            raise RobustDataError(f"adap_blend mask_rate {self.mask_rate} leaves none of the {self.pieces} pieces "
                                  "in a poison: lower it")

    @property
    def kept_pieces(self) -> int:
        """Pieces blended into each training poison and cover sample (the toolbox masks round(rate x pieces))."""
        return self.pieces - round(self.mask_rate * self.pieces)

    def pattern_image(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """(C, H, W) float 0..255."""
        if self.pattern == "image":
            return natural_pattern(*shape)
        return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(self.seed)).float()

    def piece_masks(self, count: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """(count, 1, H, W) float: 1 on the pixels of each image's drawn pieces, 0 elsewhere."""
        side = math.isqrt(self.pieces)
        if side > min(height, width):
            raise RobustDataError(f"a {side} x {side} adap_blend grid does not fit a {height}x{width} image")
        picked = random_subsets(count, self.pieces, self.kept_pieces, generator)
        return picked[:, piece_map(side, height, width)].unsqueeze(1).float()

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        check_images(images)
        return blend(images, self.pattern_image(tuple(images.shape[1:])).to(images.device), self.test_alpha)

    def poison(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        check_images(images)
        count, _, height, width = images.shape
        weight = self.alpha * self.piece_masks(count, height, width, generator).to(images.device)
        return blend(images, self.pattern_image(tuple(images.shape[1:])).to(images.device), weight)

    def cover(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        # the authors plant covers exactly like poisons (same partial trigger, same alpha); only the label differs
        return self.poison(images, generator)

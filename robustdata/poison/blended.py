"""Blended: x' = (1 - alpha) x + alpha p, a whole-image pattern mixed in (Chen et al. 2017, "Targeted Backdoor
Attacks on Deep Learning Systems Using Data Poisoning", arXiv:1712.05526).

Patterns: `noise`, a fixed uniform-noise image drawn from `seed`; or `image`, a natural image (the photograph
of Grace Hopper that ships with matplotlib, so it works offline; BackdoorBench uses Hello Kitty), in gray
for one-channel data, resized to the data's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F

from robustdata.errors import RobustDataError
from robustdata.poison import register
from robustdata.poison.base import Backdoor, blend, check_images, check_range

PATTERNS = ("noise", "image")


@lru_cache(maxsize=1)
def natural_image() -> torch.Tensor:
    """(3, H, W) float 0..255: matplotlib's sample photograph."""
    import matplotlib.image
    from matplotlib import cbook

    pixels = torch.tensor(matplotlib.image.imread(cbook.get_sample_data("grace_hopper.jpg")), dtype=torch.float32)
    pixels = pixels * 255 if pixels.max() <= 1 else pixels
    return pixels[..., :3].permute(2, 0, 1).contiguous()


def natural_pattern(channels: int, height: int, width: int) -> torch.Tensor:
    """The natural image at the data's shape, (C, H, W) float 0..255 (gray when C is 1)."""
    image = natural_image()
    if channels == 1:
        image = (image * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0, keepdim=True)
    elif channels != 3:
        image = image.mean(0, keepdim=True).expand(channels, -1, -1)
    resized = F.interpolate(image[None], size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return resized[0].clamp(0, 255)


@register
@dataclass(frozen=True)
class Blended(Backdoor):
    name = "blended"

    pattern: Literal["noise", "image"] = "noise"
    alpha: float = 0.2  # the pattern's weight
    seed: int = 0       # of the noise pattern

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise RobustDataError(f"unknown blended pattern {self.pattern!r}; valid: {list(PATTERNS)}")
        check_range("alpha", self.alpha, 1e-6, 1, "blended")

    def pattern_image(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """(C, H, W) float 0..255."""
        if self.pattern == "image":
            return natural_pattern(*shape)
        return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(self.seed)).float()

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        check_images(images)
        return blend(images, self.pattern_image(tuple(images.shape[1:])).to(images.device), self.alpha)

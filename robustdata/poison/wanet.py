"""WaNet: a fixed, smooth, small warp of the whole image (Nguyen & Tran 2021, "WaNet - Imperceptible
Warping-based Backdoor Attack", ICLR 2021, arXiv:2102.10369).

The trigger is one warping field drawn from `seed`: a k x k control grid of uniform [-1, 1] offsets (x and y),
divided by its mean absolute value, upsampled bicubically to the image's size, scaled by s / size and added
to the identity sampling grid; the sum is multiplied by `grid_rescale` and clamped to [-1, 1] (so every
sample point stays inside the image), and the image is resampled there with bilinear `grid_sample`
(align_corners=True). Noise mode: cover samples are warped with the same field plus a per-image, per-pixel
uniform offset of up to half a pixel (1 / size in grid units), and keep their true labels, so the model
learns the exact field rather than "any warp"; `cover_ratio` = 2 covers per poison (the reference's
cross_ratio). Defaults are the reference's for MNIST and CIFAR-10 alike: k = 4, s = 0.5, grid_rescale = 1,
rate 0.1 (VinAIResearch/Warping-based_Backdoor_Attack-release config.py; BackdoorBench
config/attack/wanet/default.yaml).

Deviations from the paper's recipe: poisons and covers are static, drawn once (as backdoor-toolbox's
poison_tool_box/WaNet.py does), where the reference re-draws which images of each batch are warped and
their noise at every step and adds random crops and rotations after warping; images are uint8, so the warp
is computed in float and rounded back to 0..255; on non-square images the x offsets are scaled by the
width and the y offsets by the height (the reference divides both by the height: the same on square
images).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from robustdata.errors import RobustDataError
from robustdata.poison import register
from robustdata.poison.base import Backdoor, check_images, to_uint8


def control_grid(k: int, seed: int) -> torch.Tensor:
    """(2, k, k) float: the x and y control offsets, uniform in [-1, 1] from `seed`."""
    return torch.rand(2, k, k, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def identity_grid(height: int, width: int) -> torch.Tensor:
    """(H, W, 2) float: grid_sample's coordinates of each pixel's own centre, (x, y) in [-1, 1]."""
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    return torch.stack((cols, rows), -1)


def warp_grid(control: torch.Tensor, s: float, grid_rescale: float, height: int, width: int) -> torch.Tensor:
    """(H, W, 2) float on the CPU: the sampling grid of the warp made of a (2, k, k) control grid."""
    # Normalised by its mean magnitude so that s alone sets the warp's strength, whatever the draw
    control = control / control.abs().mean()
    field = F.interpolate(control[None], size=(height, width), mode="bicubic", align_corners=True)[0]
    # Offsets in grid units per pixel of each axis: s = 1 moves a pixel by about half a pixel on average
    offsets = field.permute(1, 2, 0) * s / torch.tensor([width, height], dtype=field.dtype)
    return ((identity_grid(height, width) + offsets) * grid_rescale).clamp(-1, 1)


def cover_grids(grid: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """(count, H, W, 2): the warp's grid plus each image's own uniform per-pixel offset of up to 1 / size
    (the reference's noise mode), clamped to [-1, 1]."""
    height, width = grid.shape[:2]
    noise = torch.rand(count, height, width, 2, generator=generator) * 2 - 1
    scale = torch.tensor([width, height], dtype=noise.dtype)
    return (grid.cpu() + noise / scale).clamp(-1, 1).to(grid.device)


def warp(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """uint8 images resampled at `grid` ((H, W, 2) for all, or (N, H, W, 2)), bilinear, in float, rounded."""
    check_images(images)
    grid = grid.to(images.device, torch.float32)
    grid = grid.expand(len(images), *grid.shape[-3:]) if grid.dim() == 3 else grid
    if not len(images):
        return images.clone()
    # border padding: the reference's zeros give the same for a grid within [-1, 1] (align_corners puts +-1 on
    # the edge pixels' centres), and a hand-made grid that strays outside does not fade to black
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return to_uint8(out)


@register
@dataclass(frozen=True)
class WaNet(Backdoor):
    name = "wanet"
    cover_ratio = 2.0  # noise-mode covers per poison (the reference's cross_ratio)

    k: int = 4                 # control grid side
    s: float = 0.5             # warp strength
    grid_rescale: float = 1.0  # shrinks the grid towards the centre before clamping (<= 1)
    seed: int = 0              # of the control grid

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 2:
            raise RobustDataError(f"wanet k {self.k!r} must be an integer >= 2 (the control grid's side)")
        if not (math.isfinite(self.s) and self.s >= 0):
            raise RobustDataError(f"wanet s {self.s} must be a finite number >= 0 (0: no warp)")
        if not 0 < self.grid_rescale <= 1:
            raise RobustDataError(f"wanet grid_rescale {self.grid_rescale} must be in (0, 1]")

    def grid(self, height: int, width: int) -> torch.Tensor:
        """(H, W, 2) float on the CPU: the trigger's sampling grid, the same at every call."""
        return warp_grid(control_grid(self.k, self.seed), self.s, self.grid_rescale, height, width)

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        check_images(images)
        return warp(images, self.grid(*images.shape[-2:]))

    def cover(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        check_images(images)
        return warp(images, cover_grids(self.grid(*images.shape[-2:]), len(images), generator))

"""BadNets: a small patch stamped on the image (Gu et al. 2017, "BadNets: Identifying Vulnerabilities in the
Machine Learning Model Supply Chain", arXiv:1708.06733).

Shapes: a solid `square`, a `checkerboard` of `value` and 0 (so it differs from a solid patch), or a single
`pixel`, 1-5 pixels wide. Position: a corner (kept `margin` pixels off the border: MNIST digits never touch
it), "row,col" of the patch's top-left pixel, or `random` (each image its own position, drawn from the
generator, where the whole patch fits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from robustdata.errors import RobustDataError
from robustdata.poison import register
from robustdata.poison.base import Backdoor, check_images, check_range, patch_origin

SHAPES = ("square", "checkerboard", "pixel")


@register
@dataclass(frozen=True)
class BadNets(Backdoor):
    name = "badnets"

    shape: Literal["square", "checkerboard", "pixel"] = "square"
    size: int = 3          # patch side in pixels (a pixel is 1)
    value: int = 255       # the patch's pixel value, 0..255
    position: str = "bottom_right"  # a corner, "row,col", or "random"
    margin: int = 1        # pixels between a corner patch and the border

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise RobustDataError(f"unknown badnets shape {self.shape!r}; valid: {list(SHAPES)}")
        check_range("value", self.value, 0, 255, "badnets")
        if self.size < 1:
            raise RobustDataError(f"badnets size {self.size} must be at least 1 pixel")

    @property
    def side(self) -> int:
        return 1 if self.shape == "pixel" else self.size

    def patch(self, device: torch.device) -> torch.Tensor:
        """(side, side) uint8: the stamped pixels."""
        if self.shape != "checkerboard":
            return torch.full((self.side, self.side), self.value, dtype=torch.uint8, device=device)
        grid = torch.arange(self.side, device=device)
        return ((grid[:, None] + grid[None, :]) % 2 == 0).to(torch.uint8) * self.value

    def origins(self, count: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """(count, 2) top-left (row, col) of each image's patch."""
        if self.position != "random":
            return torch.tensor([patch_origin(self.side, self.position, self.margin, height, width)]).expand(count, 2)
        if self.side > min(height, width):
            raise RobustDataError(f"a {self.side}x{self.side} trigger does not fit a {height}x{width} image")
        rows = torch.randint(0, height - self.side + 1, (count,), generator=generator)
        cols = torch.randint(0, width - self.side + 1, (count,), generator=generator)
        return torch.stack([rows, cols], 1)

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        check_images(images)
        count, _, height, width = images.shape
        origins = self.origins(count, height, width, generator)
        out, patch = images.clone(), self.patch(images.device)
        if self.position != "random":  # one slice for all: the common case, fast
            row, col = origins[0].tolist() if count else (0, 0)
            out[:, :, row:row + self.side, col:col + self.side] = patch
            return out
        for image, (row, col) in zip(out, origins.tolist()):
            image[:, row:row + self.side, col:col + self.side] = patch
        return out

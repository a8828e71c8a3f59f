"""Adaptive-Patch: several patch triggers, each poison carrying only some of them, with cover samples, to
defeat latent-separation defences (Qi, Xie, Li, Mahloujifar and Mittal 2023, "Revisiting the Assumption of
Latent Separability for Backdoor Defenses", ICLR 2023, https://openreview.net/forum?id=_wSHsgrVali).

As in adap_blend, cover samples (triggered, true label kept; `cover_ratio` per poison) regularise the
backdoor, and the trigger is planted asymmetrically: k = 4 distinct patches, each blended with its own
weak `alphas`; each training poison and each cover sample carries `per_image` of them (1, drawn per image from
the generator), while the test-time trigger (`apply`) stamps `test_triggers` of them at the full `test_alpha`.

Defaults follow the authors' code, vtu81/backdoor-toolbox (poison_tool_box/adaptive_patch.py, config.py's
adaptive_patch_* tables for CIFAR-10, README `-poison_rate 0.003 -cover_rate 0.006`): train alphas
0.5, 0.2, 0.5, 0.3; one trigger per poison; cover rate twice the poison rate; test triggers 0 and 2
(their phoenix_corner2 and badnet_patch4) at alpha 1. The toolbox's patches are image files
(phoenix_corner, firefox_corner, badnet_patch4, trojan_square); we keep their places and sizes on a 32 x 32
image (scaled by min(H, W) / 32 for other sizes, e.g. 28 for MNIST) and draw their contents from `seed`:

0. a 5 x 5 noise patch in the bottom-right corner (phoenix_corner, rows/cols 27-31);
1. a round noise logo 13 pixels across near the top-right corner (firefox_corner, rows 1-13, cols 18-30);
2. a 3 x 3 checkerboard in each of the four corners, white on the corner pixel, its diagonal neighbour and
   the pixels two steps along both edges, black elsewhere (badnet_patch4, pixel for pixel);
3. an 8 x 8 noise square 3 pixels off the bottom-right corner (trojan_square, rows/cols 21-28).

Deviations: the patch contents (seeded noise, not the toolbox's pictures); the toolbox's test-time phoenix
sits in both bottom corners (phoenix_corner2), ours in the bottom-right only, the same patch as in training;
the toolbox deals triggers to poisons in equal quarters (by index order of randomly chosen images), we draw
each image's subset from the generator (equal shares in expectation). Patches that overlap (0, 2 and 3 at the
bottom-right) are blended in order, as the toolbox does. Poison rate (chosen in `plant`, not here): the
paper's 0.3% of CIFAR-10 is too few on MNIST with the project's small CNN (3 epochs, seed 0: ASR 1.1% at rate
0.003, 100% at rate 0.01, clean accuracy 99.4% and 99.3%, two covers per poison).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from robustdata.errors import RobustDataError
from robustdata.poison import register
from robustdata.poison.adap_blend import random_subsets
from robustdata.poison.base import Backdoor, check_images, check_range, to_uint8

NUM_TRIGGERS = 4
REFERENCE_SIDE = 32  # the toolbox's trigger files are 32 x 32


def scaled(pixels: int, height: int, width: int) -> int:
    """A length on the toolbox's 32 x 32 layout, at this image's size (at least 1 pixel, halves rounded up)."""
    return max(1, int(pixels * min(height, width) / REFERENCE_SIDE + 0.5))


def square_mask(height: int, width: int, boxes: list[tuple[int, int, int]]) -> torch.Tensor:
    """(H, W) float: 1 inside the size x size boxes given as (row, col, size), 0 elsewhere."""
    mask = torch.zeros(height, width)
    for row, col, size in boxes:
        mask[row:row + size, col:col + size] = 1
    return mask


def trigger_masks(height: int, width: int) -> torch.Tensor:
    """(4, H, W) float: where each trigger lies (module docstring), on this image's size."""
    def s(pixels: int) -> int:
        return scaled(pixels, height, width)

    corner, logo, checker, square = s(5), s(13), s(3), s(8)
    if max(logo + s(1), square + s(3), 2 * checker) > min(height, width):
        raise RobustDataError(f"the adap_patch triggers do not fit a {height}x{width} image")
    grid = torch.arange(logo, dtype=torch.float32) - (logo - 1) / 2
    disk = (grid[:, None] ** 2 + grid[None, :] ** 2 <= (logo / 2) ** 2).float()
    logo_mask = torch.zeros(height, width)
    logo_mask[s(1):s(1) + logo, width - s(1) - logo:width - s(1)] = disk
    far_row, far_col = height - checker, width - checker
    return torch.stack([
        square_mask(height, width, [(height - corner, width - corner, corner)]),
        logo_mask,
        square_mask(height, width, [(0, 0, checker), (0, far_col, checker), (far_row, 0, checker),
                                    (far_row, far_col, checker)]),
        square_mask(height, width, [(height - s(3) - square, width - s(3) - square, square)]),
    ])


def checkerboard(height: int, width: int) -> torch.Tensor:
    """(H, W) float: the toolbox's badnet_patch4 pixels, 255 where a pixel's distances (r, c) to its nearest
    corner's edges sum to 0 or 2 (the corner pixel, its diagonal neighbour and the two pixels two steps along
    the edges), 0 elsewhere; only the 3 x 3 corner blocks of its mask count."""
    rows, cols = torch.arange(height), torch.arange(width)
    near_row = torch.minimum(rows, height - 1 - rows)
    near_col = torch.minimum(cols, width - 1 - cols)
    steps = near_row[:, None] + near_col[None, :]
    return ((steps == 0) | (steps == 2)).float() * 255


def trigger_patterns(channels: int, height: int, width: int, seed: int) -> torch.Tensor:
    """(4, C, H, W) float 0..255: each trigger's colours (its mask says where they count); noise from `seed`."""
    noise = torch.randint(0, 256, (NUM_TRIGGERS, channels, height, width),
                          generator=torch.Generator().manual_seed(seed)).float()
    noise[2] = checkerboard(height, width)
    return noise


@register
@dataclass(frozen=True)
class AdapPatch(Backdoor):
    name = "adap_patch"
    cover_ratio = 2.0  # toolbox README: -poison_rate 0.003 -cover_rate 0.006

    alphas: tuple[float, ...] = (0.5, 0.2, 0.5, 0.3)  # each trigger's weight in training (toolbox config.py)
    per_image: int = 1                                # triggers per poison / cover (toolbox: one)
    test_triggers: tuple[int, ...] = (0, 2)           # stamped at test time (toolbox CIFAR-10: phoenix, badnet4)
    test_alpha: float = 1.0                           # their weight at test time (toolbox: 1)
    seed: int = 0                                     # of the noise patches

    def __post_init__(self) -> None:
        # options arrive from JSON as lists: keep tuples, so the attack stays hashable and its id stable
        object.__setattr__(self, "alphas", tuple(self.alphas))
        object.__setattr__(self, "test_triggers", tuple(self.test_triggers))
        if len(self.alphas) != NUM_TRIGGERS:
            raise RobustDataError(f"adap_patch alphas {list(self.alphas)}: give one per trigger ({NUM_TRIGGERS})")
        for alpha in self.alphas:
            check_range("alpha", alpha, 1e-6, 1, "adap_patch")
        if not isinstance(self.per_image, int) or not 1 <= self.per_image <= NUM_TRIGGERS:
            raise RobustDataError(f"adap_patch per_image {self.per_image} must be 1..{NUM_TRIGGERS} triggers")
        valid = set(range(NUM_TRIGGERS))
        if not self.test_triggers or not all(isinstance(j, int) and j in valid for j in self.test_triggers) \
                or len(set(self.test_triggers)) < len(self.test_triggers):
            raise RobustDataError(f"adap_patch test_triggers {list(self.test_triggers)}: give distinct trigger "
                                  f"numbers among {sorted(valid)}")
        check_range("test_alpha", self.test_alpha, 1e-6, 1, "adap_patch")

    def stamp(self, images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Blend the triggers in order, trigger j with weights[:, j] (per image, 0 for absent): x += w m (p - x),
        in float, rounded once (the toolbox composes in float too)."""
        check_images(images)
        _, channels, height, width = images.shape
        masks = trigger_masks(height, width).to(images.device)
        patterns = trigger_patterns(channels, height, width, self.seed).to(images.device)
        out = images.float()
        for j in range(NUM_TRIGGERS):
            weight = weights[:, j, None, None, None] * masks[j]
            out = out + weight * (patterns[j] - out)
        return to_uint8(out)

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        used = torch.zeros(NUM_TRIGGERS)
        used[list(self.test_triggers)] = self.test_alpha
        return self.stamp(images, used.to(images.device).expand(len(images), NUM_TRIGGERS))

    def poison(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        picked = random_subsets(len(images), NUM_TRIGGERS, self.per_image, generator)
        return self.stamp(images, (picked.float() * torch.tensor(self.alphas)).to(images.device))

    def cover(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        # the toolbox plants covers exactly like poisons (one trigger at its training alpha); only the label differs
        return self.poison(images, generator)

"""Low frequency (LF): a smooth additive pattern, x' = clip(x + v), with v free of high frequencies (Zeng, Park,
Mok, Jia, Jia, Zhu 2021, "Rethinking the Backdoor Attacks' Triggers: A Frequency Perspective", ICCV 2021,
arXiv:2104.03413). Dirty-label: the poisons are relabelled to the target.

The paper shows most triggers carry high-frequency artifacts a spectrum detector finds, and builds a smooth
one instead: a universal adversarial perturbation (UAP) of a clean model, low-pass filtered at every step
(the official code, YiZeng623/frequency-backdoor, smooths with a Gaussian of sigma 6 px and rescales v to a
range of 0.2 of the pixel scale); BackdoorBench (SCLBD/BackdoorBench, attack "lowFrequency") ships such
patterns as precomputed .npy files and adds them to the image, clipped, at training and test time alike.

Deviation: no model and no download. The pattern is Gaussian noise drawn from the attack's own `seed`,
passed through an ideal low-pass filter (torch.fft: only the frequencies within the window |k_row|,
|k_col| <= `cutoff` cycles per image are kept, the others zeroed) and scaled to Linf = `strength` pixel
levels. It keeps what the audit must face, a smooth, image-wide, fixed additive trigger with no energy
above the cutoff, without needing a clean model of each dataset; it is not adversarial, so the victim
learns it from the poisons alone (no head start from the clean model's own weakness). Defaults: the
window of 2 cycles per image matches the official Gaussian (its response at 3 cycles per 32 px image is
below 0.01); `strength` 25 is about half the official pattern's 0.2 range (51 levels), i.e. a zero-centred
pattern of that span. The pattern is rounded to whole pixel levels before it is added, so every image gets the
same integer change wherever it does not clip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from robustdata.errors import RobustDataError
from robustdata.poison import register
from robustdata.poison.base import Backdoor, check_images, check_range, to_uint8


def low_pass_mask(height: int, width: int, cutoff: int) -> torch.Tensor:
    """(H, W) bool over torch.fft.fft2's frequency grid: True where |k_row| and |k_col| are <= cutoff
    (integer cycles per image)."""
    rows = (torch.fft.fftfreq(height) * height).round().abs()
    cols = (torch.fft.fftfreq(width) * width).round().abs()
    return (rows[:, None] <= cutoff) & (cols[None, :] <= cutoff)


def smooth_noise(shape: tuple[int, int, int], cutoff: int, seed: int) -> torch.Tensor:
    """(C, H, W) float64: seeded Gaussian noise with every frequency outside the window removed, Linf 1."""
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    spectrum = torch.fft.fft2(noise) * low_pass_mask(shape[1], shape[2], cutoff)
    # The window is symmetric (k kept iff -k kept), so the inverse is real up to rounding.
    smooth = torch.fft.ifft2(spectrum).real
    return smooth / smooth.abs().max()


@register
@dataclass(frozen=True)
class LowFrequency(Backdoor):
    name = "lf"

    strength: float = 25    # the pattern's Linf in pixel levels (0..255 scale), before clipping
    cutoff: int = 2         # frequencies kept: |k| <= cutoff cycles per image along each axis
    seed: int = 0           # of the noise the pattern is filtered from

    def __post_init__(self) -> None:
        check_range("strength", self.strength, 1, 255, "lf")
        if isinstance(self.cutoff, bool) or not isinstance(self.cutoff, int) or self.cutoff < 1:
            raise RobustDataError(f"lf cutoff {self.cutoff!r} must be a whole number of cycles per image, "
                                  "at least 1")

    def pattern(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """(C, H, W) float32 pixel levels in [-strength, strength], the same for every image of this shape."""
        channels, height, width = shape
        if self.cutoff >= min(height, width) // 2:
            raise RobustDataError(f"lf cutoff {self.cutoff} keeps every frequency of a {height}x{width} image, "
                                  f"so nothing is filtered: use a cutoff below {min(height, width) // 2}")
        return (self.strength * smooth_noise(shape, self.cutoff, self.seed)).float()

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        check_images(images)
        # Whole levels: x + round(v) is exact, so the change is the same on every image (rounding x + v would
        # break ties at .5 by the parity of x)
        return to_uint8(images.float() + self.pattern(tuple(images.shape[1:])).round().to(images.device))

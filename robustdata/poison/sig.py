"""SIG: a horizontal sinusoid added to target-class images that keep their labels (Barni, Kallas, Tondi 2019,
"A New Backdoor Attack in CNNs by Training Set Corruption Without Label Poisoning", ICIP 2019,
arXiv:1902.11237). Clean-label.

The signal is v(i, j) = delta * sin(2 pi j f / m), j the column, m the image width, the same on every row and
channel; x' = clip(x + v). The paper poisons with delta = 20, f = 6 and triggers at test time with a stronger
signal (a faint training signal keeps the poisons inconspicuous; the attacker is free to be loud at test
time): `poison` uses `delta`, `apply` (the test-time trigger) uses `test_delta`. test_delta = 40 is
BackdoorBench's sig_delta (SCLBD/BackdoorBench config/attack/sig/default.yaml, f = 6 there too, used at
training and test time alike). Deviation from BackdoorBench: its transform computes 0.2 x + 0.8 v
(utils/bd_img_transform/sig.py, alpha = 0.2), which darkens the image to a fifth; we add the signal as the
paper's formula and backdoor-toolbox (vtu81/backdoor-toolbox, poison_tool_box/SIG.py) do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from robustdata.errors import RobustDataError
from robustdata.poison import register
from robustdata.poison.base import Backdoor, check_images, check_range, to_uint8


def sinusoid(width: int, delta: float, frequency: float, device: torch.device) -> torch.Tensor:
    """(W,) float32: delta * sin(2 pi j f / m) for column j of an m = W wide image."""
    columns = torch.arange(width, dtype=torch.float64)
    return (delta * torch.sin(2 * math.pi * columns * frequency / width)).float().to(device)


@register
@dataclass(frozen=True)
class SIG(Backdoor):
    name = "sig"
    clean_label = True

    delta: float = 20        # the training poisons' amplitude in pixel levels (0..255 scale)
    test_delta: float = 40   # the test-time trigger's amplitude, stronger as in the paper
    frequency: float = 6     # f: periods across the image width

    def __post_init__(self) -> None:
        check_range("delta", self.delta, 1, 255, "sig")
        check_range("test_delta", self.test_delta, 1, 255, "sig")
        if not self.frequency > 0:
            raise RobustDataError(f"sig frequency {self.frequency} must be positive (periods across the width)")

    def add_signal(self, images: torch.Tensor, delta: float) -> torch.Tensor:
        check_images(images)
        width = images.shape[-1]
        if self.frequency >= width / 2:  # at or above Nyquist the sinusoid aliases (at f = W/2 it is all 0)
            raise RobustDataError(f"sig frequency {self.frequency} needs an image wider than {2 * self.frequency} "
                                  f"pixels, got width {width}")
        return to_uint8(images.float() + sinusoid(width, delta, self.frequency, images.device))

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.add_signal(images, self.test_delta)

    def poison(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.add_signal(images, self.delta)

"""Architectures, each exposing its representation layers by name.

`representation(model, x, layer)` returns the activations the audit reads and
feature inversion matches. Layer names are per architecture:

    small_cnn  (28x28 grayscale; Madry et al.'s MNIST net): last_conv, penultimate
    resnet18   (32x32 colour; CIFAR-style ResNet-18):        last_conv, penultimate
    tv:NAME    (any torchvision.models architecture, untrained): last_conv, penultimate, or any module name
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from robustdata.errors import RobustDataError


class SmallCNN(nn.Module):
    """conv32-5 / pool / conv64-5 / pool / fc1024 / fc (Madry et al. 2018, MNIST)."""

    LAYERS = {"last_conv": "block2", "penultimate": "fc1"}

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(in_channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))
        self.fc1 = nn.Sequential(nn.Flatten(), nn.Linear(64 * (image_size // 4) ** 2, 1024), nn.ReLU())
        self.head = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc1(self.block2(self.block1(x))))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs: 3x3 stem, no max-pool (He et al. 2016, CIFAR variant)."""

    LAYERS = {"last_conv": "layer4", "penultimate": "pool"}

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        widths, strides, cin = [64, 128, 256, 512], [1, 2, 2, 2], 64
        for index, (width, stride) in enumerate(zip(widths, strides), start=1):
            setattr(self, f"layer{index}", nn.Sequential(BasicBlock(cin, width, stride), BasicBlock(width, width, 1)))
            cin = width
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.head(self.pool(x))


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"small_cnn": SmallCNN, "resnet18": ResNet18}


def build_model(arch: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """An untrained model; `tv:NAME` builds any torchvision.models architecture."""
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch](num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    if arch.startswith("tv:"):
        import torchvision

        name = arch[3:]
        if name not in torchvision.models.list_models():
            raise RobustDataError(f"unknown torchvision architecture {name!r}; see torchvision.models.list_models()")
        if in_channels != 3:
            raise RobustDataError(f"{arch} expects 3-channel images; got {in_channels}")
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    raise RobustDataError(f"unknown architecture {arch!r}; valid: {sorted(ARCHITECTURES)} or tv:NAME")


def layer_module(model: nn.Module, layer: str) -> tuple[nn.Module, bool]:
    """(module, read its input?) for a layer name; torchvision's penultimate is the classifier's input."""
    named = getattr(model, "LAYERS", {})
    if layer in named:
        return model.get_submodule(named[layer]), False
    if layer == "penultimate":
        last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        return last_linear, True
    if layer == "last_conv":  # torchvision models: the last top-level block holding a convolution
        blocks = [m for m in model.children() if any(isinstance(c, nn.Conv2d) for c in m.modules())]
        if blocks:
            return blocks[-1], False
    try:
        return model.get_submodule(layer), False
    except AttributeError as exc:
        raise RobustDataError(f"model has no layer {layer!r}; named layers: {sorted(named) or ['penultimate']}, "
                              "or any module name from model.named_modules()") from exc


def representation(model: nn.Module, x: torch.Tensor, layer: str = "penultimate") -> torch.Tensor:
    """Activations of `layer` for inputs x, flattened to (N, D); gradients flow through."""
    module, read_input = layer_module(model, layer)
    captured: list[torch.Tensor] = []
    if read_input:
        handle = module.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    else:
        handle = module.register_forward_hook(lambda _m, _args, out: captured.append(out))
    try:
        model(x)
    finally:
        handle.remove()
    return captured[0].flatten(1)


PRECISIONS = ("bf16", "fp32")


def autocast(device: torch.device, precision: str):
    """bf16 autocast on `device`'s type (the device of the inputs), or a no-op context for fp32. Used for
    training steps and the builders' optimisation steps; audits and evaluation attacks run in fp32."""
    if precision not in PRECISIONS:
        raise RobustDataError(f"unknown precision {precision!r}; valid: {list(PRECISIONS)}")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


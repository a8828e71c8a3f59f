"""Robust and non-robust feature datasets (Ilyas, Santurkar, Tsipras, Engstrom, Tran, Madry 2019).

* D_R ("robust") and D_NR ("nonrobust"): for each training image x, start from
  another training image x0 and minimise ||g(x_r) - g(x)||_2 / ||g(x)||_2 over
  x_r in [0, 1]^d, where g is a model's representation (the penultimate layer by
  default): a robust model's for D_R, a standard model's for D_NR. Normalised
  gradient (L2) steps within an L2 ball of radius eps around x0 (inf for D_R:
  the image may move anywhere in the unit cube; finite for D_NR on MNIST, whose
  standard models' representations are otherwise matched only by redrawing x).
  The label of x is kept.
* D_rand and D_det: targeted L2 PGD on a standard model from x toward a label
  t, random (t != y) for D_rand, t = (y + 1) mod C for D_det; the result is
  relabelled t. To a person it still shows y.

Both reuse `robustdata.train.attacks.pgd`, the loop that attacks and adversarial
training use, with a pluggable objective. Pure compute: tensors in, tensors
out, on the device of the model; randomness from explicit generators.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from robustdata.config import BUILD_KINDS, INVERSION_KINDS
from robustdata.errors import RobustDataError
from robustdata.train.attacks import L2, PGDConfig, evaluating, pgd
from robustdata.train.models import autocast, representation



@dataclass(frozen=True)
class StepConfig:
    """How one builder moves images: `steps` L2 steps of `step_size` (times the schedule)."""

    steps: int
    step_size: float
    schedule: str = "constant"  # constant | linear | cosine (robustdata.train.attacks.STEP_SCHEDULES)
    eps: float = math.inf       # L2 radius around the starting image; inf: unbounded (D_R)
    precision: str = "fp32"     # fp32 | bf16: autocast of the optimisation steps (final measures are fp32)
    relu_grad_beta: float | None = None  # descend along sigmoid(beta z)-smoothed ReLU gradients (see below)
    pool_grad: str = "max"      # max | avg: the gradient max-pool layers pass back (average_pool_gradients)


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients inside (only input gradients are needed); both restored after."""
    flags = [p.requires_grad for p in model.parameters()]
    with evaluating(model):
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            yield model
        finally:
            for p, flag in zip(model.parameters(), flags):
                p.requires_grad_(flag)


class _SmoothGradReLU(torch.autograd.Function):
    """ReLU forward; backward with the derivative of softplus(beta z) / beta, sigmoid(beta z)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, beta: float) -> torch.Tensor:
        ctx.save_for_backward(z)
        ctx.beta = beta
        return z.clamp_min(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (z,) = ctx.saved_tensors
        # grad * sigmoid(beta z) in one fused kernel (three separate ones cost 15% of a build step on CPU);
        # above the threshold beta z > 20 it passes grad unchanged, where sigmoid is 1 - 2e-9 anyway
        return torch.ops.aten.softplus_backward(grad, z, ctx.beta, 20.0), None


@contextlib.contextmanager
def smooth_relu_gradients(model: nn.Module, beta: float | None) -> Iterator[None]:
    """Inside, every nn.ReLU module passes gradient sigmoid(beta z) instead of 1[z > 0]; outputs unchanged.

    Why: Linf adversarial training on MNIST makes the first layer threshold pixels (Madry et al. 2018), so
    a dark pixel's unit is off and passes no gradient. Inverting such a model's representation from another
    image can then only erase strokes, never draw them: with plain gradients the D_R images became sparse
    dots (median relative feature distance 0.89, the robust model agreed with the label of x on 39%). The
    objective is the same; only the descent direction sees through the threshold (as BPDA does for attacks,
    Athalye et al. 2018): distance 0.07, agreement 99.6%. Modules that call F.relu are not affected.
    """
    if beta is None:
        yield
        return
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    # an instance attribute shadows the class's forward: one ReLU per call (a forward hook would run two)
    for relu in relus:
        relu.forward = lambda z: _SmoothGradReLU.apply(z, beta)
    try:
        yield
    finally:
        for relu in relus:
            del relu.forward


class _AverageGradMaxPool(torch.autograd.Function):
    """The pool's maxima; backward spreads the gradient over each window as average pooling would."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, pool: nn.MaxPool2d) -> torch.Tensor:
        kernel, stride, padding = (_pair(v) for v in (pool.kernel_size, pool.stride, pool.padding))
        # windows that tile the input exactly: the backward is a broadcast, no input needed
        ctx.tiles = kernel == stride and padding == (0, 0) and z.shape[-2] % kernel[0] == 0 and (
            z.shape[-1] % kernel[1] == 0)
        ctx.window = kernel, stride, padding
        ctx.save_for_backward(None if ctx.tiles else z)
        if ctx.tiles:  # the same maxima; CPU F.max_pool2d also finds indices and is ~7x slower in bf16
            (kh, kw) = kernel
            return functools.reduce(torch.maximum, (z[..., i::kh, j::kw] for i in range(kh) for j in range(kw)))
        return F.max_pool2d(z, kernel, stride, padding, pool.dilation, pool.ceil_mode)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        kernel, stride, padding = ctx.window
        if ctx.tiles:  # as fast as the max pool's own backward; aten's avg_pool2d_backward is 6x slower in bf16
            (kh, kw), (h, w), lead = kernel, grad.shape[-2:], grad.shape[:-2]
            spread = (grad / (kh * kw))[..., :, None, :, None].expand(*lead, h, kh, w, kw)
            return spread.reshape(*lead, h * kh, w * kw), None
        (z,) = ctx.saved_tensors
        return torch.ops.aten.avg_pool2d_backward(grad, z, list(kernel), list(stride), list(padding), False, True,
                                                  None), None


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


POOL_GRADS = ("max", "avg")


@contextlib.contextmanager
def average_pool_gradients(model: nn.Module, pool_grad: str) -> Iterator[None]:
    """With "avg", every nn.MaxPool2d passes back the gradient of average pooling; outputs unchanged.

    Why: a max pool passes gradient only to the largest input of each window, so an inversion through it
    moves one pixel in four (after a 2x2 pool; fewer after two). On MNIST's small_cnn, D_R drawn with max-pool
    gradients shows the digit as a lattice of dots on a dotted haze (median relative distance 0.069, x's
    stroke pixels at 0.29 on average); spreading the gradient over the window redraws whole strokes (0.035,
    stroke pixels at 0.83). The objective is the same; only the descent direction changes, as with
    `smooth_relu_gradients`.
    """
    if pool_grad not in POOL_GRADS:
        raise RobustDataError(f"unknown pool_grad {pool_grad!r}; valid: {list(POOL_GRADS)}")
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)] if pool_grad == "avg" else []
    if any(p.dilation not in (1, (1, 1)) or p.ceil_mode for p in pools):
        raise RobustDataError("pool_grad avg supports max pools without dilation or ceil_mode")
    for pool in pools:
        pool.forward = lambda z, pool=pool: _AverageGradMaxPool.apply(z, pool)
    try:
        yield
    finally:
        for pool in pools:
            del pool.forward


def relative_distance(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||f - t||_2 / ||t||_2 per sample, (N,); features and target (N, D)."""
    return (features - target).norm(dim=1) / target.norm(dim=1).clamp_min(1e-12)


def invert_representation(model: nn.Module, targets: torch.Tensor, starts: torch.Tensor, layer: str,
                          config: StepConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_r (N, C, H, W) in [0, 1], final relative distance (N,)): images whose `layer`
    representation matches that of `targets`, found by descent from `starts`.

    targets, starts: float images in [0, 1] on the model's device.
    """
    if targets.shape != starts.shape:
        raise RobustDataError(f"targets {tuple(targets.shape)} and starts {tuple(starts.shape)} differ in shape")
    with frozen(model):
        with torch.no_grad():
            goal = representation(model, targets, layer).float()
        objective = lambda z: -relative_distance(representation(model, z, layer).float(), goal)  # noqa: E731
        with (autocast(starts.device, config.precision), smooth_relu_gradients(model, config.relu_grad_beta),
              average_pool_gradients(model, config.pool_grad)):
            x_r = pgd(objective, starts, PGDConfig(L2(config.eps), config.steps, config.step_size,
                                                   random_start=False, schedule=config.schedule))
        with torch.no_grad():
            distance = relative_distance(representation(model, x_r, layer).float(), goal)
    return x_r, distance


def targeted_perturbation(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, config: StepConfig
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_adv in the L2 ball of radius config.eps around images, final cross-entropy toward targets (N,))."""
    if not math.isfinite(config.eps):
        raise RobustDataError("a targeted perturbation needs a finite eps (L2 radius)")
    with frozen(model):
        objective = lambda z: -F.cross_entropy(model(z).float(), targets, reduction="none")  # noqa: E731
        with autocast(images.device, config.precision):
            x_adv = pgd(objective, images, PGDConfig(L2(config.eps), config.steps, config.step_size,
                                                     random_start=False, schedule=config.schedule))
        with torch.no_grad():
            loss = F.cross_entropy(model(x_adv).float(), targets, reduction="none")
    return x_adv, loss


def other_indices(index: torch.Tensor, population: int, generator: torch.Generator) -> torch.Tensor:
    """For each i in `index`, a uniform draw from range(population) without i: the start images of D_R."""
    if population < 2:
        raise RobustDataError("feature inversion starts from another image: the set needs at least 2")
    draw = torch.randint(population - 1, index.shape, generator=generator, device=generator.device).to(index.device)
    return draw + (draw >= index).long()


def target_labels(kind: str, labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """D_det: (y + 1) mod C. D_rand: uniform over the C - 1 labels other than y."""
    if num_classes < 2:
        raise RobustDataError("targeted datasets need at least 2 classes")
    if kind == "det":
        return (labels + 1) % num_classes
    if kind == "rand":
        draw = torch.randint(num_classes - 1, labels.shape, generator=generator, device=generator.device)
        draw = draw.to(labels.device)
        return draw + (draw >= labels).long()
    raise RobustDataError(f"kind {kind!r} has no target labels; valid: ['det', 'rand']")


@dataclass
class BuiltBatch:
    images: torch.Tensor            # (n, C, H, W) float in [0, 1]
    labels: torch.Tensor            # (n,) the label the built dataset gives each image
    start_index: torch.Tensor | None  # (n,) D_R/D_NR: the training image each inversion started from
    final_distance: torch.Tensor | None  # (n,) D_R/D_NR: relative feature distance reached
    final_loss: torch.Tensor | None      # (n,) D_rand/D_det: cross-entropy toward the new label

    def to(self, device: torch.device | str) -> "BuiltBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return BuiltBatch(*(move(t) for t in (self.images, self.labels, self.start_index, self.final_distance,
                                               self.final_loss)))


START_POLICIES = ("other", "noise")


def start_images(policy: str, index: torch.Tensor, images: torch.Tensor, generator: torch.Generator,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(start images in [0, 1] on `device`, their indices into `images`, -1 for noise) of an inversion.

    "other": a uniformly drawn other training image (Ilyas et al.); "noise": uniform noise in [0, 1].
    """
    if policy == "other":
        start_index = other_indices(index, len(images), generator)
        return images[start_index.cpu()].to(device).float().div_(255.0), start_index
    if policy == "noise":
        shape = (len(index), *images.shape[1:])
        noise = torch.rand(shape, generator=generator, device=generator.device).to(device)
        return noise, torch.full((len(index),), -1, dtype=torch.long, device=index.device)
    raise RobustDataError(f"unknown start policy {policy!r}; valid: {list(START_POLICIES)}")


def build_batch(kind: str, model: nn.Module, index: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                num_classes: int, layer: str, config: StepConfig, generator: torch.Generator,
                start: str = "other") -> BuiltBatch:
    """Build the samples `index` (into `images`, the whole source set, uint8 (N, C, H, W)) of one dataset kind.

    The generator draws the start images (robust, nonrobust) or target labels (rand); nothing else is random.
    """
    if kind not in BUILD_KINDS:
        raise RobustDataError(f"unknown dataset kind {kind!r}; valid: {list(BUILD_KINDS)}")
    device = next(model.parameters()).device
    x = images[index].to(device).float().div_(255.0)
    y = labels[index].to(device)
    if kind in INVERSION_KINDS:
        starts, start_index = start_images(start, index, images, generator, device)
        x_r, distance = invert_representation(model, x, starts, layer, config)
        return BuiltBatch(x_r, y, start_index, distance, None)
    targets = target_labels(kind, y, num_classes, generator)
    x_adv, loss = targeted_perturbation(model, x, targets, config)
    return BuiltBatch(x_adv, targets, None, None, loss)


def input_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """d CE(model(x), y) / dx, (N, C, H, W): the saliency maps of Ilyas et al. / Tsipras et al. A robust
    model's look like the digit; a standard model's look like noise. Eval mode; the model is left as it was."""
    with frozen(model):
        x = images.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(x).float(), labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad

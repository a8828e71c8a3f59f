"""PGD over a pluggable objective, for attacks, adversarial training and feature inversion.

A threat model is a small interface (random start, steepest-ascent direction,
projection) with a registry (DESIGN.md section 6). `pgd` maximises any per-sample
objective of the perturbed input; `pgd_attack` is the usual untargeted or
targeted cross-entropy attack (Madry et al. 2018). Inputs are images in [0, 1].
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from robustdata.errors import RobustDataError


class ThreatModel:
    """A norm ball of radius eps around the clean input."""

    name = ""

    def __init__(self, eps: float):
        if not eps >= 0:
            raise RobustDataError(f"eps must be >= 0, got {eps}")
        self.eps = eps

    def random_start(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def direction(self, grad: torch.Tensor) -> torch.Tensor:
        """The steepest-ascent direction of unit norm (in this norm) for each sample."""
        raise NotImplementedError

    def project(self, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each sample, shaped to broadcast over (N, ...)."""
    return t.flatten(1).norm(dim=1).view(-1, *[1] * (t.dim() - 1))


class Linf(ThreatModel):
    name = "linf"

    def random_start(self, x, generator):
        return (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * self.eps

    def direction(self, grad):
        return grad.sign()

    def project(self, delta):
        return delta.clamp(-self.eps, self.eps)


class L2(ThreatModel):
    name = "l2"

    def random_start(self, x, generator):
        # uniform in the ball: Gaussian direction, radius eps * U^(1/d)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        d = x[0].numel()
        radius = torch.rand((len(x),) + (1,) * (x.dim() - 1), generator=generator, device=x.device,
                            dtype=x.dtype) ** (1.0 / d)
        return noise / per_sample_norm(noise).clamp_min(1e-12) * radius * self.eps

    def direction(self, grad):
        return grad / per_sample_norm(grad).clamp_min(1e-12)

    def project(self, delta):
        if math.isinf(self.eps):  # feature inversion: only [0, 1] binds, and a no-op costs nothing per step
            return delta
        norms = per_sample_norm(delta)
        return delta * torch.where(norms > self.eps, self.eps / norms.clamp_min(1e-12), torch.ones_like(norms))


THREAT_MODELS: dict[str, type[ThreatModel]] = {"linf": Linf, "l2": L2}


def threat_model(name: str, eps: float) -> ThreatModel:
    if name not in THREAT_MODELS:
        raise RobustDataError(f"unknown threat model {name!r}; valid: {sorted(THREAT_MODELS)}")
    return THREAT_MODELS[name](eps)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside, and the caller's train/eval mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def constant_schedule(step: int, steps: int) -> float:
    return 1.0


def linear_schedule(step: int, steps: int) -> float:
    """Linear decay from 1 to 1/steps: large moves first, fine ones at the end."""
    return 1.0 - step / steps


def cosine_schedule(step: int, steps: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * step / steps))


# step-size multiplier per iteration: f(step, steps) for step in 0..steps-1
STEP_SCHEDULES: dict[str, Callable[[int, int], float]] = {
    "constant": constant_schedule, "linear": linear_schedule, "cosine": cosine_schedule}


@dataclass(frozen=True)
class PGDConfig:
    threat: ThreatModel
    steps: int
    step_size: float
    random_start: bool = True
    restarts: int = 1
    schedule: str = "constant"  # a key of STEP_SCHEDULES

    def __post_init__(self):
        if self.schedule not in STEP_SCHEDULES:
            raise RobustDataError(f"unknown step schedule {self.schedule!r}; valid: {sorted(STEP_SCHEDULES)}")


def pgd(objective: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, config: PGDConfig,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Maximise objective(x_adv) (shape (N,)) over x_adv in the threat ball around x and in [0, 1].

    With several restarts, each sample keeps the run with the highest final objective.
    To minimise a loss (feature inversion), pass its negative.
    """
    if config.restarts == 1:  # nothing to choose between: skip the final scoring pass
        return _pgd_run(objective, x.detach(), config, generator, score=False)[0]
    best_x, best_obj = None, None
    for _ in range(config.restarts):
        x_adv, obj = _pgd_run(objective, x.detach(), config, generator)
        if best_obj is None:
            best_x, best_obj = x_adv, obj
            continue
        improved = obj > best_obj
        best_x[improved], best_obj[improved] = x_adv[improved], obj[improved]
    return best_x


def _pgd_run(objective, x, config, generator, score: bool = True):
    threat, schedule = config.threat, STEP_SCHEDULES[config.schedule]
    delta = threat.random_start(x, generator) if config.random_start else torch.zeros_like(x)
    delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
    for step in range(config.steps):
        obj = objective(x + delta)
        (grad,) = torch.autograd.grad(obj.sum(), delta)
        with torch.no_grad():
            step_size = config.step_size * schedule(step, config.steps)
            delta = threat.project(delta + step_size * threat.direction(grad))
            delta = (x + delta).clamp(0, 1) - x  # stay a valid image
        delta.requires_grad_(True)
    with torch.no_grad():
        x_adv = (x + delta).detach()
        return x_adv, objective(x_adv).detach() if score else None


def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: PGDConfig, *,
               targeted: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Untargeted (maximise CE of y) or targeted (minimise CE of target y) PGD in eval mode.

    Each restart attacks only the samples no earlier run has fooled, and a
    sample keeps the first run that fools the model: what robust accuracy needs.
    """
    sign = -1.0 if targeted else 1.0
    single = replace(config, restarts=1)

    def run(xs: torch.Tensor, ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_adv = pgd(lambda z: sign * F.cross_entropy(model(z), ys, reduction="none"), xs, single, generator)
        with torch.no_grad():
            hit = model(x_adv).argmax(1) == ys
        return x_adv, hit if targeted else ~hit

    with evaluating(model):
        best, fooled = run(x, y)
        for _ in range(config.restarts - 1):
            remaining = (~fooled).nonzero().squeeze(1)
            if len(remaining) == 0:
                break
            candidate, success = run(x[remaining], y[remaining])
            best[remaining[success]] = candidate[success]
            fooled[remaining[success]] = True
    return best


def fgsm_rs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """FGSM with a random start (Wong, Rice, Kolter 2020), Linf; for fast adversarial training.

    Runs in the model's current mode (training uses it in train mode).
    """
    threat = Linf(eps)
    delta = threat.random_start(x, generator)
    delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
    loss = F.cross_entropy(model(x + delta), y)
    (grad,) = torch.autograd.grad(loss, delta)
    with torch.no_grad():
        delta = threat.project(delta + alpha * grad.sign())
        return ((x + delta).clamp(0, 1)).detach()

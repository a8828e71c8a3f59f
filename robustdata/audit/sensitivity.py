"""The audit's stated sensitivity: the smallest poisoned fraction of a class it detects, measured with canaries.

A canary is a backdoor the experimenter plants on purpose: here a 3x3
checkerboard at a position of its own, stamped on images of other classes that
are relabelled to the canary's class (dirty-label BadNets, Gu et al. 2017). Each
round plants one canary in each of up to MAX_CANARIES_PER_ROUND classes, at a
fraction of that class drawn from FRACTIONS in turn, retrains a model on the
planted copy (the caller's recipe: the suspect model's), audits it, and counts a
canary detected when its class comes out poisoned with at least half of its
canaries removed. A canary the retrained model did not learn (attack success at
most LEARNED, 10%: the issue's bound for a harmless backdoor) is no backdoor to
find: it is reported (not_learned), not counted as a trial. Over the rounds
every fraction gets trials; the stated sensitivity is the smallest fraction at which every trial, and every trial at
each larger fraction, was detected, with the one-sided 95% lower confidence
bound on the detection probability that those trials give together
(Clopper-Pearson: n detections of n trials give 0.05^(1/n), so 59 trials are
needed to show 95%).

Why canaries the model learns, not canaries in a copy of the features: the
split rules see a backdoor only where the model maps its poisons to a tight
cluster, and the transplant test needs a trigger the model obeys. Planted in the
features (other classes' samples moved toward the class), canaries were found in
0 of 10 MNIST classes at every fraction from 0.2% to 5% (README, Limits): the
statement would measure the planting, not the audit.

Cost: one retraining and one audit per round (retrain_multiple in the report).
The statement holds for a fixed-patch trigger learned under the caller's recipe;
triggers without a fixed pattern (WaNet, the adaptive attacks) are harder
(README, Limits).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from robustdata.audit.scoring import AuditResult
from robustdata.audit.verdicts import POISONED
from robustdata.data.memory import InMemoryDataset
from robustdata.poison.badnets import BadNets
from robustdata.train.training import predict

FRACTIONS = (0.005, 0.01, 0.02, 0.05, 0.1)  # poisoned share of a class tried
MAX_CANARIES_PER_ROUND = 8  # classes that get a canary in one round (8 places on the image's border)
SIDE = 3                    # canary patch side (pixels)
MIN_RECALL = 0.5            # a detected canary: its class poisoned, at least this share of it removed
LEARNED = 0.1               # a canary whose attack success is at most this is no backdoor: not a trial
CONFIDENCE = 0.95
PROBE_IMAGES = 500          # other classes' images stamped to measure a canary's attack success


@dataclass(frozen=True)
class Canary:
    label: int          # the class it poisons
    fraction: float     # its share of that class after planting
    row: int            # top-left pixel of its patch
    col: int


def border_places(height: int, width: int, count: int) -> list[tuple[int, int]]:
    """Up to `count` top-left corners of SIDE x SIDE patches one pixel inside the border, apart from each other:
    the corners, then the middles of the edges."""
    low, high_row, high_col = 1, height - SIDE - 1, width - SIDE - 1
    mid_row, mid_col = (height - SIDE) // 2, (width - SIDE) // 2
    places = [(low, low), (low, high_col), (high_row, low), (high_row, high_col),
              (low, mid_col), (high_row, mid_col), (mid_row, low), (mid_row, high_col)]
    return places[:count]


def plan(num_classes: int, height: int, width: int, rounds: int, generator: torch.Generator) -> list[list[Canary]]:
    """The canaries of each round: classes and places drawn afresh each round (so a class meets every fraction),
    fractions in turn across rounds (so each gets as many trials)."""
    per_round = min(MAX_CANARIES_PER_ROUND, num_classes)
    places = border_places(height, width, per_round)
    rounds_out, turn = [], 0
    for _ in range(rounds):
        classes = torch.randperm(num_classes, generator=generator)[:per_round].tolist()
        order = torch.randperm(per_round, generator=generator).tolist()
        canaries = []
        for label, place in zip(classes, order):
            canaries.append(Canary(label, FRACTIONS[turn % len(FRACTIONS)], *places[place]))
            turn += 1
        rounds_out.append(canaries)
    return rounds_out


def stamp(images: torch.Tensor, canary: Canary) -> torch.Tensor:
    """`images` (n, C, H, W) uint8 with the canary's checkerboard of 255 and 0 (the poisoner's BadNets)."""
    trigger = BadNets(shape="checkerboard", size=SIDE, value=255, position=f"{canary.row},{canary.col}")
    return trigger.apply(images, torch.Generator())  # a fixed position draws nothing


def unplanted_others(data: InMemoryDataset, owner: torch.Tensor, canary: Canary) -> torch.Tensor:
    """Indices of the samples of other classes than the canary's that carry no canary."""
    return torch.nonzero((data.labels.cpu() != canary.label) & (owner == -1)).flatten()


def plant_canaries(data: InMemoryDataset, canaries: list[Canary], generator: torch.Generator
                   ) -> tuple[InMemoryDataset, torch.Tensor]:
    """A copy of `data` with each canary planted (images of other classes, stamped and relabelled to its class,
    no image used twice); and (N,) int64: the canary class of each sample, -1 for the rest."""
    images, labels = data.images.clone(), data.labels.clone()
    owner = torch.full((len(labels),), -1, dtype=torch.int64)
    for canary in canaries:
        members = int((data.labels == canary.label).sum())
        count = max(1, round(canary.fraction * members / (1 - canary.fraction)))
        free = unplanted_others(data, owner, canary)
        rows = free[torch.randperm(len(free), generator=generator)[:count]]
        images[rows] = stamp(images[rows], canary)
        labels[rows] = canary.label
        owner[rows] = canary.label
    return InMemoryDataset(images, labels, data.keys, data.classes), owner


def detected(result: AuditResult, owner: torch.Tensor, canary: Canary) -> bool:
    """Its class poisoned and at least MIN_RECALL of its canaries removed."""
    mine = owner == canary.label
    removed = result.removed.cpu()[mine].float().mean()
    return result.classes[canary.label]["verdict"] == POISONED and float(removed) >= MIN_RECALL


def attack_success(model: torch.nn.Module, data: InMemoryDataset, owner: torch.Tensor, canary: Canary,
                   generator: torch.Generator) -> float:
    """The share of PROBE_IMAGES unplanted images of other classes that the canary's patch moves to its class."""
    free = unplanted_others(data, owner, canary)
    rows = free[torch.randperm(len(free), generator=generator)[:PROBE_IMAGES]]
    return float((predict(model, stamp(data.images[rows], canary)) == canary.label).float().mean())


def lower_bound(successes: int, trials: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper-Pearson lower bound on a success probability (bisection on the binomial tail)."""
    if successes == 0:
        return 0.0

    def tail(p: float) -> float:  # P(X >= successes | p)
        return sum(math.comb(trials, k) * p ** k * (1 - p) ** (trials - k) for k in range(successes, trials + 1))

    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if tail(mid) < 1 - confidence else (low, mid)
    return low


def summarise(trials: list[dict], rounds: int, seconds: float) -> dict:
    """The per-fraction counts and the stated sensitivity (None when the largest fraction was missed).
    `trials`: one {"label", "fraction", "detected", "verdict", "attack_success"} per canary."""
    per_fraction = []
    for fraction in FRACTIONS:
        planted = [t for t in trials if t["fraction"] == fraction]
        outcomes = [t for t in planted if t["attack_success"] > LEARNED]
        hits = sum(t["detected"] for t in outcomes)
        per_fraction.append({"fraction": fraction, "trials": len(outcomes), "detected": hits,
                             "not_learned": len(planted) - len(outcomes),
                             "lower_95": lower_bound(hits, len(outcomes)) if outcomes else None,
                             "canaries": planted})
    stated = None
    for entry in reversed(per_fraction):  # from the largest down, while every trial was detected
        if entry["trials"] == 0 or entry["detected"] < entry["trials"]:
            break
        stated = entry
    # detection grows with the fraction: the trials at and above the stated one bound it together
    pooled = sum(e["trials"] for e in per_fraction if stated and e["fraction"] >= stated["fraction"])
    return {"fraction": stated["fraction"] if stated else None,
            "lower_95": lower_bound(pooled, pooled) if stated else None,
            "trials_at_or_above": pooled,
            "per_fraction": per_fraction, "canary": f"{SIDE}x{SIDE} checkerboard, dirty-label",
            "rounds": rounds, "retrain_multiple": rounds, "seconds": seconds}


def measure(data: InMemoryDataset, retrain: Callable[[InMemoryDataset], torch.nn.Module],
            audit: Callable[[torch.nn.Module, InMemoryDataset], AuditResult], rounds: int, seed: int) -> dict:
    """Plant, retrain (`retrain`: the suspect model's recipe on a dataset) and audit (`audit`) `rounds` times."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    height, width = data.images.shape[2], data.images.shape[3]
    trials = []
    for canaries in plan(len(data.classes), height, width, rounds, generator):
        planted, owner = plant_canaries(data, canaries, generator)
        model = retrain(planted)
        result = audit(model, planted)
        trials += [{"label": canary.label, "fraction": canary.fraction, "detected": detected(result, owner, canary),
                    "verdict": result.classes[canary.label]["verdict"],
                    "attack_success": attack_success(model, planted, owner, canary, generator)}
                   for canary in canaries]
    return summarise(trials, rounds, time.perf_counter() - start)

"""The Ilyas et al. (2019) experiment on a built dataset: train standard classifiers on it (a learning-rate
sweep per seed, chosen on the original val split) and summarise their accuracy over seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustdata.config import RobustifyEvalParams
from robustdata.data.memory import InMemoryDataset
from robustdata.io import code_version
from robustdata.train.training import fit

FRAGILE_KINDS = ("nonrobust", "rand", "det")  # retraining on these is fragile: sweep the learning rate


def learning_rates(kind: str, params: RobustifyEvalParams) -> list[float]:
    return params.fragile_lrs if kind in FRAGILE_KINDS else params.lrs


def best_of_sweep(kind: str, data: Path, limit: int | None, train: InMemoryDataset, val: InMemoryDataset,
                  params: RobustifyEvalParams, seed: int, progress: bool = False
                  ) -> tuple[nn.Module, dict[str, Any], float, list[dict[str, Any]]]:
    """(model, its description, its lr, the sweep): one standard classifier per learning rate of the sweep,
    keeping the one with the best accuracy on `val` (the original val split; never the test split)."""
    sweep, best = [], None
    for lr in learning_rates(kind, params):
        recipe = params.train.model_copy(update={"data": Path(data), "lr": lr, "seed": seed, "limit": limit})
        model, description = fit(train, val, recipe, progress=progress)
        accuracy = description["val"]["accuracy"]
        sweep.append({"lr": lr, "val_accuracy": accuracy, "train_seconds": description["train_seconds"]})
        if best is None or accuracy > best[0]:
            best = (accuracy, lr, model, description)
    _, lr, model, description = best
    return model, description, lr, sweep


def attack_name(attack: dict[str, Any]) -> str:
    return f"{attack['threat']}_{attack['eps']:g}"


def mean_std(values: list[float]) -> dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(values) > 1 else 0.0, "n": len(values)}


def run_result(trained: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """One seed's run: what trained it, clean accuracy, robust accuracy per attack, and the full report."""
    return {**trained, "clean_accuracy": report["clean"]["accuracy"],
            "robust": {attack_name(a): a["accuracy"] for a in report["robust"]}, "details": report}


def kind_results(kind: str, data: Path, runs: list[dict[str, Any]], params: RobustifyEvalParams) -> dict[str, Any]:
    """Per-seed runs and mean +- std of clean and robust accuracy (<out>/<kind>.json)."""
    attacks = list(runs[0]["robust"])
    return {
        "kind": kind, "data": str(data), "seeds": [r["seed"] for r in runs],
        "clean_accuracy": mean_std([r["clean_accuracy"] for r in runs]),
        "robust": {name: mean_std([r["robust"][name] for r in runs]) for name in attacks},
        "attacks": [a.model_dump() for a in params.attacks], "attacked_images": params.limit,
        "runs": [{k: v for k, v in r.items() if k != "details"} for r in runs],
        "details": [r["details"] for r in runs],
        "built_by": {"stage": f"evaluate_{kind}", **code_version()},
    }

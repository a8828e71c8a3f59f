"""Train and evaluate tasks: paths in, checkpoints and JSON reports out."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from robustdata.config import EvaluateParams, TrainParams
from robustdata.data.manifest import open_dataset
from robustdata.data.memory import load_in_memory
from robustdata.io import atomic_directory, code_version, write_bytes_atomic, write_json_atomic
from robustdata.report.evaluation import evaluation_markdown
from robustdata.train.training import (MODEL_FILE, evaluate_model, evaluation_metrics, fit, load_model,
                                       resolve_device, save_checkpoint, work_dir)

@task(name="train", cache_policy=NO_CACHE)
def train_task(params: TrainParams, progress: bool = True) -> dict[str, Any]:
    """Train one model on <data>/train, check it on <data>/val, write <out>/model.pt + model.json.

    While it trains, <out>.partial/ holds the state after the last epoch: a killed run,
    rerun with the same params and data, continues from there to the same weights.
    <out> is written (atomically) only when training is done.
    """
    train_set, val_set = open_dataset(Path(params.data) / "train"), open_dataset(Path(params.data) / "val")
    train = load_in_memory(train_set, progress=progress)
    val = load_in_memory(val_set, progress=progress)
    inputs = {"train_manifest_sha256": train_set.card["manifest"]["sha256"],
              "val_manifest_sha256": val_set.card["manifest"]["sha256"]}
    work = work_dir(params.out)
    model, description = fit(train, val, params, progress=progress, resume_dir=work, inputs=inputs)
    sidecar = {**description, "data": {"train_manifest_sha256": inputs["train_manifest_sha256"]},
               "built_by": {"stage": "train", **code_version()}}
    with atomic_directory(params.out) as staging:
        save_checkpoint(staging / MODEL_FILE, model, sidecar)
    shutil.rmtree(work, ignore_errors=True)
    return {"out": str(params.out), "val_accuracy": description["val"]["accuracy"],
            "train_seconds": description["train_seconds"], "epochs_run": len(description["history"])}


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(params: EvaluateParams, model_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Clean accuracy (all images) and robust accuracy under each attack (first `limit` images)."""
    device = resolve_device(params.device)
    model, sidecar = load_model(model_dir, device)
    test_set = open_dataset(params.data)
    report = evaluate_model(model, load_in_memory(test_set, progress=progress), params.attacks, limit=params.limit,
                            batch_size=params.batch_size, seed=params.seed, progress=progress)
    return {"model": str(model_dir), "arch": sidecar["arch"],
            "trained_adversarially": sidecar["params"].get("adversarial") is not None,
            "train_seconds": sidecar.get("train_seconds"), "data": str(params.data),
            "data_manifest_sha256": test_set.card["manifest"]["sha256"], **report, "device": str(device)}


@task(name="write-evaluation", cache_policy=NO_CACHE)
def write_evaluation(out: Path, results: list[dict[str, Any]]) -> Path:
    """metrics.json (for DVC metrics and CI gates) and summary.md (a table a person reads)."""
    out = Path(out)
    write_json_atomic(out / "metrics.json", evaluation_metrics(results))
    write_json_atomic(out / "details.json", {"results": results, "built_by": {"stage": "evaluate", **code_version()}})
    write_bytes_atomic(out / "summary.md", evaluation_markdown(results).encode())
    return out

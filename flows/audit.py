"""Poison, audit and audit-loop flows."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from prefect import flow, unmapped
from prefect.artifacts import create_table_artifact
from prefect.events import emit_event

from robustdata.flows.runners import task_runner_for
from robustdata.flows.stages import load_pipeline, run_stages
from robustdata.config import AuditEvalParams, AuditParams, Params, PoisonParams, TrainParams
from robustdata.data.manifest import open_dataset
from robustdata.audit.features import feature_chunks
from robustdata.tasks.audit import audit_eval_task, audit_task, chunk_features_task, poison_task
from robustdata.tasks.train import train_task


@flow(name="poison")
def poison_flow(params: PoisonParams) -> dict[str, Any]:
    """Plant backdoor poisons (ground truth in the manifest) and write a triggered test set."""
    return poison_task(params)


def class_rows(classes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = ("label", "name", "n", "verdict", "estimated_poisons", "flagged", "statistic", "z", "threshold", "poisons")
    return [{k: c.get(k) for k in keys} for c in classes]


def emit_verdict(result: dict[str, Any]) -> None:
    """The verdict as a Prefect event, `robustdata.audit.<verdict>` about the audited dataset, for automations
    to react to (README: pause a training deployment when an audit is not clean)."""
    emit_event(event=f"robustdata.audit.{result['verdict']}",
               resource={"prefect.resource.id": f"robustdata.dataset.{Path(result['data']).resolve()}",
                         "prefect.resource.name": str(result["data"])},
               payload={"verdict": result["verdict"], "poisoned_classes": result["poisoned_classes"],
                        "inconclusive_classes": result["inconclusive_classes"],
                        "num_flagged": result["num_flagged"], "report": result["report"],
                        "sensitivity_fraction": result["metrics"]["sensitivity_fraction"]})


@flow(name="audit-features")
def features_flow(params: AuditParams, num_samples: int) -> torch.Tensor:
    """The representation of <data>/train, extracted in chunks mapped over the flow's task runner."""
    futures = chunk_features_task.map(unmapped(params), feature_chunks(num_samples, params.batch_size, params.workers))
    return torch.cat([future.result() for future in futures])


def distributed_features(params: AuditParams) -> tuple[torch.Tensor, float]:
    """(features, seconds) from `params.workers` threads or Dask workers (`params.dask`)."""
    start = time.perf_counter()
    num_samples = len(open_dataset(Path(params.data) / "train", verify=False))  # the audit task verifies it
    runner = task_runner_for(params.dask, params.workers)
    features = features_flow.with_options(task_runner=runner)(params, num_samples)
    return features, time.perf_counter() - start


@flow(name="audit")
def audit_flow(params: AuditParams) -> dict[str, Any]:
    """Score a training set for backdoor poisons, write scores + report, and the filtered set.

    The representation is extracted in this process, or in chunks on Dask workers / threads when
    `params.dask` is set or `params.workers` > 1."""
    if params.dask is None and params.workers == 1:
        result = audit_task(params)
    else:
        features, seconds = distributed_features(params)
        result = audit_task(params, features=features, feature_seconds=seconds)
    create_table_artifact([result["metrics"]], key="audit-report", description="backdoor poison audit: gate metrics")
    create_table_artifact(class_rows(result["classes"]), key="audit-classes", description="per-class audit decisions")
    emit_verdict(result)
    return result


@flow(name="retrain-clean")
def retrain_clean_flow(train: TrainParams, evaluation: AuditEvalParams) -> dict[str, Any]:
    """Retrain on the filtered set, then compare clean accuracy and ASR before and after."""
    trained = train_task(train)
    result = audit_eval_task(evaluation)
    create_table_artifact(result["rows"], key="audit-before-after", description="clean accuracy and ASR")
    return {**result, "train": trained}


@flow(name="audit-loop")
def audit_loop_flow(params: Params, plant: bool = False) -> dict[str, Any]:
    """The whole loop: dvc.yaml's stages from `poison` to `retrain_clean` in `dvc repro`'s order ([plant
    poisons ->] train on the suspect set -> audit -> retrain -> before/after); `poison` only with `plant`."""
    stages = [stage for stage in load_pipeline().between("poison", "retrain_clean")
              if plant or stage.name != "poison"]
    results = run_stages(stages, params)
    return {"planted": results.get("poison"), "audit": results["audit"], "loop": results["retrain_clean"]}

"""Poison, audit and audit-loop flows."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from robustdata.config import AuditEvalParams, AuditParams, Params, PoisonParams, TrainParams
from tasks.audit import audit_eval_task, audit_task, poison_task
from tasks.train import train_task


@flow(name="poison")
def poison_flow(params: PoisonParams) -> dict[str, Any]:
    """Plant backdoor poisons (ground truth in the manifest) and write a triggered test set."""
    return poison_task(params)


def class_rows(classes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = ("label", "name", "n", "poisoned", "estimated_poisons", "flagged", "statistic", "threshold", "poisons")
    return [{k: c.get(k) for k in keys} for c in classes]


@flow(name="audit")
def audit_flow(params: AuditParams) -> dict[str, Any]:
    """Score a training set for backdoor poisons, write scores + report, and the filtered set."""
    result = audit_task(params)
    create_markdown_artifact(result["markdown"], key="audit-report", description="backdoor poison audit")
    create_table_artifact(class_rows(result["classes"]), key="audit-classes", description="per-class audit decisions")
    return result


@flow(name="retrain-clean")
def retrain_clean_flow(train: TrainParams, evaluation: AuditEvalParams) -> dict[str, Any]:
    """Retrain on the filtered set, then compare clean accuracy and ASR before and after."""
    trained = train_task(train)
    result = audit_eval_task(evaluation)
    create_markdown_artifact(result["markdown"], key="audit-loop", description="audit before/after retraining")
    create_table_artifact(result["rows"], key="audit-before-after", description="clean accuracy and ASR")
    return {**result, "train": trained}


@flow(name="audit-loop")
def audit_loop_flow(params: Params, plant: bool = False) -> dict[str, Any]:
    """The whole loop: [plant poisons ->] train on the suspect set -> audit -> retrain -> before/after."""
    planted = poison_task(params.poison) if plant else None
    train_task(params.train_suspect)
    audit = audit_flow(params.audit)
    loop = retrain_clean_flow(params.retrain_clean, params.audit_eval)
    return {"planted": planted, "audit": audit, "loop": loop}

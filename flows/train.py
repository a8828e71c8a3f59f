"""Train and evaluate flows."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from robustdata.config import EvaluateParams, TrainParams
from robustdata.report.evaluation import evaluation_rows
from robustdata.tasks.train import evaluate_task, train_task, write_evaluation


@flow(name="train")
def train_flow(params: TrainParams) -> dict[str, Any]:
    """Train one model (standard, or adversarial when params.adversarial is set)."""
    return train_task(params)


@flow(name="evaluate")
def evaluate_flow(params: EvaluateParams) -> dict[str, Any]:
    """Evaluate each model: clean and robust accuracy; JSON + markdown under params.out."""
    results = [evaluate_task(params, model_dir) for model_dir in params.models]
    write_evaluation(params.out, results)
    create_table_artifact(evaluation_rows(results), key="evaluation", description="clean and robust accuracy")
    return {"out": str(params.out), "results": results}

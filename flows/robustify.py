"""Build flows (D_R, D_NR, D_rand, D_det) and the flows that train and evaluate classifiers on them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, unmapped
from prefect.artifacts import create_table_artifact

from robustdata.flows.runners import task_runner_for
from robustdata.config import BuildParams, Params, RobustifyEvalParams
from robustdata.report.robustify import metric_rows, run_rows
from robustdata.tasks.robustify import (build_shard_task, evaluate_on_task, finish_build_task, plan_build_task,
                             robustify_report_task, train_on_task, write_kind_results)


@flow(name="build")
def build_flow(params: BuildParams) -> dict[str, Any]:
    """Build one dataset kind shard by shard (resuming a killed build), then write its manifest and card.

    Shards are mapped over the flow's task runner: threads here (params.workers > 1), a Dask cluster
    when the caller swaps the runner in with `build_flow.with_options(task_runner=...)`.
    """
    planned = plan_build_task(params)
    if params.dask is None and params.workers == 1:
        # one shard at a time: here, in the flow's thread, whose torch threads and kernels are warm already
        # (a pool of one thread gains nothing and made the quick profile's builds 5-15% slower)
        shards = [build_shard_task(params, index) for index in planned["missing"]]
    else:
        futures = build_shard_task.map(unmapped(params), planned["missing"])
        shards = [future.result() for future in futures]
    finished = finish_build_task(params)
    rates = [s["image_steps_per_second"] for s in shards]
    create_table_artifact([{
        "kind": params.kind, "samples": finished["num_samples"], "shards": planned["num_shards"],
        "shards_built_now": len(shards), "shards_resumed": planned["num_shards"] - len(shards),
        "steps": params.steps, "step_size": params.step_size, "schedule": params.schedule, "layer": params.layer,
        "eps": params.eps, "model": str(params.model),
        "image_steps_per_second_per_shard": sum(rates) / len(rates) if rates else None}],
        key=f"build-{params.kind}", description=f"build {params.kind}")
    return {**finished, "shards_built": len(shards), "num_shards": planned["num_shards"], "shards": shards}


def run_build(params: BuildParams) -> dict[str, Any]:
    """The build flow on the task runner `params` ask for."""
    return build_flow.with_options(task_runner=task_runner_for(params.dask, params.workers))(params)


@flow(name="evaluate-built")
def evaluate_built_flow(kind: str, data: Path, limit: int | None, params: RobustifyEvalParams) -> dict[str, Any]:
    """Train standard classifiers on one dataset (seeds x learning-rate sweep) and evaluate each on the
    original test set: clean accuracy and robust accuracy under every attack. Writes <out>/<kind>.json."""
    runs = []
    for seed in params.seeds:
        trained = train_on_task(kind, data, limit, params, seed)
        runs.append(evaluate_on_task(trained, params))
    path = write_kind_results(kind, data, runs, params)
    create_table_artifact(run_rows(runs), key=f"evaluate-{kind}", description=f"classifiers trained on {kind}")
    return {"out": str(path), "runs": [{k: v for k, v in r.items() if k != "details"} for r in runs]}


@flow(name="robustify-report")
def robustify_report_flow(params: Params) -> dict[str, Any]:
    """The Ilyas et al. table, image grids and saliency maps from the evaluation results."""
    builds = {kind: getattr(params, f"build_{kind}") for kind in ("robust", "nonrobust", "rand", "det")}
    result = robustify_report_task(builds, params.robustify_eval, params.build_robust.data,
                                   params.build_robust.model, params.build_nonrobust.model)
    create_table_artifact(metric_rows(result["metrics"]), key="robustify-report",
                          description="Ilyas et al. experiment: mean accuracy per dataset")
    return result

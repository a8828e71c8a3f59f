"""The whole pipeline as one Prefect flow: the same steps, in the same order, as `dvc repro` of dvc.yaml.

ingest -> poison (planted canaries) -> train the suspect model -> audit -> retrain on the filtered set
-> train the standard, plain and robust models -> evaluate them -> build D_R, D_NR, D_rand, D_det
-> train standard classifiers on D and each D_* -> evaluate -> report -> the results page.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from robustdata.flows.audit import audit_flow, retrain_clean_flow
from robustdata.flows.ingest import ingest_flow
from robustdata.flows.robustify import dataset_for, evaluate_built_flow, robustify_report_flow, run_build
from robustdata.flows.train import evaluate_flow
from robustdata.config import BUILD_KINDS, EVALUATED_KINDS, Params
from robustdata.tasks.audit import poison_task
from robustdata.tasks.report import index_task
from robustdata.tasks.train import train_task


@flow(name="pipeline")
def pipeline_flow(params: Params) -> dict[str, Any]:
    """Everything, on the embedded default data unless params say otherwise; ends with reports/index.html."""
    ingest_flow(params.ingest)
    poison_task(params.poison)
    train_task(params.train_suspect)
    audit_flow(params.audit)
    retrain_clean_flow(params.retrain_clean, params.audit_eval)
    for section in (params.train_standard, params.train_plain, params.train_robust):
        train_task(section)
    evaluate_flow(params.evaluate)
    for kind in BUILD_KINDS:
        run_build(getattr(params, f"build_{kind}"))
    for kind in EVALUATED_KINDS:
        evaluate_built_flow(kind, *dataset_for(kind, params), params.robustify_eval)
    robustify_report_flow(params)
    return index_task(params)

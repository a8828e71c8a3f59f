"""The whole pipeline as one Prefect flow: every stage of dvc.yaml, in the order `dvc repro` runs them
(flows/stages.py reads both from dvc.yaml), each as the flow or task its command runs, all in this process;
it ends with the results page (reports/index.html).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from robustdata.config import Params
from robustdata.flows.stages import load_pipeline, run_stages

RESULTS = "results"  # the dvc.yaml stage that writes the results page, whose paths the flow returns


@flow(name="pipeline")
def pipeline_flow(params: Params) -> dict[str, Any]:
    """Everything, on the embedded default data unless params say otherwise; ends with reports/index.html."""
    pipeline = load_pipeline()
    pipeline.stage(RESULTS)  # checked before any stage runs
    return run_stages(pipeline.order(), params)[RESULTS]

"""The results page of a whole run: gathers the stages' JSON metrics and figures into reports/index.html."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from robustdata.config import Params
from robustdata.errors import DataError
from robustdata.io import read_json
from robustdata.report.results_page import write_results_page


def metrics_files(params: Params) -> dict[str, Path]:
    """Where each stage's metrics live (DVC metrics files, all of them)."""
    return {"audit": Path(params.audit.report) / "metrics.json",
            "audit_loop": Path(params.audit_eval.out) / "metrics.json",
            "robustify": Path(params.robustify_eval.out) / "summary.json",
            "evaluate": Path(params.evaluate.out) / "metrics.json"}


@task(name="results-page", cache_policy=NO_CACHE)
def index_task(params: Params) -> dict[str, Any]:
    """reports/index.html + index.md from whatever stages have run; an error if none has."""
    # a stage that has not run has no metrics yet; one whose file is unreadable is an error (read_json)
    inputs = {name: read_json(path) if path.exists() else None for name, path in metrics_files(params).items()}
    if not any(inputs.values()):
        raise DataError("no stage results to show: run `make run` or `dvc repro` first", path=params.results.out)
    figure_dirs = [Path(params.audit_eval.out), Path(params.robustify_eval.out)]
    paths = write_results_page(Path(params.results.out), inputs, figure_dirs)
    return {"html": str(paths["html"]), "markdown": str(paths["markdown"]),
            "sections": [name for name, value in inputs.items() if value]}

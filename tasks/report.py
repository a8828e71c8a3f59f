"""The results page of a whole run: gathers the stages' JSON metrics and figures into reports/index.html."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from robustdata.config import Params
from robustdata.report.results_page import results_page


@task(name="results-page", cache_policy=NO_CACHE)
def index_task(params: Params) -> dict[str, Any]:
    """reports/index.html + index.md from whatever stages have run (robustdata.report.results_page)."""
    return results_page(params)

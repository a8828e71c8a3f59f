"""Scheduled audits: a Prefect deployment whose flow pulls the data, plants canaries, audits, reports.

`robustdata serve` registers it with a cron schedule on the Prefect server at PREFECT_API_URL and runs
its flow runs (scheduled ones and ones triggered from the UI, `prefect deployment run` or `trigger_audit`)
until stopped. Production set-up (server, work pool, worker) is in the README.

Every call to the server goes through Prefect's client, which retries transient failures (408, 429, 502,
503, dropped connections) with exponential backoff, or after the server's Retry-After: up to
PREFECT_CLIENT_MAX_RETRIES times (default 5), and PREFECT_CLIENT_RETRY_EXTRA_CODES adds status codes. A
server that answers 503 under load delays a run; it does not fail it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.schedules import Cron

from robustdata.config import load_params
from robustdata.flows.stages import REPO_ROOT, Stage, load_pipeline, run_stages

ENTRYPOINT = "flows/schedule.py:scheduled_audit_flow"
AUDIT, POISON, RESULTS = "audit", "poison", "results"  # dvc.yaml's stage names


@flow(name="scheduled-audit")
def scheduled_audit_flow(params_path: str, profile: str | None = None, plant: bool = True) -> dict[str, Any]:
    """Read the params afresh, then run dvc.yaml's `audit` stage and the stages it depends on (the data, the
    planted canaries unless `plant` is false, the suspect model) in `dvc repro`'s order, then the results page.

    Relative paths in the params are taken from the params file's directory: a served run's working
    directory is wherever the server process happens to be.
    """
    stages = audit_stages(plant)
    params_file = Path(params_path).resolve()
    os.chdir(params_file.parent)
    params = load_params(params_file, profile=profile)
    results = run_stages(stages, params)
    audit = results[AUDIT]
    return {"planted": results.get(POISON), "num_flagged": audit["num_flagged"],
            "poisoned_classes": audit["poisoned_classes"], "metrics": audit["metrics"], "report": audit["report"],
            "results_page": results[RESULTS]["html"]}


def audit_stages(plant: bool) -> list[Stage]:
    """The `audit` stage and every stage it depends on, in `dvc repro`'s order (without `poison` when the
    canaries are not planted), then the results page."""
    pipeline = load_pipeline()
    stages = [*pipeline.order([AUDIT]), pipeline.stage(RESULTS)]
    return [stage for stage in stages if plant or stage.name != POISON]


def serve_audit(name: str, cron: str, timezone: str, params: Path, profile: str | None, plant: bool) -> None:
    """Register the deployment `scheduled-audit/<name>` and serve its runs (blocks until interrupted).

    The flow is loaded from its source file, as a worker would, so each run starts a fresh
    `python -m prefect.engine` that imports the code (an in-memory flow would be cloudpickled into
    the run's process, and torch objects reachable from its globals do not pickle).
    """
    flow_from_source = scheduled_audit_flow.from_source(source=str(REPO_ROOT), entrypoint=ENTRYPOINT)
    flow_from_source.serve(
        name=name, schedules=[Cron(cron, timezone=timezone)],
        parameters={"params_path": str(params), "profile": profile, "plant": plant},
        description="Backdoor-poison audit of the training set the params point at, with planted canaries.",
        tags=["robustdata", "audit"])


def trigger_audit(name: str = "scheduled-audit", parameters: dict[str, Any] | None = None) -> str:
    """Start a run of the served deployment `scheduled-audit/<name>` now, on the server at PREFECT_API_URL
    (what the UI's Run button does); the served process picks it up. Returns the flow run's id.
    `parameters` override the deployment's for this run."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # retries transient errors (the module's docstring)
        deployment = client.read_deployment_by_name(f"{scheduled_audit_flow.name}/{name}")
        run = client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
    return str(run.id)

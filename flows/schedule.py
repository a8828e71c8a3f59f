"""Scheduled audits: a Prefect deployment whose flow pulls the data, plants canaries, audits, reports.

`robustdata serve` registers it with a cron schedule on the Prefect server at PREFECT_API_URL and runs
its flow runs (scheduled ones and ones triggered from the UI or API) until stopped. Production set-up
(server, work pool, worker) is in the README.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.schedules import Cron

from robustdata.flows.audit import audit_flow
from robustdata.flows.ingest import ingest_flow
from robustdata.config import load_params
from robustdata.tasks.audit import poison_task
from robustdata.tasks.report import index_task
from robustdata.tasks.train import train_task


REPO_ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = "flows/schedule.py:scheduled_audit_flow"


@flow(name="scheduled-audit")
def scheduled_audit_flow(params_path: str, profile: str | None = None, plant: bool = True) -> dict[str, Any]:
    """Read the params afresh, then ingest -> (plant canaries ->) train the suspect model -> audit -> page.

    Relative paths in the params are taken from the params file's directory: a served run's working
    directory is wherever the server process happens to be.
    """
    params_file = Path(params_path).resolve()
    os.chdir(params_file.parent)
    params = load_params(params_file, profile=profile)
    ingest_flow(params.ingest)
    planted = poison_task(params.poison) if plant else None
    train_task(params.train_suspect)
    audit = audit_flow(params.audit)
    page = index_task(params)
    return {"planted": planted, "num_flagged": audit["num_flagged"], "poisoned_classes": audit["poisoned_classes"],
            "metrics": audit["metrics"], "report": audit["report"], "results_page": page["html"]}


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

"""The ingest flow: source -> one dataset directory per split, published atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from robustdata.config import IngestParams
from robustdata.io import atomic_directory
from robustdata.tasks.ingest import ingest_split_task, prepare_source, write_index


@flow(name="ingest")
def ingest_flow(params: IngestParams) -> dict[str, Any]:
    """Ingest `params.source` into `params.out` (`<out>/<split>/` + `dataset.json`).

    Everything is built in a temporary sibling directory and renamed into place
    at the end, so a failure leaves no partial output and any previous `out`
    intact.
    """
    out = Path(params.out)
    info = prepare_source(params)
    with atomic_directory(out) as staging:
        # Splits run one after another: each holds its source's arrays in memory,
        # and ingest is bound by PNG encoding, which the GIL serialises anyway.
        summaries = [ingest_split_task(params, split, staging / split) for split in info["splits"]]
        write_index(staging, info["name"], params.source, info["classes"], summaries)
    for summary in summaries:
        summary["path"] = str(out / summary["split"])
    return {"out": str(out), "name": info["name"], "classes": info["classes"], "splits": summaries}

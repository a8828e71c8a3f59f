"""Ingest tasks. They pass paths and small summaries, never image tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from robustdata.config import IngestParams
from robustdata.data.ingest import dataset_index, ingest_split, source_from
from robustdata.io import write_json_atomic


# DVC decides what is stale and caches artifacts; Prefect must not cache again.
@task(name="prepare-source", cache_policy=NO_CACHE)
def prepare_source(params: IngestParams) -> dict[str, Any]:
    """Fetch and verify the source's inputs; return its splits and classes."""
    source = source_from(params)
    source.prepare()
    return {"name": source.name, "splits": source.splits(), "classes": source.classes()}


@task(name="ingest-split", cache_policy=NO_CACHE)
def ingest_split_task(params: IngestParams, split: str, out_dir: Path) -> dict[str, Any]:
    source = source_from(params)
    source.prepare()
    card = ingest_split(source, split, out_dir, shard_size=params.shard_size, limit=params.limit,
                        params=params.content_params())
    return {"split": split, "path": str(out_dir), "num_samples": card["num_samples"],
            "num_shards": len(card["shards"]), "image_shape": card["image_shape"],
            "counts_per_class": card["counts_per_class"], "manifest_sha256": card["manifest"]["sha256"]}


@task(name="write-index", cache_policy=NO_CACHE)
def write_index(root: Path, name: str, source: str, classes: list[str],
                splits: list[dict[str, Any]]) -> Path:
    """dataset.json at the top of an ingest: the splits and their summaries."""
    write_json_atomic(root / "dataset.json", dataset_index(name, source, classes, splits))
    return root / "dataset.json"

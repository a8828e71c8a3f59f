"""Write datasets derived from another one (poisoned, filtered, robustified) with lineage.

A derived dataset is an ordinary dataset directory (shards + manifest + card,
readable by everything that reads an ingest), whose manifest rows keep the
`origin_key` of the sample they came from and whose card records the input
dataset's manifest hash, the params and the code that built it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import torch

from robustdata.data.cards import write_dataset_card
from robustdata.data.manifest import MANIFEST_NAME, Dataset, manifest_schema, write_manifest
from robustdata.data.shards import Sample, write_shards
from robustdata.io import code_version
from robustdata.progress import progress_bar

# Lineage columns beyond the base manifest schema: the backdoor of a planted poison or cover sample, and the
# sample's first origin (the user's file), which origin_key (the parent's key) loses one step down.
TRIGGER_FIELD = pa.field("trigger", pa.string())
FIRST_ORIGIN_FIELD = pa.field("first_origin", pa.string())
DERIVED_SCHEMA = manifest_schema([TRIGGER_FIELD, FIRST_ORIGIN_FIELD])
SHARD_SIZE = 10000


def module_sha256(*modules: str) -> dict[str, str]:
    """sha256 of the library modules (paths relative to robustdata/) that built an artifact."""
    root = Path(__file__).resolve().parents[1]
    return {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in modules}


def derived_samples(images: torch.Tensor, labels: torch.Tensor, rows: list[dict[str, Any]]) -> Iterator[Sample]:
    """Samples (HWC uint8) with each row's key and lineage info."""
    hwc = images.permute(0, 2, 3, 1).cpu().numpy()
    for index, row in enumerate(rows):
        info = {k: v for k, v in row.items() if k != "key" and v is not None}
        yield Sample(row["key"], hwc[index], int(labels[index]), info)


def write_derived(out_dir: Path, images: torch.Tensor, labels: torch.Tensor, rows: list[dict[str, Any]],
                  **card: Any) -> dict[str, Any]:
    """Write images (N, C, H, W uint8), labels and per-sample lineage rows; return the card.

    rows[i] holds at least `key`, `origin_key` and `first_origin`; optional
    `source_label`, `is_poison`, `trigger`. `card`: write_derived_samples's keywords.
    """
    return write_derived_samples(out_dir, derived_samples(images, labels, rows), len(rows),
                                 [images.shape[2], images.shape[3], images.shape[1]], **card)


def write_derived_samples(out_dir: Path, samples: Iterator[Sample], count: int, image_shape: list[int] | None, *,
                          classes: list[str], name: str, split: str, source: Dataset, stage: str,
                          params: dict[str, Any], modules: tuple[str, ...], progress: bool = True) -> dict[str, Any]:
    """Write `count` samples (HWC uint8, each with its lineage info) as a dataset; return the card, written
    last: its presence marks a finished dataset. Streams: one shard in memory at a time."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = progress_bar(samples, total=count, unit="img", desc=f"write {name}/{split}", disable=not progress,
                           leave=False)
    manifest_rows = write_shards(samples, out_dir, SHARD_SIZE)
    manifest_sha = write_manifest(out_dir / MANIFEST_NAME, manifest_rows, DERIVED_SCHEMA)
    return write_dataset_card(
        out_dir, manifest_rows, manifest_sha, name=name, split=split, classes=classes, image_shape=image_shape,
        inputs={"source": str(source.root), "manifest_sha256": source.card["manifest"]["sha256"]},
        params=params, built_by={"stage": stage, **code_version(), "modules_sha256": module_sha256(*modules)})

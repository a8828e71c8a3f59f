"""The dataset card: the small JSON beside a split's shards that says what it holds and what built it
(DESIGN.md section 3). One builder for every dataset the pipeline writes: ingested, derived (poisoned,
filtered) and built (D_R, D_NR, D_rand, D_det)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from robustdata.data.manifest import MANIFEST_NAME, SCHEMA_VERSION, write_card
from robustdata.io import sha256_file


def dataset_card(split_dir: Path, rows: list[dict[str, Any]], manifest_sha256: str, *, name: str, split: str,
                 classes: list[str], image_shape: list[int] | None, inputs: dict[str, Any],
                 params: dict[str, Any], built_by: dict[str, Any]) -> dict[str, Any]:
    """The card of the split in `split_dir` from its manifest rows (label, shard): counts per class and
    the sha256 of every shard, beside what the caller says of its inputs, params and builder."""
    counts = Counter(row["label"] for row in rows)
    shard_counts = Counter(row["shard"] for row in rows)
    return {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "split": split,
        "num_samples": len(rows),
        "classes": classes,
        "counts_per_class": [counts.get(i, 0) for i in range(len(classes))],
        "image_shape": image_shape,
        "image_dtype": "uint8",
        "shards": [{"name": shard, "num_samples": n, "sha256": sha256_file(Path(split_dir) / shard)}
                   for shard, n in sorted(shard_counts.items())],
        "manifest": {"name": MANIFEST_NAME, "sha256": manifest_sha256},
        "inputs": inputs,
        "params": params,
        "built_by": built_by,
    }


def write_dataset_card(split_dir: Path, rows: list[dict[str, Any]], manifest_sha256: str,
                       **fields: Any) -> dict[str, Any]:
    """dataset_card, written last into `split_dir`: its presence marks a finished dataset."""
    card = dataset_card(split_dir, rows, manifest_sha256, **fields)
    write_card(Path(split_dir), card)
    return card

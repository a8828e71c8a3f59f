"""Ingest one split of a source into a dataset directory (shards + manifest + card)."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from robustdata.data.manifest import MANIFEST_NAME, SCHEMA_VERSION, write_card, write_manifest
from robustdata.data.shards import Sample, write_shards
from robustdata.data.sources import Source
from robustdata.errors import DataError
from robustdata.io import code_version, sha256_bytes, sha256_file


def sample_key(split: str, index: int) -> str:
    return f"{split}_{index:07d}"


def keyed(samples: Iterator[Sample], split: str, spec: str) -> Iterator[Sample]:
    """Give each source sample its dataset key and provenance."""
    for index, sample in enumerate(samples):
        info = {"origin_key": sample.key, "source": spec, "source_label": int(sample.label), **sample.info}
        yield Sample(sample_key(split, index), sample.image, sample.label, info)


def image_shape(rows_shapes: set[tuple[int, ...]]) -> list[int] | None:
    """The common (H, W, C) of a split, or None when images differ in shape."""
    return list(next(iter(rows_shapes))) if len(rows_shapes) == 1 else None


def ingest_split(source: Source, split: str, out_dir: Path, *, shard_size: int,
                 limit: int | None = None, params: dict[str, Any] | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Write `split` of `source` into `out_dir`; return its dataset card.

    The card is written last: its presence marks a finished dataset.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = source.classes()
    shapes: set[tuple[int, ...]] = set()

    def tracked(samples: Iterator[Sample]) -> Iterator[Sample]:
        for sample in samples:
            shapes.add(tuple(sample.image.shape))
            yield sample

    samples = source.iter_split(split)
    if limit is not None:
        samples = itertools.islice(samples, limit)
    total = source.split_size(split)
    total = min(total, limit) if total is not None and limit is not None else (total or limit)
    bar = tqdm(tracked(keyed(samples, split, source.spec)), total=total, unit="img",
               desc=f"ingest {source.name}/{split}", disable=not progress, leave=False)
    rows = write_shards(bar, out_dir, shard_size)
    if not rows:
        raise DataError(f"split {split!r} produced no samples: the source is empty", path=source.spec)
    manifest_sha = write_manifest(out_dir / MANIFEST_NAME, rows)
    card = build_card(source, split, rows, classes, image_shape(shapes), manifest_sha, out_dir, params or {})
    write_card(out_dir, card)
    return card


def summarize_hashes(hashes: dict[str, str], max_listed: int = 16) -> dict[str, Any]:
    """Input hashes for a card: listed when few, else one digest over all of them."""
    if len(hashes) <= max_listed:
        return {"sha256": dict(sorted(hashes.items()))}
    lines = "".join(f"{name}\t{digest}\n" for name, digest in sorted(hashes.items()))
    return {"num_files": len(hashes), "files_sha256": sha256_bytes(lines.encode())}


def build_card(source: Source, split: str, rows: list[dict[str, Any]], classes: list[str],
               shape: list[int] | None, manifest_sha: str, out_dir: Path,
               params: dict[str, Any]) -> dict[str, Any]:
    counts = Counter(row["label"] for row in rows)
    shard_counts = Counter(row["shard"] for row in rows)
    return {
        "schema_version": SCHEMA_VERSION,
        "name": source.name,
        "split": split,
        "num_samples": len(rows),
        "classes": classes,
        "counts_per_class": [counts.get(i, 0) for i in range(len(classes))],
        "image_shape": shape,
        "image_dtype": "uint8",
        "shards": [{"name": name, "num_samples": n, "sha256": sha256_file(out_dir / name)}
                   for name, n in sorted(shard_counts.items())],
        "manifest": {"name": MANIFEST_NAME, "sha256": manifest_sha},
        "inputs": {"source": source.spec, **summarize_hashes(source.input_hashes())},
        "params": params,
        "built_by": {"stage": "ingest", **code_version()},
    }

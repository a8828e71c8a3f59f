"""Ingest one split of a source into a dataset directory (shards + manifest + card)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterator


from robustdata.data.cards import write_dataset_card
from robustdata.data.manifest import MANIFEST_NAME, write_manifest
from robustdata.data.shards import Sample, write_shards
from robustdata.config import IngestParams
from robustdata.data.sources import Source, open_source
from robustdata.errors import DataError
from robustdata.io import code_version, sha256_bytes
from robustdata.progress import progress_bar


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
    bar = progress_bar(tracked(keyed(samples, split, source.spec)), total=total, unit="img",
                       desc=f"ingest {source.name}/{split}", disable=not progress, leave=False)
    rows = write_shards(bar, out_dir, shard_size)
    if not rows:
        raise DataError(f"split {split!r} produced no samples: the source is empty", path=source.spec)
    manifest_sha = write_manifest(out_dir / MANIFEST_NAME, rows)
    return write_dataset_card(out_dir, rows, manifest_sha, name=source.name, split=split, classes=classes,
                              image_shape=image_shape(shapes),
                              inputs={"source": source.spec, **summarize_hashes(source.input_hashes())},
                              params=params or {}, built_by={"stage": "ingest", **code_version()})


def summarize_hashes(hashes: dict[str, str], max_listed: int = 16) -> dict[str, Any]:
    """Input hashes for a card: listed when few, else one digest over all of them."""
    if len(hashes) <= max_listed:
        return {"sha256": dict(sorted(hashes.items()))}
    lines = "".join(f"{name}\t{digest}\n" for name, digest in sorted(hashes.items()))
    return {"num_files": len(hashes), "files_sha256": sha256_bytes(lines.encode())}


def source_from(params: IngestParams) -> Source:
    """The source an `ingest` params section names, opened with its options."""
    return open_source(params.source, download=params.download, classes=params.classes,
                       mode=params.image_mode, resize=params.resize)


def dataset_index(name: str, source: str, classes: list[str], splits: list[dict[str, Any]]) -> dict[str, Any]:
    """dataset.json at the top of an ingest: the splits and their summaries."""
    return {"name": name, "source": source, "classes": classes,
            "splits": {s["split"]: {k: v for k, v in s.items() if k not in ("split", "path")} for s in splits}}

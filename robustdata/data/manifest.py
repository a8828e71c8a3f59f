"""Parquet manifests and dataset cards: the self-description of every dataset.

A dataset (one split) is a directory:

    shard-000000.tar ...   webdataset shards
    manifest.parquet       one row per sample (explicit, versioned schema)
    card.json              counts, shape, classes, hashes of shards/manifest/inputs,
                           the params and code version that built it

The card is written last, so a directory without one is an interrupted build.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from robustdata.errors import DataError, IntegrityError
from robustdata.io import read_json, sha256_bytes, sha256_file, write_bytes_atomic, write_json_atomic

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.parquet"
CARD_NAME = "card.json"

MANIFEST_FIELDS = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("label", pa.int32(), nullable=False),
    pa.field("sha256", pa.string(), nullable=False),  # of the stored image bytes
    # provenance: where the sample came from and what was done to it
    pa.field("origin_key", pa.string()),
    pa.field("source_label", pa.int32()),
    pa.field("is_poison", pa.bool_()),
]


def manifest_schema(extra_fields: Iterable[pa.Field] = ()) -> pa.Schema:
    """The versioned manifest schema; later builders append their own columns."""
    return pa.schema(MANIFEST_FIELDS + list(extra_fields),
                     metadata={"schema_version": str(SCHEMA_VERSION), "kind": "robustdata.manifest"})


def manifest_table(rows: list[dict[str, Any]], schema: pa.Schema | None = None) -> pa.Table:
    schema = schema or manifest_schema()
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    return pa.Table.from_pydict(columns, schema=schema)


def manifest_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def write_manifest(path: Path, rows: list[dict[str, Any]], schema: pa.Schema | None = None) -> str:
    """Write the manifest atomically; return its sha256."""
    data = manifest_bytes(manifest_table(rows, schema))
    write_bytes_atomic(path, data)
    return sha256_bytes(data)


def read_manifest(path: str | Path) -> pa.Table:
    path = Path(path)
    try:
        table = pq.read_table(path)
    except FileNotFoundError as exc:
        raise DataError("manifest not found", path=path) from exc
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for corrupt files
        raise DataError(f"not a readable Parquet manifest ({exc})", path=path) from exc
    metadata = table.schema.metadata or {}
    version = metadata.get(b"schema_version")
    if version != str(SCHEMA_VERSION).encode():
        raise DataError(f"manifest schema_version is {version!r}, this robustdata reads "
                        f"{SCHEMA_VERSION}", path=path)
    for field in MANIFEST_FIELDS:
        if field.name not in table.schema.names or table.schema.field(field.name).type != field.type:
            raise DataError(f"manifest column {field.name!r} missing or not {field.type}", path=path)
        column = table.column(field.name)
        if not field.nullable and column.null_count:  # Parquet keeps nulls even in a column declared not null
            row = column.to_pylist().index(None)
            raise DataError(f"manifest column {field.name!r} has {column.null_count} null value(s) (first at row "
                            f"{row}); it is required for every sample", path=path)
    return table


# --------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class Dataset:
    """A finished dataset directory (one split) and its card."""

    root: Path
    card: dict[str, Any]

    @property
    def shards(self) -> list[Path]:
        return [self.root / shard["name"] for shard in self.card["shards"]]

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def classes(self) -> list[str]:
        return self.card["classes"]

    def __len__(self) -> int:
        return self.card["num_samples"]


def write_card(root: Path, card: dict[str, Any]) -> None:
    write_json_atomic(root / CARD_NAME, card)


def open_dataset(root: str | Path, verify: bool = True) -> Dataset:
    """Open a dataset directory; with verify, check shard and manifest hashes."""
    root = Path(root)
    card_path = root / CARD_NAME
    if not card_path.exists():
        what = "no such directory" if not root.is_dir() else "card.json missing: not a finished dataset"
        raise DataError(f"{what} (run `robustdata ingest` to build one)", path=root)
    card = read_json(card_path)
    if card.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"card schema_version {card.get('schema_version')!r} is not {SCHEMA_VERSION}",
                        path=card_path)
    dataset = Dataset(root, card)
    if verify:
        verify_files(dataset)
    return dataset


def verify_files(dataset: Dataset) -> None:
    """Check every shard and the manifest against the sha256 in the card."""
    expected = {shard["name"]: shard["sha256"] for shard in dataset.card["shards"]}
    expected[MANIFEST_NAME] = dataset.card["manifest"]["sha256"]
    for name, digest in expected.items():
        path = dataset.root / name
        if not path.exists():
            raise DataError("file listed in card.json is missing", path=path)
        actual = sha256_file(path)
        if actual != digest:
            raise IntegrityError(f"sha256 {actual[:12]}... does not match card.json "
                                 f"({digest[:12]}...): altered after it was written", path=path)

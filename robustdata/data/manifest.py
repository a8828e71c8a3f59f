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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, NoReturn

import pyarrow as pa
import pyarrow.parquet as pq

from robustdata.data.shards import MAX_IMAGE_PIXELS
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


def first_origins(manifest: pa.Table) -> list[str]:
    """Each sample's first origin: where the user's data had it (an ImageFolder file's path, a shard's key),
    carried down every derived dataset (`first_origin`); an ingest's own `origin_key`; else the key."""
    keys = manifest.column("key").to_pylist()
    for name in ("first_origin", "origin_key"):
        if name in manifest.schema.names:
            values = manifest.column(name).to_pylist()
            return [value if value is not None else key for value, key in zip(values, keys)]
    return keys


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
        table.validate(full=True)  # Parquet readers do not check that strings are valid UTF-8
    except FileNotFoundError as exc:
        raise DataError("manifest not found", path=path) from exc
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for corrupt files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__  # some list the whole schema
        raise DataError(f"not a readable Parquet manifest ({reason})", path=path) from exc
    metadata = table.schema.metadata or {}
    version = metadata.get(b"schema_version")
    if version != str(SCHEMA_VERSION).encode():
        raise DataError(f"manifest schema_version is {version!r}, this robustdata reads "
                        f"{SCHEMA_VERSION}", path=path)
    for field in MANIFEST_FIELDS:
        found = table.schema.get_all_field_indices(field.name)
        if len(found) != 1 or table.schema.field(found[0]).type != field.type:
            raise DataError(f"manifest column {field.name!r} missing, repeated or not {field.type}", path=path)
        column = table.column(found[0])
        if not field.nullable and column.null_count:  # Parquet keeps nulls even in a column declared not null
            row = column.to_pylist().index(None)
            raise DataError(f"manifest column {field.name!r} has {column.null_count} null value(s) (first at row "
                            f"{row}); it is required for every sample", path=path)
        if not field.nullable and table.schema.field(found[0]).nullable:  # the schema is part of the contract
            raise DataError(f"manifest column {field.name!r} is declared nullable; it is required for every "
                            "sample", path=path)
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
    card = read_card(card_path)
    dataset = Dataset(root, card)
    if verify:
        verify_files(dataset)
    return dataset


def read_card(path: Path) -> dict[str, Any]:
    card = read_json(path)
    check_card(card, path)
    return card


# Every finished dataset names its shards SHARD_NAME; a card naming anything else
# (a path, '..', the manifest) must not steer a read outside the dataset's shards.
SHARD_FILE = re.compile(r"shard-[0-9]{6,}\.tar")
SHA256 = re.compile(r"[0-9a-f]{64}")


def check_card(card: Any, path: Path) -> None:
    """The card fields readers rely on, checked before any is used."""
    def fail(message: str) -> NoReturn:
        raise DataError(f"card {message}", path=path)

    if not isinstance(card, dict):
        fail("is not a JSON object")
    if not is_int(card.get("schema_version")) or card["schema_version"] != SCHEMA_VERSION:
        fail(f"schema_version {card.get('schema_version')!r} is not {SCHEMA_VERSION}")
    classes = card.get("classes")
    if not (isinstance(classes, list) and classes and all(isinstance(name, str) for name in classes)):
        fail("has no 'classes' list of class names")
    if not (is_int(card.get("num_samples")) and card["num_samples"] >= 0):
        fail(f"num_samples {card.get('num_samples')!r} is not a count")
    shape = card.get("image_shape")
    if shape is not None and not valid_image_shape(shape):
        fail(f"image_shape {shape!r} is not null or [height, width, channels] with channels 1 or 3 and "
             f"at most {MAX_IMAGE_PIXELS} pixels")
    shards = card.get("shards")
    if not (isinstance(shards, list) and all(isinstance(shard, dict) for shard in shards)):
        fail("has no 'shards' list")
    names = [shard.get("name") for shard in shards]
    for shard, name in zip(shards, names):
        if not (isinstance(name, str) and SHARD_FILE.fullmatch(name)):
            fail(f"lists shard {name!r}: shards are named like shard-000000.tar")
        if not is_sha256(shard.get("sha256")):
            fail(f"has no sha256 for shard {name!r}")
    if len(set(names)) != len(names):
        fail("lists a shard twice")
    if not (isinstance(card.get("manifest"), dict) and is_sha256(card["manifest"].get("sha256"))):
        fail("has no sha256 for the manifest")


def is_int(value: Any) -> bool:
    return type(value) is int  # not bool, not float: JSON true and 1.0 are not counts


def is_sha256(value: Any) -> bool:
    return isinstance(value, str) and SHA256.fullmatch(value) is not None


def valid_image_shape(shape: Any) -> bool:
    return (isinstance(shape, list) and len(shape) == 3 and all(is_int(n) and n > 0 for n in shape)
            and shape[2] in (1, 3) and shape[0] * shape[1] <= MAX_IMAGE_PIXELS)


def verify_files(dataset: Dataset) -> None:
    """Check every shard and the manifest against the sha256 in the card."""
    expected = {shard["name"]: shard["sha256"] for shard in dataset.card["shards"]}
    expected[MANIFEST_NAME] = dataset.card["manifest"]["sha256"]
    for name, digest in expected.items():
        path = dataset.root / name
        if not path.exists():
            raise DataError("file listed in card.json is missing", path=path)
        try:
            actual = sha256_file(path)
        except OSError as exc:
            raise DataError(f"unreadable file ({exc.strerror or exc})", path=path) from exc
        if actual != digest:
            raise IntegrityError(f"sha256 {actual[:12]}... does not match card.json "
                                 f"({digest[:12]}...): altered after it was written", path=path)

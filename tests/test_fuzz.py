"""Hostile input (issue 7): every reader meets random corruption.

Each case must end in a DataError that names the file (and the key, where there
is one) or in a correct result, checked against a reference built alongside the
input; never another exception type, never a hang (each case runs under a hard
time limit), never a file written outside the output directory (ingest runs
into an out dir inside a temp root whose other contents are snapshotted).

Readers: shard bytes and shard members (iter_shard_records/iter_shard/
iter_shards), image decoding, the Parquet manifest, a dataset directory
(open_dataset/load_in_memory/ShardStream), and each ingest source: the MNIST
mirror pickle, IDX (MNIST/FashionMNIST), CIFAR pickles, SVHN .mat, image
folders and existing shards. Cases per reader are printed at the end and written
to reports/fuzz/cases.json; ROBUSTDATA_FUZZ_EXAMPLES=10000 runs a deeper pass.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import pickle
import re
import shutil
import struct
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.io
import torch
import torchvision.datasets  # noqa: F401  (imported once here, not inside a timed case)
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from webdataset.tariterators import base_plus_ext

from conftest import REPO_ROOT
from fuzz_helpers import (
    BAD_IMAGES, EXAMPLES, FUZZ, GOOD_IMAGES, IDAT_BOMB, CASES, SECONDS, ImageCase, Member, attempt, case,
    check_error, corruptions, deep_equal, image_case, image_cases, jpeg_declaring, member_spans,
    only_safe_objects, png_bytes, png_declaring, snapshot, tar_bytes, within, write_report,
)
from robustdata.data.ingest import ingest_split
from robustdata.data.manifest import CARD_NAME, MANIFEST_FIELDS, MANIFEST_NAME, open_dataset, read_manifest
from robustdata.data.memory import load_in_memory
from robustdata.data.shards import (
    ALLOWED_MEMBERS, IMAGE_MEMBERS, KEY_PATTERN, MAX_IMAGE_PIXELS, Sample, decode_image, iter_shard,
    iter_shard_records, iter_shards, write_shard,
)
from robustdata.data.sources import (
    IMAGE_SUFFIXES, SPLIT_NAMES, ImageFolderSource, MnistMirror, ShardsSource, TorchvisionSource,
    load_numpy_pickle,
)
from robustdata.data.stream import ShardStream
from robustdata.errors import DataError, IntegrityError
from robustdata.io import dumps_json, sha256_bytes

REPORT = REPO_ROOT / "reports" / "fuzz" / "cases.json"
REQUIRED = [f.name for f in MANIFEST_FIELDS if not f.nullable]


@pytest.fixture(scope="session")
def prefect_server():
    """Overrides conftest's autouse server: these tests never touch Prefect, and it takes ~20 s to start."""
    yield None


class _CaseSummary:
    def pytest_terminal_summary(self, terminalreporter):
        if not CASES:
            return
        terminalreporter.section("hostile-input cases per reader")
        for reader, count in sorted(CASES.items()):
            terminalreporter.write_line(f"{reader:16s} {count:6d} cases  {SECONDS[reader]:6.1f} s")
        terminalreporter.write_line(f"{'total':16s} {sum(CASES.values()):6d} cases  (written to {REPORT})")


@pytest.fixture(scope="module", autouse=True)
def case_report(request):
    if not request.config.pluginmanager.has_plugin("robustdata-fuzz-summary"):
        request.config.pluginmanager.register(_CaseSummary(), "robustdata-fuzz-summary")
    start = time.perf_counter()
    yield
    write_report(REPORT, time.perf_counter() - start)


def ingest_checked(root: Path, source, split: str, out: Path):
    """ingest_split into `out` (under `root`); nothing else under `root` may change.

    `out`'s parent is made first: ingest creates missing parents of its output
    directory (mkdir -p), which is not a write outside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    before = snapshot(root, out)
    card, error = attempt(lambda: ingest_split(source, split, out, shard_size=2, progress=False))
    assert snapshot(root, out) == before, "ingest wrote outside its output directory"
    return card, error


def read_back(out: Path) -> tuple[np.ndarray | list[np.ndarray], list[int], dict]:
    """An ingested dataset must be readable, hashes and all: (N, H, W, C) images, labels, card.

    When its images differ in shape (the card's image_shape is null), load_in_memory refuses
    it by design and points to the streaming reader: read those through ShardStream (shard and
    manifest hashes checked against the card) and return the images as a list of (H, W, C)."""
    card = json.loads((out / CARD_NAME).read_text())
    if card["image_shape"] is None:
        samples = list(ShardStream(open_dataset(out, verify=True), transform=lambda sample: sample))
        manifest = read_manifest(out / MANIFEST_NAME)
        assert len(samples) == card["num_samples"]
        assert [s.key for s in samples] == manifest.column("key").to_pylist()
        assert [s.label for s in samples] == manifest.column("label").to_pylist()
        return [s.image for s in samples], [s.label for s in samples], card
    loaded = load_in_memory(out, progress=False, use_cache=False)
    assert len(loaded) == card["num_samples"] and loaded.classes == card["classes"]
    return loaded.images.permute(0, 2, 3, 1).numpy(), loaded.labels.tolist(), card


def assert_image(image: np.ndarray) -> None:
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] in (1, 3) and min(image.shape) > 0


# =========================================================================== shards: bytes


def _base_shards() -> tuple[list[Sample], bytes, list[Sample], bytes]:
    rng = np.random.default_rng(7)
    samples = [Sample("s0000", rng.integers(0, 256, (8, 8, 1), np.uint8), 0, {"origin_key": "o0"}),
               Sample("s0001", rng.integers(0, 256, (8, 8, 3), np.uint8), 2, {"origin_key": "o1", "p": True}),
               Sample("a/s0002", rng.integers(0, 256, (5, 7, 1), np.uint8), 1, {})]
    other = [Sample(f"t{i}", rng.integers(0, 256, (8, 8, 1), np.uint8), i, {}) for i in range(2)]
    with tempfile.TemporaryDirectory() as tmp:
        write_shard(Path(tmp) / "a.tar", samples)
        write_shard(Path(tmp) / "b.tar", other)
        return samples, (Path(tmp) / "a.tar").read_bytes(), other, (Path(tmp) / "b.tar").read_bytes()


SHARD_SAMPLES, SHARD, OTHER_SAMPLES, OTHER = _base_shards()
SHARD_SPANS, SHARD_HEADERS = member_spans(SHARD)
SHARD_KEYS = {s.key for s in SHARD_SAMPLES}


def named_keys(data: bytes) -> set[str]:
    """Keys the member names of a (corrupt) tar spell, as far as tarfile reads it. Two bit flips
    that keep a header's checksum (s0000.cls -> r1000.cls) rename a member: the file then really
    holds that key, and an error may rightly blame it."""
    keys = set()
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            keys.update(base_plus_ext(info.name)[0] for info in tar)
    except tarfile.TarError:
        pass  # names after the damage are not read; the reader refuses the file anyway
    return keys - {None}


def assert_same_samples(got: list[Sample], want: list[Sample]) -> None:
    assert [s.key for s in got] == [s.key for s in want]
    for a, b in zip(got, want):
        assert np.array_equal(a.image, b.image) and a.label == b.label and a.info == b.info


@settings(FUZZ, max_examples=EXAMPLES)
@given(corruption=corruptions(SHARD, SHARD_HEADERS + tuple(SHARD_SPANS.values())))
def test_shard_bytes(corruption):
    """Truncation, bit flips, overwrites, insertions and trailing garbage in a shard."""
    with case("shard-bytes"), tempfile.TemporaryDirectory() as tmp:
        path, other = Path(tmp) / "shard-000000.tar", Path(tmp) / "shard-000001.tar"
        path.write_bytes(corruption.data)
        other.write_bytes(OTHER)
        records, records_error = attempt(lambda: list(iter_shard_records(path)))
        samples, error = attempt(lambda: list(iter_shard(path)))
        both, both_error = attempt(lambda: list(iter_shards([path, other])))

    if not corruption.changed:
        assert error is None and both_error is None, f"intact shard refused: {error or both_error}"
    keys = SHARD_KEYS | named_keys(corruption.data)
    for exc in (records_error, error):
        if exc is not None:
            check_error(exc, [path], keys)
    if both_error is not None:
        check_error(both_error, [path, other], keys | {s.key for s in OTHER_SAMPLES})
    if records is not None:  # every member the corruption did not touch comes back byte for byte
        assert [r["__key__"] for r in records] == [s.key for s in SHARD_SAMPLES]
        for record in records:
            assert {m for m in record if not m.startswith("__")} == {"png", "cls", "json"}
            for member in ("png", "cls", "json"):
                start, stop = SHARD_SPANS[f"{record['__key__']}.{member}"]
                if not corruption.touches(start, stop):
                    assert record[member] == SHARD[start:stop]
    if samples is not None:
        assert records is not None
        assert [s.key for s in samples] == [s.key for s in SHARD_SAMPLES]
        for got, want in zip(samples, SHARD_SAMPLES):
            assert_image(got.image)
            if not corruption.touches(*SHARD_SPANS[f"{want.key}.png"]):
                assert np.array_equal(got.image, want.image)
            if not corruption.touches(*SHARD_SPANS[f"{want.key}.cls"]):
                assert got.label == want.label
            if not corruption.touches(*SHARD_SPANS[f"{want.key}.json"]):
                assert got.info == want.info
        assert both is not None, f"shard reads alone but not with another: {both_error}"
        assert_same_samples(both, samples + OTHER_SAMPLES)
    else:
        assert both is None


# =========================================================================== shards: members

CLS_CASES = {b"0": 0, b"2": 2, b" 1\n": 1, b"-1": -1, b"99999999999": 99999999999, b"abc": None, b"": None,
             b"\xff": None, b"1.5": None, b"1" * 5000: None, "\u0661".encode(): None, b"0x1": None, b"1 2": None}
JSON_CASES = {b'{"a": 1}': {"a": 1}, b"{}": {}, '{"k": "\u00fc"}'.encode(): {"k": "\u00fc"},
              b'{"a": Infinity}': {"a": float("inf")}, b"[1]": None, b"null": None, b'"s"': None,
              b"\xff\xfe{": None, b"{": None, b"": None, '{"k": "\u00e9"}'.encode("latin-1"): None,
              "\ufeff{}".encode(): None, b"[" * 50000: None, b'{"a":' * 3000 + b"1" + b"}" * 3000: None}
HOSTILE_EXTS = ["pyd", "pth", "pickle", "pkl", "npy", "pt", "ten", "mp", "Pyd", "tar", "gz", "exe", "", "b.png",
                "x.pyd", "png.pyd", "__local_path__", "__url__", "__x", "__x__"]
VALID_KEYS = st.from_regex(r"[A-Za-z0-9_\-]{1,6}(/[A-Za-z0-9_\-]{1,4})?", fullmatch=True)
HOSTILE_KEYS = st.sampled_from(["/etc/x", "../x", "a/../b", "./x", "a.b", "", "x y", "\u00fc", "..", "a/", "/",
                                "x\udcff", "C:/x", "a\\b", "__key__", "~x", "a//b", "-"])
OTHER_TYPES = [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.DIRTYPE]
STRAYS = [Member("README", b"hi"), Member(".png", b"\x89PNG"), Member("__x__", b""), Member("x.png/y", b"1"),
          Member("d", type=tarfile.DIRTYPE), Member("s.png", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
          Member("h.cls", type=tarfile.LNKTYPE, linkname="s.cls"), Member("f.png", type=tarfile.FIFOTYPE),
          Member("c.png", type=tarfile.CHRTYPE)]
META_NAME = re.compile(r"__[^/]*__($|/)")  # names webdataset skips as its own metadata


@st.composite
def sample_members(draw, key: str) -> list[tuple[Member, object]]:
    """The members of one sample, each with what it holds: an ImageCase, cls/json bytes, or None."""
    entries = []
    for _ in range(draw(st.sampled_from([1, 1, 1, 1, 1, 0, 2]))):
        entries.append((draw(st.sampled_from(["png", "png", "jpg", "jpeg", "PNG", "JpG"])), draw(image_cases())))
    if draw(st.integers(0, 9)):
        entries.append(("cls", draw(st.sampled_from(list(CLS_CASES)))))
    if draw(st.booleans()):
        entries.append(("json", draw(st.sampled_from(list(JSON_CASES)))))
    if not draw(st.integers(0, 4)):
        entries.append(("txt", draw(st.binary(max_size=12))))
    if not draw(st.integers(0, 4)):
        entries.append((draw(st.sampled_from(HOSTILE_EXTS)), draw(st.binary(max_size=12))))
    members = []
    for ext, held in draw(st.permutations(entries)):
        kind = tarfile.REGTYPE if draw(st.integers(0, 11)) else draw(st.sampled_from(OTHER_TYPES))
        data = held.data if isinstance(held, ImageCase) else held
        members.append((Member(f"{key}.{ext}", data if kind == tarfile.REGTYPE else b"", kind, "/etc/passwd"),
                        held))
    return members


@st.composite
def shard_entries(draw) -> list[tuple[Member, object]]:
    keys = draw(st.lists(st.one_of(VALID_KEYS, VALID_KEYS, VALID_KEYS, HOSTILE_KEYS), min_size=1, max_size=3))
    if len(keys) > 1 and not draw(st.integers(0, 5)):
        keys[-1] = keys[0]  # a key seen twice
    entries = [entry for key in keys for entry in draw(sample_members(key))]
    if not draw(st.integers(0, 4)):
        entries.insert(draw(st.integers(0, len(entries))), (draw(st.sampled_from(STRAYS)), None))
    return entries


def model_shard(entries):
    """What a correct reader makes of these members, following the shard contract
    (regular members named key.ext, consecutive per key, one image + cls [+ json]):
    (expected samples or None, keys at fault, whether the archive as a whole is at fault)."""
    archive_bad, bad, records = False, set(), []
    for member, held in entries:
        if member.type == tarfile.DIRTYPE:
            continue  # directory entries are harmless; webdataset skips them
        prefix, ext = base_plus_ext(member.name)
        meta = ("/" not in member.name and member.name.startswith("__") and member.name.endswith("__")) \
            or META_NAME.match(member.name)
        if member.type != tarfile.REGTYPE or prefix is None or meta:
            archive_bad = True  # a link, device, or a name that is not key.ext
            if prefix is not None:
                bad.add(prefix)
            continue
        ext = ext.lower()
        if not records or records[-1][0] != prefix:
            records.append((prefix, {}))
        if ext in records[-1][1] or ext in ("__key__", "__url__"):
            archive_bad = True  # a duplicate member: webdataset refuses the archive
            bad.add(prefix)
        records[-1][1][ext] = held
    samples, seen = [], set()
    for prefix, held in records:
        images = [m for m in IMAGE_MEMBERS if m in held]
        problem = (not KEY_PATTERN.match(prefix) or prefix in seen or any(m not in ALLOWED_MEMBERS for m in held)
                   or len(images) != 1 or "cls" not in held)
        seen.add(prefix)
        if not problem:
            image, label = held[images[0]], CLS_CASES[held["cls"]]
            info = JSON_CASES[held["json"]] if "json" in held else {}
            problem = not image.ok or label is None or info is None
        if problem:
            bad.add(prefix)
        else:
            samples.append((prefix, image, label, info))
    return (None if archive_bad or bad else samples), bad, archive_bad


def assert_model_samples(got: list[Sample], expected) -> None:
    assert [s.key for s in got] == [e[0] for e in expected]
    for sample, (_, image, label, info) in zip(got, expected):
        assert sample.image.shape == image.shape and sample.image.dtype == np.uint8, (sample.key, image.kind)
        if image.pixels is not None:
            assert np.array_equal(sample.image, image.pixels)
        assert sample.label == label and sample.info == info


@settings(FUZZ, max_examples=EXAMPLES)
@given(entries=shard_entries())
def test_shard_members(entries):
    """Hostile member names (dots, '/abs', '..'), types (pickles, links, unknown
    extensions), and contents (lying image headers, non-UTF-8 JSON, bad labels)."""
    expected, bad, archive_bad = model_shard(entries)
    with case("shard-members"), tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard-000000.tar"
        path.write_bytes(tar_bytes([member for member, _ in entries]))
        got, error = attempt(lambda: list(iter_shard(path)))
    if expected is None:
        assert error is not None, f"a bad shard was read as {[s.key for s in got]} (bad keys {bad})"
        check_error(error, [path], bad)
        if not archive_bad:
            assert error.key is not None, f"error does not name the key: {error}"
    else:
        assert error is None, f"a good shard was refused: {error}"
        assert_model_samples(got, expected)


# =========================================================================== image decoding


@st.composite
def declared_images(draw):
    """PNG/JPEG bytes whose header declares width x height, which may lie about the data."""
    fmt = draw(st.sampled_from(["png", "jpeg"]))
    limit = 2**32 - 1 if fmt == "png" else 65535
    if draw(st.booleans()):  # over MAX_IMAGE_PIXELS
        width = draw(st.integers(MAX_IMAGE_PIXELS // limit + 1, limit))
        height = draw(st.integers(MAX_IMAGE_PIXELS // width + 1, limit))
        if draw(st.booleans()):
            width, height = height, width
    else:
        width, height = draw(st.integers(0, 1024)), draw(st.integers(0, 1024))
    if fmt == "jpeg":
        return fmt, width, height, 3, jpeg_declaring(width, height)
    color = draw(st.sampled_from([0, 0, 2]))
    idat = draw(st.sampled_from([None, None, IDAT_BOMB, b"", b"\x78\x9cgarbage"]))
    crc_ok = bool(draw(st.integers(0, 5)))
    return fmt, width, height, (1 if color == 0 else 3), png_declaring(width, height, idat, color, crc_ok)


@settings(FUZZ, max_examples=EXAMPLES)
@given(image=declared_images(), mode=st.sampled_from([None, "L", "RGB"]), strict=st.booleans())
def test_image_decoding_is_bounded(image, mode, strict):
    """MAX_IMAGE_PIXELS is enforced from the header, before any pixel is decoded,
    and PIL's own DecompressionBombError/Warning come out as a DataError."""
    fmt, width, height, channels, data = image
    with case("images"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("error" if strict else "always")  # strict: as under `python -W error`
        got, error = attempt(lambda: decode_image(data, path="d/shard-000000.tar", key="k", mode=mode))
    escaped = [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert not escaped, f"PIL's bomb warning escaped: {escaped[0].message}"
    if error is not None:
        check_error(error, ["d/shard-000000.tar"], {"k"})
        assert error.key == "k"
    if width * height > MAX_IMAGE_PIXELS:
        assert error is not None, f"{fmt} declaring {width}x{height} was decoded"
        assert "limit" in error.message and "pixels" in error.message, error
    elif got is not None:
        expected_channels = {None: channels, "L": 1, "RGB": 3}[mode]
        assert got.shape == (height, width, expected_channels) and got.dtype == np.uint8


# =========================================================================== manifest


def _base_manifest() -> tuple[pa.Table, bytes]:
    from robustdata.data.manifest import write_manifest

    rows = [{"key": f"train_{i:07d}", "shard": f"shard-{i // 2:06d}.tar", "label": i % 3, "sha256": f"{i:064x}",
             "origin_key": f"o{i}" if i else None, "source_label": i % 3, "is_poison": [None, True, False][i % 3]}
            for i in range(4)]
    with tempfile.TemporaryDirectory() as tmp:
        write_manifest(Path(tmp) / MANIFEST_NAME, rows)
        data = (Path(tmp) / MANIFEST_NAME).read_bytes()
    return pq.read_table(io.BytesIO(data)), data


MANIFEST_TABLE, MANIFEST = _base_manifest()
FIELD_NAMES = [f.name for f in MANIFEST_FIELDS]
RETYPED = {"key": pa.int64(), "shard": pa.binary(), "label": pa.int64(), "sha256": pa.large_string(),
           "origin_key": pa.int32(), "source_label": pa.float64(), "is_poison": pa.int8()}
MANIFEST_EDITS = st.one_of(
    st.tuples(st.sampled_from(["drop", "retype", "null", "duplicate"]), st.sampled_from(FIELD_NAMES)),
    st.tuples(st.just("version"), st.sampled_from([None, "0", "2", "", "1.0", "01", "x", "1"])),
    st.tuples(st.just("extra"), st.sampled_from(["note", "poison_kind"])),
    st.tuples(st.just("rows"), st.sampled_from(["empty", "reverse", "double"])),
)


def edit_table(table: pa.Table, edits) -> tuple[pa.Table, bool]:
    """Apply structural edits; return the table and whether read_manifest must accept it."""
    valid = True
    metadata = dict(table.schema.metadata)
    columns = {name: table.column(name) for name in table.column_names}
    fields = {f.name: f for f in table.schema}
    duplicates = []
    for op, arg in edits:
        n = len(next(iter(columns.values()))) if columns else 0
        if op == "drop" and arg in columns:
            del columns[arg], fields[arg]
            valid = False
        elif op == "retype" and arg in columns:
            columns[arg] = pa.array([None] * n, RETYPED[arg])
            fields[arg] = pa.field(arg, RETYPED[arg])
            valid = False
        elif op == "null" and arg in columns and n:
            values = columns[arg].to_pylist()
            columns[arg] = pa.array([None] + values[1:], fields[arg].type)
            fields[arg] = fields[arg].with_nullable(True)
            valid &= arg not in REQUIRED
        elif op == "duplicate" and arg in columns:
            duplicates.append(arg)
            valid = False
        elif op == "version":
            if arg is None:
                metadata.pop(b"schema_version", None)
            else:
                metadata[b"schema_version"] = arg.encode()
        elif op == "extra":
            columns[arg] = pa.array([f"x{i}" for i in range(n)], pa.string())
            fields[arg] = pa.field(arg, pa.string())
        elif op == "rows":
            index = {"empty": [], "reverse": list(range(n))[::-1], "double": list(range(n)) * 2}[arg]
            columns = {k: v.take(pa.array(index, pa.int64())) for k, v in columns.items()}
    # the version the file ends up with decides: a later edit may restore an earlier one's removal
    valid &= metadata.get(b"schema_version") == b"1"
    names = list(columns) + [name for name in duplicates if name in columns]  # not those dropped later
    schema = pa.schema([fields[name] for name in names], metadata=metadata)
    return pa.Table.from_arrays([columns[name] for name in names], schema=schema), valid


def assert_manifest_invariants(table: pa.Table) -> None:
    assert (table.schema.metadata or {}).get(b"schema_version") == b"1"
    for f in MANIFEST_FIELDS:
        assert table.schema.get_field_index(f.name) >= 0 and table.schema.field(f.name).type == f.type
        if not f.nullable:
            assert table.column(f.name).null_count == 0, f"nulls in required column {f.name!r}"


@settings(FUZZ, max_examples=EXAMPLES)
@given(mutation=st.one_of(
    st.tuples(st.just("bytes"), corruptions(MANIFEST, ((0, 4), (len(MANIFEST) - 8 - int.from_bytes(
        MANIFEST[-8:-4], "little"), len(MANIFEST))))),
    st.tuples(st.just("edits"), st.lists(MANIFEST_EDITS, min_size=1, max_size=3))))
def test_manifest(mutation):
    how, what = mutation
    expected, valid = (None, None) if how == "bytes" else edit_table(MANIFEST_TABLE, what)
    with case("manifest"), tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MANIFEST_NAME
        if how == "bytes":
            path.write_bytes(what.data)
        else:
            pq.write_table(expected, path, compression="zstd")
        table, error = attempt(lambda: read_manifest(path))
    if error is not None:
        check_error(error, [path])
        assert (how == "bytes" and what.changed) or not valid, f"a valid manifest was refused: {error}"
        return
    assert_manifest_invariants(table)
    if how == "bytes":
        assert what.changed or table.equals(MANIFEST_TABLE)
    else:
        assert valid, f"manifest accepted despite {what}"
        assert table.select(FIELD_NAMES).to_pylist() == expected.select(FIELD_NAMES).to_pylist()


# =========================================================================== dataset directory


def _base_dataset() -> tuple[dict[str, bytes], np.ndarray, list[int], list[str]]:
    rng = np.random.default_rng(3)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        for label in ("cat", "dog"):
            (src / label).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (8, 8), np.uint8)).save(src / label / f"{i}.png")
        out = Path(tmp) / "out"
        ingest_split(ImageFolderSource(src), "train", out, shard_size=3, progress=False)
        loaded = load_in_memory(out, progress=False, use_cache=False)
        files = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    return files, loaded.images.numpy(), loaded.labels.tolist(), loaded.keys


DATASET, DATASET_IMAGES, DATASET_LABELS, DATASET_KEYS = _base_dataset()
DATASET_CARD = json.loads(DATASET[CARD_NAME])
DATASET_SHARDS = sorted(name for name in DATASET if name.endswith(".tar"))
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                           | st.text(max_size=8), lambda children: st.lists(children, max_size=3)
                           | st.dictionaries(st.text(max_size=6), children, max_size=3), max_leaves=6)
CARD_VALUES = {
    "image_shape": [[100000, 100000, 3], [8, 8, 0], [-8, 8, 1], [8, 8], "8x8", [8, 8, 2], [8, 8, 1.5],
                    [2**40, 1, 1], None, [8, 8, 3], [0, 8, 1]],
    "classes": [[], ["a"], "ab", None, [1, 2], ["a", "b", "c"], {"a": 1}],
    "num_samples": [-1, "6", 10**30, 0, None],
    "schema_version": [2, "1", None, 1.0],
    "manifest": [{}, {"sha256": 5}, None, "manifest.parquet", {"name": "m", "sha256": "0" * 64}],
    "shards": [[], None, "shard-000000.tar", [{"name": "shard-000000.tar"}], [{"sha256": "0"}], [5]],
}
SHARD_NAMES = ["../shard-000000.tar", "/etc/passwd", "..", ".", "", "sub/x.tar", 5, None, "shard-000001.tar",
               "card.json", "manifest.parquet"]


@st.composite
def card_edits(draw) -> tuple[str, object]:
    kind = draw(st.sampled_from(["field", "field", "shard-name", "delete", "replace", "deep"]))
    if kind == "field":
        name = draw(st.sampled_from(sorted(CARD_VALUES)))
        return kind, (name, draw(st.sampled_from(CARD_VALUES[name]) | JSON_VALUES))
    if kind == "shard-name":
        return kind, (draw(st.integers(0, len(DATASET_SHARDS) - 1)), draw(st.sampled_from(SHARD_NAMES)))
    if kind == "delete":
        return kind, draw(st.sampled_from(sorted(DATASET_CARD)))
    if kind == "replace":
        return kind, draw(JSON_VALUES)
    return kind, draw(st.integers(1100, 5000))


def apply_card_edit(card: dict, edit) -> bytes:
    kind, arg = edit
    card = json.loads(json.dumps(card))
    if kind == "field":
        card[arg[0]] = arg[1]
    elif kind == "shard-name":
        card["shards"][arg[0]]["name"] = arg[1]
    elif kind == "delete":
        del card[arg]
    elif kind == "replace":
        card = arg
    else:
        return b'{"a":' * arg + b"1" + b"}" * arg
    return json.dumps(card).encode()


MANIFEST_ROW_EDITS = st.sampled_from(["swap-keys", "label+1", "label-99", "label-negative", "sha", "dup-row",
                                      "drop-row", "reverse", "key-dots"])


def edit_manifest_rows(data: bytes, edit: str) -> bytes:
    table = pq.read_table(io.BytesIO(data))
    rows = table.to_pylist()
    if edit == "swap-keys":
        rows[0]["key"], rows[1]["key"] = rows[1]["key"], rows[0]["key"]
    elif edit.startswith("label"):
        rows[2]["label"] = {"label+1": (rows[2]["label"] + 1) % 2, "label-99": 99, "label-negative": -1}[edit]
    elif edit == "sha":
        rows[3]["sha256"] = "0" * 64
    elif edit == "dup-row":
        rows.append(rows[0])
    elif edit == "drop-row":
        rows.pop()
    elif edit == "reverse":
        rows.reverse()
    else:
        rows[0]["key"] = "a.b"
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), buffer, compression="zstd")
    return buffer.getvalue()


@st.composite
def dataset_mutations(draw):
    target = draw(st.sampled_from(DATASET_SHARDS + [MANIFEST_NAME, CARD_NAME]))
    original = DATASET[target]
    if target.endswith(".tar"):
        spans, headers = member_spans(original)
        if draw(st.integers(0, 3)):
            return target, draw(corruptions(original, headers + tuple(spans.values()))).data
        return target, tar_bytes([member for member, _ in draw(shard_entries())])
    if target == MANIFEST_NAME:
        how = draw(st.sampled_from(["bytes", "edits", "rows"]))
        if how == "bytes":
            return target, draw(corruptions(original)).data
        if how == "edits":
            table, _ = edit_table(MANIFEST_TABLE_OF_DATASET, draw(st.lists(MANIFEST_EDITS, min_size=1, max_size=2)))
            buffer = io.BytesIO()
            pq.write_table(table, buffer, compression="zstd")
            return target, buffer.getvalue()
        return target, edit_manifest_rows(original, draw(MANIFEST_ROW_EDITS))
    if draw(st.booleans()):
        return target, draw(corruptions(original)).data
    return target, apply_card_edit(DATASET_CARD, draw(card_edits()))


MANIFEST_TABLE_OF_DATASET = pq.read_table(io.BytesIO(DATASET[MANIFEST_NAME]))


@settings(FUZZ, max_examples=EXAMPLES)
@given(mutation=dataset_mutations(), resign=st.booleans(), verify=st.booleans())
def test_dataset_directory(mutation, resign, verify):
    """open_dataset, load_in_memory and ShardStream on a dataset directory with one
    file corrupted; `resign` updates card.json's hashes to match, as a hostile producer would."""
    target, data = mutation
    changed = data != DATASET[target]
    card = dict(DATASET_CARD)
    if resign and target != CARD_NAME:
        card = json.loads(json.dumps(DATASET_CARD))
        if target == MANIFEST_NAME:
            card["manifest"]["sha256"] = sha256_bytes(data)
        else:
            next(s for s in card["shards"] if s["name"] == target)["sha256"] = sha256_bytes(data)
    with case("dataset"), tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        root.mkdir()
        for name, content in DATASET.items():
            (root / name).write_bytes(content)
        (root / CARD_NAME).write_text(dumps_json(card))
        (root / target).write_bytes(data)
        dataset, error = attempt(lambda: open_dataset(root, verify=verify))
        loaded = streamed = None
        if dataset is not None:
            loaded, error = attempt(lambda: load_in_memory(dataset, verify=verify, progress=False,
                                                           use_cache=False))
            streamed, stream_error = attempt(lambda: list(ShardStream(dataset)))
            if stream_error is not None:
                check_error(stream_error, [root])

    if not changed:
        assert error is None and loaded is not None and np.array_equal(loaded.images.numpy(), DATASET_IMAGES)
    if changed and verify and not resign and target != CARD_NAME:
        assert isinstance(error, IntegrityError) and error.path == str(root / target), error
    if error is not None:
        check_error(error, [root])
    if loaded is not None:
        shape = dataset.card["image_shape"]
        assert loaded.images.dtype == torch.uint8 and tuple(loaded.images.shape[1:]) == (shape[2], *shape[:2])
        assert len(loaded.keys) == len(loaded.labels) == len(loaded.images) and len(set(loaded.keys)) == len(
            loaded.keys), "duplicate keys"
        assert all(0 <= label < len(dataset.classes) for label in loaded.labels.tolist()), "label outside classes"
        if verify and (target != MANIFEST_NAME or not changed):
            assert loaded.labels.tolist() == DATASET_LABELS and loaded.keys == DATASET_KEYS
            if shape == DATASET_CARD["image_shape"]:
                assert np.array_equal(loaded.images.numpy(), DATASET_IMAGES)
    if streamed is not None:
        for image, label in streamed:
            assert image.dtype.is_floating_point and image.ndim == 3 and 0 <= image.min() <= image.max() <= 1
            assert isinstance(label, int)
        if target == MANIFEST_NAME or not changed:
            assert [y for _, y in streamed] == DATASET_LABELS


# =========================================================================== MNIST mirror (pickle)


def _evil(canary: Path, protocol: int = 2) -> bytes:
    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {canary}",)

    return pickle.dumps(Evil(), protocol=protocol)


def hostile_pickles(canary: Path) -> dict[str, bytes]:
    """Pickles that try to run code, allocate without bound, or confuse the unpickler."""
    touch = f"touch {canary}".encode()
    return {
        "os.system": _evil(canary),
        "os.system-p4": _evil(canary, 4),
        "stack-global": b"\x80\x04\x8c\x05posix\x8c\x06system\x93\x8c" + bytes([len(touch)]) + touch + b"\x85R.",
        "inst": b"(cposix\nsystem\nS'" + touch + b"'\no.",
        "builtins.eval": b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1q\x00\x85R.",
        "getattr": b"\x80\x02cbuiltins\ngetattr\n.",
        "numpy.load": b"\x80\x02cnumpy\nload\n.",
        "ndarray-called": b"\x80\x02cnumpy\nndarray\nJ\x00\x00\x01\x00M\x10\x03\x86\x85R.",  # ndarray((65536, 784))
        "ndarray-huge": b"\x80\x02cnumpy\nndarray\n\x8a\x06\x00\x00\x00\x00\x00\x01\x85\x85R.",  # 2**40 elements
        "reconstruct-huge": b"\x80\x02cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\n\x8a\x06\x00\x00"
                            b"\x00\x00\x00\x01\x85C\x01b\x87R.",
        "codec-lookup": b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x06\x00\x00\x00nosuch\x86R.",
        "codec-zlib": b"\x80\x02c_codecs\nencode\nC\x01aX\x04\x00\x00\x00zlib\x86R.",
        "bytes8-huge": b"\x80\x04\x8e" + (2**62).to_bytes(8, "little") + b"abc.",
        "dtype-args": b"\x80\x02cnumpy\ndtype\n)R.",
        "setstate-garbage": b"\x80\x02cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R"
                            b"K\x01\x85b.",
        "persistent-id": b"\x80\x02X\x01\x00\x00\x00aQ.",
        "extension": b"\x80\x02\x82\x01.",
        "build-dict": b"\x80\x02}}b.",
        "empty-stack": b".",
        "truncated": b"\x80\x02]q\x00(K\x01",
        "deep-lists": b"\x80\x02" + b"]" * 100000 + b"a" * 99999 + b".",
        "memo-missing": b"\x80\x02h\x05.",
    }


HOSTILE_NAMES = sorted(hostile_pickles(Path("x")))


def mnist_levels(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 784)), rng.integers(0, 10, n)


MNIST_FAULTS = ["uint8", "not-k256", "negative", "over-1", "nan", "shape-783", "1d", "labels-float", "labels-10",
                "labels-negative", "labels-short", "labels-2d", "pair-3", "not-pair", "labels-none"]
MNIST_BENIGN = ["float64", "list-pixels", "labels-list", "labels-uint8"]


@st.composite
def mnist_structures(draw):
    """(object to pickle, expected {split: (images, labels)} or None when it must be refused)."""
    splits, expected, valid = [], {}, True
    for name in MnistMirror.SPLITS:
        n = draw(st.integers(0, 2))
        levels, labels = mnist_levels(draw(st.integers(0, 999)), n)
        pixels = (levels / 256.0).astype(np.float32)
        fault = draw(st.sampled_from([None] * 8 + MNIST_FAULTS + MNIST_BENIGN))
        pair: object = (pixels, labels)
        if fault == "uint8":
            pair = (levels.astype(np.uint8), labels)
        elif fault == "not-k256":
            pair = (pixels + np.float32(1 / 1024) * (n > 0), labels)
        elif fault == "negative":
            pair = (pixels - 1, labels)
        elif fault == "over-1":
            pair = (pixels + 1, labels)
        elif fault == "nan":
            pair = (np.full_like(pixels, np.nan), labels)
        elif fault == "shape-783":
            pair = (pixels[:, :783], labels)
        elif fault == "1d":
            pair = (pixels.ravel(), labels)
        elif fault == "labels-float":
            pair = (pixels, labels + 0.5)
        elif fault == "labels-10":
            pair = (pixels, np.full(n, 10))
        elif fault == "labels-negative":
            pair = (pixels, np.full(n, -1))
        elif fault == "labels-short":
            pair = (pixels, labels[:-1] if n else np.zeros(1, np.int64))
        elif fault == "labels-2d":
            pair = (pixels, labels[:, None])
        elif fault == "pair-3":
            pair = (pixels, labels, labels)
        elif fault == "not-pair":
            pair = pixels
        elif fault == "labels-none":
            pair = (pixels, None)
        elif fault == "float64":
            pair = (pixels.astype(np.float64), labels)
        elif fault == "list-pixels":
            pair = (pixels.tolist(), labels)
        elif fault == "labels-list":
            pair = (pixels, labels.tolist())
        elif fault == "labels-uint8":
            pair = (pixels, labels.astype(np.uint8))
        # with no rows, value faults have nothing to act on
        faulty = fault in MNIST_FAULTS and not (n == 0 and fault in ("not-k256", "negative", "over-1", "nan",
                                                                      "labels-10", "labels-negative"))
        valid &= not faulty
        splits.append(pair)
        expected[name] = (levels.astype(np.uint8).reshape(-1, 28, 28, 1), labels.astype(np.int64))
    outer = draw(st.sampled_from(["tuple"] * 5 + ["list", "two", "four", "dict"]))
    if outer == "list":
        obj: object = list(splits)
    elif outer == "two":
        obj, valid = tuple(splits[:2]), False
    elif outer == "four":
        obj, valid = tuple(splits) + (splits[0],), False
    elif outer == "dict":
        obj, valid = dict(zip(MnistMirror.SPLITS, splits)), False
    else:
        obj = tuple(splits)
    return obj, expected if valid else None


MNIST_PICKLE = pickle.dumps(tuple(((mnist_levels(i, n)[0] / 256.0).astype(np.float32), mnist_levels(i, n)[1])
                                  for i, n in enumerate([2, 1, 1])), protocol=2)
MNIST_GZ = gzip.compress(MNIST_PICKLE, mtime=0)


@st.composite
def mnist_files(draw):
    """(bytes of mnist.pkl.gz, how, expected arrays per split or None for 'must refuse', '?' for unknown)."""
    how = draw(st.sampled_from(["pickle-bytes", "gz-bytes", "structure", "structure", "hostile"]))
    if how == "pickle-bytes":
        corruption = draw(corruptions(MNIST_PICKLE, ((0, 120),)))
        return gzip.compress(corruption.data, mtime=0), how, "?" if corruption.changed else "base"
    if how == "gz-bytes":
        corruption = draw(corruptions(MNIST_GZ, ((0, 20), (len(MNIST_GZ) - 8, len(MNIST_GZ)))))
        return corruption.data, how, "?" if corruption.changed else "base"
    if how == "structure":
        obj, expected = draw(mnist_structures())
        return gzip.compress(pickle.dumps(obj, protocol=draw(st.sampled_from([2, 4]))), mtime=0), how, expected
    return None, draw(st.sampled_from(HOSTILE_NAMES)), None


def mnist_base_expected():
    return {name: (mnist_levels(i, n)[0].astype(np.uint8).reshape(-1, 28, 28, 1), mnist_levels(i, n)[1])
            for i, (name, n) in enumerate(zip(MnistMirror.SPLITS, [2, 1, 1]))}


@settings(FUZZ, max_examples=EXAMPLES)
@given(file=mnist_files(), pinned=st.sampled_from([False, True, True, True]),
       split=st.sampled_from(MnistMirror.SPLITS))
def test_mnist_mirror(file, pinned, split):
    """The MNIST mirror's pickle, corrupted or hostile. With the real pin every such
    file is refused before unpickling; with the pin set to the file's own hash
    (a new release, say) the array unpickler and the layout checks must hold."""
    data, how, expected = file
    with case("mnist"), tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        canary = root / "canary"
        if data is None:
            data = gzip.compress(hostile_pickles(canary)[how], mtime=0)
        cache = root / "cache"
        cache.mkdir()
        path = cache / "mnist.pkl.gz"
        path.write_bytes(data)
        mirror = MnistMirror(cache_dir=cache, download=False)
        if pinned:
            mirror.MEMBER_SHA256 = sha256_bytes(data)
        arrays, error = attempt(lambda: {s: list(mirror.iter_split(s)) for s in MnistMirror.SPLITS})
        card, ingest_error = ingest_checked(root, mirror, split, root / "out")
        got = read_back(root / "out") if card is not None else None
        assert not canary.exists(), "a pickle ran code"

    if expected == "base":
        expected = mnist_base_expected()
    if not pinned:
        assert isinstance(error, IntegrityError) and error.path == str(path), error
    for exc in (error, ingest_error):
        if exc is not None:
            check_error(exc, [path, "mnist"])
    if expected is None:
        assert error is not None, f"{how}: a bad MNIST pickle was accepted"
    elif expected != "?" and pinned:
        assert error is None, f"{how}: a good MNIST pickle was refused: {error}"
        for name, samples in arrays.items():
            images, labels = expected[name]
            assert [s.key for s in samples] == [f"{name}/{i}" for i in range(len(labels))]
            assert np.array_equal(np.stack([s.image for s in samples]) if samples else images, images)
            assert [s.label for s in samples] == labels.tolist()
    if arrays is not None:
        for samples in arrays.values():
            for sample in samples:
                assert sample.image.shape == (28, 28, 1) and sample.image.dtype == np.uint8
                assert 0 <= sample.label < 10
    if got is not None:
        assert arrays is not None
        images, labels, card = got
        assert labels == [s.label for s in arrays[split]]
        assert np.array_equal(images, np.stack([s.image for s in arrays[split]]))
    elif error is None:
        assert ingest_error is not None and (len(arrays[split]) == 0), ingest_error


# =========================================================================== IDX (MNIST, FashionMNIST)


def idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape) + \
        array.astype(np.uint8).tobytes()


IDX_IMAGES = {split: np.random.default_rng(i).integers(0, 256, (2, 28, 28), dtype=np.uint8)
              for i, split in enumerate(["train", "test"])}
IDX_LABELS = {"train": np.array([3, 9], np.uint8), "test": np.array([0, 7], np.uint8)}
IDX_FILES = {  # relative path -> raw IDX bytes; the test split is stored gzipped, as torchvision downloads it
    "raw/train-images-idx3-ubyte": idx_bytes(IDX_IMAGES["train"]),
    "raw/train-labels-idx1-ubyte": idx_bytes(IDX_LABELS["train"]),
    "raw/t10k-images-idx3-ubyte.gz": idx_bytes(IDX_IMAGES["test"]),
    "raw/t10k-labels-idx1-ubyte.gz": idx_bytes(IDX_LABELS["test"]),
}


def stored(name: str, raw: bytes) -> bytes:
    return gzip.compress(raw, mtime=0) if name.endswith(".gz") else raw


def parse_idx(raw: bytes | None) -> np.ndarray | None:
    """Reference IDX parser: uint8 magic 0x0000_08_ndim, big-endian dims, exactly prod(dims) bytes."""
    if raw is None or len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        return None
    header = 4 + 4 * raw[3]
    if len(raw) < header:
        return None
    shape = struct.unpack(f">{raw[3]}I", raw[4:header])
    if len(raw) - header != math.prod(shape):
        return None
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


@st.composite
def idx_header_lies(draw, raw: bytes) -> bytes:
    ndim = draw(st.sampled_from([0, 1, 2, 3, 3, 3, 4, 255]))
    dims = [draw(st.one_of(st.integers(0, 64), st.sampled_from([2**16, 2**31, 2**32 - 1, 784, 28])))
            for _ in range(min(ndim, 5))]
    magic = draw(st.sampled_from([b"\x00\x00\x08", b"\x00\x00\x08", b"\x00\x00\x09", b"\x00\x00\x0d", b"\x01\x00\x08"]))
    payload = raw[4 + 4 * raw[3]:]
    payload = draw(st.sampled_from([payload, payload[:-1], payload + b"\x00", b""]))
    return magic + bytes([ndim]) + b"".join(d.to_bytes(4, "big") for d in dims) + payload


@st.composite
def idx_mutations(draw):
    name = draw(st.sampled_from(sorted(IDX_FILES)))
    raw = IDX_FILES[name]
    how = draw(st.sampled_from(["stored-bytes", "raw-bytes", "header"]))
    if how == "header":
        raw = draw(idx_header_lies(raw))
        return name, stored(name, raw)
    if how == "raw-bytes":
        return name, stored(name, draw(corruptions(raw, ((0, 4 + 4 * raw[3]),))).data)
    data = stored(name, raw)
    return name, draw(corruptions(data, ((0, 20), (len(data) - 8, len(data))))).data


def decompressed(name: str, data: bytes) -> bytes | None:
    if not name.endswith(".gz"):
        return data
    try:
        return gzip.decompress(data)
    except Exception:  # the reference: anything gzip cannot read must be refused
        return None


@settings(FUZZ, max_examples=EXAMPLES)
@given(mutation=idx_mutations(), dataset=st.sampled_from(["MNIST", "FashionMNIST"]))
def test_idx_source(mutation, dataset):
    name, data = mutation
    split = "train" if name.startswith("raw/train") else "test"
    files = {n: stored(n, raw) for n, raw in IDX_FILES.items()} | {name: data}
    arrays = {n: parse_idx(decompressed(n, content)) for n, content in files.items()}
    images = next(arrays[n] for n in files if n.startswith(f"raw/{'train' if split == 'train' else 't10k'}-images"))
    labels = next(arrays[n] for n in files if n.startswith(f"raw/{'train' if split == 'train' else 't10k'}-labels"))
    shapes_ok = (images is not None and labels is not None and images.ndim == 3 and labels.ndim == 1
                 and len(images) == len(labels) and min(images.shape[1:], default=0) > 0)
    bad_label = next((i for i, y in enumerate(labels) if y >= 10), None) if shapes_ok else None
    with case("idx"), tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = root / "tv" / dataset
        for n, content in files.items():
            (base / n).parent.mkdir(parents=True, exist_ok=True)
            (base / n).write_bytes(content)
        source = TorchvisionSource(dataset, root=root / "tv", download=False)
        card, error = ingest_checked(root, source, split, root / "out")
        got = read_back(root / "out") if card is not None else None
    split_files = [str(base / n) for n in files if n.startswith(f"raw/{'train' if split == 'train' else 't10k'}")]
    if error is not None:
        # a 0-d labels file (ndim 0 in its header) has no len() and no sample to blame
        check_error(error, split_files + [source.spec],
                    {f"{split}/{i}" for i in range(labels.shape[0] if labels.ndim else 0)}
                    if labels is not None else None)
    if not shapes_ok or bad_label is not None or len(images) == 0:
        assert error is not None, f"IDX {name} should be refused (images {None if images is None else images.shape})"
        if shapes_ok and bad_label is not None:
            assert error.key == f"{split}/{bad_label}"
        return
    assert error is None, f"valid IDX files refused: {error}"
    got_images, got_labels, _ = got
    assert np.array_equal(got_images, images[..., None]) and got_labels == labels.tolist()


# =========================================================================== CIFAR pickles


def _cifar_templates() -> dict[str, dict[str, bytes]]:
    from formats import make_cifar10, make_cifar100

    templates = {}
    for name, make in [("CIFAR10", lambda r: make_cifar10(r, n_per_batch=1)), ("CIFAR100", lambda r: make_cifar100(r, n=2))]:
        with tempfile.TemporaryDirectory() as tmp:
            make(Path(tmp))
            templates[name] = {p.relative_to(tmp).as_posix(): p.read_bytes()
                               for p in sorted(Path(tmp).rglob("*")) if p.is_file()}
    return templates


CIFAR = _cifar_templates()
CIFAR_BATCH_FAULTS = ["data-3071", "data-float", "data-1d", "data-ragged", "data-missing", "labels-11",
                      "labels-negative", "labels-huge", "labels-str", "labels-float", "labels-short", "labels-none",
                      "labels-missing", "labels-nested", "labels-bool", "not-dict", "list"]
CIFAR_META_FAULTS = ["names-missing", "names-empty", "names-int", "names-str", "names-non-utf8", "names-nested",
                     "not-dict"]


def cifar_entry(dataset: str, n: int, seed: int, fault: str | None) -> object:
    rng = np.random.default_rng(seed)
    classes = 10 if dataset == "CIFAR10" else 100
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels: object = rng.integers(0, classes, n).tolist()
    key = "labels" if dataset == "CIFAR10" else "fine_labels"
    entry: dict = {"data": data, key: labels}
    if fault == "data-3071":
        entry["data"] = data[:, :3071]
    elif fault == "data-float":
        entry["data"] = data.astype(np.float32)
    elif fault == "data-1d":
        entry["data"] = data.ravel()
    elif fault == "data-ragged":
        entry["data"] = [data[0].tolist(), [1, 2]] if n else [[1], [1, 2]]
    elif fault == "data-missing":
        del entry["data"]
    elif fault == "labels-11":
        entry[key] = [classes] * n
    elif fault == "labels-negative":
        entry[key] = [-1] * n
    elif fault == "labels-huge":
        entry[key] = [2**70] * n
    elif fault == "labels-str":
        entry[key] = ["1"] * n
    elif fault == "labels-float":
        entry[key] = [1.5] * n
    elif fault == "labels-short":
        entry[key] = labels[:-1] if n else [0]
    elif fault == "labels-none":
        entry[key] = [None] * n
    elif fault == "labels-missing":
        del entry[key]
    elif fault == "labels-nested":
        entry[key] = [[1]] * n
    elif fault == "labels-bool":
        entry[key] = [True] * n
    elif fault == "not-dict":
        return 5
    elif fault == "list":
        return [data, labels]
    return {k.encode(): v for k, v in entry.items()} if dataset == "CIFAR10" else entry


def cifar_meta(dataset: str, fault: str | None) -> object:
    names = [f"c{i}" for i in range(10 if dataset == "CIFAR10" else 100)]
    key = "label_names" if dataset == "CIFAR10" else "fine_label_names"
    value: object = {None: names, "names-empty": [], "names-int": list(range(len(names))), "names-str": "abc",
                     "names-non-utf8": [b"\xff"] * len(names), "names-nested": [[n] for n in names]}.get(fault, names)
    if fault == "not-dict":
        return names
    if fault == "names-missing":
        return {"other": 1}
    return {key: value}


@st.composite
def cifar_cases(draw):
    dataset = draw(st.sampled_from(["CIFAR10", "CIFAR100"]))
    files = dict(CIFAR[dataset])
    batches = sorted(n for n in files if "meta" not in n)
    meta = next(n for n in files if "meta" in n)
    target = draw(st.sampled_from(batches + [meta]))
    how = draw(st.sampled_from(["bytes", "structure", "structure", "hostile"]))
    fault, expected_ok = None, None
    if how == "bytes":
        corruption = draw(corruptions(files[target]))
        files[target] = corruption.data
        expected_ok = None if corruption.changed else True
    elif how == "structure" and target == meta:
        fault = draw(st.sampled_from([None, None] + CIFAR_META_FAULTS))
        files[target] = pickle.dumps(cifar_meta(dataset, fault), protocol=draw(st.sampled_from([2, 4])))
        expected_ok = fault in (None, "names-int")
    elif how == "structure":
        fault = draw(st.sampled_from([None] * 4 + CIFAR_BATCH_FAULTS))
        n = draw(st.integers(0, 2))
        files[target] = pickle.dumps(cifar_entry(dataset, n, draw(st.integers(0, 99)), fault),
                                     protocol=draw(st.sampled_from([2, 4])))
        expected_ok = fault is None or (n == 0 and fault in ("labels-11", "labels-negative", "labels-huge",
                                                             "labels-str", "labels-float", "labels-none",
                                                             "labels-nested", "labels-bool"))
    else:
        fault = draw(st.sampled_from(HOSTILE_NAMES))
        files[target] = None  # built in the case, around its canary
        expected_ok = False
    split = ("train" if "data_batch" in target or target.endswith("/train") else "test") if target != meta \
        else draw(st.sampled_from(["train", "test"]))
    return dataset, files, target, split, how, fault, expected_ok


@settings(FUZZ, max_examples=EXAMPLES)
@given(cifar=cifar_cases())
def test_cifar_source(cifar):
    dataset, files, target, split, how, fault, expected_ok = cifar
    with case("cifar"), tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        canary = root / "canary"
        for name, content in files.items():
            (root / "tv" / name).parent.mkdir(parents=True, exist_ok=True)
            (root / "tv" / name).write_bytes(hostile_pickles(canary)[fault] if content is None else content)
        source = TorchvisionSource(dataset, root=root / "tv", download=False)
        card, error = ingest_checked(root, source, split, root / "out")
        got = read_back(root / "out") if card is not None else None
        assert not canary.exists(), "a pickle ran code"
    path = root / "tv" / target
    if error is not None:
        check_error(error, [root / "tv", source.spec])
        if how != "bytes":
            assert error.path in (str(path), source.spec), f"{how} {fault}: error blames the wrong file: {error}"
    if expected_ok is False:
        assert error is not None, f"{how} {fault}: a bad CIFAR file was accepted"
    if expected_ok and error is not None:
        assert error.path == source.spec and "no samples" in error.message, f"{how} {fault}: refused: {error}"
    if got is not None:
        images, labels, card = got
        assert card["image_shape"] == [32, 32, 3] and all(0 <= y < len(card["classes"]) for y in labels)


# =========================================================================== SVHN .mat


def svhn_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    digits = np.arange(n) % 10
    return images, digits


SVHN_X_FAULTS = ["float64", "int16", "gray", "small", "3d", "5d", "missing", "char", "cell", "bool"]
SVHN_Y_FAULTS = ["fraction", "nan", "eleven", "negative", "size", "missing", "char", "cell", "bool", "huge"]
SVHN_Y_BENIGN = ["float", "row", "zero", "uint8"]


def svhn_mat(n: int, seed: int, x_fault: str | None, y_fault: str | None) -> tuple[dict, bool]:
    images, digits = svhn_arrays(n, seed)
    stored_y = np.where(digits == 0, 10, digits).reshape(-1, 1)
    x: object = images.transpose(1, 2, 3, 0)
    y: object = stored_y
    x = {"float64": lambda: x.astype(np.float64), "int16": lambda: x.astype(np.int16) + 256,
         "gray": lambda: x[:, :, :1], "small": lambda: x[:8, :8], "3d": lambda: np.zeros((32, 32, 3), np.uint8),
         "5d": lambda: x[..., None], "char": lambda: "abc", "cell": lambda: np.array([[1], [2]], dtype=object),
         "bool": lambda: x > 127, None: lambda: x, "missing": lambda: None}[x_fault]()
    y = {"float": lambda: stored_y.astype(np.float64), "row": lambda: stored_y.reshape(1, -1),
         "zero": lambda: np.zeros_like(stored_y), "uint8": lambda: stored_y.astype(np.uint8),
         "fraction": lambda: stored_y + 0.5, "nan": lambda: np.full(stored_y.shape, np.nan),
         "eleven": lambda: np.full_like(stored_y, 11), "negative": lambda: np.full_like(stored_y, -1),
         "size": lambda: np.ones((n + 1, 1)), "char": lambda: "abc", "cell": lambda: np.array([[1]], dtype=object),
         "bool": lambda: stored_y > 3, "huge": lambda: np.full_like(stored_y, 2**40), None: lambda: stored_y,
         "missing": lambda: None}[y_fault]()
    mat = {k: v for k, v in {"X": x, "y": y}.items() if v is not None}
    return mat, x_fault is None and y_fault in (None, *SVHN_Y_BENIGN) and n > 0  # an empty split is refused too


@st.composite
def svhn_cases(draw):
    split = draw(st.sampled_from(["train", "test", "extra"]))
    how = draw(st.sampled_from(["bytes", "structure", "structure"]))
    n = draw(st.integers(0, 2)) if how == "structure" else 2
    x_fault = draw(st.sampled_from([None] * 6 + SVHN_X_FAULTS)) if how == "structure" else None
    y_fault = draw(st.sampled_from([None] * 4 + SVHN_Y_FAULTS + SVHN_Y_BENIGN)) if how == "structure" else None
    seed = draw(st.integers(0, 99))
    mat, valid = svhn_mat(n, seed, x_fault, y_fault)
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, mat)
    data = buffer.getvalue()
    if how == "bytes":
        corruption = draw(corruptions(data, ((0, 128), (128, 400))))
        data, valid = corruption.data, (None if corruption.changed else True)
    return split, data, how, (x_fault, y_fault), n, seed, valid


SVHN_BASE = io.BytesIO()
scipy.io.savemat(SVHN_BASE, svhn_mat(2, 0, None, None)[0])


@settings(FUZZ, max_examples=EXAMPLES)
@given(svhn=svhn_cases(), others=st.sampled_from([True, True, True, False]))
def test_svhn_source(svhn, others):
    """A corrupted or oddly shaped .mat; `others`: the other splits' files are there."""
    split, data, how, faults, n, seed, valid = svhn
    with case("svhn"), tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = root / "tv" / f"{split}_32x32.mat"
        path.parent.mkdir()
        if others:  # the card lists the hashes of every split's file
            for other in ("train", "test", "extra"):
                (root / "tv" / f"{other}_32x32.mat").write_bytes(SVHN_BASE.getvalue())
        else:
            valid = False if valid else valid
        path.write_bytes(data)
        source = TorchvisionSource("svhn", root=root / "tv", download=False)
        card, error = ingest_checked(root, source, split, root / "out")
        got = read_back(root / "out") if card is not None else None
    if error is not None:
        check_error(error, [root / "tv", source.spec], {f"{split}/{i}" for i in range(n + 1)})
    if valid is False:
        assert error is not None, f"{how} {faults}: bad SVHN data was accepted"
    elif valid:
        assert error is None, f"{how} {faults}: good SVHN data was refused: {error}"
        images, labels, _ = got
        want_images, want_digits = svhn_arrays(n, seed)
        want_labels = [0] * n if faults[1] == "zero" else want_digits.tolist()
        assert np.array_equal(images, want_images) and labels == want_labels
    if got is not None:
        assert got[2]["image_shape"] == [32, 32, 3] and all(0 <= y < 10 for y in got[1])


# =========================================================================== image folders

CLASS_NAMES = ["cat", "dog", "a.b", "x y", "\u00fc", "-", "\udcff", "7"]
FILE_NAMES = ["img0.png", "b.PNG", "c.jpg", "d.JPEG", "a.b.png", "x y.png", "\u00fc.png", "\udcfe.png", ".png",
              "noext", "n.txt", "z.gif"]
ENTRY_KINDS = ["image"] * 8 + ["dir", "symlink-outside", "symlink-broken"]


@st.composite
def image_trees(draw):
    splits = [None] if draw(st.booleans()) else draw(st.lists(st.sampled_from(SPLIT_NAMES), min_size=1, max_size=2,
                                                             unique=True))
    classes = draw(st.lists(st.sampled_from(CLASS_NAMES), min_size=1, max_size=3, unique=True))
    entries = []  # (split, class, file name, kind, ImageCase | None); file None: the class folder itself
    for split in splits:
        for name in draw(st.lists(st.sampled_from(classes), min_size=1, max_size=len(classes), unique=True)):
            entries.append((split, name, None, "folder", None))
            for file in draw(st.lists(st.sampled_from(FILE_NAMES), max_size=3, unique=True)):
                kind = draw(st.sampled_from(ENTRY_KINDS))
                image = draw(image_cases(good_weight=4)) if kind != "dir" and kind != "symlink-broken" else None
                entries.append((split, name, file, kind, image))
    mode = draw(st.sampled_from(["auto", "auto", "L", "RGB"]))
    resize = draw(st.sampled_from([None, None, (4, 6)]))
    return entries, mode, resize


def utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def model_image_folder(entries, mode, resize):
    """Expected {split: [(key, label, ImageCase)]}, the classes and the image mode, or None
    when the tree must be refused (with the keys/paths at fault)."""
    splits = sorted({e[0] for e in entries}, key=lambda s: SPLIT_NAMES.index(s) if s else -1)
    classes = sorted({e[1] for e in entries})
    bad, result, channels = set(), {}, set()
    for split in splits:
        rows = []
        for label, name in enumerate(classes):
            if not any(e[1] == name for e in entries if e[0] == split):
                continue  # no such class folder in this split
            files = sorted((e for e in entries if e[0] == split and e[1] == name and e[2]), key=lambda e: e[2])
            images = [e for e in files if Path(e[2]).suffix.lower() in IMAGE_SUFFIXES]
            if not images:
                bad.add(f"{split}/{name}" if split else name)
            for _, _, file, kind, image in images:
                key = "/".join(p for p in (split, name, file) if p)
                if kind in ("dir", "symlink-broken") or not image.ok or not utf8(key):
                    bad.add(key)
                else:
                    rows.append((key, label, image))
                    channels.add(image.shape[2])
        result[split or "train"] = rows
    if not all(utf8(c) for c in classes):
        bad.add("class names")
    resolved = mode if mode != "auto" else ("L" if channels == {1} else "RGB")
    return (None if bad else result), bad, classes, resolved


@settings(FUZZ, max_examples=EXAMPLES)
@given(tree=image_trees())
def test_image_folder_source(tree):
    entries, mode, resize = tree
    expected, bad, classes, resolved = model_image_folder(entries, mode, resize)
    with case("imagefolder"), tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src, outside = root / "src", root / "outside"
        outside.mkdir()
        for split, name, file, kind, image in entries:
            folder = src / split / name if split else src / name
            folder.mkdir(parents=True, exist_ok=True)
            if kind == "folder":
                continue
            if kind == "dir":
                (folder / file).mkdir()
            elif kind == "symlink-broken":
                (folder / file).symlink_to(outside / "nowhere.png")
            elif kind == "symlink-outside":
                target = outside / f"{len(list(outside.iterdir()))}.img"
                target.write_bytes(image.data)
                (folder / file).symlink_to(target)
            else:
                (folder / file).write_bytes(image.data)
        source = ImageFolderSource(src, mode=mode, resize=resize)
        results, errors = {}, []
        splits, error = attempt(source.splits)
        for i, split in enumerate(splits or []):
            card, error = ingest_checked(root, source, split, root / "out" / str(i))
            if error is not None:
                errors.append(error)
                break
            results[split] = read_back(root / "out" / str(i)) + (load_origin_keys(root / "out" / str(i)),)
    if expected is None:
        assert errors, f"image folder with faults {sorted(map(ascii, bad))} was accepted"
    for exc in errors:
        check_error(exc, [src])
        if exc.key is not None:
            assert exc.key in bad, f"error blames {exc.key!r}, faults are {sorted(map(ascii, bad))}"
    if expected is not None:
        assert not errors, f"a good image folder was refused: {errors[0]}"
        assert sorted(results) == sorted(expected)
        for split, (images, labels, card, origin_keys) in results.items():
            rows = expected[split]
            assert card["classes"] == classes and labels == [label for _, label, _ in rows]
            assert origin_keys == [key for key, _, _ in rows]
            channels = 1 if resolved == "L" else 3
            for image, (key, _, case_) in zip(images, rows):
                height, width = resize or case_.shape[:2]
                assert image.shape == (height, width, channels), key
                if case_.pixels is not None and resize is None and case_.shape[2] == channels:
                    assert np.array_equal(image, case_.pixels), key


# =========================================================================== shards source

DIR_NAMES = ["train", "val", "test", "d1", "x.y", "a b", "\u00fc", "-", "_x"]
CARD_CASES = {"none": None, "valid": b'{"classes": ["a", "b", "c"]}', "short": b'{"classes": ["a", "b"]}',
              "empty": b'{"classes": []}', "string": b'{"classes": "abc"}', "list": b'["a", "b", "c"]',
              "non-utf8": b'{"classes": ["\xff"]}', "deep": b"[" * 50000, "int": b"5"}


@st.composite
def shard_dirs(draw):
    names = draw(st.lists(st.sampled_from(DIR_NAMES), min_size=1, max_size=2, unique=True))
    dirs = []
    for i, name in enumerate(names):
        how = draw(st.sampled_from(["clean", "clean", "bytes", "members"]))
        if how == "clean":
            dirs.append((name, how, shard_copy(i), None))
        elif how == "bytes":
            original = shard_copy(i)
            dirs.append((name, how, draw(corruptions(original)).data, None))
        else:
            entries = draw(shard_entries())
            dirs.append((name, how, tar_bytes([m for m, _ in entries]), entries))
    card = draw(st.sampled_from(sorted(CARD_CASES)))
    declared = draw(st.sampled_from([None, None, ["a", "b", "c"], ["a"]]))
    return dirs, card, declared


SHARD_COPIES: dict[int, bytes] = {}


def shard_copy(i: int) -> bytes:
    """The base shard with keys prefixed by the directory index (so no key repeats across dirs)."""
    if i not in SHARD_COPIES:
        with tempfile.TemporaryDirectory() as tmp:
            write_shard(Path(tmp) / "s.tar", [Sample(f"d{i}{s.key.replace('/', '_')}", s.image, s.label, s.info)
                                              for s in SHARD_SAMPLES])
            SHARD_COPIES[i] = (Path(tmp) / "s.tar").read_bytes()
    return SHARD_COPIES[i]


def model_shards_source(dirs, card, declared):
    """Expected {split: [labels]} and classes, None (must refuse), or '?' (unknown: corrupted bytes)."""
    per_dir, unknown = [], False
    for name, how, data, entries in dirs:
        if how == "clean":
            per_dir.append([s.label for s in SHARD_SAMPLES])
        elif how == "bytes":
            unknown = True  # a corrupted shard may still read: only the error contract is checked
            per_dir.append([])
        else:
            samples, _, _ = model_shard(entries)
            if samples is None:
                return None
            per_dir.append([label for _, _, label, _ in samples])
    if len(dirs) > 1 and not all(KEY_PATTERN.match(name) and "/" not in name for name, *_ in dirs):
        return None
    if declared:
        classes = declared
    elif card != "none":
        parsed = {"valid": ["a", "b", "c"], "short": ["a", "b"]}.get(card)
        if parsed is None:
            return None
        classes = parsed
    else:
        if unknown:
            return "?"
        top = max((label for labels in per_dir for label in labels), default=-1)
        if top < 0:
            return None
        classes = [str(i) for i in range(top + 1)]
    if unknown:
        return "?"
    if any(label < 0 or label >= len(classes) for labels in per_dir for label in labels):
        return None
    if not all(per_dir):
        return None  # a split with no samples is refused, as for every source (ingest_split)
    if len(dirs) == 1:
        split = dirs[0][0] if dirs[0][0] in SPLIT_NAMES else "train"
        return {split: per_dir[0]}, classes
    return {name: labels for (name, *_), labels in zip(dirs, per_dir)}, classes


@settings(FUZZ, max_examples=EXAMPLES)
@given(shards=shard_dirs())
def test_shards_source(shards):
    dirs, card, declared = shards
    expected = model_shards_source(dirs, card, declared)
    with case("shards-source"), tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, _, data, _ in dirs:
            (root / "in" / name).mkdir(parents=True)
            (root / "in" / name / "shard-000000.tar").write_bytes(data)
        if CARD_CASES[card] is not None:
            (root / "in" / sorted(d[0] for d in dirs)[0] / "card.json").write_bytes(CARD_CASES[card])
        results, errors = {}, []
        source, error = attempt(lambda: ShardsSource(str(root / "in" / "*" / "*.tar"), declared_classes=declared))
        splits, error = attempt(source.splits) if source is not None else (None, error)
        if error is not None:
            errors.append(error)
        for i, split in enumerate(splits or []):
            card_out, error = ingest_checked(root, source, split, root / "out" / str(i))
            if error is not None:
                errors.append(error)
                break
            images, labels, card_out = read_back(root / "out" / str(i))
            assert [key for key in load_keys(root / "out" / str(i))] == \
                [f"{split}_{j:07d}" for j in range(len(labels))]
            results[split] = (labels, card_out)
    for exc in errors:
        check_error(exc, [root / "in"] + ([source.spec] if source is not None else []))
    if expected is None:
        assert errors, "bad shards were ingested"
    elif expected != "?":
        assert not errors, f"good shards were refused: {errors[0]}"
        splits_expected, classes = expected
        assert sorted(results) == sorted(splits_expected)
        for split, (labels, card_out) in results.items():
            assert labels == splits_expected[split] and card_out["classes"] == classes


def load_keys(out: Path) -> list[str]:
    return read_manifest(out / MANIFEST_NAME).column("key").to_pylist()


def load_origin_keys(out: Path) -> list[str]:
    return read_manifest(out / MANIFEST_NAME).column("origin_key").to_pylist()

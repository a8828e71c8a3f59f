"""Webdataset shards: deterministic writing, safe reading.

A shard is a tar file `shard-%06d.tar` holding, per sample key, a lossless
`png` image, a `cls` integer label and a `json` metadata object. Tar headers
carry a fixed mtime, owner and mode, so the same samples always give the same
bytes (webdataset stamps the current time by default).

Reading goes through webdataset's tar iteration, then through our own decoder
that accepts only png/jpg/cls/json/txt members: webdataset's default decoders
would unpickle `.pyd`/`.pth` members, so a shard carrying one is refused.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator

import numpy as np
import webdataset as wds
from PIL import Image

from robustdata.errors import DataError
from robustdata.io import atomic_file, sha256_bytes

SHARD_NAME = "shard-{index:06d}.tar"
FIXED_MTIME = 946684800  # 2000-01-01T00:00:00Z: reproducible tar headers
IMAGE_MEMBERS = ("png", "jpg", "jpeg")
ALLOWED_MEMBERS = frozenset(IMAGE_MEMBERS + ("cls", "json", "txt"))
# Members that webdataset's stock decoders would unpickle or torch.load.
PICKLE_MEMBERS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "mp", "msgpack", "npy", "npz", "ten"})
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")
# Decoding is bounded: no image in this field is anywhere near this size, and
# PIL's own bomb check only warns below twice its limit.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024


@dataclass
class Sample:
    """One decoded sample: image is uint8 with shape (H, W, C), C in {1, 3}."""

    key: str
    image: np.ndarray
    label: int
    info: dict[str, Any] = field(default_factory=dict)


def validate_key(key: str, path: str | Path | None = None) -> str:
    if not KEY_PATTERN.match(key):
        raise DataError(
            "invalid sample key: use letters, digits, '_', '-' and inner '/' only "
            "(no dots, no absolute paths, no '..')",
            path=path,
            key=key,
        )
    return key


# --------------------------------------------------------------------------- images


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG of a uint8 (H, W, C) image; byte-identical for equal pixels."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"expected uint8 (H, W, 1|3) image, got {image.dtype} {image.shape}")
    pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def decode_image(data: bytes, *, path: str | Path | None = None, key: str | None = None,
                 mode: str | None = None) -> np.ndarray:
    """Decode PNG/JPEG bytes to uint8 (H, W, C).

    mode: None keeps grayscale as 1 channel and turns everything else into RGB;
    "L" or "RGB" forces that mode.
    """
    try:
        with Image.open(io.BytesIO(data)) as pil:
            if pil.format not in ("PNG", "JPEG"):
                raise DataError(f"image member is {pil.format}, expected PNG or JPEG", path=path, key=key)
            width, height = pil.size
            if width * height > MAX_IMAGE_PIXELS:
                raise DataError(
                    f"image declares {width}x{height} pixels, over the {MAX_IMAGE_PIXELS} limit",
                    path=path, key=key)
            target = mode or ("L" if pil.mode in ("L", "1", "I;16", "I") else "RGB")
            array = np.array(pil.convert(target))  # a writable copy
    except DataError:
        raise
    except Exception as exc:  # PIL raises many types for corrupt bytes
        raise DataError(f"member is not a readable image ({type(exc).__name__}: {exc})",
                        path=path, key=key) from exc
    return array[:, :, None] if array.ndim == 2 else array


def quantize(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] -> uint8 by rounding x * 255 (used for built datasets)."""
    if not np.isfinite(images).all():
        raise ValueError("images contain NaN or inf")
    return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- writing


def encode_sample(sample: Sample) -> dict[str, Any]:
    return {
        "__key__": sample.key,
        "png": encode_png(sample.image),
        "cls": str(int(sample.label)).encode(),
        "json": json.dumps(sample.info, sort_keys=True, separators=(",", ":")).encode(),
    }


def write_shard(path: Path, samples: Iterable[Sample]) -> list[dict[str, Any]]:
    """Write one shard atomically; return one manifest row per sample."""
    rows = []
    with atomic_file(path) as tmp, open(tmp, "wb") as stream:
        writer = wds.TarWriter(stream, encoder=False, mtime=FIXED_MTIME,
                               user="robustdata", group="robustdata", mode=0o444)
        for sample in samples:
            encoded = encode_sample(sample)
            writer.write(encoded)
            rows.append({"key": sample.key, "shard": path.name, "label": int(sample.label),
                         "sha256": sha256_bytes(encoded["png"]), **sample.info})
        writer.close()
    return rows


def chunked(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_shards(samples: Iterable[Sample], out_dir: Path, shard_size: int) -> list[dict[str, Any]]:
    """Write samples into consecutive shards of `shard_size`; return manifest rows."""
    rows: list[dict[str, Any]] = []
    for index, chunk in enumerate(chunked(samples, shard_size)):
        rows.extend(write_shard(out_dir / SHARD_NAME.format(index=index), chunk))
    return rows


# --------------------------------------------------------------------------- reading


def has_end_marker(path: str | Path) -> bool:
    """Whether a tar ends with its two zero blocks: a tar cut at a member boundary
    otherwise reads as a valid, shorter archive."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 1024 or size % 512:
            return False
        f.seek(size - 1024)
        return f.read(1024) == bytes(1024)


def iter_shard_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Raw webdataset records ({'__key__', ext: bytes, ...}) of one shard.

    Errors (truncated tar, unreadable file, disallowed member, duplicate member)
    become a DataError naming the file and the last complete key. Records are
    yielded one behind, so the last one of a truncated file is never passed on.
    """
    path = str(path)
    try:
        complete = has_end_marker(path)
    except OSError as exc:
        raise DataError(f"unreadable shard ({exc.strerror or exc})", path=path) from exc
    if complete:
        check_tar_members(path)
    pipeline = wds.DataPipeline(wds.SimpleShardList([path]), wds.tarfile_to_samples())
    iterator = iter(pipeline)
    pending, key = None, None
    while True:
        try:
            record = next(iterator)
        except StopIteration:
            break
        except Exception as exc:
            raise DataError(f"corrupt or unreadable shard ({after(key)}): {type(exc).__name__}: "
                            f"{exc.args[0] if exc.args else exc}", path=path) from exc
        check_members(record, path)
        if pending is not None:
            key = pending["__key__"]
            yield pending
        pending = record
    if not complete:
        raise DataError(f"truncated shard: no end-of-archive marker ({after(key)})", path=path)
    if pending is not None:
        yield pending


def check_tar_members(path: str) -> None:
    """Refuse members webdataset would silently skip (links, devices, FIFOs: a shard of them reads as
    empty) and names that point outside the shard (absolute, or through '..'). Headers only: tarfile seeks
    past the data. A corrupt archive is left to the record reader, which names the last good key."""
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                parts = PurePosixPath(info.name).parts
                if info.name.startswith("/") or ".." in parts:
                    raise DataError(f"member {info.name!r} names a path outside the shard: refusing it", path=path)
                if not (info.isreg() or info.isdir()):
                    kind = "link" if info.issym() or info.islnk() else "special file"
                    raise DataError(f"member {info.name!r} is a {kind}, not a regular file: refusing it", path=path)
    except tarfile.TarError:
        return


def after(key: str | None) -> str:
    return f"after key {key!r}" if key else "before the first complete sample"


def check_members(record: dict[str, Any], path: str) -> None:
    key = record["__key__"]
    validate_key(key, path)
    for member in record:
        if member.startswith("__"):
            continue
        if member in PICKLE_MEMBERS or member.endswith(tuple("." + m for m in PICKLE_MEMBERS)):
            raise DataError(f"refusing pickle-type member '.{member}': robustdata never unpickles data",
                            path=path, key=key)
        if member not in ALLOWED_MEMBERS:
            raise DataError(f"member '.{member}' is not one of {sorted(ALLOWED_MEMBERS)} "
                            "(keys must not contain dots)", path=path, key=key)


def decode_label(data: bytes, path: str, key: str) -> int:
    try:
        return int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"cls member {data[:20]!r} is not an integer label", path=path, key=key) from exc


def decode_info(data: bytes, path: str, key: str) -> dict[str, Any]:
    try:
        info = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"json member is not valid UTF-8 JSON ({exc})", path=path, key=key) from exc
    if not isinstance(info, dict):
        raise DataError("json member must be an object", path=path, key=key)
    return info


def decode_record(record: dict[str, Any], path: str, mode: str | None = None) -> Sample:
    """A safe decode of one record: exactly one image member and a cls label."""
    key = record["__key__"]
    images = [m for m in IMAGE_MEMBERS if m in record]
    if len(images) != 1:
        raise DataError(f"expected exactly one image member ({'/'.join(IMAGE_MEMBERS)}), found "
                        f"{images or 'none'}", path=path, key=key)
    if "cls" not in record:
        raise DataError("sample has no cls (label) member", path=path, key=key)
    return Sample(
        key=key,
        image=decode_image(record[images[0]], path=path, key=key, mode=mode),
        label=decode_label(record["cls"], path, key),
        info=decode_info(record["json"], path, key) if "json" in record else {},
    )


def iter_shard(path: str | Path, mode: str | None = None) -> Iterator[Sample]:
    for record in iter_shard_records(path):
        yield decode_record(record, str(path), mode)


def iter_shards(paths: Iterable[str | Path], mode: str | None = None) -> Iterator[Sample]:
    """Decoded samples of several shards in order; a key seen twice is an error."""
    seen: dict[str, str] = {}
    for path in paths:
        for sample in iter_shard(path, mode):
            if sample.key in seen:
                raise DataError(f"duplicate key (first seen in {seen[sample.key]})",
                                path=path, key=sample.key)
            seen[sample.key] = str(path)
            yield sample

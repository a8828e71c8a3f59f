"""Webdataset shards: deterministic writing, safe reading.

A shard is a tar file `shard-%06d.tar` holding, per sample key, a lossless
`png` image, a `cls` integer label and a `json` metadata object. Tar headers
carry a fixed mtime, owner and mode, so the same samples always give the same
bytes (webdataset stamps the current time by default).

Reading checks the whole tar structure from its headers first, then reads the
members, grouped by key as webdataset groups them, and decodes them with our own
decoder that accepts only png/jpg/cls/json/txt members: webdataset's default
decoders would unpickle `.pyd`/`.pth` members, so a shard carrying one is
refused. Anything webdataset would silently skip (links, metadata names) is
refused too, so every reader sees the same samples.
"""

from __future__ import annotations

import io
import json
import re
import struct
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

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
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (they carry the size); C4, C8 and CC are other markers
JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


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
    """Decode PNG/JPEG bytes to uint8 (H, W, C), refusing images over MAX_IMAGE_PIXELS.

    mode: None keeps grayscale as 1 channel and turns everything else into RGB;
    "L" or "RGB" forces that mode.
    """
    check_pixels(declared_size(data), path, key)  # from the header, before PIL sees the bytes
    try:
        with Image.open(io.BytesIO(data), formats=("PNG", "JPEG")) as pil:
            if pil.format not in ("PNG", "JPEG"):  # an MPO opens through the JPEG plugin
                raise DataError(f"image member is {pil.format}, expected PNG or JPEG", path=path, key=key)
            check_pixels(pil.size, path, key)
            if 0 in pil.size:
                raise DataError(f"image declares {pil.size[0]}x{pil.size[1]} pixels: it is empty",
                                path=path, key=key)
            target = mode or ("L" if pil.mode in ("L", "1", "I;16", "I") else "RGB")
            array = np.array(pil.convert(target))  # a writable copy
    except DataError:
        raise
    except UnidentifiedImageError as exc:  # its message names only an in-memory file object
        raise DataError("member is not a readable image: not PNG or JPEG, or its header is corrupt",
                        path=path, key=key) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # the warning under -W error
        raise DataError(f"image is over the decoding limit in pixels ({exc})", path=path, key=key) from exc
    except Exception as exc:  # PIL raises many types for corrupt bytes
        raise DataError(f"member is not a readable image ({type(exc).__name__}: {exc})",
                        path=path, key=key) from exc
    return array[:, :, None] if array.ndim == 2 else array


def check_pixels(size: tuple[int, int] | None, path: str | Path | None, key: str | None) -> None:
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise DataError(f"image declares {size[0]}x{size[1]} pixels, over the decoding limit of "
                        f"{MAX_IMAGE_PIXELS} pixels", path=path, key=key)


def declared_size(data: bytes) -> tuple[int, int] | None:
    """The largest (width, height) a PNG's IHDR or a JPEG's SOF headers declare, if any.

    Read by hand because PIL cannot be asked first: it fails to identify a PNG
    whose header chunk is corrupt (so its error would not say why), and only warns
    about a bomb up to twice its own limit. The largest counts, as PIL keeps the
    last header of several.
    """
    sizes = png_sizes(data) if data.startswith(PNG_SIGNATURE) else (
        jpeg_sizes(data) if data.startswith(b"\xff\xd8") else [])
    return max(sizes, key=lambda size: size[0] * size[1], default=None)


def png_sizes(data: bytes) -> list[tuple[int, int]]:
    """(width, height) of each IHDR chunk before the image data."""
    sizes, at = [], len(PNG_SIGNATURE)
    while at + 16 <= len(data):  # chunk: length, type, data, crc
        length, tag = struct.unpack(">I4s", data[at:at + 8])
        if tag == b"IHDR":
            sizes.append(struct.unpack(">II", data[at + 8:at + 16]))
        if tag in (b"IDAT", b"IEND"):
            break
        at += 12 + length
    return sizes


def jpeg_sizes(data: bytes) -> list[tuple[int, int]]:
    """(width, height) of each SOF marker before the scan data."""
    sizes, at = [], 2
    while at + 4 <= len(data):
        if data[at] != 0xFF or data[at + 1] == 0xFF:  # junk or fill bytes: skip, as PIL does
            at += 1
            continue
        marker = data[at + 1]
        if marker in (0xDA, 0xD9):  # start of scan, end of image
            break
        if marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            at += 2
            continue
        if marker in JPEG_SOF and at + 9 <= len(data):
            height, width = struct.unpack(">HH", data[at + 5:at + 9])
            sizes.append((width, height))
        at += 2 + struct.unpack(">H", data[at + 2:at + 4])[0]
    return sizes


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
    import webdataset as wds  # here: it imports torch, which the readers (card, verify, ...) need not load

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

# How webdataset splits a member name: the key is everything up to the first dot of the
# last path component, the extension the rest. Shards from any webdataset producer group alike.
MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
# Names webdataset skips as its own metadata: such a member would be invisible to it.
WDS_METADATA = re.compile(r"__[^/]*__($|/)")
END_MARKER = 2 * tarfile.BLOCKSIZE  # a tar ends with two zero blocks

# {key: {extension: (data offset, size)}} per sample, in shard order
Layout = dict[str, dict[str, tuple[int, int]]]


def iter_shard_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Raw records ({'__key__': key, extension: bytes, ...}) of one shard.

    The whole shard is checked from its tar headers first (see `scan_shard`), so a
    truncated or corrupt shard yields nothing: never a silently shorter result.
    Errors are DataErrors naming the file and, where there is one, the key.
    """
    path = str(path)
    layout = scan_shard(path)
    try:
        with open(path, "rb") as f:
            for key, members in layout.items():
                record: dict[str, Any] = {"__key__": key}
                for ext, (offset, size) in members.items():
                    f.seek(offset)
                    record[ext] = f.read(size)
                    if len(record[ext]) != size:
                        raise DataError("shard changed while it was read", path=path, key=key)
                yield record
    except OSError as exc:
        raise DataError(f"unreadable shard ({exc.strerror or exc})", path=path) from exc


def scan_shard(path: str) -> Layout:
    """Where each sample's members lie, after checking the shard's structure.

    tarfile only reads headers here and seeks past the data. It ends an archive
    quietly at a header it cannot parse (after the first), and a tar cut at a
    member boundary reads as a valid, shorter one, so what follows the last member
    must be the end-of-archive marker. Every member must be a regular file named
    KEY.EXT with an allowed extension, consecutive per key; each sample needs one
    image and a cls label.
    """
    layout: Layout = {}
    try:
        with open(path, "rb") as f:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for info in tar:
                    add_member(layout, info, path)
                end = tar.offset
            check_end(f, end, path, last_complete(layout))
    except DataError:
        raise
    except OSError as exc:
        raise DataError(f"unreadable shard ({exc.strerror or exc})", path=path) from exc
    except Exception as exc:  # hostile headers raise TarError, but also ValueError, UnicodeError...
        raise DataError(f"corrupt or unreadable shard ({after(last_complete(layout))}): "
                        f"{type(exc).__name__}: {exc}", path=path) from exc
    for key, members in layout.items():
        check_record(key, members, path)
    return layout


def add_member(layout: Layout, info: tarfile.TarInfo, path: str) -> None:
    """Check one tar member and add it to the layout, refusing anything webdataset
    would silently skip (links, devices, metadata names, names without a key): a
    shard of those would read as empty or short."""
    if info.isdir():
        return  # harmless: nothing is ever extracted, and webdataset skips them too
    name = info.name
    match = MEMBER_NAME.match(name)
    key = match.group(1) if match else None
    if name.startswith("/") or ".." in PurePosixPath(name).parts:
        raise DataError(f"member {name!r} names a path outside the shard: refusing it", path=path, key=key)
    if not info.isreg() or info.issparse():
        kind = "link" if info.issym() or info.islnk() else "special file"
        raise DataError(f"member {name!r} is a {kind}, not a regular file: refusing it", path=path, key=key)
    if match is None:
        raise DataError(f"member {name!r} is not named KEY.EXTENSION", path=path)
    if WDS_METADATA.match(name) or ("/" not in name and name.startswith("__") and name.endswith("__")):
        raise DataError(f"member {name!r} is named like webdataset metadata (which readers skip)",
                        path=path, key=key)
    validate_key(key, path)
    ext = match.group(2).lower()  # webdataset lower-cases extensions
    check_extension(ext, path, key)
    if key == next(reversed(layout), None):  # another member of the sample being read
        if ext in layout[key]:
            raise DataError(f"member '.{ext}' appears twice", path=path, key=key)
    elif key in layout:
        raise DataError("key appears twice in the shard (its members are not consecutive)", path=path, key=key)
    else:
        layout[key] = {}
    layout[key][ext] = (info.offset_data, info.size)


def check_extension(ext: str, path: str, key: str) -> None:
    if ext in PICKLE_MEMBERS or ext.endswith(tuple("." + m for m in PICKLE_MEMBERS)):
        raise DataError(f"refusing pickle-type member '.{ext}': robustdata never unpickles data",
                        path=path, key=key)
    if ext not in ALLOWED_MEMBERS:
        raise DataError(f"member '.{ext}' is not one of {sorted(ALLOWED_MEMBERS)} "
                        "(keys must not contain dots)", path=path, key=key)


def check_end(f: BinaryIO, end: int, path: str, key: str | None) -> None:
    """Only zeros may follow the last member: the end-of-archive marker, then padding."""
    f.seek(end)
    length = 0
    while chunk := f.read(1 << 20):
        if chunk.count(0) != len(chunk):
            at = end + length + len(chunk) - len(chunk.lstrip(b"\0"))
            raise DataError(f"corrupt or unreadable shard ({after(key)}): unreadable tar header or data "
                            f"at byte {at}", path=path)
        length += len(chunk)
    if length < END_MARKER:
        raise DataError(f"truncated shard: no end-of-archive marker ({after(key)})", path=path)


def last_complete(layout: Layout) -> str | None:
    """The last key known to be complete: the one before the sample being read."""
    keys = list(layout)
    return keys[-2] if len(keys) > 1 else None


def after(key: str | None) -> str:
    return f"after key {key!r}" if key else "before the first complete sample"


def check_record(key: str, members: Iterable[str], path: str) -> None:
    """A sample holds exactly one image member and a cls label."""
    images = [m for m in IMAGE_MEMBERS if m in members]
    if len(images) != 1:
        raise DataError(f"expected exactly one image member ({'/'.join(IMAGE_MEMBERS)}), found "
                        f"{images or 'none'}", path=path, key=key)
    if "cls" not in members:
        raise DataError("sample has no cls (label) member", path=path, key=key)


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
    except RecursionError as exc:  # json recurses per nesting level
        raise DataError("json member nests too deeply", path=path, key=key) from exc
    if not isinstance(info, dict):
        raise DataError("json member must be an object", path=path, key=key)
    return info


def decode_record(record: dict[str, Any], path: str, mode: str | None = None) -> Sample:
    """A safe decode of one record: exactly one image member and a cls label."""
    key = record["__key__"]
    check_record(key, record, path)
    image = next(m for m in IMAGE_MEMBERS if m in record)
    return Sample(
        key=key,
        image=decode_image(record[image], path=path, key=key, mode=mode),
        label=decode_label(record["cls"], path, key),
        info=decode_info(record["json"], path, key) if "json" in record else {},
    )


def iter_shard(path: str | Path, mode: str | None = None) -> Iterator[Sample]:
    for record in iter_shard_records(path):
        yield decode_record(record, str(path), mode)


def iter_shards(paths: Iterable[str | Path], mode: str | None = None,
                num_classes: int | None = None) -> Iterator[Sample]:
    """Decoded samples of several shards in order; a key seen twice is an error, and so
    is a label outside [0, num_classes) when num_classes is given."""
    seen: dict[str, str] = {}
    for path in paths:
        for sample in iter_shard(path, mode):
            if sample.key in seen:
                raise DataError(f"duplicate key (first seen in {seen[sample.key]})",
                                path=path, key=sample.key)
            if num_classes is not None and not 0 <= sample.label < num_classes:
                raise DataError(f"label {sample.label} is not one of the dataset's {num_classes} classes",
                                path=path, key=sample.key)
            seen[sample.key] = str(path)
            yield sample

"""Building blocks for the hostile-input suite (tests/test_fuzz.py).

- `case(reader)`: counts a case, times it, and bounds it (SIGALRM raises a
  BaseException no reader can swallow; faulthandler kills the run if native
  code hangs past three times the limit).
- `attempt(fn)`: (result, None) or (None, the DataError). Any other exception
  propagates and fails the test: that is the point.
- `corruptions(data)`: truncation, bit flips, overwrites, insertions, trailing
  garbage, an empty file, or nothing, with the byte ranges they changed.
- Image, tar and pickle builders with a known expected outcome, so tests can
  assert the exact result, not only "no crash".
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import json
import os
import signal
import struct
import tarfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from PIL import Image

from robustdata.data.shards import FIXED_MTIME, MAX_IMAGE_PIXELS
from robustdata.errors import DataError

# At least 1,000 cases per reader by default; raise it for a deeper run.
EXAMPLES = int(os.environ.get("ROBUSTDATA_FUZZ_EXAMPLES", "1000"))
CASE_SECONDS = float(os.environ.get("ROBUSTDATA_FUZZ_CASE_SECONDS", "10"))

# Deadlines are enforced by `case` (a hard per-case limit), not by hypothesis's
# timing, which is flaky on a loaded 2-core machine.
FUZZ = settings(deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much, HealthCheck.large_base_example])

CASES: Counter[str] = Counter()
SECONDS: Counter[str] = Counter()


# --------------------------------------------------------------------------- bounded cases


class CaseTimeout(BaseException):
    """A case ran past CASE_SECONDS. BaseException: `except Exception` in a reader
    must not be able to turn a hang into a DataError."""


@contextlib.contextmanager
def case(reader: str):
    CASES[reader] += 1

    def expire(signum, frame):
        raise CaseTimeout(f"{reader}: a case ran past {CASE_SECONDS} s (a hang or an unbounded decode)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    faulthandler.dump_traceback_later(CASE_SECONDS * 3, exit=True)  # stuck in native code
    start = time.perf_counter()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        faulthandler.cancel_dump_traceback_later()
        SECONDS[reader] += time.perf_counter() - start


def write_report(path: Path, wall_s: float | None = None) -> dict[str, Any]:
    report = {"examples_per_test": EXAMPLES, "total": sum(CASES.values()),
              "cases": dict(sorted(CASES.items())),
              "seconds": {k: round(v, 2) for k, v in sorted(SECONDS.items())}}
    if wall_s is not None:
        report["wall_s"] = round(wall_s, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return report


# --------------------------------------------------------------------------- outcomes


def attempt(fn: Callable[[], Any]) -> tuple[Any, DataError | None]:
    try:
        return fn(), None
    except DataError as exc:
        return None, exc


def within(path: str | Path, root: str | Path) -> bool:
    """Whether `path` is `root` or lies under it, after resolving '..' and links."""
    path, root = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    return path == root or root in path.parents


def check_error(exc: DataError, allowed: list[str | Path], keys: set | None = None) -> None:
    """The error names a file: one of `allowed` or one under an allowed directory,
    and its message starts with it; its key, when set, is one of `keys`."""
    assert exc.path is not None, f"error names no file: {exc}"
    assert str(exc).startswith(exc.path), exc
    assert any(exc.path == str(a) or within(exc.path, a) for a in allowed), \
        f"error names {exc.path}, expected one of {allowed}: {exc}"
    if keys is not None and exc.key is not None:
        assert exc.key in keys, f"error blames key {exc.key!r}, expected one of {sorted(map(str, keys))}: {exc}"


# --------------------------------------------------------------------------- byte corruption


@dataclass(frozen=True)
class Corruption:
    kind: str
    data: bytes
    spans: tuple[tuple[int, int], ...]  # changed byte ranges [start, stop) in the original

    def __repr__(self) -> str:  # the bytes themselves are too long to print usefully
        return f"Corruption({self.kind!r}, spans={self.spans}, {len(self.data)} bytes)"

    def _repr_pretty_(self, printer, cycle):  # what hypothesis prints for a failing case
        printer.text(repr(self))

    def touches(self, start: int, stop: int) -> bool:
        return any(lo < stop and start < hi for lo, hi in self.spans)

    @property
    def changed(self) -> bool:
        return bool(self.spans)


CORRUPTION_KINDS = ["flip"] * 4 + ["truncate"] * 2 + ["overwrite"] * 2 + ["insert", "append", "empty", "none"]


@st.composite
def corruptions(draw, original: bytes, hot: tuple[tuple[int, int], ...] = ()) -> Corruption:
    """One random corruption of `original`; positions fall in `hot` ranges half the time."""
    n = len(original)

    def position() -> int:
        if hot and draw(st.booleans()):
            lo, hi = draw(st.sampled_from(hot))
            return draw(st.integers(lo, max(lo, min(hi, n) - 1)))
        return draw(st.integers(0, n - 1))

    kind = draw(st.sampled_from(CORRUPTION_KINDS))
    if kind == "none":
        return Corruption(kind, original, ())
    if kind == "empty":
        return Corruption(kind, b"", ((0, n),))
    if kind == "truncate":
        cut = position()
        return Corruption(kind, original[:cut], ((cut, n),))
    if kind == "flip":
        data, spans = bytearray(original), []
        for _ in range(draw(st.integers(1, 3))):
            at = position()
            data[at] ^= 1 << draw(st.integers(0, 7))
            spans.append((at, at + 1))
        return Corruption(kind, bytes(data), tuple(spans) if data != original else ())
    if kind == "overwrite":
        at = position()
        junk = draw(st.binary(min_size=1, max_size=16))
        data = original[:at] + junk + original[at + len(junk):]
        return Corruption(kind, data, ((at, at + len(junk)),) if data != original else ())
    if kind == "insert":
        at = position()
        return Corruption(kind, original[:at] + draw(st.binary(min_size=1, max_size=16)) + original[at:],
                          ((at, n + 1),))
    junk = draw(st.binary(min_size=1, max_size=600))
    return Corruption(kind, original + junk, ((n, n + 1),))


# --------------------------------------------------------------------------- images


def png_bytes(array: np.ndarray) -> bytes:
    return pil_bytes(Image.fromarray(array), "PNG")


def pil_bytes(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def png_chunk(tag: bytes, data: bytes, crc_ok: bool = True) -> bytes:
    crc = zlib.crc32(tag + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc if crc_ok else crc ^ 1)


def png_declaring(width: int, height: int, idat: bytes | None = None, color: int = 0,
                  crc_ok: bool = True) -> bytes:
    """A PNG whose IHDR declares width x height, followed by `idat` (default: the
    zlib stream of an 8x8 gray image): the header may lie about the data."""
    if idat is None:
        idat = zlib.compress(b"".join(b"\x00" + bytes(range(8 * r, 8 * r + 8)) for r in range(8)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr, crc_ok) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


_JPEG8 = pil_bytes(Image.fromarray(np.full((8, 8, 3), 77, np.uint8)), "JPEG")
_SOF = _JPEG8.find(b"\xff\xc0")


def jpeg_declaring(width: int, height: int) -> bytes:
    """An 8x8 baseline JPEG whose SOF0 marker is patched to declare width x height."""
    data = bytearray(_JPEG8)
    data[_SOF + 5:_SOF + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def zlib_bomb(megabytes: int) -> bytes:
    """zlib stream of `megabytes` MiB of zeros (about 1000:1)."""
    compressor = zlib.compressobj(9)
    chunk = bytes(1 << 20)
    return b"".join(compressor.compress(chunk) for _ in range(megabytes)) + compressor.flush()


IDAT_BOMB = zlib_bomb(16)  # an 8x8 PNG whose pixel stream inflates to 16 MiB


@dataclass(frozen=True)
class ImageCase:
    """Image bytes and what decode_image(mode=None) must do with them."""

    kind: str
    data: bytes = field(repr=False)
    ok: bool
    shape: tuple[int, int, int] | None = None  # (H, W, C) when ok
    pixels: np.ndarray | None = field(default=None, compare=False, repr=False)  # exact pixels when lossless

    def _repr_pretty_(self, printer, cycle):
        printer.text(f"ImageCase({self.kind!r}, {len(self.data)} bytes, ok={self.ok}, shape={self.shape})")


# decode_image(mode=None) keeps these PIL modes as one channel, the rest become RGB
GRAY_MODES = ("L", "1", "I;16", "I")


def image_case(kind: str, seed: int, height: int = 8, width: int = 8) -> ImageCase:
    """One image of a named kind; every kind has a definite expected outcome."""
    rng = np.random.default_rng(seed)
    gray = rng.integers(0, 256, (height, width), dtype=np.uint8)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    if kind == "png-L":
        return ImageCase(kind, png_bytes(gray), True, (height, width, 1), gray[..., None])
    if kind == "png-RGB":
        return ImageCase(kind, png_bytes(rgb), True, (height, width, 3), rgb)
    if kind in ("png-1", "png-LA", "png-P", "png-RGBA", "png-I;16"):
        mode = kind[4:]
        image = Image.fromarray(gray).convert(mode)
        return ImageCase(kind, pil_bytes(image, "PNG"), True, (height, width, 1 if mode in GRAY_MODES else 3))
    if kind == "jpeg-L":
        return ImageCase(kind, pil_bytes(Image.fromarray(gray), "JPEG"), True, (height, width, 1))
    if kind == "jpeg-RGB":
        return ImageCase(kind, pil_bytes(Image.fromarray(rgb), "JPEG"), True, (height, width, 3))
    if kind == "jpeg-CMYK":
        return ImageCase(kind, pil_bytes(Image.fromarray(rgb).convert("CMYK"), "JPEG"), True, (height, width, 3))
    if kind == "png-idat-bomb":  # honest 8x8 header, pixel stream inflating to 16 MiB: only 8 rows are read
        return ImageCase(kind, png_declaring(8, 8, IDAT_BOMB), True, (8, 8, 1))
    if kind == "png-huge":  # header declares more pixels than MAX_IMAGE_PIXELS
        side = int(rng.integers(8193, 2**31 - 1))
        return ImageCase(kind, png_declaring(side, int(rng.integers(8193, 2**31 - 1))), False)
    if kind == "jpeg-huge":
        return ImageCase(kind, jpeg_declaring(int(rng.integers(8193, 65536)), int(rng.integers(8193, 65536))),
                         False)
    if kind in ("gif", "bmp", "tiff", "webp", "ico"):
        return ImageCase(kind, pil_bytes(Image.fromarray(rgb), kind.upper()), False)
    if kind == "mpo":
        image = Image.fromarray(rgb)
        return ImageCase(kind, pil_bytes(image, "MPO", save_all=True, append_images=[image]), False)
    if kind == "png-bad-crc":
        return ImageCase(kind, png_declaring(8, 8, crc_ok=False), False)
    if kind == "png-truncated":
        data = png_bytes(rgb)
        return ImageCase(kind, data[: len(data) // 2], False)
    if kind == "text":
        return ImageCase(kind, b"this is not a png\n", False)
    if kind == "empty":
        return ImageCase(kind, b"", False)
    if kind == "random":
        return ImageCase(kind, rng.integers(0, 256, 64, dtype=np.uint8).tobytes(), False)
    raise ValueError(kind)


GOOD_IMAGES = ["png-L", "png-RGB", "png-1", "png-LA", "png-P", "png-RGBA", "png-I;16", "jpeg-L", "jpeg-RGB",
               "jpeg-CMYK", "png-idat-bomb"]
BAD_IMAGES = ["png-huge", "jpeg-huge", "gif", "bmp", "tiff", "webp", "ico", "mpo", "png-bad-crc", "png-truncated",
              "text", "empty", "random"]


@st.composite
def image_cases(draw, good_weight: int = 3) -> ImageCase:
    kind = draw(st.sampled_from(GOOD_IMAGES * good_weight + BAD_IMAGES))
    size = draw(st.sampled_from([(8, 8), (8, 8), (5, 7), (1, 1)]))
    return image_case(kind, draw(st.integers(0, 2**16)), *size)


# --------------------------------------------------------------------------- tar archives


@dataclass(frozen=True)
class Member:
    name: str
    data: bytes = field(default=b"", repr=False)
    type: bytes = tarfile.REGTYPE
    linkname: str = ""

    def _repr_pretty_(self, printer, cycle):
        printer.text(f"Member({self.name!r}, {len(self.data)} bytes, type={self.type!r})")


def tar_bytes(members: list[Member]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            info = tarfile.TarInfo(member.name)
            info.type, info.mtime, info.mode = member.type, FIXED_MTIME, 0o444
            if member.type == tarfile.REGTYPE:
                info.size = len(member.data)
                tar.addfile(info, io.BytesIO(member.data))
            else:
                info.linkname = member.linkname
                tar.addfile(info)
    return buffer.getvalue()


def member_spans(data: bytes) -> tuple[dict[str, tuple[int, int]], tuple[tuple[int, int], ...]]:
    """({member name: (data start, data stop)}, header ranges) of a tar."""
    spans, headers = {}, []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar.getmembers():
            spans[info.name] = (info.offset_data, info.offset_data + info.size)
            headers.append((info.offset, info.offset_data))
    return spans, tuple(headers)


# --------------------------------------------------------------------------- files on disk


def snapshot(root: Path, exclude: Path) -> dict[str, Any]:
    """Everything under `root` except `exclude`'s subtree: files by content, links by target."""
    found: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d != exclude]
        for name in dirnames + filenames:
            path = here / name
            rel = os.fsencode(path.relative_to(root))
            if path.is_symlink():
                found[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                found[rel] = ("dir",)
            else:
                found[rel] = ("file", path.read_bytes())
    return found


def deep_equal(a: Any, b: Any) -> bool:
    """Equality for unpickled trees holding numpy arrays (iterative: trees may be deep)."""
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.dtype == y.dtype
                    and x.shape == y.shape and np.array_equal(x, y)):
                return False
        elif isinstance(x, dict):
            if not isinstance(y, dict) or list(x) != list(y):
                return False
            stack.extend((x[k], y[k]) for k in x)
        elif isinstance(x, (list, tuple)):
            if type(x) is not type(y) or len(x) != len(y):
                return False
            stack.extend(zip(x, y))
        elif type(x) is not type(y) or x != y:
            return False
    return True


SAFE_LEAVES = (type(None), bool, int, float, complex, str, bytes, bytearray, np.generic, np.dtype)


def only_safe_objects(obj: Any) -> bool:
    """Whether an unpickled tree holds only containers, scalars, numpy arrays and dtypes."""
    stack, seen = [obj], set()
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.extend(x)
        elif isinstance(x, np.ndarray):
            if x.dtype == object:
                stack.extend(x.ravel().tolist())
        elif not isinstance(x, SAFE_LEAVES):
            return False
    return True


assert MAX_IMAGE_PIXELS < 8193 * 8193  # png-huge / jpeg-huge really are over the limit

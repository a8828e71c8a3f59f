"""Numeric matrices from a MATLAB 5 MAT-file (SVHN's format), every length checked.

scipy.io.loadmat is documented as not hardened for untrusted input, and it does
crash the process (SIGSEGV/SIGBUS) on a file whose dimensions claim more data
than the element holds: a one-byte corruption. This reader handles only what
SVHN needs, real non-sparse numeric arrays, plain or zlib-compressed (the
MATLAB v7 default), and refuses anything else with a DataError naming the file.

Layout (MathWorks, "MAT-File Format"): a 128-byte header whose last two bytes
give the byte order, then data elements. An element is a tag (uint32 type,
uint32 byte count) and its data padded to 8 bytes; a "small" element packs type
and count (<= 4) into the tag's first word and its data into the second. A
variable is an miMATRIX element (or an miCOMPRESSED one inflating to it) whose
sub-elements are: array flags, dimensions, name, real part [, imaginary part].
Data is column-major.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from robustdata.errors import DataError

HEADER_BYTES = 128
MI_INT8, MI_INT32, MI_UINT32, MI_MATRIX, MI_COMPRESSED = 1, 5, 6, 14, 15
# storage types of numeric data
MI_DTYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
# MATLAB array classes: numeric ones with their dtype, and the names of the others
MX_NUMERIC = {6: ("double", "f8"), 7: ("single", "f4"), 8: ("int8", "i1"), 9: ("uint8", "u1"),
              10: ("int16", "i2"), 11: ("uint16", "u2"), 12: ("int32", "i4"), 13: ("uint32", "u4"),
              14: ("int64", "i8"), 15: ("uint64", "u8")}
MX_OTHER = {1: "cell", 2: "struct", 3: "object", 4: "char", 5: "sparse", 16: "function", 17: "opaque"}
FLAG_LOGICAL, FLAG_COMPLEX = 0x02, 0x08


@dataclass
class MatVariable:
    name: str
    mclass: str  # MATLAB class: "double", "uint8", ..., "logical", or "char", "cell", ...
    array: np.ndarray | None  # in the class's dtype; None unless a real numeric matrix


def read_variables(path: Path, names: tuple[str, ...]) -> dict[str, MatVariable]:
    """The variables called `names` that the file holds (others are skipped)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            order = _byte_order(f.read(HEADER_BYTES), path)
            found: dict[str, MatVariable] = {}
            while f.tell() < size:
                tag = f.read(8)
                if len(tag) < 8:
                    raise DataError("truncated MAT-file: the file ends inside an element tag", path=path)
                mtype, count = struct.unpack(order + "II", tag)
                if count > size - f.tell():  # checked before reading: the count may be anything
                    raise DataError(f"truncated MAT-file: an element declares {count} bytes, "
                                    f"{size - f.tell()} remain", path=path)
                payload = memoryview(f.read(count))
                if mtype == MI_COMPRESSED:
                    payload = _inflate(payload, order, path)
                elif mtype != MI_MATRIX:
                    raise DataError(f"unexpected top-level MAT element type {mtype}", path=path)
                variable = _matrix(payload, order, path)
                if variable.name in names:
                    if variable.name in found:
                        raise DataError(f"variable {variable.name!r} appears twice", path=path)
                    found[variable.name] = variable
    except OSError as exc:
        raise DataError(f"unreadable file ({exc.strerror or exc})", path=path) from exc
    return found


def _byte_order(header: bytes, path: Path) -> str:
    if len(header) < HEADER_BYTES:
        raise DataError("not a MAT-file: shorter than its 128-byte header", path=path)
    order = {b"IM": "<", b"MI": ">"}.get(header[126:128])
    if order is None or struct.unpack(order + "H", header[124:126])[0] != 0x0100:
        raise DataError("not a MATLAB 5 MAT-file (bad version or byte-order mark; v7.3 HDF5 files "
                        "are not read)", path=path)
    return order


def _inflate(payload: memoryview, order: str, path: Path) -> memoryview:
    """The miMATRIX element inside an miCOMPRESSED one; inflates no more than it declares."""
    inflater = zlib.decompressobj()
    try:
        tag = inflater.decompress(payload, 8)
        if len(tag) < 8:
            raise DataError("compressed MAT element too short for a tag", path=path)
        mtype, count = struct.unpack(order + "II", tag)
        if mtype != MI_MATRIX:
            raise DataError(f"compressed MAT element holds type {mtype}, not a matrix", path=path)
        body = inflater.decompress(inflater.unconsumed_tail, count)
    except zlib.error as exc:
        raise DataError(f"corrupt compressed MAT element ({exc})", path=path) from exc
    if len(body) != count:
        raise DataError(f"compressed MAT element declares {count} bytes but inflates to {len(body)}", path=path)
    return memoryview(body)


def _element(buf: memoryview, pos: int, order: str, path: Path) -> tuple[int, memoryview, int]:
    """(type, data, position of the next element) of the sub-element at `pos`."""
    if pos + 8 > len(buf):
        raise DataError("truncated MAT variable: a sub-element is missing", path=path)
    first, second = struct.unpack_from(order + "II", buf, pos)
    if first >> 16:  # small element: count in the upper half of the first word, data in the second
        mtype, count = first & 0xFFFF, first >> 16
        if count > 4:
            raise DataError(f"small MAT element declares {count} bytes (at most 4)", path=path)
        return mtype, buf[pos + 4:pos + 4 + count], pos + 8
    end = pos + 8 + second
    if end > len(buf):
        raise DataError(f"MAT sub-element declares {second} bytes, its variable holds "
                        f"{max(len(buf) - pos - 8, 0)} more", path=path)
    return first, buf[pos + 8:end], pos + 8 + (second + 7) // 8 * 8


def _matrix(buf: memoryview, order: str, path: Path) -> MatVariable:
    mtype, flags, pos = _element(buf, 0, order, path)
    if mtype != MI_UINT32 or len(flags) != 8:
        raise DataError("MAT variable does not start with its array flags", path=path)
    word = struct.unpack_from(order + "I", flags)[0]
    mclass, bits = word & 0xFF, (word >> 8) & 0xFF
    mtype, dims_data, pos = _element(buf, pos, order, path)
    if mtype != MI_INT32 or len(dims_data) < 8 or len(dims_data) % 4:
        raise DataError("MAT variable has no valid dimensions", path=path)
    dims = struct.unpack(f"{order}{len(dims_data) // 4}i", dims_data)
    if min(dims) < 0:
        raise DataError(f"MAT variable has negative dimensions {dims}", path=path)
    mtype, name_data, pos = _element(buf, pos, order, path)
    try:
        name = bytes(name_data).decode("ascii") if mtype == MI_INT8 else None
    except UnicodeDecodeError:
        name = None
    if name is None:
        raise DataError("MAT variable has no valid name", path=path)
    if mclass not in MX_NUMERIC or bits & FLAG_COMPLEX:
        kind = MX_OTHER.get(mclass, f"class {mclass}") if mclass not in MX_NUMERIC else "complex"
        return MatVariable(name, kind, None)  # not parsed further: the caller refuses it
    class_name, class_dtype = MX_NUMERIC[mclass]
    mtype, real, _ = _element(buf, pos, order, path)
    if mtype not in MI_DTYPES:
        raise DataError(f"MAT variable {name!r} stores its data as type {mtype}, not a number", path=path)
    stored = np.dtype(order + MI_DTYPES[mtype])
    if len(real) != math.prod(dims) * stored.itemsize:  # Python ints: no overflow
        raise DataError(f"MAT variable {name!r} declares dimensions {dims} ({math.prod(dims)} values) but "
                        f"holds {len(real)} bytes of {stored}", path=path)
    raw = np.frombuffer(real, dtype=stored).reshape(dims, order="F")
    with np.errstate(invalid="ignore"):  # NaN/inf cast to an integer class: caught just below
        array = raw.astype(class_dtype, copy=False)
        # MATLAB may store a class in a narrower type; a value that changes when cast does not fit it
        fits = array.dtype == raw.dtype or np.array_equal(array.astype(raw.dtype), raw,
                                                          equal_nan=raw.dtype.kind == "f")
    if not fits:
        raise DataError(f"MAT variable {name!r} holds values outside its class {class_name}", path=path)
    return MatVariable(name, "logical" if bits & FLAG_LOGICAL else class_name, array)

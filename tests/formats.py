"""Tiny datasets written in each source's own on-disk format, with known contents."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_mnist_like(root: Path, folder: str, n: int = 12, seed: int = 0, compress_test: bool = False):
    """torchvision's MNIST/FashionMNIST raw layout; returns {split: (images, labels)}."""
    rng = np.random.default_rng(seed)
    planted = {}
    for split, prefix in [("train", "train"), ("test", "t10k")]:
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        raw = root / folder / "raw"
        compress = compress_test and split == "test"
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, compress)
        planted[split] = (images[..., None], labels.astype(np.int64))
    return planted


def make_cifar10(root: Path, n_per_batch: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    planted = {"train": ([], []), "test": ([], [])}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        # the real files are Python-2 pickles with bytes keys
        (base / name).write_bytes(pickle.dumps({b"data": data, b"labels": labels, b"batch_label": b"x"}, protocol=2))
        split = "test" if name == "test_batch" else "train"
        planted[split][0].append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        planted[split][1].extend(labels)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (base / "batches.meta").write_bytes(pickle.dumps({b"label_names": [n.encode() for n in names]}, protocol=2))
    return {s: (np.concatenate(i), np.array(l)) for s, (i, l) in planted.items()}, names


def make_cifar100(root: Path, n: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    planted = {}
    for split in ["train", "test"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        (base / split).write_bytes(pickle.dumps({"data": data, "fine_labels": fine,
                                                 "coarse_labels": [f // 5 for f in fine]}))
        planted[split] = (data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.array(fine))
    names = [f"class{i}" for i in range(100)]
    (base / "meta").write_bytes(pickle.dumps({"fine_label_names": names, "coarse_label_names": []}))
    return planted, names


def make_svhn(root: Path, n: int = 6, seed: int = 0):
    import scipy.io

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    planted = {}
    for split in ["train", "test", "extra"]:
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        digits = np.arange(n) % 10
        stored = np.where(digits == 0, 10, digits).reshape(-1, 1)  # SVHN stores 0 as 10
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": images.transpose(1, 2, 3, 0), "y": stored})
        planted[split] = (images, digits)
    return planted


def make_imagefolder(root: Path, classes=("cat", "dog"), per_class: int = 3, size=(10, 12), seed: int = 0,
                     splits=None, jpeg_every: int = 0):
    """PNG images (RGB); every `jpeg_every`-th as JPEG. Returns {relative path: (array, label)}."""
    rng = np.random.default_rng(seed)
    planted = {}
    for split in splits or [None]:
        base = root / split if split else root
        for label, name in enumerate(classes):
            (base / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                jpeg = jpeg_every and i % jpeg_every == 0
                path = base / name / f"img{i}.{'jpg' if jpeg else 'png'}"
                Image.fromarray(image).save(path)
                planted[path.relative_to(root).as_posix()] = (None if jpeg else image, label)
    return planted
